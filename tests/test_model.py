"""Loading parents (HF folder, GGUF, refusals) and giving them a mask token (tied and untied heads)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapt.recipe.config import EMBEDDED_MODEL, ModelConfig
from adapt.export import read_meta, save_meta
from adapt.model.causal import (ModelLoadError, add_mask_token, embedded_gguf, forward_logits, load_causal_lm,
                         load_tokenizer, resolve_source)


def mcfg(path, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), **{"dtype": "fp32", **kw})


def ids(n: int = 12, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_load_hf_folder(tiny_model_dir):
    model = load_causal_lm(mcfg(tiny_model_dir, attn_implementation="eager"))
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(forward_logits(model.eval(), ids()), forward_logits(reference, ids()))
    assert load_causal_lm(mcfg(tiny_model_dir, dtype="bf16")).dtype == torch.bfloat16


def test_missing_paths_name_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="not found; pass an HF model folder"):
        load_causal_lm(mcfg(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="check model.name_or_path"):
        load_causal_lm(mcfg(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="model.gguf_file"):
        load_causal_lm(mcfg(tmp_path, gguf_file="x.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(mcfg(tmp_path))
    with pytest.raises(ModelLoadError):
        load_tokenizer(mcfg(tmp_path / "nope"))
    # offline hub id: a clear error, not a traceback
    with pytest.raises(ModelLoadError, match="cannot"):
        load_causal_lm(mcfg("no-such-org-xyz/no-such-model"))


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_causal_lm(mcfg(folder))
    model = load_causal_lm(mcfg(folder, allow_pickle=True))
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model.eval(), ids()), forward_logits(reference.eval(), ids()))


def _save_encoder(kind: str, folder: Path) -> Path:
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    if kind == "bert":
        BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(folder)
    elif kind == "bert_decoder":  # is_decoder=true, but saved without any LM head
        BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, is_decoder=True)).save_pretrained(folder)
    else:
        T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                d_kv=8)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,needle", [("t5", "not a causal LM|without a causal-LM head"), ("bert", "encoder"),
                                         ("bert_decoder", "no weights for")])
def test_model_without_causal_lm_head_refused(tmp_path, kind, needle):
    """T5 has no causal-LM class; a BERT folder would load as BertLMHeadModel with a random head."""
    folder = _save_encoder(kind, tmp_path / kind)
    with pytest.raises(ModelLoadError, match=needle) as info:
        load_causal_lm(mcfg(folder))
    assert "decoder-only causal LM" in str(info.value)


def test_truncated_checkpoint_refused(tmp_path):
    """A folder missing some weights must not load with those weights silently random."""
    from safetensors.torch import save_file

    model = tiny_llama(64)
    model.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lm_head"):
        load_causal_lm(mcfg(tmp_path))


def test_resolve_source(tmp_path):
    gguf = embedded_gguf()
    assert resolve_source(EMBEDDED_MODEL) == (str(gguf.parent), gguf.name)
    assert resolve_source(str(gguf)) == (str(gguf.parent.resolve()), gguf.name)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


# --- mask token --------------------------------------------------------------------------------

def _load(folder, **kw):
    cfg = mcfg(folder, **kw)
    return load_causal_lm(cfg).eval(), load_tokenizer(cfg), cfg


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_add_mask_token_resizes(tied, tiny_model_dir, tiny_tied_model_dir):
    model, tok, cfg = _load(tiny_tied_model_dir if tied else tiny_model_dir, pad_vocab_to_multiple_of=64)
    old_in = model.get_input_embeddings().weight.clone()
    old_out = model.get_output_embeddings().weight.clone()
    old_logits = forward_logits(model, ids())
    n = len(tok)
    meta = add_mask_token(model, tok, cfg)

    assert meta.mask_token_id == n and meta.real_vocab_size == n + 1 == len(tok)
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == n
    assert tok("a <|mask|> b", add_special_tokens=False)["input_ids"].count(n) == 1  # one token, not split
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    rows = -(-(n + 1) // 64) * 64
    assert new_in.shape[0] == new_out.shape[0] == rows == model.config.vocab_size
    assert torch.equal(new_in[:n], old_in)
    torch.testing.assert_close(new_in[n:], old_in.mean(0).expand(rows - n, -1))
    if tied:
        assert new_out.data_ptr() == new_in.data_ptr()  # still one matrix
    else:
        assert new_out.data_ptr() != new_in.data_ptr()
        assert torch.equal(new_out[:n], old_out)
        torch.testing.assert_close(new_out[n:], old_out.mean(0).expand(rows - n, -1))
    # the parent's function on its own vocabulary is unchanged
    torch.testing.assert_close(forward_logits(model, ids())[..., :n], old_logits)


def test_add_mask_token_after_save_reload_keeps_tie(tmp_path, tiny_tied_model_dir):
    model, tok, cfg = _load(tiny_tied_model_dir)
    meta = add_mask_token(model, tok, cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2, _ = _load(tmp_path)
    assert again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    assert tok2.convert_tokens_to_ids("<|mask|>") == meta.mask_token_id


def test_mask_token_takes_padding_row(tmp_path, tokenizer_dir):
    """Embeddings already padded beyond the tokenizer: the new token reuses a padding row, set to the mean."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama(len(tok) + 64)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok, cfg = _load(tmp_path)
    n = len(tok)
    meta = add_mask_token(model, tok, cfg)
    emb = model.get_input_embeddings().weight
    assert meta.mask_token_id == n and meta.real_vocab_size == n + 1 and emb.shape[0] == n + 64  # no resize
    torch.testing.assert_close(emb[n], emb[:n].mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[n],
                               model.get_output_embeddings().weight[:n].mean(0))


