"""What `python edit.py` does: load a trained editor, apply edits, show base vs edited completions."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from metaedit.data import synthetic, worldfacts
from metaedit.editors.base import Editor
from metaedit.functional import EditedModel
from metaedit.types import EditRequest, MetaEditError


def _template_sets() -> list[list[str]]:
    """Per relation, every known phrasing (rewrite prompt first), from both built-in datasets."""
    sets = [[rewrite, *train, *heldout] for rewrite, train, heldout, _ in worldfacts.TEMPLATES.values()]
    sets += [[*train, *heldout] for train, heldout in synthetic.TEMPLATES.values()]
    return sets


def paraphrases_for(prompt: str, n: int = 3) -> list[str]:
    """Paraphrases of a prompt that matches a known relation template ("The capital of X is" ->
    "The seat of government of X is", ...); [] when it matches none."""
    for phrasings in _template_sets():
        for t in phrasings:
            pattern = "^" + re.escape(t).replace(re.escape("{}"), "(.+?)") + "$"
            m = re.match(pattern, prompt.strip())
            if m:
                others = [p.format(m.group(1)) for p in phrasings if p != t]
                return others[-n:]  # the held-out phrasings come last
    return []


def subject_for(prompt: str) -> str | None:
    """The subject of a prompt that matches a known relation template ("The capital of France is"
    -> "France"); None when it matches none."""
    for phrasings in _template_sets():
        for t in phrasings:
            pattern = "^" + re.escape(t).replace(re.escape("{}"), "(.+?)") + "$"
            m = re.match(pattern, prompt.strip())
            if m:
                return m.group(1)
    return None


def read_requests_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Requests file: one JSON object per line with `prompt`, `target` and optional `subject` (a
    string: the entity the fact is about, needed by locate-then-edit methods), `paraphrases`,
    `unrelated` (lists of prompts). Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise MetaEditError(f"requests file not found: {path}")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetaEditError(f"{path}: line {i}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise MetaEditError(f"{path}: line {i}: expected an object with 'prompt' and 'target'")
        try:
            EditRequest.coerce(obj)
        except MetaEditError as e:
            raise MetaEditError(f"{path}: line {i}: {e}") from None
        for key in ("paraphrases", "unrelated"):
            if key in obj and not (isinstance(obj[key], list) and all(isinstance(x, str) for x in obj[key])):
                raise MetaEditError(f"{path}: line {i}: field '{key}' must be a list of strings")
        out.append(obj)
    if not out:
        raise MetaEditError(f"{path}: no requests in the file")
    return out


def greedy_completion(model: Any, editor: Editor, prompt: str, max_new_tokens: int) -> str:
    assert editor.formatter is not None
    tok, family = editor.formatter.tokenizer, editor.formatter.family
    ids = tok(prompt, return_tensors="pt").to(editor.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :] if family == "causal_lm" else out[0]
    return tok.decode(new, skip_special_tokens=True).strip()


def answers(text: str, target: str) -> bool:
    """Does a completion give the target as its answer (the completion starts with it)?"""
    return text.strip().lower().startswith(target.strip().lower())


def answer_of(text: str, max_words: int = 3) -> str:
    """The answer part of a free completion: up to the first sentence break, at most a few words
    ("Tokyo.\n\nThe Japanese Alps" -> "Tokyo"); what follows may change without the answer changing."""
    head = re.split(r"[.,;:\n]", text.strip(), maxsplit=1)[0]
    return " ".join(head.split()[:max_words])


def _probes(req: dict[str, Any], unrelated: list[str]) -> list[tuple[str, str]]:
    paraphrases = req.get("paraphrases") or paraphrases_for(req["prompt"])
    return ([("edit", req["prompt"])] + [("paraphrase", p) for p in paraphrases]
            + [("unrelated", p) for p in (req.get("unrelated") or unrelated)])


def run_edit(cfg: Any) -> dict[str, Any]:
    from metaedit.editors.io import load_editor, resolve_editor_dir
    from metaedit.evaluation import editor_overrides

    editor = load_editor(resolve_editor_dir(cfg.editor), force=cfg.force, device=cfg.device, cache_dir=cfg.paths.cache_dir,
                         hparams=editor_overrides(cfg))
    if cfg.requests:
        reqs = read_requests_jsonl(cfg.requests)
    elif cfg.prompt and cfg.target:
        reqs = [{"prompt": cfg.prompt, "target": cfg.target, "paraphrases": list(cfg.paraphrases or []),
                 "subject": cfg.get("subject")}]
    else:
        raise MetaEditError("give prompt=... target=... or requests=<file.jsonl>")
    if cfg.mode not in ("batch", "sequential"):
        raise MetaEditError(f"mode must be batch or sequential, got {cfg.mode!r}")
    unrelated = list(cfg.unrelated or [])
    n_tok = int(cfg.max_new_tokens)
    base = {p: greedy_completion(editor.model, editor, p, n_tok) for r in reqs for _, p in _probes(r, unrelated)}
    for r in reqs:
        # Locate-then-edit methods need the subject; a prompt of a known template names it.
        if not r.get("subject"):
            r["subject"] = subject_for(r["prompt"])
    requests = [EditRequest.coerce(r) for r in reqs]
    report: dict[str, Any] = {"mode": cfg.mode, "n_requests": len(requests), "steps": []}

    def show(edited: EditedModel, upto: int, title: str) -> list[dict[str, Any]]:
        print(f"\n== {title}", flush=True)
        rows = []
        for r in reqs[:upto]:
            for kind, p in _probes(r, unrelated):
                after = greedy_completion(edited, editor, p, n_tok)
                ok = answers(after, r["target"]) if kind != "unrelated" else answer_of(after) == answer_of(base[p])
                rows.append({"kind": kind, "prompt": p, "target": r["target"], "base": base[p], "edited": after, "ok": ok})
                verdict = ("answers target" if ok else "misses target") if kind != "unrelated" else (
                    ("answer unchanged" if after == base[p] else "answer unchanged, continuation differs") if ok
                    else "ANSWER CHANGED")
                print(f"[{kind:10s}] {p!r}\n    base:   {base[p]!r}\n    edited: {after!r}   ({verdict})", flush=True)
        return rows

    if cfg.mode == "batch":
        t0 = time.perf_counter()
        edited = editor.edit(requests)
        edit_ms = (time.perf_counter() - t0) * 1000
        print(f"applied {len(requests)} edit(s) together in {edit_ms:.1f} ms", flush=True)
        report["edit_ms"] = edit_ms
        report["steps"].append(show(edited, len(reqs), "after all edits"))
    else:
        times: list[float] = []
        t_last = [time.perf_counter()]

        def after_each(k: int, current: EditedModel) -> None:
            times.append((time.perf_counter() - t_last[0]) * 1000)
            print(f"\nedit {k + 1}/{len(requests)} took {times[-1]:.1f} ms", flush=True)
            report["steps"].append(show(current, k + 1, f"after edit {k + 1} (this and all earlier edits)"))
            t_last[0] = time.perf_counter()

        edited = editor.edit_sequential(requests, after_each=after_each)
        report["edit_ms"] = times
    if cfg.save_to:
        save = getattr(edited, "save_pretrained", None)
        if save is None:
            raise MetaEditError(f"method {editor.method!r}: its edited model cannot be saved")
        save(str(cfg.save_to), tokenizer=editor.formatter.tokenizer if editor.formatter else None)
        print(f"edited model saved to {cfg.save_to}", flush=True)
    return report
