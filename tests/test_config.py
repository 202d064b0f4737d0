"""Recipe schema: every recipe loads, precedence, one error listing every problem, resume safety."""
from __future__ import annotations

import dataclasses
import os
import string
import tempfile
from pathlib import Path
from typing import Literal, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapt.train.checkpoint import resume_conflicts
from adapt.recipe.config import Config, ConfigError, from_dict, to_dict, to_yaml
from adapt.recipe.config import values as _values
from adapt.recipe.keys import ranges
from adapt.recipe.load import load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(ROOT.glob("recipes/**/*.yaml"))
SCHEMA_KEYS = sorted(_values(Config()))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(recipe, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    assert str(info.value).startswith("invalid recipe:")
    return info.value.problems


def test_recipes_exist():
    assert any(p.name == "llama_to_mdlm.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name other files (deepspeed JSON) relative to the repository
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    # the recipe's own values made it into the dataclasses
    tree = yaml.safe_load(recipe.read_text())
    values = _values(cfg)
    for key, value in _leaves(tree).items():
        assert values[key] == value, key


def _leaves(tree: dict, prefix: str = "") -> dict:
    """A recipe's values by dotted key (`diffusion.block.length` -> 4)."""
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_precedence_defaults_recipe_dotlist(tmp_path):
    recipe = write(tmp_path, "optim:\n  lr: 1.0e-4\ntrain:\n  max_steps: 7\n")
    assert load_config(None).optim.lr == 5e-5  # schema default
    cfg = load_config(recipe)
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.log_every) == (1e-4, 7, 5)
    cfg = load_config(recipe, ["optim.lr=3e-4", "train.log_every=2"])
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.log_every) == (3e-4, 7, 2)
    assert load_config(recipe, ["data.train_files=[a.txt, b.txt]"]).data.train_files == ["a.txt", "b.txt"]


def test_unknown_key_suggests_nearest(tmp_path):
    (p,) = problems_of(write(tmp_path, "optim:\n  lrr: 1.0e-4\n"))
    assert "optim.lrr" in p and "did you mean `optim.lr`" in p
    (p,) = problems_of(None, ["trian.max_steps=3"])
    assert "did you mean `train`" in p
    (p,) = problems_of(None, ["model.zzzzzz=3"])
    assert "valid keys" in p and "name_or_path" in p


def test_wrong_type(tmp_path):
    (p,) = problems_of(write(tmp_path, "train:\n  max_steps: ten\n"))
    assert "train.max_steps" in p and "integer" in p
    (p,) = problems_of(None, ["diffusion.shift=maybe"])
    assert "diffusion.shift" in p and "true or false" in p
    (p,) = problems_of(None, ["train.max_steps=true"])  # bool is not an int
    assert "train.max_steps" in p
    (p,) = problems_of(None, ["model=3"])
    assert "`model` must be a mapping" in p


@pytest.mark.parametrize("override,key", [
    ("optim.lr=2.0", "optim.lr"), ("data.seq_length=4", "data.seq_length"),
    ("train.max_steps=0", "train.max_steps"), ("dist.zero_stage=4", "dist.zero_stage"),
    ("model.dtype=fp16", "model.dtype"), ("diffusion.eps=.nan", "diffusion.eps"),
    ("optim.lr=.nan", "optim.lr"), ("optim.grad_clip=.inf", "optim.grad_clip"),
    ("optim.beta1=" + "1" * 400, "optim.beta1"),  # an int too large for a float (found by fuzzing)
    ("diffusion.ar_loss_weight=-0.1", "diffusion.ar_loss_weight"),
    ("optim.layer_lr_decay=0", "optim.layer_lr_decay"), ("optim.layer_lr_decay=1.5", "optim.layer_lr_decay"),
    ("optim.embedding_lr_scale=0", "optim.embedding_lr_scale"),
    ("train.seed=-1", "train.seed"), ("train.seed=" + str(2**63), "train.seed"),
    ("train.grad_accum=" + str(10**6), "train.grad_accum"), ("dist.timeout_s=1e300", "dist.timeout_s"),
    ("train.max_steps=" + str(2**64), "train.max_steps"), ("run.sample_length=-1", "run.sample_length"),
])
def test_out_of_range(override, key):
    (p,) = problems_of(None, [override])
    assert f"`{key}`" in p


