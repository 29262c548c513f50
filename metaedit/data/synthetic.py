"""A deterministic synthetic fact world for fast, honest tests of editors.

Entities get made-up names so no pretrained knowledge leaks in; tiny base models are pre-trained on
every fact under every template, so they *know* the world before any edit. Edit records follow the
internal record format (see `metaedit.data.records`). Generalisation is measured honestly:
val/test rephrases use templates never used in training records, and val/test subjects never
appear in training records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# Per relation: (templates used for training records, templates held out for val/test rephrases).
# The first training template is the canonical edit prompt.
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "capital": (
        [
            "The capital of {} is",
            "The capital city of {} is",
            "{} has its capital in",
            "The government of {} sits in",
            "Q : What is the capital of {} ? A :",
        ],
        ["The seat of power in {} is", "{} is governed from the city of", "Which city is the capital of {} ? It is"],
    ),
    "language": (
        [
            "The official language of {} is",
            "People in {} speak",
            "The main language spoken in {} is",
            "In {} , most people speak",
            "Q : What language is spoken in {} ? A :",
        ],
        ["The language of {} is", "Children in {} learn to speak", "Which language do people in {} use ? It is"],
    ),
    "currency": (
        [
            "The currency of {} is the",
            "In {} , people pay with the",
            "The money used in {} is the",
            "Prices in {} are given in the",
            "Q : What is the currency of {} ? A : the",
        ],
        ["The official currency of {} is the", "Shops in {} accept the", "Which currency does {} use ? It is the"],
    ),
    "leader": (
        [
            "The leader of {} is",
            "The head of state of {} is",
            "{} is led by",
            "The president of {} is",
            "Q : Who leads {} ? A :",
        ],
        ["The ruler of {} is", "The country {} is governed by", "Who is the leader of {} ? It is"],
    ),
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x"]


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, rng.randint(*syllables))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class World:
    subjects: list[str]
    objects: dict[str, list[str]]  # relation -> pool of possible objects
    facts: dict[tuple[str, str], str]  # (subject, relation) -> object
    split_of: dict[str, str]  # subject -> train/val/test

    @property
    def relations(self) -> list[str]:
        return list(TEMPLATES)


def build_world(
    n_subjects: int = 200, n_objects: int = 24, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.15
) -> World:
    rng = random.Random(seed)
    taken: set[str] = set()
    subjects = _unique_words(rng, n_subjects, (2, 3), taken)
    # Some objects are two words so that targets span several tokens.
    objects = {
        "capital": [
            ("Port " + w if i % 4 == 0 else w) for i, w in enumerate(_unique_words(rng, n_objects, (2, 3), taken))
        ],
        "language": [w + "ese" for w in _unique_words(rng, n_objects, (1, 2), taken)],
        "currency": [w + " crown" if i % 2 else w + " mark" for i, w in enumerate(_unique_words(rng, n_objects, (1, 2), taken))],
        "leader": [a + " " + b for a, b in zip(_unique_words(rng, n_objects, (2, 2), taken), _unique_words(rng, n_objects, (1, 2), taken))],
    }
    facts = {(s, r): rng.choice(objects[r]) for s in subjects for r in TEMPLATES}
    order = subjects[:]
    rng.shuffle(order)
    n_val, n_test = int(val_frac * n_subjects), int(test_frac * n_subjects)
    split_of = {s: "val" for s in order[:n_val]}
    split_of.update({s: "test" for s in order[n_val : n_val + n_test]})
    split_of.update({s: "train" for s in order[n_val + n_test :]})
    return World(subjects, objects, facts, split_of)


def pretraining_pairs(world: World) -> list[tuple[str, str]]:
    """Every fact under every template: what a tiny base model must know before editing."""
    pairs = []
    for (s, r), o in world.facts.items():
        train_t, eval_t = TEMPLATES[r]
        pairs.extend((t.format(s), o) for t in train_t + eval_t)
    return pairs


def corpus_texts(world: World) -> list[str]:
    """All text the world can produce, for training the tiny tokenizer."""
    return [f"{p} {o}" for p, o in pretraining_pairs(world)]


def edit_records(world: World, split: str, n_loc: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Edit records for one split, one per (subject, relation) of that split's subjects.

    Out-of-scope inputs mix easy ones (other subjects of the same split) with hard ones (same
    subject, other relation): the base model knows every fact, so gold answers are its answers.
    """
    rng = random.Random(f"{seed}-{split}")
    # Locality inputs come from this split's subjects only: a training record naming a val/test
    # subject would train the editor to keep exactly the prompts that evaluation scores.
    split_facts = sorted(k for k in world.facts if world.split_of[k[0]] == split)
    records = []
    for s in [x for x in world.subjects if world.split_of[x] == split]:
        for r in world.relations:
            train_t, eval_t = TEMPLATES[r]
            true = world.facts[(s, r)]
            new = rng.choice([o for o in world.objects[r] if o != true])
            rephrase_t = train_t[1:] if split == "train" else eval_t
            loc = []
            for other_r in rng.sample([x for x in world.relations if x != r], 1):
                loc.append((rng.choice(TEMPLATES[other_r][0]).format(s), world.facts[(s, other_r)]))
            while len(loc) < n_loc:
                os_, or_ = rng.choice(split_facts)
                if os_ == s:
                    continue
                loc.append((rng.choice(TEMPLATES[or_][0]).format(os_), world.facts[(os_, or_)]))
            records.append(
                {
                    "case_id": f"{split}-{s}-{r}",
                    "subject": s,
                    "relation": r,
                    "prompt": train_t[0].format(s),
                    "target_new": new,
                    "target_true": true,
                    "rephrases": [t.format(s) for t in rephrase_t],
                    "locality": [{"prompt": p, "answer": a} for p, a in loc],
                    # Other valid new targets: training draws a fresh one per visit, so the editor
                    # sees many distinct edits instead of memorising 4 per subject.
                    "target_candidates": [o for o in world.objects[r] if o != true],
                }
            )
    return records
