"""Print the architecture support table (Markdown) from the test matrix's tiny models.

For every case of ``tests/arch_cases.py`` (a tiny random model of one family, built from its
config class) it runs the checks of ``tests/test_architectures.py``: the load-time
verification, a full-strength ablation through hooks (largest component left along the
direction in any residual state), hooks against baked weights, and save → reload. Then it
lists the families the table refuses, with the reason, and the image-text-to-text models whose
language model is edited.

    PYTHONPATH=src python scripts/support_table.py [--out support.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from arch_cases import CASES, MULTIMODAL, along, build_model, build_multimodal, residual_states

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.model import families
from abliterate.model.anatomy import anatomy_of
from abliterate.model.families import FAMILIES
from abliterate.model.loading import auto_model_class
from abliterate.model.verify import verify_anatomy

VOCAB = 128
GROUPS = {
    "dense": "dense",
    "post-norm": "post-norm",
    "parallel": "parallel block",
    "moe": "MoE",
    "hybrid": "hybrid",
}


class _Ids:
    """A stand-in tokenizer for the verification prompt (tiny models have no vocabulary)."""

    def __call__(self, text: str, **_: Any) -> Any:
        ids = torch.tensor([[4 + ord(c) % (VOCAB - 4) for c in text[:24]]])
        return type("Encoding", (), {"input_ids": ids})()


def check(model: Any) -> dict[str, Any]:
    """The matrix's checks on one tiny model."""
    arch = anatomy_of(model)
    verified = verify_anatomy(model, _Ids())
    g = torch.Generator().manual_seed(1)
    d = Direction(torch.randn(arch.d_model, generator=g)).normalized()
    spec = Ablation.uniform(d, arch.n_layers)
    ids = torch.randint(4, VOCAB, (2, 12), generator=g)
    with edit_hooks(model, spec), residual_states(arch) as states, torch.no_grad():
        hooked = model(input_ids=ids).logits
    summary = bake(model, spec)
    with torch.no_grad():
        baked = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = auto_model_class(model.config).from_pretrained(tmp).eval()
        with torch.no_grad():
            again = reloaded(input_ids=ids).logits
    return {
        "writers": summary.writers_by_role,
        "along": along(states, d.vector),
        "hooks": float((hooked - baked).abs().max()),
        "reload": float((baked - again).abs().max()),
        "verify": verified.max_error,
    }


def row(name: str, group: str, result: dict[str, Any]) -> str:
    writers = ", ".join(f"{n} {role}" for role, n in result["writers"].items())
    exact = result["along"] < 1e-5 and result["hooks"] < 1e-4 and result["reload"] == 0.0
    return (
        f"| `{name}` | {group} | {writers} | {result['along']:.0e} | {result['hooks']:.0e} | "
        f"{'exact' if result['reload'] == 0.0 else result['reload']:} | "
        f"{result['verify']:.0e} | {'exact' if exact else 'NOT EXACT'} |"
    )


def _language_model_alone(model: Any) -> Any:
    """The checkpoint of ``model`` loaded as load_model loads it (its language model)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return auto_model_class(model.config).from_pretrained(tmp).eval()


def table() -> str:
    """The whole Markdown text."""
    lines = [
        "| family (`model_type`) | kind | writers edited (tiny model) | left along v | "
        "hooks − weights | save → reload | load-time check | edit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, spec in CASES.items():
        torch.manual_seed(0)
        lines.append(row(case, GROUPS[spec.group], check(build_model(case, VOCAB))))
    for model_type in MULTIMODAL:
        model = build_multimodal(model_type, VOCAB)
        kind = "image-text-to-text"
        if not families.MULTIMODAL[model_type].whole:
            model, kind = _language_model_alone(model), "image-text-to-text (LM alone)"
        text = anatomy_of(model).anatomy.family
        lines.append(row(f"{model_type} → {text}", kind, check(model)))
    lines += ["", "Refused (the edit would not be exact):", ""]
    for family in FAMILIES:
        if family.refused is not None:
            names = ", ".join(f"`{t}`" for t in family.model_types)
            lines.append(f"- {names}: {family.refused}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    text = table()
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
