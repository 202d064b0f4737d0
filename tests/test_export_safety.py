"""An export never destroys data: it replaces only an empty folder or an earlier export, never enters the run's
checkpoints or base, checks its destination before the work, and leaves nothing of its own behind on failure.
Exports a user broke (tokenizer removed, unknown or wrong model type, NaN weights) are refused with the reason."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapt.train import checkpoint
from adapt.export import WEIGHTS_FILE, export, export_problem, load_diffusion_model
from adapt.model.causal import ModelLoadError
from test_eval_fixtures import exported_dir  # noqa: F401


@pytest.fixture
def run_copy(reference, tmp_path) -> Path:
    """A copy of the finished reference run (checkpoints step_4 and step_6, an export in final/)."""
    dest = tmp_path / "debug"
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("LOCK"))
    return dest


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints/step_0000006", "base", "run", "above"])
def test_an_export_never_replaces_or_enters_what_the_run_needs(run_copy, where):
    out = {"run": run_copy, "above": run_copy.parent}.get(where, run_copy / where)
    before = _tree(run_copy)
    with pytest.raises(checkpoint.CheckpointError, match="which the run needs"):
        export(run_copy, out=out)
    assert _tree(run_copy) == before
    assert not [p for p in run_copy.parent.rglob(".*tmp*")]


def test_a_folder_holding_a_users_file_is_never_replaced(run_copy, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own work")
    with pytest.raises(checkpoint.CheckpointError, match="holds notes.txt"):
        export(run_copy, out=out)
    assert _tree(out) == {"notes.txt": b"my own work"}
    (run_copy / "final" / "notes.txt").write_text("kept")  # an earlier export with a user's file in it
    with pytest.raises(checkpoint.CheckpointError, match="holds notes.txt"):
        export(run_copy)
    assert (run_copy / "final" / "notes.txt").read_text() == "kept"


def test_a_file_or_a_folder_that_is_not_an_export_is_refused(run_copy, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        export(run_copy, out=tmp_path / "file")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # an export's name, but no export
    with pytest.raises(checkpoint.CheckpointError, match="not an earlier export"):
        export(run_copy, out=tmp_path / "half")
    assert (tmp_path / "half" / "config.json").read_text() == "{}"
    with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        export(run_copy, out=tmp_path / "file" / "below")  # the one check of every command's output folder


def test_an_earlier_export_or_an_empty_folder_is_replaced(run_copy, tmp_path):
    old = _tree(run_copy / "final")
    export(run_copy, tag="step_0000004")
    assert export_problem(run_copy / "final") is None
    assert _tree(run_copy / "final") != old  # replaced by the step-4 export
    (tmp_path / "empty").mkdir()
    assert export(run_copy, out=tmp_path / "empty") == tmp_path / "empty"
    assert export_problem(tmp_path / "empty") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debug", "empty"]  # no temporary folder left


def _broken(export: Path, dest: Path, how: str) -> Path:
    shutil.copytree(export, dest)
    config = json.loads((dest / "config.json").read_text())
    if how == "no_tokenizer":
        for p in dest.glob("tokenizer*"):
            p.unlink()
    elif how == "unknown_type":
        (dest / "config.json").write_text(json.dumps(config | {"model_type": "no_such_model"}))
    elif how == "other_type":
        (dest / "config.json").write_text(json.dumps(config | {"model_type": "gpt2",
                                                               "architectures": ["GPT2LMHeadModel"]}))
    elif how == "other_shape":
        (dest / "config.json").write_text(json.dumps(config | {"intermediate_size": config["intermediate_size"] * 2}))
    elif how == "nan":
        weights = load_file(dest / WEIGHTS_FILE)
        name = sorted(weights)[-1]
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = float("nan")
        save_file(weights, dest / WEIGHTS_FILE, metadata={"format": "pt"})
    return dest


BROKEN = {"no_tokenizer": "has no tokenizer", "unknown_type": "model_type='no_such_model'",
          "other_type": "do not fit the 'gpt2' model", "other_shape": "other shape", "nan": "NaN"}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_broken_export_is_refused_before_it_loads(exported_dir, tmp_path, how):  # noqa: F811
    folder = _broken(exported_dir, tmp_path / how, how)
    problem = export_problem(folder)
    assert problem is not None and BROKEN[how] in problem, problem
    with pytest.raises(ModelLoadError, match="export the run again"):
        load_diffusion_model(folder)
    assert export_problem(exported_dir) is None

