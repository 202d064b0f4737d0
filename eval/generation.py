"""Generation quality vs sampling steps: generative perplexity under a judge and token diversity.

    python -m eval.generation MODEL_DIR [--samplers ancestral confidence] [--steps 16 64 256] [--samples 16]

Unconditional samples are `--length` tokens after BOS-only context; prompted samples continue the
first `--prompt-length` tokens of held-out blocks with `--gen-length` tokens. Every sample is scored
by the judge causal LM (the parent unless --judge) given its prefix; diversity statistics are those of
001_*.txt table 4 on the generated tokens. References on the same prefixes and lengths: held-out
text itself, and the parent's own samples with and without nucleus sampling (p = --top-p), at the same
--temperature as the diffusion samplers. Writes
generation.json, generation_samples.jsonl (texts, read by eval.mauve_score) and generation.png.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from eval.cli import Script, run_script
from eval.diversity import diversity
from eval.heldout import heldout_sequences
from eval.models import EvalContext, diffusion_sample, parent_sample
from eval.options import add_samplers, count, fraction, non_negative, tokens
from eval.plots import frontier_plot

NAME = "generation"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_samplers(parser, ["ancestral", "euler", "analytic", "confidence", "threshold"])
    parser.add_argument("--steps", nargs="+", type=count(1), default=[16, 64, 256])
    parser.add_argument("--samples", type=count(1), default=16, help="samples per setting (and prompts)")
    parser.add_argument("--length", type=tokens(1), default=128, help="generated tokens of unconditional samples")
    parser.add_argument("--prompt-length", type=tokens(1), default=32, help="prompt tokens (BOS included)")
    parser.add_argument("--gen-length", type=tokens(1), default=64, help="generated tokens of prompted samples")
    parser.add_argument("--modes", nargs="+", default=["unconditional", "prompted"],
                        choices=["unconditional", "prompted"])
    parser.add_argument("--temperature", type=non_negative, default=1.0, help="diffusion samplers' temperature")
    parser.add_argument("--top-p", type=fraction, default=0.95, help="nucleus p of the parent reference")
    parser.add_argument("--batch-size", type=count(1), default=8)
    parser.add_argument("--window", type=tokens(1), default=100, help="repetition-rate window (tokens)")


def prefixes(ctx: EvalContext, mode: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix (N, P), real continuation (N, G)) of held-out blocks; P = 1 (BOS) when unconditional."""
    if mode == "unconditional":
        blocks = heldout_sequences(ctx.data, ctx.tokenizer, args.length + 1, args.samples)
        return blocks[:, :1], blocks[:, 1:]
    blocks = heldout_sequences(ctx.data, ctx.tokenizer, args.prompt_length + args.gen_length, args.samples)
    return blocks[:, :args.prompt_length], blocks[:, args.prompt_length:]


def score(ctx: EvalContext, prefix: torch.Tensor, cont: torch.Tensor, args: argparse.Namespace) -> dict:
    """Judge perplexity, diversity and two decoded examples of continuations (N, G) after prefixes (N, P)."""
    gen_ppl = ctx.judge().perplexity(prefix.tolist(), cont.tolist(), args.batch_size)
    texts = ctx.tokenizer.batch_decode(cont, skip_special_tokens=False)
    prompts = ctx.tokenizer.batch_decode(prefix, skip_special_tokens=True)
    return {"gen_ppl": gen_ppl, "diversity": diversity(cont.tolist(), args.window), "texts": texts,
            "prompts": prompts}