def test_every_number_has_a_range():
    """No number reaches torch unchecked: every int and float key declares a range or is a Literal of choices, every
    int bounded above."""
    declared = {key: hi for key, (_, hi, _) in ranges(Config()).items()}
    choices = set(_choices(Config()))
    for key, default in _values(Config()).items():
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert key in declared or key in choices, key
            assert not isinstance(default, int) or key in choices or declared[key] is not None, key


def _choices(cfg, prefix: str = ""):
    """The dotted keys of the Literal[...] fields of a config."""
    for f, kind in zip(dataclasses.fields(cfg), get_type_hints(type(cfg)).values()):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            yield from _choices(getattr(cfg, f.name), f"{prefix}{f.name}.")
        elif get_origin(kind) is Literal:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("name", ["../escape", "/abs/run", "", ".", "..", "a/b/c", "a\\b", ".hidden", "-x", "a b"])
def test_a_run_name_must_be_one_folder_name(name):
    (p,) = problems_of(None, [f"run.name={name}"])
    assert "`run.name` must be one plain folder name" in p


def test_plain_run_names_load():
    for name in ("debug", "llama3_8b-to.bd+v2", "2001-02-30", "résumé"):
        assert load_config(None, [f"run.name={name}"]).run.name == name


def test_incompatible_options():
    (p,) = problems_of(None, ["dist.offload_param=true", "dist.zero_stage=2"])
    assert "zero_stage=3" in p
    (p,) = problems_of(None, ["diffusion.t_sampling=antithetic", "train.micro_batch_size=3"])
    assert "antithetic" in p
    (p,) = problems_of(None, ["model.attn_implementation=flash_attention_2"])
    assert "flash_attention_2" in p and "sdpa" in p


def test_all_problems_in_one_error(tmp_path):
    recipe = write(tmp_path, "optim:\n  lrr: 1\ntrain:\n  max_steps: ten\nmodell: {}\n")
    probs = problems_of(recipe, ["run.nmae=x", "noequals"])
    assert len(probs) == 5, probs
    text = "\n".join(probs)
    for needle in ("optim.lrr", "train.max_steps", "modell", "run.nmae", "noequals"):
        assert needle in text
    # range problems are also collected together (reported after the schema walk passes)
    probs = problems_of(None, ["optim.lr=5", "train.max_steps=0", "data.seq_length=2"])
    assert len(probs) == 3


