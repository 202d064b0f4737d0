"""The real entry point, end to end on a tiny model: checkpoint tree, export, resume, accumulation."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

RECIPE = ROOT / "recipes" / "debug.yaml"


def tiny_run_args(run_root: Path, model_dir: Path, corpus: Path, *overrides: str) -> list[str]:
    """adapt/run.py's overrides for a run of the tiny model on the small corpus under run_root."""
    return [f"model.name_or_path={model_dir}", "model.dtype=fp32", f"data.train_files=[{corpus}]",
            f"data.cache_dir={run_root / 'cache'}", f"run.output_dir={run_root}", "train.log_every=1",
            "run.sample_length=4", "run.sample_steps=2", *overrides]


def free_port() -> int:
    """A TCP port no process listens on now (test processes run side by side, each launch needs its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_root: Path, model_dir: Path, corpus: Path, *overrides: str, ranks: int = 0,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run adapt/run.py on the tiny model: `python` when ranks == 0, else the deepspeed launcher."""
    args = tiny_run_args(run_root, model_dir, corpus, *overrides)
    if ranks:
        # the launcher of this interpreter's environment, found without relying on PATH
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(ROOT / "adapt" / "run.py"), str(RECIPE), *args]
    else:
        cmd = [sys.executable, str(ROOT / "adapt" / "run.py"), str(RECIPE), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if ranks else "2", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("runs")
    launch(root, tiny_model_dir, corpus_file, "train.max_steps=6", "train.save_every=3",
           "attention.anneal_steps=3")
    return root / "debug"


def test_run_writes_checkpoint_tree_and_metrics(finished_run):
    ckpts = finished_run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003", "step_0000006"]
    for tag in ("step_0000003", "step_0000006"):
        marker = json.loads((ckpts / tag / "COMPLETE").read_text())
        assert marker["step"] == int(tag[5:])
        recorded = set(marker["files"])  # every shard and the config, with size and checksum
        assert "config.yaml" in recorded and any(name.endswith("optim_states.pt") for name in recorded)
        assert all((ckpts / tag / n).stat().st_size == marker["files"][n]["bytes"] for n in recorded)
        assert "max_steps: 6" in (ckpts / tag / "config.yaml").read_text()
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["masked_tokens"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert [r["anneal_ratio"] for r in train] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])  # r of the step taken
    summary = [r for r in rows if r["kind"] == "summary"][-1]
    for key in ("parent_ppl", "before_ppl", "after_ppl", "before_causal_ppl", "export", "sample"):
        assert key in summary


def test_export_round_trip(finished_run):
    from transformers import AutoModelForCausalLM

    from adapt.export import load_diffusion_model
    from adapt.train.distributed import consolidated_state_dict

    final = finished_run / "final"
    meta = json.loads((final / "diffusion.json").read_text())
    assert meta["shift"] is True and meta["bidirectional"] is True and meta["anneal_ratio"] == 1.0
    assert meta["mask_token_id"] == meta["real_vocab_size"] - 1
    saved = load_file(final / "model.safetensors")
    ckpt = consolidated_state_dict(finished_run / "checkpoints", "step_0000006")
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor.float(), ckpt[name].float(), rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(final)  # plain HF still loads the weights
    assert plain.get_input_embeddings().weight.shape[0] % 64 == 0
    model, tokenizer, meta_obj = load_diffusion_model(final)
    assert tokenizer.mask_token is not None
    assert tokenizer.convert_tokens_to_ids(tokenizer.mask_token) == meta_obj.mask_token_id
    assert all(not m.is_causal for m in model.modules() if hasattr(m, "is_causal"))
    # bidirectional by behaviour: changing the last token moves the logits of the first ones
    x = torch.randint(0, 1000, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 7) % 1000
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[0, :-1] - b[0, :-1]).abs().max() > 1e-4


def test_export_works_in_plain_transformers(finished_run):
    """The export carries its own decoder, decoding defaults and a card with the run's figures (issue 16)."""
    from transformers import AutoTokenizer

    from test_hf_generate import PROMPT, front_matter, library_ids, remote_model

    final = finished_run / "final"
    assert (final / "custom_generate" / "generate.py").is_file()
    head = front_matter(final / "README.md")
    assert head["library_name"] == "transformers" and "base_model" not in head  # a local parent has no Hub id
    evals = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    parent = next(r["parent_ppl"] for r in evals if r["kind"] == "eval" and "parent_ppl" in r)
    body = (final / "README.md").read_text()
    assert f"| parent causal LM, exact perplexity | 0 | {parent:.2f} |" in body
    assert "6 steps x 2 sequences (2 x 1 accumulation) x 64 tokens" in body
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok(PROMPT).input_ids
    got = remote_model(final).generate(torch.tensor([prompt]), max_new_tokens=8, diffusion_steps=4,
                                       diffusion_block_length=4)
    expect = library_ids(final, prompt, 8, "confidence", 4, 4, temperature=0, eos_id=tok.eos_token_id)
    if tok.eos_token_id in expect[len(prompt):]:  # generate cuts the columns after EOS; the library fills them
        expect = expect[:len(prompt) + expect[len(prompt):].index(tok.eos_token_id) + 1]
    assert got[0].tolist() == expect