def run_sampler(ctx: EvalContext, prefix: torch.Tensor, gen_len: int, sampler: str, steps: int,
                args: argparse.Namespace, mode: str) -> tuple[torch.Tensor, dict]:
    """Sample continuations of `gen_len` tokens for each prefix row -> ((N, gen_len) ids, cost).
    The draws are a stream of (mode, sampler, steps), the same whichever other settings run."""
    mask = torch.full((len(prefix), gen_len), ctx.meta.mask_token_id, dtype=torch.long)
    x = torch.cat([prefix, mask], dim=1)
    outs, nfe, start = [], 0, time.perf_counter()
    gen = ctx.generator("sample", NAME, mode, sampler, steps)
    for i in range(0, len(x), args.batch_size):
        ids, calls = diffusion_sample(ctx, x[i:i + args.batch_size], sampler, steps, gen,
                                      temperature=args.temperature)
        outs.append(ids[:, prefix.shape[1]:])
        nfe += calls
    batches = -(-len(x) // args.batch_size)
    return torch.cat(outs), {"nfe_per_batch": nfe / batches, "seconds": time.perf_counter() - start}


def references(ctx: EvalContext, mode: str, prefix: torch.Tensor, real: torch.Tensor,
               args: argparse.Namespace) -> list[dict]:
    """Held-out text and the parent's samples (plain and nucleus) on the same prefixes and lengths, at the
    diffusion samplers' --temperature (a judge perplexity compares samples at the same temperature)."""
    out = [{"mode": mode, "source": "heldout", **score(ctx, prefix, real, args)}]
    for name, top_p in (("parent", 1.0), (f"parent_top_p_{args.top_p:g}", args.top_p)):
        start = time.perf_counter()
        conts = [parent_sample(ctx.parent(), prefix[i:i + args.batch_size], real.shape[1],
                               ctx.seed_for("sample", NAME, mode, name, i), top_p, args.temperature)
                 for i in range(0, len(prefix), args.batch_size)]
        cont = torch.cat(conts)[:, prefix.shape[1]:]
        out.append({"mode": mode, "source": name, "temperature": args.temperature,
                    "seconds": time.perf_counter() - start, **score(ctx, prefix, cont, args)})
    return out


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    runs, refs = [], []
    total = len(args.modes) * len(args.samplers) * len(args.steps)
    bar = tqdm(total=total, desc="sampling", unit="setting")
    for mode in args.modes:
        prefix, real = prefixes(ctx, mode, args)
        for sampler in args.samplers:
            for steps in args.steps:
                cont, cost = run_sampler(ctx, prefix, real.shape[1], sampler, steps, args, mode)
                runs.append({"mode": mode, "sampler": sampler, "steps": steps, **cost,
                             **score(ctx, prefix, cont, args)})
                bar.set_postfix(sampler=sampler, steps=steps, ppl=f"{runs[-1]['gen_ppl']['ppl']:.1f}")
                bar.update(1)
        refs += references(ctx, mode, prefix, real, args)
    bar.close()
    return {"runs": runs, "references": refs}


def strip_texts(result: dict) -> tuple[dict, list[dict]]:
    """(result with two example texts per setting, all texts as JSONL records)."""
    records = []
    for kind in ("runs", "references"):
        for row in result[kind]:
            texts, prompts = row.pop("texts"), row.pop("prompts")
            key = {k: row[k] for k in ("mode", "sampler", "steps", "source") if k in row}
            records += [{**key, "index": i, "prompt": p, "text": t} for i, (p, t) in enumerate(zip(prompts, texts))]
            row["examples"] = texts[:2]
    return result, records


def write_files(result: dict, ctx: EvalContext, args: argparse.Namespace) -> dict:
    """generation_samples.jsonl (every text) and generation.png; returns the result with two examples each."""
    result, records = strip_texts(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{NAME}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result["plot"] = str(frontier_plot(result, args.out_dir / f"{NAME}.png"))
    return result


def summary_lines(result: dict) -> list[str]:
    lines = []
    for row in result["runs"] + result["references"]:
        name = row.get("source") or f"{row['sampler']} {row['steps']} steps"
        lines.append(f"{row['mode']:>13} {name:<28} gen ppl {row['gen_ppl']['ppl']:9.2f}  "
                     f"unique {row['diversity']['unique_unigrams']:.3f}  H {row['diversity']['unigram_entropy']:.2f}  "
                     f"rep {row['diversity']['repetition_rate']:.3f}")
    return lines + [f"wrote {result['plot']}"]


def sequences(args: argparse.Namespace) -> dict[str, int]:
    """The longest sequence of each mode: BOS + --length, or --prompt-length + --gen-length."""
    out = {"--length": args.length + 1} if "unconditional" in args.modes else {}
    return out | ({"--prompt-length + --gen-length": args.prompt_length + args.gen_length}
                  if "prompted" in args.modes else {})


SCRIPT = Script(NAME, "eval.generation", __doc__, add_args, run, summary_lines, write_files, sequences=sequences)


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
