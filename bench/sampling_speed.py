"""Sampler speed against the parent causal LM, in one run on one model, prompt and output length.

    python bench/sampling_speed.py                      # embedded SmolLM2-135M, CPU, fp32
    python bench/sampling_speed.py --device cuda --dtype bf16 --batch 8
    python bench/sampling_speed.py --model PATH --length 8 --steps 4 --json out.json   # any HF folder

Reports, per sampler: tokens/s and model calls (NFE) next to the parent's `generate` with KV
cache (greedy, same prompt, same number of new tokens); seconds per model call; the sampler's
overhead = wall time / time spent inside the model's forward during the same run (target <= 1.05x;
measured in-run because a shared CPU's speed drifts between runs); tokens committed per call. Then the
prefix KV cache's quality cost: the cached denoiser against the exact one on the
same partially masked inputs (KL, top-1 agreement, NLL of the true tokens).
An unadapted model is fine for speed; its samples are not meant to be read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapt.recipe.config import EMBEDDED_MODEL, ModelConfig  # noqa: E402
from adapt.decode.denoiser import Denoiser, PrefixCachedDenoiser  # noqa: E402
from adapt.draft_head import load_draft_head  # noqa: E402
from adapt.export import exported_meta, load_weights  # noqa: E402
from adapt.model.causal import add_mask_token, load_tokenizer, set_causal, start_token  # noqa: E402
from adapt.decode import generate  # noqa: E402
from adapt.decode.canvas import prompt_canvas  # noqa: E402

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden press adapted from those used to make "
        "wine. Within fifty years presses were working in more than two hundred cities across Europe, and "
        "the number of books in circulation grew from thousands to millions. Cheaper books changed who "
        "could read and what they read: pamphlets, calendars and grammars reached merchants and artisans, "
        "scholars compared editions of the same text, and printers became publishers, translators and "
        "booksellers. Governments and churches soon tried to license presses, with mixed success, because "
        "a press was small enough to move across a border in a single cart.")

OVERHEAD_TARGET = 1.05
"""A sampler's wall time over the time inside the model's forward (the rest is the sampler's own work)."""

# (label, sampler, options, block_length, prefix_cache)
CONFIGS = [
    ("ancestral", "ancestral", {}, None, False),
    ("euler loglinear", "euler", {}, None, False),
    ("analytic loglinear", "analytic", {}, None, False),
    ("analytic geometric", "analytic", {"noise": "geometric"}, None, False),
    ("confidence prob", "confidence", {}, None, False),
    ("threshold tau", "threshold", {}, None, False),
    ("confidence, blocks", "confidence", {}, "B", False),
    ("threshold tau, blocks", "threshold", {}, "B", False),
    ("confidence, blocks + prefix cache", "confidence", {}, "B", True),
    ("threshold tau, blocks + prefix cache", "threshold", {}, "B", True),
    ("block export: confidence, exact cache", "confidence", {}, "BD", False),
    ("block export: threshold tau, exact cache", "threshold", {}, "BD", False),
    ("block export: speculative, drafts checked by the clean stream", "speculative", {}, "BD", False),
    ("block export: speculative, without its draft head", "speculative", {"draft_head": False}, "BD", False),
    ("block export: chain, drafts kept unchecked", "chain", {}, "BD", False),
]
"""block "B": semi-AR blocks of --block-length on the whole-sequence model; "BD": the same weights decoded as a
block-diffusion export of --bd-block-length (its own block length when --model is one) with the exact cache:
the speed of that decoder; its quality needs a model trained with blocks. The speculative row reads a model that
is not a block export as one with a causal clean stream; with a draft head in the export folder (adapt.draft_head)
it drafts through it, and the next row decodes without it (run only when there is one)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


@torch.no_grad()
def bare_forward_seconds(model, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of model(x).logits (the work every sampler step must do at least)."""
    model(input_ids=x, use_cache=False)  # warm-up
    times = [timed(lambda: model(input_ids=x, use_cache=False).logits, x.device)[1] for _ in range(repeats)]
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def parent_generate(model, prompt: torch.Tensor, length: int) -> tuple[float, int]:
    """(seconds, forwards) of greedy AR generation of `length` tokens with the KV cache."""
    kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt))  # warm-up
    out, seconds = timed(lambda: model.generate(prompt, **kwargs), prompt.device)
    return seconds, out.shape[1] - prompt.shape[1]


