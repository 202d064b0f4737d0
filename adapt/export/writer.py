"""What makes an export usable in plain transformers: its own diffusion `generate`, decoding defaults
and a model card (issue 16).

    <export>/custom_generate/generate.py        the self-contained decoder (adapt/hf_generate/generate.py)
    <export>/custom_generate/requirements.txt   torch and transformers, checked by transformers at load
    <export>/generation_config.json             diffusion decoding defaults (greedy, sampler, steps, blocks)
    <export>/README.md                          model card with the Hub's metadata header

`checkpoint.export` calls `write_hf_extras` on the finished temporary folder, before it is renamed
into place. transformers loads custom_generate/generate.py as the model's `generate` only with
`trust_remote_code=True`; without it `generate` is the parent's left-to-right decoding.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml
from transformers import AutoTokenizer, GenerationConfig

from adapt.metrics import read_records
from adapt.model_card import model_card

GENERATE_SOURCE = Path(__file__).resolve().parent / "hf_generate" / "generate.py"
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
        summary = run_figures(Path(run_dir) / "metrics.jsonl")
    (folder / "README.md").write_text(model_card(meta, recipe, summary or {}, _bos_adds(folder), adapter))


def write_generate(folder: Path) -> None:
    out = Path(folder) / GENERATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GENERATE_SOURCE, out / "generate.py")
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


_LABELS = {"parent_": "parent causal LM, exact perplexity", "before_causal_": "diffusion bound before training, causal attention",
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
