"""A model too large for memory, run one decoder layer at a time from its checkpoint.

:class:`LayerwiseModel` keeps the model as a *skeleton* (built from its config on the meta
device: names and shapes, no weights) and loads the weights of one part at a time from the
safetensors checkpoint (:class:`~abliterate.model.checkpoint.ParameterMap`, which builds fused
expert parameters as ``from_pretrained`` does). :meth:`LayerwiseModel.run` takes every batch of
prompts through the model *layer-major*: the embedding, then decoder layer 0 for every batch,
then layer 1, … so each layer's weights are read once per pass, and between layers only the
residual streams of the prompts are kept, ``(batch, pos, d_model)`` per batch. Several
*streams* share one pass: the same prompts under different edits (one per candidate
direction, say), each with its own residual streams, for the price of one read of the weights.

The inputs of every layer (attention mask, position ids, rotary embeddings, per-layer mask
kinds such as sliding windows) are those the model's own forward computes: a *probe* pass runs
the model's decoder stack with every layer replaced by a recorder that keeps its arguments,
and stops after the last one. The logits come the same way: a *replay* pass runs the causal
LM's forward with the first layer replaced by one that returns the final residual stream, so
the final norm, the head and any logit soft-capping are the model's own. Padding is on the
left, as in :func:`abliterate.data.chat.batches`, so the last position is every prompt's last
token.

Edits and measurements attach as on a loaded model: hooks on the skeleton's modules, which hold
real weights while they run. A stream's context is entered once per stage (``None`` for the
embedding stage, then each layer index) and may install the hooks of that stage's writers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from abliterate.model.anatomy import anatomy_of
from abliterate.model.checkpoint import Checkpoint, ParameterMap
from abliterate.progress import progress

if TYPE_CHECKING:
    from transformers import BatchEncoding

log = logging.getLogger(__name__)

StageContext = Callable[[int | None], AbstractContextManager[Any]]
"""A stream's context for one stage: ``None`` is the embedding stage, else a layer index."""
BatchContext = Callable[[int, int], AbstractContextManager[Any]]
"""A context around one layer's call on one batch: ``(layer, batch)``."""


class _Stop(Exception):
    """Ends a probe pass after the last layer's arguments are recorded."""


