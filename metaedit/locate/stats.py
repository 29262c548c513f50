"""Second-moment statistics C = E[k kᵀ] of MLP keys (the input of the MLP's output projection),
per (base model, layer, corpus), computed once and cached as safetensors.

ROME, MEMIT and AlphaEdit need C to tell which key directions existing knowledge uses: ROME's
update is orthogonal to old keys under C⁻¹, MEMIT weighs the new keys against λC, AlphaEdit
projects onto C's (near) null space. The corpus must come from this machine (no downloads): a
user's text files (`corpus=PATH`, a .txt file or a directory of them), a built dataset directory
(the fact sentences of its training split; the editors' key whitening uses these) or, by default, text
sampled from the base model itself from a fixed list of generic prompt starts with a seeded
generator — a proxy for the model's own training distribution.

Cache: <cache_dir>/stats/<module>.<fingerprint>.<corpus digest>.safetensors with a JSON manifest
beside it. A file whose manifest disagrees with what is asked (fingerprint, corpus digest, token
count, key width) is rebuilt or refused (`on_mismatch`), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from metaedit.data.readers import fact_sentences, training_records
from metaedit.hooks import captured, forward_stops_after
from metaedit.locate.arch import blocks_of, layout_of, out_proj, out_proj_params
from metaedit.models.fingerprint import fingerprint
from metaedit.precision import uses_bf16
from metaedit.progress import Progress
from metaedit.types import MetaEditError
from metaedit.utils import file_lock, save_tensors

log = logging.getLogger(__name__)
STATS_FORMAT = 1

# Generic starts for sampling a corpus from the base model: varied registers and topics so the
# keys cover more than one kind of text.
SAMPLING_PROMPTS: tuple[str, ...] = (
    "The", "In", "A", "It was", "When", "This is", "There are", "One of the", "According to", "After the",
    "Many people", "The history of", "In the year", "Scientists have", "The city of", "Yesterday", "My name is",
    "The best way to", "How to", "Once upon a time", "The government", "In mathematics,", "The company",
    "During the war", "Recent studies show", "The river", "Her first album", "He was born in", "The game",
    "Our team", "Q: What is", "The recipe calls for", "Dear", "Chapter 1", "The following", "Although",
    "In addition to", "The population of", "Music is", "The new law", "On the other hand,", "Researchers at",
    "The school", "Water is", "The film", "If you", "The president said", "Early in the morning",
    "The theory of", "Football is",
)


@dataclass(frozen=True)
class StatsSpec:
    """How C is estimated. `n_tokens` is the number of key vectors averaged (one per token)."""

    # A .txt file or a directory of .txt files; a built dataset directory (its train.json): the fact
    # sentences of its training split (locate/corpus.py's b_facts.txt, read in place); None: sampled
    # from the base model.
    corpus: str | None = None
    n_tokens: int = 100_000
    seq_len: int = 128  # tokens per corpus chunk (and per sampled text)
    batch_size: int = 64  # rows per generate / forward: sampling reads every weight per step, so wide batches amortise it
    seed: int = 0
    on_mismatch: str = "rebuild"  # or "refuse": a cache file that disagrees with the request raises
    # Forward passes (sampling the corpus, reading the keys) in bf16 autocast: "bf16", "fp32", or
    # "auto" (bf16 where the hardware computes it natively). Sums stay float64. The default is fp32
    # because statistics made before this field existed were fp32: their specs mean exactly that.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise MetaEditError(f"stats: need n_tokens >= 1, seq_len >= 2, batch_size >= 1; got {self}")
        if self.on_mismatch not in ("rebuild", "refuse"):
            raise MetaEditError(f"stats.on_mismatch must be 'rebuild' or 'refuse', got {self.on_mismatch!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise MetaEditError(f"stats.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")

    @classmethod
    def coerce(cls, value: StatsSpec | dict[str, Any] | None) -> StatsSpec:
        if value is None:
            return cls()
        if isinstance(value, StatsSpec):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise MetaEditError(f"stats: unknown key(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        # fp32 is left out: an editor saved before `precision` existed digests the same as before.
        d = asdict(self)
        if d["precision"] == "fp32":
            del d["precision"]
        return d

    def bf16(self, device: torch.device) -> bool:
        """Whether the forward passes run in bf16 autocast on `device`."""
        return uses_bf16(self.precision, device)


def _is_dataset(corpus: str) -> bool:
    """A built dataset directory (train.json beside its manifest) rather than a directory of text."""
    path = Path(corpus)
    return (path / "train.json").is_file() and (path / "manifest.json").is_file()


def _corpus_files(corpus: str) -> list[Path]:
    path = Path(corpus)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise MetaEditError(f"stats corpus {corpus!r}: no such .txt file, directory of .txt files or built dataset "
                            "directory (train.json and manifest.json)")
    return files


def _corpus_texts(corpus: str) -> list[tuple[str, str]]:
    """(name, text) of each document of a file or dataset corpus. A dataset gives one document, its
    training facts one per line, as `python -m metaedit.locate.corpus --facts-only` writes them; only
    train.json is read, so no val/test fact informs C."""
    if _is_dataset(corpus):
        return [("train-facts", "\n".join(fact_sentences(training_records(corpus))))]
    return [(f.name, f.read_text(errors="replace")) for f in _corpus_files(corpus)]


def corpus_digest(spec: StatsSpec, bf16: bool = False) -> tuple[str, str]:
    """(digest, description) of the corpus a spec names and how its keys are read. A file corpus
    is hashed by content; a sampled one by everything that determines the samples (the base model's
    fingerprint is part of the cache file's name separately). `bf16`: the passes run in bf16
    autocast (other samples, slightly other keys); fp32 adds nothing, so older caches stay valid."""
    h = hashlib.sha256()
    if bf16:
        h.update(b"precision=bf16\0")
    if spec.corpus is not None and _is_dataset(spec.corpus):
        for name, text in _corpus_texts(spec.corpus):
            h.update(name.encode() + b"\0" + text.encode() + b"\0")
        desc = f"the training facts of {spec.corpus}"
    elif spec.corpus is not None:
        files = _corpus_files(spec.corpus)
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        desc = f"text files: {spec.corpus} ({len(files)} file(s))"
    else:
        h.update(json.dumps({"prompts": SAMPLING_PROMPTS, "seed": spec.seed, "n_tokens": spec.n_tokens,
                             "seq_len": spec.seq_len, "batch_size": spec.batch_size,
                             "sampling": "top_p=0.95,T=1"}).encode())
        desc = f"sampled from the base model ({len(SAMPLING_PROMPTS)} prompt starts, seed {spec.seed})"
    return h.hexdigest()[:12], desc + (", bf16 autocast" if bf16 else "")


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _seq_len(model: nn.Module, spec: StatsSpec) -> int:
    """`spec.seq_len`, capped by the model's position table (tiny models have 64 positions)."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    return min(spec.seq_len, int(limit)) if limit else spec.seq_len


@torch.no_grad()
def sample_corpus(model: nn.Module, tokenizer: Any, spec: StatsSpec) -> list[str]:
    """Texts sampled from the base model, about `n_tokens` tokens in all, reproducibly (seeded)."""
    device = next(model.parameters()).device
    # Prompt starts are at most a few tokens; the sample fills the rest of a chunk.
    per_text = max(1, _seq_len(model, spec) - 8)
    n_texts = -(-spec.n_tokens // per_text)
    prompts = [SAMPLING_PROMPTS[i % len(SAMPLING_PROMPTS)] for i in range(n_texts)]
    texts: list[str] = []
    side = tokenizer.padding_side
    progress = Progress(n_texts, unit="text", noun="texts sampled")
    next_report = max(1, n_texts // 10)
    devices = [device] if device.type == "cuda" else []
    # bf16 autocast where chosen: sampling is most of the one-off cost (~1.7x faster on AVX512-BF16).
    try:
        tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
        with torch.random.fork_rng(devices=devices), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16(device)):
            torch.manual_seed(spec.seed)
            for i in range(0, n_texts, spec.batch_size):
                chunk = prompts[i : i + spec.batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                out = model.generate(**enc, do_sample=True, top_p=0.95, top_k=0, temperature=1.0,
                                     max_new_tokens=per_text, pad_token_id=tokenizer.pad_token_id)
                new = out if _is_seq2seq(model) else out[:, enc["input_ids"].shape[1] :]
                for p, row in zip(chunk, new):
                    texts.append(p + " " + tokenizer.decode(row, skip_special_tokens=True).strip()
                                 if _is_seq2seq(model) else p + tokenizer.decode(row, skip_special_tokens=True))
                if len(texts) >= next_report or len(texts) == n_texts:
                    log.info("stats corpus: %s", progress.line(len(texts)))
                    next_report = len(texts) + max(1, n_texts // 10)
    finally:
        tokenizer.padding_side = side
    return texts


def corpus_chunks(model: nn.Module, tokenizer: Any, spec: StatsSpec) -> list[list[int]]:
    """The corpus as token chunks of at most `seq_len`, `n_tokens` tokens in all (fewer if the
    corpus is shorter)."""
    if spec.corpus is not None:
        texts = [text for _, text in _corpus_texts(spec.corpus)]
    else:
        texts = sample_corpus(model, tokenizer, spec)
    chunks: list[list[int]] = []
    total = 0
    seq_len = _seq_len(model, spec)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for i in range(0, len(ids), seq_len):
            piece = ids[i : i + seq_len][: spec.n_tokens - total]
            if len(piece) < 2 and i > 0:
                continue
            chunks.append(piece)
            total += len(piece)
            if total >= spec.n_tokens:
                return chunks
    return chunks


@torch.no_grad()
def accumulate_moments(model: nn.Module, chunks: Sequence[list[int]], layers: Sequence[int], pad_id: int,
                       batch_size: int, bf16: bool = False) -> tuple[dict[int, Tensor], int]:
    """Σ k kᵀ / n over every real token of `chunks`, for the MLP key of each layer, in one pass.

    Sums are float64 (100k rank-one terms in float32 lose the small eigenvalues AlphaEdit needs).
    The forward stops after the deepest requested block: nothing after it is needed. `bf16`: the
    forward in bf16 autocast (the keys are read in bf16, summed in float64).
    """
    device = next(model.parameters()).device
    modules = {str(ell): out_proj(model, ell) for ell in layers}
    last_block = blocks_of(model)[max(layers)]
    sums: dict[int, Tensor] = {}
    n = 0
    total = sum(len(c) for c in chunks)
    progress = Progress(total, unit="tok", noun="tokens")
    next_report = max(1, total // 10)

    runner = model.get_encoder() if _is_seq2seq(model) else model
    for i in range(0, len(chunks), batch_size):
        rows = chunks[i : i + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with captured(inputs=modules) as keys, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
                forward_stops_after(last_block):
            runner(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        for ell in layers:
            k = keys[str(ell)][real].to(torch.float64)  # [tokens, d_in]
            sums[ell] = sums[ell] + k.T @ k if ell in sums else k.T @ k
        n += int(real.sum())
        if n >= next_report or i + batch_size >= len(chunks):
            log.info("second moments (layers %s): %s", list(layers), progress.line(n))
            next_report = n + max(1, total // 10)
    if n == 0:
        raise MetaEditError("stats: the corpus has no tokens")
    return {ell: s / n for ell, s in sums.items()}, n


def _paths(cache_dir: Path, module_name: str, fp: str, digest: str) -> tuple[Path, Path]:
    stem = f"{module_name}.{fp.removeprefix('sha256:')[:16]}.{digest}"
    root = cache_dir / "stats"
    return root / f"{stem}.safetensors", root / f"{stem}.json"


def _problem(manifest_path: Path, expected: dict[str, Any]) -> str | None:
    """Why a cache entry cannot be used, or None when it matches the request."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest"
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"{key} is {manifest.get(key)!r}, expected {value!r}"
    return None


def _cached_chunks(model: nn.Module, tokenizer: Any, spec: StatsSpec, cache_dir: Path, fp: str,
                   digest: str) -> list[list[int]]:
    """`corpus_chunks`, with a sampled corpus kept as token ids beside the statistics: sampling is
    most of the one-off cost, and layers asked for later (another method's, another layer choice)
    then cost one forward pass over it. A file corpus is re-read (cheap, and its digest is its content)."""
    if spec.corpus is not None:
        return corpus_chunks(model, tokenizer, spec)
    path = cache_dir / "stats" / f"corpus.{fp.removeprefix('sha256:')[:16]}.{digest}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == fp and saved.get("corpus_digest") == digest:
                log.info("stats corpus: reusing %d sampled chunks from %s", len(saved["chunks"]), path)
                return [list(map(int, c)) for c in saved["chunks"]]
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            pass
        log.warning("stats corpus cache %s is unreadable or stale: sampling again", path)
    chunks = corpus_chunks(model, tokenizer, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "corpus_digest": digest, "chunks": chunks}))
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    return chunks


def second_moments(model: nn.Module, tokenizer: Any, layers: Sequence[int], spec: StatsSpec,
                   cache_dir: str | Path) -> dict[int, Tensor]:
    """C = E[k kᵀ] (float32, [d_in, d_in], on the model's device) for each layer's MLP key, from the
    cache when a matching entry exists, else computed (all missing layers in one corpus pass)."""
    cache_dir = Path(cache_dir)
    fp = fingerprint(model)
    device = next(model.parameters()).device
    bf16 = spec.bf16(device)
    digest, desc = corpus_digest(spec, bf16)
    lay = layout_of(model)
    names = {ell: f"{lay.blocks}.{ell}.{lay.out_proj}" for ell in layers}
    out: dict[int, Tensor] = {}
    with file_lock(cache_dir / "stats" / ".lock"):
        missing = []
        for ell in layers:
            weights, manifest = _paths(cache_dir, names[ell], fp, digest)
            d_in = _key_width(model, ell)
            expected = {"format": STATS_FORMAT, "fingerprint": fp, "corpus_digest": digest,
                        "n_tokens_requested": spec.n_tokens, "module": names[ell], "d_in": d_in}
            if not weights.exists() and not manifest.exists():
                missing.append(ell)
                continue
            problem = _problem(manifest, expected) if weights.exists() else "weights file missing"
            if problem is None:
                c = load_file(str(weights))["C"]
                if tuple(c.shape) != (d_in, d_in):
                    problem = f"tensor shape {tuple(c.shape)}, expected {(d_in, d_in)}"
                else:
                    out[ell] = c.to(device)
                    continue
            if spec.on_mismatch == "refuse":
                raise MetaEditError(f"stats cache {weights} does not match this request ({problem}); delete it "
                                    f"or set stats.on_mismatch=rebuild")
            log.warning("stats cache %s does not match this request (%s): rebuilding it", weights, problem)
            missing.append(ell)
        if missing:
            t0 = time.perf_counter()
            log.info("second moments of the MLP keys of layers %s: computing from %d tokens of %s",
                     missing, spec.n_tokens, desc)
            chunks = _cached_chunks(model, tokenizer, spec, cache_dir, fp, digest)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            moments, n = accumulate_moments(model, chunks, missing, pad, spec.batch_size, bf16)
            if n < spec.n_tokens:
                log.warning("stats: the corpus has only %d of the %d tokens asked for", n, spec.n_tokens)
            for ell in missing:
                weights, manifest = _paths(cache_dir, names[ell], fp, digest)
                weights.parent.mkdir(parents=True, exist_ok=True)
                c = moments[ell].to(torch.float32)
                # Each file whole or absent (temporary name, then rename); the manifest last.
                save_tensors({"C": c.cpu().contiguous()}, weights)
                tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({
                    "format": STATS_FORMAT, "fingerprint": fp, "corpus_digest": digest, "corpus": desc,
                    "n_tokens_requested": spec.n_tokens, "n_tokens": n, "module": names[ell],
                    "d_in": int(c.shape[0]), "spec": spec.to_dict(), "bf16": bf16,
                    "seconds": round(time.perf_counter() - t0, 1),
                }, indent=1))
                os.replace(tmp, manifest)
                out[ell] = c.to(device)
            log.info("second moments done in %.1f s, cached under %s", time.perf_counter() - t0, cache_dir / "stats")
    return out


def recorded_costs(model: nn.Module, layers: Sequence[int], spec: StatsSpec, cache_dir: str | Path) -> list[dict[str, Any]]:
    """The manifests of the cached statistics of `layers` (those that exist): what computing them cost."""
    fp = fingerprint(model)
    digest, _ = corpus_digest(spec, spec.bf16(next(model.parameters()).device))
    lay = layout_of(model)
    out = []
    for ell in layers:
        _, manifest = _paths(Path(cache_dir), f"{lay.blocks}.{ell}.{lay.out_proj}", fp, digest)
        if manifest.is_file():
            out.append(json.loads(manifest.read_text()))
    return out


def _key_width(model: nn.Module, layer: int) -> int:
    return out_proj_params(model, [layer])[0].d_in
