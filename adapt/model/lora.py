"""LoRA through peft, for the adapt and sft stages.

Adapters go on the linear layers named in `lora.target_modules`; everything else is frozen except
the mask token's input-embedding row, which peft trains through `trainable_token_indices` (a
(1, hidden) delta copied into the embedding at forward time). A tied head shares that row. An untied
head's mask row stays frozen on purpose: the mask token is never predicted (its logit is blocked), so
that row gets no gradient.

Export folds the adapter into the weights (`lora.export=merged`, default: a plain HF folder) or writes
the base weights with the peft adapter beside them in `adapter/` (`lora.export=adapter`);
`adapt.export.load_diffusion_model` merges such an adapter at load time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from adapt.recipe.config import LoraConfig
from adapt.model.causal import DiffusionMeta, ModelLoadError



def peft_config(lcfg: LoraConfig, mask_token_id: int):
    """The peft LoraConfig of a recipe's `lora` section."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                          target_modules=list(lcfg.target_modules), bias="none", task_type="CAUSAL_LM",
                          trainable_token_indices=[mask_token_id])


def apply_lora(model: PreTrainedModel, lcfg: LoraConfig, meta: DiffusionMeta):
    """Wrap `model` in a peft model with adapters and a trainable mask-token row; returns the peft model."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(lcfg, meta.mask_token_id))
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelLoadError(f"lora.target_modules={list(lcfg.target_modules)} does not fit "
                             f"{type(model).__name__} ({str(err).splitlines()[0]}); its linear layers are named "
                             f"{', '.join(linear)}") from None


def trainable_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def export_model(config, state: dict[str, torch.Tensor], lcfg: LoraConfig, mask_token_id: int,
                 dtype: torch.dtype, adapter_dir: Path | None = None) -> PreTrainedModel:
    """A plain HF model from a LoRA run's consolidated state dict.

    adapter_dir None: the adapter merged into the weights. Otherwise the peft adapter is saved there
    and the returned model holds the base weights alone. The tensors of `state` are taken over (assigned,
    then merged in place), not copied: a 7B state dict is not duplicated in host memory.
    """
    from peft import get_peft_model

    tied = bool(getattr(config, "tie_word_embeddings", False))  # read now: peft's merge rewrites the config
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    wrapped = get_peft_model(base, peft_config(lcfg, mask_token_id))
    missing, unexpected = wrapped.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not any(k.endswith(t) for t in _tied(base))]
    if missing or unexpected:
        raise ModelLoadError(f"the LoRA checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    wrapped.to(dtype)
    if adapter_dir is None:
        return _retie(wrapped.merge_and_unload(), tied)
    wrapped.save_pretrained(adapter_dir, safe_serialization=True)
    plain = wrapped.unload()
    plain.tie_weights()
    return plain


def _retie(model: PreTrainedModel, tied: bool) -> PreTrainedModel:
    """peft merges the mask row into the embedding and the tied head as two tensors and unties the config;
    they hold the same values, so tie them again (one matrix on disk, as in the parent)."""
    head = model.get_output_embeddings()
    if tied and head is not None and torch.equal(head.weight, model.get_input_embeddings().weight):
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model


def _tied(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if not isinstance(keys, dict) else keys.keys())


def merge_adapter(model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """Apply the peft adapter of an `lora.export=adapter` folder to its base weights, merged (a tied head tied
    again, as in a merged export)."""
    from peft import PeftModel

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return _retie(PeftModel.from_pretrained(model, folder).merge_and_unload(), tied)
