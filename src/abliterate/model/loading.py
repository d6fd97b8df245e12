"""Loading models: hub ids, local safetensors directories, GGUF files and the embedded demo.

:func:`load_model` returns a :class:`LoadedModel` (model, tokenizer and where they came from)
with the tokenizer prepared for batched chat prompts (left padding, a pad token) and the model
in eval mode. Only safetensors weights are loaded, and repository code runs only when the user
passes ``trust_remote_code``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.data.chat import prepare_tokenizer
from abliterate.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class LoadedModel:
    """A model ready for abliteration.

    Attributes:
        model: The causal LM, in eval mode.
        tokenizer: Its tokenizer, left-padding, with a pad token.
        name: What the user asked for (``demo``, a hub id, a path).
        source: Where the weights were read from (a directory, a GGUF file or a hub id).
        revision: Hub commit hash when known.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    revision: str | None = None

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` or ``mps`` when available, else ``cpu``."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU (fast and exact there) and bfloat16 on accelerators."""
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def _check_model_config(path: Path) -> None:
    """Refuse a directory whose ``config.json`` is not a transformers model config.

    The usual case is an abliterate run directory (its ``config.json`` is the run's settings):
    the model is in its ``model/`` folder.
    """
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not readable JSON: {exc}") from exc
    if isinstance(data, dict) and "model_type" in data:
        return
    hint = ""
    if (path / "model" / "config.json").is_file():
        hint = f" It looks like an abliterate run directory: its model is {path / 'model'}."
    raise ModelLoadError(
        f"{path / 'config.json'} is not a transformers model config (no model_type).{hint}"
    )


@dataclass
class ModelSource:
    """Where and how transformers reads a model: the path or hub id and the loader options."""

    source: str
    display: str
    model_kwargs: dict[str, Any]
    tokenizer_kwargs: dict[str, Any]


def resolve_source(name: str, revision: str | None, trust_remote_code: bool) -> ModelSource:
    """Turn what the user asked for (``demo``, a hub id, a directory, a ``.gguf`` file) into
    loader arguments; only safetensors weights are ever read.

    Raises:
        ModelLoadError: the path does not exist or holds no loadable model.
    """
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if name == "demo":
        from abliterate.model.demo import DEMO_NAME, ensure_demo_model

        kwargs["use_safetensors"] = True
        return ModelSource(str(ensure_demo_model()), DEMO_NAME, kwargs, tok_kwargs)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        kwargs["gguf_file"] = tok_kwargs["gguf_file"] = path.name
        return ModelSource(str(path.parent), name, kwargs, tok_kwargs)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json).")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{path} holds no .safetensors weights; abliterate loads safetensors only "
                "(convert pickled .bin weights first)."
            )
        _check_model_config(path)
        kwargs["use_safetensors"] = True
        return ModelSource(str(path), name, kwargs, tok_kwargs)
    if path.exists() or _looks_like_path(name):
        raise ModelLoadError(f"model path {path} does not exist or is not a directory.")
    kwargs["use_safetensors"] = True
    kwargs["revision"] = tok_kwargs["revision"] = revision
    return ModelSource(name, name, kwargs, tok_kwargs)


def load_model(
    name: str = "demo",
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, str] | None = None,
    quantization_config: Any = None,
) -> LoadedModel:
    """Load a chat model and its tokenizer.

    Args:
        name: ``demo``, a hub id ``ORG/NAME``, a local model directory or a ``.gguf`` file.
        revision: Hub revision to load.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (ignored with ``device_map``).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: Allow the repository's own modelling code.
        device_map: Spread the model over devices (``"auto"`` or an explicit map, as
            accelerate takes it) instead of moving it to ``device``.
        max_memory: Per-device memory caps for ``device_map="auto"`` (``{0: "20GiB", "cpu":
            "60GiB"}``).
        quantization_config: A transformers quantization config (e.g. ``BitsAndBytesConfig``
            for QLoRA training); pass ``device_map`` with it.

    Raises:
        ModelLoadError: the path does not exist, holds no model, or the hub is unreachable.
    """
    import transformers

    dev = resolve_device(device)
    src = resolve_source(name, revision, trust_remote_code)
    kwargs = dict(src.model_kwargs)
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src.source, **src.tokenizer_kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src.source, dtype=resolve_dtype(dtype, dev), **kwargs
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # transformers reports a malformed or unsupported checkpoint with any of these.
        raise ModelLoadError(f"cannot load model '{name}': {type(exc).__name__}: {exc}") from exc
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in kwargs:
        # transformers has dequantized the GGUF weights into ordinary tensors; clear the marker
        # so the edited model can be saved as plain safetensors.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if device_map is None:
        model.to(dev)  # type: ignore[arg-type]
    model.eval()
    prepare_tokenizer(tokenizer)
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, src.display, src.source, revision=commit or revision)
