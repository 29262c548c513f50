"""Tiny base models that *know* the synthetic world: a local word-level tokenizer + short pre-training.

They exist so every test and acceptance check runs on a CPU in minutes with a model that has real
knowledge to edit. Built by command (`python -m metaedit.models.tiny`) or on first use, cached.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)

from metaedit.data.formatting import Formatter
from metaedit.data.synthetic import build_world, corpus_texts, pretraining_pairs
from metaedit.functional import forward_logits
from metaedit.losses import exact_correct, nll
from metaedit.utils import atomic_dir, file_lock

log = logging.getLogger(__name__)

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level vocabulary of the world: every name and template word is one token."""
    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values())))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> PretrainedConfig:
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "gpt2":
        base = {"n_positions": 64, "n_embd": 128, "n_layer": 4, "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(**ids, **{**base, **overrides})
    if arch == "llama":
        base = {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
        }
        return LlamaConfig(**ids, **{**base, **overrides})
    if arch == "t5":
        base = {
            "d_model": 128,
            "d_ff": 256,
            "d_kv": 32,
            "num_layers": 3,
            "num_decoder_layers": 3,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
        return T5Config(**ids, **{**base, **overrides})
    raise ValueError(f"unknown tiny arch {arch!r}; valid: gpt2, llama, t5")


def pretrain(
    model: PreTrainedModel,
    formatter: Formatter,
    pairs: list[tuple[str, str]],
    max_epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    target_acc: float = 0.995,
    seed: int = 0,
) -> float:
    """Teach the model every pair (loss on target tokens); stop once exact accuracy ≥ target_acc."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total = max_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / total))
    acc = 0.0
    t0 = time.time()
    for epoch in range(max_epochs):
        model.train()
        order = pairs[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            batch = formatter.batch([p for p, _ in chunk], [t for _, t in chunk])
            loss = nll(forward_logits(model, batch), batch.targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if epoch % 2 == 1 or epoch == max_epochs - 1:
            acc = exact_accuracy(model, formatter, pairs)
            log.info("tiny pretrain epoch %d: loss %.4f exact acc %.4f (%.0fs)", epoch + 1, loss.item(), acc, time.time() - t0)
            if acc >= target_acc:
                break
    model.eval()
    return acc


@torch.no_grad()
def exact_accuracy(model: PreTrainedModel, formatter: Formatter, pairs: list[tuple[str, str]], bs: int = 512) -> float:
    was_training = model.training
    model.eval()
    hits = 0
    for i in range(0, len(pairs), bs):
        chunk = pairs[i : i + bs]
        batch = formatter.batch([p for p, _ in chunk], [t for _, t in chunk])
        hits += int(exact_correct(forward_logits(model, batch), batch.targets).sum())
    model.train(was_training)  # leave the model in the mode it came in (a frozen base stays in eval)
    return hits / len(pairs)


def build_tiny_model(
    out_dir: Path,
    arch: str,
    family: str,
    world: dict[str, Any],
    config: dict[str, Any] | None = None,
    pretraining: dict[str, Any] | None = None,
) -> Path:
    """Build, pre-train and save a tiny model + tokenizer to `out_dir` (atomically), once."""
    out_dir = Path(out_dir)
    with file_lock(out_dir.with_suffix(".lock")):
        if (out_dir / "pretrain.json").is_file():
            return out_dir
        log.info("building tiny base model %s (arch=%s) in %s", out_dir.name, arch, out_dir)
        t0 = time.time()
        w = build_world(**world)
        tokenizer = train_tokenizer(corpus_texts(w))
        cfg = tiny_config(arch, tokenizer, **(config or {}))
        torch.manual_seed(0)
        auto = AutoModelForSeq2SeqLM if family == "seq2seq_lm" else AutoModelForCausalLM
        model = auto.from_config(cfg)
        formatter = Formatter(tokenizer, family, decoder_start_token_id=getattr(cfg, "decoder_start_token_id", None))
        # One thread while pre-training: a matmul's reduction order depends on the thread count,
        # and over thousands of steps the rounding differences grow into different weights (up to
        # 0.4 measured between 1 and 2 threads), so where the model recalls its facts — which the
        # locate-then-edit tests rely on — would depend on OMP_NUM_THREADS.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            acc = pretrain(model, formatter, pretraining_pairs(w), **(pretraining or {}))
        finally:
            torch.set_num_threads(threads)
        info = {"arch": arch, "family": family, "config": config or {}, "world": world, "exact_acc": acc, "seconds": round(time.time() - t0, 1)}
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
        log.info("tiny base model %s: exact accuracy %.4f on its facts, built in %.0fs", out_dir.name, acc, info["seconds"])
        return out_dir


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description="Build and cache the tiny base models")
    ap.add_argument("names", nargs="*", default=["tiny-gpt2", "tiny-llama", "tiny-t5"])
    args = ap.parse_args()
    from metaedit.models.loading import load_model_config, tiny_model_dir

    for n in args.names:
        mc = load_model_config(n)
        build_tiny_model(tiny_model_dir(mc), **mc["tiny"], family=mc["family"])
