r"""Sample from an exported diffusion model and print text.

    python -m adapt.sample checkpoints/<run>/final --prompt "Once upon a time" --length 128 --steps 64 \
        --sampler analytic
    python -m adapt.sample FOLDER --prompt "def f(x):" --suffix "return y" --length 32             # prefix + suffix
    python -m adapt.sample FOLDER --infill "The <mask> sat on the <mask:4>." --steps 16          # spans in text
    python -m adapt.sample FOLDER --text "The cat sat on the mat." --mask-range 1:3 --steps 4    # spans by token index
    python -m adapt.sample FOLDER --length 64 --num-samples 4 --trajectory                       # unconditional
    python -m adapt.sample FOLDER --prompt "Once" --length 32 --trajectory-out order.png          # or order.html

Samples go to stdout (one block per sample); speed (NFE, seconds, tokens/s) goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

from adapt.cli.types import at_least, device, fraction, non_negative, seed, text
from adapt.model.causal import start_token
from adapt.decode import SAMPLER_NAMES, SampleResult, generate, sampler_options
from adapt.decode.canvas import infill_canvas, prompt_canvas, segments_canvas

MASK_MARKER = re.compile(r"<mask(?::(\d+))?>")
MAX_CANVAS = 1 << 20
"""The longest canvas of a model whose config states no positions (rotary models extrapolate, but not forever)."""


class SampleError(ValueError):
    """Arguments that describe no canvas the model can fill; the message names them."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m adapt.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=text, help="exported folder (checkpoints/<run>/final)")
    what = p.add_argument_group("what to generate")
    what.add_argument("--prompt", type=text, default="", help="text before the generated span")
    what.add_argument("--suffix", type=text, default="", help="text after the generated span")
    what.add_argument("--length", type=at_least(0), default=64, help="tokens to generate between prompt and suffix")
    what.add_argument("--infill", type=text, help="text with <mask> (span of --span-length tokens) or <mask:N> markers")
    what.add_argument("--span-length", type=at_least(1), default=8, help="tokens per bare <mask> marker")
    what.add_argument("--text", type=text, help="text whose --mask-range token spans are regenerated")
    what.add_argument("--mask-range", action="append", default=[], metavar="START:END",
                      help="token span of --text to mask (0 = first token after BOS, end exclusive); repeatable")
    how = p.add_argument_group("how")
    how.add_argument("--sampler", default="analytic", choices=list(SAMPLER_NAMES))
    how.add_argument("--steps", type=at_least(1), help="sampler steps (default: one per generated token)")
    how.add_argument("--num-samples", type=at_least(1), default=1, help="samples drawn as one batch")
    how.add_argument("--seed", type=seed, default=0)
    how.add_argument("--temperature", type=non_negative)
    how.add_argument("--top-k", type=at_least(1))
    how.add_argument("--top-p", type=fraction)
    how.add_argument("--noise", choices=["loglinear", "geometric"], help="euler / analytic noise")
    how.add_argument("--confidence", choices=["prob", "margin", "entropy"], help="confidence / threshold")
    how.add_argument("--tau", type=fraction, help="threshold: commit positions with confidence >= tau")
    how.add_argument("--block-length", type=at_least(1), help="semi-autoregressive blocks of this many tokens")
    how.add_argument("--prefix-cache", action="store_true", help="reuse the prompt's keys/values (approximate)")
    how.add_argument("--force-block-length", action="store_true",
                     help="decode a block-diffusion export with another --block-length than it was trained with")
    how.add_argument("--stop-at-eos", action="store_true", help="cut each sample after its first generated EOS")
    how.add_argument("--trajectory", action="store_true", help="print which tokens were revealed at which step")
    how.add_argument("--trajectory-out", metavar="FILE.png|FILE.html",
                     help="draw the canvas step by step, each token coloured by the step it was revealed at")
    run = p.add_argument_group("runtime")
    run.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    run.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    return p.parse_args(argv)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def build_input(args: argparse.Namespace, tokenizer, bos_id: int, mask_id: int) -> torch.Tensor:
    """(num_samples, L) long: the canvas the arguments describe."""
    n = args.num_samples
    if args.infill is not None or args.text is not None:
        if args.prompt or args.suffix:
            raise SampleError("--infill / --text replace --prompt / --suffix; use one way")
    if args.infill is not None:
        parts = MASK_MARKER.split(args.infill)  # text, count, text, count, ..., text
        if len(parts) == 1:
            raise SampleError(f"--infill {args.infill!r} has no <mask> or <mask:N> marker; "
                              f"add one where text is to be generated")
        segments: list = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                segments.append(encode(tokenizer, part))
            else:
                segments.append(int(part) if part else args.span_length)
        return segments_canvas(bos_id, mask_id, segments, n)
    if args.text is not None:
        if not args.mask_range:
            raise SampleError("--text needs at least one --mask-range START:END")
        spans = [_span(r) for r in args.mask_range]
        try:
            return infill_canvas(bos_id, mask_id, encode(tokenizer, args.text), spans, n)
        except ValueError as err:
            raise SampleError(f"--mask-range {' '.join(args.mask_range)}: {err}") from None
    return prompt_canvas(bos_id, mask_id, args.length, encode(tokenizer, args.prompt),
                         encode(tokenizer, args.suffix), n)


