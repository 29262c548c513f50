"""SERAC: routing is exact (far inputs get the base's output), rollback, memory and checkpoint files."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from metaedit import load_editor
from metaedit.editors.io import CONFIG, WEIGHTS
from metaedit.editors.serac import SERACEditedModel
from metaedit.editors.serac.memory import edit_text
from metaedit.functional import forward_logits
from metaedit.system import EditorSystem
from metaedit.types import EditRequest, MetaEditError
from tests.test_editors import requests

FAR = ["Children in Velese learn to speak", "The ruler of Dourax is"]  # other subjects and relations


@pytest.fixture(scope="module")
def serac(make_editor):
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            built[name] = make_editor("serac", name)
        return built[name]

    return get


def calibrated(ed, reqs):
    """Put τ between the edit prompts' scores (in scope) and the far inputs' (out of scope), so the
    untrained classifier routes deterministically; the routing code under test is the real one."""
    edited = ed.edit(reqs)
    with torch.no_grad():
        near = edited.scope_logits([r[0] for r in reqs]).max(-1).values.min()
        far = edited.scope_logits(FAR).max(-1).values.max()
        assert near > far  # an edit's own prompt is closer to it than unrelated inputs
        ed.classifier.bias -= (near + far) / 2  # logit 0 (score 0.5 = τ) halfway between them
    return ed.edit(reqs)


def pairs_batch(ed, prompts):
    return ed.formatter.batch(prompts, ["Velese"] * len(prompts))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_far_inputs_get_exactly_the_base_output_and_clear_rolls_back(serac, name):
    ed = serac(name)
    reqs = requests(2)
    edited = calibrated(ed, reqs)
    assert isinstance(edited, SERACEditedModel) and len(edited.memory) == 2
    mixed = pairs_batch(ed, FAR + [reqs[0][0]])
    base = forward_logits(ed.model, mixed)
    out = edited.logits(mixed)
    assert torch.equal(out[:2], base[:2])  # bit-for-bit the base model's logits
    assert not torch.allclose(out[2], base[2])  # the in-scope row went to the counterfactual model
    tok = ed.formatter.tokenizer
    far = tok(FAR[:1], return_tensors="pt")
    assert torch.equal(edited.generate(**far, max_new_tokens=3, do_sample=False),
                       ed.model.generate(**far, max_new_tokens=3, do_sample=False))
    near = tok([reqs[0][0]], return_tensors="pt")
    if name == "tiny-t5":  # a seq2seq forward needs decoder inputs, as for the base model
        near["decoder_input_ids"] = torch.tensor([[ed.formatter.decoder_start_token_id]])
    routed = edited.forward(**near, prompts=[reqs[0][0]]).logits
    assert routed.shape == ed.model(**near).logits.shape and not torch.allclose(routed, ed.model(**near).logits)
    near.pop("decoder_input_ids", None)
    edited.clear()  # rollback: every row, every output is the base's again
    assert len(edited.memory) == 0
    assert torch.equal(edited.logits(mixed), base)
    assert torch.equal(edited.generate(**near, max_new_tokens=3, do_sample=False),
                       ed.model.generate(**near, max_new_tokens=3, do_sample=False))
    with pytest.raises(MetaEditError, match="no merged model"):
        edited.merged()


def test_memory_save_load_round_trips(serac, tmp_path):
    ed = serac("tiny-gpt2")
    edited = calibrated(ed, requests(3))
    edited.add([("People in Velese speak", "Dourese")])
    assert len(edited.memory) == 4 and edited.memory.keys.shape[0] == 4
    edited.save_memory(tmp_path / "mem")
    loaded = ed.load_memory(tmp_path / "mem")
    assert loaded.memory.requests == edited.memory.requests
    assert torch.equal(loaded.memory.keys, edited.memory.keys)
    batch = pairs_batch(ed, FAR + [r[0] for r in requests(3)])
    assert torch.equal(loaded.logits(batch), edited.logits(batch))
    # Keys made by other classifier weights are recomputed from the texts, not trusted.
    with torch.no_grad():
        ed.classifier.proj.weight.mul_(1.01)
    again = ed.load_memory(tmp_path / "mem")
    with torch.no_grad():
        fresh = ed.classifier.embed([edit_text(r) for r in again.memory.requests])
        ed.classifier.proj.weight.div_(1.01)
    assert torch.allclose(again.memory.keys, fresh) and not torch.equal(again.memory.keys, edited.memory.keys)


def test_training_steps_then_checkpoint_holds_no_base_weights(make_editor, make_data, tmp_path):
    ed = make_editor("serac", "tiny-gpt2")
    base = {k: v.clone() for k, v in ed.model.state_dict().items()}
    system = EditorSystem(ed, lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2, loc_per_edit=2))
    assert all(torch.equal(v, ed.model.state_dict()[k]) for k, v in base.items())  # base untouched
    ed.eval()
    ed.save_pretrained(str(tmp_path / "ed"))
    assert sorted(p.name for p in (tmp_path / "ed").iterdir()) == [WEIGHTS, CONFIG]
    saved = load_file(str(tmp_path / "ed" / WEIGHTS))
    # Only trained tensors are stored: no base parameter, no frozen encoder or embedding copy.
    assert not set(saved) & set(base)
    assert not any(".wte." in k or "lm_head" in k or "classifier.encoder.embeddings" in k for k in saved)
    for t in saved.values():
        assert not any(t.shape == w.shape and torch.equal(t, w) for w in base.values())
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    saved_bytes = sum(v.numel() * v.element_size() for v in saved.values())
    assert saved_bytes < base_bytes  # h is a few copied blocks; g's encoder is not stored at all
    loaded = load_editor(tmp_path / "ed", model=ed.model)
    assert loaded.method == "serac" and loaded.hparams() == ed.hparams()
    for k, v in ed.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    batch = pairs_batch(ed, FAR + [r[0] for r in requests(2)])
    assert torch.equal(ed.edit(requests(2)).logits(batch), loaded.edit(requests(2)).logits(batch))


def test_retrieval_is_one_similarity_over_the_memory(serac):
    ed = serac("tiny-gpt2")
    edited = calibrated(ed, requests(2))
    many = [EditRequest(f"The capital of {s} is", "Velese") for s in ["Aa", "Bb", "Cc"] * 40]
    edited.add(many)
    logits = edited.scope_logits(FAR)
    assert logits.shape == (2, 122)
    with torch.no_grad():
        expected = ed.classifier.logits_from_embeddings(ed.classifier.embed(FAR), edited.memory.keys)
    assert torch.allclose(logits, expected)


def test_counterfactual_model_can_have_its_own_learning_rate(make_editor):
    """cf_lr puts h's parameters in their own optimizer group; every trainable parameter is in
    exactly one group."""
    editor = make_editor("serac", cf_lr=1e-5)
    groups = editor.param_groups(1e-3)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    cf = {id(p) for p in editor.counterfactual.parameters() if p.requires_grad}
    assert by_lr[1e-5] == cf and cf
    trainable = {id(p) for p in editor.parameters() if p.requires_grad}
    assert by_lr[1e-3] == trainable - cf and by_lr[1e-3]
    assert [g["lr"] for g in make_editor("serac").param_groups(1e-3)] == [1e-3, 1e-3]
