"""Reading an export: whether a folder is one (export_problem), and the model it stands for (load_diffusion_model
for sampling and evaluation, load_weights to train a next stage from or to measure), its adapter merged.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from adapt.model.attention import usable_backend
from adapt.train.checkpoint import BASE_DIR, CHECKPOINTS_DIR, base_dir, ckpt_root, final_dir
from adapt.export.contract import ADAPTER_DIR, META_FILE, WEIGHTS_FILE, contents_problem, exported_meta, read_meta
from adapt.model.causal import DTYPES, ModelLoadError, load_causal_lm, set_causal


def export_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a loadable export (missing, a run folder, a checkpoint, a causal LM), or None."""
    path = Path(folder).expanduser()
    if not path.exists():
        return f"{path} not found; pass an exported folder such as checkpoints/<run>/final"
    if not path.is_dir():
        return f"{path} is a file; pass an exported folder such as checkpoints/<run>/final"
    run = path if base_dir(path).is_dir() else path.parent if path.name == BASE_DIR else None
    run = run or (path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None)
    run = run or (path.parent if path.name == CHECKPOINTS_DIR else None)
    if run is not None and (ckpt_root(run).is_dir() or base_dir(run).is_dir()):
        return (f"{path} belongs to a training run, not an export; export it first with "
                f"`python -m adapt.export {run}` (then use {final_dir(run)})")
    if not (path / META_FILE).is_file():
        return (f"{path} has no {META_FILE}: it is not an exported diffusion model; export a run with "
                f"`python -m adapt.export RUN_DIR`")
    if not (path / WEIGHTS_FILE).is_file() and not any(path.glob("model-*.safetensors")):
        return f"{path} has no {WEIGHTS_FILE}: the export is incomplete; export it again with `python -m adapt.export`"
    try:
        return contents_problem(path, read_meta(path))
    except ModelLoadError as err:
        return str(err)


def _with_adapter(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """The model of an export folder with its `lora.export=adapter` adapter merged, if it has one: the base
    weights alone are the model before its adaptation."""
    if not (path / ADAPTER_DIR).is_dir():
        return model
    from adapt.model.lora import merge_adapter

    return merge_adapter(model, path / ADAPTER_DIR)


def load_weights(mcfg) -> PreTrainedModel:
    """`adapt.model.causal.load_causal_lm`, an export's adapter merged: the weights the export stands for, to train a
    next stage from, to judge with or to measure."""
    model = load_causal_lm(mcfg)
    return _with_adapter(model, Path(str(mcfg.name_or_path))) if exported_meta(mcfg.name_or_path) else model


def load_diffusion_model(path: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa",
                         device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from an exported folder, in eval mode, attention set for diffusion. The folder's draft
    head, when it has one, is read apart (adapt.draft_head.load_draft_head) and handed to the speculative decoder."""
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

