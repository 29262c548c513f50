"""Editor checkpoints: bit-exact round trip, no base weights, clear refusals."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy
from safetensors.torch import load_file

from metaedit import load_editor
from metaedit.editors.io import CONFIG, WEIGHTS
from metaedit.types import MetaEditError
from tests.conftest import ROOT
from tests.test_editors import requests


def trained_like(ed):
    """Give a fresh MEND editor non-trivial weights and normalisation statistics."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ed.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    ed.train()
    ed.apply_edits(ed.formatter.batch(*zip(*requests(4))), [])
    ed.eval()
    return ed


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_mend_checkpoint_round_trips_bit_for_bit(make_editor, tiny, tmp_path, name):
    ed = trained_like(make_editor("mend", name))
    ed.save_pretrained(str(tmp_path / "ed"))
    model, tok, _ = tiny(name)
    loaded = load_editor(tmp_path / "ed", model=model)
    for k, v in ed.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    reqs = requests(2)
    a, b = ed.edit(reqs).params, loaded.edit(reqs).params
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The directory holds no base weights: no base parameter name, no tensor equal to a base tensor.
    files = sorted(p.name for p in (tmp_path / "ed").iterdir())
    assert files == [WEIGHTS, CONFIG]
    saved = load_file(str(tmp_path / "ed" / WEIGHTS))
    base = dict(model.state_dict())
    assert not set(saved) & set(base)
    for t in saved.values():
        assert not any(t.shape == w.shape and torch.equal(t, w) for w in base.values())
    config = json.loads((tmp_path / "ed" / CONFIG).read_text())
    assert config["method"] == "mend" and config["base_model"]["config"]["name"] == name
    assert config["inner_params"] and config["base_model"]["fingerprint"].startswith("sha256:")
    size = sum(p.stat().st_size for p in (tmp_path / "ed").iterdir())
    print(f"{name} MEND editor checkpoint: {size / 2**20:.1f} MiB")


def test_edit_scale_override_scales_the_saved_mends_update_and_bad_overrides_are_refused(make_editor, tiny, tmp_path):
    ed = trained_like(make_editor("mend", "tiny-gpt2"))
    ed.save_pretrained(str(tmp_path / "ed"))
    model, _, _ = tiny("tiny-gpt2")
    reqs = requests(2)
    base = {p.name: model.get_parameter(p.name).detach().clone() for p in ed.inner_params}
    plain = load_editor(tmp_path / "ed", model=model).edit(reqs).params
    scaled_editor = load_editor(tmp_path / "ed", model=model, hparams={"edit_scale": 2.5})
    assert scaled_editor.edit_scale == 2.5 and scaled_editor.hparams()["edit_scale"] == 2.5
    scaled = scaled_editor.edit(reqs).params
    for name, w in base.items():
        # Same trained tensors, the step η_ℓ × 2.5: the weight change is 2.5 times the saved editor's.
        assert (plain[name] - w).abs().max() > 0
        torch.testing.assert_close(scaled[name] - w, 2.5 * (plain[name] - w), rtol=1e-4, atol=1e-6)
        assert torch.equal(model.get_parameter(name), w)  # the base model is untouched
    with pytest.raises(MetaEditError, match=r"mend has no hyper-parameter \['edit_sclae'\] to override"):
        load_editor(tmp_path / "ed", model=model, hparams={"edit_sclae": 2.0})
    with pytest.raises(MetaEditError, match="edit_scale must be > 0"):
        load_editor(tmp_path / "ed", model=model, hparams={"edit_scale": 0})
    with pytest.raises(MetaEditError, match=r"does not match a mend editor"):
        load_editor(tmp_path / "ed", model=model, hparams={"rank": 3})  # a shape the saved tensors do not have


def test_key_whitening_round_trips_and_can_be_switched_on_at_load_time(tiny, tmp_path):
    """A MEND trained with key_whitening keeps ρ and the statistics' spec in its config (the matrices
    come back from the statistics cache, not the checkpoint) and edits bit-for-bit alike after loading;
    a plain editor can be given it at load time (`+hparams.key_whitening=ρ`)."""
    from metaedit.editors.io import build_editor
    from metaedit.models.inner_params import resolve_inner_params

    model, tok, cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    stats = {"n_tokens": 3000, "seq_len": 64}
    ed = trained_like(build_editor("mend", model, cfg, {"key_whitening": 1e-2, "stats": stats}, tokenizer=tok,
                                   inner_params=inner, cache_dir=tmp_path / "cache"))
    ed.save_pretrained(str(tmp_path / "ed"))
    assert not any("whiten" in k for k in load_file(str(tmp_path / "ed" / WEIGHTS)))
    loaded = load_editor(tmp_path / "ed", model=model, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert loaded.hparams()["key_whitening"] == 1e-2 and loaded.hparams()["stats"] == ed.hparams()["stats"]
    reqs = requests(2)
    a, b = ed.edit(reqs).params, loaded.edit(reqs).params
    assert all(torch.equal(a[k], b[k]) for k in a)

    plain = build_editor("mend", model, cfg, {"stats": stats}, tokenizer=tok, inner_params=inner)
    plain.load_state_dict(ed.state_dict())
    plain.save_pretrained(str(tmp_path / "plain"))
    switched = load_editor(tmp_path / "plain", model=model, tokenizer=tok, cache_dir=tmp_path / "cache",
                           hparams={"key_whitening": 1e-2})
    c = switched.edit(reqs).params
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in plain.edit(reqs).params.items())


