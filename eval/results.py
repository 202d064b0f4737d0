"""Results files: one JSON per script, with what produced it (model, options, machine, time)."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from eval.models import EvalContext


def machine() -> dict:
    """The machine a measurement was taken on (timings are only comparable on the same one)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(ctx: EvalContext | None, options: dict) -> dict:
    """What a results file was computed from (`ctx` None: a script that loads no model)."""
    if ctx is None:
        return {"options": options, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {"model_dir": str(ctx.model_dir), "meta": vars(ctx.meta).copy(), "parent": ctx.parent_config().name_or_path
            if (ctx.parent_path or ctx.meta.parent) else "", "judge": ctx.judge_path or "parent",
            "seed": ctx.seed, "dtype": ctx.dtype, "device": str(ctx.device), "options": options,
            "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _clean(value):
    """JSON-safe copy: NaN/inf become None, tuples lists, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out_dir: Path, name: str, payload: dict) -> Path:
    """Write out_dir/name.json (written then renamed) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_results(out_dir: Path, name: str) -> dict | None:
    path = Path(out_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
