"""Edit datasets as LightningDataModules yielding typed `EditBatch`es."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from metaedit.data.formatting import Formatter
from metaedit.data.integrity import assign_splits, drop_leaking_train_records, keep_out_of_training, words
from metaedit.data.readers import read_built_split, read_records
from metaedit.data.records import DATA_VERSION, digest, load_records, write_json_atomic
from metaedit.data.synthetic import build_world, edit_records
from metaedit.types import EditBatch, EditRequest, MetaEditError
from metaedit.utils import file_lock

log = logging.getLogger(__name__)


def _built_data_dir(*, _root_: Any) -> str:
    """`${built_data_dir:}` in a config: the directory this run's data is built in (the data config's
    data_dir with its version and held-out tags), so that an editor setting naming the training split
    (ENN's preserve.data, a stats corpus) follows data=... and its held-out relations instead of
    pointing at another build, whose train.json may hold this run's test facts."""
    from hydra.utils import instantiate

    return str(instantiate(_root_.data, formatter=None, _recursive_=False).data_dir)


OmegaConf.register_new_resolver("built_data_dir", _built_data_dir, replace=True)

SPLITS = ("train", "val", "test")


class RecordDataset(Dataset):
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]


class ResumableLoader(DataLoader):
    """A DataLoader that a resumed training run continues where it stopped, batch for batch.

    Lightning saves `state_dict()` in every checkpoint and calls `load_state_dict()` before it first
    iterates a resumed run's loader. Without them a run resumed mid-epoch starts the epoch's draws
    over (the sampler's and collator's random generators are seeded afresh), so it repeats the
    batches it already took and never takes the ones it had left. The state is where the loader
    was: completed passes and batches taken from the current one. Restoring replays exactly that
    many draws — sampler, collator and all, without a model — so every generator is where it was;
    replay costs collation only (a few seconds per epoch of a few thousand batches)."""

    # Lightning re-creates a loader through its __init__ arguments (DDP's sampler), so the position
    # lives in attributes set on first use rather than in an overridden __init__.
    _pass: int = -1  # the pass being taken (-1: none started)
    _taken: int = 0  # batches taken from it
    _restore: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        passes, taken = max(self._pass, 0), self._taken
        if taken and taken >= len(self):  # a finished pass: the next one starts afresh
            passes, taken = passes + 1, 0
        return {"passes": passes, "taken": taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restore = (int(state["passes"]), int(state["taken"]))

    def __iter__(self):  # type: ignore[override]
        skip = 0
        if self._restore is not None:
            passes, skip = self._restore
            self._restore = None
            log.info("train loader: replaying %d pass(es) and %d batch(es) of draws to continue where the run "
                     "stopped", passes, skip)
            for _ in range(passes):
                for _ in super().__iter__():
                    pass
            self._pass = passes
        else:
            self._pass += 1
        self._taken = 0
        it = super().__iter__()
        for _ in range(skip):
            next(it)
            self._taken += 1
        for batch in it:
            self._taken += 1
            yield batch


class EditCollator:
    """Records -> EditBatch. Training samples a few rephrases/locality inputs per edit (fresh each
    time) and, where a record lists `target_candidates`, a fresh new target; evaluation uses the
    record's `target_new` and all rephrases/locality inputs, so every metric covers all of them."""

    def __init__(self, formatter: Formatter, sample: bool, rephrases: int = 1, loc: int = 1, seed: int = 0,
                 edit_prompt: bool = False) -> None:
        self.formatter, self.sample, self.n_rephrase, self.n_loc = formatter, sample, rephrases, loc
        # Training only: the edit prompt itself joins the in-scope rows (L_edit then also asks that the
        # edit lands where it was made, which CounterFact's es scores); evaluation keeps rephrases only.
        self.edit_prompt = edit_prompt and sample
        self.rng = random.Random(seed)

    def _pick(self, items: list[Any], k: int) -> list[Any]:
        return self.rng.sample(items, min(k, len(items))) if self.sample else items

    def _in_scope_of_another(self, records: list[dict[str, Any]]) -> Callable[[int, str], bool]:
        """When several edits are scored together (evaluation with protocol batch / sequential), a
        locality input of record i that names the subject of another record of the group is a fact
        that group edits — its answer may rightly change — so it measures no locality there and is
        left out. Training batches are left as they are (their configs were measured that way)."""
        if self.sample or len(records) < 2:
            return lambda i, prompt: False
        subjects = [words(r["subject"]) if r.get("subject") else () for r in records]

        def named(prompt: str, subject: tuple[str, ...]) -> bool:
            w, n = words(prompt), len(subject)
            return n > 0 and any(w[k : k + n] == subject for k in range(len(w) - n + 1))

        return lambda i, prompt: any(j != i and named(prompt, s) for j, s in enumerate(subjects))

    def __call__(self, records: list[dict[str, Any]]) -> EditBatch:
        targets = [
            self.rng.choice(r["target_candidates"]) if self.sample and r.get("target_candidates") else r["target_new"]
            for r in records
        ]
        # The subject travels with the request for locate-then-edit methods (None when a record has
        # none, e.g. zsRE records without one).
        requests = [EditRequest(r["prompt"], t, r.get("subject") or None) for r, t in zip(records, targets)]
        in_p, in_t, owner, loc_p, loc_a, loc_owner = [], [], [], [], [], []
        in_scope_of_another = self._in_scope_of_another(records)
        for i, r in enumerate(records):
            for p in ([r["prompt"]] if self.edit_prompt else []) + self._pick(r["rephrases"], self.n_rephrase):
                in_p.append(p)
                in_t.append(targets[i])
                owner.append(i)
            for item in self._pick(r["locality"], self.n_loc):
                if in_scope_of_another(i, item["prompt"]):
                    continue
                loc_p.append(item["prompt"])
                loc_a.append(item["answer"])
                loc_owner.append(i)
        if not loc_p:
            raise MetaEditError(f"these {len(records)} edits leave no locality input out of their scope (every one names a "
                                f"subject the group edits); score them in smaller groups (a smaller n)")
        f = self.formatter
        # The neighbours scored with the edit's new target: CounterFact's ns in evaluation, the
        # neighbour-margin loss (method.loss.c_ns) in training.
        counterfact: dict[str, Any] = {"loc_new": f.batch(loc_p, [targets[i] for i in loc_owner])}
        if all(r.get("target_true") for r in records):
            # The in-scope rows with the true object: CounterFact's ps in evaluation, the in-scope
            # margin loss (method.loss.c_es) in training.
            counterfact["inscope_true"] = f.batch(in_p, [records[i]["target_true"] for i in owner])
            if not self.sample:
                counterfact |= {
                    "edit_true": f.batch([q.prompt for q in requests], [r["target_true"] for r in records]),
                    "generation_prompts": [p for r in records for p in r.get("generation_prompts", [])[:1]],
                }
        return EditBatch(
            edit=f.batch([q.prompt for q in requests], [q.target for q in requests]),
            inscope=f.batch(in_p, in_t),
            loc=f.batch(loc_p, loc_a),
            requests=requests,
            inscope_prompts=in_p,
            inscope_owner=torch.tensor(owner),
            loc_prompts=loc_p,
            loc_answers=loc_a,
            loc_owner=torch.tensor(loc_owner, dtype=torch.long),
            **counterfact,
        )


class EditDataModule(pl.LightningDataModule):
    """Reads {train,val,test}.json files in the internal record format (validated on load).

    Args:
        name: dataset name (used in run names).
        data_dir: directory holding the split files.
        formatter: tokenisation for the base model (given by the trainer, not the config).
        n_edits: edits applied together in one training batch.
        eval_n_edits: edits applied together in one validation/test batch.
        rephrases_per_edit, loc_per_edit: sampled per edit in training.
        train_edit_prompt: training's in-scope rows also hold each edit's own prompt (not only rephrases).
        eval_relations: keep only val/test records of these relations (empty: all), e.g. to score an
            editor trained with `heldout_relations` on exactly those; training records are untouched.
        relation_balance: None (default) draws training records as the data holds them; α in [0, 1]
            draws relation r with probability ∝ n_r^α (n_r its training records): below 1 a relation
            with few records is drawn more often — a wide world is mostly places (worldfacts_wide:
            46 % region → country), and an editor meant for every kind of fact should not learn
            mostly one. 0 draws every relation equally.
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        formatter: Formatter,
        n_edits: int = 1,
        eval_n_edits: int = 1,
        rephrases_per_edit: int = 1,
        loc_per_edit: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        eval_relations: Sequence[str] = (),
        train_edit_prompt: bool = False,
        relation_balance: float | None = None,
    ) -> None:
        super().__init__()
        if relation_balance is not None and not 0.0 <= float(relation_balance) <= 1.0:
            raise MetaEditError(f"data.relation_balance must be null or in [0, 1], got {relation_balance}")
        self.relation_balance = None if relation_balance is None else float(relation_balance)
        if n_edits < 1 or eval_n_edits < 1:
            raise MetaEditError(f"data: n_edits and eval_n_edits must be >= 1, got {n_edits}, {eval_n_edits}")
        self.name, self.data_dir, self.formatter = name, Path(data_dir), formatter
        self.n_edits, self.eval_n_edits = n_edits, eval_n_edits
        self.rephrases_per_edit, self.loc_per_edit = rephrases_per_edit, loc_per_edit
        self.train_edit_prompt = bool(train_edit_prompt)
        self.num_workers, self.seed = num_workers, seed
        self.eval_relations = [str(r) for r in eval_relations or ()]
        self._records: dict[str, list[dict[str, Any]]] = {}

    def prepare_data(self) -> None:
        """Subclasses that generate data write it here; reading always goes through validation."""

    def records(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise MetaEditError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        if split not in self._records:
            self.prepare_data()
            records = self.read_split(split)
            if self.eval_relations and split != "train":
                records = self._of_relations(records, split)
            self._records[split] = records
        return self._records[split]

    def _of_relations(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        wanted = set(self.eval_relations)
        present = {r.get("relation") for r in records}
        missing = sorted(wanted - present)
        if missing:
            raise MetaEditError(f"data.eval_relations: {self.name}:{split} has no record of relation(s) {missing}; "
                                f"its relations: {sorted(x for x in present if x)}")
        kept = [r for r in records if r.get("relation") in wanted]
        log.info("%s:%s: %d of %d records are of eval_relations %s", self.name, split, len(kept), len(records),
                 self.eval_relations)
        return kept

    def read_split(self, split: str) -> list[dict[str, Any]]:
        """One split's records, validated (subclasses reading published formats convert here)."""
        return load_records(self.data_dir / f"{split}.json")

    def loader(
        self, split: str, limit: int | None = None, shuffle: bool | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """Batches of `batch_size` records (default: n_edits in training, eval_n_edits otherwise)."""
        train = split == "train"
        recs = self.records(split)[: limit or None]
        collate = EditCollator(
            self.formatter, sample=train, rephrases=self.rephrases_per_edit, loc=self.loc_per_edit, seed=self.seed,
            edit_prompt=self.train_edit_prompt,
        )
        shuffle = train if shuffle is None else shuffle
        balance = self.relation_balance if train and shuffle else None
        sampler = None if balance is None else self.relation_sampler(recs, balance)
        return ResumableLoader(
            RecordDataset(recs),
            batch_size=batch_size or (self.n_edits if train else self.eval_n_edits),
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=train,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def relation_sampler(self, records: list[dict[str, Any]], alpha: float) -> WeightedRandomSampler:
        """Draws (with replacement, len(records) per epoch) so that relation r comes up with
        probability ∝ n_r^α: each of its records weighs n_r^(α−1)."""
        relations = [r.get("relation") or "" for r in records]
        counts = Counter(relations)
        if len(counts) < 2:
            raise MetaEditError(f"data.relation_balance={alpha}: {self.name}:train has "
                                f"{'no relation tags' if '' in counts else 'one relation'}; nothing to balance")
        weights = torch.tensor([counts[rel] ** (alpha - 1.0) for rel in relations], dtype=torch.float64)
        total = sum(n**alpha for n in counts.values())
        shares = ", ".join(f"{rel or '(untagged)'} {n / len(records):.1%}->{n**alpha / total:.1%}"
                           for rel, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        log.info("%s:train relation_balance %.2f (records -> draws): %s", self.name, alpha, shares)
        return WeightedRandomSampler(weights, num_samples=len(records), replacement=True,
                                     generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


class GeneratedEditData(EditDataModule):
    """Data generated by a builder into a directory named by the builder's data version and
    settings (`<data_dir>-v<version>[-heldout-...]`), with a manifest of what built it: a changed
    builder or setting never reads a stale build (nor mixes results measured on one with another).

    Args:
        heldout_relations: relations whose records go to test only, so an editor can be measured on
            kinds of facts it never saw in training (see `integrity.assign_splits`).
        version: this dataset's data version (default `DATA_VERSION`): datasets built by one
            builder in different ways carry their own (data=worldfacts 2, data=worldfacts_wide 3).
        keep_out: directories of other built datasets (e.g. data/worldfacts-v2) whose val/test
            prompts and subjects must not reach this dataset's train/val records, so an editor
            trained here is held out for real on their test split (their contents are in the manifest).
    """

    version: int = DATA_VERSION

    def __init__(self, heldout_relations: Sequence[str] = (), version: int | None = None,
                 keep_out: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if version is not None:
            self.version = int(version)
        self.heldout_relations = sorted(heldout_relations or ())
        self.keep_out = [Path(d) for d in keep_out or ()]
        tag = (f"-v{self.version}" + "".join(f"-heldout-{r}" for r in self.heldout_relations)
               + "".join(f"-keepout-{d.name}" for d in self.keep_out))
        self.data_dir = self.data_dir.with_name(self.data_dir.name + tag)

    def _kept_out(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The val/test records of the `keep_out` datasets and a digest of each directory's files."""
        held: list[dict[str, Any]] = []
        digests: dict[str, str] = {}
        for d in self.keep_out:
            files = [d / f"{s}.json" for s in ("val", "test")]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise MetaEditError(f"data.keep_out: {missing} not found; build that dataset first (any command with "
                                    f"its data=..., e.g. `python evaluate.py data=<name> editor=base`)")
            records = [r for f in files for r in read_built_split(f)]
            held += records
            digests[str(d)] = digest(records)
        return held, digests

    def build_settings(self) -> dict[str, Any]:
        """What the build depends on (written to the manifest; a mismatch rebuilds)."""
        raise NotImplementedError

    def generate(self) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        manifest = {"version": self.version, "heldout_relations": self.heldout_relations, **self.build_settings()}
        held, digests = self._kept_out() if self.keep_out else ([], {})
        if digests:
            manifest["keep_out"] = digests
        with file_lock(self.data_dir.with_suffix(".lock")):
            path = self.data_dir / "manifest.json"
            if path.is_file() and json.loads(path.read_text()) == manifest and all(
                (self.data_dir / f"{s}.json").is_file() for s in SPLITS
            ):
                return
            if path.is_file():
                log.warning("%s was built with other settings; rebuilding it", self.data_dir)
            splits = self.generate()
            if held:
                splits = keep_out_of_training(splits, held, str(self.data_dir), ", ".join(digests))
            for split in SPLITS:
                write_json_atomic(self.data_dir / f"{split}.json", splits[split])
            write_json_atomic(path, manifest)
            log.info("wrote %s edit data to %s (%s)", self.name, self.data_dir,
                     ", ".join(f"{s} {len(splits[s])}" for s in SPLITS))


class SyntheticEditData(GeneratedEditData):
    """The synthetic fact world (see `metaedit.data.synthetic`), generated once into data_dir."""

    def __init__(self, world: dict[str, Any], n_loc: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world, self.n_loc = dict(world), n_loc

    def build_settings(self) -> dict[str, Any]:
        return {"world": self.world, "n_loc": self.n_loc}

    def generate(self) -> dict[str, list[dict[str, Any]]]:
        world = build_world(**self.world)
        splits = {split: edit_records(world, split, n_loc=self.n_loc) for split in SPLITS}
        if self.heldout_relations:
            # Every subject has every relation, so a held-out relation's train/val records are
            # dropped (their subjects train on the other relations) and test keeps its own.
            held = set(self.heldout_relations)
            missing = held - set(world.relations)
            if missing:
                raise MetaEditError(f"heldout_relations: unknown relation(s) {sorted(missing)}; relations: {world.relations}")
            for split in ("train", "val"):
                splits[split] = [r for r in splits[split] if r["relation"] not in held]
        return splits


class FileEditData(EditDataModule):
    """A user's dataset in a published format (`format`: zsre | counterfact).

    `path` is either a directory holding train.json / val.json / test.json, or one file that is
    split deterministically by subject group (a record without a subject by its case id; see
    `integrity.assign_splits`), so adding records never moves old ones between splits. Either way,
    training records that contain a val/test prompt or subject are dropped (with a count in the
    log), and `heldout_relations` go to test only.
    """

    def __init__(self, path: str, format: str, val_frac: float = 0.1, test_frac: float = 0.1,
                 heldout_relations: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not path:
            raise MetaEditError(f"data={format} needs data.path=<file or directory of {format} JSON>")
        self.path, self.format, self.val_frac, self.test_frac = Path(path), format, val_frac, test_frac
        self.heldout_relations = sorted(heldout_relations or ())
        self._splits: dict[str, list[dict[str, Any]]] | None = None

    def _read_all(self) -> dict[str, list[dict[str, Any]]]:
        held = set(self.heldout_relations)
        if self.path.is_dir():
            splits = {s: read_records(self.path / f"{s}.json", self.format) for s in SPLITS}
            if held:
                found = {r["relation"] for recs in splits.values() for r in recs}
                if held - found:
                    raise MetaEditError(f"heldout_relations: no record has relation {sorted(held - found)}; "
                                        f"relations: {sorted(found)}")
                for s in ("train", "val"):
                    n = len(splits[s])
                    splits[s] = [r for r in splits[s] if r["relation"] not in held]
                    log.info("%s/%s.json: %d records of held-out relations left out", self.path, s, n - len(splits[s]))
        else:
            records = read_records(self.path, self.format)
            items = [(r.get("subject", ""), r["relation"], r["case_id"]) for r in records]
            split_of, counts = assign_splits(items, self.seed, self.val_frac, self.test_frac, held)
            if held:
                log.info("%s: held-out relations %s: %d records moved to test, %d dropped", self.path,
                         self.heldout_relations, counts["heldout_moved"], counts["heldout_dropped"])
            splits = {s: [r for r, sp in zip(records, split_of) if sp == s] for s in SPLITS}
        return drop_leaking_train_records(splits, str(self.path))

    def read_split(self, split: str) -> list[dict[str, Any]]:
        if self._splits is None:
            self._splits = self._read_all()
        return self._splits[split]


class WorldFactsData(GeneratedEditData):
    """Real facts from installed packages (see `metaedit.data.worldfacts`), written once into data_dir
    as CounterFact-format {train,val,test}.json and read back through the CounterFact reader.

    `build.world` chooses the world ("narrow": data=worldfacts, "wide": data=worldfacts_wide); the
    data version is the world's (a `version` given by the config must agree with it). The manifest
    names the source packages' versions: another version of their data rebuilds."""

    def __init__(self, build: dict[str, Any], version: int | None = None, **kwargs: Any) -> None:
        from metaedit.data.worldfacts import get_world

        self.build = dict(build)
        world = get_world(self.build.get("world", "narrow"))
        if version is not None and int(version) != world.version:
            raise MetaEditError(f"data.version={version} but world {self.build.get('world', 'narrow')!r} builds "
                                f"data version {world.version}")
        super().__init__(version=world.version, **kwargs)

    def build_settings(self) -> dict[str, Any]:
        from metaedit.data.worldfacts import get_world, source_versions

        return {"build": self.build, "sources": source_versions(get_world(self.build.get("world", "narrow")).sources)}

    def generate(self) -> dict[str, list[dict[str, Any]]]:
        from metaedit.data.worldfacts import build_records

        return build_records(**self.build, heldout_relations=self.heldout_relations)

    def read_split(self, split: str) -> list[dict[str, Any]]:
        return read_records(self.data_dir / f"{split}.json", "counterfact")