def _hidden(value: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple led by it (older code)."""
    return value[0] if isinstance(value, tuple) else value


class _Stand(nn.Module):
    """Stands in for a decoder layer during a probe or replay pass (see the module docstring).

    Attribute reads it does not answer go to the real layer, so the model's forward finds what
    it asks of its layers (``attention_type``, ...). ``output`` is what it returns: its input
    (None), or a fixed tensor.
    """

    def __init__(self, layer: nn.Module, index: int, calls: list[Any], last: bool) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: the stand-in owns no weights
        self.index, self.calls, self.last = index, calls, last
        self.output: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        if self.last and self.output is None:
            raise _Stop
        return hidden_states if self.output is None else self.output


class LayerwiseModel:
    """A causal LM whose weights stay on disk, run layer-major (see the module docstring).

    Args:
        directory: A model directory with safetensors weights.
        dtype: The dtype weights are computed in (float32 on a CPU).
        device: Where each part is loaded and run.

    Attributes:
        checkpoint: The weights on disk.
        model: The skeleton (its weights are on the meta device except while a part runs).
        params: How its parameters are made from the checkpoint's tensors.
        anatomy: The skeleton's bound anatomy (layers, writers, sites).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.checkpoint = Checkpoint(directory)
        self.model = self.checkpoint.skeleton(dtype)
        self.params = ParameterMap(self.checkpoint, self.model)
        self.anatomy = anatomy_of(self.model)
        self.dtype, self.device = dtype, torch.device(device)
        for name, buffer in list(self.model.named_buffers()):
            _set(self.model, name, buffer.to(self.device), buffer=True)
        a = self.anatomy.anatomy
        self._layers_path = f"{a.decoder}.{a.table.layers}"
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        inner = (f"{self._layers_path}.",)
        head = (f"{a.decoder}.{a.table.final_norm}.", f"{a.lm_head}.")
        self._head = [n for n in names if n.startswith(head)]
        self._front = [n for n in names if not n.startswith(inner + head)]

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return self.anatomy.n_layers

    @contextmanager
    def loaded(self, names: Sequence[str]) -> Iterator[None]:
        """The parameters ``names`` loaded from the checkpoint for the block, meta again after."""
        try:
            for name in names:
                value = self.params.load(name, self.dtype).to(self.device)
                _set(self.model, name, value)
            yield
        finally:
            for name in names:
                _set(self.model, name, None)

    def layer_parameters(self, index: int) -> list[str]:
        """Names of the parameters of decoder layer ``index``."""
        prefix = f"{self._layers_path}.{index}"
        layer = self.model.get_submodule(prefix)
        return [f"{prefix}.{n}" for n, _ in layer.named_parameters()]

    @contextmanager
    def _standing_in(self, calls: list[Any]) -> Iterator[list[_Stand]]:
        """Every decoder layer replaced by a :class:`_Stand` for the block."""
        layers = self.model.get_submodule(self._layers_path)
        assert isinstance(layers, nn.ModuleList)
        real = list(layers)
        stands = [_Stand(layer, i, calls, i == len(real) - 1) for i, layer in enumerate(real)]
        try:
            for i, stand in enumerate(stands):
                layers[i] = stand
            yield stands
        finally:
            for i, layer in enumerate(real):
                layers[i] = layer

    def _probe(
        self, inputs: Mapping[str, torch.Tensor], cache: Any = None
    ) -> tuple[torch.Tensor, list[Any]]:
        """The embedding's output (layer 0's input) and every layer's other arguments, for
        ``inputs`` (``input_ids``, ``attention_mask``) following what ``cache`` holds."""
        calls: list[Any] = []
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        # The last layer's stand-in raises _Stop once it has recorded: nothing after it runs.
        if cache is not None:  # (transformers 5.24 also calls it ``cache``; 5.0 only this)
            inputs = {**inputs, "past_key_values": cache}
        with self._standing_in(calls), suppress(_Stop):
            self.anatomy.body(**inputs, use_cache=cache is not None)
        assert len(calls) == self.n_layers, "the model's forward skipped decoder layers"
        return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]

    def _replay(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``(batch, vocab)`` for the final residual stream ``hidden``."""
        calls: list[Any] = []
        last = hidden[:, -1:]  # (batch, 1, d_model): the norm and head act position-wise
        with self._standing_in(calls) as stands:
            stands[0].output = last
            for stand in stands[1:]:
                stand.last = False
            out = self.model(inputs_embeds=torch.zeros_like(last), use_cache=False)
        return out.logits[:, -1, :]

    def _pass(
        self,
        inputs: Sequence[Mapping[str, torch.Tensor]],
        streams: Sequence[StageContext],
        *,
        caches: Sequence[Any] | None = None,
        per_batch: BatchContext | None = None,
        logits: bool = True,
        desc: str | None = None,
    ) -> list[list[torch.Tensor]] | None:
        """One pass over the weights for every batch of every stream (see :meth:`run`)."""
        layer_args: list[list[Any]] = []
        hidden: list[list[torch.Tensor]] = [[] for _ in streams]
        with self.loaded(self._front):
            for k, stream in enumerate(streams):
                with stream(None):
                    for b, batch in enumerate(inputs):
                        h, args = self._probe(batch, None if caches is None else caches[b])
                        if k == 0:
                            layer_args.append(args)
                        hidden[k].append(h)  # (batch, pos, d_model)
        layers: Iterable[int] = range(self.n_layers)
        if desc is not None:
            layers = progress(layers, total=self.n_layers, desc=desc)
        for i in layers:
            layer = self.model.get_submodule(f"{self._layers_path}.{i}")
            with self.loaded(self.layer_parameters(i)):
                for k, stream in enumerate(streams):
                    with stream(i):
                        for b in range(len(inputs)):
                            args, kwargs = layer_args[b][i]
                            with per_batch(i, b) if per_batch else nullcontext():
                                hidden[k][b] = _hidden(layer(hidden[k][b], *args, **kwargs))
        if not logits:
            return None
        with self.loaded(self._head):
            return [[self._replay(h).float().cpu() for h in hs] for hs in hidden]

    @torch.inference_mode()
    def run(
        self,
        encodings: Sequence[BatchEncoding],
        streams: Sequence[StageContext] = (lambda _stage: nullcontext(),),
        *,
        per_batch: BatchContext | None = None,
        logits: bool = True,
        desc: str = "Layers",
    ) -> list[list[torch.Tensor]] | None:
        """Run every batch through the model once per stream, reading each part's weights once.

        Args:
            encodings: Left-padded batches (``input_ids``, ``attention_mask``).
            streams: One context factory per stream (see :data:`StageContext`).
            per_batch: A context around each layer's call on each batch (all streams).
            logits: Compute the last position's logits (else only the layers run).

        Returns:
            Per stream, per batch, the float32 logits ``(batch, vocab)`` on the CPU; or None.
        """
        inputs = [{k: e[k] for k in ("input_ids", "attention_mask")} for e in encodings]
        return self._pass(inputs, streams, per_batch=per_batch, logits=logits, desc=desc)

    @torch.inference_mode()
    def generate(
        self,
        encodings: Sequence[BatchEncoding],
        max_new_tokens: int,
        stream: StageContext = lambda _stage: nullcontext(),
        *,
        eos_token_id: int | None,
        pad_token_id: int,
        desc: str = "Generating (layer-streamed)",
    ) -> list[torch.Tensor]:
        """Greedy continuations of left-padded batches: per batch ``(batch, new)`` token ids,
        ``pad_token_id`` after a row's end-of-sequence token.

        Every batch advances one token per pass, each layer with its own key/value cache, so
        each new token costs one read of all the weights (whatever the number of batches).
        """
        from transformers import DynamicCache

        inputs = [{k: e[k] for k in ("input_ids", "attention_mask")} for e in encodings]
        caches = [DynamicCache(config=self.model.config) for _ in encodings]
        new: list[list[torch.Tensor]] = [[] for _ in encodings]
        done = [torch.zeros(len(e["input_ids"]), dtype=torch.bool) for e in encodings]
        for _ in progress(range(max_new_tokens), total=max_new_tokens, desc=desc):
            logits = self._pass(inputs, [stream], caches=caches)
            assert logits is not None
            for b, row_logits in enumerate(logits[0]):
                token = row_logits.argmax(-1)  # (batch,)
                token = torch.where(done[b], torch.full_like(token, pad_token_id), token)
                if eos_token_id is not None:
                    done[b] |= token == eos_token_id
                new[b].append(token)
                mask = torch.cat([inputs[b]["attention_mask"], torch.ones_like(token)[:, None]], 1)
                inputs[b] = {"input_ids": token[:, None], "attention_mask": mask}
            if all(bool(d.all()) for d in done):
                break
        return [torch.stack(tokens, dim=1) for tokens in new]


def _set(model: nn.Module, name: str, value: torch.Tensor | None, buffer: bool = False) -> None:
    """Put ``value`` as parameter (or buffer) ``name`` of ``model``; None empties a parameter
    back onto the meta device."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    if buffer:
        module._buffers[attr] = value
        return
    old = module._parameters[attr]
    assert old is not None
    if value is None:
        value = torch.empty_like(old, device="meta")
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
