"""The run folder's layout, resumable checkpoints, export and loading (an export's own file names and checks:
adapt/export_files.py).

    <run>/config.yaml            resolved config of the latest launch
    <run>/base/                  model config (resized vocabulary), tokenizer with the mask token, diffusion.json
    <run>/checkpoints/step_N/    DeepSpeed checkpoint + config.yaml + COMPLETE (written last)
    <run>/metrics.jsonl          one JSON line per logged step / evaluation
    <run>/final/                 exported HF folder: safetensors, config, tokenizer, generation config, diffusion.json
    <run>/final/adapter/         the peft adapter, only for LoRA runs with lora.export=adapter (base weights beside it)

A checkpoint without COMPLETE was interrupted while saving and is never resumed from. Exports are
written to a temporary folder and renamed into place; they replace only an empty folder or an earlier export.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from adapt import distributed, faults
from adapt.attention import usable_backend
from adapt.config import Config, from_dict, to_yaml, values
from adapt.export_files import (ADAPTER_DIR, META_FILE, RECIPE_FILE, WEIGHTS_FILE, contents_problem,  # noqa: F401
                                destination_problem, exported_meta, read_meta, read_recipe, save_meta,
                                weight_files, writable_problem)
from adapt.model import DTYPES, DiffusionMeta, ModelLoadError, load_causal_lm, set_causal

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed or exported; the message says why and what to do."""


# --- the export contract (adapt/export_files.py) ----------------------------------------------------

def export_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a loadable export (missing, a run folder, a checkpoint, a causal LM), or None."""
    path = Path(folder).expanduser()
    if not path.exists():
        return f"{path} not found; pass an exported folder such as checkpoints/<run>/final"
    if not path.is_dir():
        return f"{path} is a file; pass an exported folder such as checkpoints/<run>/final"
    run = path if (path / "base").is_dir() else path.parent if path.name == "base" else None
    run = run or (path.parent.parent if path.parent.name == "checkpoints" else None)
    run = run or (path.parent if path.name == "checkpoints" else None)
    if run is not None and (ckpt_root(run).is_dir() or (run / "base").is_dir()):
        return (f"{path} belongs to a training run, not an export; export it first with "
                f"`python -m adapt.export {run}` (then use {run / 'final'})")
    if not (path / META_FILE).is_file():
        return (f"{path} has no {META_FILE}: it is not an exported diffusion model; export a run with "
                f"`python -m adapt.export RUN_DIR`")
    if not (path / WEIGHTS_FILE).is_file() and not any(path.glob("model-*.safetensors")):
        return f"{path} has no {WEIGHTS_FILE}: the export is incomplete; export it again with `python -m adapt.export`"
    try:
        return contents_problem(path, read_meta(path))
    except ModelLoadError as err:
        return str(err)


# --- resumable checkpoints -----------------------------------------------------------------------

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
    save_meta(tmp, meta)
    _swap_into_place(tmp, base)


def save_resumable(engine, run_dir: Path, step: int, cfg: Config, client_state: dict, keep_last: int) -> None:
    """DeepSpeed checkpoint of every rank (each hashes the files it wrote), agreed on by all ranks, then
    (rank 0) the config and the COMPLETE marker holding every file's size and sha256.

    A write that fails on any rank (a full disk) is known to all before COMPLETE: the partial folder is
    removed, the previous checkpoints stay as they were and every rank raises CheckpointError."""
    root, tag = ckpt_root(run_dir), tag_for(step)
    if distributed.is_main():
        shutil.rmtree(root / tag, ignore_errors=True)  # a stale half-written save of the same step
    distributed.barrier()
    written, error = distributed.save(engine, root, tag, client_state, faults.save_hook(step))
    _agree(distributed.gather(error), root / tag)
    faults.maybe_kill_in_save(step)
    files = {k: v for rank_files in distributed.gather(written) for k, v in rank_files.items()}
    error = None
    if distributed.is_main():
        try:
            (root / tag / "config.yaml").write_text(to_yaml(cfg))
            files[str(root / tag / "config.yaml")] = distributed.file_digest(root / tag / "config.yaml")
            manifest = {os.path.relpath(p, root / tag): {"bytes": n, "sha256": h} for p, (n, h) in files.items()}
            _fsync_write(root / tag / COMPLETE, json.dumps({"step": step, "files": manifest}, indent=1) + "\n")
        except OSError as err:
            error = f"{err.filename or root / tag}: {err.strerror or err}"
    _agree(distributed.gather(error), root / tag)
    if distributed.is_main():
        for old in complete_tags(run_dir)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    distributed.barrier()


def _note(text: str) -> None:
    if distributed.is_main():
        print(f"[adapt] {text}", file=sys.stderr, flush=True)


def _agree(errors: list[str | None], folder: Path) -> None:
    """Raise on every rank when any rank's part of the save failed, after rank 0 removed the partial folder."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if distributed.is_main():
        shutil.rmtree(folder, ignore_errors=True)
    distributed.barrier()
    rank, error = failed[0]
    kept = complete_tags(folder.parent.parent)
    raise CheckpointError(f"saving {folder.name} failed on rank {rank} ({error}); the partial checkpoint was removed"
                          f" and {kept[-1] if kept else 'no earlier checkpoint'} is intact. Free disk space (or "
                          f"point run.output_dir elsewhere), then rerun the same command to resume")


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_complete(folder: Path) -> dict:
    """A COMPLETE marker: {"step": N, "files": {name: {"bytes", "sha256"}}} (older markers: the step only)."""
    text = (Path(folder) / COMPLETE).read_text()
    try:
        out = json.loads(text)
    except ValueError:
        return {"step": None, "files": {}}
    return out if isinstance(out, dict) else {"step": int(out), "files": {}}


