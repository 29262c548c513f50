"""Held-out data that is held out for real (DESIGN §3 "Data integrity").

No val/test prompt (edit, rephrase, neighbourhood) may appear in a training record, and no val/test
subject may appear inside a training prompt. Splitting by a `subject` field alone does not give
that: neighbourhood prompts name other subjects, and subjects contain one another ("Guatemala" in
"Guatemala City"). So:

- `subject_groups` puts subjects that contain one another (as whole words) into one group, and
  `assign_splits` splits by group, so "Mexico" and "Mexico City" always share a split;
- `assign_splits` also takes held-out relations: their records go to test (or are dropped, counted,
  where their subject must stay in training for other relations);
- `leaks` counts what leaks, on the prompt strings themselves; builders assert it is zero and
  `drop_leaking_train_records` removes (and counts) training records of user files that would leak.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from metaedit.data.records import hash_split
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> tuple[str, ...]:
    """Word and punctuation tokens: whole-word containment is contiguous token-sequence containment."""
    return tuple(_WORD.findall(text))


def record_prompts(rec: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """(edit + rephrase prompts, locality prompts, subject) of a record in the internal or the
    CounterFact format."""
    rw = rec.get("requested_rewrite")
    if rw:
        edit = [rw["prompt"].format(rw["subject"]), *rec.get("paraphrase_prompts", [])]
        return edit, list(rec.get("neighborhood_prompts", [])), rw["subject"]
    loc = [x["prompt"] if isinstance(x, dict) else x for x in rec.get("locality", [])]
    return [rec["prompt"], *rec.get("rephrases", [])], loc, rec.get("subject") or ""


def record_relation(rec: dict[str, Any]) -> str:
    rw = rec.get("requested_rewrite")
    return str((rw or {}).get("relation_id") or rec.get("relation") or "")


def subject_groups(subjects: Iterable[str]) -> dict[str, str]:
    """subject -> its group's key (the group's shortest, then first, member). Subjects join a group
    when one contains the other as a whole-word sequence; a group is split as one."""
    subs = sorted({s for s in subjects if s}, key=lambda s: (len(s), s))
    parent = {s: s for s in subs}

    def find(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    by_words = {words(s): s for s in subs}
    for s in subs:
        w = words(s)
        # every contiguous word span of s that is itself a subject (subjects are a few words long)
        for i in range(len(w)):
            for j in range(i + 1, len(w) + 1):
                other = by_words.get(w[i:j])
                if other is not None and other != s:
                    a, b = find(s), find(other)
                    if a != b:
                        # keep the shorter (sorted earlier) root, so the key is stable
                        parent[max(a, b, key=lambda x: (len(x), x))] = min(a, b, key=lambda x: (len(x), x))
    return {s: find(s) for s in subs}


def assign_splits(
    items: Sequence[tuple[str, str, str]], seed: int, val_frac: float, test_frac: float,
    heldout_relations: Iterable[str] = (),
) -> tuple[list[str | None], dict[str, int]]:
    """Split items given as (subject, relation, fallback key), deterministically in `seed`.

    Items with a subject are split by subject group (see `subject_groups`); items without one by
    their fallback key (e.g. a case id). Items of a held-out relation go to test: those whose
    subject group is already test stay; a group in train/val moves to test whole when all its items
    are held out, otherwise its held-out items are dropped (its subjects still train on other
    relations, so testing on them would not be held out). Returns the split per item (None:
    dropped) and counts of what was moved and dropped.
    """
    heldout = set(heldout_relations)
    groups = subject_groups(s for s, _, _ in items)
    base = [hash_split(groups[s] if s else key, seed, val_frac, test_frac) for s, _, key in items]
    kept_elsewhere = {groups[s] for (s, r, _), sp in zip(items, base) if s and r not in heldout and sp != "test"}
    out: list[str | None] = []
    counts = {"heldout_moved": 0, "heldout_dropped": 0}
    for (s, rel, _), split in zip(items, base):
        if rel in heldout and split != "test":
            if s and groups[s] in kept_elsewhere:
                counts["heldout_dropped"] += 1
                out.append(None)
                continue
            counts["heldout_moved"] += 1
            split = "test"
        out.append(split)
    if heldout:
        found = {r for _, r, _ in items}
        missing = heldout - found
        if missing:
            raise MetaEditError(f"heldout_relations: no record has relation {sorted(missing)}; relations: {sorted(found)}")
    return out, counts


class _TrainIndex:
    """Training prompts as exact strings and as word n-grams, for fast leak tests."""

    def __init__(self, train: Iterable[dict[str, Any]]) -> None:
        self.prompts: set[str] = set()
        self.grams: set[tuple[str, ...]] = set()
        self.max_n = 8
        for r in train:
            e, loc, _ = record_prompts(r)
            for p in e + loc:
                self.prompts.add(p)
                w = words(p)
                for i in range(len(w)):
                    for j in range(i + 1, min(len(w), i + self.max_n) + 1):
                        self.grams.add(w[i:j])

    def has_subject(self, subject: str) -> bool:
        w = words(subject)
        if len(w) > self.max_n:
            return any(subject in p for p in self.prompts)
        return bool(w) and w in self.grams


def leaks(splits: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Per held-out split: how many of its edit/rephrase prompts, neighbourhood prompts and subjects
    occur in training records (prompts verbatim; subjects as whole words inside any training prompt)."""
    index = _TrainIndex(splits.get("train", []))
    out: dict[str, dict[str, int]] = {}
    for split in ("val", "test"):
        n = {"edit_prompts": 0, "loc_prompts": 0, "subjects": 0}
        subjects: set[str] = set()
        for r in splits.get(split, []):
            e, loc, subject = record_prompts(r)
            n["edit_prompts"] += sum(p in index.prompts for p in e)
            n["loc_prompts"] += sum(p in index.prompts for p in loc)
            if subject:
                subjects.add(subject)
        n["subjects"] = sum(index.has_subject(s) for s in subjects)
        out[split] = n
    return out


