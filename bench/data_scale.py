"""Data at scale (issue 30): prepare throughput and memory, and what a training launch pays for a big store.

    python bench/data_scale.py [--tokens 100e6] [--small 10e6] [--tiny 1e6] [--workdir /tmp/data_scale]
                               [--steps 3] [--skip-train] [--baseline-commit SHA] [--json out.json]

The corpus is synthetic, built from text shipped in an installed package: the English Wikipedia extract in
gensim's test data (the embedded corpus, 103 articles, 0.56M tokens), repeated with variation (each copy numbers
its titles and shuffles every article's paragraphs with its own seed) up to the asked number of tokens, as JSONL.

  1. `python -m adapt.prepare recipes/debug.yaml` on the big corpus with data.num_proc 1 and 2, on the small and
     tiny ones with 1: wall seconds, tokenising tokens/s (the manifest's), peak RSS of the largest process and of
     the process tree (main + workers, sampled every 0.1 s).
  2. A short debug-recipe training run (`python adapt/run.py recipes/debug.yaml`, one rank, --steps steps) on the
     prepared tiny and big stores, --repeats times in turn: peak RSS, and seconds from launch to the first step's
     record in metrics.jsonl.
  3. With --baseline-commit: the default recipe's first data set-up (embedded corpus, block 256, empty cache)
     with that commit's adapt/data/corpus.py (build_sequences) against this one's, time and peak RSS.
Every command runs in its own process; the figures are one run each (quote the machine: `lscpu`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "debug.yaml"


def build_corpus(out: Path, tokens: float, cache: Path) -> dict:
    """A JSONL corpus of about `tokens` tokens (SmolLM2's tokenizer) from the embedded extract, made once."""
    from adapt.data.corpus import embedded_corpus

    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    pages = [json.loads(line) for line in embedded_corpus(cache).read_text().splitlines()]
    per_char = 556_048 / sum(len(p["text"]) for p in pages)  # tokens per character of the extract (measured)
    chars, copy = 0, 0
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        while chars * per_char < tokens:
            for i, page in enumerate(pages):
                paragraphs = page["text"].split("\n")
                random.Random(copy * 100_003 + i).shuffle(paragraphs)
                text = f"{page['title']} ({copy})\n" + "\n".join(paragraphs)
                f.write(json.dumps({"text": text}) + "\n")
                chars += len(text)
            copy += 1
    tmp.rename(out)
    info = {"copies": copy, "documents": copy * len(pages), "bytes": out.stat().st_size,
            "estimated_tokens": round(chars * per_char)}
    meta.write_text(json.dumps(info))
    return info


WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")
"""Runs a command and prints the peak RSS of the largest process it waited for (the command, or a worker)."""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall seconds, exit code, peak RSS of its largest process (getrusage) and of its tree (sampled)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *cmd], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tree_peak, out = 0, []
    import threading

    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - t0
    text = "".join(out)
    largest = int(text.rsplit("MAXRSS_KIB ", 1)[1].split()[0])
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "start": t0, "output": text,
            "peak_rss_gib": round(largest / 2**20, 3),
            "tree_peak_rss_gib": round(tree_peak / 2**30, 3)}


def prepare(corpus: Path, cache: Path, num_proc: int) -> dict:
    """`python -m adapt.prepare` of the corpus into an empty cache: its figures and the store's manifest."""
    r = measure([sys.executable, "-m", "adapt.prepare", str(RECIPE), f"data.train_files=[{corpus}]",
                 f"data.cache_dir={cache}", f"data.num_proc={num_proc}"])
    if r["rc"]:
        raise SystemExit(f"prepare failed:\n{r['output'][-3000:]}")
    (manifest,) = (cache / "stores").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    return {"num_proc": num_proc, "tokens": m["tokens"], "documents": m["documents"], "wall_s": r["wall_s"],
            "tokenise_s": m["prepared"]["seconds"], "tokens_per_s": m["prepared"]["tokens_per_s"],
            "peak_rss_gib": r["peak_rss_gib"], "tree_peak_rss_gib": r["tree_peak_rss_gib"]}


