"""python -m adapt.draft_head EXPORT: train the draft head of a block export's speculative decoder (see
adapt.draft_head) on its training corpus and write it into the export folder.

    python -m adapt.draft_head checkpoints/llama_to_bd/final [--sequences 384 --epochs 8] [--json head.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from adapt.draft_head import DraftHead, collect, fit, heldout_acceptance, save_head


class HeadError(ValueError):
    """An export the head cannot be trained for, or arguments that describe no training; the message says why."""


def parse_args(argv: list[str] | None = None):
    import argparse

    from adapt.cli.types import at_least, device, seed, text
    from adapt.model.causal import DTYPES

    p = argparse.ArgumentParser(prog="python -m adapt.draft_head", description=__doc__.splitlines()[0])
    p.add_argument("model", type=text, help="a block export with a causal clean stream (checkpoints/RUN/final)")
    p.add_argument("--sequences", type=at_least(1), default=192,
                   help="training sequences of the export's corpus whose draft chains train the head")
    p.add_argument("--epochs", type=at_least(1), default=4)
    p.add_argument("--width", type=at_least(1), default=1024, help="the head's inner width")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=at_least(1), default=4, help="sequences per feature forward")
    p.add_argument("--chains", type=at_least(1), default=256, help="draft chains per optimizer step")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the export runs and the head trains")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="the export's dtype while it computes the features; the head trains and is saved in fp32")
    p.add_argument("--json", type=text, default="", help="also write the held-out acceptance here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from adapt.cli.errors import friendly

    args = parse_args(argv)
    with friendly(HeadError):
        train_head(args)
    return 0


def _checked_export(args):
    """(model, tokenizer, meta, data config) of an export the head can be trained for, else HeadError; every
    check that needs no weights runs before they load."""
    from adapt.cli.types import write_problem
    from adapt.export import export_problem, load_diffusion_model
    from adapt.export.contract import read_meta, read_recipe
    from adapt.decode.speculative import check_speculative

    if not 0 < args.lr < float("inf"):
        raise HeadError(f"--lr must be a positive number, got {args.lr}")
    problem = export_problem(args.model)
    if problem:
        raise HeadError(problem)
    folder, meta = Path(args.model), read_meta(args.model)
    try:
        check_speculative(meta, "sdpa")
    except ValueError as err:
        raise HeadError(f"a draft head serves the speculative decoder, and {err}") from None
    if meta.block_length < 2:
        raise HeadError(f"blocks of {meta.block_length} token leave nothing to draft; a draft head needs b >= 2")
    recipe = read_recipe(folder)
    if recipe is None:
        raise HeadError(f"{folder} has no recipe.yaml, so its training corpus is unknown; export the run again with "
                        f"`python -m adapt.export RUN_DIR`")
    problem = write_problem(folder) or (write_problem(Path(args.json).parent) if args.json else None)
    if problem:
        raise HeadError(f"{problem}: the head is written into the export folder (and --json where given)")
    # the folder's own head (perhaps broken) is never read: the new one replaces it
    model, tokenizer, meta = load_diffusion_model(folder, args.dtype, "sdpa", args.device)
    return model, tokenizer, meta, recipe.data


def train_head(args) -> dict:
    from adapt.data.corpus import build_sequences
    from adapt.objectives.diffusion import blocked_vocab

    model, tokenizer, meta, dcfg = _checked_export(args)
    model.requires_grad_(False)
    blocked = blocked_vocab(model.get_output_embeddings().weight.shape[0], meta.real_vocab_size, meta.mask_token_id,
                            device=args.device)
    data = build_sequences(dcfg, tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    picked = torch.randperm(len(data.train), generator=gen)[:args.sequences].sort().values
    rows = torch.as_tensor(data.train[picked]).long()
    ks = list(range(meta.block_length - 1))
    print(f"draft head: features of {len(rows)} training sequences of {rows.shape[1]} tokens", flush=True)
    train = collect(model, meta, rows, args.batch, ks)
    held = collect(model, meta, torch.as_tensor(data.heldout).long(), args.batch, ks, every_k=True)
    before = heldout_acceptance(None, model, held, blocked)
    torch.manual_seed(args.seed)
    head = DraftHead(model.config.hidden_size, args.width).to(args.device)
    losses = fit(head, model, train, blocked, args.epochs, args.lr, args.chains, gen)
    head.eval()
    after = heldout_acceptance(head, model, held, blocked)
    result = {"model": args.model, "sequences": len(rows), "epochs": args.epochs, "width": args.width,
              "lr": args.lr, "seed": args.seed, "train_chains": {k: len(c) for k, c in train.items()},
              "losses": losses, "heldout_before": before, "heldout_after": after}
    path = save_head(head, Path(args.model), {k: v for k, v in result.items() if k != "model"})
    for k in held:
        print(f"held-out, next token at block offset {k}: " + "; ".join(
            f"draft {s}: kept {before[f'k={k}'][s]['kept_t1']:.3f} -> {after[f'k={k}'][s]['kept_t1']:.3f} (T=1), "
            f"greedy {before[f'k={k}'][s]['greedy']:.3f} -> {after[f'k={k}'][s]['greedy']:.3f}"
            for s in after[f"k={k}"]))
    print(f"draft head -> {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main())
