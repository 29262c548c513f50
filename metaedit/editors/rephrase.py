"""Rephrased edits: at edit time, each edit is also written in the phrasings the training split uses
for its relation (MALMEN's `rephrase` option).

A learned editor fits the keys of the prompts it is given; a paraphrase reaches the edit only as far
as its keys resemble the edit prompt's. MEMIT writes each fact behind several random text prefixes for
the same reason. Here the phrasings come from the training split: for an edit whose prompt is
"The currency of Curacao is the", the training records whose edit prompt has that same template
("The currency of <X> is the") give their rephrase templates ("Prices in <X> are given in the", ...),
and each is filled with the edit's own subject and target. Only train.json is read; worldfacts'
held-out splits use other rephrase templates than its training split (metaedit/data/worldfacts.py), so
there no val/test prompt is ever written. Measured there (README, session 52) it lowers es and ps at
100 edits: the extra rows crowd the solve. Off by default.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from metaedit.data.readers import training_records
from metaedit.types import EditRequest, MetaEditError

Template = tuple[str, str]  # the text before and after the subject


@dataclass(frozen=True)
class RephraseSpec:
    """data: a built dataset directory (its train.json); per_edit: rephrasings added per edit at most
    (a seeded choice when the relation has more); seed: that choice's seed."""

    data: str
    per_edit: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_edit < 1:
            raise MetaEditError(f"rephrase.per_edit must be >= 1, got {self.per_edit}")

    @classmethod
    def coerce(cls, value: RephraseSpec | dict[str, Any] | None) -> RephraseSpec | None:
        if value is None or isinstance(value, RephraseSpec):
            return value
        try:
            return cls(**dict(value))
        except TypeError as e:
            raise MetaEditError(f"rephrase: {e} (fields: data, per_edit, seed)") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subject_template(prompt: str, subject: str | None) -> Template | None:
    """The text before and after the subject's first mention in `prompt`; None when it is not there."""
    if not subject or subject not in prompt:
        return None
    before, _, after = prompt.partition(subject)
    return before, after


class TrainingRephrases:
    """The training split's rephrase templates per edit-prompt template, read on first use."""

    def __init__(self, spec: RephraseSpec | dict[str, Any] | None) -> None:
        self.spec = RephraseSpec.coerce(spec)
        self._templates: dict[Template, list[Template]] | None = None

    @property
    def enabled(self) -> bool:
        return self.spec is not None

    def templates(self) -> dict[Template, list[Template]]:
        assert self.spec is not None
        if self._templates is None:
            found: dict[Template, set[Template]] = {}
            for r in training_records(self.spec.data):
                own = subject_template(r["prompt"], r.get("subject"))
                if own is None:
                    continue
                for p in r.get("rephrases", []):
                    t = subject_template(p, r["subject"])
                    if t is not None and t != own:
                        found.setdefault(own, set()).add(t)
            self._templates = {k: sorted(v) for k, v in found.items()}
        return self._templates

    def expand(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Each edit's rephrasings, `per_edit` at most: its subject and target in the rephrase templates
        of the training records that share its prompt's template. None for an edit without a subject
        in its prompt or whose template no training record has; never one of the edits' own prompts."""
        assert self.spec is not None
        table = self.templates()
        own = {r.prompt for r in requests}
        out: list[EditRequest] = []
        for r in requests:
            t = subject_template(r.prompt, r.subject)
            options = [b + r.subject + a for b, a in table.get(t, [])] if t is not None and r.subject else []
            options = [p for p in options if p not in own]
            rng = random.Random(f"{self.spec.seed}:{r.prompt}")
            out.extend(EditRequest(p, r.target, r.subject) for p in rng.sample(options, min(self.spec.per_edit, len(options))))
        return out
