"""Fixtures shared by the eval tests (imported by tests/test_eval_*.py): an exported tiny diffusion model,
fake denoisers with known answers, and a context built without the command line."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml


def export_tiny(src: Path, out: Path, corpus: Path, cache: Path) -> Path:
    """An exported diffusion folder from a tiny HF folder: mask token added, parent = `src`, and a
    recipe.yaml whose data section holds out the tail of `corpus` in 64-token blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapt.export import RECIPE_FILE, save_meta
    from adapt.recipe.config import ModelConfig
    from adapt.model.causal import add_mask_token

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    meta = add_mask_token(model, tok, ModelConfig(name_or_path=str(src), dtype="fp32"))
    meta.parent = str(src)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    save_meta(out, meta)
    data = {"train_files": [str(corpus)], "seq_length": 64, "heldout_sequences": 12, "cache_dir": str(cache)}
    (out / RECIPE_FILE).write_text(yaml.safe_dump({"data": data}))
    return out


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory, tiny_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("eval_export")
    return export_tiny(tiny_model_dir, root / "final", corpus_file, root / "cache")


def common_args(model_dir: Path, out_dir: Path, **extra) -> argparse.Namespace:
    """The Namespace `eval.models.add_common_args` would parse, plus script options."""
    base = dict(model_dir=model_dir, out_dir=out_dir, device="cpu", dtype="fp32", seed=0, parent="", judge="",
                data_files=None, cache_dir=None, threads=0)
    base.update(extra)
    return argparse.Namespace(**base)


@pytest.fixture(scope="session")
def ctx(exported_dir, tmp_path_factory):
    from eval.models import context_from_args

    return context_from_args(common_args(exported_dir, tmp_path_factory.mktemp("ctx_out")))


class AlignedForward:
    """A model call (forward(ids, mask) -> raw logits, counting `.calls`) made of a function that gives
    log-probabilities aligned so row i predicts token i (the fake denoisers below): its rows move back by
    one, where a causal LM's logits are, so an objective with the shift reads row i-1 for token i."""

    def __init__(self, aligned, shift: bool = True):
        self.aligned, self.shift, self.calls = aligned, shift, 0

    def __call__(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        self.calls += 1
        out = self.aligned(input_ids)
        return torch.cat([out[:, 1:], out[:, :1]], dim=1) if self.shift else out


def objective_for(vocab: int, mask_id: int, shift: bool = True):
    """The masked-diffusion objective over a vocabulary of `vocab` ids, none blocked (the fake denoisers'
    log-probabilities are used as they are)."""
    from adapt.objectives import MaskedDiffusion

    return MaskedDiffusion(mask_id, shift, torch.zeros(vocab, dtype=torch.bool))


class TableDenoiser:
    """An exact product distribution: log p(x0_i | x_t) = table[i] whatever x_t is. (L, V) log-probs."""

    def __init__(self, table: torch.Tensor, mask_id: int):
        self.table = table
        self.mask_id = mask_id
        self.shift = True
        self.nfe = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.table[: x.shape[1]].expand(x.shape[0], -1, -1)


class PeekingDenoiser:
    """Knows x0; the probability it gives the true token grows with the fraction of unmasked tokens,
    so the per-draw bound depends strongly on t (what stratifying t is for)."""

    def __init__(self, x0: torch.Tensor, vocab: int, mask_id: int):
        self.x0, self.vocab, self.mask_id, self.shift, self.nfe = x0, vocab, mask_id, True, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        seen = (x != self.mask_id).float().mean(1, keepdim=True)  # (B, 1)
        p_true = 0.05 + 0.9 * seen
        # every row of a batch is a replicate of some block; find it by its unmasked tokens
        match = ((x[:, None] == self.x0[None]) | (x[:, None] == self.mask_id)).all(-1).float().argmax(1)
        rows = self.x0[match]
        probs = ((1 - p_true) / (self.vocab - 1)).unsqueeze(-1).expand(x.shape[0], x.shape[1], self.vocab).clone()
        probs.scatter_(-1, rows[..., None], p_true.unsqueeze(-1).expand(-1, x.shape[1], 1))
        return probs.log()


class OracleDenoiser:
    """Puts (almost) all mass on the true token of whichever row of `x0` the input agrees with."""

    def __init__(self, x0: torch.Tensor, vocab: int, mask_id: int):
        self.x0, self.vocab, self.mask_id, self.shift, self.nfe = x0, vocab, mask_id, True, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        match = ((x[:, None] == self.x0[None]) | (x[:, None] == self.mask_id)).all(-1).float().argmax(1)
        logits = torch.full((x.shape[0], x.shape[1], self.vocab), -20.0)
        logits.scatter_(-1, self.x0[match][..., None], 20.0)
        return torch.log_softmax(logits, -1)
