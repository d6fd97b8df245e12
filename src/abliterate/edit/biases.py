"""Exporting a model whose writers gained biases in memory (baked steering).

Baking a constant addition (:class:`~abliterate.core.steering.Steering`) into a writer that has
no bias creates a zero bias parameter on the in-memory model first
(:meth:`~abliterate.model.stores.ModuleStore.create_bias`). Such a model computes exactly what
the hooks compute, but a saved copy would lose the new tensors on reload unless the
architecture's config declares them. Some families have a config switch for that:

* ``llama``: ``mlp_bias`` gives every MLP projection a bias, ``attention_bias`` every
  attention projection;
* ``qwen3`` and ``gemma``: ``attention_bias`` (their MLPs have no switch).

:func:`declare_biases` turns the needed switches on and gives every projection the switch
makes biased, but that the edit did not touch, a zero bias, so the exported model equals the
in-memory one exactly (``verify_export`` checks it). Which tensors a switch adds is read from
transformers itself, by building the architecture from the new config on the meta device (no
memory, no weights), not guessed. Families without a switch for a writer (``qwen2``,
``mistral``, every MLP but llama's) cannot be exported with a baked addition: the error says
so and points to the hooks (``chat``/``evaluate --steer``) and the llama.cpp control vector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from abliterate.core.edits import WriterRole
from abliterate.errors import EditError
from abliterate.model.anatomy import anatomy_of
from abliterate.model.stores import ModuleStore

if TYPE_CHECKING:
    from torch import nn

BIAS_SWITCHES: dict[str, dict[WriterRole, str]] = {
    "llama": {"attention": "attention_bias", "mlp": "mlp_bias"},
    "qwen3": {"attention": "attention_bias"},
    "gemma": {"attention": "attention_bias"},
}
"""Per ``model_type``: the config switch that declares a bias on each kind of writer."""


def _declared(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter the model's config declares, with its shape (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return {n: tuple(p.shape) for n, p in skeleton.named_parameters()}


def declare_biases(model: nn.Module) -> list[str]:
    """Make ``model``'s config declare the biases created on it, zero-filling the others the
    switches add; returns the switches turned on (none when no bias was created).

    Raises:
        EditError: a created bias belongs to a writer whose family has no config switch for it.
    """
    declared = _declared(model)
    created = [n for n, _ in model.named_parameters() if n not in declared]
    if not created:
        return []
    bound = anatomy_of(model)
    family = bound.anatomy.family
    switches = BIAS_SWITCHES.get(family, {})
    roles = {w.writer.bias: w.writer.role for w in bound.writers if w.writer.bias is not None}
    turned_on = []
    for name in created:
        role = roles.get(name)
        switch = switches.get(role) if role is not None else None
        if switch is None:
            raise EditError(
                f"{name} was added to bake the steering, but a '{family}' config cannot declare "
                "it, so an exported model would silently lose it. Apply the steering with hooks "
                "(abliterate chat/evaluate --steer) or in llama.cpp with the control vector "
                "(--control-vector), or steer at a site whose writer can carry a bias."
            )
        if switch not in turned_on:
            setattr(model.config, switch, True)
            turned_on.append(switch)
    store = ModuleStore(model)
    for name, shape in _declared(model).items():
        if not store.has(name):
            module = name.rpartition(".")[0]
            store.create_bias(name, shape[0], like=f"{module}.weight")
    missing = set(_declared(model)) ^ {n for n, _ in model.named_parameters()}
    assert not missing, f"declared and actual parameters differ: {sorted(missing)[:5]}"
    return turned_on
