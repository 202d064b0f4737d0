"""lm-eval's local tasks on held-out text: the diffusion model next to its parent, on the same documents.

    python -m eval.local_tasks MODEL_DIR [--tasks adapt_cloze adapt_choice] [--limit 50] [--mc-samples 32]

Makes the tasks' data from the export's held-out text (eval.tasks.make_data, into <out-dir>/task_data),
then runs the tasks of eval/tasks through lm-eval with the `diffusion-lm` model (eval.harness: its
log-likelihoods are ELBO lower bounds) and with lm-eval's `hf` model on the parent (exact). Writes
<out-dir>/harness.json, the report's lm-evaluation-harness section; eval.suite runs it as that stage.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from adapt.train.likelihood import METHODS
from eval.cli import Script, run_script
from eval.harness import TASKS_DIR, DiffusionLM
from eval.models import EvalContext
from eval.options import ESTIMATOR, count
from eval.tasks.make_data import make as make_task_data

NAME = "harness"
LOCAL_TASKS = ["adapt_cloze", "adapt_choice", "adapt_documents", "adapt_cloze_gen"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=LOCAL_TASKS, choices=LOCAL_TASKS, metavar="TASK",
                        help=f"local tasks, of {', '.join(LOCAL_TASKS)}")
    parser.add_argument("--limit", type=count(1), default=200, help="documents per task")
    parser.add_argument("--mc-samples", type=count(1), default=32, help="Monte Carlo draws per request")
    parser.add_argument("--estimator", default=ESTIMATOR, choices=METHODS)
    parser.add_argument("--batch-size", type=count(1), default=16, help="rows per model call")


def _metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": ...} -> {"acc": 0.5, "acc_stderr": ...} (numbers only)."""
    out = {}
    for key, value in task_results.items():
        if isinstance(value, (int, float)) and "," in key:
            metric, filt = key.split(",", 1)
            out[metric if filt == "none" else f"{metric} ({filt})"] = float(value)
    return out


def evaluate_local(models: dict, tasks: list[str], limit: int | None, data_dir: Path,
                   num_fewshot: int | None = None) -> dict:
    """Run lm-eval tasks from eval/tasks on each model -> {label: {task: {metric: value}}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    previous = os.environ.get("ADAPT_EVAL_TASK_DATA")
    os.environ["ADAPT_EVAL_TASK_DATA"] = str(data_dir)
    try:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        results = {}
        for label, lm in models.items():
            out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0)
            results[label] = {task: _metrics(r) for task, r in out["results"].items()}
    finally:
        if previous is None:
            os.environ.pop("ADAPT_EVAL_TASK_DATA", None)
        else:
            os.environ["ADAPT_EVAL_TASK_DATA"] = previous
    return {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "results": results}


def run(ctx: EvalContext, args: argparse.Namespace) -> dict:
    from lm_eval.models.huggingface import HFLM

    data_dir = args.out_dir / "task_data"
    counts = make_task_data(ctx.data, ctx.tokenizer, data_dir, docs=max(50, args.limit))
    lm = DiffusionLM(pretrained=str(ctx.model_dir), loaded=(ctx.model, ctx.tokenizer, ctx.meta),
                     mc_samples=args.mc_samples, estimator=args.estimator, mc_batch=args.batch_size, seed=ctx.seed,
                     dtype=ctx.dtype)
    parent = HFLM(pretrained=ctx.parent(), tokenizer=ctx.tokenizer, batch_size=args.batch_size,
                  max_length=lm.max_length, device=str(ctx.device))
    result = evaluate_local({"diffusion (ELBO)": lm, "parent": parent}, args.tasks, args.limit, data_dir)
    result.update(task_examples=counts, mc_samples=args.mc_samples, estimator=lm.estimator, max_length=lm.max_length)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = []
    for label, tasks in result["results"].items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "stderr" not in k)
            lines.append(f"{label:<18} {task:<18} {shown}")
    return lines


SCRIPT = Script(NAME, "eval.local_tasks", __doc__, add_args, run, summary_lines)


def main(argv: list[str] | None = None) -> dict:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    main()
