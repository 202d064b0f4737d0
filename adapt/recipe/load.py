"""Load a recipe: schema defaults < recipe YAML < `section.key=value` overrides, then validate.

Every problem is collected and raised once as a ConfigError (unknown keys with the nearest valid
key, wrong types, values out of range, incompatible options, files that are not there), before
anything loads. The schema itself is `adapt.recipe.config`; the resume policy is `adapt.train.checkpoint`'s.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adapt import objectives
from adapt.model.attention import backend_problem
from adapt.recipe.config import Config, ConfigError, load_yaml, schema, values
from adapt.export import exported_meta
from adapt.recipe.keys import check_tree, range_problems, renamed
from adapt.model.causal import ModelLoadError


def _parse_overrides(overrides: list[str], problems: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"override `{item}` is not key=value (e.g. train.max_steps=10)")
            continue
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except Exception:  # YAMLError, or ValueError/KeyError from tags and dates such as 2001-13-45
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override `{item}` conflicts with an earlier override")
                break
        else:
            node[parts[-1]] = value
    return tree


def _read_recipe(path: str | os.PathLike, problems: list[str]) -> dict:
    path = Path(path)
    if not path.is_file():
        problems.append(f"recipe `{path}` not found; pass a YAML file such as recipes/llama_to_mdlm.yaml")
        return {}
    try:
        tree = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"recipe `{path}` is not valid YAML{where}: {getattr(err, 'problem', err)}")
        return {}
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"recipe `{path}` cannot be read: {err}")
        return {}
    except Exception as err:  # a value YAML parses but cannot construct: !!int x, 2001-13-45, ...
        problems.append(f"recipe `{path}` has a value YAML cannot construct: {type(err).__name__}: {err}")
        return {}
    if not isinstance(tree, dict):
        problems.append(f"recipe `{path}` must be a mapping of sections (model:, data:, ...)")
        return {}
    return tree


def validate(cfg: Config) -> list[str]:
    """Every out-of-range value and incompatible option combination, as messages."""
    problems = range_problems(cfg, values(cfg))  # the choices (Literal fields) were checked as the keys were read
    if cfg.dist.offload_param and cfg.dist.zero_stage != 3:
        problems.append("`dist.offload_param` needs `dist.zero_stage=3`")
    if cfg.dist.offload_optimizer and cfg.dist.zero_stage == 0:
        problems.append("`dist.offload_optimizer` needs `dist.zero_stage` >= 1")
    if cfg.diffusion.t_sampling == "antithetic" and (cfg.train.micro_batch_size * cfg.train.grad_accum) % 2:
        problems.append("antithetic t needs an even number of sequences per step "
                        "(micro_batch_size * grad_accum); use t_sampling=stratified or change the batch")
    problems += _objective_problems(cfg) + _noise_problems(cfg) + _run_name_problems(cfg.run.name)
    if cfg.train.eval_method == "antithetic" and cfg.train.eval_t_samples % 2:
        problems.append("`train.eval_method=antithetic` needs an even `train.eval_t_samples` (t, 1-t pairs)")
    if cfg.dist.deepspeed_config and not Path(cfg.dist.deepspeed_config).is_file():
        problems.append(f"`dist.deepspeed_config` file `{cfg.dist.deepspeed_config}` not found")
    if cfg.diffusion.ar_loss_weight > 0 and cfg.model.attn_implementation == "flash_attention_2":
        problems.append("`diffusion.ar_loss_weight` needs a causal mask tensor, which flash_attention_2 does not take; "
                        "use model.attn_implementation=sdpa or flex_attention, or diffusion.ar_loss_weight=0")
    if cfg.model.mask_init != "mean" and cfg.model.mask_token_id >= 0:
        problems.append("`model.mask_init` sets a NEW mask token's row; `model.mask_token_id` reuses an existing token "
                        "as it is: use model.mask_init=mean or model.mask_token_id=-1")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        problems.append("`lora.target_modules` is empty; name the linear layers that get adapters "
                        "(e.g. [q_proj, v_proj])")
    problems += _exported_model_problems(cfg)
    problem = backend_problem(cfg.model.attn_implementation, cfg.attention.anneal_schedule,
                              cfg.attention.anneal_steps, cfg.attention.document_mask)
    if problem:
        problems.append(problem)
    return problems


RUN_NAME = re.compile(r"\w[\w.+-]{0,254}")
"""A run name: one plain folder name (a letter, digit or _ first; no separator, so never `.`, `..` or a path)."""


def _run_name_problems(name: str) -> list[str]:
    """A run writes only inside run.output_dir/run.name: a name that is a path (`../x`, `/abs`, `a/b`), `.`, `..`
    or empty would put the run (its checkpoints, its LOCK, its cleanup) elsewhere, the output folder itself
    included."""
    if RUN_NAME.fullmatch(name):
        return []
    return [f"`run.name` must be one plain folder name inside run.output_dir: letters, digits and _ . + - (not "
            f"starting with . + or -, at most 255 characters, no / or \\); got {name!r}. Put the parent folder in "
            f"run.output_dir instead (e.g. run.output_dir=checkpoints/study run.name=trial1)"]


def _objective_problems(cfg: Config) -> list[str]:
    """The objective must be a registered name, and the recipe one it can train with (its own checks)."""
    try:
        spec = objectives.spec_for(cfg)
    except objectives.UnknownObjective as err:
        return [f"{err}; set diffusion.objective to one of them (auto: by diffusion.block.length)"]
    return spec.recipe_problems(cfg)


def _noise_problems(cfg: Config) -> list[str]:
    """The training draws of t: a non-empty range; complementary masks need pairs and the plain rate t."""
    d, problems = cfg.diffusion, []
    if max(d.eps, d.t_min) >= d.t_max:
        problems.append(f"training t lies in [max(eps, t_min), t_max] = [{max(d.eps, d.t_min)}, {d.t_max}], which is "
                        f"empty; set diffusion.t_max above diffusion.t_min and diffusion.eps")
    if d.complementary_masks and (cfg.train.micro_batch_size * cfg.train.grad_accum) % 2:
        problems.append("`diffusion.complementary_masks` trains each sequence twice in one step: it needs an even "
                        "micro_batch_size * grad_accum; change the batch or set diffusion.complementary_masks=false")
    if d.complementary_masks and d.position_masking:
        problems.append("`diffusion.complementary_masks` masks the complement at rate 1 - t, which position-dependent "
                        "masking (rate t ** a_i) does not have; set diffusion.position_masking=0 or "
                        "diffusion.complementary_masks=false")
    return problems  # a term whose weight is 0 is off, whatever its other keys say


def _exported_model_problems(cfg: Config) -> list[str]:
    """A model exported by this project (its diffusion metadata beside config.json) is already bidirectional."""
    try:
        meta = exported_meta(cfg.model.name_or_path)
    except (ModelLoadError, OSError) as err:
        return [str(err)]
    if meta is None:
        return []
    problems = []
    if cfg.diffusion.distill.weight and cfg.diffusion.distill.teacher == "parent":
        problems.append("`diffusion.distill.teacher=parent` needs the causal parent, but `model.name_or_path` is an "
                        "exported diffusion model whose parent is not part of it; set diffusion.distill.weight=0, or "
                        "diffusion.distill.teacher=clean with a causal clean stream (block diffusion)")
    if cfg.attention.anneal_steps > 0:
        problems.append("`model.name_or_path` is an exported diffusion model (trained with non-causal attention); "
                        "set `attention.anneal_steps=0` (annealing from causal again would undo the adaptation)")
    if meta.shift != cfg.diffusion.shift:
        problems.append(f"`diffusion.shift={cfg.diffusion.shift}` but the exported model was trained with "
                        f"shift={meta.shift}; set `diffusion.shift={str(meta.shift).lower()}`")
    try:
        trained, chosen = objectives.spec_for_meta(meta), objectives.spec_for(cfg)
    except objectives.UnknownObjective as err:
        return problems + [str(err)]
    if trained.objective is not chosen.objective:
        problems.append(f"`diffusion.objective` selects {chosen.name} but the exported model was trained with "
                        f"{trained.name}; set `diffusion.objective={trained.name}`"
                        + (f" diffusion.block.length={meta.block_length}" if meta.block_length else ""))
    else:
        problems += trained.export_problems(cfg, meta)
    return problems


def model_problems(cfg: Config, model_config) -> list[str]:
    """What only the loaded model can refute: sequences longer than its positions (RoPE would run past the
    lengths it was trained on without a word, learned position tables would fail deep in a forward)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return []
    problems = []
    if cfg.data.seq_length > positions:
        problems.append(f"`data.seq_length={cfg.data.seq_length}` exceeds the {positions} positions of "
                        f"`model.name_or_path` ({cfg.model.name_or_path}); set data.seq_length <= {positions}")
    if cfg.run.sample_length + 1 > positions:  # the sample's canvas: a start token, then sample_length tokens
        problems.append(f"`run.sample_length={cfg.run.sample_length}` plus the start token exceeds the {positions} "
                        f"positions of `model.name_or_path`; set run.sample_length <= {positions - 1}")
    return problems


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def load_config(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Merge schema defaults, the recipe YAML and `key=value` overrides; raise ConfigError listing all problems."""
    problems: list[str] = []
    tree = _read_recipe(recipe, problems) if recipe is not None else {}
    tree = renamed(tree, problems, _note)
    cli = renamed(_parse_overrides(list(overrides), problems), problems, _note)
    base = schema(tree, cli)  # the sections of the recipe's objective
    tree, cli = check_tree(base, tree, "", problems), check_tree(base, cli, "", problems)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), tree, cli)
        cfg: Config = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError, TypeError, OverflowError) as err:  # what the schema walk missed
        raise ConfigError(problems + [str(err).splitlines()[0]]) from None
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
