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

from abliterate.core.finite import first_nonfinite
from abliterate.data.chat import prepare_tokenizer
from abliterate.errors import ConfigError, ModelLoadError
from abliterate.model.anatomy import is_multimodal
from abliterate.model.devices import input_device

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
        """Where the model's inputs go (its input embedding's device)."""
        return input_device(self.model)


# Accelerator types a device string may name, and how torch says whether one is present.
_ACCELERATORS = {
    "cuda": lambda torch: torch.cuda.device_count(),
    "mps": lambda torch: int(torch.backends.mps.is_available()),
    "xpu": lambda torch: torch.xpu.device_count() if hasattr(torch, "xpu") else 0,
}


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` or ``mps`` when available, else ``cpu``; any other device is
    checked to exist, so a bad ``--device`` fails before anything is loaded.

    Raises:
        ConfigError: ``device`` is not a torch device, or names one this machine does not have.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N, mps or xpu."
        ) from exc
    if parsed.type == "cpu":
        return device
    if parsed.type not in _ACCELERATORS:
        raise ConfigError(f"--device {device!r} is not supported; use auto, cpu, cuda, mps or xpu.")
    count = _ACCELERATORS[parsed.type](torch)
    if count == 0:
        raise ConfigError(
            f"--device {device!r}: this machine (torch {torch.__version__}) has no "
            f"{parsed.type} device; use --device cpu or auto."
        )
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device!r}: there are only {count} {parsed.type} device(s).")
    return device


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


def quantization_config(load_in: str, device: str, compute_dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of ``--load-in 4bit|8bit`` (4-bit: NF4, computing in
    ``compute_dtype``; 8-bit: LLM.int8()).

    bitsandbytes quantizes on CUDA GPUs; its CPU backend works too but is slow, so the CPU is
    used only when asked for by name (``device="cpu"``), never as the fallback of ``auto``
    (the caller passes ``"cuda"`` for ``auto`` and for device maps).

    Raises:
        ConfigError: bitsandbytes is not installed, or the device is neither CUDA nor an
            explicit ``cpu``.
    """
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"--load-in {load_in} quantizes with bitsandbytes, which is not installed: "
            "pip install 'abliterate[quant]'."
        )
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ConfigError(
            f"--load-in {load_in} measures on a model quantized by bitsandbytes on a CUDA GPU, "
            "and this machine has none; drop --load-in (the CPU holds full precision), or pass "
            "--device cpu to quantize on the CPU anyway (slow)."
        )
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


def auto_model_class(config: Any) -> Any:
    """The transformers auto class that loads a whole checkpoint of ``config``: image-text-to-
    text models (Gemma 3, Qwen2.5-VL, Mistral 3 …) keep their vision tower, so that an edited
    language model is saved with the rest of the checkpoint."""
    import transformers

    if is_multimodal(config):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


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
    max_memory: dict[int | str, int | str] | None = None,
    load_in: str | None = None,
    offload_folder: str | Path | None = None,
    quantization: Any = None,
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
        load_in: ``"4bit"`` or ``"8bit"``: quantize the linear layers with bitsandbytes
            (:func:`quantization_config`); the model stays on ``device`` (or the map).
        offload_folder: Where weights that do not fit are kept when they cannot be read from
            the checkpoint as they are (converted expert tensors, say); ``device_map`` only.
        quantization: A transformers quantization config given as it is (e.g. the
            ``BitsAndBytesConfig`` of QLoRA training); pass ``device_map`` with it.

    Raises:
        ModelLoadError: the path does not exist, holds no model, its weight files are corrupt
            or hold NaN or infinite values, or the hub is unreachable.
        ConfigError: ``device`` is not a device this machine has.
    """
    import transformers
    from safetensors import SafetensorError

    dev = resolve_device(device)
    src = resolve_source(name, revision, trust_remote_code)
    kwargs = {
        **src.model_kwargs,
        **_placement(
            name,
            dev,
            dtype,
            device,
            device_map,
            max_memory,
            load_in,
            offload_folder,
            gguf="gguf_file" in src.model_kwargs,
        ),
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src.source, **src.tokenizer_kwargs)
        config = transformers.AutoConfig.from_pretrained(src.source, **src.tokenizer_kwargs)
        model: PreTrainedModel = auto_model_class(config).from_pretrained(
            src.source, dtype=resolve_dtype(dtype, dev), **kwargs
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        # transformers reports a malformed or unsupported checkpoint with any of these, and
        # safetensors a truncated or garbage weight file.
        raise ModelLoadError(f"cannot load model '{name}': {type(exc).__name__}: {exc}") from exc
    _check_loaded(model, name, gguf="gguf_file" in kwargs)
    if "device_map" not in kwargs:
        model.to(dev)  # type: ignore[arg-type]
    model.eval()
    prepare_tokenizer(tokenizer)
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, src.display, src.source, revision=commit or revision)


def _placement(
    name: str,
    dev: str,
    dtype: str,
    device: str,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[int | str, int | str] | None,
    load_in: str | None,
    offload_folder: str | Path | None,
    *,
    gguf: bool,
) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that place and quantize the model (see
    :func:`load_model`)."""
    kwargs: dict[str, Any] = {}
    if load_in is not None:
        if gguf:
            raise ConfigError(
                f"--load-in {load_in} quantizes safetensors weights; {name} is a GGUF file, "
                "already quantized (its weights are dequantized on loading)."
            )
        # "auto" that found no GPU is not a request for the CPU: only an explicit cpu is.
        asked = "cuda" if device_map is not None or device == "auto" else dev
        kwargs["quantization_config"] = quantization_config(
            load_in, asked, resolve_dtype(dtype, dev)
        )
        # Quantized weights are placed while loading; they cannot be moved afterwards.
        kwargs["device_map"] = {"": dev}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def _check_loaded(model: PreTrainedModel, name: str, *, gguf: bool) -> None:
    """Refuse non-finite weights; make a dequantized GGUF model savable as safetensors."""
    # A NaN or an infinity in the weights would spread through every measurement silently;
    # scanning costs little next to reading the weights (see first_nonfinite).
    bad = first_nonfinite(model.named_parameters())
    if bad is not None:
        raise ModelLoadError(
            f"model '{name}' has non-finite values (NaN or inf) in {bad}; the checkpoint is "
            "corrupt or was saved from a broken edit."
        )
    if getattr(model, "hf_quantizer", None) is not None and gguf:
        # transformers has dequantized the GGUF weights into ordinary tensors; clear the marker
        # so the edited model can be saved as plain safetensors.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


# Ceiling on prompt length whatever the model claims: the prompt sets are instructions, and a
# longer "prompt" is a file read wrongly (a whole document on one line), whose attention over a
# batch could need more memory than any machine has.
MAX_PROMPT_TOKENS = 32_768


def context_limit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    """The most tokens a prompt may have, and where that limit comes from.

    The smaller of the model's ``max_position_embeddings`` and the tokenizer's
    ``model_max_length`` where they are known, and never more than :data:`MAX_PROMPT_TOKENS`.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [(MAX_PROMPT_TOKENS, "abliterate's ceiling on prompt length")]
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "the model's max_position_embeddings"))
    # Tokenizers without a recorded limit report a huge sentinel value (1e30).
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**7:
        limits.append((tok_limit, "the tokenizer's model_max_length"))
    return min(limits)


def local_path(name: str) -> Path | None:
    """The file or directory a model name reads from when it is local (``demo``: the cached
    copy), else None (a hub id)."""
    if name == "demo":
        from abliterate.model.demo import demo_dir

        return demo_dir()
    path = Path(name).expanduser()
    return path if path.exists() else None
