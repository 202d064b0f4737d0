"""The checkpoint layout, export and loading; nothing else knows where files live.

    <run>/config.yaml            resolved config of the latest launch
    <run>/base/                  model config (resized vocabulary), tokenizer with the mask token, diffusion.json
    <run>/checkpoints/step_N/    DeepSpeed checkpoint + config.yaml + COMPLETE (written last)
    <run>/metrics.jsonl          one JSON line per logged step / evaluation
    <run>/final/                 exported HF folder: safetensors, config, tokenizer, generation config, diffusion.json
    <run>/final/adapter/         the peft adapter, only for LoRA runs with lora.export=adapter (base weights beside it)

A checkpoint without COMPLETE was interrupted while saving and is never resumed from. Exports are
written to a temporary folder and renamed into place.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from adapt import distributed, faults
from adapt.attention import usable_backend
from adapt.config import Config, from_dict, resume_conflicts, to_yaml
from adapt.model import DTYPES, DiffusionMeta, ModelLoadError, set_causal

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed or exported; the message says why and what to do."""


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def complete_tags(run_dir: Path) -> list[str]:
    """Tags of checkpoints whose save finished, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


def save_base(run_dir: Path, model, tokenizer, meta: DiffusionMeta) -> None:
    """What an export needs besides the weights, written once at the start of a run (rank 0)."""
    base = Path(run_dir) / "base"
    tmp = _tmp_sibling(base)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    meta.save(tmp)
    _swap_into_place(tmp, base)


def save_resumable(engine, run_dir: Path, step: int, cfg: Config, client_state: dict, keep_last: int) -> None:
    """DeepSpeed checkpoint of every rank, then (rank 0) the config and the COMPLETE marker."""
    root, tag = ckpt_root(run_dir), tag_for(step)
    if distributed.is_main():
        shutil.rmtree(root / tag, ignore_errors=True)  # a stale half-written save of the same step
    distributed.barrier()
    distributed.save(engine, root, tag, client_state)
    distributed.barrier()
    faults.maybe_kill_in_save(step)
    if distributed.is_main():
        (root / tag / "config.yaml").write_text(to_yaml(cfg))
        _fsync_write(root / tag / COMPLETE, f"{step}\n")
        for old in complete_tags(run_dir)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    distributed.barrier()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def find_resume(cfg: Config) -> str | None:
    """The checkpoint tag to resume from under `run.resume`, after checking the config is compatible."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        tags = complete_tags(cfg.run_dir)
        if not tags:
            return None
        tag = tags[-1]
    else:
        path = Path(cfg.run.resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"run.resume={path} is not a complete checkpoint (no {COMPLETE} marker); "
                                  f"pick one of {complete_tags(path.parent.parent) or 'none'} or run.resume=auto")
        if path.parent.resolve() != ckpt_root(cfg.run_dir).resolve():
            raise CheckpointError(f"run.resume={path} is not under {ckpt_root(cfg.run_dir)}; "
                                  f"set run.name/run.output_dir to the run it belongs to")
        tag = path.name
    saved = from_dict(yaml.safe_load((ckpt_root(cfg.run_dir) / tag / "config.yaml").read_text()))
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise CheckpointError(
            f"cannot resume {cfg.run_dir} from {tag}: the recipe changed in ways the checkpoint cannot follow:\n  "
            + "\n  ".join(conflicts)
            + "\nrevert these, start a new run (run.name=...), or start over with run.resume=never")
    return tag


# --- export ------------------------------------------------------------------------------------

def export(run_dir: Path, tag: str | None = None, out: Path | None = None, dtype: str | None = None) -> Path:
    """Consolidate a DeepSpeed checkpoint of a run (any ZeRO stage) into an HF folder; returns it."""
    run_dir = Path(run_dir)
    tags = complete_tags(run_dir)
    if not tags:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to export")
    tag = tag or tags[-1]
    if tag not in tags:
        raise CheckpointError(f"{tag} is not a complete checkpoint of {run_dir}; choose from {', '.join(tags)}")
    saved = from_dict(yaml.safe_load((ckpt_root(run_dir) / tag / "config.yaml").read_text()))
    base = run_dir / "base"
    meta = DiffusionMeta.load(base)
    step = int((ckpt_root(run_dir) / tag / COMPLETE).read_text())
    from adapt.attention import anneal_ratio

    ratio = anneal_ratio(step, saved.attention.anneal_steps)
    meta = replace(meta, anneal_ratio=ratio, bidirectional=ratio >= 1.0)
    state = distributed.consolidated_state_dict(ckpt_root(run_dir), tag)
    config = AutoConfig.from_pretrained(base)
    out = Path(out) if out else run_dir / "final"
    tmp = _tmp_sibling(out)
    if saved.lora.enabled:  # peft keys: merge the adapter, or keep it in tmp/adapter
        from adapt.lora import ADAPTER_DIR, export_model

        keep = tmp / ADAPTER_DIR if saved.lora.export == "adapter" else None
        model = export_model(config, state, saved.lora, meta.mask_token_id, DTYPES[dtype or saved.model.dtype], keep)
    else:
        model = _model_from_state(config, state, tag)
        model.to(DTYPES[dtype or saved.model.dtype])
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    if (base / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base).save_pretrained(tmp)
    meta.save(tmp)
    (tmp / "recipe.yaml").write_text(to_yaml(saved))
    _swap_into_place(tmp, out)
    return out


def _model_from_state(config, state: dict[str, torch.Tensor], tag: str):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {tag} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if not isinstance(keys, dict) else keys.keys())


def _tmp_sibling(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace `dest` by the finished `tmp` so a reader never sees a half-written folder."""
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


# --- loading an export -------------------------------------------------------------------------

def load_diffusion_model(path: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa",
                         device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from an exported folder, in eval mode, attention set for diffusion."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} not found; pass an exported folder such as checkpoints/<run>/final")
    meta = DiffusionMeta.load(path)
    config = AutoConfig.from_pretrained(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_implementation, why = usable_backend(attn_implementation, device, head_dim)
    if why:
        warnings.warn(why, stacklevel=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                 attn_implementation=attn_implementation)
    if (path / "adapter").is_dir():  # a `lora.export=adapter` export: merge it for inference
        from adapt.lora import merge_adapter

        model = merge_adapter(model, path)
    set_causal(model, not meta.bidirectional)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer, meta