def test_edit_steps_gives_further_steps_only_to_edits_that_have_not_landed(make_editor, tiny, tmp_path):
    """MEND's edit_steps (an edit-time choice): step k+1 starts from step k's weights and takes only the
    edits whose target is not yet the greedy answer; meta-training keeps the one step it learns."""
    from metaedit.functional import forward_logits
    from metaedit.losses import exact_correct
    from tests.test_editors import TEST_SUBJECTS, WORLD

    ed = trained_like(make_editor("mend", "tiny-gpt2"))
    ed.save_pretrained(str(tmp_path / "ed"))
    model, _, _ = tiny("tiny-gpt2")
    subject = TEST_SUBJECTS[0]
    # The model's own answer (landed before any edit, and after MEND's small untrained step) and a new one.
    prompt, new = requests(1)[0]
    reqs = [(prompt, WORLD.facts[(subject, "capital")]), (prompt, new)]
    one = load_editor(tmp_path / "ed", model=model)
    batch = one.formatter.batch(*zip(*reqs))
    after_one = one.edit(reqs)
    assert exact_correct(forward_logits(model, batch, after_one.params), batch.targets).tolist() == [True, False]
    two = load_editor(tmp_path / "ed", model=model, hparams={"edit_steps": 2})
    seen: list[int] = []
    capture = two.capture
    two.capture = lambda edit, *a, **k: seen.append(len(edit)) or capture(edit, *a, **k)  # type: ignore[method-assign]
    after_two = two.edit(reqs)
    assert seen == [2, 1]  # both edits, then only the one that had not landed
    assert any(not torch.equal(after_two.params[n], after_one.params[n]) for n in after_one.params)
    seen.clear()
    two.train()
    two.apply_edits(batch, [])
    assert seen == [2]  # training: one step
    with pytest.raises(MetaEditError, match="edit_steps must be >= 1"):
        load_editor(tmp_path / "ed", model=model, hparams={"edit_steps": 0})


def test_load_editor_without_model_loads_the_named_base(make_editor, tmp_path):
    ed = make_editor("ft", "tiny-gpt2", steps=7)
    ed.save_pretrained(str(tmp_path / "ft"))
    assert load_file(str(tmp_path / "ft" / WEIGHTS)) == {}  # FT's checkpoint holds only hyper-parameters
    loaded = load_editor(tmp_path / "ft")
    assert loaded.method == "ft" and loaded.steps == 7 and loaded.model is not ed.model
    assert loaded.edit(requests(1)).params


def test_fingerprint_mismatch_is_refused_unless_forced(make_editor, tmp_path):
    ed = make_editor("mend", "tiny-gpt2")
    ed.save_pretrained(str(tmp_path / "ed"))
    other = copy.deepcopy(ed.model)
    with torch.no_grad():
        other.get_parameter("transformer.wte.weight").mul_(1.5)
    with pytest.raises(MetaEditError, match=r"trained for base model 'tiny-gpt2' \(fingerprint sha256:\w+\) but the given model has fingerprint sha256:"):
        load_editor(tmp_path / "ed", model=other)
    assert load_editor(tmp_path / "ed", model=other, force=True).method == "mend"


