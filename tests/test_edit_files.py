"""Edits as values and files: dict and directory round trips, value equality, refusing
another kind, the layouts written by abliterate 0.1, and exported models that reproduce the
edited model exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from edit_variants import VARIANTS, build, unit
from safetensors.torch import save_file

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.edits import Composite, Edit, edit_from_dict, load_edit
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.weights import bake


@pytest.mark.parametrize("variant", VARIANTS)
def test_edit_round_trips_through_dict_and_directory(variant: str, tmp_path: Path) -> None:
    edit = build(variant, strength=0.75)
    data = json.loads(json.dumps(edit.to_dict()))  # JSON-ready
    assert data["kind"] == edit.kind
    assert edit_from_dict(data, edit.tensors()) == edit
    edit.save(tmp_path / "edit")
    assert sorted(p.name for p in (tmp_path / "edit").iterdir()) == sorted(
        ["edit_spec.json", "edit.safetensors"]
        + (["direction.json", "direction.safetensors"] if isinstance(edit, Ablation) else [])
    )
    loaded = load_edit(tmp_path / "edit")
    assert loaded == edit and type(loaded) is type(edit)
    assert type(edit).load(tmp_path / "edit") == edit
    assert Edit.load(tmp_path / "edit") == edit
    # Equality is by value: any change of a strength or a vector breaks it.
    assert build(variant, strength=0.5) != edit


def test_edit_equality_sees_every_field() -> None:
    edit = build("norm_preserving_per_layer_extra_partial")
    assert isinstance(edit, Ablation)
    assert edit == build("norm_preserving_per_layer_extra_partial")
    nudged = edit.direction.vector.clone()
    nudged[0] = torch.nextafter(nudged[0], torch.tensor(2.0))
    changes: list[dict[str, Any]] = [
        {"direction": Direction(nudged)},
        {"embedding": 0.25},
        {"attention": (0.0, 1.2, 0.4, 0.8)},
        {"mlp": (0.7, 0.0, 1.0, 0.2)},
        {"layer_directions": None},
        {"mode": "plain"},
        {"extra_directions": edit.extra_directions[:1]},
    ]
    for change in changes:
        assert replace(edit, **change) != edit, change
    assert edit != edit.then(edit) and edit != "edit"


def test_load_refuses_another_kind_and_unreadable_directories(tmp_path: Path) -> None:
    build("plain").save(tmp_path / "ablation")
    build("plain_then_norm_preserving").save(tmp_path / "composite")
    with pytest.raises(ValueError, match="holds a 'composite' edit, not a 'directional_ablation'"):
        Ablation.load(tmp_path / "composite")
    with pytest.raises(ValueError, match="holds a 'directional_ablation' edit, not a 'composite'"):
        Composite.load(tmp_path / "ablation")
    with pytest.raises(ValueError, match=r"unknown edit kind 'unknown_kind'.*directional_ablation"):
        edit_from_dict({"kind": "unknown_kind"}, {})
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "edit_spec.json").write_text('{"kind": "unknown_kind"}')
    with pytest.raises(ValueError, match="unknown edit kind"):
        load_edit(tmp_path / "odd")
    (tmp_path / "odd" / "edit_spec.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not describe an edit"):
        load_edit(tmp_path / "odd")
    with pytest.raises(ValueError, match="not a readable edit"):
        load_edit(tmp_path / "missing")


def _direction_meta(d: Direction, *, projected: bool | None) -> dict[str, Any]:
    """A direction's JSON as 0.1 wrote it (the first release had no "projected")."""
    meta: dict[str, Any] = {"layer": d.layer, "site": d.site, "scale": d.scale,
                            "model": d.model, "revision": d.revision,
                            "dataset_hashes": d.dataset_hashes, "d_model": d.d_model}  # fmt: skip
    if projected is not None:
        meta["projected"] = projected
    return meta


