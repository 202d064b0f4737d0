"""SFT batches: the prompt is never masked and carries no loss; responses are padded with EOS."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from adapt.recipe.config import ConfigError
from adapt.recipe.load import load_config
from adapt.data.corpus import DataError
from adapt.objectives.diffusion import blocked_vocab, corrupt, diffusion_loss_sum, maskable_positions
from adapt.export import exported_meta, read_meta, save_meta
from adapt.model.causal import prepare_diffusion
from adapt.data.sft import answer_positions, build_examples, encode, pad_example, split_record, wiki_sft_pairs

EOS, MASK = 2, 99


def test_pad_example_layout():
    ids, keep = pad_example([1, 10, 11], [20, 21], 8, EOS)
    assert ids.tolist() == [1, 10, 11, 20, 21, EOS, EOS, EOS]  # response, its EOS, EOS padding
    assert keep.tolist() == [False] * 3 + [True] * 5  # padding counts as response
    assert pad_example([1, 10, 11], [20, 21, 22, 23, 24], 8, EOS) is None  # no room for the EOS: dropped
    assert pad_example([1, 10, 11], [20, 21, 22, 23], 8, EOS) is not None


def test_answer_positions_stop_after_the_first_eos():
    rows = [pad_example([1, 10, 11], [20, 21], 8, EOS), pad_example([1, 10], [20, 21, 22, 23], 8, EOS),
            pad_example([1, 10, 11, 12], [], 8, EOS)]  # padded; full to the last position; empty answer
    ids, keep = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    answer = answer_positions(ids, keep, EOS)
    assert answer.tolist() == [[False] * 3 + [True] * 3 + [False] * 2,
                               [False] * 2 + [True] * 5 + [False],
                               [False] * 4 + [True] + [False] * 3]
    assert not (answer & ~keep).any()


def test_prompt_never_masked_and_carries_no_loss():
    ids, keep = pad_example([1, 10, 11, 12], [20, 21, 22], 10, EOS)
    x0, keep = ids.repeat(4, 1), keep.repeat(4, 1)
    t = torch.ones(4)  # t = 1: every maskable position is masked
    xt, masked = corrupt(x0, t, MASK, maskable_positions(x0, True, keep), torch.Generator().manual_seed(0))
    assert torch.equal(xt[:, :4], x0[:, :4]) and not masked[:, :4].any()
    assert masked[:, 4:].all() and (xt[:, 4:] == MASK).all()
    logits = torch.randn(4, 10, 100, requires_grad=True)
    diffusion_loss_sum(logits, x0, masked, t, True, blocked_vocab(100, 99, MASK)).backward()
    grad_rows = logits.grad.abs().sum(-1)[0]  # row i-1 predicts token i under the shift
    assert (grad_rows[:3] == 0).all() and (grad_rows[3:9] > 0).all() and grad_rows[9] == 0


def test_records_prompt_response_and_messages(tokenizer_dir):
    cfg = load_config(None, ["stage=sft"]).sft
    assert split_record({"prompt": "p", "response": "r"}, cfg) == ("p", "r")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert split_record({"messages": chat}, cfg) == (chat[:1], "Hello.")
    with pytest.raises(DataError, match="assistant"):
        split_record({"messages": chat[:1]}, cfg)
    with pytest.raises(DataError, match="sft.prompt_field"):
        split_record({"question": "q"}, cfg)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt, response = encode(tok, chat[:1], "Hello.", use_template=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and "Hi" in tok.decode(prompt)
    assert tok.decode(response) == "Hello."
    plain, _ = encode(tok, "Hi", "Hello.", use_template=False)
    assert plain[0] == tok.bos_token_id and tok.decode(plain[1:]) == "Hi"


def test_build_examples_from_jsonl(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"Continue: sentence {i}.", "response": "word " * (i % 7 + 1)} for i in range(12)]
    rows.append({"prompt": "too long", "response": "word " * 200})
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["stage=sft", f"data.train_files=[{data}]", "data.seq_length=64",
                             "data.heldout_sequences=2", f"data.cache_dir={tmp_path / 'cache'}"])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = build_examples(cfg, tok)
    assert len(blocks.train) == 10 and len(blocks.heldout) == 2 and blocks.dropped == 1
    for ids, keep in zip(blocks.train, blocks.train_loss_mask):
        start = int(keep.int().argmax())
        assert not keep[:start].any() and keep[start:].all()
        assert tok.decode(ids[:start]).rstrip().endswith("assistant")  # chat template prompt
        assert ids[-1] == tok.eos_token_id  # padded with EOS
    again = build_examples(cfg, tok)  # from the cache
    assert torch.equal(again.train, blocks.train) and again.dropped == 1


def test_embedded_sft_pairs(corpus_file):
    src = corpus_file.parent / "embedded" / "enwiki_gensim.jsonl"
    pairs = wiki_sft_pairs(src, max_pairs=300)
    assert len(pairs) == 300
    assert any(p["prompt"].startswith("Continue: ") for p in pairs)
    assert any(p["prompt"].startswith("Write the first sentence") for p in pairs)
    assert all(20 <= len(p["response"]) <= 240 for p in pairs)


def exported(tmp: Path, model_dir: Path) -> Path:
    """A diffusion-model export made directly (mask token added, diffusion.json written)."""
    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import add_mask_token, load_causal_lm, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(model_dir), dtype="fp32")
    model, tok = load_causal_lm(mcfg), load_tokenizer(mcfg)
    meta = add_mask_token(model, tok, mcfg)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_meta(tmp, meta)
    return tmp


def test_sft_reuses_the_exported_mask_token(tmp_path, tiny_model_dir):
    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import load_causal_lm, load_tokenizer

    folder = exported(tmp_path / "export", tiny_model_dir)
    mcfg = ModelConfig(name_or_path=str(folder), dtype="fp32")
    model, tok = load_causal_lm(mcfg), load_tokenizer(mcfg)
    rows = model.get_input_embeddings().weight.shape[0]
    meta = prepare_diffusion(model, tok, mcfg, exported_meta(folder))
    saved = read_meta(folder)
    assert meta.mask_token_id == saved.mask_token_id and meta.real_vocab_size == saved.real_vocab_size
    assert model.get_input_embeddings().weight.shape[0] == rows  # no second mask token, no resize
    assert tok.convert_tokens_to_ids(tok.mask_token) == saved.mask_token_id
    with pytest.raises(ConfigError, match="attention.anneal_steps=0"):
        load_config(None, ["stage=sft", f"model.name_or_path={folder}"])
    with pytest.raises(ConfigError, match="diffusion.shift=true"):
        load_config(None, ["stage=sft", f"model.name_or_path={folder}", "attention.anneal_steps=0",
                           "diffusion.shift=false"])
    assert load_config(None, ["stage=sft", f"model.name_or_path={folder}", "attention.anneal_steps=0"])
