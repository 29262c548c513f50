"""Readers for edit datasets in their published formats (DESIGN §4) -> the internal record format.

Every problem is reported with the file, the record index and the field, never as a KeyError from
deep inside training.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from metaedit.data.records import read_json_list, validate_record
from metaedit.types import MetaEditError


def _get(rec: Any, dotted: str, typ: type, where: str) -> Any:
    node = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise MetaEditError(f"{where}: missing field '{dotted}'")
        node = node[part]
    if not isinstance(node, typ):
        raise MetaEditError(f"{where}: field '{dotted}' must be {typ.__name__}, got {type(node).__name__}")
    return node


def _strings(rec: Any, name: str, where: str, required: bool = True) -> list[str]:
    if not required and (not isinstance(rec, dict) or name not in rec):
        return []
    items = _get(rec, name, list, where)
    for j, x in enumerate(items):
        if not isinstance(x, str) or not x.strip():
            raise MetaEditError(f"{where}: field '{name}'[{j}] must be a non-empty string, got {x!r}")
    return items


def counterfact_record(rec: Any, where: str) -> dict[str, Any]:
    """One CounterFact record -> internal record (+ the CounterFact fields the metrics need)."""
    rw = _get(rec, "requested_rewrite", dict, where)
    template = _get(rec, "requested_rewrite.prompt", str, where)
    subject = _get(rec, "requested_rewrite.subject", str, where)
    if "{}" not in template:
        raise MetaEditError(f"{where}: field 'requested_rewrite.prompt' has no '{{}}' for the subject: {template!r}")
    new = _get(rec, "requested_rewrite.target_new.str", str, where)
    true = _get(rec, "requested_rewrite.target_true.str", str, where)
    neighbours = _strings(rec, "neighborhood_prompts", where)
    answers = _strings(rec, "neighborhood_answers", where, required=False) or [true] * len(neighbours)
    if len(answers) != len(neighbours):
        raise MetaEditError(f"{where}: 'neighborhood_answers' has {len(answers)} items for {len(neighbours)} prompts")
    out = {
        "case_id": str(rec.get("case_id", where)),
        "subject": subject,
        "relation": str(rw.get("relation_id", "")),
        "prompt": template.format(subject),
        "target_new": new,
        "target_true": true,
        "rephrases": _strings(rec, "paraphrase_prompts", where),
        "locality": [{"prompt": p, "answer": a} for p, a in zip(neighbours, answers)],
        "generation_prompts": _strings(rec, "generation_prompts", where, required=False),
    }
    if "target_candidates" in rec:
        out["target_candidates"] = _strings(rec, "target_candidates", where)
    return validate_record(out, where)


def zsre_record(rec: Any, where: str) -> dict[str, Any]:
    """One MEND/EasyEdit zsRE record -> internal record. zsRE has no true object for the question
    beyond `answers`; its locality input is an NQ question with its answer."""
    src = _get(rec, "src", str, where)
    answers = _strings(rec, "answers", where, required=False)
    rephrase = rec.get("rephrase") if isinstance(rec, dict) else None
    rephrases = [rephrase] if isinstance(rephrase, str) else _strings(rec, "rephrase", where)
    out = {
        "case_id": str(rec.get("case_id", where)) if isinstance(rec, dict) else where,
        "subject": str(rec.get("subject", "")),
        "relation": "zsre",
        "prompt": src,
        "target_new": _get(rec, "alt", str, where),
        "rephrases": rephrases,
        "locality": [{"prompt": _get(rec, "loc", str, where), "answer": _get(rec, "loc_ans", str, where)}],
    }
    if answers:
        out["target_true"] = answers[0]
    elif isinstance(rec.get("pred"), str):
        out["target_true"] = rec["pred"]
    return validate_record(out, where)


READERS = {"counterfact": counterfact_record, "zsre": zsre_record}


def read_records(path: str | Path, fmt: str) -> list[dict[str, Any]]:
    if fmt not in READERS:
        raise MetaEditError(f"unknown data format {fmt!r}; valid: {sorted(READERS)}")
    convert = READERS[fmt]
    return [convert(rec, f"{path}: record {i}") for i, rec in enumerate(read_json_list(path))]


def read_built_split(path: str | Path) -> list[dict[str, Any]]:
    """A split file a builder wrote, in the internal format: worldfacts writes CounterFact records
    (they have `requested_rewrite`), the synthetic world the internal format itself."""
    raw = read_json_list(path)
    if raw and isinstance(raw[0], dict) and "requested_rewrite" in raw[0]:
        return [counterfact_record(rec, f"{path}: record {i}") for i, rec in enumerate(raw)]
    return [validate_record(rec, f"{path}: record {i}") for i, rec in enumerate(raw)]


def training_records(data_dir: str | Path) -> list[dict[str, Any]]:
    """The training split of a built dataset directory (train.json alone: what may inform an editor
    without leaking its val/test), in the internal format."""
    path = Path(data_dir) / "train.json"
    if not path.is_file():
        raise MetaEditError(f"{data_dir}: no train.json (a built dataset directory, e.g. data/worldfacts_wide-v3)")
    return read_built_split(path)


def fact_sentences(records: list[dict[str, Any]], seed: int = 0) -> list[str]:
    """Every fact a training record states, as "<prompt> <answer>.", deduplicated and shuffled."""
    out: set[str] = set()
    for r in records:
        true = r.get("target_true")
        if true:
            out.update(f"{p} {true}." for p in (r["prompt"], *r.get("rephrases", [])))
        out.update(f"{x['prompt']} {x['answer']}." for x in r.get("locality", []) if x.get("answer"))
    sentences = sorted(out)
    random.Random(seed).shuffle(sentences)
    return sentences
