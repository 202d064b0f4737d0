"""Adaptation step vs plain causal-LM fine-tuning step: tokens/s and peak memory, one run.

    python bench/adapt_step.py [--model embedded:smollm2-135m-instruct] [--batch 4] [--length 256]
                               [--dtype bf16] [--attn sdpa] [--steps 5] [--device cpu|cuda] [--json OUT]

Each variant runs in its own process (same model, batch, dtype, attention backend, DeepSpeed engine):
  causal         HF causal LM loss on the parent (labels=input_ids), the baseline
  anneal         adapt.train.loop.train_step at anneal ratio r = 0.5 (a random 4D mask each step)
  bidirectional  adapt.train.loop.train_step after annealing (no mask tensor)
  block          adapt.train.loop.train_step of block diffusion (--block-length; [x_t | x_0], 2L positions under the
                 block mask), its tokens/s counted over L tokens per sequence like the others
  ar             the bidirectional step with the joint causal term (diffusion.ar_loss_weight=0.3: a second,
                 causal forward of the clean sequences), also reported against `bidirectional`
  kd             the bidirectional step with distillation from the parent at every masked position (the
                 whole-sequence recipe's term; a frozen copy of the parent: one more forward of L positions without
                 gradient); reported against `bidirectional`
  blockar        the block step with the joint causal term: with --clean-attention causal (the default, the block
                 recipe's) read from the same 2L forward's clean rows; reported against `block`
  blockkd        the block step with distillation from the parent at every masked position (a frozen copy of the
                 parent: one more forward of L positions without gradient); reported against `block`
  blockopd       the same taught on policy (diffusion.distill.onpolicy=1: the parent scores the model's drafts in
                 a forward of 2L positions without gradient); reported against `block`
`--only` runs a subset (`causal` is always run: it is every ratio's baseline).
Peak memory is torch.cuda.max_memory_allocated on GPU; on CPU it is the peak resident set size
sampled every 2 ms during the timed steps. Ratios are against `causal` from the same run.
`--in-process` runs the variants one after another in this process instead (a quick check that
the benchmark runs, e.g. on a tiny model folder: its peak memory then includes the earlier variants').
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("causal", "anneal", "bidirectional", "block", "ar", "kd", "blockar", "blockkd", "blockopd")
BLOCK = ("block", "blockar", "blockkd", "blockopd")
DISTILL = ["diffusion.distill.weight=1", "diffusion.distill.teacher=parent", "diffusion.distill.positions=masked"]
AR_WEIGHT = 0.3
"""diffusion.ar_loss_weight of the `ar` variant."""


class PeakRSS:
    """Samples this process's resident set size in a thread; .peak in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _state(args):
    import torch

    from adapt.train import distributed
    from adapt.recipe.load import load_config
    from adapt import objectives
    from adapt.data.corpus import Sequences
    from adapt.objectives.diffusion import blocked_vocab
    from adapt.train.metrics import MetricsLog
    from adapt.model.causal import add_mask_token, load_causal_lm, load_tokenizer, set_causal
    from adapt.train.teacher import ParentTeacher
    from adapt.train.optim import build_optimizer, lr_lambda
    from adapt.train.loop import State

    block = [f"diffusion.block.length={args.block_length}", "attention.anneal_steps=0",
             f"diffusion.block.clean_attention={args.clean_attention}"] \
        if args.variant in BLOCK else ["attention.anneal_steps=2"]
    if args.variant in ("ar", "blockar"):
        block.append(f"diffusion.ar_loss_weight={AR_WEIGHT}")
    if args.variant in ("kd", "blockkd", "blockopd"):
        block += DISTILL + (["diffusion.distill.onpolicy=1"] if args.variant == "blockopd" else [])
    cfg = load_config(None, [f"model.name_or_path={args.model}", f"model.dtype={args.dtype}",
                             f"model.attn_implementation={args.attn}", f"data.seq_length={args.length}",
                             f"train.micro_batch_size={args.batch}", "dist.zero_stage=0",
                             "optim.warmup_steps=0", "optim.grad_clip=1.0", *block,
                             f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}"])
    distributed.init()
    tok, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model)
    meta = add_mask_token(model, tok, cfg.model)
    set_causal(model, args.variant == "causal")
    teacher = ParentTeacher.build(cfg, model, distributed.device())  # the parent's frozen copy, or None
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine = distributed.initialize(model, opt, sched, distributed.ds_config(cfg))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, meta.real_vocab_size - 1, (64, args.length), generator=gen)
    blocks = Sequences(ids, torch.zeros_like(ids), ids[:1], ids[:1])
    rows = model.get_output_embeddings().weight.shape[0]
    blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id, device=distributed.device())
    return State(cfg, engine, tok, meta, blocks, objectives.from_config(cfg, meta, blocked),
                 MetricsLog(Path("."), False, False), teacher)


