"""Run every evaluation at a budget, then write the Markdown report.

    python -m eval.suite MODEL_DIR --budget quick|full [--out-dir eval_out] [--skip speed mauve]

The models are loaded once and shared by the stages. Each stage writes its JSON (and PNG) into
--out-dir; a stage that fails is recorded in suite.json and the report, the others still run, and
the exit code is 1. `quick` is sized for a 135M model on a 2-core CPU (a few minutes); `full`
for a GPU. A budget only changes the scripts' options: every number can be reproduced with the
single script and the options recorded in its JSON.
"""
from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

from eval import generation, infill, likelihood, speed
from eval import mauve_score
from eval.harness import DiffusionLM, evaluate_local
from eval.models import EvalContext, add_common_args, context_from_args
from eval.plots import speed_plot
from eval.report import build_report
from eval.results import provenance, write_results
from eval.tasks.make_data import make as make_task_data

STAGES = ("likelihood", "generation", "infill", "harness", "mauve", "speed")
LOCAL_TASKS = ["adapt_cloze", "adapt_choice", "adapt_documents", "adapt_cloze_gen"]

BUDGETS: dict[str, dict[str, dict]] = {
    "quick": {  # about 15k model-token forwards: ~3 min for 135M on 2 free cores
        "likelihood": dict(blocks=4, length=64, t_samples=4, replicates=4),
        "generation": dict(samplers=["analytic", "confidence"], steps=[4, 16], samples=2, length=24,
                           prompt_length=8, gen_length=16, batch_size=2),
        "infill": dict(spans=4, left=8, span_length=4, right=8, samplers=["ancestral", "confidence"]),
        "harness": dict(tasks=["adapt_cloze", "adapt_choice", "adapt_cloze_gen"], limit=4, mc_samples=4,
                        batch_size=8),
        "mauve": dict(seeds=1, max_tokens=100),
        "speed": dict(samplers=["ancestral", "confidence"], steps=[8], lengths=[16, 32], repeats=1),
    },
    "full": {
        "likelihood": dict(blocks=16, length=256, t_samples=8, replicates=4,
                           methods=["stratified", "uniform", "antithetic", "count"]),
        "generation": dict(steps=[8, 32, 128], samples=16, length=128, prompt_length=32, gen_length=64),
        "infill": dict(spans=64, samplers=["ancestral", "analytic", "confidence", "threshold"]),
        "harness": dict(tasks=LOCAL_TASKS, limit=200, mc_samples=32, batch_size=16),
        "mauve": dict(seeds=5, max_tokens=100),
        "speed": dict(lengths=[32, 64, 128, 256], repeats=3),
    },
}


def stage_args(module, overrides: dict, base: argparse.Namespace) -> argparse.Namespace:
    """The script's own defaults, overridden by the budget, with the suite's common options."""
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    ns = parser.parse_args([])
    vars(ns).update(vars(base))
    vars(ns).update(overrides)
    return ns


def run_harness(ctx: EvalContext, opts: dict, out_dir: Path) -> dict:
    """Local held-out tasks with the diffusion model and, through lm-eval's `hf` model, the parent."""
    from lm_eval.models.huggingface import HFLM

    counts = make_task_data(ctx.data, ctx.tokenizer, out_dir / "task_data", docs=max(50, opts["limit"]))
    lm = DiffusionLM(pretrained=str(ctx.model_dir), loaded=(ctx.model, ctx.tokenizer, ctx.meta),
                     mc_samples=opts["mc_samples"], mc_batch=opts["batch_size"], seed=ctx.seed)
    parent = HFLM(pretrained=ctx.parent(), tokenizer=ctx.tokenizer, batch_size=opts["batch_size"],
                  max_length=lm.max_length, device=str(ctx.device))
    result = evaluate_local({"diffusion (ELBO)": lm, "parent": parent}, opts["tasks"], opts["limit"], out_dir / "task_data")
    result.update(task_examples=counts, mc_samples=opts["mc_samples"], estimator=lm.estimator, max_length=lm.max_length)
    return result


def run_stage(name: str, ctx: EvalContext, opts: dict, base: argparse.Namespace) -> dict:
    """Run one stage and write its results file; returns the results."""
    out = base.out_dir
    if name == "harness":
        result = run_harness(ctx, opts, out)
    elif name == "mauve":
        samples = out / "generation_samples.jsonl"
        if not samples.is_file():
            result = {"skipped": "MAUVE skipped: no generation samples (run the generation stage first)"}
        else:
            result = mauve_score.run(samples, base.mauve_featurizer, opts["seeds"], opts["max_tokens"], base.device)
        print(result.get("skipped", "MAUVE done"))
        write_results(out, "mauve", result)
        return result
    else:
        module = {"likelihood": likelihood, "generation": generation, "infill": infill, "speed": speed}[name]
        args = stage_args(module, opts, base)
        result = module.run(ctx, args)
        if name == "generation":
            return generation.write_all(result, out, ctx, args)
        if name == "speed":
            out.mkdir(parents=True, exist_ok=True)
            result["plot"] = str(speed_plot(result["rows"], out / "speed.png"))
        opts = vars(args)
    result["provenance"] = provenance(ctx, {k: v for k, v in opts.items() if k != "model_dir"})
    write_results(out, name, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.suite", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick")
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages to leave out")
    parser.add_argument("--mauve-featurizer", default="gpt2-large", help="local HF model for MAUVE features")
    base = parser.parse_args(argv)
    start = time.perf_counter()
    ctx = context_from_args(base)
    seconds, errors = {}, {}
    for name in (s for s in STAGES if s not in base.skip):
        print(f"\n=== {name} ({base.budget}) ===", flush=True)
        t0 = time.perf_counter()
        try:
            run_stage(name, ctx, BUDGETS[base.budget][name], base)
        except Exception as err:  # one failing stage must not lose the others' results
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            traceback.print_exc()
        seconds[name] = time.perf_counter() - t0
    write_results(base.out_dir, "suite", {"budget": base.budget, "seconds": time.perf_counter() - start,
                                          "stage_seconds": seconds, "errors": errors, "skipped": base.skip,
                                          "budgets": BUDGETS[base.budget]})
    report = build_report(base.out_dir)
    print(f"\nwrote {report} ({time.perf_counter() - start:.0f} s)" + (f"; failed: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
