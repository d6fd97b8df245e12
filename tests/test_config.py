"""Typed config: validation, config files and the CLI's precedence rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from abliterate.config import RunConfig, from_sources, read_config_file, to_dict
from abliterate.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = RunConfig()
    assert cfg.model == "demo" and cfg.sites == ("pre", "mid", "post")
    assert to_dict(cfg)["out"] == "runs/latest"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_train", 0, "n_train must be at least 1"),
        ("sites", ("pre", "nowhere"), "sites must be"),
        ("prune_last_layers", 1.0, "prune_last_layers"),
        ("kl_threshold", 0.0, "kl_threshold"),
        ("layer", -1, "layer must be non-negative"),
        ("n_eval", 0, "n_eval"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{field: value})  # type: ignore[arg-type]


def test_file_then_cli_precedence(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('n-train = 10\nmodel = "from-file"\nsites = ["mid"]\n')
    file_values = read_config_file(tmp_path / "c.toml")
    cfg = from_sources(RunConfig, file_values, {"model": "from-cli"})
    assert (cfg.n_train, cfg.model, cfg.sites) == (10, "from-cli", ("mid",))
    (tmp_path / "bad.toml").write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="unknown option"):
        from_sources(RunConfig, read_config_file(tmp_path / "bad.toml"), {})
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")
