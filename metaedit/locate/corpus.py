"""A key-statistics corpus of the base model's own text followed by a dataset's training facts.

C = E[k kᵀ] from text sampled from the model (the default) knows little about the keys of the
sentences edits are about (city names at the start of a prompt, "X is a city in the US state of"):
directions those keys share are rare there, so C⁻¹ inflates them and an update written at one
subject's key reaches its neighbours' keys too. Fact sentences of the *training* split (edit prompts
with their true objects, paraphrases, neighbourhood prompts with their answers — never val/test, so
the evaluation stays held out) put those directions among the preserved ones.

    python -m metaedit.locate.corpus --model smollm2-135m --data data/worldfacts_wide-v3 --out DIR

writes DIR/a_sampled.txt (the sampled corpus the default statistics use, decoded) and
DIR/b_facts.txt (the facts, one per line, deduplicated, shuffled by --seed); an editor reads it with
`stats.corpus=DIR stats.n_tokens=N`: the sampled text comes first, the facts fill the rest up to N.
`--facts-only` writes DIR/b_facts.txt alone, without loading the model (sampling the text takes
minutes on a CPU), for statistics of the fact sentences only (`--model` is then not needed).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from metaedit.data.readers import fact_sentences, training_records
from metaedit.data.records import write_text_atomic
from metaedit.models.fingerprint import fingerprint
from metaedit.models.loading import load_base_model, load_model_config
from metaedit.paths import default_cache_dir

log = logging.getLogger(__name__)


def write_facts(data_dir: Path, out: Path, seed: int = 0) -> list[str]:
    """Write out/b_facts.txt, the training split's fact sentences (no model needed); returns them."""
    sentences = fact_sentences(training_records(data_dir), seed)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "b_facts.txt", "\n".join(sentences))
    return sentences


def write_corpus(model_name: str, data_dir: Path, out: Path, cache: Path, seed: int = 0) -> dict[str, int]:
    """Write the two corpus files; returns their sizes (sentences, sampled chunks, tokens)."""
    from metaedit.locate.stats import StatsSpec, _cached_chunks, corpus_digest

    model, tokenizer = load_base_model(load_model_config(model_name), cache)
    spec = StatsSpec()  # the default statistics' sampled corpus (reused from the cache when there)
    digest, _ = corpus_digest(spec)
    chunks = _cached_chunks(model, tokenizer, spec, cache, fingerprint(model), digest)
    sentences = write_facts(data_dir, out, seed)
    write_text_atomic(out / "a_sampled.txt", "\n\n".join(tokenizer.decode(c) for c in chunks))
    facts_tokens = sum(len(tokenizer(s)["input_ids"]) + 1 for s in sentences)
    return {"sampled_chunks": len(chunks), "sampled_tokens": sum(map(len, chunks)),
            "fact_sentences": len(sentences), "fact_tokens_about": facts_tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model config name, e.g. smollm2-135m (not needed with --facts-only)")
    parser.add_argument("--data", required=True, type=Path, help="built dataset directory (its train.json is read)")
    parser.add_argument("--out", required=True, type=Path, help="corpus directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--facts-only", action="store_true", help="write b_facts.txt only (no model, no sampled text)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.facts_only:
        sentences = write_facts(args.data, args.out, args.seed)
        print(f"wrote {args.out / 'b_facts.txt'}: {len(sentences)} fact sentences")
        return
    if args.model is None:
        parser.error("--model is required (unless --facts-only)")
    sizes = write_corpus(args.model, args.data, args.out, args.cache_dir or Path(default_cache_dir()), args.seed)
    print(f"wrote {args.out}: {sizes}")


if __name__ == "__main__":
    main()
