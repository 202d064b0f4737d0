"""Screen recipe choices at equal training tokens: short runs, then paired held-out bounds in-domain and out of domain.

    python bench/recipe_study.py --variants base lr2e-4 lr5e-4 [--steps 30] [--seq-length 128] [--json out.json]

Each variant is the default recipe plus the screen's common overrides (SCREEN: short blocks, no periodic
saves, cheap in-run evaluations, the teacher off) plus its own overrides (VARIANTS), trained by `python
adapt/run.py` into checkpoints/study_<name> (a finished one is reused). All exports are then scored on the same
blocks with the same masked-count draws (adapt.train.likelihood.draw_masks), so a variant's bound divided by the first
variant's is a paired ratio with a 95% interval over blocks (eval.compare.paired). In-domain blocks are the
recipe's held-out tail; out-of-domain blocks are CPython's language reference (pydoc_data), which no recipe
trains on; the parent's exact perplexity on the same tokens stands beside both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapt.train.checkpoint import final_dir  # noqa: E402
from adapt.export import exported_meta  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NO_TEACHER = ["diffusion.distill.weight=0", "diffusion.distill.teacher=clean", "diffusion.distill.positions=frontier",
              "diffusion.distill.schedule=constant"]
"""The default recipe's teacher switched off: every variant starts from the recipe the study measured against
(`kdp1m+kdlin` is today's default, docs/decisions.md 2026-12-07)."""
SCREEN = ["train.save_every=0", "train.eval_t_samples=1", "train.eval_before=none", "run.sample_length=0",
          "train.log_every=10", *NO_TEACHER]
_BLOCK4 = ["diffusion.objective=block", "diffusion.block.length=4", "attention.anneal_steps=0",
           "attention.anneal_schedule=blocks"]
VARIANTS = {
    "base": [],
    "lr2e-4": ["optim.lr=2e-4"],
    "lr5e-4": ["optim.lr=5e-4"],
    "lr1e-3": ["optim.lr=1e-3"],
    "lr3e-4": ["optim.lr=3e-4"],
    "lr2e-3": ["optim.lr=2e-3"],
    "noanneal": ["attention.anneal_steps=0"],
    "window": ["attention.anneal_schedule=window"],
    "curriculum": ["attention.anneal_schedule=blocks"],
    "noshift": ["diffusion.shift=false"],
    "cleancausal": ["diffusion.block.clean_attention=causal"],
    "ar0.3": ["diffusion.ar_loss_weight=0.3"],
    "ar0.1": ["diffusion.ar_loss_weight=0.1"],
    "ar0.3eqtime": ["diffusion.ar_loss_weight=0.3", "train.max_steps={eq}", "attention.anneal_steps={eqhalf}"],
    "layerlr0.8": ["optim.layer_lr_decay=0.8"],
    "masknorm": ["diffusion.loss_norm=masked"],
    "tclip": ["diffusion.t_min=0.45", "diffusion.t_max=0.95"],
    "tclip30-80": ["diffusion.t_min=0.3", "diffusion.t_max=0.8"],
    "perblock": ["diffusion.t_per_block=true"],
    "comp": ["diffusion.complementary_masks=true"],
    "constlr": ["optim.min_lr_ratio=1.0"],
    "nowarmup": ["optim.warmup_steps=0"],
    "posmask0.5": ["diffusion.position_masking=0.5"],
    "posmask1": ["diffusion.position_masking=1.0"],
    "masknormal": ["model.mask_init=normal"],
    "maskeos": ["model.mask_init=eos"],
    "lora": ["lora.enabled=true", "optim.lr=1e-3"],
    "lora1.7x": ["lora.enabled=true", "optim.lr=1e-3", "train.max_steps={lora}", "attention.anneal_steps={lorahalf}",
                 "optim.warmup_steps={lorawarm}"],
    "lora1.35x": ["lora.enabled=true", "optim.lr=1e-3", "train.max_steps={lora135}",
                  "attention.anneal_steps={lora135half}", "optim.warmup_steps={lora135warm}"],
    "lora2x": ["lora.enabled=true", "optim.lr=1e-3", "train.max_steps={2steps}", "attention.anneal_steps={steps}",
               "optim.warmup_steps={warmup2}"],
    "annealall": ["attention.anneal_steps={steps}"],
    "full": ["lora.enabled=false", "optim.lr=2e-4"],
    "r64": ["lora.r=64", "lora.alpha=128"],
    "cosine": ["optim.min_lr_ratio=0.1"],
    **{f"b{b}": ["diffusion.objective=block", f"diffusion.block.length={b}", "attention.anneal_schedule=blocks"]
       for b in (1, 2, 4, 8, 16, 64)},
    "kd1f": ["diffusion.distill.weight=1.0", "diffusion.distill.positions=frontier"],
    "kd1m": ["diffusion.distill.weight=1.0", "diffusion.distill.positions=masked"],
    "kd0.3m": ["diffusion.distill.weight=0.3", "diffusion.distill.positions=masked"],
    "kd3f": ["diffusion.distill.weight=3.0", "diffusion.distill.positions=frontier"],
    **{f"kdp{w}m": ["diffusion.distill.weight=" + w, "diffusion.distill.positions=masked",
                    "diffusion.distill.teacher=parent"] for w in ("0.3", "1", "3")},
    "onpol0.5": ["diffusion.distill.onpolicy=0.5"],
    "onpol1": ["diffusion.distill.onpolicy=1.0"],
    "kdlin": ["diffusion.distill.schedule=linear"],  # the distillation weight falling linearly to 0 at the last step
    "kdctx": ["diffusion.distill.positions=context"],  # each masked position's term times its seen share of x_<i
    "full0.25": ["diffusion.full_mask_share=0.25"],
    "noisedcausal": ["diffusion.block.noised_attention=causal"],
    # the anchors' recipes at equal tokens, from their papers' settings with this code (b = 4 for the block ones):
    "diffullama": ["attention.anneal_schedule=random"],  # whole sequence, random attention annealing, shift
    "sdar": [*_BLOCK4, "diffusion.block.clean_attention=block"],  # plain block diffusion
    "bd3lm": [*_BLOCK4, "diffusion.block.clean_attention=block", "diffusion.t_min=0.45", "diffusion.t_max=0.95"],
    "fastdllm2": [*_BLOCK4, "diffusion.block.clean_attention=block", "diffusion.complementary_masks=true"],
    "opdlm": [*_BLOCK4, "diffusion.block.clean_attention=causal", "diffusion.distill.weight=1",
              "diffusion.distill.teacher=parent", "diffusion.distill.positions=masked", "diffusion.distill.onpolicy=1"],
    "idlm": [*_BLOCK4, "diffusion.block.clean_attention=causal", "diffusion.block.noised_attention=causal",
             "diffusion.ar_loss_weight=1"],  # causal masks among the noised tokens, and the causal (AR) loss
    "mb2": ["train.micro_batch_size=2", "train.max_steps={2steps}", "attention.anneal_steps={steps}",
            "optim.warmup_steps={warmup2}"],
}
"""name -> overrides on top of the default recipe and SCREEN (a variant named `X+Y` combines X and Y); {steps},
{2steps} and {warmup2} stand for the screen's step count, twice it, and the warmup of twice it; {eq} and {eqhalf}
for the steps (and anneal steps) of equal wall time with the joint loss; {lora}, {lorahalf}, {lorawarm} (and the
same with lora135) for LoRA's at 4 x 128 (and 4 x 256)."""


AR_COST = 1.7
"""Step time with the joint causal loss over the plain step's (measured on the screen's runs, 2026-12-02):
`ar0.3eqtime` trains 1/AR_COST of the steps, so it spends the wall time of the plain runs."""


LORA_SPEEDUP = 1.7
"""A full step's time over a LoRA step's (r 16, every projection; 5.89 s vs 3.46 s at 4 x 128 on the screen's runs,
2026-12-02): `lora1.7x` trains LORA_SPEEDUP times the steps, the plain runs' wall time. At 4 x 256 the ratio is
1.35 (9.2 s vs 6.8-7.0 s: the optimizer's share of a step is smaller), LORA_SPEEDUP_256, hence `lora1.35x` for
full-size runs."""
LORA_SPEEDUP_256 = 1.35


def overrides(name: str, lr: str, steps: int) -> list[str]:
    out = [f"optim.lr={lr}"] if lr else []
    names = {"2steps": 2 * steps, "warmup2": max(1, steps // 5), "eq": round(steps / AR_COST),
             "eqhalf": round(steps / AR_COST) // 2, **_scaled("lora", round(steps * LORA_SPEEDUP)),
             **_scaled("lora135", round(steps * LORA_SPEEDUP_256))}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"error: unknown variant {part!r}; choose from {', '.join(VARIANTS)}")
        out += [o.format(steps=steps, **names) for o in VARIANTS[part]]
    return out


def _scaled(prefix: str, steps: int) -> dict[str, int]:
    """{prefix}, {prefix}half and {prefix}warm: a run of `steps` steps, its anneal (half) and warmup (a tenth)."""
    return {prefix: steps, f"{prefix}half": steps // 2, f"{prefix}warm": max(1, steps // 10)}


def run_dir(name: str, args: argparse.Namespace) -> Path:
    """checkpoints/study_<name>[_lr<lr>][_<steps>x<block>][_s<seed>]: one folder per variant, learning rate, size
    (when not the screen's 30 steps of 128 tokens) and seed."""
    size = (args.steps, args.seq_length) != (30, 128)
    tag = (f"_lr{args.lr}" if args.lr else "") + (f"_{args.steps}x{args.seq_length}" if size else "") + (
        f"_s{args.seed}" if args.seed else "")
    return ROOT / "checkpoints" / f"study_{name}{tag}"


def train(name: str, args: argparse.Namespace) -> Path:
    folder = run_dir(name, args)
    if exported_meta(final_dir(folder)) is not None:
        return final_dir(folder)
    steps = args.steps
    cmd = [sys.executable, str(ROOT / "adapt" / "run.py"), str(ROOT / "recipes" / "llama_to_mdlm.yaml"), *SCREEN,
           f"train.max_steps={steps}", f"attention.anneal_steps={steps // 2}",
           f"optim.warmup_steps={max(1, steps // 10)}",
           f"data.seq_length={args.seq_length}", f"run.name={folder.name}", f"train.seed={args.seed}",
           *args.common, *overrides(name, args.lr, steps)]
    tic = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode:
        raise SystemExit(f"error: variant {name} failed:\n{out.stderr[-3000:]}")
    seconds = time.perf_counter() - tic
    (folder / "study_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"trained {name} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return final_dir(folder)


def score(exports: dict[str, Path], args: argparse.Namespace) -> dict:
    """Paired bounds of every export on in-domain and out-of-domain blocks, the parent's exact ppl beside."""
    from adapt import objectives
    from adapt.train import rng
    from adapt.export import load_diffusion_model
    from adapt.recipe.config import DataConfig, ModelConfig
    from adapt.data.corpus import build_sequences
    from adapt.objectives.diffusion import blocked_vocab
    from adapt.train.likelihood import causal_nll, draw_masks, summarize
    from adapt.model.causal import load_causal_lm, load_tokenizer, set_causal
    from adapt.objectives import ModelForward
    from bench.block_length import reference_blocks
    from eval.compare import bounds_on, paired

    tok = load_tokenizer(ModelConfig(name_or_path="embedded:smollm2-135m-instruct"))
    domains = {"in_domain": build_sequences(DataConfig(seq_length=args.seq_length, heldout_sequences=args.blocks),
                                         tok).heldout,
               "out_of_domain": reference_blocks(tok, args.seq_length, args.blocks)}
    result: dict = {name: {} for name in ["parent", *exports]}
    draws = {}
    for name, path in exports.items():
        model, _, meta = load_diffusion_model(path)
        rows = model.get_output_embeddings().weight.shape[0]
        blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id)
        objective, forward = objectives.for_meta(meta, blocked, "sdpa", "fp32"), ModelForward(model, "cpu")
        for domain, x0 in domains.items():
            scored = objective.scored(x0)
            if domain not in draws:
                draws[domain] = draw_masks(scored, args.draws, "count", meta.eps, rng.generator(0, "estimate"))
                parent = load_causal_lm(ModelConfig(name_or_path="embedded:smollm2-135m-instruct", dtype="fp32"))
                set_causal(parent, True)
                none = torch.zeros(parent.get_output_embeddings().weight.shape[0], dtype=torch.bool)
                nll = causal_nll(ModelForward(parent.eval(), "cpu"), x0, none, 4)
                result["parent"][domain] = summarize(nll, x0.shape[1] - 1).as_dict()
            per_block = bounds_on(objective, forward, x0, *draws[domain], 4)
            result[name][domain] = summarize(per_block, scored.sum(1)).as_dict() | {"per_block": per_block}
        print(f"scored {name}", file=sys.stderr, flush=True)
    first = next(iter(exports))
    for name, path in exports.items():
        timing = path.parent / "study_seconds.txt"
        result[name]["train_seconds"] = float(timing.read_text()) if timing.exists() else None
    for name in exports:
        for domain in domains:
            row = result[name][domain]
            row.update({f"vs_{first}_{k}": v for k, v in paired(result[first][domain]["per_block"],
                                                                row.pop("per_block").clone(),
                                                                domains[domain].shape[1] - 1).items()}
                       if name != first else {})
    for domain in domains:
        result[first][domain].pop("per_block", None)
    return result


def table(result: dict, first: str) -> str:
    lines = ["| variant | in-domain bound | x parent | vs first (95% CI) "
             "| out-of-domain bound | x parent | vs first (95% CI) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    parent = result["parent"]
    for name, row in result.items():
        if name == "parent":
            continue
        cells = [name]
        for domain in ("in_domain", "out_of_domain"):
            r = row[domain]
            vs = (f"{r[f'vs_{first}_ppl_ratio']:.3f} ({r[f'vs_{first}_ppl_ratio_low']:.3f}-"
                  f"{r[f'vs_{first}_ppl_ratio_high']:.3f})") if name != first else "1"
            cells += [f"{r['ppl']:.1f}", f"{r['ppl'] / parent[domain]['ppl']:.2f}", vs]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| parent (exact) | {parent['in_domain']['ppl']:.2f} | 1 | "
                 f"| {parent['out_of_domain']['ppl']:.2f} | 1 | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--lr", default="", help="learning rate for every variant (a variant's own lr wins)")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (data order, draws); 0 is the recipe's")
    ap.add_argument("--common", nargs="*", default=[], help="overrides for every variant (before a variant's own)")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    exports = {name: train(name, args) for name in args.variants}
    result = score(exports, args)
    print(table(result, args.variants[0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