class ForwardTimer:
    """Seconds spent inside model.forward (hooks on the top module)."""

    def __init__(self, model, device: torch.device):
        self.seconds, self.device, self._start = 0.0, device, 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        sync(self.device)
        self._start = time.perf_counter()

    def _post(self, *_):
        sync(self.device)
        self.seconds += time.perf_counter() - self._start


def run_samplers(model, meta, x: torch.Tensor, args, head=None) -> list[dict]:
    """One row per configuration; `head` is the export's draft head (the speculative rows draft through it)."""
    rows, generated = [], int((x == meta.mask_token_id).sum())
    timer = ForwardTimer(model, x.device)
    for label, name, options, block, cache in CONFIGS:
        if args.only and not any(word in label for word in args.only):
            continue
        if "draft_head" in options and head is None:
            continue
        opts = dict(options, temperature=args.temperature, **({"tau": args.tau} if name == "threshold" else {}))
        opts["draft_head"] = None if opts.get("draft_head", True) is False else head
        block_length = args.block_length if block == "B" else None
        bd = replace(meta, block_length=meta.block_length or args.bd_block_length if block == "BD" else 0)
        if name in ("speculative", "chain") and not meta.block_length:
            bd = replace(bd, clean_attention="causal")
        steps = None if name in ("speculative", "chain") else args.steps
        label = label.replace("tau", f"tau={args.tau}").replace("blocks", f"blocks of {args.block_length}")
        label = label.replace("block export", f"block export b={bd.block_length}")
        timer.seconds = 0.0
        res, seconds = timed(lambda: generate(Denoiser(model, bd), x, name, steps,
                                              torch.Generator().manual_seed(0), block_length, cache, **opts),
                             x.device)
        rows.append(dict(label=label, seconds=seconds, nfe=res.nfe, tok_s=generated / seconds,
                         overhead=seconds / timer.seconds, per_call=generated / x.shape[0] / res.nfe,
                         cache=cache))
        print(f"  {label}: {seconds:.2f}s nfe={res.nfe} in forward {timer.seconds:.2f}s", file=sys.stderr)
    return rows


@torch.no_grad()
def prefix_cache_quality(model, meta, x0: torch.Tensor, prompt_len: int, ratios=(0.25, 0.5, 0.75, 1.0),
                         draws: int = 4) -> list[dict]:
    """Cached vs exact denoiser on x0 (1, L) with a fraction of the continuation masked, `draws` masks per ratio."""
    rows, g = [], torch.Generator().manual_seed(0)
    exact, cached = Denoiser(model, meta), PrefixCachedDenoiser(model, meta)
    for r in ratios:
        x = x0.repeat(draws, 1)
        cont = torch.rand(x.shape, generator=g).to(x.device) < r
        cont[:, :prompt_len] = False
        x[cont] = meta.mask_token_id
        cached.update_prefix(x)
        p, q = exact(x)[cont], cached(x)[cont]  # (N, V)
        target = x0.repeat(draws, 1)[cont][:, None]
        rows.append(dict(ratio=r, masked=int(cont.sum()),
                         kl=float(torch.where(p.isfinite(), p.exp() * (p - q), 0.0).sum(-1).mean()),
                         agree=float((p.argmax(-1) == q.argmax(-1)).float().mean()),
                         nll_exact=float(-p.gather(-1, target).mean()), nll_cached=float(-q.gather(-1, target).mean())))
    return rows


