"""Sampling speed: latency and tokens/s of each sampler vs the parent with KV cache, by output length.

    python -m eval.speed MODEL_DIR [--samplers ancestral confidence] [--steps 16 64] [--lengths 32 64 128]

Same prompt (the first `--prompt-length` tokens of a held-out block), same batch, same machine, same
run; the parent draws with Hugging Face `generate` and its KV cache (001_*.txt section 5.3).
Latency is the median of `--repeats` timed runs after one untimed warm-up call of each model.
`--steps 0` means one step per generated token. Writes speed.json and speed.png.
On a CPU shared with other jobs use `--threads 1`: with 2 threads under a load of 4 the same
32-token parent generation took anywhere from 1.1 to 29 s, with 1 thread a steady 1.8 s.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from eval.cli import Script, run_script
from eval.heldout import heldout_sequences
from eval.models import EvalContext, diffusion_sample, parent_sample
from eval.options import add_samplers, count, tokens
from eval.plots import speed_plot

NAME = "speed"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_samplers(parser, ["ancestral", "euler", "analytic", "confidence", "threshold"])
    parser.add_argument("--steps", nargs="+", type=count(0), default=[16, 64], help="0 = one step per token")
    parser.add_argument("--lengths", nargs="+", type=tokens(1), default=[32, 64, 128], help="generated tokens")
    parser.add_argument("--prompt-length", type=tokens(1), default=16, help="prompt tokens (BOS included)")
    parser.add_argument("--batch-size", type=count(1), default=1)
    parser.add_argument("--repeats", type=count(1), default=3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[list[float], object]:
    """Wall-clock seconds of `repeats` calls of fn() (device synchronised) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def _row(method: str, length: int, batch: int, times: list[float], nfe: float, **extra) -> dict:
    latency = statistics.median(times)
    return {"method": method, "length": length, "batch": batch, "latency_s": latency, "latency_s_all": times,
            "tokens_per_s": batch * length / latency, "nfe": nfe, **extra}


def measure_length(ctx: EvalContext, prompt: torch.Tensor, length: int, args: argparse.Namespace) -> list[dict]:
    """One row per method for `length` generated tokens after `prompt` (B, P)."""
    parent = ctx.parent()
    seed = ctx.seed_for("sample", NAME, "parent")
    times, _ = timed(lambda: parent_sample(parent, prompt, length, seed), args.repeats, ctx.device)
    rows = [_row("parent (KV cache)", length, len(prompt), times, float(length), sampler="parent", steps=length)]
    x = torch.cat([prompt, torch.full((len(prompt), length), ctx.meta.mask_token_id, dtype=torch.long)], 1)
    for sampler in args.samplers:
        for steps in args.steps:
            n = steps or length
            times, (_, nfe) = timed(
                lambda: diffusion_sample(ctx, x, sampler, n, ctx.generator("sample", NAME, sampler, n)),
                args.repeats, ctx.device)
            rows.append(_row(f"{sampler} ({steps or 'L'} steps)", length, len(prompt), times, float(nfe),
                             sampler=sampler, steps=n))
    return rows


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    prompt = heldout_sequences(ctx.data, ctx.tokenizer, args.prompt_length, args.batch_size)
    # warm-up: first calls pay for kernel selection and allocation
    parent_sample(ctx.parent(), prompt, 2, ctx.seed_for("sample", NAME, "parent"))
    warm = torch.cat([prompt, torch.full((len(prompt), 2), ctx.meta.mask_token_id, dtype=torch.long)], 1)
    diffusion_sample(ctx, warm, args.samplers[0], 1, ctx.generator("sample", NAME))
    rows = []
    for length in tqdm(args.lengths, desc="speed", unit="length"):
        rows += measure_length(ctx, prompt, length, args)
    return {"rows": rows, "prompt_length": args.prompt_length, "batch": args.batch_size, "repeats": args.repeats}


def table(rows: list[dict]) -> list[str]:
    """Markdown table: method x length with latency, tokens/s, NFE and speed relative to the parent."""
    parent = {r["length"]: r["latency_s"] for r in rows if r["sampler"] == "parent"}
    lines = ["| method | length | latency (s) | tokens/s | NFE | latency / parent |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["sampler"] != "parent", r["method"])):
        rel = r["latency_s"] / parent[r["length"]] if r["length"] in parent else float("nan")
        lines.append(f"| {r['method']} | {r['length']} | {r['latency_s']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['nfe']:.0f} | {rel:.2f} |")
    return lines


def write_plot(result: dict, ctx: EvalContext, args: argparse.Namespace) -> dict:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(speed_plot(result["rows"], args.out_dir / f"{NAME}.png"))
    return result


SCRIPT = Script(NAME, "eval.speed", __doc__, add_args, run, lambda result: table(result["rows"]), write_plot,
                sequences=lambda args: {"--prompt-length + --lengths": args.prompt_length + max(args.lengths)})


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