def test_run_draws_the_curve(finished_run, tmp_path):
    """curve.png at the end of the run, named in the summary: the bounds against training tokens (issue 14)."""
    from adapt.train.curve import draw

    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in rows if r["kind"] == "summary"][-1]
    assert summary["curve"] == str(finished_run / "curve.png")
    assert (finished_run / "curve.png").read_bytes()[:4] == b"\x89PNG"
    evals = [r for r in rows if r["kind"] == "eval"]
    out = draw(finished_run, tmp_path / "again.png")
    assert out["points"]["bound"] == [(0.0, evals[0]["before_ppl"]), (6.0 * 2 * 64, evals[-1]["after_ppl"])]
    assert out["points"]["causal bound"] == [(0.0, evals[0]["before_causal_ppl"])]
    assert out["parent_ppl"] == evals[0]["parent_ppl"]


def test_standalone_export_of_an_earlier_checkpoint(finished_run, tmp_path):
    out = tmp_path / "step3"
    proc = subprocess.run([sys.executable, "-m", "adapt.export", str(finished_run), "--tag", "step_0000003",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "diffusion.json").read_text())
    assert meta["anneal_ratio"] == 1.0
    a, b = load_file(out / "model.safetensors"), load_file(finished_run / "final" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # step 3 is not step 6
    bad = subprocess.run([sys.executable, "-m", "adapt.export", str(finished_run), "--tag", "step_0000004"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "step_0000003" in bad.stderr and "Traceback" not in bad.stderr


def test_resume_gives_the_same_losses(finished_run, tmp_path, tiny_model_dir, corpus_file):
    """Drop the last checkpoint and the export, rerun the same command: steps 4-6 replay exactly."""
    copy = tmp_path / "debug"
    shutil.copytree(finished_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000006")
    shutil.rmtree(copy / "final")
    out = launch(tmp_path, tiny_model_dir, corpus_file, "train.max_steps=6", "train.save_every=3",
                 "attention.anneal_steps=3", f"data.cache_dir={finished_run.parent / 'cache'}")
    assert "resumed from" in out.stderr
    before, after = losses(finished_run), losses(copy)
    for step in (4, 5, 6):
        assert after[step] == before[step], (step, after[step], before[step])
    a = load_file(finished_run / "final" / "model.safetensors")
    b = load_file(copy / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_an_incompatible_recipe(finished_run, tmp_path, tiny_model_dir, corpus_file):
    copy = tmp_path / "debug"
    shutil.copytree(finished_run, copy)
    out = launch(tmp_path, tiny_model_dir, corpus_file, "train.max_steps=8", "data.seq_length=32",
                 f"data.cache_dir={finished_run.parent / 'cache'}", check=False)
    assert out.returncode == 2
    assert "data.seq_length" in out.stderr and "run.resume=never" in out.stderr
    assert "Traceback" not in out.stderr


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, corpus_file):
    """1 x 8 and 8 x 1 sequences per step give the same update (per-masked-token normalisation), whichever
    evaluations ran before training (train.eval_before: they draw from their own streams)."""
    common = ("train.max_steps=2", "train.save_every=0", "attention.anneal_steps=0", "diffusion.loss_norm=masked",
              "optim.warmup_steps=0", "optim.lr=1e-3", "run.sample_length=0")
    launch(tmp_path / "a", tiny_model_dir, corpus_file, "train.micro_batch_size=8", "train.grad_accum=1",
           "train.eval_before=causal", *common)
    launch(tmp_path / "b", tiny_model_dir, corpus_file, "train.micro_batch_size=1", "train.grad_accum=8",
           "train.eval_before=none", *common)
    first = {name: json.loads((tmp_path / name / "debug" / "metrics.jsonl").read_text().splitlines()[0])
             for name in "ab"}
    assert "before_causal_ppl" in first["a"] and "before_ppl" not in first["a"] and "parent_ppl" in first["a"]
    assert not any(k.startswith("before") for k in first["b"]) and "parent_ppl" in first["b"]
    la, lb = losses(tmp_path / "a" / "debug"), losses(tmp_path / "b" / "debug")
    assert la[1] == pytest.approx(lb[1], rel=1e-5) and la[2] == pytest.approx(lb[2], rel=1e-5)
    ga, gb = losses(tmp_path / "a" / "debug", "grad_norm"), losses(tmp_path / "b" / "debug", "grad_norm")
    assert ga[1] == pytest.approx(gb[1], rel=1e-4) and ga[1] > 0  # same gradient scale, not only direction
    a = load_file(tmp_path / "a" / "debug" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "debug" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank(stage, tmp_path, tiny_model_dir, corpus_file):
    """`deepspeed --num_gpus 2 adapt/run.py` on CPU (gloo): same losses, gradient and export as one rank
    with the same global batch, because every draw is a function of the global batch."""
    common = ("train.max_steps=3", "train.save_every=0", "attention.anneal_steps=2", f"dist.zero_stage={stage}",
              "optim.warmup_steps=0", "optim.lr=1e-3")
    launch(tmp_path / "two", tiny_model_dir, corpus_file, "train.micro_batch_size=2", *common, ranks=2)
    launch(tmp_path / "one", tiny_model_dir, corpus_file, "train.micro_batch_size=4", *common)
    two, one = tmp_path / "two" / "debug", tmp_path / "one" / "debug"
    for key in ("loss", "grad_norm", "masked_tokens"):
        a, b = losses(two, key), losses(one, key)
        assert list(a) == [1, 2, 3]
        assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-4), key
    assert len(list((two / "checkpoints" / "step_0000003").glob("*optim_states.pt"))) == 2  # one shard per rank
    a = load_file(two / "final" / "model.safetensors")
    b = load_file(one / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
