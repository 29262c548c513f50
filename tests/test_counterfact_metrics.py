"""CounterFact scores (es / ps / ns / score) and fluency on hand-made probabilities and texts."""

from __future__ import annotations

import math

import pytest
import torch

from metaedit.losses import mean_target_logprob
from metaedit.metrics import MetricAccumulator, harmonic_mean, ngram_entropy, prefers


def logits_from_probs(rows: list[list[list[float]]]) -> torch.Tensor:
    """[batch, positions, vocab] logits whose softmax is exactly the given probabilities."""
    return torch.tensor(rows).log()


def test_mean_target_logprob_averages_over_target_tokens_only():
    logits = logits_from_probs([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]])
    targets = torch.tensor([[-100, 1, 2]])  # two target tokens: p=0.8 then p=0.6
    expected = (math.log(0.8) + math.log(0.6)) / 2
    assert mean_target_logprob(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_prefers_compares_per_token_means_not_sums():
    # "new" is one token at p=0.3; "true" is two tokens at p=0.5 each. The sums favour new
    # (log .3 = -1.20 > 2·log .5 = -1.39), the per-token means favour true (-1.20 < -0.69).
    new_logits = logits_from_probs([[[0.3, 0.7]]])
    true_logits = logits_from_probs([[[0.5, 0.5], [0.5, 0.5]]])
    assert prefers(new_logits, torch.tensor([[0]]), true_logits, torch.tensor([[0, 1]])).item() == 0.0
    assert prefers(true_logits, torch.tensor([[0, 1]]), new_logits, torch.tensor([[0]])).item() == 1.0


def test_scores_and_their_harmonic_mean():
    acc = MetricAccumulator()
    for es, ps, ns in [([1.0], [1.0, 0.0], [1.0, 1.0, 1.0, 0.0]), ([1.0], [1.0, 1.0], [1.0, 1.0, 0.0, 0.0])]:
        acc.add({"edit_exact": torch.tensor(es), "edit_token": torch.tensor(es), "rephrase_exact": torch.tensor(ps),
                 "rephrase_token": torch.tensor(ps), "loc_retain_exact": torch.tensor(ns), "loc_retain_token": torch.tensor(ns),
                 "loc_pre_exact": torch.tensor(ns), "loc_post_exact": torch.tensor(ns), "edit_ms": torch.tensor([1.0]),
                 "loss_edit": torch.tensor([0.0]), "loss_loc": torch.tensor([0.0]),
                 "es": torch.tensor(es), "ps": torch.tensor(ps), "ns": torch.tensor(ns)})
    s = acc.summary()
    assert (s["es"], s["ps"], s["ns"]) == (1.0, 0.75, 0.625)
    assert s["score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.625))
    assert harmonic_mean(0.9, 0.0, 0.9) == 0.0


def test_fluency_is_weighted_ngram_entropy():
    # 4 distinct bigrams and 3 distinct trigrams, each once: H2 = 2 bits, H3 = log2(3).
    text = "a b c d e"
    assert ngram_entropy(text) == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("Rome Rome Rome Rome Rome Rome") == 0.0
    assert ngram_entropy("Rome is the capital of Italy and home to the Vatican") > ngram_entropy("Rome Rome Rome is is is")


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-t5"])
def test_greedy_relabel_matches_generate(tiny, model_name):
    """The base's own answers used for loc_retain are what greedy generation produces, token for
    token, with or without the caller's first-pass logits, for answers of different lengths."""
    from metaedit.decoding import greedy_relabel
    from metaedit.functional import forward_logits
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny(model_name)
    fmt = make_formatter(model, tok, cfg)
    prompts = ["Zalklothros lives in", "The capital of Basdri is", "Who founded Mirelle?"]
    batch = fmt.batch(prompts, ["a b c", "x", "one two"])  # 3 different answer lengths
    fn = lambda b: forward_logits(model, b)  # noqa: E731
    plain = greedy_relabel(fn, batch)
    reused = greedy_relabel(fn, batch, first_logits=fn(batch))
    assert torch.equal(plain.targets, reused.targets) and torch.equal(plain.input_ids, reused.input_ids)
    for row, prompt in enumerate(prompts):
        n = int((batch.targets[row] != -100).sum())
        ids = tok(prompt, return_tensors="pt")["input_ids"] if cfg["family"] == "causal_lm" else batch.input_ids[row : row + 1, : int(batch.attention_mask[row].sum())]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1] :] if cfg["family"] == "causal_lm" else gen[0, 1:]
        got = plain.targets[row][plain.targets[row] != -100]
        assert len(new) > 0 and got.tolist()[: len(new)] == new[:n].tolist()  # generate may stop at EOS


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_fluency_generations_in_rows_equal_each_alone(make_editor, model_name):
    """Prompts of different lengths generated together (left-padded for decoder-only models) give
    each the greedy text it gets alone, and the edit is applied: an edited model's texts differ."""
    from metaedit.functional import EditedModel
    from metaedit.metrics import generate_texts

    ed = make_editor("ft", model_name)
    prompts = ["The capital of Ardonia is", "Who", "The official language spoken by most people in Belmar is"]
    base = EditedModel(ed.model, {})
    side = ed.formatter.tokenizer.padding_side
    together = generate_texts(base, ed.formatter, prompts, 8, rows=3)
    assert together == [generate_texts(base, ed.formatter, [p], 8, rows=1)[0] for p in prompts]
    assert ed.formatter.tokenizer.padding_side == side  # the shared tokenizer is left as it was
    torch.manual_seed(0)
    noisy = EditedModel(ed.model, {p.name: (w := ed.model.get_parameter(p.name).detach()) + torch.randn_like(w) * 10 * w.std()
                                   for p in ed.inner_params})
    assert generate_texts(noisy, ed.formatter, prompts, 8, rows=3) != together