def test_missing_or_incomplete_editor_directory(make_editor, tmp_path):
    with pytest.raises(MetaEditError, match="editor directory not found"):
        load_editor(tmp_path / "nope")
    ed = make_editor("mend", "tiny-gpt2")
    ed.save_pretrained(str(tmp_path / "ed"))
    (tmp_path / "ed" / WEIGHTS).unlink()
    with pytest.raises(MetaEditError, match="incomplete editor directory .*missing editor.safetensors"):
        load_editor(tmp_path / "ed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetaEditError, match="missing editor_config.json, editor.safetensors"):
        load_editor(tmp_path / "empty")


def test_saving_over_an_existing_editor_is_atomic(make_editor, tmp_path):
    ed = make_editor("mend", "tiny-gpt2")
    ed.save_pretrained(str(tmp_path / "ed"))
    with torch.no_grad():
        ed.edit_lrs.fill_(0.5)
    ed.save_pretrained(str(tmp_path / "ed"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ed"]  # no temp dirs left behind
    assert load_file(str(tmp_path / "ed" / WEIGHTS))["edit_lrs"].eq(0.5).all()


def test_atomic_writes_keep_the_modes_the_umask_gives(make_editor, tmp_path):
    import os
    import stat

    from metaedit.data.records import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "report.json", {"es": 1.0})
        make_editor("mend", "tiny-gpt2").save_pretrained(str(tmp_path / "ed"))
    finally:
        os.umask(old)
    # A temp file or directory is private (0600 / 0700); renamed into place it must not stay so.
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ed").stat().st_mode) == 0o755
    # safetensors writes its files 0600 whatever the umask: a saved editor is readable like the rest.
    assert stat.S_IMODE((tmp_path / "ed" / WEIGHTS).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ed" / "editor_config.json").stat().st_mode) == 0o644


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores the checkpoint after setup, as FSDP and DeepSpeed do: the path on which Lightning 2.6
    drops `trainer.fit(weights_only=...)`."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


class NotATensor:
    """A pickled object in a checkpoint: loading it would run code, so resuming must refuse it."""


def tiny_train_cfg(tmp_path, max_steps: int, *extra: str):
    from hydra import compose, initialize_config_dir

    overrides = ["method=mend", "model=tiny-gpt2", "data=synthetic", f"trainer.max_steps={max_steps}",
                 "trainer.val_check_interval=1000", "checkpoint_every_n_steps=1000", "evaluate_after=false",
                 "logger=none", "trainer.enable_progress_bar=false", f"paths.root_dir={tmp_path}", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_resuming_loads_last_ckpt_with_weights_only_on_every_strategy(tmp_path, monkeypatch, caplog):
    from metaedit.training import train

    pl_log = logging.getLogger("pytorch_lightning")  # does not propagate to the root logger
    monkeypatch.setattr(pl_log, "handlers", [*pl_log.handlers, caplog.handler])
    with caplog.at_level("INFO", logger="pytorch_lightning"):
        train(tiny_train_cfg(tmp_path, 2))
    # That Lightning line is about *saving* (model weights only or full state); the final save asks
    # for the full state explicitly, so no run prints a line that reads as an unsafe load.
    assert any(r.name.startswith("pytorch_lightning") for r in caplog.records)  # the check sees its logs
    assert "`weights_only` was not set" not in caplog.text
    last = tmp_path / "checkpoints" / "mend-tiny-gpt2-synthetic" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

    loads: list[object] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    late = ["+trainer.strategy._target_=tests.test_checkpoint.LateRestoreStrategy", "+trainer.strategy.device=cpu"]
    train(tiny_train_cfg(tmp_path, 3, *late))
    assert loads and all(w is True for w in loads), loads  # None: torch.load's own (overridable) default
    assert real_load(last, weights_only=True)["global_step"] == 3  # it did resume (2 -> 3 steps)

    # A checkpoint holding a pickled object is refused, not unpickled.
    checkpoint = real_load(last, weights_only=True)
    checkpoint["smuggled"] = NotATensor()
    torch.save(checkpoint, last)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(tiny_train_cfg(tmp_path, 4, *late))


def test_a_run_resumed_mid_epoch_trains_the_editor_an_uninterrupted_run_trains(tmp_path):
    """2 steps, stop, resume to 4 == 4 steps in one go: the resumed run continues the epoch's draws
    (the train loader's state travels in last.ckpt) instead of starting them over, and its final
    editor replaces the earlier process's unvalidated `best`. (A constant learning rate: a cosine
    schedule spans max_steps, which the two processes here set differently.)"""
    from safetensors.torch import load_file

    from metaedit.training import train

    editors = {}
    for name, stops in (("whole", [4]), ("resumed", [2, 4])):
        for steps in stops:
            # One precision in every process: precision=auto times a step on a CPU with native bf16, and
            # under load one process chose bf16-mixed while the others kept fp32 (session 43's CI run).
            train(tiny_train_cfg(tmp_path / name, steps, "method.optim.schedule=constant", "trainer.precision=32-true"))
        run = tmp_path / name / "checkpoints" / "mend-tiny-gpt2-synthetic"
        last = torch.load(run / "last.ckpt", weights_only=True)
        assert last["global_step"] == 4
        assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"passes": 0, "taken": 4}]  # mid-epoch
        editors[name] = load_file(run / "best" / "editor.safetensors")
        assert all(torch.equal(editors[name][k], last["state_dict"][f"editor.{k}"]) for k in editors[name])
    assert editors["whole"].keys() == editors["resumed"].keys()
    for key, value in editors["whole"].items():
        torch.testing.assert_close(editors["resumed"][key], value, rtol=0, atol=0, msg=key)