def _leak_test(held: Iterable[dict[str, Any]]) -> Any:
    """A predicate: does a record contain one of the `held` records' prompts, or one of their
    subjects as whole words inside any of its prompts?"""
    held_prompts: set[str] = set()
    held_subjects: set[tuple[str, ...]] = set()
    for r in held:
        e, loc, subject = record_prompts(r)
        held_prompts.update(e + loc)
        if subject:
            held_subjects.add(words(subject))
    longest = max((len(s) for s in held_subjects), default=0)

    def leaky(r: dict[str, Any]) -> bool:
        e, loc, _ = record_prompts(r)
        for p in e + loc:
            if p in held_prompts:
                return True
            w = words(p)
            if any(w[i:j] in held_subjects for i in range(len(w)) for j in range(i + 1, min(len(w), i + longest) + 1)):
                return True
        return False

    return leaky


def drop_leaking_train_records(
    splits: dict[str, list[dict[str, Any]]], where: str
) -> dict[str, list[dict[str, Any]]]:
    """Remove training records that contain a val/test prompt or a val/test subject (whole words),
    logging how many: user files may share locality questions or mention a held-out subject in
    another record's prompt, and a number measured on such a split would not be held out."""
    leaky = _leak_test(r for split in ("val", "test") for r in splits.get(split, []))
    train = splits.get("train", [])
    kept = [r for r in train if not leaky(r)]
    if len(kept) < len(train):
        log.warning("%s: dropped %d of %d training records that contain a val/test prompt or subject "
                    "(DESIGN §3 data integrity)", where, len(train) - len(kept), len(train))
    return {**splits, "train": kept}


def keep_out_of_training(
    splits: dict[str, list[dict[str, Any]]], held: Sequence[dict[str, Any]], where: str, source: str
) -> dict[str, list[dict[str, Any]]]:
    """Remove train and val records that contain a prompt or subject of `held` (another dataset's
    val/test records), logging how many: an editor trained here can then be scored on that other
    dataset's test split, held out for real (val too, since it selects the checkpoint)."""
    leaky = _leak_test(held)
    out = dict(splits)
    for split in ("train", "val"):
        records = splits.get(split, [])
        out[split] = [r for r in records if not leaky(r)]
        log.info("%s: %d of %d %s records dropped: they contain a val/test prompt or subject of %s",
                 where, len(records) - len(out[split]), len(records), split, source)
    return out
