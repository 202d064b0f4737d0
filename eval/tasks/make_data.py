"""Make the local tasks' data from held-out text: cloze.jsonl, choice.jsonl, documents.jsonl.

    python -m eval.tasks.make_data [MODEL_DIR] [--out eval/tasks/data] [--docs 200] [--seed 0]

With MODEL_DIR the held-out split is the one of its training recipe (text the model never saw);
without, the defaults (the embedded Wikipedia extract and tokenizer). Only held-out text is used.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from eval.heldout import HeldoutError, heldout_documents, sentences

DEFAULT_OUT = Path(__file__).resolve().parent / "data"


def cloze_docs(sents: list[str], n: int) -> list[dict]:
    """Sentences whose last word is alphabetic (>= 3 letters): context = the rest, target = ' ' + word."""
    out = []
    for s in sents:
        words = s.rstrip(".!?").split()
        if len(words) >= 6 and words[-1].isalpha() and len(words[-1]) >= 3:
            out.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
    return out[:n]


def choice_docs(sents: list[str], n: int, rng: random.Random) -> list[dict]:
    """Sentence starts (60% of the words) with the true ending and the endings of 3 other sentences."""
    pairs = []
    for s in sents:
        words = s.split()
        if len(words) >= 10:
            cut = int(len(words) * 0.6)
            pairs.append((" ".join(words[:cut]), " ".join(words[cut:])))
    out = []
    for i, (context, ending) in enumerate(pairs[:n]):
        others = [e for j, (_, e) in enumerate(pairs) if j != i and e != ending]
        if len(others) < 3:
            break
        endings = rng.sample(others, 3)
        label = rng.randrange(4)
        endings.insert(label, ending)
        out.append({"context": context, "endings": [" " + e for e in endings], "label": label})
    return out


def document_docs(documents: list[str], n: int, min_words: int = 30) -> list[dict]:
    """Held-out paragraphs of at least `min_words` words."""
    paras = [p.strip() for d in documents for p in d.split("\n")]
    return [{"text": p} for p in paras if len(p.split()) >= min_words][:n]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make(dcfg, tokenizer, out: Path, docs: int = 200, seed: int = 0) -> dict[str, int]:
    """Write the three files under `out`; returns rows per file."""
    documents = heldout_documents(dcfg, tokenizer)
    sents = sentences(documents)
    rows = {"cloze": cloze_docs(sents, docs), "choice": choice_docs(sents, docs, random.Random(seed)),
            "documents": document_docs(documents, docs)}
    empty = [name for name, items in rows.items() if not items]
    if empty:
        raise HeldoutError(f"the held-out text gave no {' or '.join(empty)} examples; hold out more text "
                           f"(data.heldout_sequences) or pass other --data-files")
    for name, items in rows.items():
        write_jsonl(Path(out) / f"{name}.jsonl", items)
    return {k: len(v) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> dict[str, int]:
    from adapt.recipe.config import DataConfig, ModelConfig
    from adapt.model.causal import load_tokenizer
    from eval.cli import user_errors
    from eval.models import data_config
    from eval.options import count, export_check, seed, writable_dir

    parser = argparse.ArgumentParser(prog="python -m eval.tasks.make_data", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=None)
    parser.add_argument("--out", type=writable_dir, default=str(DEFAULT_OUT),
                        help="folder of the three files (checked writable before any work)")
    parser.add_argument("--docs", type=count(1), default=200, help="examples per task (at most)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--data-files", nargs="*", default=None)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    with user_errors():
        if args.model_dir:
            from transformers import AutoTokenizer

            export_check(args.model_dir)
            tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
            dcfg = data_config(args.model_dir, args.data_files, args.cache_dir)
        else:
            tokenizer = load_tokenizer(ModelConfig())
            dcfg = DataConfig(train_files=args.data_files or [], cache_dir=args.cache_dir or DataConfig().cache_dir)
        counts = make(dcfg, tokenizer, args.out, args.docs, args.seed)
    print(f"wrote {', '.join(f'{n} {k}' for k, n in counts.items())} examples to {args.out}")
    return counts


if __name__ == "__main__":
    main()