def train(corpus: Path, cache: Path, runs: Path, name: str, steps: int) -> dict:
    """A debug-recipe run of `steps` steps on a prepared store: peak RSS, launch to the first step's record."""
    run_dir = runs / name
    r = measure([sys.executable, str(ROOT / "adapt" / "run.py"), str(RECIPE), f"data.train_files=[{corpus}]",
                 f"data.cache_dir={cache}", f"run.output_dir={runs}", f"run.name={name}", f"train.max_steps={steps}",
                 "train.log_every=1", "train.save_every=0", "run.sample_length=0", "run.resume=never"],
                {"OMP_NUM_THREADS": "2"})
    if r["rc"]:
        raise SystemExit(f"training failed:\n{r['output'][-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    launched = time.time() - (time.perf_counter() - r["start"])  # the launch on the wall clock
    first = min(row["time"] for row in rows if row["kind"] == "train" and row["time"] > launched)
    blocks = next((line for line in r["output"].splitlines() if "train blocks" in line), "")
    return {"store_tokens": corpus.name, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"],
            "tree_peak_rss_gib": r["tree_peak_rss_gib"], "launch_to_first_step_s": round(first - launched, 1),
            "log": blocks.strip()}


FIRST_START = """
import importlib.util, json, resource, sys, time
sys.path.insert(0, {root!r})
from adapt.recipe.config import DataConfig, ModelConfig
from adapt.model.causal import load_tokenizer
spec = importlib.util.spec_from_file_location("data_under_test", {data!r})
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
tok = load_tokenizer(ModelConfig())
mod.embedded_corpus({cache!r})  # the JSONL made from the gensim dump: the same for both
t0 = time.perf_counter()
dcfg = DataConfig(seq_length=256, heldout_sequences=16, cache_dir={cache!r})
dcfg.block_size, dcfg.heldout_blocks = dcfg.seq_length, dcfg.heldout_sequences  # the names of older data.py
build = getattr(mod, "build_sequences", None) or mod.build_blocks
blocks = build(dcfg, tok)
print(json.dumps({{"seconds": round(time.perf_counter() - t0, 1), "train_blocks": len(blocks.train),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}}))
"""


def first_start(commit: str, work: Path) -> dict:
    """The default recipe's first data set-up with `commit`'s adapt/data.py (the layout before adapt/data/) and with
    this one's adapt/data/corpus.py."""
    old = work / "data_baseline.py"
    old.write_text(subprocess.run(["git", "show", f"{commit}:adapt/data.py"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout)
    out = {}
    for label, path in (("baseline", old), ("store", ROOT / "adapt" / "data" / "corpus.py")):
        cache = work / f"first_{label}"
        code = FIRST_START.format(root=str(ROOT), data=str(path), cache=str(cache))
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"first start ({label}) failed:\n{r.stderr[-3000:]}")
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=100e6, help="tokens of the big corpus")
    p.add_argument("--small", type=float, default=10e6, help="tokens of the small corpus (RSS flatness)")
    p.add_argument("--tiny", type=float, default=1e6, help="tokens of the corpus the training run compares with")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/data_scale"))
    p.add_argument("--steps", type=int, default=3, help="training steps of each run")
    p.add_argument("--repeats", type=int, default=2, help="training runs of each store (alternating)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--baseline-commit", default="", help="also time the first data set-up of this commit")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu": _cpu(), "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
                    "corpora": {}, "prepare": [], "train": []}
    sizes = {"big": args.tokens, "small": args.small, "tiny": args.tiny}
    corpora = {k: work / f"corpus_{k}.jsonl" for k in sizes}
    for k, n in sizes.items():
        report["corpora"][k] = build_corpus(corpora[k], n, work / "embedded")
        print(f"corpus {k}: {report['corpora'][k]}", flush=True)
    for k, num_proc in (("tiny", 1), ("small", 1), ("big", 1), ("big", 2)):
        cache = work / f"cache_{k}_np{num_proc}"
        if cache.exists():
            raise SystemExit(f"{cache} exists: remove {work} (or give another --workdir) for a cold prepare")
        row = {"corpus": k, **prepare(corpora[k], cache, num_proc)}
        report["prepare"].append(row)
        print(f"prepare: {row}", flush=True)
    if not args.skip_train:  # alternating, so a drift of the machine (or a cold first load) falls on both
        for rep in range(args.repeats):
            for k in ("tiny", "big"):
                row = {"corpus": k, "repeat": rep,
                       **train(corpora[k], work / f"cache_{k}_np1", work / "runs", f"train_{k}_{rep}", args.steps)}
                report["train"].append(row)
                print(f"train: {row}", flush=True)
    if args.baseline_commit:
        report["first_start"] = first_start(args.baseline_commit, work)
        print(f"first start: {report['first_start']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _cpu() -> str:
    try:
        line = next(ln for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                    if ln.startswith("Model name"))
        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
