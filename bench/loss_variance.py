"""Variance of the training loss under the noise levers, at equal forwards, on one model and one data stream.

    python bench/loss_variance.py [--model EXPORT_OR_CAUSAL_LM] [--block-length 4] [--clean-attention causal]
                                  [--levers base tclip perblock complementary ...] [--draws 24] [--batch 4]

Each draw is one training batch as a step sees it: `--batch` sequences drawn from a pool of held-out blocks
(the same sequences for every lever at a given draw, so the levers are paired), noised by the objective with the
lever on, the training loss (sum over masked tokens of -log p / t over the normaliser) of one forward without a
gradient. The spread over draws is the step's loss noise, data and masks together; its mean is the training
loss the lever optimises (a clipped range of t is not the whole bound, so its mean differs); `--fixed-data` keeps
the same sequences in every draw, so the spread is the noise's alone. Levers:
base (one t per sequence, stratified), tclip (t in [--t-min, --t-max], BD3-LM's clipped schedule), perblock (one
t per block, stratified over the batch's blocks), complementary (half the sequences, each twice with complementary
masks, Fast-dLLM v2), and '+' combinations. Writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapt.train import rng  # noqa: E402
from adapt.recipe.config import DataConfig  # noqa: E402
from adapt.data.corpus import build_sequences  # noqa: E402
from adapt.model.causal import set_causal  # noqa: E402
from adapt.objectives import Attention, ModelForward, make  # noqa: E402
from bench.block_length import load_scored  # noqa: E402

LEVERS = ("base", "tclip", "perblock", "complementary")


def lever_options(name: str, t_min: float, t_max: float) -> dict:
    """The objective's keyword arguments of a lever name such as `tclip+perblock`."""
    parts, out = name.split("+"), {}
    unknown = [p for p in parts if p not in LEVERS]
    if unknown:
        raise ValueError(f"unknown lever {unknown[0]!r}; choose from {', '.join(LEVERS)} (joined by '+')")
    if "tclip" in parts:
        out["t_range"] = (t_min, t_max)
    if "perblock" in parts:
        out["t_per_block"] = True
    if "complementary" in parts:
        out["complementary"] = True
    return out


@torch.no_grad()
def losses(model, meta, blocked, pool: torch.Tensor, args, options: dict) -> list[float]:
    """The training loss of `--draws` batches under one lever."""
    obj = make(args.block_length, meta.mask_token_id, True, blocked, clean_attention=args.clean_attention, **options)
    forward, out = ModelForward(model, "cpu"), []
    for d in range(args.draws):
        pick = torch.arange(args.batch) if args.fixed_data else torch.randperm(
            len(pool), generator=rng.generator(0, "estimate", d))[: args.batch]
        idx = obj.batch_rows(pick)
        x0 = pool[idx]
        maskable = obj.maskable(x0)
        noised = obj.corrupt(x0, maskable, rng.generator(0, "noise", d))
        logits = obj.predict(forward, x0, noised, Attention())
        out.append(float(obj.loss_sum(logits, x0, noised)) / obj.normaliser(maskable, noised.masked))
    return out


def summary(values: list[float], base: list[float] | None, seconds: float) -> dict:
    """Mean and variance of a lever's losses; with the base lever's (paired by draw), the variance ratio and its
    95% bootstrap interval (draws resampled together, 2000 times)."""
    v = torch.tensor(values, dtype=torch.float64)
    out = {"mean": float(v.mean()), "var": float(v.var()), "draws": len(v), "seconds": seconds}
    if base is not None:
        w = torch.tensor(base, dtype=torch.float64)
        idx = torch.randint(0, len(v), (2000, len(v)), generator=torch.Generator().manual_seed(0))
        ratios = (v[idx].var(dim=1) / w[idx].var(dim=1)).sort().values
        out |= {"var_ratio": out["var"] / float(w.var()), "var_ratio_ci95": [float(ratios[49]), float(ratios[1949])]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--block-length", type=int, default=4, help="0 = the whole-sequence objective")
    ap.add_argument("--clean-attention", choices=("block", "causal"), default="causal")
    ap.add_argument("--levers", nargs="+", help="the first is the baseline of the ratios (base by default)",
                    default=["base", "tclip", "perblock", "complementary", "perblock+complementary"])
    ap.add_argument("--t-min", type=float, default=0.45)
    ap.add_argument("--t-max", type=float, default=0.95)
    ap.add_argument("--draws", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pool", type=int, default=16, help="held-out blocks the batches are drawn from")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--fixed-data", action="store_true",
                    help="the same sequences in every draw: the spread is the masks' alone")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    try:
        options = {name: lever_options(name, args.t_min, args.t_max) for name in args.levers}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    b = args.block_length
    if b < 0 or (b and args.length % b) or args.draws < 2 or args.batch < 2 or args.batch % 2 \
            or args.pool < args.batch or not 0 <= args.t_min < args.t_max <= 1:
        print(f"error: --block-length must divide --length {args.length} (0 = the whole sequence); --draws >= 2; "
              f"--batch even and <= --pool; 0 <= --t-min < --t-max <= 1", file=sys.stderr)
        return 2
    tok, model, meta, blocked = load_scored(args.model)
    set_causal(model, False)
    pool = build_sequences(DataConfig(seq_length=args.length, heldout_sequences=args.pool), tok).heldout
    result, raw = {"args": vars(args), "levers": {}}, {}
    for name, opts in options.items():
        tic = time.perf_counter()
        raw[name] = losses(model, meta, blocked, pool, args, opts)
        base = raw[args.levers[0]] if name != args.levers[0] else None
        result["levers"][name] = summary(raw[name], base, time.perf_counter() - tic)
    for name, row in result["levers"].items():
        ratio = (f"  var/base {row['var_ratio']:.3f} "
                 f"(95% {row['var_ratio_ci95'][0]:.3f}-{row['var_ratio_ci95'][1]:.3f})"
                 if "var_ratio" in row else "")
        print(f"{name:24s} mean {row['mean']:.4f}  var {row['var']:.5f}{ratio}  {row['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