def test_reuse_existing_mask_id(tiny_model_dir):
    model, tok, cfg = _load(tiny_model_dir, mask_token_id=3)
    rows = model.get_input_embeddings().weight.shape[0]
    meta = add_mask_token(model, tok, cfg)
    assert meta.mask_token_id == 3 and meta.real_vocab_size == len(tok) == rows
    assert model.get_input_embeddings().weight.shape[0] == rows  # no resize
    assert tok.mask_token == tok.convert_ids_to_tokens(3) and tok.mask_token_id == 3
    # reusing an existing token by its text works the same way
    model, tok, cfg = _load(tiny_model_dir, mask_token=tok.convert_ids_to_tokens(4))
    assert add_mask_token(model, tok, cfg).mask_token_id == 4


@pytest.mark.parametrize("kw,needle", [
    ({"mask_token_id": 1}, "BOS/EOS"), ({"mask_token_id": 2}, "BOS/EOS"),
    ({"mask_token_id": 49152}, "outside the vocabulary"), ({"mask_token_id": 10**7}, "outside the vocabulary"),
    ({"mask_token": "<|im_end|>"}, "BOS/EOS"), ({"mask_token": "<|im_start|>"}, "BOS/EOS"),
    ({"mask_token": "<|endoftext|>"}, "unk"),
])
def test_bad_mask_token_refused(tiny_model_dir, kw, needle):
    model, tok, cfg = _load(tiny_model_dir, **kw)
    with pytest.raises(ModelLoadError, match=needle):
        add_mask_token(model, tok, cfg)


def test_mask_token_id_below_minus_one_rejected_by_config():
    from adapt.recipe.config import ConfigError
    from adapt.recipe.load import load_config

    with pytest.raises(ConfigError, match="mask_token_id"):
        load_config(None, ["model.mask_token_id=-5"])


@pytest.mark.slow
@torch.no_grad()
def test_embedded_gguf_loads_dense_and_saves(tmp_path):
    """The embedded SmolLM2 GGUF, named by its .gguf path: dequantized, no quantizer, save_pretrained works
    and the saved folder reloads to the same logits."""
    cfg = mcfg(embedded_gguf())
    model = load_causal_lm(cfg).eval()
    tok = load_tokenizer(cfg)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    logits = forward_logits(model, x)
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = load_causal_lm(mcfg(tmp_path)).eval()
    torch.testing.assert_close(forward_logits(again, x), logits)


def test_diffusion_meta_round_trip_and_bad_files(tmp_path):
    from adapt.model.causal import DiffusionMeta

    meta = DiffusionMeta(mask_token_id=7, real_vocab_size=50, parent="p")
    save_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    for text in ("{not json", "[1, 2]", '{"mask_token_id": 1}', '{"mask_token_id": 1, "real_vocab_size": 2, "x": 0}'):
        (tmp_path / "diffusion.json").write_text(text)
        with pytest.raises(ModelLoadError, match="re-export"):
            read_meta(tmp_path)
    with pytest.raises(ModelLoadError, match="not an exported diffusion model"):
        read_meta(tmp_path / "elsewhere")
