"""A third objective needs one class and one registry entry, from this file alone: no module of the package
changes. It trains through the real entry point (training steps and the held-out bound), records its name in
the export, and eval.likelihood and adapt.sample rebuild it from that export.

The objective: masked diffusion over the second half of each sequence only (the first half is always given, a
continuation objective). Its bound covers the second half, so the token counts tell that it, and not masked
diffusion over the whole sequence, was built at each stage. The scenario runs in a child process (the training
entry point starts a process group) that imports this file and registers the class there."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT

from adapt.objectives import OBJECTIVES, MaskedDiffusion

LENGTH = 32


class SuffixDiffusion(MaskedDiffusion):
    """Masked diffusion of the second half of each sequence given the first half."""

    name = "suffix"

    def maskable(self, x0: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        ok = super().maskable(x0, loss_mask)
        ok[:, : x0.shape[1] // 2] = False
        return ok


def register() -> None:
    OBJECTIVES[SuffixDiffusion.name] = SuffixDiffusion


def scenario(root: str, model: str, corpus: str) -> None:
    """Train, evaluate and sample with the registered objective; print what each stage produced as JSON."""
    register()
    from adapt import run, sample
    from eval import likelihood

    recipe = str(ROOT / "recipes" / "debug.yaml")
    code = run.main([recipe, f"model.name_or_path={model}", "model.dtype=fp32", f"data.train_files=[{corpus}]",
                     f"data.cache_dir={root}/cache", f"run.output_dir={root}", f"data.seq_length={LENGTH}",
                     "diffusion.objective=suffix", "train.max_steps=2", "train.save_every=0", "train.log_every=1",
                     "attention.anneal_steps=0", "run.sample_length=4", "run.sample_steps=2"])
    final = Path(root) / "debug" / "final"
    bound = likelihood.main([str(final), "--out-dir", f"{root}/eval", "--blocks", "2", "--length", str(LENGTH),
                             "--t-samples", "2", "--replicates", "2", "--methods", "stratified",
                             "--data-files", corpus, "--cache-dir", f"{root}/cache"])
    sampled = sample.main([str(final), "--prompt", "The history of", "--length", "4", "--steps", "2"])
    print("RESULT " + json.dumps({"train": code, "sample": sampled, "bound_tokens": bound["elbo"]["tokens"],
                                  "bound_ppl": bound["elbo"]["ppl"]}))


def test_a_registered_objective_trains_evaluates_and_samples(tmp_path, tiny_model_dir, corpus_file):
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; import test_third_objective as t; "
            f"t.scenario({str(tmp_path)!r}, {str(tiny_model_dir)!r}, {str(corpus_file)!r})")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["train"] == 0 and result["sample"] == 0
    # the bound of eval.likelihood covers the second half of each of its 2 blocks: the export named the objective
    assert result["bound_tokens"] == 2 * (LENGTH - LENGTH // 2)
    assert result["bound_ppl"] > 1
    run = tmp_path / "debug"
    assert json.loads((run / "final" / "diffusion.json").read_text())["objective"] == "suffix"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    counts = [v for r in evals for k, v in r.items() if k.endswith("_tokens")]
    # the training run's bounds (before, after) over its held-out blocks: the second halves only
    assert counts and all(c % (LENGTH - LENGTH // 2) == 0 and c % (LENGTH - 1) for c in counts), evals
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 2 and all(v == v for v in losses)


def test_an_unregistered_objective_is_refused_by_name(tmp_path):
    """Without its registry entry the same recipe is refused before any work, naming the registered objectives."""
    out = subprocess.run([sys.executable, str(ROOT / "adapt" / "run.py"), str(ROOT / "recipes" / "debug.yaml"),
                          "diffusion.objective=suffix", f"run.output_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "suffix" in out.stderr and "mdlm" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "debug").exists()