def damage(folder: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with a complete checkpoint, or None: every recorded file must exist with its size;
    the files of this rank's share (every world-th one, from rank) are hashed too, so ranks split the reading."""
    folder = Path(folder)
    try:
        files = read_complete(folder)["files"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"{folder / COMPLETE} is unreadable ({err})"
    rank, world = share
    for i, (name, want) in enumerate(sorted(files.items())):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size} bytes, {want['bytes']} were written (truncated or altered)"
        if i % world == rank and distributed.file_digest(path)[1] != want["sha256"]:
            return f"{path} does not match the checksum written with it (altered or corrupted)"
    return None


def _verified(run_dir: Path, tag: str) -> str | None:
    """damage() of one checkpoint, the reading split over the ranks, the same answer on every rank."""
    found = distributed.gather(damage(ckpt_root(run_dir) / tag, (distributed.rank(), distributed.world_size())))
    return next((d for d in found if d), None)


# Fields a resumed run may change without invalidating its checkpoint (everything else must match).
RESUME_SAFE = ("train.max_steps", "train.log_every", "train.eval_every", "train.save_every",
               "train.keep_last", "train.eval_t_samples", "train.eval_method", "train.max_bad_steps", "run.", "dist.",
               "data.num_proc", "data.cache_dir", "optim.min_lr_ratio", "lora.export")



def resume_conflicts(saved: Config, current: Config) -> list[str]:
    """Fields that differ between a checkpoint's config and the current one and make resuming unsafe."""
    a, b = values(saved), values(current)
    return [f"`{k}`: checkpoint has {a[k]!r}, recipe has {b[k]!r}" for k in a
            if a[k] != b.get(k) and not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE)]


def find_resume(cfg: Config, say=None) -> str | None:
    """The checkpoint tag to resume from under `run.resume`, after checking its files and that the config
    is compatible. `auto` skips a damaged checkpoint (saying which file, through `say`) for the one before."""
    if cfg.run.resume == "never":
        return None
    say = say or _note
    if cfg.run.resume == "auto":
        tags = complete_tags(cfg.run_dir)
        if not tags:
            return None
        tag = _latest_intact(tags, lambda t: _verified(cfg.run_dir, t), say)
        if tag is None:
            raise CheckpointError(f"every checkpoint of {cfg.run_dir} is damaged (see above); start over with "
                                  f"run.resume=never or a new run.name")
    else:
        path = Path(cfg.run.resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"run.resume={path} is not a complete checkpoint (no {COMPLETE} marker); "
                                  f"pick one of {complete_tags(path.parent.parent) or 'none'} or run.resume=auto")
        if path.parent.resolve() != ckpt_root(cfg.run_dir).resolve():
            raise CheckpointError(f"run.resume={path} is not under {ckpt_root(cfg.run_dir)}; "
                                  f"set run.name/run.output_dir to the run it belongs to")
        tag = path.name
        problem = _verified(cfg.run_dir, tag)
        if problem:
            raise CheckpointError(f"run.resume={path} is damaged: {problem}; pick another checkpoint or "
                                  f"run.resume=auto (which falls back to the last intact one)")
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
    tag = export_tag(run_dir, tag)
    saved = from_dict(yaml.safe_load((ckpt_root(run_dir) / tag / "config.yaml").read_text()))
    base = run_dir / "base"
    meta = read_meta(base)
    step = read_complete(ckpt_root(run_dir) / tag)["step"] or int(tag[len("step_"):])
    from adapt.attention import anneal_ratio

    ratio = anneal_ratio(step, saved.attention.anneal_steps)
    meta = replace(meta, anneal_ratio=ratio, bidirectional=ratio >= 1.0)
    out = Path(out) if out else run_dir / "final"
    tmp = _export_tmp(out, run_dir)
    try:
        _write_export(run_dir, tag, saved, meta, tmp, dtype)
        faults.maybe_kill_in_export()
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: the unfinished export of a failed run of this command
    return out


