"""Both stages through the real entry point with two ranks (deepspeed launcher, CPU/gloo): ZeRO-2 and
ZeRO-3, with and without LoRA; a ZeRO-3 LoRA run matches one rank with the same global batch."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import launch, losses
from test_sft import exported

FAST = ("train.max_steps=2", "train.save_every=0", "train.eval_t_samples=1", "optim.warmup_steps=0",
        "optim.lr=1e-3", "lora.r=4")


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory, tiny_model_dir):
    """An exported diffusion model and a small SFT file with both record formats."""
    root = tmp_path_factory.mktemp("sft_inputs")
    data = root / "sft.jsonl"
    rows = []
    for i in range(24):
        answer = "The answer is " + "very " * (i % 5) + "short."
        if i % 2:
            rows.append({"prompt": f"Question {i}?", "response": answer})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                      {"role": "assistant", "content": answer}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return exported(root / "export", tiny_model_dir), data


@pytest.mark.slow
@pytest.mark.parametrize("stage,zero,lora", [("adapt", 2, True), ("adapt", 3, True), ("sft", 2, False),
                                             ("sft", 3, True)])
def test_two_ranks(stage, zero, lora, tmp_path, tiny_model_dir, corpus_file, sft_inputs):
    args = [*FAST, f"dist.zero_stage={zero}", f"lora.enabled={str(lora).lower()}", "train.micro_batch_size=2"]
    if stage == "sft":
        model, data = sft_inputs
        args += ["stage=sft", f"model.name_or_path={model}", "attention.anneal_steps=0", f"data.train_files=[{data}]",
                 "data.seq_length=64", "data.heldout_sequences=2", "lora.export=adapter"]
    else:  # the ZeRO-3 run is compared with one rank below: no dropout (its draws depend on the rank); an odd
        # held-out count that two ranks cannot split evenly (ZeRO-3 gathers weights in every forward)
        model, args = tiny_model_dir, args + ["attention.anneal_steps=1", "data.heldout_sequences=3"] + (
            ["lora.dropout=0"] if zero == 3 else [])
    launch(tmp_path / "two", tiny_model_dir, corpus_file, *args, ranks=2)
    run = tmp_path / "two" / "debug"
    assert list(losses(run)) == [1, 2]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["kind"] == "summary" and "after_nll" in summary and "sample" in summary
    if stage == "sft":  # the answers' share is counted over fewer tokens than the whole response bound
        assert 0 < summary["after_answer_tokens"] < summary["after_tokens"]
    weights = load_file(run / "final" / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in weights)  # a plain HF folder
    assert (run / "final" / "adapter").is_dir() == (stage == "sft" and lora)
    assert ("model.load_adapter" in (run / "final" / "README.md").read_text()) == (stage == "sft" and lora)
    from adapt.export import load_diffusion_model

    merged, tok, meta = load_diffusion_model(run / "final")
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([[1, meta.mask_token_id, 5]])).logits).all()
    if stage == "adapt" and zero == 3:  # ZeRO-3 partitions the embedding peft reads the mask row from
        launch(tmp_path / "one", tiny_model_dir, corpus_file, *args, "train.micro_batch_size=4")  # later wins
        one = tmp_path / "one" / "debug"
        for key in ("loss", "grad_norm"):
            a, b = losses(run, key), losses(one, key)
            assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-4), key
        one_summary = json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])
        for key in ("parent_nll", "before_causal_nll", "before_nll", "after_nll"):  # same draws on any world size
            assert summary[key] == pytest.approx(one_summary[key], rel=1e-4), key
        assert summary["after_tokens"] == one_summary["after_tokens"] == 3 * 63
        other = load_file(one / "final" / "model.safetensors")
        for k in weights:
            torch.testing.assert_close(weights[k], other[k], rtol=1e-4, atol=1e-5)
