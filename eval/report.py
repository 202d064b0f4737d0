"""Markdown report from the results JSON files of one output folder.

    python -m eval.report OUT_DIR          (eval.suite calls this at the end)

Each section is built from the file of one script (likelihood, generation, infill, harness, mauve,
speed) and left out when that file is missing; the figures are the PNGs written beside them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from eval.cli import user_errors
from eval.options import EvalError
from eval.results import read_results
from eval.speed import table as speed_table


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def likelihood_section(r: dict) -> list[str]:
    e, p = r["elbo"], r["parent"]
    lines = ["## Held-out perplexity", "",
             f"Same {e['tokens']} held-out tokens for both models; dataset perplexity = exp(mean NLL per token) "
             "(001 appendix A.1). The diffusion value is an upper bound (ELBO), estimated by Monte Carlo.", "",
             "| model | perplexity | 95% CI |", "|---|---:|---:|",
             f"| diffusion, ELBO bound ({e['method']} t, {e['t_samples_per_block']} draws/block) | <= {_f(e['ppl'])} | "
             f"{_f(e['ppl_low'])} - {_f(e['ppl_high'])} |",
             f"| parent causal LM, exact | {_f(p['ppl'])} | {_f(p['ppl_low'])} - {_f(p['ppl_high'])} |", ""]
    v = r["variance"]
    first = next(iter(v["per_token_nats2"]))
    lines += [f"Variance of one block's {v['t_samples']}-draw estimate (per token, nats^2), from "
              f"{v['replicates']} independent replicates on each of {v['blocks']} blocks (equal cost per method):", "",
              "| t sampling | estimator variance | relative to " + first + " | bound (ppl) | model calls |",
              "|---|---:|---:|---:|---:|"]
    for m, var in v["per_token_nats2"].items():
        lines.append(f"| {m} | {var:.3e} | {_f(v['ratio_to_first'][m])} | {_f(r['methods'][m]['ppl'])} | "
                     f"{r['methods'][m]['model_calls']} |")
    return lines + [""]


def _gen_row(row: dict, name: str, nfe: str) -> str:
    g, d = row["gen_ppl"], row["diversity"]
    return (f"| {name} | {nfe} | {_f(g['ppl'])} ({_f(g['ppl_low'])} - {_f(g['ppl_high'])}) | "
            f"{_f(d['unique_unigrams'], 3)} ± {_f(d['unique_unigrams_std'], 3)} | {_f(d['unigram_entropy'])} | "
            f"{_f(d['repetition_rate'], 3)} |")


def generation_section(r: dict, out_dir: Path) -> list[str]:
    judge = (r["runs"] or r["references"])[0]["gen_ppl"]["judge"]
    lines = ["## Generation quality vs sampling steps", "",
             f"Generative perplexity under the judge `{judge}` (95% CI over samples) and diversity of the generated "
             "tokens (001 table 4: unique unigram fraction, unigram entropy in nats, repetition rate = fraction of "
             "tokens found among the previous 100).", ""]
    for mode in dict.fromkeys(x["mode"] for x in r["runs"] + r["references"]):
        lines += [f"**{mode}**", "",
                  "| sampler / source | NFE | gen. perplexity | unique unigrams | entropy | rep. rate |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in (x for x in r["runs"] if x["mode"] == mode):
            lines.append(_gen_row(row, f"{row['sampler']} ({row['steps']} steps)", _f(row["nfe_per_batch"], 0)))
        for row in (x for x in r["references"] if x["mode"] == mode):
            lines.append(_gen_row(row, f"*{row['source']}*", "-"))
        lines.append("")
    if (out_dir / "generation.png").is_file():
        lines += ["![steps / quality frontier](generation.png)", ""]
    return lines


def infill_section(r: dict) -> list[str]:
    lines = ["## Infilling held-out spans", "",
             f"{r['examples']} spans of {r['span_length']} tokens between {r['left']} tokens (BOS included) on the "
             f"left and {r['right']} on the right. The parent sees only the left side.", "",
             "| method | exact match | token accuracy | fill ppl (judge, given left) "
             "| right-context ppl (given left + fill) |",
             "|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        right = row.get("right_ppl", {}).get("ppl")
        lines.append(f"| {row['method']} | {_f(row['exact_match'], 3)} | {_f(row['token_accuracy'], 3)} | "
                     f"{_f(row['fill_ppl']['ppl'])} | {_f(right)} |")
    return lines + [""]


def harness_section(r: dict) -> list[str]:
    labels = list(r["results"])
    lines = ["## lm-evaluation-harness tasks", "",
             f"Local tasks made from held-out text (eval/tasks), limit {r['limit']} documents per task. "
             "The diffusion model's log-likelihoods are ELBO lower bounds.", "",
             "| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    tasks = dict.fromkeys(t for lab in labels for t in r["results"][lab])
    for task in tasks:
        metrics = dict.fromkeys(m for lab in labels for m in r["results"][lab].get(task, {}) if "stderr" not in m)
        for m in metrics:
            vals = [r["results"][lab].get(task, {}).get(m) for lab in labels]
            lines.append(f"| {task} | {m} | " + " | ".join(_f(v, 3) for v in vals) + " |")
    return lines + [""]


def mauve_section(r: dict) -> list[str]:
    if "skipped" in r:
        return ["## MAUVE", "", r["skipped"], ""]
    lines = ["## MAUVE", "", f"Prompted samples vs held-out continuations, featurizer `{r['featurizer']}`, "
             f"mean ± std over {r['seeds']} seeds.", "", "| samples | MAUVE |", "|---|---:|"]
    lines += [f"| {row['source']} | {_f(row['mauve'], 3)} ± {_f(row['mauve_std'], 3)} |" for row in r["rows"]]
    return lines + [""]


def speed_section(r: dict, out_dir: Path) -> list[str]:
    lines = ["## Sampling speed", "", f"Batch {r['batch']}, prompt {r['prompt_length']} tokens, median of "
             f"{r['repeats']} runs; the parent uses its KV cache.", ""] + speed_table(r["rows"]) + [""]
    if (out_dir / "speed.png").is_file():
        lines += ["![latency and tokens/s](speed.png)", ""]
    return lines


def header(out_dir: Path, suite: dict | None = None) -> list[str]:
    suite = suite if suite is not None else read_results(out_dir, "suite") or {}
    prov = next((x["provenance"] for x in (read_results(out_dir, n) for n in ("likelihood", "generation", "speed"))
                 if x and "provenance" in x), {})
    m = prov.get("machine", {})
    lines = [f"# Evaluation report: `{prov.get('model_dir', '?')}`", "",
             f"- parent: `{prov.get('parent', '?')}`, judge: `{prov.get('judge', '?')}`, seed {prov.get('seed', '?')}, "
             f"dtype {prov.get('dtype', '?')}, device {prov.get('device', '?')}",
             f"- machine: {m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')} "
             f"({m.get('torch_threads', '?')} threads){', ' + m['gpu'] if m.get('gpu') else ''}"]
    if suite:
        lines.append(f"- budget `{suite.get('budget')}`, total {_f(suite.get('seconds'), 0)} s: "
                     + ", ".join(f"{k} {_f(v, 0)} s" for k, v in suite.get("stage_seconds", {}).items()))
        lines += [f"- **{k} failed**: {v}" for k, v in suite.get("errors", {}).items()]
    return lines + [""]


def build_report(out_dir: Path, suite: dict | None = None) -> Path:
    """Write out_dir/report.md from whatever results files are there; returns its path. `suite`: the suite's
    summary when it is not (yet) in out_dir/suite.json."""
    out_dir = Path(out_dir)
    lines = header(out_dir, suite)
    sections = (("likelihood", likelihood_section), ("generation", lambda r: generation_section(r, out_dir)),
                ("infill", infill_section), ("harness", harness_section), ("mauve", mauve_section),
                ("speed", lambda r: speed_section(r, out_dir)))
    for name, build in sections:
        r = read_results(out_dir, name)
        if r is not None:
            lines += build(r)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a folder of eval results (JSON files)")
    out_dir = parser.parse_args(argv).out_dir
    with user_errors():
        if not out_dir.is_dir() or not any(out_dir.glob("*.json")):
            raise EvalError(f"{out_dir} holds no eval results (*.json); run an eval script with --out-dir {out_dir}")
        path = build_report(out_dir)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
