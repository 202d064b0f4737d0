"""The run folder's layout and resumable checkpoints. Every other module finds a run folder's paths here.

    <run>/config.yaml           resolved config of the latest launch                config_file(run)
    <run>/base/                 model config (resized vocabulary), tokenizer with   base_dir(run)
                                the mask token, diffusion.json: what an export needs
                                besides the weights (written by adapt.export)
    <run>/checkpoints/step_N/   DeepSpeed checkpoint + config.yaml + COMPLETE       ckpt_root(run) / tag_for(N)
                                (written last)
    <run>/metrics.jsonl         one JSON line per logged step / evaluation          metrics_file(run)
    <run>/tensorboard/          the same scalars for TensorBoard (run.tensorboard)  tensorboard_dir(run)
    <run>/curve.png             held-out bounds against training tokens             curve_file(run)
    <run>/final/                the default export (adapt.export: what it holds)    final_dir(run)
    <run>/LOCK                  the launch holding the folder (adapt.train.runlock's own file)

A checkpoint without COMPLETE was interrupted while saving and is never resumed from; COMPLETE records every
file's size and sha256, so a damaged checkpoint is named and skipped (resume and export take the last intact
one). Training writes config.yaml, the checkpoints and the metrics; adapt.export writes base/ and final/.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from adapt.train import distributed, faults
from adapt.recipe.config import Config, from_dict, to_yaml, values

CONFIG_FILE = "config.yaml"
"""The resolved config: of the latest launch in the run folder, of the run at that step in each checkpoint."""
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVE_FILE = "curve.png"
BASE_DIR = "base"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed or exported; the message says why and what to do."""


# --- the run folder ------------------------------------------------------------------------------

def config_file(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def curve_file(run_dir: Path) -> Path:
    return Path(run_dir) / CURVE_FILE


def base_dir(run_dir: Path) -> Path:
    return Path(run_dir) / BASE_DIR


def final_dir(run_dir: Path) -> Path:
    return Path(run_dir) / FINAL_DIR


# --- resumable checkpoints -----------------------------------------------------------------------

def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def complete_tags(run_dir: Path) -> list[str]:
    """Tags of checkpoints whose save finished, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


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
            (root / tag / CONFIG_FILE).write_text(to_yaml(cfg))
            files[str(root / tag / CONFIG_FILE)] = distributed.file_digest(root / tag / CONFIG_FILE)
            manifest = {os.path.relpath(p, root / tag): {"bytes": n, "sha256": h} for p, (n, h) in files.items()}
            _fsync_write(root / tag / COMPLETE, json.dumps({"step": step, "files": manifest}, indent=1) + "\n")
        except OSError as err:
            error = f"{err.filename or root / tag}: {err.strerror or err}"
    _agree(distributed.gather(error), root / tag)
    if distributed.is_main():
        for old in complete_tags(run_dir)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    distributed.barrier()


def note(text: str) -> None:
    """A line on stderr, from rank 0 only."""
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
    say = say or note
    if cfg.run.resume == "auto":
        tags = complete_tags(cfg.run_dir)
        if not tags:
            return None
        tag = latest_intact(tags, lambda t: _verified(cfg.run_dir, t), say)
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
    saved = from_dict(yaml.safe_load((ckpt_root(cfg.run_dir) / tag / CONFIG_FILE).read_text()))
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise CheckpointError(
            f"cannot resume {cfg.run_dir} from {tag}: the recipe changed in ways the checkpoint cannot follow:\n  "
            + "\n  ".join(conflicts)
            + "\nrevert these, start a new run (run.name=...), or start over with run.resume=never")
    return tag


def latest_intact(tags: list[str], problem_of, say) -> str | None:
    """The newest of `tags` that `problem_of` finds nothing wrong with; each damaged newer one is named by `say`."""
    for tag in reversed(tags):
        problem = problem_of(tag)
        if problem is None:
            return tag
        say(f"skipping damaged checkpoint {tag}: {problem}")
    return None


