"""Locate-then-edit (metaedit/locate, ROME, MEMIT, AlphaEdit) on the tiny models: the closed forms do
what their equations promise, the key statistics are cached and never reused stale, and edits change
the target prediction while the base model stays untouched."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from metaedit.data.synthetic import build_world
from metaedit.editors.io import build_editor
from metaedit.editors.locate_then_edit import LocateEditor
from metaedit.locate import arch, stats
from metaedit.locate.solve import alphaedit_delta, null_space_projector, regularised, rome_delta
from metaedit.locate.stats import StatsSpec, corpus_chunks, corpus_digest, second_moments
from metaedit.locate.tokens import subject_token_span
from metaedit.protocols import Protocol, SequenceCheckpoint, apply_protocol
from metaedit.types import EditRequest, MetaEditError, SequenceState
from tests.test_editors import assert_unchanged, snapshot

WORLD = build_world(seed=0, n_subjects=200)
TEST_SUBJECTS = [s for s in WORLD.subjects if WORLD.split_of[s] == "test"]
SMALL_STATS = {"n_tokens": 3000, "seq_len": 64}


def one_token_requests(model, tok, n: int) -> list[EditRequest]:
    """'The capital of X is' -> another capital that is one token (the tiny models recall at the last
    prompt token, so a later target token would be predicted from a position the edit does not touch).

    The new capital is the base model's most likely one-token capital after the true one: a
    counterfactual the model finds plausible, as edit benchmarks choose them. A fixed pick (the first
    one-token capital) can sit at p ~ 1e-9 on one build of a tiny model and at 1e-3 on another (the
    builds differ by machine), which would make whether an edit lands a property of the hardware."""
    out = []
    for s in TEST_SUBJECTS[:n]:
        true = WORLD.facts[(s, "capital")]
        prompt = f"The capital of {s} is"
        choices = [o for o in WORLD.objects["capital"]
                   if o != true and len(tok(" " + o, add_special_tokens=False)["input_ids"]) == 1]
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            logp = model(**ids).logits[0, -1].log_softmax(-1)
        first = [tok(" " + o, add_special_tokens=False)["input_ids"][0] for o in choices]
        out.append(EditRequest(prompt, choices[int(logp[first].argmax())], s))
    return out


def unrelated_prompt(tok, reqs: list[EditRequest]) -> str:
    """A test subject's capital prompt that shares neither subject nor answer with `reqs`.

    Answers are compared by their first token (what `greedy` reads). A subject whose capital is an
    edited fact's old or new capital is the edit's neighbour, not unrelated: the tiny models recall at
    the last prompt token in their first blocks (`python trace.py model=tiny-gpt2 data=synthetic`), so
    the key at the edited layer already carries the recalled capital and a rank-one write there also
    moves other subjects with that capital — ROME's known neighbourhood weakness (CounterFact's
    neighbourhood prompts are exactly such subjects)."""
    def first(o: str) -> int:
        return tok(" " + o, add_special_tokens=False)["input_ids"][0]

    taken = {first(o) for r in reqs for o in (WORLD.facts[(r.subject, "capital")], r.target)}
    edited = {r.subject for r in reqs}
    s = next(s for s in TEST_SUBJECTS if s not in edited and first(WORLD.facts[(s, "capital")]) not in taken)
    return f"The capital of {s} is"


def greedy(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def locate_editor(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lte-cache")

    def make(method: str, model_name: str = "tiny-gpt2", **hparams):
        model, tok, cfg = tiny(model_name)
        return build_editor(method, model, cfg, {"stats": SMALL_STATS, **hparams}, tokenizer=tok, cache_dir=cache)

    return make


def test_subject_span_from_offsets(tiny):
    _, tok, _ = tiny("tiny-llama")
    text = "Because it rained. The capital of Fasklorul is"
    first, last = subject_token_span(tok, text, "Fasklorul")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids[first : last + 1]).strip() == "Fasklorul"
    with pytest.raises(MetaEditError, match="does not occur"):
        subject_token_span(tok, text, "Paris")


def test_rome_update_writes_v_and_spares_c_orthogonal_keys():
    """W'k* = v*; a key k with kᵀC⁻¹k* = 0 keeps W k (the rank-one update's defining property)."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 16, 8
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    c = a @ a.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    w, k, v = (torch.randn(d_out, d_in, generator=g, dtype=torch.float64), torch.randn(d_in, generator=g,
               dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64))
    delta = rome_delta(w, k, v, c)
    assert torch.allclose((w + delta) @ k, v, atol=1e-10)
    u = torch.linalg.solve(c, k)
    other = torch.randn(d_in, generator=g, dtype=torch.float64)
    other = other - (other @ u) / (u @ u) * u  # now otherᵀ C⁻¹ k* = 0
    assert abs(float(other @ u)) < 1e-10
    assert torch.allclose((w + delta) @ other, w @ other, atol=1e-10)
    assert torch.linalg.matrix_rank(delta) == 1
    # Two keys of one fact (ROME's context-averaged key and the bare prompt's): both written exactly,
    # a key C⁻¹-orthogonal to both untouched, and the smallest such change in the C⁻¹ norm.
    k2 = torch.stack([k, torch.randn(d_in, generator=g, dtype=torch.float64)], 1)
    v2 = torch.randn(d_out, 2, generator=g, dtype=torch.float64)
    delta2 = rome_delta(w, k2, v2, c)
    assert torch.allclose((w + delta2) @ k2, v2, atol=1e-10) and torch.linalg.matrix_rank(delta2) == 2
    u2 = torch.linalg.solve(c, k2)
    spare = torch.randn(d_in, generator=g, dtype=torch.float64)
    spare = spare - u2 @ torch.linalg.lstsq(u2, spare).solution
    assert torch.allclose((w + delta2) @ spare, w @ spare, atol=1e-9)


