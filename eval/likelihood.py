"""Held-out perplexity: the diffusion model's ELBO bound next to the parent causal LM's exact value.

    python -m eval.likelihood MODEL_DIR [--blocks 16] [--length 256] [--t-samples 8] [--replicates 2]

Both models score the same held-out tokens (positions 1..L-1 of each block, given BOS; position 0 is
never scored, also for `diffusion.shift=false` exports). Dataset perplexity is exp(mean NLL per token)
(001_*.txt appendix A.1); the bound carries a 95% interval over blocks (it includes the Monte Carlo
noise). The bound is the export's objective estimated by adapt.train.likelihood: each block `--replicates`
times with `--t-samples` draws each, by every method of `--methods` (default: the masked-count estimator,
which gives the reported bound, and stratified t beside it), so the script also reports each estimator's
variance at equal cost (model rows); uniform and antithetic t are the other methods.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from adapt.train.likelihood import METHODS, causal_nll, estimator_variance, replicate_estimates, summarize
from adapt.objectives import ModelForward
from eval.cli import Script, run_script
from eval.heldout import heldout_sequences
from eval.models import EvalContext
from eval.options import ESTIMATOR, count, tokens

NAME = "likelihood"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=count(1), default=16, help="held-out blocks scored")
    parser.add_argument("--length", type=tokens(2), default=256, help="tokens per block (BOS included)")
    parser.add_argument("--t-samples", type=count(1), default=8, help="draws per block per replicate")
    parser.add_argument("--replicates", type=count(2), default=2, help="independent estimates per block")
    parser.add_argument("--methods", nargs="+", default=[ESTIMATOR, "stratified"], choices=METHODS,
                        help="estimators compared; the first gives the reported bound")
    parser.add_argument("--batch-size", type=count(1), default=8)


def parent_bound(ctx: EvalContext, blocks: torch.Tensor, batch_size: int) -> dict:
    """Exact perplexity of the parent on the same tokens (causal attention, next-token logits)."""
    parent = ctx.parent()
    blocked = torch.zeros(parent.get_output_embeddings().weight.shape[0], dtype=torch.bool, device=ctx.device)
    nll = causal_nll(ModelForward(parent, ctx.device), blocks, blocked, batch_size)
    return summarize(nll, blocks.shape[1] - 1).as_dict()


def compare_methods(ctx: EvalContext, blocks: torch.Tensor, args: argparse.Namespace) -> dict[str, dict]:
    """For each method: the bound from all its draws and the variance of its k-draw estimator."""
    objective, forward = ctx.bound_model()
    scored = objective.scored(blocks)
    tokens = scored.sum(1)
    out = {}
    for method in args.methods:  # each reports progress lines with an ETA (adapt.train.likelihood)
        start, calls = time.perf_counter(), forward.calls
        est = replicate_estimates(objective, forward, blocks, scored, args.t_samples, method, args.replicates,
                                  ctx.generator("estimate", NAME, method), args.batch_size)
        bound = summarize(est.mean(1), tokens).as_dict()
        bound.update(t_samples_per_block=args.t_samples * args.replicates, method=method,
                     estimator_variance=estimator_variance(est, tokens), model_calls=forward.calls - calls,
                     seconds=time.perf_counter() - start)
        out[method] = bound
    return out


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    blocks = heldout_sequences(ctx.data, ctx.tokenizer, args.length, args.blocks)
    methods = compare_methods(ctx, blocks, args)
    first = args.methods[0]
    main = methods[first]
    parent = parent_bound(ctx, blocks, args.batch_size)
    variance = {m: r["estimator_variance"] for m, r in methods.items()}
    return {"elbo": main, "parent": parent, "methods": methods,
            "variance": {"per_token_nats2": variance, "t_samples": args.t_samples, "replicates": args.replicates,
                         "blocks": len(blocks),
                         "ratio_to_first": {m: v / variance[first] if variance[first] > 0 else math.nan
                                            for m, v in variance.items()}},
            "gap_nats_per_token": main["nll"] - parent["nll"]}


def summary_lines(result: dict) -> list[str]:
    e, p = result["elbo"], result["parent"]
    lines = [f"diffusion ELBO bound: ppl <= {e['ppl']:.2f} (95% CI {e['ppl_low']:.2f}-{e['ppl_high']:.2f}, "
             f"{e['method']} draws, {e['t_samples_per_block']} per block, {e['tokens']} tokens)",
             f"parent exact:         ppl  = {p['ppl']:.2f} (95% CI {p['ppl_low']:.2f}-{p['ppl_high']:.2f})"]
    for m, v in result["variance"]["per_token_nats2"].items():
        lines.append(f"estimator variance ({m:>10}, {result['variance']['t_samples']} draws/block): "
                     f"{v:.3e} nats^2 per token^2")
    return lines


SCRIPT = Script(NAME, "eval.likelihood", __doc__, add_args, run, summary_lines,
                sequences=lambda args: {"--length": args.length})


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