def _causal_step(state, step: int) -> None:
    from adapt.train import distributed
    from adapt.data.corpus import batch_indices

    m = state.cfg.train.micro_batch_size
    x = state.data.train[batch_indices(step, len(state.data.train), m, 0, 1, 0)].to(distributed.device())
    loss = state.engine(input_ids=x, labels=x, use_cache=False).loss
    state.engine.backward(loss)
    state.engine.step()


def run_variant(args) -> dict:
    """Time `args.steps` steps of one variant after two warm-up steps (in this process)."""
    import torch

    from adapt.train.loop import train_step

    state = _state(args)
    # anneal: steps 1 of anneal_steps=2 -> r = 0.5; bidirectional: step >= 2 -> r = 1
    first = {"causal": 0, "anneal": 1}.get(args.variant, 2)
    step = (lambda s: _causal_step(state, s)) if args.variant == "causal" else (
        lambda s: train_step(state, first if args.variant == "anneal" else first + s))  # block: anneal_steps=0
    cuda = args.device == "cuda"
    for s in range(2):
        step(s)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        tic = time.perf_counter()
        for s in range(args.steps):
            step(s + 2)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    return {"variant": args.variant, "tokens_per_s": args.steps * args.batch * args.length / seconds,
            "step_seconds": seconds / args.steps, "peak_bytes": peak}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="a model source (or an HF folder)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--block-length", type=int, default=8, help="block length of the block variant")
    p.add_argument("--clean-attention", choices=("block", "causal"), default="causal",
                   help="the block variants' clean stream")
    p.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="run these variants")
    p.add_argument("--in-process", action="store_true", help="run the variants in this process (a quick check)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if min(args.batch, args.length, args.steps) < 1:
        p.error("--batch, --length and --steps must be >= 1")
    return args


def run_subprocess(variant: str, argv: list[str]) -> dict:
    """One variant in a fresh process (so its peak memory is its own)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def _targets(args, results: dict) -> None:
    """The step targets and the joint term's cost, for the variants that ran."""
    b, d, a, j, k, o, w = (results.get(v) for v in ("block", "bidirectional", "ar", "blockar", "blockkd", "blockopd",
                                                    "kd"))
    if d:
        print(f"target: bidirectional >= 0.95x speed and <= 1.10x memory: {d['speed_ratio']:.3f}x, "
              f"{d['memory_ratio']:.3f}x")
    if b:
        print(f"target: block (b={args.block_length}, {args.clean_attention} clean stream) >= 0.45x speed and <= 2.2x "
              f"memory: {b['speed_ratio']:.3f}x, {b['memory_ratio']:.3f}x")
    for joint, plain, name in ((a, d, "bidirectional"), (j, b, "block")):
        if joint and plain:
            print(f"joint causal term (alpha={AR_WEIGHT}) vs {name}: "
                  f"{plain['tokens_per_s'] / joint['tokens_per_s']:.3f}x "
                  f"the time per step, {joint['peak_bytes'] / plain['peak_bytes']:.3f}x the peak memory")
    for term, plain, name in ((k, b, "distillation from the parent vs block"),
                              (o, b, "on-policy distillation from the parent vs block"),
                              (w, d, "distillation from the parent vs bidirectional")):
        if term and plain:
            print(f"{name}: {plain['tokens_per_s'] / term['tokens_per_s']:.3f}x the time per step, "
                  f"{term['peak_bytes'] / plain['peak_bytes']:.3f}x the peak memory; against causal: "
                  f"{term['speed_ratio']:.3f}x speed, {term['memory_ratio']:.3f}x memory (target >= 0.45x, <= 2.2x)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    results = {}
    for variant in [v for v in VARIANTS if v == "causal" or v in args.only]:
        results[variant] = (run_variant(argparse.Namespace(**{**vars(args), "variant": variant})) if args.in_process
                            else run_subprocess(variant, argv))
    base = results["causal"]
    print(f"model {args.model} | batch {args.batch}x{args.length} | {args.dtype} | {args.attn} | {args.device}")
    print(f"{'variant':<14}{'tokens/s':>10}{'s/step':>9}{'peak MiB':>10}{'speed x':>9}{'memory x':>10}")
    for name, r in results.items():
        r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        print(f"{name:<14}{r['tokens_per_s']:>10.0f}{r['step_seconds']:>9.2f}{r['peak_bytes'] / 2**20:>10.0f}"
              f"{r['speed_ratio']:>9.3f}{r['memory_ratio']:>10.3f}")
    _targets(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
