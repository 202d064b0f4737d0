"""eval.compare: paired bounds on shared draws, checked against adapt.train.likelihood and against a changed model."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_eval_fixtures import exported_dir  # noqa: F401

from adapt import objectives
from adapt.train import rng
from adapt.export import load_diffusion_model
from adapt.objectives.diffusion import blocked_vocab
from adapt.train.likelihood import block_estimates
from adapt.objectives import ModelForward
from eval import compare
from eval.heldout import heldout_sequences
from eval.models import data_config, stream_step

ARGS = ["--blocks", "6", "--length", "32", "--t-samples", "4", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def changed_dir(exported_dir, tmp_path_factory):  # noqa: F811
    """The same export with every weight nudged: same tokenizer, a different model."""
    out = tmp_path_factory.mktemp("changed") / "final"
    shutil.copytree(exported_dir, out)
    state = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


def test_same_draws_as_the_estimator_and_a_real_difference(exported_dir, changed_dir, tmp_path):  # noqa: F811
    result = compare.main([str(exported_dir), str(changed_dir), "--out-dir", str(tmp_path), *ARGS])
    assert (tmp_path / "compare.json").is_file()
    model, tok, meta = load_diffusion_model(exported_dir)
    blocks = heldout_sequences(data_config(exported_dir), tok, 32, 6)
    blocked = blocked_vocab(model.get_output_embeddings().weight.shape[0], meta.real_vocab_size, meta.mask_token_id)
    objective = objectives.for_meta(meta, blocked)
    assert result["method"] == "count"  # the default estimator
    expected = block_estimates(objective, ModelForward(model, "cpu"), blocks, objective.scored(blocks), 4, "count",
                               rng.generator(3, "estimate", step=stream_step("compare")))[:, 0]
    a, b = (torch.tensor(row["per_block_nats"], dtype=torch.float64) for row in result["bounds"])
    torch.testing.assert_close(a, expected, rtol=1e-6, atol=1e-6)
    d = result["differences"][0]
    assert d["model"] == str(changed_dir) and d["vs"] == str(exported_dir)
    assert d["nll_diff"] == pytest.approx(((b - a) / 31).mean().item(), rel=1e-9)
    assert abs(d["nll_diff"]) > 1e-3 and d["ci95"] > 0


def test_a_model_against_itself_differs_by_nothing(exported_dir, tmp_path):  # noqa: F811
    result = compare.main([str(exported_dir), str(exported_dir), "--out-dir", str(tmp_path), *ARGS])
    (d,) = result["differences"]
    assert d["nll_diff"] == 0.0 and d["ci95"] == 0.0 and d["ppl_ratio"] == 1.0
    assert result["bounds"][0]["nll"] == result["bounds"][1]["nll"]


def test_refuses_a_folder_that_is_not_an_export(exported_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as err:
        compare.main([str(exported_dir), str(tmp_path), "--out-dir", str(tmp_path)])
    assert err.value.code == 2 and "no diffusion.json" in capsys.readouterr().err