def report(args, device_name: str, ar: tuple[float, int], fwd: float, rows: list[dict], quality: list[dict],
           shape: tuple[int, int], prompt_len: int) -> str:
    ar_seconds, ar_tokens = ar
    ar_tok_s = ar_tokens * shape[0] / ar_seconds
    lines = [f"model {args.model}, {device_name}, {args.dtype}, batch {shape[0]}, prompt {prompt_len} tokens "
             f"(BOS included), {args.length} new tokens, steps {args.steps}, "
             f"bare forward of ({shape[0]}, {shape[1]}) = {fwd * 1000:.1f} ms", "",
             "| sampler | NFE | seconds | tokens/s | vs parent AR | ms per call | wall / in-forward "
             "| tokens per call |",
             "|---|---|---|---|---|---|---|---|",
             f"| parent AR `generate` (KV cache, greedy) | {ar_tokens} | {ar_seconds:.2f} | {ar_tok_s:.1f} "
             f"| 1.00x | {ar_seconds / ar_tokens * 1000:.0f} | - | 1.00 |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['nfe']} | {r['seconds']:.2f} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / ar_tok_s:.2f}x | {r['seconds'] / r['nfe'] * 1000:.0f} | {r['overhead']:.3f}x | "
                     f"{r['per_call']:.2f} |")
    over = [r["label"] for r in rows if r["overhead"] > OVERHEAD_TARGET]
    lines += ["", f"Sampler overhead target wall / in-forward <= {OVERHEAD_TARGET}x: "
              + (f"missed by {', '.join(over)}" if over else "met by every sampler")]
    lines += ["",
              "Prefix KV cache vs exact denoiser at masked continuation positions (4 random masks per fraction):",
              "",
              "| masked fraction | masked tokens | KL(exact ‖ cached) nats | top-1 agreement "
              "| NLL exact | NLL cached |",
              "|---|---|---|---|---|---|"]
    for q in quality:
        lines.append(f"| {q['ratio']:.2f} | {q['masked']} | {q['kl']:.4f} | {q['agree']:.3f} | "
                     f"{q['nll_exact']:.3f} | {q['nll_cached']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="a model source: embedded:..., an HF folder, a .gguf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--length", type=int, default=64, help="new tokens")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--bd-block-length", type=int, default=8, help="block length of the block-export rows")
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0, help="the diffusion samplers' temperature (0 = greedy)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5, help="bare-forward timings (median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--json", default="", help="also write the measurements here")
    p.add_argument("--only", nargs="*", default=[], help="run only the samplers whose label contains one of these "
                   "words (e.g. --only 'block export')")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if min(args.length, args.steps, args.block_length, args.bd_block_length, args.batch, args.prompt_tokens,
           args.repeats) < 1:
        p.error("--length, --steps, --block-length, --bd-block-length, --batch, --prompt-tokens and --repeats "
                "must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mcfg = ModelConfig(name_or_path=args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(mcfg)
    model = load_weights(mcfg).to(device).eval()
    head = load_draft_head(args.model, model) if exported_meta(args.model) else None
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    start = start_token(tokenizer)
    prompt = torch.tensor([[start, *ids[:args.prompt_tokens]]] * args.batch, device=device)
    ar = parent_generate(model, prompt, args.length)
    meta = exported_meta(args.model) or add_mask_token(model, tokenizer, mcfg)
    set_causal(model, False)
    x = prompt_canvas(start, meta.mask_token_id, args.length, ids[:args.prompt_tokens], (), args.batch).to(device)
    fwd = bare_forward_seconds(model, x, args.repeats)
    try:
        rows = run_samplers(model, meta, x, args, head)
    except ValueError as err:  # e.g. fewer --steps than the blocks the new tokens span
        print(f"error: {err}", file=sys.stderr)
        return 2
    x0 = torch.tensor([[start, *ids[:args.prompt_tokens + args.length]]], device=device)
    quality = prefix_cache_quality(model, meta, x0, prompt.shape[1])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(report(args, device_name, ar, fwd, rows, quality, tuple(x.shape), prompt.shape[1]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name, "parent_seconds": ar[0],
                                               "parent_tokens": ar[1], "bare_forward_s": fwd, "samplers": rows,
                                               "prefix_cache_quality": quality}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
