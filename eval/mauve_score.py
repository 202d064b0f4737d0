"""MAUVE of prompted samples against the held-out continuations of the same prompts (001_*.txt A.4).

    python -m eval.mauve_score [eval_out/generation_samples.jsonl] [--featurizer gpt2-large] [--seeds 5]

Reads the samples eval.generation wrote (prompt + continuation texts), embeds each text with the
featurizer (last-layer hidden state of its last token, at most `--max-tokens` tokens, as MAUVE does)
and averages MAUVE over `--seeds` k-means seeds (the score moves by a few points with the seed).
Needs the `mauve-text` package and a featurizer loadable without network (gpt2-large by default,
any local causal LM folder with --featurizer); otherwise it writes the reason it skipped. Without a
samples file it reads <out-dir>/generation_samples.jsonl (what eval.suite does); mauve.json goes beside
the samples unless --out-dir says otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.cli import Script, run_script
from eval.options import EvalError, count, text, tokens

NAME = "mauve"
HUMAN = "heldout"


def unavailable(featurizer: str) -> str | None:
    """Why MAUVE cannot run here, or None when it can."""
    try:
        import mauve  # noqa: F401
    except ImportError:
        return "MAUVE skipped: the mauve-text package is not installed (pip install mauve-text)"
    from transformers import AutoConfig

    hint = "pass --featurizer PATH to a local Hugging Face model folder (001 used gpt2-large)"
    if "/" in featurizer and not Path(featurizer).expanduser().exists() and featurizer.count("/") != 1:
        return f"MAUVE skipped: featurizer folder {featurizer} not found; {hint}"
    try:
        AutoConfig.from_pretrained(featurizer, local_files_only=True)
    except (OSError, ValueError):
        return (f"MAUVE skipped: featurizer {featurizer!r} is neither a local folder nor in the local Hugging Face "
                f"cache, and no model hub is reachable; {hint}")
    return None


def read_groups(samples: Path) -> dict[str, list[str]]:
    """label -> 'prompt + continuation' texts of the prompted samples, in prompt order."""
    path = samples / "generation_samples.jsonl" if samples.is_dir() else samples
    groups: dict[str, list[tuple[int, str]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["mode"] != "prompted":
            continue
        label = r.get("source") or f"{r['sampler']} ({r['steps']} steps)"
        groups.setdefault(label, []).append((r["index"], r["prompt"] + r["text"]))
    return {k: [t for _, t in sorted(v)] for k, v in groups.items()}


@torch.no_grad()
def featurize(model, tokenizer, texts: list[str], max_tokens: int) -> np.ndarray:
    """(N, D) float32: the last layer's hidden state at the last token of each text (one text per call)."""
    feats = []
    for sample in texts:
        ids = tokenizer(sample, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
        out = model(input_ids=ids.to(model.device), output_hidden_states=True, use_cache=False)
        feats.append(out.hidden_states[-1][0, -1].float().cpu().numpy())
    return np.stack(feats)


def score(p: np.ndarray, q: np.ndarray, seeds: int) -> tuple[float, float]:
    """Mean and standard deviation of MAUVE(p, q) over k-means seeds."""
    import mauve

    values = [float(mauve.compute_mauve(p_features=p, q_features=q, seed=s, verbose=False).mauve) for s in range(seeds)]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def measure(samples: Path, featurizer: str, seeds: int = 5, max_tokens: int = 100, device: str = "cpu") -> dict:
    """MAUVE of every prompted sample set in `samples` against the held-out one, or {"skipped": why}."""
    reason = unavailable(featurizer)
    if reason:
        return {"skipped": reason}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    groups = read_groups(samples)
    if HUMAN not in groups or len(groups) < 2:
        return {"skipped": f"MAUVE skipped: {samples} holds no prompted samples with held-out references"}
    tokenizer = AutoTokenizer.from_pretrained(featurizer, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(featurizer, local_files_only=True).to(device).eval()
    p = featurize(model, tokenizer, groups[HUMAN], max_tokens)
    rows = []
    for label, texts in tqdm([(k, v) for k, v in groups.items() if k != HUMAN], desc="MAUVE", unit="set"):
        mean, std = score(p, featurize(model, tokenizer, texts, max_tokens), seeds)
        rows.append({"source": label, "mauve": mean, "mauve_std": std, "samples": len(texts)})
    return {"featurizer": featurizer, "seeds": seeds, "max_tokens": max_tokens, "human": len(groups[HUMAN]),
            "rows": rows}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", nargs="?", type=Path, default=None,
                        help="generation_samples.jsonl, or the folder holding it (default: in --out-dir)")
    parser.add_argument("--featurizer", type=text, default="gpt2-large",
                        help="local HF model (name in the HF cache, or a folder)")
    parser.add_argument("--seeds", type=count(1), default=5)
    parser.add_argument("--max-tokens", type=tokens(1), default=100)
    parser.set_defaults(out_dir=None)


def check(args: argparse.Namespace) -> None:
    """Resolve the samples file and the output folder; a samples path that is named but missing is an error."""
    if args.samples is None:
        args.out_dir = args.out_dir or Path("eval_out")
        args.samples = args.out_dir / "generation_samples.jsonl"
        return
    if not args.samples.exists():
        raise EvalError(f"{args.samples} not found; write samples with `python -m eval.generation MODEL_DIR` first")
    args.out_dir = args.out_dir or (args.samples if args.samples.is_dir() else args.samples.parent)


def run(ctx, args: argparse.Namespace) -> dict:
    if not args.samples.exists():
        return {"skipped": f"MAUVE skipped: no generation samples at {args.samples} (run eval.generation first)"}
    return measure(args.samples, args.featurizer, args.seeds, args.max_tokens, args.device)


def summary_lines(result: dict) -> list[str]:
    if "skipped" in result:
        return [result["skipped"]]
    return [f"{r['source']:<28} MAUVE {r['mauve']:.3f} ± {r['mauve_std']:.3f}" for r in result["rows"]]


SCRIPT = Script(NAME, "eval.mauve_score", __doc__, add_args, run, summary_lines, check=check, model=False)


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
