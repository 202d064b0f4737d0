"""Held-out bound against the block length b, next to the parent's exact perplexity, in-domain and out of domain.

    python bench/block_length.py [--model EXPORT_OR_CAUSAL_LM] [--lengths 1 4 16 64 0] [--blocks 8] [--draws 2]
                                 [--clean-attention block|causal] [--offsets B]

Every b scores the same blocks with the masked-count estimator (adapt.train.likelihood; b = 0 is the whole-sequence
objective). In-domain text is the embedded corpus' held-out tail (the default recipe's); out-of-domain text is
the Python language reference shipped with CPython (`pydoc_data.topics`), which no recipe trains on. For the
unconverted parent b = 1 reproduces its exact perplexity (the test of the shift with blocks); a converted
model shows how much of the parent's quality each block length keeps. With --offsets B each bound is also split by
a token's place in blocks of B (offset i % B: `offset0_ppl` ...), which shows where a converted model loses to its
parent (b = 1 of the parent gives the parent's exact perplexity per offset). Writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapt.train import rng  # noqa: E402
from adapt.recipe.config import DataConfig, ModelConfig  # noqa: E402
from adapt.data.corpus import build_sequences  # noqa: E402
from adapt.objectives.diffusion import blocked_vocab  # noqa: E402
from adapt.export import exported_meta, load_weights  # noqa: E402
from adapt.train.likelihood import causal_nll, heldout_bound, summarize  # noqa: E402
from adapt.model.causal import load_tokenizer, prepare_diffusion, set_causal, start_token  # noqa: E402
from adapt.objectives import ModelForward, make  # noqa: E402


def reference_blocks(tokenizer, length: int, n: int) -> torch.Tensor:
    """(n, length) blocks of the Python language reference (pydoc_data), each starting with BOS."""
    import pydoc_data.topics as topics

    ids = tokenizer("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), add_special_tokens=False).input_ids
    body = length - 1
    rows = [[start_token(tokenizer)] + ids[i * body:(i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def load_scored(name: str):
    """(tokenizer, model in eval mode, diffusion metadata, blocked ids) of an export (its own metadata: mask token,
    clean stream) or of a causal LM (a mask token added), in fp32 on the CPU."""
    mcfg = ModelConfig(name_or_path=name, dtype="fp32")
    tok, model = load_tokenizer(mcfg), load_weights(mcfg).eval()
    meta = prepare_diffusion(model, tok, mcfg, exported_meta(name))
    blocked = blocked_vocab(model.get_output_embeddings().weight.shape[0], meta.real_vocab_size, meta.mask_token_id)
    return tok, model, meta, blocked


def bounds(model, meta, blocked, x0: torch.Tensor, lengths: list[int], draws: int, batch: int,
           offsets: int = 0) -> dict:
    forward = ModelForward(model, "cpu")
    parts = {f"offset{o}": (torch.arange(x0.shape[1]) % offsets == o)[None].expand(len(x0), -1)
             for o in range(offsets)}
    set_causal(model, True)
    nll = causal_nll(forward, x0, blocked, batch)
    out = {"parent": summarize(nll, x0.shape[1] - 1).as_dict()}
    set_causal(model, False)
    for b in lengths:
        obj = make(b, meta.mask_token_id, True, blocked, clean_attention=meta.clean_attention,
                   noised_attention=meta.noised_attention)
        tic = time.perf_counter()
        out[f"b={b or 'L'}"] = heldout_bound(obj, forward, x0, obj.scored(x0), draws, "count",
                                             rng.generator(0, "estimate"), batch, parts=parts) | {
                                                 "seconds": time.perf_counter() - tic}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 16, 64, 0])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clean-attention", choices=("block", "causal"), default=None,
                    help="block diffusion's clean stream (default: the export's; block for a causal LM)")
    ap.add_argument("--offsets", type=int, default=0,
                    help="also split each bound by a token's place in blocks of this many tokens (0: no split)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    bad = [b for b in args.lengths if b < 0 or (b and args.length % b)]
    problems = ([f"block lengths must divide --length {args.length} (got {bad})"] if bad else []) + \
        (["--blocks and --draws must be >= 1"] if args.blocks < 1 or args.draws < 1 else []) + \
        (["--offsets must be >= 0 (0: no split)"] if args.offsets < 0 else [])
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    tok, model, meta, blocked = load_scored(args.model)
    meta = replace(meta, clean_attention=args.clean_attention or meta.clean_attention)
    data = build_sequences(DataConfig(seq_length=args.length, heldout_sequences=args.blocks), tok).heldout
    result = {"model": args.model}
    for part, x0 in (("in_domain", data), ("out_of_domain", reference_blocks(tok, args.length, args.blocks))):
        result[part] = bounds(model, meta, blocked, x0, args.lengths, args.draws, args.batch, args.offsets)
        print(part, " ".join(f"{k}: {v['ppl']:.2f}" + "".join(f" [{o}: {v[f'offset{o}_ppl']:.2f}]"
                                                              for o in range(args.offsets) if f"offset{o}_ppl" in v)
                             for k, v in result[part].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
