"""Run every evaluation at a budget, then write the Markdown report.

    python -m eval.suite MODEL_DIR --budget quick|full [--out-dir eval_out] [--skip speed mauve]

The models are loaded once and shared by the stages. A stage is an eval script run through the scripts'
own entry (eval.cli): a budget is a set of that script's options, turned into its command line and parsed
by its own parser (so every number can be reproduced with the single script and the options recorded
in its JSON), and the common options of the suite are passed on. All stages' options are checked before
the models load. Each stage writes its JSON (and PNG) into --out-dir; a stage that fails is recorded in
suite.json and the report, the others still run, and the exit code is 1. `quick` is sized for a 135M
model on a 2-core CPU (a few minutes); `full` for a GPU.
"""
from __future__ import annotations

import argparse
import time
import traceback

from eval import generation, infill, likelihood, local_tasks, mauve_score, speed
from eval.cli import Script, execute, parse, run_script
from eval.heldout import heldout_stream
from eval.models import EvalContext
from eval.options import add_common_args, text
from eval.report import build_report

NAME = "suite"
STAGES: dict[str, Script] = {"likelihood": likelihood.SCRIPT, "generation": generation.SCRIPT,
                             "infill": infill.SCRIPT, "harness": local_tasks.SCRIPT, "mauve": mauve_score.SCRIPT,
                             "speed": speed.SCRIPT}
"""Stage name -> the script it runs, in running order (mauve reads the samples generation writes)."""

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
                           methods=["count", "stratified", "uniform", "antithetic"]),
        "generation": dict(steps=[8, 32, 128], samples=16, length=128, prompt_length=32, gen_length=64),
        "infill": dict(spans=64, samplers=["ancestral", "analytic", "confidence", "threshold"]),
        "harness": dict(limit=200, mc_samples=32, batch_size=16),
        "mauve": dict(seeds=5, max_tokens=100),
        "speed": dict(lengths=[32, 64, 128, 256], repeats=3),
    },
}
"""Budget -> stage -> options of that stage's script (argument names as in its parser)."""

PASSED_ON = {"mauve_featurizer": ("mauve", "featurizer")}
"""Suite arguments given to one stage as one of its options: suite argument -> (stage, option)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STAGES), help="stages to leave out")
    parser.add_argument("--mauve-featurizer", type=text, default="gpt2-large",
                        help="local HF model for MAUVE features (the mauve stage's --featurizer)")


def to_argv(options: dict) -> list[str]:
    """Command-line tokens of {argument name: value}: --name-with-dashes value(s); None, "" and [] are left out."""
    argv = []
    for dest, value in options.items():
        if value is None or value == "" or value == [] or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if value is True else [flag, *map(str, value)] if isinstance(value, (list, tuple)) \
            else [flag, str(value)]
    return argv


def _common(model: bool) -> list[str]:
    """The argument names of eval.options.add_common_args (MODEL_DIR aside)."""
    parser = argparse.ArgumentParser()
    add_common_args(parser, model)
    return [k for k in vars(parser.parse_args(["MODEL_DIR"] if model else [])) if k != "model_dir"]


def stage_args(name: str, base: argparse.Namespace) -> argparse.Namespace:
    """A stage's parsed arguments: the suite's common options, then the budget's, parsed by the script."""
    script = STAGES[name]
    options = dict(BUDGETS[base.budget][name])
    options.update({option: getattr(base, arg) for arg, (stage, option) in PASSED_ON.items() if stage == name})
    argv = [str(base.model_dir)] if script.model else []
    argv += to_argv({k: getattr(base, k) for k in _common(script.model)}) + to_argv(options)
    return parse(script, argv)


def stages(base: argparse.Namespace) -> list[str]:
    return [s for s in STAGES if s not in base.skip]


def check(base: argparse.Namespace) -> None:
    """Every stage's options parse (a budget with a bad option fails here, before any model loads)."""
    for name in stages(base):
        stage_args(name, base)


def run(ctx: EvalContext, base: argparse.Namespace) -> dict:
    start = time.perf_counter()
    heldout_stream(ctx.data, ctx.tokenizer)  # unusable text is the user's error (exit 2), not six failed stages
    seconds, errors = {}, {}
    for name in stages(base):
        print(f"\n=== {name} ({base.budget}) ===", flush=True)
        t0 = time.perf_counter()
        script = STAGES[name]
        try:
            execute(script, ctx if script.model else None, stage_args(name, base))
        except Exception as err:  # one failing stage must not lose the others' results
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            traceback.print_exc()
        seconds[name] = time.perf_counter() - t0
    return {"budget": base.budget, "seconds": time.perf_counter() - start, "stage_seconds": seconds,
            "errors": errors, "skipped": base.skip, "budgets": BUDGETS[base.budget]}


def write_report(result: dict, ctx: EvalContext, base: argparse.Namespace) -> dict:
    result["report"] = str(build_report(base.out_dir, suite=result))
    return result


def summary_lines(result: dict) -> list[str]:
    failed = f"; failed: {', '.join(result['errors'])}" if result["errors"] else ""
    return [f"\nwrote {result['report']} ({result['seconds']:.0f} s){failed}"]


SCRIPT = Script(NAME, "eval.suite", __doc__, add_args, run, summary_lines, write_report, check)


def main(argv: list[str] | None = None) -> int:
    """0 when every stage ran, 1 when one failed (recorded in suite.json and the report)."""
    return 1 if run_script(SCRIPT, argv)["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
