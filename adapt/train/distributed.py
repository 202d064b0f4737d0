"""The only module that imports DeepSpeed: process group, collectives, the engine and its optimizer, checkpoints,
consolidation. The training loop drives the engine this module builds (backward, step) through its methods."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from adapt.recipe.config import Config


def init(timeout_s: float = 1800.0) -> None:
    """Join the process group started by the `deepspeed` launcher, or make a one-process group.

    `python adapt/run.py` has no launcher environment; DeepSpeed then needs the rendezvous
    variables of a world of one. On CPU DeepSpeed's accelerator picks the gloo backend. A collective
    that waits longer than `timeout_s` for another rank (dead on another node, or hung) raises
    instead of hanging (adapt.cli.errors turns that into a message).
    """
    from datetime import timedelta

    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout_s))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (float64, CPU tensors work with gloo)."""
    if not dist.is_initialized() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def device() -> torch.device:
    """This rank's device, as DeepSpeed's accelerator names it (cpu, cuda:N, ...)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def ds_config(cfg: Config) -> dict:
    """The DeepSpeed config a recipe implies, with `dist.deepspeed_config` JSON merged on top."""
    zero: dict = {"stage": cfg.dist.zero_stage}
    if cfg.dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.dist.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.deepspeed_config:
        extra = json.loads(Path(cfg.dist.deepspeed_config).read_text())
        _merge(out, extra)
    return out


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def adamw(params: list[dict], offload: bool, **kw) -> torch.optim.Optimizer:
    """AdamW over parameter groups: DeepSpeedCPUAdam when the optimizer is offloaded to the CPU, else torch's."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    return torch.optim.AdamW(params, **kw)


def initialize(model: torch.nn.Module, optimizer, scheduler, config: dict):
    """A DeepSpeed engine around model/optimizer/scheduler (the engine owns their checkpointing)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    return engine


def save(engine, folder: Path, tag: str, client_state: dict, before_write=None) -> tuple[dict, str | None]:
    """Write this rank's part of a DeepSpeed checkpoint; returns ({path: (bytes, sha256)} of the files it
    wrote, None) or (..., the first write error). A failed write does not raise, so this rank follows
    DeepSpeed's collective save to its end like the others and the ranks can agree afterwards.
    `before_write(path)` runs before each file (the fault hook)."""
    ckpt_engine = engine.checkpoint_engine
    original = ckpt_engine.save
    written: dict[str, tuple[int, str]] = {}
    failed: list[str] = []

    def recording_save(state_dict, path: str) -> None:
        if failed:
            return
        try:
            if before_write is not None:
                before_write(path)
            original(state_dict, path)
            written[path] = file_digest(Path(path))
        except OSError as err:
            failed.append(f"{path}: {err.strerror or err}")
            Path(path).unlink(missing_ok=True)

    ckpt_engine.save = recording_save
    try:
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    finally:
        ckpt_engine.save = original
    return written, (failed[0] if failed else None)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 8 MiB chunks (just written: from the page cache)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def load(engine, folder: Path, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}/{tag}")
    return client_state


def consolidated_state_dict(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint of any ZeRO stage, on CPU (zero_to_fp32 for ZeRO >= 1)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(folder) / tag
    if any(ckpt.glob("*optim_states.pt")) and any("zero" in p.name for p in ckpt.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def zero_estimate(total_params: int, largest_layer_params: int, stage: int, gpus_per_node: int, nodes: int,
                  offload_optimizer: bool, offload_param: bool) -> tuple[int, int] | None:
    """(CPU bytes per node, GPU bytes per GPU) of model states from DeepSpeed's own estimators for bf16
    mixed-precision full training at ZeRO-2/3 (None for stages it has no estimator for)."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(total_params, gpus_per_node, nodes, offload_optimizer)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, gpus_per_node, nodes,
                                                            offload_optimizer or offload_param, offload_param)
        return cpu, gpu
    return None
