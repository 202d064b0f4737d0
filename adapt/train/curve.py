"""curve.png: a run's held-out bounds against training tokens, the parent's exact perplexity as a line (drawn at
the end of every run, and by `python -m adapt.curve`).

The points are the perplexities of the run's `eval` records (keys ending in `ppl`): the bound before training
(`before_ppl`), during it (`ppl`, every train.eval_every steps) and after (`after_ppl`) make one series, each other
view its own (`before_causal_ppl`: the causal view; SFT's `answer_ppl`: the answers' share); `parent_ppl` is the
horizontal line. x is step x the tokens of one optimizer step (the train records' `tokens`: micro batch x
accumulation x ranks x block size). matplotlib (the `eval` extra) is imported only here, with the Agg canvas.
"""
from __future__ import annotations

from pathlib import Path

from adapt.train.checkpoint import curve_file, metrics_file
from adapt.train.metrics import read_records

PHASES = ("before_", "after_")
"""Prefixes of the evaluations before and after training; the same view without one is measured during it."""


class CurveError(ValueError):
    """There is nothing to draw (no metrics.jsonl, or no held-out evaluation in it)."""


def tokens_per_step(records: list[dict]) -> int | None:
    """Training tokens of one optimizer step, from the last train record that states them."""
    return next((int(r["tokens"]) for r in reversed(records) if r.get("kind") == "train" and "tokens" in r), None)


def series(records: list[dict]) -> tuple[dict[str, list[tuple[float, float]]], float | None, str]:
    """({view: [(x, ppl), ...] sorted by x}, the parent's exact perplexity or None, the x axis's label).

    x is training tokens, or optimizer steps when no train record states its tokens (a run that wrote none)."""
    per_step = tokens_per_step(records)
    points: dict[str, list[tuple[float, float]]] = {}
    parent = None
    for r in records:
        if r.get("kind") != "eval":
            continue
        for key, value in r.items():
            if not key.endswith("ppl") or not isinstance(value, (int, float)):
                continue
            if key == "parent_ppl":
                parent = float(value)
                continue
            view = next((key[len(p):] for p in PHASES if key.startswith(p)), key)[:-3].rstrip("_")
            x = r["step"] * (per_step or 1)
            points.setdefault(f"{view} bound" if view else "bound", []).append((float(x), float(value)))
    label = "training tokens" if per_step else "optimizer steps"
    return {k: sorted(v) for k, v in points.items()}, parent, label


def draw(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Draw run_dir/curve.png (or `out`); returns {"path", "points": {view: [(x, ppl)]}, "parent_ppl"}.

    Raises CurveError when there is nothing to draw and ImportError when matplotlib is missing."""
    run_dir = Path(run_dir)
    points, parent, xlabel = series(read_records(metrics_file(run_dir)))
    if not points:
        raise CurveError(f"no held-out evaluation in {metrics_file(run_dir)}")
    return _figure(points, parent, xlabel, run_dir.name, Path(out) if out is not None else curve_file(run_dir))


def _figure(points: dict[str, list[tuple[float, float]]], parent: float | None, xlabel: str, title: str,
            path: Path) -> dict:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for view, pts in points.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=view)
    if parent is not None:
        ax.axhline(parent, color="black", linestyle="--", label=f"parent, exact ({parent:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity (bounds: ELBO)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return {"path": path, "points": points, "parent_ppl": parent}


def draw_runs(run_dirs: list[str | Path], out: str | Path) -> dict:
    """The bound series of several runs on one figure `out` (each labelled by its folder), the first run's
    parent line; returns {"path", "points": {run name: [(x, ppl)]}, "parent_ppl"}. Raises as `draw`."""
    runs = {}
    parent = None
    for run_dir in map(Path, run_dirs):
        points, first_parent, xlabel = series(read_records(metrics_file(run_dir)))
        if "bound" not in points:
            raise CurveError(f"no held-out evaluation in {metrics_file(run_dir)}")
        runs[run_dir.name] = points["bound"]
        parent = first_parent if parent is None else parent
    return _figure(runs, parent, xlabel, "held-out bound against training tokens", Path(out))


def try_draw(run_dir: str | Path, say=print) -> Path | None:
    """`draw`, or one line through `say` saying why curve.png was skipped; never fails a finished run for it."""
    try:
        return draw(run_dir)["path"]
    except ImportError as err:
        say(f"curve.png skipped: matplotlib is not installed ({err}); pip install matplotlib (the `eval` extra)")
    except CurveError as err:
        say(f"curve.png skipped: {err}")
    return None
