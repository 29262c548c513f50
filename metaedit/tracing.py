"""Causal tracing (Meng et al. 2022, §2): where in the network is a fact recalled?

Three runs of a prompt: clean; corrupted (Gaussian noise, `noise`× the embedding matrix's std, added
to the subject tokens' embeddings, several noise samples); corrupted with one clean state restored.
The indirect effect of a state is p_restored(o) − p_corrupted(o) for the object token o the clean
run predicts (or a given target). Kinds: "residual" restores the block output at (layer, token);
"mlp" / "attn" restore that sublayer's output at one token over a window of `window` layers centred
on the layer (as ROME does: a single sublayer's effect is spread over its neighbours). Decoder-only
models only.

Averaging over records aligns tokens by role, as ROME's paper does: first / middle / last subject
token, first token after the subject, further tokens, last token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metaedit.hooks import captured, patched_outputs
from metaedit.locate import arch
from metaedit.locate.tokens import subject_token_span
from metaedit.progress import Progress
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)
KINDS = ("residual", "mlp", "attn")
ROLES = ("first subject", "middle subject", "last subject", "first after", "further", "last token")


@dataclass
class Trace:
    """Indirect effects [n_layers, n_tokens] per kind, with what they were measured on."""

    tokens: list[str]
    subject: tuple[int, int]  # first and last subject token (inclusive)
    target: str
    p_clean: float
    p_corrupt: float
    effects: dict[str, Tensor] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "subject_span": list(self.subject), "target": self.target,
                "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
                "indirect_effect": {k: v.tolist() for k, v in self.effects.items()}}


def _window(layer: int, n: int, window: int) -> range:
    lo = max(0, layer - window // 2)
    return range(lo, min(n, lo + window))


@torch.no_grad()
def trace_prompt(model: nn.Module, tokenizer: Any, prompt: str, subject: str, target: str | None = None,
                 noise: float = 3.0, samples: int = 10, window: int = 10, seed: int = 0,
                 kinds: tuple[str, ...] = KINDS) -> Trace:
    if getattr(model.config, "is_encoder_decoder", False):
        raise MetaEditError("causal tracing is implemented for decoder-only models")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise MetaEditError(f"unknown trace kind(s) {bad}; valid: {list(KINDS)}")
    device = next(model.parameters()).device
    lay = arch.layout_of(model)
    blocks = arch.blocks_of(model)
    n_layers = len(blocks)
    first, last = subject_token_span(tokenizer, prompt, subject, start=prompt.find(subject) if subject in prompt else None)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=device)
    n_tok = ids.shape[1]
    modules = {"residual": list(blocks), "mlp": [b.get_submodule(lay.mlp) for b in blocks],
               "attn": [b.get_submodule(lay.attn) for b in blocks]}

    # Clean run: every state that may be restored, and the object token.
    outs = {f"{k}{i}": m for k in kinds for i, m in enumerate(modules[k])}
    with captured(outputs=outs) as clean:
        logits = model(input_ids=ids).logits[0, -1]
    if target is not None:
        target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if not target_ids:
            raise MetaEditError(f"target {target!r} tokenises to nothing")
        obj = target_ids[0]
    else:
        obj = int(logits.argmax())
    p_clean = float(logits.float().softmax(-1)[obj])

    # Fixed noise samples (seeded) on the subject's embeddings: the same corruption in every run.
    emb = model.get_input_embeddings()
    scale = noise * float(emb.weight.float().std())
    g = torch.Generator().manual_seed(seed)
    eps = (torch.randn(samples, last - first + 1, emb.weight.shape[1], generator=g) * scale).to(device)

    def corrupt(rows: int):  # type: ignore[no-untyped-def]
        def fn(y: Tensor) -> Tensor:
            y = y.clone()
            y[:, first : last + 1] += eps.repeat(rows // samples, 1, 1).to(y.dtype)
            return y

        return fn

    def prob(batch_ids: Tensor, patches: dict[nn.Module, Any]) -> Tensor:
        with patched_outputs({emb: corrupt(batch_ids.shape[0]), **patches}):
            out = model(input_ids=batch_ids).logits[:, -1].float().softmax(-1)[:, obj]
        return out

    p_corrupt = float(prob(ids.expand(samples, -1), {}).mean())
    effects: dict[str, Tensor] = {}
    for kind in kinds:
        grid = torch.zeros(n_layers, n_tok)
        width = 1 if kind == "residual" else window
        for tok in range(n_tok):
            # One forward per (kind, token): row group ℓ restores its window of layers at `tok`.
            batch_ids = ids.expand(n_layers * samples, -1)
            patches = {}
            for j, module in enumerate(modules[kind]):
                rows = [g_ * samples + s for g_ in range(n_layers) if j in _window(g_, n_layers, width)
                        for s in range(samples)]
                if not rows:
                    continue
                state = clean[f"{kind}{j}"][0, tok]
                idx = torch.tensor(rows, device=device)

                def restore(y: Tensor, idx: Tensor = idx, state: Tensor = state, tok: int = tok) -> Tensor:
                    y = y.clone()
                    y[idx, tok] = state.to(y.dtype)
                    return y

                patches[module] = restore
            p = prob(batch_ids, patches).view(n_layers, samples).mean(1)
            grid[:, tok] = p.cpu() - p_corrupt
        effects[kind] = grid
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    return Trace(tokens, (first, last), tokenizer.decode([obj]), p_clean, p_corrupt, effects)


def roles(trace: Trace) -> list[int]:
    """Each token's role index in ROLES (for averaging over prompts of different lengths)."""
    first, last = trace.subject
    n = len(trace.tokens)
    out = []
    for i in range(n):
        if i == n - 1:
            out.append(5)
        elif i == first and first != last:
            out.append(0)
        elif first < i < last:
            out.append(1)
        elif i == last:
            out.append(2)
        elif i == last + 1:
            out.append(3)
        elif i > last + 1:
            out.append(4)
        else:
            out.append(-1)  # before the subject: not part of ROME's averaged picture
    return out