def test_alphaedit_update_leaves_preserved_keys_alone():
    """With P from C's near-null eigenvectors, ‖ΔW K₀‖ ≈ 0 for keys K₀ in the preserved subspace
    (C's large-eigenvalue directions), with and without keys of earlier edits K_p."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n = 24, 10, 3
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.full((12,), 5.0), torch.full((12,), 1e-4)]).to(torch.float64)
    c = basis @ torch.diag(evals) @ basis.T
    p = null_space_projector(c, threshold=1e-2)
    k0 = basis[:, :12] @ torch.randn(12, 7, generator=g, dtype=torch.float64)  # preserved keys
    k1 = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    kp = torch.randn(d_in, 4, generator=g, dtype=torch.float64)
    for prior in (None, kp @ kp.T):
        delta = alphaedit_delta(r, k1, p, prior, l2=1.0)
        assert delta.abs().max() > 1e-3  # it does edit (along the null space)
        assert (delta @ k0).norm() < 1e-9 * k0.norm()


def test_memit_one_edit_one_layer_is_romes_closed_form(locate_editor):
    """Same k*, v*, C: MEMIT's Δ = R kᵀ(λC + k kᵀ)⁻¹ equals ROME's rank-one Δ scaled by s/(λ + s),
    s = k*ᵀC⁻¹k* (Sherman–Morrison), so the two pipelines agree term for term."""
    rome = locate_editor("rome", layers=[1])
    memit = locate_editor("memit", layers=[1], mom2_update_weight=3.0, clamp_norm_factor=rome.delta_settings.clamp_norm_factor)
    req = one_token_requests(rome.model, rome.tokenizer, 1)[0]
    keys, _, d_rome = rome.rank_one(req, {})
    k = keys[:, 0]
    p = rome.inner_params[0]
    d_memit = arch.weight_out_in(memit.apply_edits(None, [req]).params[p.name], p).double() - \
        arch.weight_out_in(rome.model.get_parameter(p.name), p).double()
    c = regularised(rome.moments(1), rome.c_ridge)
    s = float(k.double() @ torch.linalg.solve(c, k.double()))
    assert torch.allclose(d_memit, d_rome * s / (3.0 + s), rtol=1e-3, atol=1e-6 * d_rome.abs().max())


def test_stats_cache_is_reused_and_refused_or_rebuilt_when_stale(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny("tiny-llama")
    calls = []
    real = stats.accumulate_moments
    monkeypatch.setattr(stats, "accumulate_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = StatsSpec(n_tokens=800, seq_len=32)
    first = second_moments(model, tok, [1], spec, tmp_path)
    again = second_moments(model, tok, [1], spec, tmp_path)
    assert len(calls) == 1 and torch.equal(first[1], again[1])
    (manifest,) = (tmp_path / "stats").glob("model.*.json")
    assert "model.layers.1.mlp.down_proj" in manifest.name
    info = json.loads(manifest.read_text())
    assert info["n_tokens"] == 800 and info["fingerprint"] in ("sha256:" + manifest.name.split(".")[-3] + info[
        "fingerprint"][23:],) or info["fingerprint"].removeprefix("sha256:").startswith(manifest.name.split(".")[-3])
    # A manifest from another base (same file name: a copied or tampered cache) is never used.
    info["fingerprint"] = "sha256:0000"
    manifest.write_text(json.dumps(info))
    with pytest.raises(MetaEditError, match="fingerprint"):
        second_moments(model, tok, [1], StatsSpec(n_tokens=800, seq_len=32, on_mismatch="refuse"), tmp_path)
    second_moments(model, tok, [1], spec, tmp_path)
    assert len(calls) == 2  # rebuilt
    # A different base model (fingerprint) gets its own statistics.
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.get_parameter("model.layers.0.mlp.up_proj.weight").mul_(1.5)
    other.eval()
    second_moments(other, tok, [1], spec, tmp_path)
    assert len(calls) == 3 and len(list((tmp_path / "stats").glob("*.safetensors"))) == 2


def test_a_layer_asked_for_later_reuses_the_sampled_corpus(tiny, tmp_path, monkeypatch):
    """Sampling the corpus is most of the one-off cost: it is kept, and a later layer reads it again."""
    model, tok, _ = tiny("tiny-llama")
    samples = []
    real = stats.sample_corpus
    monkeypatch.setattr(stats, "sample_corpus", lambda *a, **k: samples.append(1) or real(*a, **k))
    spec = StatsSpec(n_tokens=600, seq_len=32)
    second_moments(model, tok, [1], spec, tmp_path)
    both = second_moments(model, tok, [1, 2], spec, tmp_path)
    assert len(samples) == 1 and set(both) == {1, 2}
    # Layer 2 computed from the kept corpus equals layer 2 computed from a fresh sample (same seed).
    fresh = second_moments(model, tok, [2], spec, tmp_path / "fresh")
    assert len(samples) == 2 and torch.allclose(both[2], fresh[2])
    # A damaged corpus file is sampled again, not used.
    (corpus,) = (tmp_path / "stats").glob("corpus.*.json")
    corpus.write_text("{not json")
    for f in (tmp_path / "stats").glob("model.layers.3*"):
        f.unlink()
    second_moments(model, tok, [3], spec, tmp_path)
    assert len(samples) == 3


def test_stats_precision_bf16_is_its_own_cache_entry_close_to_fp32(tiny, tmp_path):
    """stats.precision=bf16 samples and reads keys in bf16 autocast: another corpus digest (never
    confused with fp32 statistics), a C close to the fp32 one on the same text; fp32 keeps the digest
    and the saved spec statistics had before the field existed; a bad value is refused."""
    model, tok, _ = tiny("tiny-llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"The capital of {s} is {WORLD.facts[(s, 'capital')]} ." for s in WORLD.subjects[:80]))
    fp32 = second_moments(model, tok, [1], StatsSpec(corpus=str(corpus), n_tokens=400), tmp_path)[1]
    bf16 = second_moments(model, tok, [1], StatsSpec(corpus=str(corpus), n_tokens=400, precision="bf16"), tmp_path)[1]
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2
    assert not torch.equal(fp32, bf16) and (bf16 - fp32).norm() < 0.05 * fp32.norm()
    assert "precision" not in StatsSpec().to_dict() and StatsSpec(precision="auto").to_dict()["precision"] == "auto"
    assert stats.corpus_digest(StatsSpec())[0] == "207cfc110ffc"  # the digest of every fp32 cache made so far
    assert stats.corpus_digest(StatsSpec(), bf16=True)[0] != "207cfc110ffc"
    with pytest.raises(MetaEditError, match="stats.precision"):
        StatsSpec(precision="fp16")


def test_stats_from_a_text_corpus_with_the_token_count_checked(tiny, tmp_path):
    model, tok, _ = tiny("tiny-gpt2")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(f"The capital of {s} is {WORLD.facts[(s, 'capital')]} ." for s in
                                           WORLD.subjects[:120]))
    c = second_moments(model, tok, [2], StatsSpec(corpus=str(corpus), n_tokens=500), tmp_path)[2]
    p = arch.out_proj_params(model, [2])[0]
    assert p.transposed and c.shape == (p.d_in, p.d_in)  # Conv1D: keys are the 1024-wide MLP input
    assert torch.allclose(c, c.T, atol=1e-6) and torch.linalg.eigvalsh(c.double()).min() > -1e-6
    with pytest.raises(MetaEditError, match="n_tokens_requested"):
        second_moments(model, tok, [2], StatsSpec(corpus=str(corpus), n_tokens=400, on_mismatch="refuse"), tmp_path)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method,hparams", [("rome", {"v_precision": "fp32"}), ("rome", {"v_precision": "bf16"}),
                                           ("memit", {"mom2_update_weight": 10.0})])
def test_edit_changes_the_prediction_and_not_the_base(locate_editor, model_name, method, hparams):
    ed = locate_editor(method, model_name, **hparams)
    model, tok = ed.model, ed.tokenizer
    before = snapshot(model)
    reqs = one_token_requests(model, tok, 3)
    unrelated = unrelated_prompt(tok, reqs)
    landed = 0
    for req in reqs:
        assert greedy(model, tok, req.prompt) != req.target
        edited = ed.edit([req])
        assert set(edited.params) == {p.name for p in ed.inner_params}
        landed += greedy(edited, tok, req.prompt) == req.target
        assert greedy(edited, tok, unrelated) == greedy(model, tok, unrelated)
    assert landed >= 2, f"{method} on {model_name}: only {landed}/3 edits changed the prediction"
    assert_unchanged(model, before)
    # The statistics' one-off cost is reported (evaluation puts it beside edit_ms).
    costs = ed.one_off_costs()
    assert costs["stats_tokens"] == SMALL_STATS["n_tokens"] and costs["stats_min"] >= 0


def test_rome_batch_and_gpt2_conv1d_orientation(locate_editor):
    """Several requests in one ROME call are applied in turn; the edited Conv1D weight keeps GPT-2's
    [d_in, d_out] storage and W'k* = v* holds in the model's own orientation."""
    ed = locate_editor("rome", layers=[1])
    p = ed.inner_params[0]
    assert p.transposed
    req = one_token_requests(ed.model, ed.tokenizer, 1)[0]
    k, v, d = ed.rank_one(req, {})
    new = ed.apply_edits(None, [req]).params[p.name]
    assert new.shape == ed.model.get_parameter(p.name).shape
    assert torch.allclose(new.double().T @ k.double(), v.double(), rtol=1e-4, atol=1e-4)
    # With the bare prompt's key as a second column both keys get their values (rank two).
    ed2 = locate_editor("rome", layers=[1], fact_token="subject_last", prompt_key=True, n_contexts=3)
    req2 = EditRequest("Fasklorul is the capital of", req.target, "Fasklorul")
    k2, v2, d2 = ed2.rank_one(req2, {})
    assert k2.shape[1] == 2 and torch.linalg.matrix_rank(d2.double()) == 2
    new2 = ed2.apply_edits(None, [req2]).params[p.name]
    assert torch.allclose(new2.double().T @ k2.double(), v2.double(), rtol=1e-4, atol=1e-4)
    two = ed.apply_edits(None, one_token_requests(ed.model, ed.tokenizer, 2))
    assert not torch.equal(two.params[p.name], new)


def test_missing_subject_is_refused_or_falls_back(locate_editor):
    ed = locate_editor("rome", "tiny-llama", fact_token="subject_last", subject_fallback="error", v_steps=1)
    req = one_token_requests(ed.model, ed.tokenizer, 1)[0]
    with pytest.raises(MetaEditError, match="has no subject"):
        ed.edit([EditRequest(req.prompt, req.target)])
    with pytest.raises(MetaEditError, match="does not occur"):
        ed.edit([EditRequest(req.prompt, req.target, "Atlantis")])
    fallback = locate_editor("rome", "tiny-llama", fact_token="subject_last", v_steps=1)
    assert fallback.edit([EditRequest(req.prompt, req.target)]).params


def test_alphaedit_accumulates_keys_over_a_sequence_only(locate_editor):
    ed = locate_editor("alphaedit", "tiny-gpt2", null_space_threshold=1e-2, l2=0.1)
    reqs = one_token_requests(ed.model, ed.tokenizer, 3)[1:]
    ed.edit([reqs[0]])
    assert ed.preserved == {}  # a single edit outside a sequence keeps nothing
    before = snapshot(ed.model)
    seen = []
    first_answer = []

    def after_each(k: int, current) -> None:
        seen.append({x: v.clone() for x, v in ed.preserved.items()})
        first_answer.append(greedy(current, ed.tokenizer, reqs[0].prompt))

    edited = ed.edit_sequential(reqs, after_each=after_each)
    # After edit k the state holds Σ K Kᵀ of edits 1..k: it grows by a positive semi-definite term.
    assert set(seen[0]) == set(ed.layers) and all(g.trace() > 0 for g in seen[0].values())
    for layer in ed.layers:
        added = seen[1][layer] - seen[0][layer]
        assert added.trace() > 0 and torch.linalg.eigvalsh(added).min() > -1e-6 * added.trace()
    assert first_answer == [reqs[0].target] * 2  # the first edit landed and survived the second
    assert greedy(edited, ed.tokenizer, reqs[1].prompt) == reqs[1].target
    ed.reset_sequence()
    assert ed.preserved == {}
    assert_unchanged(ed.model, before)
    # AlphaEdit's update on a real model's statistics: keys in C's preserved subspace keep their values.
    layer = ed.layers[-1]
    p = ed.param_of(layer)
    evals, evecs = torch.linalg.eigh(ed.moments(layer).double())
    k0 = evecs[:, evals >= ed.null_space_threshold]
    single = ed.apply_edits(None, [reqs[0]]).params[p.name]
    delta = arch.weight_out_in(single.double() - ed.model.get_parameter(p.name).double(), p)
    assert (delta @ k0).norm() < 1e-6 * delta.norm().clamp_min(1e-12) + 1e-8


def test_a_killed_sequence_resumes_from_its_last_save(locate_editor, tmp_path, monkeypatch, caplog):
    """A sequence saved part-way (edited weights + AlphaEdit's K_p K_pᵀ) and killed continues from the
    save and ends where the uninterrupted sequence ends; a save of another sequence is not used."""
    ed = locate_editor("alphaedit", "tiny-gpt2", null_space_threshold=1e-2, l2=0.1, v_steps=3)
    group = SimpleNamespace(requests=one_token_requests(ed.model, ed.tokenizer, 4))  # apply_protocol reads only .requests
    protocol = Protocol("sequential", n=4, batch=1)
    whole, _, _ = apply_protocol(ed, group, protocol)
    whole_preserved = {k: v.clone() for k, v in ed.preserved.items()}

    calls, kill_at = [], [3]
    real = ed.apply_edits

    def killed_at_third(edit, requests):
        calls.append(requests[0].prompt)
        if len(calls) == kill_at[0]:
            raise RuntimeError("killed")
        return real(edit, requests)

    saved = SequenceCheckpoint(tmp_path / "seq.safetensors", every=2)
    monkeypatch.setattr(ed, "apply_edits", killed_at_third)
    with pytest.raises(RuntimeError, match="killed"):
        apply_protocol(ed, group, protocol, saved)
    key = SequenceCheckpoint.key(ed, group.requests, 1)
    state, times = saved.load(key, torch.device("cpu"))
    assert state.steps == 2 and len(times) == 2 and set(state.editor_state) == {f"preserved.{ell}" for ell in ed.layers}

    calls.clear()
    resumed, edit_ms, n_steps = apply_protocol(ed, group, protocol, saved)
    assert calls == [r.prompt for r in group.requests[2:]]  # only the steps after the save ran again
    assert n_steps == 4 and edit_ms > 0  # the saved steps' times are kept
    assert set(resumed.params) == set(whole.params)
    for name, value in whole.params.items():
        torch.testing.assert_close(resumed.params[name], value, rtol=1e-4, atol=1e-5)
    for layer, gram in whole_preserved.items():
        torch.testing.assert_close(ed.preserved[layer], gram)

    # The same file for other edits (another order): not used, the sequence starts over.
    calls.clear()
    kill_at[0] = 0
    other = SimpleNamespace(requests=list(reversed(group.requests)))
    with caplog.at_level("WARNING"):
        apply_protocol(ed, other, protocol, saved)
    assert len(calls) == 4 and "saved for another sequence" in caplog.text
    saved.remove()
    assert not saved.path.exists()


def test_bad_value_shift_precision_is_refused(locate_editor):
    with pytest.raises(MetaEditError, match="v_precision"):
        locate_editor("rome", v_precision="fp16")


def test_value_shifts_are_cached_on_the_unedited_model_only(tiny, tmp_path, monkeypatch):
    """A batch's value shifts are written to the value cache and read back by any editor with the
    same value settings (MEMIT then AlphaEdit on the same layers, or a batch resumed after a crash);
    other settings get another scope, and a sequence (model already edited) neither reads nor writes."""
    model, tok, cfg = tiny("tiny-gpt2")

    def make(method: str, **hparams):
        return build_editor(method, model, cfg, {"stats": SMALL_STATS, "v_steps": 3, "layers": [1, 2], **hparams},
                            tokenizer=tok, cache_dir=tmp_path)

    memit = make("memit")
    reqs = one_token_requests(model, tok, 3)
    fresh = [memit.delta(q, 2, {}) for q in reqs[:2]]
    got = memit.deltas(reqs[:2], 2)
    files = sorted((tmp_path / "values").rglob("*.safetensors"))
    assert len(files) == 2 and all(torch.equal(a, b) for a, b in zip(got, fresh))
    scopes = {make("memit", **h).value_cache(2).dir for h in ({}, {"v_lr": 0.1}, {"n_contexts": 2})}
    assert len(scopes) == 3 and memit.value_cache(2).dir in scopes
    with monkeypatch.context() as m:
        m.setattr(LocateEditor, "delta", lambda *a, **k: pytest.fail("a cached value shift was optimised again"))
        again = make("alphaedit").deltas(reqs[:2], 2)
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))
    memit.edit_sequential(reqs[1:], batch_size=1)  # reqs[2] is new: computed on an edited model, not cached
    assert sorted((tmp_path / "values").rglob("*.safetensors")) == files


def test_a_large_batch_logs_its_value_shifts_and_layers(locate_editor, monkeypatch, caplog):
    """A batch of many edits (1000: ~45 min of value shifts, minutes per layer) logs both phases."""
    memit = locate_editor("memit", layers=[1, 2], v_steps=2)
    monkeypatch.setattr(type(memit), "report_from", 2)  # as if 2 edits were a large batch
    with caplog.at_level(logging.INFO, logger="metaedit.editors.locate_then_edit"):
        memit.edit(one_token_requests(memit.model, memit.tokenizer, 2))
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("memit: 2/2 value shifts (100.0%)") for m in lines)
    assert [m.split(" (")[0] for m in lines if "layers read and solved" in m] == [
        "memit: 1/2 layers read and solved", "memit: 2/2 layers read and solved"]


def test_processes_share_a_batch_through_value_claims(tmp_path):
    """A request another live process has claimed is not optimised here but collected when its δ
    appears; the claim of a process that died is taken over."""
    import os
    import subprocess
    import sys
    import threading

    from metaedit.locate.value_cache import ValueCache

    cache = ValueCache(tmp_path, {"layer": 1})
    reqs = [EditRequest(f"The capital of {s} is", "Paris", s) for s in ("A", "B", "C")]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache.dir.mkdir(parents=True)
    (cache.dir / f"{cache.request_key(reqs[1])}.claim").write_text(str(os.getppid()))  # held by a live process
    (cache.dir / f"{cache.request_key(reqs[2])}.claim").write_text(dead.stdout.strip())  # held by a dead one
    computed = []

    def compute(q: EditRequest) -> torch.Tensor:
        computed.append(q.subject)
        return torch.full((4,), float(len(computed)))

    # The "other process" finishes B a moment later.
    threading.Timer(0.3, lambda: cache.put(reqs[1], torch.full((4,), 7.0))).start()
    got = cache.shared(reqs, compute, torch.device("cpu"), poll_s=0.1)
    assert computed == ["A", "C"] and got[1].tolist() == [7.0] * 4
    # This process's claims are released; the live process's own claim is left to it.
    assert {p.name for p in cache.dir.glob("*.claim")} == {f"{cache.request_key(reqs[1])}.claim"}
    assert all(cache.get(q, torch.device("cpu")) is not None for q in reqs)


def test_prepare_computes_the_statistics_of_every_edited_layer(tiny, tmp_path):
    """`train.py method=memit` calls `prepare`: the one-off statistics are paid there, not by the first edit."""
    model, tok, cfg = tiny("tiny-gpt2")
    ed = build_editor("memit", model, cfg, {"stats": SMALL_STATS, "layers": [1, 2]}, tokenizer=tok, cache_dir=tmp_path)
    assert ed.one_off_costs() == {}
    ed.prepare()
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2
    assert ed.one_off_costs()["stats_tokens"] == SMALL_STATS["n_tokens"]


def test_facts_corpus_holds_training_facts_only(tmp_path, tiny):
    """`python -m metaedit.locate.corpus`: the fact sentences come from train.json alone (val/test
    never reach the statistics), each stated with its true object, once, in a seeded order; a stats
    corpus naming the built dataset directory reads the same text in place."""
    from metaedit.data.readers import training_records
    from metaedit.locate.corpus import fact_sentences, main

    def cf(subject: str, true: str, new: str, neighbour: str, answer: str) -> dict:
        return {"case_id": subject, "requested_rewrite": {"prompt": "The capital of {} is", "subject": subject,
                                                          "relation_id": "capital", "target_new": {"str": new},
                                                          "target_true": {"str": true}},
                "paraphrase_prompts": [f"{subject}'s capital is"], "neighborhood_prompts": [neighbour],
                "neighborhood_answers": [answer]}

    (tmp_path / "train.json").write_text(json.dumps([cf("France", "Paris", "Rome", "The capital of Peru is", "Lima"),
                                                     cf("Chile", "Santiago", "Oslo", "The capital of Peru is", "Lima")]))
    (tmp_path / "test.json").write_text(json.dumps([cf("Japan", "Tokyo", "Cairo", "The capital of Nepal is", "Kathmandu")]))
    sentences = fact_sentences(training_records(tmp_path), seed=0)
    assert sorted(sentences) == sorted(["The capital of France is Paris.", "France's capital is Paris.",
                                        "The capital of Chile is Santiago.", "Chile's capital is Santiago.",
                                        "The capital of Peru is Lima."])
    assert sentences == fact_sentences(training_records(tmp_path), seed=0) != fact_sentences(training_records(tmp_path), seed=1)
    main(["--data", str(tmp_path), "--out", str(tmp_path / "corpus"), "--facts-only"])  # no model needed
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["b_facts.txt"]
    assert (tmp_path / "corpus" / "b_facts.txt").read_text().split("\n") == sentences
    with pytest.raises(SystemExit):  # without --facts-only the model is required
        main(["--data", str(tmp_path), "--out", str(tmp_path / "other")])
    model, tok, _ = tiny("tiny-llama")
    from_file = corpus_chunks(model, tok, StatsSpec(corpus=str(tmp_path / "corpus"), n_tokens=500))
    with pytest.raises(MetaEditError, match="built dataset directory"):
        corpus_chunks(model, tok, StatsSpec(corpus=str(tmp_path / "nowhere"), n_tokens=500))
    (tmp_path / "manifest.json").write_text("{}")
    spec = StatsSpec(corpus=str(tmp_path), n_tokens=500)
    assert corpus_chunks(model, tok, spec) == from_file
    assert "Japan" not in tok.decode(sum(from_file, [])) and "training facts" in corpus_digest(spec)[1]
    with pytest.raises(MetaEditError, match="no train.json"):
        training_records(tmp_path / "nowhere")


def test_alphaedit_preserved_facts_keep_their_values(locate_editor, tmp_path, caplog):
    """`preserve_facts`: the keys of a dataset's training facts join K_p, so an edit changes their
    values far less than without them; their sums are cached on disk and reused by another editor
    (weighted by its own preserve_weight); a directory without train.json is refused by name."""
    train = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:40]
    (tmp_path / "train.json").write_text(json.dumps([
        {"case_id": s, "requested_rewrite": {"prompt": "The capital of {} is", "subject": s, "relation_id": "capital",
                                             "target_new": {"str": "x"}, "target_true": {"str": WORLD.facts[(s, "capital")]}},
         "paraphrase_prompts": [f"{s}'s capital is"], "neighborhood_prompts": [f"The capital of {o} is"], "neighborhood_answers": [WORLD.facts[(o, "capital")]]}
        for s, o in zip(train, train[1:] + train[:1])]))
    plain = locate_editor("alphaedit", "tiny-gpt2", null_space_threshold=1e-2, l2=0.1)
    kept = locate_editor("alphaedit", "tiny-gpt2", null_space_threshold=1e-2, l2=0.1, preserve_facts=str(tmp_path))
    assert kept.hparams()["preserve_facts"] == str(tmp_path) and plain.facts_gram(plain.layers[0]) is None
    # Read once, up front (evaluation calls prepare() before timing edits), and reported as a one-off cost.
    assert "preserve_facts_min" not in kept.one_off_costs()
    kept.prepare()
    assert kept.one_off_costs()["preserve_facts_min"] >= 0 and "preserve_facts_min" not in plain.one_off_costs()
    req = one_token_requests(plain.model, plain.tokenizer, 1)[0]
    facts = [EditRequest(f"The capital of {s} is", WORLD.facts[(s, "capital")], s) for s in train]
    layer = plain.layers[-1]
    p = plain.param_of(layer)
    keys, _ = kept.read(facts, {}, key_layers=[layer])
    moved = {}
    for name, ed in (("plain", plain), ("kept", kept)):
        edited = ed.apply_edits(None, [req]).params[p.name]
        delta = arch.weight_out_in(edited.double() - ed.model.get_parameter(p.name).double(), p)
        moved[name] = float((delta @ keys[layer].double()).norm())
    assert moved["kept"] < 0.5 * moved["plain"], moved
    # The Gram matrix is Σ k kᵀ of those same keys (every fact; weight 1).
    k = keys[layer].double()
    torch.testing.assert_close(kept.facts_gram(layer), k @ k.T, rtol=1e-6, atol=1e-8)
    with caplog.at_level(logging.INFO, logger="metaedit.editors.alphaedit.editor"):
        twice = locate_editor("alphaedit", "tiny-gpt2", preserve_facts=str(tmp_path), preserve_weight=2.0)
        torch.testing.assert_close(twice.facts_gram(layer), 2 * kept.facts_gram(layer))
    assert "preserved facts' keys from" in caplog.text and "keys read" not in caplog.text
    # Reading the cache reports what the read cost when it was made, not the cache read's own time.
    # (Compared unrounded: on a tiny model both round to 0.0 minutes.)
    twice.prepare()
    assert twice._facts_seconds == kept._facts_seconds and twice.one_off_costs() == kept.one_off_costs()
    # A resumed sequence swaps its running edit in at once: the keys are still read on the unedited model.
    resumed = locate_editor("alphaedit", "tiny-gpt2", null_space_threshold=1e-2, l2=0.1,
                            preserve_facts=str(tmp_path), preserve_limit=len(train) - 1)
    running = plain.apply_edits(None, [req]).params
    resumed.edit_sequential(one_token_requests(plain.model, plain.tokenizer, 2), resume=SequenceState(1, running, {}))
    fresh = locate_editor("alphaedit", "tiny-gpt2", preserve_facts=str(tmp_path), preserve_limit=len(train) - 1)
    torch.testing.assert_close(resumed.facts_gram(layer), fresh.facts_gram(layer))
    with pytest.raises(MetaEditError, match="no train.json"):
        locate_editor("alphaedit", "tiny-gpt2", preserve_facts=str(tmp_path / "nowhere")).apply_edits(None, [req])