def _export_tmp(out: Path, run_dir: Path) -> Path:
    """The temporary folder beside `out` an export is written into, made only once `out` may be replaced and
    its folder written: CheckpointError (before any work) otherwise."""
    problem = destination_problem(out, [run_dir / "base", ckpt_root(run_dir)])
    problem = problem or writable_problem(out.parent)
    if problem:
        raise CheckpointError(f"cannot export to {out}: {problem}")
    return _tmp_sibling(out)


def _write_export(run_dir: Path, tag: str, saved: Config, meta: DiffusionMeta, tmp: Path, dtype: str | None) -> None:
    """The export of checkpoint `tag` of `run_dir`, written into `tmp`."""
    state = distributed.consolidated_state_dict(ckpt_root(run_dir), tag)
    base = run_dir / "base"
    config = AutoConfig.from_pretrained(base)
    if saved.lora.enabled:  # peft keys: merge the adapter, or keep it in tmp/adapter
        from adapt.lora import export_model

        keep = tmp / ADAPTER_DIR if saved.lora.export == "adapter" else None
        model = export_model(config, state, saved.lora, meta.mask_token_id, DTYPES[dtype or saved.model.dtype], keep)
    else:
        model = _model_from_state(config, state, tag)
        model.to(DTYPES[dtype or saved.model.dtype])
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    if (base / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base).save_pretrained(tmp)
    save_meta(tmp, meta)
    (tmp / RECIPE_FILE).write_text(to_yaml(saved))
    from adapt.hf_export import write_hf_extras  # custom_generate/, decoding defaults, model card

    write_hf_extras(tmp, meta, saved, run_dir=run_dir, adapter=ADAPTER_DIR if (tmp / ADAPTER_DIR).is_dir() else None)


def export_tag(run_dir: Path, tag: str | None, say=None) -> str:
    """The checkpoint to export: `tag`, refused when it is incomplete or damaged; by default the latest
    intact one (a damaged later one is named through `say` and skipped)."""
    tags, say = complete_tags(run_dir), say or _note
    if not tags:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to export")
    if tag is not None:
        if tag not in tags:
            raise CheckpointError(f"{tag} is not a complete checkpoint of {run_dir}; choose from {', '.join(tags)}")
        problem = damage(ckpt_root(run_dir) / tag)
        if problem:
            raise CheckpointError(f"checkpoint {tag} is damaged: {problem}; export another one (--tag, of "
                                  f"{', '.join(t for t in tags if t != tag) or 'none'})")
        return tag
    tag = _latest_intact(tags, lambda t: damage(ckpt_root(run_dir) / t), say)
    if tag is None:
        raise CheckpointError(f"every checkpoint of {run_dir} is damaged (see above); nothing to export")
    return tag


def _latest_intact(tags: list[str], problem_of, say) -> str | None:
    """The newest of `tags` that `problem_of` finds nothing wrong with; each damaged newer one is named by `say`."""
    for tag in reversed(tags):
        problem = problem_of(tag)
        if problem is None:
            return tag
        say(f"skipping damaged checkpoint {tag}: {problem}")
    return None


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

def _with_adapter(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """The model of an export folder with its `lora.export=adapter` adapter merged, if it has one: the base
    weights alone are the model before its adaptation."""
    if not (path / ADAPTER_DIR).is_dir():
        return model
    from adapt.lora import merge_adapter

    return merge_adapter(model, path / ADAPTER_DIR)


def load_weights(mcfg) -> PreTrainedModel:
    """`adapt.model.load_causal_lm`, an export's adapter merged: the weights the export stands for, to train a
    next stage from, to judge with or to measure."""
    model = load_causal_lm(mcfg)
    return _with_adapter(model, Path(str(mcfg.name_or_path))) if exported_meta(mcfg.name_or_path) else model


def load_diffusion_model(path: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa",
                         device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from an exported folder, in eval mode, attention set for diffusion."""
    path = Path(path)
    problem = export_problem(path)
    if problem:
        raise ModelLoadError(problem)
    meta = read_meta(path)
    config = AutoConfig.from_pretrained(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_implementation, why = usable_backend(attn_implementation, device, head_dim)
    if why:
        warnings.warn(why, stacklevel=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:  # transformers' own words for a folder it cannot load
        raise ModelLoadError(f"{path} does not load as a model ({str(err).splitlines()[0]}); export the run "
                             f"again with `python -m adapt.export RUN_DIR`") from None
    model = _with_adapter(model, path)
    set_causal(model, not meta.bidirectional)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer, meta
