"""Writing an export: the folder `python -m adapt.export` and the end of each training stage make from a run's
checkpoint, and base/, the part of it written once at the start of a run (the run folder: adapt.train.checkpoint).

    <export>/model*.safetensors, config.json, tokenizer  the consolidated weights (any ZeRO stage), the tokenizer
    <export>/diffusion.json, recipe.yaml                diffusion metadata, resolved recipe (adapt.export.contract)
    <export>/adapter/                                   the peft adapter of a lora.export=adapter run
    <export>/custom_generate/generate.py                the self-contained decoder (adapt/export/hf_generate/)
    <export>/custom_generate/requirements.txt           torch and transformers, checked by transformers at load
    <export>/generation_config.json                     diffusion decoding defaults (greedy, sampler, steps, blocks)
    <export>/README.md                                  model card with the Hub's metadata header (adapt.export.card)

The export is written to a temporary folder beside its destination and renamed into place, so a reader never
sees half an export; it replaces only an empty folder or an earlier export. transformers loads
custom_generate/generate.py as the model's `generate` only with `trust_remote_code=True` (issue 16); without it
`generate` is the parent's left-to-right decoding.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from adapt.train import distributed, faults
from adapt.train.checkpoint import (CONFIG_FILE, CheckpointError, base_dir, ckpt_root, complete_tags, damage, final_dir,
                              latest_intact, metrics_file, note, read_complete)
from adapt.recipe.config import Config, from_dict, to_yaml
from adapt.export.card import model_card
from adapt.export.contract import (ADAPTER_DIR, RECIPE_FILE, destination_problem, read_meta, save_meta,
                                   writable_problem)
from adapt.train.metrics import read_records
from adapt.model.causal import DTYPES, DiffusionMeta


def export(run_dir: Path, tag: str | None = None, out: Path | None = None, dtype: str | None = None) -> Path:
    """Consolidate a DeepSpeed checkpoint of a run (any ZeRO stage) into an HF folder; returns it."""
    run_dir = Path(run_dir)
    tag = export_tag(run_dir, tag)
    saved = from_dict(yaml.safe_load((ckpt_root(run_dir) / tag / CONFIG_FILE).read_text()))
    meta = read_meta(base_dir(run_dir))
    step = read_complete(ckpt_root(run_dir) / tag)["step"] or int(tag[len("step_"):])
    from adapt.model.attention import anneal_ratio

    ratio = anneal_ratio(step, saved.attention.anneal_steps)
    meta = replace(meta, anneal_ratio=ratio, bidirectional=ratio >= 1.0)
    out = Path(out) if out else final_dir(run_dir)
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
    problem = destination_problem(out, [base_dir(run_dir), ckpt_root(run_dir)])
    problem = problem or writable_problem(out.parent)
    if problem:
        raise CheckpointError(f"cannot export to {out}: {problem}")
    return _tmp_sibling(out)


def _write_export(run_dir: Path, tag: str, saved: Config, meta: DiffusionMeta, tmp: Path, dtype: str | None) -> None:
    """The export of checkpoint `tag` of `run_dir`, written into `tmp`."""
    state = distributed.consolidated_state_dict(ckpt_root(run_dir), tag)
    base = base_dir(run_dir)
    config = AutoConfig.from_pretrained(base)
    if saved.lora.enabled:  # peft keys: merge the adapter, or keep it in tmp/adapter
        from adapt.model.lora import export_model

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
    write_hf_extras(tmp, meta, saved, run_dir=run_dir, adapter=ADAPTER_DIR if (tmp / ADAPTER_DIR).is_dir() else None)


def export_tag(run_dir: Path, tag: str | None, say=None) -> str:
    """The checkpoint to export: `tag`, refused when it is incomplete or damaged; by default the latest
    intact one (a damaged later one is named through `say` and skipped)."""
    tags, say = complete_tags(run_dir), say or note
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
    tag = latest_intact(tags, lambda t: damage(ckpt_root(run_dir) / t), say)
    if tag is None:
        raise CheckpointError(f"every checkpoint of {run_dir} is damaged (see above); nothing to export")
    return tag


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


def save_base(run_dir: Path, model, tokenizer, meta: DiffusionMeta) -> None:
    """What an export needs besides the weights, written once at the start of a run (rank 0)."""
    base = base_dir(run_dir)
    tmp = _tmp_sibling(base)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    save_meta(tmp, meta)
    _swap_into_place(tmp, base)


# --- what makes an export usable in plain transformers (issue 16) -----------------------------------

GENERATE_SOURCE = Path(__file__).resolve().parent / "hf_generate" / "generate.py"
SHIPPED = (GENERATE_SOURCE, GENERATE_SOURCE.with_name("primitives.py"))
"""The decoder's files an export carries (generate.py imports primitives.py beside it; transformers copies both)."""
GENERATE_DIR = "custom_generate"
REQUIREMENTS = "torch>=2.1\ntransformers>=5.0\n"
"""One requirement per line: transformers checks each against the installed version when it loads the folder."""
DECODING_DEFAULTS = {"do_sample": False, "max_new_tokens": 64, "diffusion_sampler": "confidence",
                     "diffusion_steps": 0, "diffusion_block_length": 32, "diffusion_tau": 0.9,
                     "diffusion_confidence": "prob"}