def test_malformed_yaml_gives_line_and_column(tmp_path):
    recipe = write(tmp_path, "model:\n  dtype: bf16\noptim:\n  lr: [1, 2\n  beta1: 0.9\n")
    (p,) = problems_of(recipe)
    assert "not valid YAML" in p and "line 5" in p and "column" in p
    (p,) = problems_of(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "mapping" in p
    (p,) = problems_of(tmp_path / "missing.yaml")
    assert "not found" in p
    # values YAML parses but cannot construct raise ValueError/KeyError inside PyYAML, not YAMLError
    (p,) = problems_of(write(tmp_path, "run:\n  name: 2001-13-45\n", "date.yaml"))
    assert "cannot construct" in p
    (p,) = problems_of(None, ["run.name=2001-02-30", "train.seed=!!int x"])  # kept as text, then type-checked
    assert "train.seed" in p


def test_exponent_floats_without_dot(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string; recipes and overrides must read it as a number."""
    assert load_config(write(tmp_path, "optim:\n  lr: 3e-4\n")).optim.lr == 3e-4
    assert load_config(None, ["optim.lr=2E-5", "diffusion.eps=1e-3"]).optim.lr == 2e-5


def test_resume_conflicts():
    saved = load_config(None)
    safe = load_config(None, ["train.max_steps=500", "train.log_every=1", "train.eval_every=10",
                              "run.tensorboard=true", "train.save_every=7"])
    assert resume_conflicts(saved, safe) == []
    for override, key in [("model.name_or_path=/elsewhere", "model.name_or_path"),
                          ("data.seq_length=128", "data.seq_length"),
                          ("model.mask_token=<m>", "model.mask_token"),
                          ("model.mask_token_id=5", "model.mask_token_id"),
                          ("diffusion.shift=false", "diffusion.shift")]:
        (conflict,) = resume_conflicts(saved, load_config(None, [override]))
        assert f"`{key}`" in conflict


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-4", "data.train_files=[x.jsonl]", "run.name=rt"])
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    assert load_config(write(tmp_path, to_yaml(cfg))) == cfg
    assert from_dict(to_dict(cfg)) == cfg


# --- fuzzing: whatever the input, only ConfigError escapes ---------------------------------------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.sampled_from(["${oops}", "${", "2001-13-45", "~", "[1, 2", "1e400"]))
_key = st.one_of(st.sampled_from([k.split(".")[-1] for k in SCHEMA_KEYS] + ["model", "optim", "train", "data"]),
                 st.text(max_size=8))
_tree = st.recursive(_leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                   st.dictionaries(_key, kids, max_size=4)), max_leaves=12)
_sections = st.dictionaries(st.sampled_from(sorted({k.split(".")[0] for k in SCHEMA_KEYS}) + ["bogus"]),
                            st.one_of(st.dictionaries(_key, _tree, max_size=4), _leaf), max_size=4)
_raw_value = st.one_of(st.text(max_size=16), st.sampled_from(
    ["", ".nan", "-.inf", "2001-13-45", "[a, b", "{x: 1}", "!!binary xyz", "${x}", "1" * 400, "&a [*a]",
     "!!python/object:os.system x", "2001-01-01"]))
_dotlist = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SCHEMA_KEYS + ["model", "x.y", "model.x.y", ""]), _raw_value),
    st.text(max_size=20)), max_size=5)


FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None,
               suppress_health_check=[HealthCheck.too_slow])  # FUZZ_EXAMPLES=3000 for a longer hunt


def _only_config_errors(recipe, overrides):
    try:
        load_config(recipe, overrides)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


@FUZZ
@given(tree=_sections, overrides=_dotlist)
def test_fuzz_yaml_trees_and_dotlists(tree, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        _only_config_errors(path, overrides)


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.text(alphabet=string.printable + "{}[]:-&*!|>%@`'\"", max_size=80),
                      st.binary(max_size=60)))
def test_fuzz_raw_recipe_text(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        _only_config_errors(path, [])


def test_from_dict_reports_schema_problems():
    """A checkpoint's config from another schema version: a ConfigError, not an OmegaConf exception."""
    with pytest.raises(ConfigError, match="did you mean `optim.lr`"):
        from_dict({"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="train.max_steps"):
        from_dict({"train": {"max_steps": "x"}})
    with pytest.raises(ConfigError, match="mapping"):
        from_dict({"model": 3})


@pytest.mark.parametrize("old,new,value", [("block_size", "seq_length", 96),
                                           ("heldout_blocks", "heldout_sequences", 5)])
def test_a_renamed_key_is_read_as_its_new_name_with_one_note(tmp_path, capsys, old, new, value):
    """Recipes and overrides written with the old names keep working, with a one-line note naming the new key."""
    from_recipe = load_config(write(tmp_path, f"data:\n  {old}: {value}\n"))
    assert getattr(from_recipe.data, new) == value
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`data.{old}` is now `data.{new}`" in err
    from_cli = load_config(None, [f"data.{old}={value}"])
    assert getattr(from_cli.data, new) == value
    assert f"`data.{new}`" in capsys.readouterr().err
    assert getattr(load_config(None, [f"data.{new}={value}"]).data, new) == value
    assert capsys.readouterr().err == ""  # the new name: no note
    assert getattr(from_dict({"data": {old: value}}).data, new) == value  # a saved config of an older run
    assert capsys.readouterr().err == ""


def test_a_key_set_under_both_names_is_refused(tmp_path):
    (problem,) = problems_of(write(tmp_path, "data:\n  block_size: 64\n  seq_length: 128\n"))
    assert "`data.block_size` and `data.seq_length` are both set" in problem
    assert "keep only `data.seq_length`" in problem
    with pytest.raises(ConfigError, match="both set"):
        from_dict({"data": {"heldout_blocks": 2, "heldout_sequences": 3}})
