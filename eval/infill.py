"""Infilling held-out spans: the diffusion model sees both sides, the parent only the left one.

    python -m eval.infill MODEL_DIR [--spans 32] [--left 24] [--span-length 8] [--right 24]

Each example is a held-out block `[BOS + left context | span | right context]`; the span is masked
and filled by each sampler (given positions never change; SEDD Algorithm 3), while the parent
causal LM continues the left context for the span's length (its natural ability). Greedy by default
(temperature 0). Reported per method: exact match of the whole span, token accuracy, the judge's
perplexity of the fill given the left context, and of the right context given left context + fill
(does the fill join the text that follows?). The true span is scored the same way as a reference.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from eval.cli import Script, run_script
from eval.heldout import heldout_sequences
from eval.models import EvalContext, diffusion_sample, parent_sample
from eval.options import add_samplers, count, non_negative, tokens

NAME = "infill"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spans", type=count(1), default=32, help="held-out examples")
    parser.add_argument("--left", type=tokens(1), default=24, help="left context tokens (BOS included)")
    parser.add_argument("--span-length", type=tokens(1), default=8, help="masked tokens to fill")
    parser.add_argument("--right", type=tokens(0), default=24, help="right context tokens")
    add_samplers(parser, ["ancestral", "confidence"])
    parser.add_argument("--steps", type=count(0), default=0, help="sampling steps (0 = one per span token)")
    parser.add_argument("--temperature", type=non_negative, default=0.0, help="0 = greedy")
    parser.add_argument("--batch-size", type=count(1), default=8)


def span_metrics(fill: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Exact match of whole spans and token accuracy; fill, truth (N, S) long."""
    same = fill == truth
    return {"exact_match": float(same.all(1).double().mean()), "token_accuracy": float(same.double().mean())}


def judge_scores(ctx: EvalContext, blocks: torch.Tensor, fill: torch.Tensor, args: argparse.Namespace) -> dict:
    """Judge perplexity of the fill given the left context and of the right context given left + fill."""
    left, right = blocks[:, :args.left], blocks[:, args.left + args.span_length:]
    judge = ctx.judge()
    out = {"fill_ppl": judge.perplexity(left.tolist(), fill.tolist(), args.batch_size)}
    if right.shape[1]:
        out["right_ppl"] = judge.perplexity(torch.cat([left, fill], 1).tolist(), right.tolist(), args.batch_size)
    return out


def diffusion_fill(ctx: EvalContext, blocks: torch.Tensor, sampler: str,
                   args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """Mask the span of each block and fill it -> ((N, S) fill, cost)."""
    lo, hi = args.left, args.left + args.span_length
    x = blocks.clone()
    x[:, lo:hi] = ctx.meta.mask_token_id
    steps = args.steps or args.span_length
    outs, nfe, start, gen = [], 0, time.perf_counter(), ctx.generator("sample", NAME, sampler)
    for i in range(0, len(x), args.batch_size):
        ids, calls = diffusion_sample(ctx, x[i:i + args.batch_size], sampler, steps, gen, temperature=args.temperature)
        outs.append(ids[:, lo:hi])
        nfe += calls
    return torch.cat(outs), {"steps": steps, "nfe": nfe, "seconds": time.perf_counter() - start}


def parent_fill(ctx: EvalContext, blocks: torch.Tensor, args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """The parent continues each left context for the span's length -> ((N, S) fill, cost)."""
    start = time.perf_counter()
    outs = [parent_sample(ctx.parent(), blocks[i:i + args.batch_size, :args.left], args.span_length,
                          ctx.seed_for("sample", NAME, "parent", i), temperature=args.temperature)[:, args.left:]
            for i in range(0, len(blocks), args.batch_size)]
    return torch.cat(outs), {"seconds": time.perf_counter() - start}


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    blocks = heldout_sequences(ctx.data, ctx.tokenizer, args.left + args.span_length + args.right, args.spans)
    truth = blocks[:, args.left:args.left + args.span_length]
    rows = [{"method": "truth", **span_metrics(truth, truth), **judge_scores(ctx, blocks, truth, args)}]
    for sampler in tqdm(args.samplers + ["parent"], desc="infill", unit="method"):
        fill, cost = (parent_fill(ctx, blocks, args) if sampler == "parent"
                      else diffusion_fill(ctx, blocks, sampler, args))
        rows.append({"method": sampler if sampler != "parent" else "parent (left context only)", **cost,
                     **span_metrics(fill, truth), **judge_scores(ctx, blocks, fill, args),
                     "examples": [{"left": ctx.tokenizer.decode(blocks[j, 1:args.left]),
                                   "fill": ctx.tokenizer.decode(fill[j]), "truth": ctx.tokenizer.decode(truth[j])}
                                  for j in range(min(2, len(blocks)))]})
    return {"rows": rows, "examples": len(blocks), "span_length": args.span_length,
            "left": args.left, "right": args.right}


def summary_lines(result: dict) -> list[str]:
    lines = []
    for row in result["rows"]:
        right = row.get("right_ppl", {}).get("ppl", float("nan"))
        lines.append(f"{row['method']:<28} exact {row['exact_match']:.3f}  token acc {row['token_accuracy']:.3f}  "
                     f"fill ppl {row['fill_ppl']['ppl']:9.2f}  right-context ppl {right:9.2f}")
    return lines


SCRIPT = Script(NAME, "eval.infill", __doc__, add_args, run, summary_lines,
                sequences=lambda args: {"--left + --span-length + --right": args.left + args.span_length + args.right})


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
