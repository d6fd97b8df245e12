"""Finiteness of tensors: the first tensor holding a NaN or an infinity, by name.

A NaN in a weight spreads through every later computation (activations, directions, scores,
the exported model) without raising anywhere, so the tool checks weights where they enter (a
loaded model) and where they change (an applied edit).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Elements converted at a time for one-byte float types (float8), which torch cannot reduce.
CHUNK = 1 << 24


def _finite(flat: torch.Tensor) -> bool:
    # aminmax propagates NaN and returns ±inf when there is one: two scalars, no mask the size
    # of the tensor (torch.isfinite(...).all() is about ten times slower on a CPU).
    low, high = torch.aminmax(flat)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


@torch.no_grad()
def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinite element, else None.

    Empty tensors and tensors on the ``meta`` device (offloaded, not yet materialised) are
    skipped.
    """
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta" or not tensor.numel():
            continue
        flat = tensor.detach().reshape(-1)
        if flat.element_size() > 1:
            if not _finite(flat):
                return name
            continue
        for start in range(0, flat.numel(), CHUNK):
            if not _finite(flat[start : start + CHUNK].float()):
                return name
    return None
