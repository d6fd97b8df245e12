"""Weight stores: where a permanent edit is applied, tensor by tensor.

A :class:`WeightStore` hands out named tensors to change; the edit code
(:func:`abliterate.edit.weights.apply_edit`) is the same for every store. The first
implementation is the in-memory model (:class:`ModuleStore`); a streamed safetensors
checkpoint (:class:`abliterate.model.safetensors_store.SafetensorsStore`), a GGUF file and an
adapter are further implementations of the same interface.

A store names tensors its own way: :meth:`WeightStore.locate` turns a residual writer of the
anatomy (named as the loaded model's parameters) into the same writer as the store holds it —
for a checkpoint on disk, the file's tensor names, and a fused expert stored one tensor per
expert becomes that expert's own tensor. :class:`CheckpointStore` is a store that writes a new
checkpoint (what ``abliterate apply`` uses): it knows the anatomy of the model it holds and
finishes by writing every file of the edited copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from abliterate.model.anatomy import Anatomy, Writer


class WeightStore(Protocol):
    """Named tensors that an edit reads and rewrites."""

    def read(self, name: str) -> torch.Tensor:
        """The tensor called ``name`` (read-only use)."""
        ...

    def writable(self, name: str) -> AbstractContextManager[torch.Tensor]:
        """Context manager: yields the tensor ``name``; what is written into it is kept."""
        ...

    def has(self, name: str) -> bool:
        """Whether the store holds a tensor called ``name``."""
        ...

    def locate(self, writer: Writer) -> Writer:
        """``writer`` with the store's tensor names, layout and expert index."""
        ...


class CheckpointStore(WeightStore, Protocol):
    """A store that writes an edited copy of a model checkpoint.

    Attributes:
        anatomy: The residual anatomy of the model it holds (from its config).
        source: The checkpoint it reads (a directory or a file).
    """

    anatomy: Anatomy
    source: Path

    def finish(self) -> list[Path]:
        """Write everything the edit left untouched; returns the weight files written."""
        ...


@runtime_checkable
class BiasStore(WeightStore, Protocol):
    """A store that can also give a writer a bias it does not have (all zeros), so that an
    edit adding a constant to the writer's output (steering) can be baked.

    The in-memory model can (:class:`ModuleStore`). A streamed safetensors checkpoint would
    add the zero tensor to its output and declare it in ``config.json`` the way
    :mod:`abliterate.edit.biases` does for exports; a GGUF file would add an ``F32`` tensor
    named like the other biases of the architecture (``blk.N.ffn_down.bias``), which only
    architectures whose llama.cpp graph reads that bias can use.
    """

    def create_bias(self, name: str, size: int, like: str) -> None:
        """Create the zero ``(size,)`` tensor ``name`` with the dtype and device of ``like``."""
        ...


class ModuleStore:
    """The parameters of an in-memory model, edited in place.

    A parameter shared by several names (a token embedding tied to the output head) is untied
    before it is written: the written name gets its own copy, the others keep the original, and
    the config's ``tie_word_embeddings`` is turned off so a saved model is not re-tied on load.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def has(self, name: str) -> bool:
        """Whether ``name`` is a parameter of the model."""
        try:
            self.model.get_parameter(name)
        except AttributeError:
            return False
        return True

    def locate(self, writer: Writer) -> Writer:
        """The writer itself: the anatomy names the model's parameters."""
        return writer

    def read(self, name: str) -> torch.Tensor:
        """The parameter's data (no copy)."""
        return self.model.get_parameter(name).data

    @contextmanager
    def writable(self, name: str) -> Iterator[torch.Tensor]:
        """The parameter's data, untied first if another name shares it."""
        param = self.model.get_parameter(name)
        if self._shared(name, param):
            self._untie(name, param)
            param = self.model.get_parameter(name)
        yield param.data

    def create_bias(self, name: str, size: int, like: str) -> None:
        """Give the module holding ``name`` a zero bias parameter (an ``nn.Linear`` built
        without one then adds it in its forward pass)."""
        import torch
        from torch import nn

        if self.has(name):
            raise ValueError(f"{name} already exists")
        weight = self.model.get_parameter(like)
        module_path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_path)
        zeros = torch.zeros(size, dtype=weight.dtype, device=weight.device)
        setattr(module, attr, nn.Parameter(zeros, requires_grad=weight.requires_grad))

    def _shared(self, name: str, param: nn.Parameter) -> bool:
        return any(
            p is param and n != name for n, p in self.model.named_parameters(remove_duplicate=False)
        )

    def _untie(self, name: str, param: nn.Parameter) -> None:
        from torch import nn

        module_path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_path)
        setattr(
            module, attr, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        )
        config = getattr(self.model, "config", None)
        if config is not None:
            config.tie_word_embeddings = False
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
            if text_config is not None:
                text_config.tie_word_embeddings = False
