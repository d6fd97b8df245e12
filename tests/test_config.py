"""Typed config: defaults, validation at every source, precedence, sections, the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from abliterate.config import (
    ChatConfig,
    EvaluateConfig,
    ModelOptions,
    OptimizeConfig,
    Options,
    PromptOptions,
    ReportConfig,
    RunConfig,
    SearchOptions,
    SelectionOptions,
    load_config,
    read_config_file,
    to_dict,
)
from abliterate.errors import ConfigError

# config.json as written before the configs became pydantic models: the record must not change.
RUN_DEFAULTS = {
    "model": "demo", "revision": None, "device": "auto", "dtype": "auto",
    "trust_remote_code": False, "harmful": None, "harmless": None, "eval_harmful": None,
    "eval_harmless": None, "prompt_column": None, "system_prompt": None, "n_train": 128,
    "n_val": 32, "n_eval": None, "batch_size": 64, "optimize": False, "trials": 64,
    "storage": None, "study_name": "abliterate", "refusal_target": 0.05, "max_confirm": 6,
    "search_dtype": "auto", "confirm_tokens": 32, "max_directions": 1, "trial": None,
    "out": "runs/latest", "overwrite": False, "sites": ["pre", "mid", "post"],
    "kl_threshold": 0.1, "prune_last_layers": 0.2, "n_screen": 8, "n_finalists": 8,
    "layer": None, "direction": None, "site": "pre", "strength": 1.0, "max_new_tokens": 64,
    "kl_tokens": 16, "n_examples": 4, "save_model": True, "seed": 0, "export": [],
    "push_to_hub": None,
    "stream": "auto",
}  # fmt: skip
EVALUATE_DEFAULTS = {
    "model": "demo", "revision": None, "device": "auto", "dtype": "auto",
    "trust_remote_code": False, "baseline": None, "out": "runs/evaluate", "overwrite": False,
    "eval_harmful": None, "eval_harmless": None, "over_refusal": None, "prompt_column": None,
    "system_prompt": None, "n_eval": None, "judge": "markers", "benchmarks": [],
    "benchmark_limit": None, "batch_size": 32, "max_new_tokens": 64, "kl_tokens": 16,
    "n_examples": 4, "seed": 0, "steer": None, "strength": 1.0, "steer_layers": [],
}  # fmt: skip
CHAT_DEFAULTS = {
    "model": "m", "revision": None, "device": "auto", "dtype": "auto",
    "trust_remote_code": False, "baseline": None, "system_prompt": None,
    "max_new_tokens": 256, "temperature": None, "steer": None, "strength": 1.0,
    "steer_layers": [],
}  # fmt: skip


# Keys added since (issue 10: placement, quantized measurement, reasoning models); their
# defaults change nothing.
PLACEMENT = {"device_map": None, "max_memory": None, "load_in": None}
THINKING = {"thinking": "off", "thinking_budget": 512}
# Issue 14: answers of 128 tokens (late refusals), the unedited model's evaluation cached.
EVALUATION = {"max_new_tokens": 128, "baseline_cache": True}
# Issue 14: the sharper objective, batched screening, pruning, descent; only edits_per_pass (the
# same scores, several edits per forward pass) acts by default.
SPEED = {
    "refusal_objective": "next_token", "refusal_openings": 2, "opening_tokens": 4,
    "edits_per_pass": 4, "screen_halving": False, "refine_steps": 0,
}  # fmt: skip
SEARCH_SPEED = {"trials_per_pass": 1, "mlp_peak_min": 0.2}
DIRECTION_PROMPTS = {"refusal_filter": True, "min_refused": 16}  # issue 14: refused prompts only


def test_defaults_and_record_keys_are_unchanged() -> None:
    run = {**RUN_DEFAULTS, **PLACEMENT, **THINKING, **EVALUATION, **SPEED, **SEARCH_SPEED,
           **DIRECTION_PROMPTS}  # fmt: skip
    assert to_dict(RunConfig()) == run
    assert to_dict(OptimizeConfig()) == {**run, "optimize": True}
    assert to_dict(EvaluateConfig()) == {**EVALUATE_DEFAULTS, **PLACEMENT, **THINKING, **EVALUATION}
    assert to_dict(ChatConfig(model="m")) == {**CHAT_DEFAULTS, **PLACEMENT, **THINKING}
    assert to_dict(ReportConfig(run=Path("r"))) == {"run": "r"}
    assert RunConfig().sites == ("pre", "mid", "post") and RunConfig().out == Path("runs/latest")


@pytest.mark.parametrize(
    "config",
    [
        RunConfig(n_train=3, sites=("mid",), out=Path("x/y"), direction=Path("d.safetensors")),
        OptimizeConfig(trial=4, max_directions=2, storage="sqlite:///s.db", n_eval=5),
        EvaluateConfig(model="m", benchmarks=("a", "b"), baseline="demo", benchmark_limit=3),
        ChatConfig(model="runs/x", temperature=0.7, baseline="demo"),
        ReportConfig(run=Path("runs/x")),
    ],
    ids=lambda c: type(c).__name__,
)
def test_record_round_trip(config: Options) -> None:
    record = to_dict(config)
    assert json.loads(json.dumps(record)) == record  # JSON-ready: paths and tuples converted
    again = type(config)(**record)
    assert again == config and to_dict(again) == record


def test_groups_are_declared_once_and_travel_whole() -> None:
    cfg = OptimizeConfig(trials=7, model="m", n_train=9, layer=None, strength=0.5)
    search = cfg.section(SearchOptions)
    assert type(search) is SearchOptions and (search.trials, search.optimize) == (7, True)
    assert cfg.section(ModelOptions) == ModelOptions(model="m")
    assert cfg.section(PromptOptions).n_train == 9
    assert cfg.section(SelectionOptions).strength == 0.5
    # A command config is an instance of each of its groups, so it can be passed as one.
    assert isinstance(cfg, SearchOptions) and isinstance(EvaluateConfig(), ModelOptions)
    with pytest.raises(TypeError, match="no SearchOptions section"):
        EvaluateConfig().section(SearchOptions)
    # The evaluate and run commands share the prompt, evaluation and output fields.
    shared = set(EvaluateConfig.model_fields) & set(RunConfig.model_fields)
    assert {"eval_harmful", "n_eval", "kl_tokens", "out", "seed", "trust_remote_code"} <= shared


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n_train": 0}, "n_train must be at least 1, got 0"),
        ({"batch_size": -3}, "batch_size must be at least 1, got -3"),
        (
            {"sites": ("pre", "nowhere")},
            "sites must be one of 'pre', 'mid' or 'post', got 'nowhere'",
        ),
        ({"sites": ()}, "sites must not be empty"),
        ({"prune_last_layers": 1.0}, "prune_last_layers must be less than 1"),
        ({"kl_threshold": 0.0}, "kl_threshold must be positive, got 0.0"),
        ({"kl_threshold": float("nan")}, "kl_threshold must be a finite number, got nan"),
        ({"strength": float("inf")}, "strength must be a finite number, got inf"),
        ({"strength": "x"}, "strength must be a number, got 'x'"),
        ({"refusal_target": 1.5}, "refusal_target must be at most 1.0, got 1.5"),
        ({"layer": -1}, "layer must be at least 0, got -1"),
        ({"n_eval": 0}, "n_eval must be at least 1, got 0"),
        ({"n_examples": -1}, "n_examples must be at least 0, got -1"),
        ({"seed": 2**64}, "seed must be at most 9223372036854775807"),
        ({"out": ""}, "out must not be empty"),
        ({"model": "a\x00b"}, "model must not contain a NUL character"),
        ({"n_trian": 5}, "n_trian is not an option of RunConfig; did you mean 'n_train'?"),
        ({"n_train": 0, "n_val": 0}, "n_train must be at least 1, got 0 (and 1 more)"),
        ({"layer": 3, "direction": "d"}, "pass either --direction or --layer, not both."),
        ({"trial": 2}, "--trial picks a trial of an optimization study; add --optimize."),
        ({"optimize": True, "layer": 3}, "--layer fixes the direction; it cannot be combined"),
        ({"optimize": True, "direction": "d"}, "pass either --direction or --optimize, not both."),
        ({"layer": 3, "site": "mid", "sites": "pre"}, "--site mid is not among --sites pre"),
    ],
)
def test_invalid_values_name_the_field(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        RunConfig(**values)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_other_commands_validate_too() -> None:
    with pytest.raises(ConfigError, match=r"^temperature must be a finite number, got nan$"):
        ChatConfig(model="m", temperature=float("nan"))
    with pytest.raises(ConfigError, match=r"^temperature must be positive, got -1.0; leave it"):
        ChatConfig(model="m", temperature=-1.0)
    with pytest.raises(ConfigError, match=r"^model is required$"):
        ChatConfig()
    with pytest.raises(ConfigError, match=r"^benchmark_limit must be at least 1, got 0$"):
        EvaluateConfig(benchmark_limit=0)
    with pytest.raises(ConfigError, match=r"^judge must name at least one judge"):
        EvaluateConfig(judge=" , ")
    assert EvaluateConfig(benchmarks="a b,a").benchmarks == ("a", "b")  # type: ignore[arg-type]


def _file(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        # A string where a boolean is needed was truthy: remote code ran, a directory was deleted.
        (
            "c.toml",
            'trust_remote_code = "no"',
            "--trust-remote-code ({}) must be true or false, got 'no'",
        ),
        (
            "c.toml",
            'trust_remote_code = "false"',
            "--trust-remote-code ({}) must be true or false, got 'false'",
        ),
        ("c.json", '{"overwrite": "false"}', "--overwrite ({}) must be true or false, got 'false'"),
        ("c.toml", 'strength = "x"', "--strength ({}) must be a number, got 'x'"),
        ("c.toml", "n_train = 3.5", "--n-train ({}) must be an integer, got 3.5"),
        ("c.toml", "n_train = 3.0", "--n-train ({}) must be an integer, got 3.0"),
        ("c.toml", 'n_train = "64"', "--n-train ({}) must be an integer, got '64'"),
        ("c.toml", "n_train = 0", "--n-train ({}) must be at least 1, got 0"),
        ("c.toml", "strength = nan", "--strength ({}) must be a finite number, got nan"),
        (
            "c.json",
            '{"kl_threshold": Infinity}',
            "--kl-threshold ({}) must be a finite number, got inf",
        ),
        ("c.json", '{"refusal_target": 1.5}', "--refusal-target ({}) must be at most 1.0, got 1.5"),
        ("c.toml", "sites = [1]", "--sites ({}) must be one of 'pre', 'mid' or 'post', got 1"),
        ("c.toml", "model = 5", "--model ({}) must be a string, got 5"),
        ("c.toml", "[model]\nname = 'x'", "--model ({}) must be a string, got {{'name': 'x'}}"),
        ("c.toml", "n_trian = 3", "unknown option 'n_trian' in {}; did you mean 'n_train'?"),
        ("c.toml", "zzz = 3", "unknown option 'zzz' in {}; --help lists the options."),
        ("c.toml", "verbose = true", "unknown option 'verbose' in {}"),
        ("c.toml", "n-train = 3\nn_train = 4", "{} sets 'n_train' twice."),
        (
            "c.json",
            '{"n_train": 3, "n_train": 4}',
            "{} is not valid JSON: key 'n_train' appears twice",
        ),
        ("c.json", "[1, 2]", "{} must hold a table of option names and values."),
        ("c.json", '"n_train"', "{} must hold a table of option names and values."),
        ("c.toml", "n_train = ", "{} is not valid TOML: "),
        ("c.toml", b"\xff\xfen_train = 3", "{} is not UTF-8 text (byte 0)."),
        ("c.yaml", "n_train: 3", "{} must end in .toml or .json."),
    ],
)
def test_config_file_values_are_checked_strictly(
    tmp_path: Path, name: str, text: str | bytes, message: str
) -> None:
    path = _file(tmp_path, name, text)
    with pytest.raises(ConfigError) as exc:
        load_config(RunConfig, config_file=path)
    assert str(exc.value).startswith(message.format(f"config file {path}"))
    assert "\n" not in str(exc.value)


def test_config_file_forms(tmp_path: Path) -> None:
    toml = _file(tmp_path, "c.toml", 'n-train = 10\nsites = "pre"\nout = "o"\nstrength = 1\n')
    cfg = load_config(RunConfig, config_file=toml)
    # A single name for a list is the one-name list (it became ('p', 'r', 'e') before).
    assert (cfg.n_train, cfg.sites, cfg.out, cfg.strength) == (10, ("pre",), Path("o"), 1.0)
    js = _file(tmp_path, "c.json", '{"sites": ["mid", "post"], "n_eval": null, "overwrite": true}')
    cfg = load_config(RunConfig, config_file=js)
    assert (cfg.sites, cfg.n_eval, cfg.overwrite) == (("mid", "post"), None, True)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, config_file=tmp_path / "missing.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=r"^cannot read config file .*dir.toml: Is a directory"):
        load_config(RunConfig, config_file=tmp_path / "dir.toml")
    assert read_config_file(toml)["n_train"] == 10
    bom = _file(tmp_path, "bom.json", b'\xef\xbb\xbf{"n_train": 4}')  # as some editors write it
    assert load_config(RunConfig, config_file=bom).n_train == 4


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("N_TRAIN", "abc", "must be an integer, got 'abc'"),
        ("N_TRAIN", "3.5", "must be an integer, got '3.5'"),
        ("N_TRAIN", "0", "must be at least 1, got '0'"),
        ("OVERWRITE", "maybe", "must be true or false, got 'maybe'"),
        ("STRENGTH", "nan", "must be a finite number, got 'nan'"),
        ("SITES", "pre,nowhere", "must be one of 'pre', 'mid' or 'post', got 'nowhere'"),
        ("DTYPE", "float64", "must be one of 'auto', 'float32', 'bfloat16' or 'float16', got"),
    ],
)
def test_environment_values_are_parsed_and_checked(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(RunConfig, environ={f"ABLITERATE_{variable}": value})
    option = "--" + variable.lower().replace("_", "-")
    subject = f"{option} (environment variable ABLITERATE_{variable})"
    assert str(exc.value).startswith(f"{subject} {problem}")


def test_environment_forms() -> None:
    env = {"ABLITERATE_N_TRAIN": "64", "ABLITERATE_SITES": "pre mid", "ABLITERATE_OVERWRITE": "0",
           "ABLITERATE_TRUST_REMOTE_CODE": "false", "ABLITERATE_JUDGE_API_KEY": "not an option",
           "abliterate_n_val": "lower case is not read"}  # fmt: skip
    cfg = load_config(RunConfig, environ=env)
    assert (cfg.n_train, cfg.sites, cfg.overwrite, cfg.n_val) == (64, ("pre", "mid"), False, 32)
    assert cfg.trust_remote_code is False
    assert load_config(EvaluateConfig, environ={"ABLITERATE_BENCHMARKS": "a,b"}).benchmarks == (
        "a",
        "b",
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strength": "nan"}, "--strength (command line) must be a finite number, got 'nan'"),
        ({"strength": "inf"}, "--strength (command line) must be a finite number, got 'inf'"),
        (
            {"kl_threshold": "nan"},
            "--kl-threshold (command line) must be a finite number, got 'nan'",
        ),
        (
            {"refusal_target": "1.5"},
            "--refusal-target (command line) must be at most 1.0, got '1.5'",
        ),
        ({"n_train": "-1"}, "--n-train (command line) must be at least 1, got '-1'"),
        ({"trials": "0"}, "--trials (command line) must be at least 1, got '0'"),
        ({"max_directions": "0"}, "--max-directions (command line) must be at least 1, got '0'"),
    ],
)
def test_command_line_values_are_checked(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(RunConfig, command_line=values)
    assert str(exc.value) == message


def test_chat_temperature_from_command_line() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(ChatConfig, command_line={"model": "m", "temperature": "nan"})
    assert str(exc.value) == "--temperature (command line) must be a finite number, got 'nan'"
    with pytest.raises(ConfigError, match=r"^RUN \(command line\) must not be empty$"):
        load_config(ReportConfig, command_line={"run": ""})


@pytest.mark.parametrize(
    "layers",
    [
        {"file"},
        {"env"},
        {"flag"},
        {"file", "env"},
        {"file", "flag"},
        {"env", "flag"},
        {"file", "env", "flag"},
    ],
    ids=lambda layers: "+".join(sorted(layers)),
)
def test_precedence_defaults_file_environment_command_line(
    tmp_path: Path, layers: set[str]
) -> None:
    file = _file(tmp_path, "c.toml", "n_train = 5\nn_val = 5\nstudy_name = 'file'\n")
    env = {"ABLITERATE_N_TRAIN": "6", "ABLITERATE_STUDY_NAME": "env"}
    cfg = load_config(
        RunConfig,
        config_file=file if "file" in layers else None,
        environ=env if "env" in layers else None,
        command_line={"n_train": "7"} if "flag" in layers else None,
    )
    # n_train is set by every layer: the highest one present wins.
    winner = "flag" if "flag" in layers else "env" if "env" in layers else "file"
    assert cfg.n_train == {"file": 5, "env": 6, "flag": 7}[winner]
    # A value set by a lower layer survives the higher layers that do not set it.
    assert cfg.study_name == ("env" if "env" in layers else "file" if "file" in layers
                              else "abliterate")  # fmt: skip
    assert cfg.n_val == (5 if "file" in layers else 32)
    assert cfg.n_screen == 8  # set by no layer: the default


def test_a_bad_value_is_rejected_even_when_a_higher_layer_overrides_it(tmp_path: Path) -> None:
    # Every source is checked on its own: a broken file is reported, not silently shadowed.
    file = _file(tmp_path, "c.toml", 'overwrite = "false"\n')
    with pytest.raises(ConfigError, match="--overwrite \\(config file"):
        load_config(RunConfig, config_file=file, command_line={"overwrite": False})


def test_cross_field_rules_apply_to_the_merged_layers(tmp_path: Path) -> None:
    file = _file(tmp_path, "c.toml", "layer = 3\n")
    with pytest.raises(ConfigError, match=r"^--layer fixes the direction"):
        load_config(OptimizeConfig, config_file=file)
    with pytest.raises(ConfigError, match=r"^--trial picks a trial"):
        load_config(RunConfig, environ={"ABLITERATE_TRIAL": "2"})
    assert load_config(OptimizeConfig, environ={"ABLITERATE_TRIAL": "2"}).trial == 2
