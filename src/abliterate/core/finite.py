"""Finiteness of tensors: the first tensor holding a NaN or an infinity, by name.

A NaN in a weight spreads through every later computation (activations, directions, scores,
the exported model) without raising anywhere, so the tool checks weights where they enter (a
loaded model) and where they change (an applied edit).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Elements checked at a time: bounds the temporary boolean mask (16 MiB) for any tensor size.
CHUNK = 1 << 24


@torch.no_grad()
def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinite element, else None.

    Tensors on the ``meta`` device (offloaded, not yet materialised) are skipped.
    """
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            if not bool(torch.isfinite(flat[start : start + CHUNK]).all()):
                return name
    return None
