"""Held-out perplexity: the diffusion model's ELBO bound next to the parent causal LM's exact value.

    python -m eval.likelihood MODEL_DIR [--blocks 16] [--length 256] [--t-samples 8] [--replicates 2]

Both models score the same held-out tokens (positions 1..L-1 of each block, given BOS). Dataset
perplexity is exp(mean NLL per token) (001_*.txt appendix A.1); the bound carries a 95% interval
over blocks (it includes the Monte Carlo noise of t). Each block's bound is estimated `--replicates`
times with `--t-samples` draws of t each, stratified and again with i.i.d. t, so the script also
reports the variance of the two estimators at equal cost (model rows); `--methods` adds
antithetic t or the masked-count estimator (see eval.elbo).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm import tqdm

from adapt.diffusion import maskable_positions
from adapt.likelihood import causal_nll, summarize
from eval.elbo import METHODS, estimator_variance, replicate_estimates
from eval.heldout import heldout_blocks
from eval.models import EvalContext, add_common_args, context_from_args
from eval.results import provenance, write_results

NAME = "likelihood"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks scored")
    parser.add_argument("--length", type=int, default=256, help="tokens per block (BOS included)")
    parser.add_argument("--t-samples", type=int, default=8, help="draws of t per block per replicate")
    parser.add_argument("--replicates", type=int, default=2, help="independent estimates per block (>= 2)")
    parser.add_argument("--methods", nargs="+", default=["stratified", "uniform"], choices=METHODS,
                        help="t sampling methods compared; the first gives the reported bound")
    parser.add_argument("--batch-size", type=int, default=8)


def parent_bound(ctx: EvalContext, blocks: torch.Tensor, batch_size: int) -> dict:
    """Exact perplexity of the parent on the same tokens (causal attention, next-token logits)."""
    parent = ctx.parent()
    blocked = torch.zeros(parent.get_output_embeddings().weight.shape[0], dtype=torch.bool, device=ctx.device)
    nll = causal_nll(lambda x: parent(input_ids=x.to(ctx.device), use_cache=False).logits, blocks, blocked,
                     batch_size)
    return summarize(nll, blocks.shape[1] - 1).as_dict()


def compare_methods(ctx: EvalContext, blocks: torch.Tensor, args: argparse.Namespace) -> dict[str, dict]:
    """For each method: the bound from all its draws and the variance of its k-draw estimator."""
    maskable = maskable_positions(blocks, ctx.meta.shift)
    tokens = maskable.sum(1)
    out = {}
    bar = tqdm(total=args.replicates * len(args.methods), desc="ELBO replicates", unit="rep")
    for i, method in enumerate(args.methods):
        start, nfe0 = time.perf_counter(), ctx.denoiser.nfe
        est = replicate_estimates(ctx.denoiser, blocks, maskable, args.t_samples, method, ctx.meta.eps,
                                  args.replicates, ctx.generator(1, i), args.batch_size, bar)
        bound = summarize(est.mean(1), int(tokens[0])).as_dict()
        bound.update(t_samples_per_block=args.t_samples * args.replicates, method=method,
                     estimator_variance=estimator_variance(est, tokens), model_calls=ctx.denoiser.nfe - nfe0,
                     seconds=time.perf_counter() - start)
        out[method] = bound
    bar.close()
    return out


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    if args.replicates < 2:
        raise SystemExit("error: --replicates must be >= 2 (the estimator's variance needs two estimates)")
    blocks = heldout_blocks(ctx.data, ctx.tokenizer, args.length, args.blocks)
    methods = compare_methods(ctx, blocks, args)
    main = methods[args.methods[0]]
    parent = parent_bound(ctx, blocks, args.batch_size)
    variance = {m: r["estimator_variance"] for m, r in methods.items()}
    first = args.methods[0]
    result = {"elbo": main, "parent": parent, "methods": methods,
              "variance": {"per_token_nats2": variance, "t_samples": args.t_samples, "replicates": args.replicates,
                           "blocks": len(blocks),
                           "ratio_to_first": {m: v / variance[first] if variance[first] > 0 else math.nan
                                              for m, v in variance.items()}},
              "gap_nats_per_token": main["nll"] - parent["nll"]}
    return result


def summary_lines(result: dict) -> list[str]:
    e, p = result["elbo"], result["parent"]
    lines = [f"diffusion ELBO bound: ppl <= {e['ppl']:.2f} (95% CI {e['ppl_low']:.2f}-{e['ppl_high']:.2f}, "
             f"{e['method']} t, {e['t_samples_per_block']} draws/block, {e['tokens']} tokens)",
             f"parent exact:         ppl  = {p['ppl']:.2f} (95% CI {p['ppl_low']:.2f}-{p['ppl_high']:.2f})"]
    for m, v in result["variance"]["per_token_nats2"].items():
        lines.append(f"estimator variance ({m:>10}, {result['variance']['t_samples']} draws/block): {v:.3e} nats^2 per token^2")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.likelihood", description=__doc__.split("\n")[0])
    add_common_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    ctx = context_from_args(args)
    result = run(ctx, args)
    result["provenance"] = provenance(ctx, vars(args))
    path = write_results(args.out_dir, NAME, result)
    print("\n".join(summary_lines(result)) + f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