def average_by_role(traces: list[Trace]) -> dict[str, Tensor]:
    """Mean indirect effect [n_layers, len(ROLES)] per kind over traces (NaN where no prompt has a
    token of that role, e.g. middle subject tokens when every subject is two tokens)."""
    out: dict[str, Tensor] = {}
    for kind in traces[0].effects:
        n_layers = traces[0].effects[kind].shape[0]
        total, count = torch.zeros(n_layers, len(ROLES)), torch.zeros(len(ROLES))
        for t in traces:
            per_prompt, seen = torch.zeros(n_layers, len(ROLES)), torch.zeros(len(ROLES))
            for i, r in enumerate(roles(t)):
                if r >= 0:
                    per_prompt[:, r] += t.effects[kind][:, i]
                    seen[r] += 1
            has = seen > 0
            total[:, has] += per_prompt[:, has] / seen[has]
            count += has.float()
        out[kind] = total / count.clamp_min(1) + torch.where(count > 0, 0.0, float("nan"))
    return out


def plot_heatmap(effect: Tensor, labels: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * effect.shape[0] + 2), max(3.0, 0.35 * len(labels) + 1.5)))
    im = ax.imshow(effect.T.numpy(), aspect="auto", cmap="Purples", origin="upper")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="indirect effect (p restored − p corrupted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_trace(out_dir: Path, name: str, effects: dict[str, Tensor], labels: list[str], info: dict[str, Any]) -> dict[str, str]:
    """One heatmap PNG per kind and a JSON with the numbers; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, effect in effects.items():
        png = out_dir / f"{name}-{kind}.png"
        plot_heatmap(effect, labels, f"{name}: {kind} restoration", png)
        written[kind] = str(png)
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps({**info, "labels": labels,
                              "indirect_effect": {k: [[None if v != v else v for v in row] for row in e.tolist()]
                                                  for k, e in effects.items()}}, indent=1))
    written["json"] = str(js)
    return written


def run_trace(cfg: Any) -> dict[str, Any]:
    """What `python trace.py` does: one prompt, or the average over `n_records` records of a dataset."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metaedit.models.loading import load_base_model, make_formatter

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model, tok = load_base_model(model_cfg, cfg.paths.cache_dir)  # type: ignore[arg-type]
    if cfg.device:
        model.to(cfg.device)
    opts = {"noise": float(cfg.noise), "samples": int(cfg.samples), "window": int(cfg.window), "seed": int(cfg.seed),
            "kinds": tuple(cfg.kinds)}
    out_dir = Path(cfg.output_dir)
    if cfg.get("data"):
        data = instantiate(cfg.data, formatter=make_formatter(model, tok, model_cfg), _recursive_=False)  # type: ignore[arg-type]
        records = [r for r in data.records(cfg.split) if r.get("subject") and r["subject"] in r["prompt"]]
        records = records[: int(cfg.n_records)]
        if not records:
            raise MetaEditError(f"data {cfg.data.name}: no {cfg.split} record has a subject in its prompt")
        traces = []
        progress = Progress(len(records), unit="rec", noun="records traced")
        for i, r in enumerate(records, start=1):
            traces.append(trace_prompt(model, tok, r["prompt"], r["subject"], r.get("target_true"), **opts))
            if i == len(records) or i % max(1, len(records) // 10) == 0:
                log.info("causal trace: %s", progress.line(i))
        effects = average_by_role(traces)
        name = f"trace-{model_cfg['name']}-{cfg.data.name}-{len(traces)}"  # type: ignore[index]
        info = {"model": model_cfg["name"], "data": cfg.data.name, "split": cfg.split, "n_records": len(traces),  # type: ignore[index]
                "mean_p_clean": sum(t.p_clean for t in traces) / len(traces),
                "mean_p_corrupt": sum(t.p_corrupt for t in traces) / len(traces), **{k: v for k, v in opts.items()}}
        written = write_trace(out_dir, name, effects, list(ROLES), info)
    else:
        if not cfg.prompt or not cfg.subject:
            raise MetaEditError("give prompt=... subject=... (or data=<dataset> n_records=N)")
        t = trace_prompt(model, tok, cfg.prompt, cfg.subject, cfg.target, **opts)
        labels = [f"{s!r}{'*' if t.subject[0] <= i <= t.subject[1] else ''}" for i, s in enumerate(t.tokens)]
        name = f"trace-{model_cfg['name']}"  # type: ignore[index]
        written = write_trace(out_dir, name, t.effects, labels, {**t.to_json(), "model": model_cfg["name"],  # type: ignore[index]
                                                                   **{k: v for k, v in opts.items()}})
        print(f"p({t.target!r}) clean {t.p_clean:.3f}, corrupted {t.p_corrupt:.3f}", flush=True)
    for kind, path in written.items():
        print(f"{kind}: {path}", flush=True)
    return written
