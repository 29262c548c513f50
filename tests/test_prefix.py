"""Frozen-prefix replay: running only the blocks from the first edited one reproduces the full model."""

from __future__ import annotations

import pytest
import torch

from metaedit.functional import forward_logits
from metaedit.prefix import PrefixCache, frozen_prefix, with_prefix, with_prefixes


def _batch(editor):
    return editor.formatter.batch(["The capital of Fasklorul is", "The leader of Toudu is", "Toudu is led by"],
                                  ["Bounklor", "Port Nexrir", "Port Nexrir"])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_replay_matches_the_full_forward_with_and_without_edited_params(make_editor, name):
    editor = make_editor("ft", name)
    names = [p.name for p in editor.inner_params]
    runner = frozen_prefix(editor.model, names)
    assert runner is not None and runner.start > 0
    batch = _batch(editor)
    fast = with_prefix(runner, batch)
    assert fast.prefix is not None and fast.prefix.shape[:2] == batch.input_ids.shape
    torch.testing.assert_close(forward_logits(editor.model, fast), forward_logits(editor.model, batch), atol=1e-5, rtol=1e-5)
    edited = {n: editor.model.get_parameter(n) + 0.01 * torch.randn_like(editor.model.get_parameter(n)) for n in names}
    torch.testing.assert_close(forward_logits(editor.model, fast, edited), forward_logits(editor.model, batch, edited),
                               atol=1e-5, rtol=1e-5)
    # The cache returns the same prefix rows whatever batch they come in.
    cache = PrefixCache(runner)
    a = cache.attach(batch)
    b = cache.attach(editor.formatter.batch(["The leader of Toudu is"], ["Port Nexrir"]))
    torch.testing.assert_close(b.prefix[0], a.prefix[1, : b.prefix.shape[1]])
    assert len(cache.rows) == 3


def test_replay_falls_back_when_it_cannot_be_exact(make_editor):
    llama = make_editor("ft", "tiny-llama")
    batch = with_prefix(frozen_prefix(llama.model, [p.name for p in llama.inner_params]), _batch(llama))
    # An override in a block before the replayed ones: the full forward must run (and see it).
    early = "model.layers.0.mlp.down_proj.weight"
    params = {early: torch.zeros_like(llama.model.get_parameter(early))}
    plain = _batch(llama)
    torch.testing.assert_close(forward_logits(llama.model, batch, params), forward_logits(llama.model, plain, params))
    t5 = make_editor("ft", "tiny-t5")  # encoder-decoder: no replay
    assert frozen_prefix(t5.model, [p.name for p in t5.inner_params]) is None


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_one_prefix_pass_for_several_batches_matches_one_pass_each(make_editor, name):
    editor = make_editor("ft", name)
    runner = frozen_prefix(editor.model, [p.name for p in editor.inner_params])
    batches = [_batch(editor), editor.formatter.batch(["Toudu is led by"], ["Port Nexrir of the long name"]),
               editor.formatter.batch(["The capital of the land of Fasklorul is", "x"], ["B", "Bounklor"])]
    together = with_prefixes(runner, batches)
    for b, t in zip(batches, together):
        one = with_prefix(runner, b)
        assert t.prefix.shape == one.prefix.shape
        torch.testing.assert_close(t.prefix, one.prefix, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(forward_logits(editor.model, t), forward_logits(editor.model, b), atol=1e-5, rtol=1e-5)
