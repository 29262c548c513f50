"""The internal edit-record format, with validation that names file, record and field."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from metaedit.types import MetaEditError
from metaedit.utils import umask_mode

# field -> (type, required). `locality` items are {"prompt": str, "answer": str}.
RECORD_FIELDS: dict[str, tuple[type, bool]] = {
    "case_id": (str, False),
    "prompt": (str, True),
    "target_new": (str, True),
    "target_true": (str, False),
    "rephrases": (list, True),
    "locality": (list, True),
    "target_candidates": (list, False),
}


def validate_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise MetaEditError(f"{where}: expected an object, got {type(rec).__name__}")
    for name, (typ, required) in RECORD_FIELDS.items():
        if name not in rec:
            if required:
                raise MetaEditError(f"{where}: missing field '{name}'")
            continue
        if not isinstance(rec[name], typ):
            raise MetaEditError(f"{where}: field '{name}' must be {typ.__name__}, got {type(rec[name]).__name__}")
    for name in ("prompt", "target_new"):
        if not rec[name].strip():
            raise MetaEditError(f"{where}: field '{name}' is empty")
    if not rec["rephrases"] or not all(isinstance(x, str) and x.strip() for x in rec["rephrases"]):
        raise MetaEditError(f"{where}: field 'rephrases' must be a non-empty list of non-empty strings")
    for j, loc in enumerate(rec["locality"]):
        ok = isinstance(loc, dict) and all(isinstance(loc.get(k), str) and loc[k].strip() for k in ("prompt", "answer"))
        if not ok:
            raise MetaEditError(f"{where}: locality[{j}] must be {{'prompt': str, 'answer': str}}, got {loc!r}")
    if not rec["locality"]:
        raise MetaEditError(f"{where}: field 'locality' is empty")
    return rec


def read_json_list(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise MetaEditError(f"data file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MetaEditError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise MetaEditError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records already in the internal format, validated."""
    return [validate_record(rec, f"{path}: record {i}") for i, rec in enumerate(read_json_list(path))]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file so a reader never sees it half-written (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


# The default data version of a generated dataset (`GeneratedEditData.version`): a builder that
# changes what it writes gives its dataset a new version (built files live in a directory named by
# it, so stale builds and the results measured on them are never mixed with new ones). A dataset
# may carry its own: data=worldfacts_wide is version 3 while data=worldfacts stays version 2.
DATA_VERSION = 2


def hash_split(key: str, seed: int, val_frac: float, test_frac: float) -> str:
    """train / val / test for a key (a subject, a case id), from a hash: deterministic, and a key's
    split never depends on which other keys exist."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def digest(obj: Any) -> str:
    """A short content hash of JSON-able data (e.g. the records an evaluation scored)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
