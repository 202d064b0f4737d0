"""`python -m adapt.estimate`: parameter counts from the config alone, DeepSpeed's formulas, activations."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from conftest import ROOT

from adapt.recipe.load import load_config
from adapt.estimate import GB, estimate, hostfile_size

RECIPE = ROOT / "recipes" / "llama2_7b_to_mdlm.yaml"


@pytest.fixture(scope="module")
def llama2_7b_dir(tmp_path_factory):
    """Llama-2-7B's architecture (LlamaConfig's defaults are that model), config.json only, no weights."""
    out = tmp_path_factory.mktemp("llama2_7b")
    LlamaConfig().save_pretrained(out)
    return out


def test_tiny_counts_match_the_real_model(tiny_model_dir, tmp_path):
    """Exact: the estimate's count equals the loaded model after the mask token is added."""
    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import add_mask_token, load_causal_lm, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="fp32")
    model = load_causal_lm(mcfg)
    add_mask_token(model, load_tokenizer(mcfg), mcfg)
    real = sum(p.numel() for p in model.parameters())
    proc = subprocess.run([sys.executable, "-m", "adapt.estimate", str(ROOT / "recipes" / "debug.yaml"),
                           f"model.name_or_path={tiny_model_dir}", "--gpus-per-node", "2", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = json.loads(proc.stdout)
    assert est["shape"]["total"] == real and est["world"] == 2
    assert est["shape"]["vocab_rows"] == model.get_input_embeddings().weight.shape[0]


def test_llama2_7b_zero3_on_8_gpus(llama2_7b_dir):
    cfg = load_config(RECIPE, [f"model.name_or_path={llama2_7b_dir}"])
    est = estimate(cfg, gpus_per_node=8, nodes=1)
    psi, largest = est["shape"]["total"], est["shape"]["largest_layer"]
    assert psi == 6_738_415_616 + 64 * 4096 * 2  # Llama-2-7B + 64 new rows (mask token, padded) in and out
    assert largest == 32064 * 4096  # an embedding matrix
    rows = {(r["stage"], r["offload_optimizer"], r["offload_param"]): r for r in est["rows"]}
    zero3 = rows[(3, False, False)]
    assert zero3["source"] == "deepspeed"
    assert zero3["gpu"] == int(4 * largest + int(18 * psi / 8))  # DeepSpeed's ZeRO-3 formula
    assert 14 * GB < zero3["gpu"] < 15 * GB
    assert rows[(2, False, False)]["gpu"] == 2 * psi + int(18 * psi / 8)
    assert rows[(3, True, True)]["gpu"] == 4 * largest  # everything offloaded but the gather buffer
    assert rows[(0, False, False)]["gpu"] > rows[(1, False, False)]["gpu"] > rows[(2, False, False)]["gpu"]
    act = est["activations"]
    assert sum(act["checkpointing"].values()) < sum(act["no_checkpointing"].values()) / 3
    assert est["recipe"]["total"] < 40 * GB  # the recipe fits an 80 GB GPU with room to spare
    two = estimate(cfg, gpus_per_node=8, nodes=2)["rows"][4]["gpu"]
    assert two < zero3["gpu"]  # ZeRO-3 states shrink with more nodes


def test_lora_counts_and_states(llama2_7b_dir):
    cfg = load_config(RECIPE, [f"model.name_or_path={llama2_7b_dir}", "lora.enabled=true", "lora.r=16"])
    est = estimate(cfg)
    assert est["shape"]["trainable"] == 39_976_960 + 4096  # r=16 on all 7 projections, + the mask row
    zero2 = next(r for r in est["rows"] if r["stage"] == 2 and not r["offload_optimizer"])
    assert zero2["source"] == "formula"
    assert 2 * est["shape"]["total"] < zero2["gpu"] < 2 * est["shape"]["total"] + 1 * GB  # frozen bf16 base dominates


def test_hostfile(tmp_path):
    assert hostfile_size(str(ROOT / "recipes" / "hostfile.example")) == (4, 8)
    f = tmp_path / "hosts"
    f.write_text("# comment\na slots=4\nb slots=4  # two\n")
    assert hostfile_size(str(f)) == (2, 4)


def test_offline_hub_id_names_the_fix():
    proc = subprocess.run([sys.executable, "-m", "adapt.estimate", str(RECIPE), "model.name_or_path=org/not-cached"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "--model-config" in proc.stderr and "Traceback" not in proc.stderr
