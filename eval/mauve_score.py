"""MAUVE of prompted samples against the held-out continuations of the same prompts (001_*.txt A.4).

    python -m eval.mauve_score eval_out/generation_samples.jsonl [--featurizer gpt2-large] [--seeds 5]

Reads the samples eval.generation wrote (prompt + continuation texts), embeds each text with the
featurizer (last-layer hidden state of its last token, at most `--max-tokens` tokens, as MAUVE does)
and averages MAUVE over `--seeds` k-means seeds (the score moves by a few points with the seed).
Needs the `mauve-text` package and a featurizer loadable without network (gpt2-large by default,
any local causal LM folder with --featurizer); otherwise it writes the reason it skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.results import machine, write_results

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
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
        out = model(input_ids=ids.to(model.device), output_hidden_states=True, use_cache=False)
        feats.append(out.hidden_states[-1][0, -1].float().cpu().numpy())
    return np.stack(feats)


def score(p: np.ndarray, q: np.ndarray, seeds: int) -> tuple[float, float]:
    """Mean and standard deviation of MAUVE(p, q) over k-means seeds."""
    import mauve

    values = [float(mauve.compute_mauve(p_features=p, q_features=q, seed=s, verbose=False).mauve) for s in range(seeds)]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(samples: Path, featurizer: str, seeds: int = 5, max_tokens: int = 100, device: str = "cpu") -> dict:
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.mauve_score", description=__doc__.split("\n")[0])
    parser.add_argument("samples", type=Path, help="generation_samples.jsonl, or the folder holding it")
    parser.add_argument("--featurizer", default="gpt2-large", help="local HF model (name in the HF cache, or a folder)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the samples' folder")
    args = parser.parse_args(argv)
    result = run(args.samples, args.featurizer, args.seeds, args.max_tokens, args.device)
    result["machine"] = machine()
    out = args.out_dir or (args.samples if args.samples.is_dir() else args.samples.parent)
    path = write_results(out, NAME, result)
    print(result.get("skipped") or "\n".join(f"{r['source']:<28} MAUVE {r['mauve']:.3f} ± {r['mauve_std']:.3f}"
                                             for r in result["rows"]))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