def _span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise SampleError(f"--mask-range {text!r} is not START:END (two token indices)") from None
    return start, end


def check_lengths(args: argparse.Namespace, positions: int) -> None:
    """Refuse, before a canvas is built, a generated span longer than the model's positions (both numbers named):
    a huge --length would otherwise allocate its canvas first."""
    spans = [("--length", args.length), ("--span-length", args.span_length)]
    spans += [(f"<mask:{n}> in --infill", int(n)) for n in MASK_MARKER.findall(args.infill or "") if n]
    for name, value in spans:
        if value > positions:
            raise SampleError(f"{name} {value} is longer than the model's {positions} positions; ask for at most "
                              f"{positions} tokens")


def check_canvas(row: torch.Tensor, batch: int, positions: int, vocab: int) -> None:
    """Refuse a canvas (1, L) the model has no positions for, or `batch` of them whose logits alone exceed this
    machine's memory (checked before the batch is built)."""
    if row.shape[1] > positions:
        raise SampleError(f"the canvas is {row.shape[1]} tokens (BOS, prompt, generated span, suffix) but the model "
                          f"has {positions} positions; shorten the prompt or --length")
    need, have = batch * row.shape[1] * vocab * 4, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise SampleError(f"--num-samples {batch} of {row.shape[1]} tokens needs {need / 2**30:.0f} GiB for the "
                          f"logits alone, more than this machine's {have / 2**30:.0f} GiB; draw fewer samples at once")


def sampler_kwargs(args: argparse.Namespace, eps: float) -> dict:
    """Options given on the command line, plus the model's eps for log-linear noise."""
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "noise": args.noise,
             "confidence": args.confidence, "tau": args.tau}
    options = {k: v for k, v in given.items() if v is not None}
    if "eps" in sampler_options(args.sampler):
        options["eps"] = eps
    return options


def print_trajectory(result: SampleResult, row: int, tokenizer) -> None:
    for step, positions in result.revealed(row):
        pieces = " ".join(f"{p}:{tokenizer.decode([int(result.ids[row, p])])!r}" for p in positions)
        print(f"  step {step:3d}: {pieces}")


def draw_trajectory(args: argparse.Namespace, x: torch.Tensor, result: SampleResult, mask_id: int, tokenizer) -> None:
    from adapt.decode.trajectory import frames, render

    samples = frames(x, result.ids.cpu(), result.trajectory.cpu(), mask_id, tokenizer, result.steps_run)
    title = f"{args.model}: {args.sampler}, {result.steps_run} steps, {result.nfe} model calls"
    try:
        out = render(args.trajectory_out, samples, title)
    except (ValueError, OSError) as err:
        raise SampleError(f"cannot write {args.trajectory_out}: {err}") from None
    print(f"# trajectory -> {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from adapt.cli.errors import friendly

    args = parse_args(argv)
    with friendly(SampleError):
        _sample(args)
    return 0


def _sample(args: argparse.Namespace) -> None:
    from adapt.export import load_diffusion_model
    from adapt.decode.denoiser import Denoiser
    from adapt.draft_head import load_draft_head

    if args.trajectory_out:
        from adapt.decode.trajectory import check_path

        try:
            check_path(args.trajectory_out)
        except ValueError as err:
            raise SampleError(str(err)) from None
    model, tokenizer, meta = load_diffusion_model(args.model, args.dtype, args.attn, args.device)
    head = load_draft_head(args.model, model)
    positions = getattr(model.config, "max_position_embeddings", None) or MAX_CANVAS
    check_lengths(args, positions)
    row = build_input(argparse.Namespace(**{**vars(args), "num_samples": 1}), tokenizer, start_token(tokenizer),
                      meta.mask_token_id)
    if not (row == meta.mask_token_id).any():
        raise SampleError("nothing to generate: --length is 0 and no span is masked")
    check_canvas(row, args.num_samples, positions, model.config.vocab_size)
    x = row.expand(args.num_samples, -1).clone()
    start = time.perf_counter()
    try:
        result = generate(Denoiser(model, meta), x, args.sampler, args.steps, torch.Generator().manual_seed(args.seed),
                          args.block_length, args.prefix_cache, tokenizer.eos_token_id if args.stop_at_eos else None,
                          args.trajectory or bool(args.trajectory_out), args.force_block_length, head,
                          **sampler_kwargs(args, meta.eps))
    except ValueError as err:
        raise SampleError(str(err)) from None
    seconds = time.perf_counter() - start
    for row in range(result.ids.shape[0]):
        print(f"=== sample {row + 1}/{result.ids.shape[0]} ===")
        print(tokenizer.decode(result.ids[row, 1:], skip_special_tokens=True))
        if args.trajectory:
            print_trajectory(result, row, tokenizer)
    if args.trajectory_out:
        draw_trajectory(args, x, result, meta.mask_token_id, tokenizer)
    generated = int((x == meta.mask_token_id).sum())
    print(f"# sampler={args.sampler} steps_run={result.steps_run} nfe={result.nfe} seconds={seconds:.2f} "
          f"tokens/s={generated / max(seconds, 1e-9):.1f}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
