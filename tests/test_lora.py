"""LoRA through peft: what trains, and exports (merged, or adapter beside the base) that give the same logits."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM

from adapt.recipe.config import LoraConfig
from adapt.export import ADAPTER_DIR
from adapt.model.lora import apply_lora, export_model, merge_adapter, trainable_counts
from adapt.model.causal import DiffusionMeta, ModelLoadError
from test_eval_fixtures import exported_dir  # noqa: F401

V, MASK = 100, 97
LCFG = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0)


def adapted(tie: bool):
    """A tiny model wrapped with LoRA whose adapters and mask row are moved away from their init."""
    model = tiny_llama(V, tie=tie)
    peft_model = apply_lora(model, LCFG, DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK + 1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft_model.eval()


def tokens() -> torch.Tensor:
    x = torch.randint(3, MASK, (2, 12), generator=torch.Generator().manual_seed(1))
    x[:, 4:8] = MASK  # the trained mask row matters
    return x


@pytest.mark.parametrize("tie", [False, True])
def test_only_adapters_and_the_mask_row_train(tie):
    peft_model = adapted(tie)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    assert sum("embed_tokens" in n and "trainable_tokens_delta" in n for n in names) == 1
    trainable, total = trainable_counts(peft_model)
    hidden, kv, inter, layers = 32, 16, 64, 2  # tiny_llama: 4 heads of 8, 2 key/value heads
    in_out = (hidden + hidden) + 2 * (hidden + kv) + (hidden + hidden) + 3 * (hidden + inter)  # q, k, v, o, mlp
    assert trainable == layers * LCFG.r * in_out + hidden  # r*(in+out) per projection + one embedding row
    peft_model.train()
    peft_model(input_ids=tokens()).logits.sum().backward()
    delta = next(p for n, p in peft_model.named_parameters() if "embed_tokens" in n and "delta" in n)
    assert delta.shape == (1, hidden) and delta.grad.abs().sum() > 0


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("keep_adapter", [False, True])
def test_export_matches_base_plus_adapter(tie, keep_adapter, tmp_path):
    peft_model = adapted(tie)
    with torch.no_grad():
        expected = peft_model(input_ids=tokens()).logits
    peft_model.get_base_model().config.save_pretrained(tmp_path / "base")
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}  # what zero_to_fp32 hands export
    out = tmp_path / "final"
    model = export_model(AutoConfig.from_pretrained(tmp_path / "base"), state, LCFG, MASK, torch.float32,
                         out / ADAPTER_DIR if keep_adapter else None)
    model.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    if keep_adapter:
        assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
        with torch.no_grad():  # the base alone differs: the adapter really is separate
            assert (loaded(input_ids=tokens()).logits - expected).abs().max() > 1e-3
        loaded = merge_adapter(loaded, out / ADAPTER_DIR)
    else:
        assert loaded.config.tie_word_embeddings == tie  # one matrix on disk when the parent was tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, expected, rtol=1e-5, atol=1e-5)


def test_wrong_target_modules_named():
    with pytest.raises(ModelLoadError, match="q_proj"):
        apply_lora(tiny_llama(V), LoraConfig(enabled=True, target_modules=["c_attn"]),
                   DiffusionMeta(mask_token_id=MASK, real_vocab_size=MASK + 1))


def test_an_adapter_export_is_loaded_with_its_adapter_by_every_command(exported_dir, tmp_path):  # noqa: F811
    """A `lora.export=adapter` export holds the base weights with the adapter beside them: a next stage, the judge,
    the parent of a later stage and the benchmarks (export.load_weights) must start from base + adapter, as
    load_diffusion_model does, not from the base alone (the model before its adaptation)."""
    import shutil

    from peft import get_peft_model

    from adapt.export import load_diffusion_model, load_weights
    from adapt.recipe.config import ModelConfig
    from adapt.model.lora import peft_config
    from adapt.model.causal import set_causal

    export = tmp_path / "final"
    shutil.copytree(exported_dir, export)
    _, _, meta = load_diffusion_model(export)
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(export), peft_config(LCFG, meta.mask_token_id))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    wrapped.save_pretrained(export / ADAPTER_DIR)
    ids = torch.tensor([[1, 5, 9, 14, 20, 3]])
    reference, _, _ = load_diffusion_model(export)
    models = {"loaded": load_weights(ModelConfig(name_or_path=str(export), dtype="fp32")),
              "base": AutoModelForCausalLM.from_pretrained(export)}
    with torch.no_grad():
        set_causal(reference, True)
        expected = reference(input_ids=ids).logits
        out = {}
        for name, model in models.items():
            set_causal(model.eval(), True)
            out[name] = model(input_ids=ids).logits
    torch.testing.assert_close(out["loaded"], expected, rtol=1e-5, atol=1e-5)
    assert (out["base"] - expected).abs().max() > 1e-2  # the adapter changes the model: the test can fail
    plain = load_weights(ModelConfig(name_or_path=str(exported_dir), dtype="fp32"))  # no adapter: as before
    assert not any("lora" in n for n, _ in plain.named_parameters())
