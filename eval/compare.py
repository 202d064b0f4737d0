"""Paired held-out bound of several exports: same blocks, same masks, the differences with their intervals.

    python -m eval.compare MODEL_A MODEL_B [MODEL_C ...] [--blocks 16] [--length 256] [--t-samples 8]

For exports of one parent trained by different recipes (say the random and the window annealing
schedules). Held-out blocks come from the first model's recipe. The masks are drawn once
(adapt.train.likelihood.draw_masks, `--method`, the masked-count estimator by default; stratified t uses the
first model's eps) and every model is scored on those same masks, so most of the Monte Carlo noise
cancels in the per-block difference, and the 95% interval of a difference (over blocks) is much
narrower than the intervals of the two bounds. The first model is loaded once (the common arguments),
the others one at a time. Writes <out-dir>/compare.json.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from adapt import objectives
from adapt.export import load_diffusion_model
from adapt.objectives.diffusion import blocked_vocab
from adapt.train.likelihood import METHODS, draw_masks, summarize
from adapt.objectives import Attention, ModelForward
from eval.cli import Script, run_script
from eval.heldout import heldout_sequences
from eval.models import EvalContext
from eval.options import ESTIMATOR, EvalError, count, export_check, tokens

NAME = "compare"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("others", nargs="+", type=Path, metavar="MODEL",
                        help="exported folders compared with MODEL_DIR (one or more)")
    parser.add_argument("--blocks", type=count(2), default=16)
    parser.add_argument("--length", type=tokens(2), default=256)
    parser.add_argument("--t-samples", type=count(1), default=8, help="draws per block, shared by all models")
    parser.add_argument("--method", default=ESTIMATOR, choices=METHODS)
    parser.add_argument("--batch-size", type=count(1), default=8)


def check(args: argparse.Namespace) -> None:
    for path in args.others:
        export_check(path)


def paired(a: torch.Tensor, b: torch.Tensor, tokens: torch.Tensor | int) -> dict:
    """Per-token difference b - a of two (N,) per-block bounds (nats): mean, 95% half-width, ppl ratio."""
    est = summarize(b - a, tokens)
    mean, half = est.nll_per_token, est.ci95
    return {"nll_diff": mean, "ci95": half, "ppl_ratio": math.exp(mean), "ppl_ratio_low": math.exp(mean - half),
            "ppl_ratio_high": math.exp(mean + half)}


def bounds_on(objective, forward, x0: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor,
              batch_size: int) -> torch.Tensor:
    """(N,) per-block bound (nats) of one model on given draws: x0 (N, L), masked (N*k, L), weight (N*k,)."""
    k = len(masked) // len(x0)
    reps = x0.repeat_interleave(k, dim=0)
    sums = torch.zeros(len(reps), dtype=torch.float64)
    for i in range(0, len(reps), batch_size):
        rows = slice(i, i + batch_size)
        sums[rows] = objective.nll_sums(forward, reps[rows], masked[rows], Attention())[:, 0]
    return (weight * sums).view(len(x0), k).mean(1)


def _signature(tokenizer, meta) -> tuple:
    return meta.mask_token_id, len(tokenizer), meta.shift


def other_bounds(ctx: EvalContext, model_dir: Path, x0: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor,
                 args: argparse.Namespace) -> torch.Tensor:
    """(N,) per-block bound of another export on the shared draws (loaded here, freed after)."""
    model, tokenizer, meta = load_diffusion_model(model_dir, dtype=args.dtype, device=args.device)
    mine, first = _signature(tokenizer, meta), _signature(ctx.tokenizer, ctx.meta)
    if mine != first:
        raise EvalError(f"{model_dir} does not share the first model's tokenizer (mask id, vocabulary size, shift "
                        f"{mine} vs {first}); compare exports of the same parent")
    rows = model.get_output_embeddings().weight.shape[0]
    blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id, ctx.device)
    backend = getattr(model.config, "_attn_implementation", None) or "sdpa"
    objective = objectives.for_meta(meta, blocked, backend, args.dtype)
    return bounds_on(objective, ModelForward(model, ctx.device), x0, masked, weight, args.batch_size)


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    blocks = heldout_sequences(ctx.data, ctx.tokenizer, args.length, args.blocks)
    objective, forward = ctx.bound_model()
    scored = objective.scored(blocks)
    tokens = scored.sum(1)
    masked, weight = draw_masks(scored, args.t_samples, args.method, ctx.meta.eps, ctx.generator("estimate", NAME))
    models = [args.model_dir, *args.others]
    bounds, rows = [], []
    for i, model_dir in enumerate(tqdm(models, desc="models", unit="model")):
        start = time.perf_counter()
        per_block = (bounds_on(objective, forward, blocks, masked, weight, args.batch_size) if i == 0
                     else other_bounds(ctx, model_dir, blocks, masked, weight, args))
        bounds.append(per_block)
        rows.append({"model": str(model_dir), **summarize(per_block, tokens).as_dict(),
                     "seconds": time.perf_counter() - start, "per_block_nats": per_block.tolist()})
    diffs = [{"model": row["model"], "vs": str(models[0]), **paired(bounds[0], b, tokens)}
             for row, b in zip(rows[1:], bounds[1:])]
    return {"bounds": rows, "differences": diffs, "blocks": len(blocks), "tokens_per_block": int(tokens[0]),
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


SCRIPT = Script(NAME, "eval.compare", __doc__, add_args, run, summary_lines, check=check,
                sequences=lambda args: {"--length": args.length})


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