def test_legacy_layouts_of_version_0_1_still_load(tmp_path: Path) -> None:
    """0.1 wrote ``edit_spec.json`` beside ``direction.safetensors``/``.json`` and, from the
    optimize release on, ``layer_directions.safetensors``/``extra_directions.safetensors``."""
    main = Direction(unit(8, 1).vector, layer=2, site="mid", scale=3.5, model="org/m",
                     revision="abc", dataset_hashes={"harmful": "h1"})  # fmt: skip
    per_layer = tuple(Direction(unit(8, 10 + i).vector, layer=i, site="mid") for i in range(3))
    extra = (Direction(unit(8, 2).vector, layer=2, site="mid", scale=0.5),)

    # The first release: one direction, no mode, no per-layer or extra directions.
    first = tmp_path / "first"
    first.mkdir()
    save_file({"direction": main.vector}, str(first / "direction.safetensors"))
    (first / "direction.json").write_text(json.dumps(_direction_meta(main, projected=None)))
    (first / "edit_spec.json").write_text(json.dumps({
        "kind": "directional_ablation", "direction": _direction_meta(main, projected=None),
        "embedding": 1.0, "attention": [1.0, 0.5, 0.0], "mlp": [0.0, 1.0, 1.0],
    }))  # fmt: skip
    expected = Ablation(main, 1.0, (1.0, 0.5, 0.0), (0.0, 1.0, 1.0))
    assert load_edit(first) == expected
    assert Ablation.load(first) == expected

    # The optimize release: mode, per-layer and extra directions in their own files.
    later = tmp_path / "later"
    later.mkdir()
    save_file({"direction": main.vector}, str(later / "direction.safetensors"))
    (later / "direction.json").write_text(json.dumps(_direction_meta(main, projected=False)))
    save_file({"layer_directions": torch.stack([d.vector for d in per_layer])},
              str(later / "layer_directions.safetensors"))  # fmt: skip
    save_file({"extra_directions": torch.stack([d.vector for d in extra])},
              str(later / "extra_directions.safetensors"))  # fmt: skip
    (later / "edit_spec.json").write_text(json.dumps({
        "kind": "directional_ablation", "mode": "norm_preserving",
        "direction": _direction_meta(main, projected=False),
        "embedding": 0.0, "attention": [0.25, 0.5, 0.75], "mlp": [1.0, 1.0, 0.5],
        "layer_directions": [_direction_meta(d, projected=False) for d in per_layer],
        "extra_directions": [_direction_meta(d, projected=False) for d in extra],
    }, indent=2))  # fmt: skip
    expected = Ablation(main, 0.0, (0.25, 0.5, 0.75), (1.0, 1.0, 0.5), per_layer,
                        "norm_preserving", extra)  # fmt: skip
    loaded = load_edit(later)
    assert loaded == expected
    assert isinstance(loaded, Ablation) and loaded.layer_directions == per_layer
    # Saving it again writes the current layout, which reads back equal.
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "edit.safetensors").is_file()
    assert load_edit(tmp_path / "again") == expected


@pytest.mark.parametrize(
    ("family_name", "variant"),
    [(f, "plain") for f in ("llama", "qwen2", "gemma")]
    + [("qwen2", v) for v in ("per_layer", "extra_directions", "norm_preserving",
                              "norm_preserving_per_layer_extra_partial",
                              "plain_then_norm_preserving")],
)  # fmt: skip
def test_exported_model_reproduces_the_edited_model_exactly(
    family_name: str,
    variant: str,
    make_model: Callable[[str], Any],
    tokenizer: Any,
    texts: list[str],
    tmp_path: Path,
) -> None:
    model = make_model(family_name)
    edit = build(variant)
    bake(model, edit)
    save_model(model, tokenizer, tmp_path / "m", {"edit": edit.to_dict()})
    assert verify_export(model, tokenizer, tmp_path / "m", texts) == 0.0
    record = json.loads((tmp_path / "m" / "abliteration.json").read_text())
    assert edit_from_dict(record["edit"], edit.tensors()) == edit
    assert list((tmp_path / "m").glob("*.safetensors"))


def test_a_corrupt_edit_file_is_a_value_error(tmp_path: Path) -> None:
    edit = build("plain")
    edit.save(tmp_path)
    (tmp_path / "edit.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="cannot be read"):
        load_edit(tmp_path)
    (tmp_path / "edit.safetensors").unlink()
    (tmp_path / "direction.safetensors").unlink()  # the legacy layout's file is missing too
    with pytest.raises(ValueError, match="cannot read the direction"):
        load_edit(tmp_path)
