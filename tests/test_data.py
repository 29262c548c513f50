"""Synthetic world, record validation and tokenised layouts."""

from __future__ import annotations

import json

import pytest
import torch

from metaedit.data.records import load_records
from metaedit.data.synthetic import TEMPLATES, build_world, edit_records
from metaedit.types import EditRequest, MetaEditError


def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = build_world(seed=3, n_subjects=60), build_world(seed=3, n_subjects=60)
    assert a == b
    assert edit_records(a, "test") == edit_records(b, "test")
    assert build_world(seed=4, n_subjects=60).facts != a.facts
    subjects = {s: {r["subject"] for r in edit_records(a, s)} for s in ("train", "val", "test")}
    assert subjects["train"] and subjects["val"] and subjects["test"]
    assert not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["val"]
    assert not subjects["val"] & subjects["test"]


def test_eval_rephrase_templates_never_appear_in_training_records():
    world = build_world(seed=0, n_subjects=60)
    train_prompts = {p for r in edit_records(world, "train") for p in [r["prompt"], *r["rephrases"]]}
    for rec in edit_records(world, "test"):
        held_out = [t.format(rec["subject"]) for t in TEMPLATES[rec["relation"]][1]]
        assert rec["rephrases"] == held_out
        assert rec["target_new"] != rec["target_true"]
        # The same templates filled with a training subject never occur in training records either.
        train_subject = next(iter(edit_records(world, "train")))["subject"]
        assert not {t.format(train_subject) for t in TEMPLATES[rec["relation"]][1]} & train_prompts


