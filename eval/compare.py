"""Paired held-out bound of several exports: same blocks, same masks, the differences with their intervals.

    python -m eval.compare MODEL_A MODEL_B [MODEL_C ...] [--blocks 16] [--length 256] [--t-samples 8]

For exports of one parent trained by different recipes (say the random and the window annealing
schedules). Held-out blocks come from the first model's recipe; every model is scored on the same
(t, mask) draws, so most of the Monte Carlo noise cancels in the per-block difference, and the 95%
interval of a difference (over blocks) is much narrower than the intervals of the two bounds. Models
are loaded one at a time. Writes <out-dir>/compare.json.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from adapt.checkpoint import load_diffusion_model
from adapt.denoiser import Denoiser
from adapt.diffusion import maskable_positions
from adapt.likelihood import summarize
from adapt.model import DiffusionMeta
from eval.elbo import METHODS, draw_masks, masked_nll_sums
from eval.heldout import heldout_blocks
from eval.models import data_config
from eval.results import machine, write_results

NAME = "compare"


def paired(a: torch.Tensor, b: torch.Tensor, tokens: int) -> dict:
    """Per-token difference b - a of two (N,) per-block bounds (nats): mean, 95% half-width, ppl ratio."""
    est = summarize(b - a, tokens)
    mean, half = est.nll_per_token, est.ci95
    return {"nll_diff": mean, "ci95": half, "ppl_ratio": math.exp(mean), "ppl_ratio_low": math.exp(mean - half),
            "ppl_ratio_high": math.exp(mean + half)}


def score(model_dir: Path, x0: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, k: int,
          args: argparse.Namespace, reference: tuple | None) -> tuple[torch.Tensor, tuple]:
    """(N,) per-block bound of one export on the shared draws, and its (mask id, vocabulary) signature."""
    model, tokenizer, meta = load_diffusion_model(model_dir, dtype=args.dtype, device=args.device)
    signature = (meta.mask_token_id, len(tokenizer), meta.shift)
    if reference is not None and signature != reference:
        raise SystemExit(f"error: {model_dir} does not share the first model's tokenizer (mask id, vocabulary "
                         f"size, shift {signature} vs {reference}); compare exports of the same parent")
    sums = masked_nll_sums(Denoiser(model, meta), x0.repeat_interleave(k, dim=0), masked, args.batch_size)
    del model
    return (weight * sums).view(len(x0), k).mean(1), signature


def run(args: argparse.Namespace) -> dict:
    first = args.models[0]
    meta, tokenizer = DiffusionMeta.load(first), AutoTokenizer.from_pretrained(first)  # weights load in score()
    dcfg = data_config(first, args.data_files, args.cache_dir)
    blocks = heldout_blocks(dcfg, tokenizer, args.length, args.blocks)
    maskable = maskable_positions(blocks, meta.shift)
    tokens = int(maskable[0].sum())
    generator = torch.Generator().manual_seed(args.seed)
    masked, weight = draw_masks(maskable, args.t_samples, args.method, meta.eps, generator)
    bounds, reference, rows = [], None, []
    for model_dir in tqdm(args.models, desc="models", unit="model"):
        start = time.perf_counter()
        per_block, reference = score(Path(model_dir), blocks, masked, weight, args.t_samples, args, reference)
        bounds.append(per_block)
        rows.append({"model": str(model_dir), **summarize(per_block, tokens).as_dict(),
                     "seconds": time.perf_counter() - start, "per_block_nats": per_block.tolist()})
    diffs = [{"model": row["model"], "vs": str(first), **paired(bounds[0], b, tokens)}
             for row, b in zip(rows[1:], bounds[1:])]
    return {"bounds": rows, "differences": diffs, "blocks": len(blocks), "tokens_per_block": tokens,
            "method": args.method, "t_samples": args.t_samples, "seed": args.seed}


def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['blocks']} held-out blocks x {result['tokens_per_block']} tokens, {result['t_samples']} "
             f"{result['method']} draws per block, the same draws for every model"]
    for row in result["bounds"]:
        lines.append(f"  ppl <= {row['ppl']:8.2f} (95% CI {row['ppl_low']:.2f}-{row['ppl_high']:.2f})  {row['model']}")
    for d in result["differences"]:
        lines.append(f"  {d['model']} / {d['vs']}: bound ratio {d['ppl_ratio']:.4f} (95% CI {d['ppl_ratio_low']:.4f}-"
                     f"{d['ppl_ratio_high']:.4f}); {d['nll_diff']:+.4f} nats per token")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="exported diffusion model folders (two or more)")
    parser.add_argument("--out-dir", type=Path, default=Path("eval_out"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-files", nargs="*", default=None, help="text/jsonl files to hold out from")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--t-samples", type=int, default=8, help="draws per block, shared by all models")
    parser.add_argument("--method", default="stratified", choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give two or more exported folders to compare")
    missing = [str(m) for m in args.models if not (m / "diffusion.json").is_file()]
    if missing:
        parser.error(f"not an exported diffusion model (no diffusion.json): {', '.join(missing)}; "
                     f"export a run with `python -m adapt.export`")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    result["provenance"] = {"options": vars(args), "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = write_results(args.out_dir, NAME, result)
    print("\n".join(summary_lines(result)) + f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