"""generation_config.json of an export: greedy confidence decoding in semi-autoregressive blocks of 32,
one step per generated token (diffusion_steps 0); a block export decodes in its own blocks instead."""
_KEPT = ("bos_token_id", "eos_token_id", "pad_token_id")
"""What an export keeps of the parent's generation config: its sampling defaults are for left-to-right decoding."""


def write_hf_extras(folder: str | Path, meta, recipe_cfg=None, summary: dict | None = None,
                    run_dir: str | Path | None = None, adapter: str | None = None) -> None:
    """Write custom_generate/, generation_config.json and README.md into an export folder.

    meta: the export's DiffusionMeta (or its dict); recipe_cfg: the resolved training Config (or its
    dict, or None); summary: held-out figures to show, else they are read from run_dir/metrics.jsonl
    when that exists (else the card says they were not measured); adapter: the folder name of a LoRA adapter
    kept apart from the weights (the card says how to load it).
    """
    folder = Path(folder)
    meta = _as_dict(meta)
    recipe = _as_dict(recipe_cfg) if recipe_cfg is not None else {}
    write_generate(folder)
    write_generation_config(folder, meta)
    if summary is None and run_dir is not None:
        summary = run_figures(metrics_file(run_dir))
    (folder / "README.md").write_text(model_card(meta, recipe, summary or {}, _bos_adds(folder), adapter))


def write_generate(folder: Path) -> None:
    out = Path(folder) / GENERATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    for source in SHIPPED:
        shutil.copyfile(source, out / source.name)
    (out / "requirements.txt").write_text(REQUIREMENTS)


def write_generation_config(folder: Path, meta: dict) -> GenerationConfig:
    """Diffusion decoding defaults plus the token ids (kept from the parent's config, else the tokenizer's).

    Sampling options of the parent (temperature, top_p, ...) are dropped: with do_sample False
    GenerationConfig refuses to save them, and they were tuned for left-to-right decoding.
    """
    folder = Path(folder)
    old = GenerationConfig.from_pretrained(folder).to_dict() if (folder / "generation_config.json").is_file() else {}
    ids = {k: old[k] for k in _KEPT if old.get(k) is not None}
    if (folder / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(folder)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        for key, value in (("bos_token_id", start), ("eos_token_id", tok.eos_token_id),
                           ("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)):
            if value is not None:
                ids.setdefault(key, value)
    defaults = dict(DECODING_DEFAULTS)
    if meta.get("block_length"):
        defaults["diffusion_block_length"] = 0  # a block export decodes in its own blocks
    config = GenerationConfig(**ids, **defaults)
    config.save_pretrained(folder)
    return config


def run_figures(metrics: Path) -> dict:
    """Held-out figures of a training run from its metrics.jsonl: {"rows": [(label, step, text)], ...}.

    The step-0 evaluation (parent, bound before), the last evaluation during training, and the
    final summary when the run wrote one. Empty when the file is missing or holds no evaluation.
    """
    evals = [r for r in read_records(metrics) if r.get("kind") in ("eval", "summary")]
    if not evals:
        return {}
    first = [r for r in evals if r.get("step") == 0 and r.get("kind") == "eval"]
    later = [r for r in evals if r.get("step", 0) > 0 and r.get("kind") == "eval"]
    final = [r for r in evals if r.get("kind") == "summary"]
    picked = first[-1:] + later[-1:] + final[-1:]
    rows, seen = [], set()
    for record in picked:  # the summary repeats the step-0 figures: the first record of a label wins
        for label, text in _ppl_rows(record):
            if label not in seen:
                seen.add(label)
                rows.append((label, int(record["step"]), text))
    return {"rows": rows, "tokens": next((r[k] for r in picked for k in r if k.endswith("tokens")), None)}


_LABELS = {"parent_": "parent causal LM, exact perplexity",
           "before_causal_": "diffusion bound before training, causal attention",
           "before_": "diffusion bound before training, bidirectional", "after_": "diffusion bound after training",
           "": "diffusion bound during training"}


def _ppl_rows(record: dict) -> list[tuple[str, str]]:
    out = []
    for key, value in record.items():
        if not key.endswith("ppl") or not isinstance(value, (int, float)):
            continue
        prefix = key[:-3]
        label = _LABELS.get(prefix, f"{prefix.rstrip('_')} (perplexity)")
        low, high = record.get(f"{key}_low"), record.get(f"{key}_high")
        exact = prefix == "parent_"
        text = f"{value:.2f}" if exact else f"<= {value:.2f}"
        if not exact and isinstance(low, (int, float)) and isinstance(high, (int, float)):
            text += f" (95% CI {low:.1f}-{high:.1f})"
        out.append((label, text))
    return out


def _bos_adds(folder: Path) -> bool | None:
    """Whether the export's tokenizer puts BOS in front of a plain call (None when there is no tokenizer)."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return None
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("a").input_ids
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def _as_dict(value) -> dict:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (str, Path)):
        return yaml.safe_load(Path(value).read_text()) or {}
    return dict(value)