def test_malformed_record_names_file_and_index(tmp_path):
    good = edit_records(build_world(seed=0, n_subjects=20), "train")[:3]
    bad = [good[0], good[1], {**good[2], "rephrases": "not a list"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(MetaEditError, match=r"bad\.json: record 2: field 'rephrases' must be list"):
        load_records(path)
    path.write_text(json.dumps([good[0], {k: v for k, v in good[1].items() if k != "target_new"}]))
    with pytest.raises(MetaEditError, match=r"record 1: missing field 'target_new'"):
        load_records(path)
    path.write_text("[{")
    with pytest.raises(MetaEditError, match="not valid JSON"):
        load_records(path)
    with pytest.raises(MetaEditError, match="data file not found"):
        load_records(tmp_path / "missing.json")


def test_empty_target_is_refused():
    with pytest.raises(MetaEditError, match="empty 'target'"):
        EditRequest("The capital of France is", "  ")
    with pytest.raises(MetaEditError, match="empty 'prompt'"):
        EditRequest.coerce({"prompt": "", "target": "Rome"})
    with pytest.raises(MetaEditError, match="lacks field"):
        EditRequest.coerce({"prompt": "x"})


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_formatter_aligns_targets_with_logits(tiny, name):
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny(name)
    f = make_formatter(model, tok, cfg)
    batch = f.batch(["The capital of Kolar is", "People in Tralis speak"], ["Port Amar", "Velese"])
    target_ids = [f.target_ids("Port Amar"), f.target_ids("Velese")]
    for row, ids in enumerate(target_ids):
        got = batch.targets[row][batch.targets[row] != -100].tolist()
        assert got == ids
        if batch.decoder_input_ids is None:
            # causal: the token at input position p+1 is the target at logits position p
            pos = (batch.targets[row] != -100).nonzero().flatten()
            assert batch.input_ids[row, pos + 1].tolist() == ids
    assert batch.kl_mask.sum() > 0 and torch.equal(batch.kl_mask.bool().any(-1), torch.tensor([True, True]))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_formatter_refuses_a_target_that_does_not_fit(tiny, name):
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny(name)
    f = make_formatter(model, tok, {**cfg, "max_length": 8})
    long_target = " ".join(["Port Amar"] * 8)
    assert len(f.target_ids(long_target)) > 8
    with pytest.raises(MetaEditError, match=rf"target '{long_target}' is \d+ tokens, longer than the [78] that fit in max_length=8"):
        f.batch(["The capital of Kolar is"], [long_target])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_formatter_reports_truncated_prompts_once_and_counts_them(tiny, name, caplog):
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny(name)
    f = make_formatter(model, tok, {**cfg, "max_length": 12})
    long_prompt = "In the old books of the north, written long ago, the capital of Kolar is"
    assert len(tok(long_prompt)["input_ids"]) > 12
    with caplog.at_level("WARNING", logger="metaedit.data.formatting"):
        batch = f.batch([long_prompt, long_prompt, "The capital of Kolar is"], ["Port Amar"] * 3)
        f.batch([long_prompt], ["Port Amar"])
    warnings = [r for r in caplog.records if "cut off" in r.getMessage()]
    assert len(warnings) == 1 and "max_length=12" in warnings[0].getMessage() and long_prompt in warnings[0].getMessage()
    assert f.n_truncated == 3
    assert batch.input_ids.shape[1] <= 12
    # The kept part is the end of the prompt (what the answer follows), and the target is whole.
    row = batch.targets[0][batch.targets[0] != -100].tolist()
    assert row == f.target_ids("Port Amar")


def test_train_edit_prompt_adds_each_edits_own_prompt_to_training_in_scope_rows_only(make_data, tiny):
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny("tiny-gpt2")
    formatter = make_formatter(model, tok, cfg)
    plain = make_data(formatter, n_edits=2, rephrases_per_edit=1)
    with_prompt = make_data(formatter, n_edits=2, rephrases_per_edit=1, train_edit_prompt=True)
    for d in (plain, with_prompt):
        d.setup("fit")
    a, b = next(iter(plain.train_dataloader())), next(iter(with_prompt.train_dataloader()))
    prompts = [q.prompt for q in b.requests]
    assert [q.prompt for q in a.requests] == prompts  # same records and order (seeded)
    assert len(b.inscope) == len(a.inscope) + 2 and all(p in b.inscope_prompts for p in prompts)
    assert not any(p in a.inscope_prompts for p in prompts)
    assert b.inscope_owner.tolist().count(0) == 2  # each prompt belongs to its own edit
    # evaluation scores rephrases only, with or without the option
    va, vb = next(iter(plain.val_dataloader())), next(iter(with_prompt.val_dataloader()))
    assert va.inscope_prompts == vb.inscope_prompts
    assert not any(q.prompt in vb.inscope_prompts for q in vb.requests)


def test_relation_balance_draws_relations_by_count_to_the_alpha(make_data, tiny):
    """data.relation_balance=α: relation r is drawn ∝ n_r^α (0: equally), so a world that is mostly one
    relation does not train an editor on mostly that one; null keeps the data's own frequencies."""
    from collections import Counter

    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny("tiny-gpt2")
    formatter = make_formatter(model, tok, cfg)
    data = make_data(formatter, n_edits=2, relation_balance=0.0)
    data.setup("fit")
    by_rel: dict[str, list] = {}
    for r in data.records("train"):
        by_rel.setdefault(r["relation"], []).append(r)
    big, small = sorted(by_rel, key=lambda k: -len(by_rel[k]))[:2]
    records = by_rel[big][:40] + by_rel[small][:4]  # 10 : 1
    assert len(by_rel[small]) >= 4
    samplers = {alpha: data.relation_sampler(records, alpha) for alpha in (0.0, 0.5, 1.0)}
    # 50 epochs of one sampler (its generator moves on between them): 2200 draws each
    draws = {alpha: Counter(records[i]["relation"] for _ in range(50) for i in sampler) for alpha, sampler in samplers.items()}
    share = {alpha: c[small] / sum(c.values()) for alpha, c in draws.items()}
    assert abs(share[0.0] - 0.5) < 0.05  # equal
    assert abs(share[0.5] - 2 / (2 + 40**0.5)) < 0.05  # √4 : √40
    assert abs(share[1.0] - 4 / 44) < 0.03  # as the data holds them
    # The training loader draws through it; evaluation loaders never do.
    assert isinstance(data.train_dataloader().sampler, torch.utils.data.WeightedRandomSampler)
    assert not isinstance(data.val_dataloader().sampler, torch.utils.data.WeightedRandomSampler)
    assert not isinstance(make_data(formatter, n_edits=2).train_dataloader().sampler, torch.utils.data.WeightedRandomSampler)
    with pytest.raises(MetaEditError, match="one relation; nothing to balance"):
        data.relation_sampler(by_rel[big], 0.0)
    with pytest.raises(MetaEditError, match=r"data.relation_balance must be null or in \[0, 1\], got 2"):
        make_data(formatter, relation_balance=2)


@pytest.mark.parametrize("balance", [None, 0.5])
def test_a_resumed_train_loader_continues_with_the_batches_it_had_left(make_data, tiny, balance):
    """Lightning saves the train loader's state in each checkpoint: a loader restored from it yields
    exactly the batches an uninterrupted one would have (the draws of the sampler and of the
    collator's rephrase / locality / target sampling), mid-epoch, at an epoch's end and epochs later."""
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny("tiny-gpt2")
    formatter = make_formatter(model, tok, cfg)

    def loader():
        data = make_data(formatter, n_edits=4, relation_balance=balance, loc_per_edit=2)
        data.setup("fit")
        return data.train_dataloader()

    def signature(batch):
        return ([(q.prompt, q.target) for q in batch.requests], batch.inscope_prompts, batch.loc_prompts)

    whole = loader()
    n = len(whole)
    assert n >= 6
    seen, states = [], {}
    for _ in range(3):  # three epochs, recording the state after every batch
        for batch in whole:
            seen.append(signature(batch))
            states[len(seen)] = whole.state_dict()
    assert len(seen) == 3 * n and len(set(map(str, seen))) > n  # epochs draw differently
    for stop in (n // 2, n, n + 3):  # mid-epoch, at an epoch's end, in the second epoch
        resumed = loader()
        resumed.load_state_dict(states[stop])
        rest = [signature(b) for b in resumed]
        rest += [signature(b) for b in resumed]  # the next epoch goes on as well
        expect_end = (stop // n + 1) * n
        assert rest == seen[stop : expect_end + n], stop
    # A fresh loader without a restored state starts at the beginning.
    assert [signature(b) for b in loader()] == seen[:n]


def test_built_data_dir_resolver_follows_the_data_config_and_its_held_out_tags():
    """`${built_data_dir:}` (for editor settings that read the training split, e.g. ENN's preserve)
    is the directory the run's data module builds, so a held-out-relation run never reads the plain
    build's train.json (which holds the held-out relation's facts)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import metaedit.data.datamodule  # noqa: F401  (registers the resolver)
    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        for extra in ([], ["data.heldout_relations=[capital]"], ["data=worldfacts_wide"]):
            cfg = compose(config_name="train", overrides=["+where=${built_data_dir:}", *extra])
            built = instantiate(cfg.data, formatter=None, _recursive_=False).data_dir
            assert OmegaConf.to_container(cfg, resolve=True)["where"] == str(built)
            assert ("heldout-capital" in str(built)) == bool(extra and "heldout" in extra[0])
