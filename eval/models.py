"""The models under evaluation, loaded once per run: the diffusion model, its parent causal LM, a judge.

Every script takes the same leading arguments (MODEL_DIR, --device, --dtype, --seed, --parent,
--judge, ...; eval.options); `context_from_args` turns them into an `EvalContext` that loads the parent
and the judge only when a metric needs them, so `eval.suite` pays for each model once. The context
also holds the objective the export was trained with and its model call, which the bounds use
(adapt.train.likelihood), and the named random streams of the run (adapt.train.rng).
"""
from __future__ import annotations

import argparse
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from adapt import objectives
from adapt.train import rng
from adapt.draft_head import load_draft_head
from adapt.export import load_diffusion_model, load_weights, read_recipe
from adapt.recipe.config import DataConfig, ModelConfig
from adapt.decode.denoiser import Denoiser
from adapt.objectives.diffusion import blocked_vocab
from adapt.model.causal import DiffusionMeta, load_tokenizer
from adapt.objectives import ModelForward
from adapt.decode import generate
from eval.judge import Judge
from eval.options import EvalError


@dataclass
class EvalContext:
    """A loaded diffusion model plus lazily loaded parent and judge causal LMs."""

    model_dir: Path
    model: PreTrainedModel
    tokenizer: object
    meta: DiffusionMeta
    denoiser: Denoiser
    """What the samplers call (log-probabilities aligned so row i predicts token i)."""
    data: DataConfig
    """Where the held-out text comes from (the training recipe's data section when exported with one)."""
    dtype: str = "fp32"
    seed: int = 0
    parent_path: str = ""
    """Overrides meta.parent (an HF folder, hub id, .gguf or embedded:...)."""
    judge_path: str = ""
    """Judge causal LM for generative perplexity; empty = the parent."""
    draft_head: object = None
    """The export's draft head (adapt.draft_head), which the speculative and chain samplers draft through; None."""
    _parent: PreTrainedModel | None = field(default=None, repr=False)
    _judge: Judge | None = field(default=None, repr=False)
    _bound: tuple | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def bound_model(self) -> tuple[object, ModelForward]:
        """(the objective the export was trained with, its model call): what adapt.train.likelihood scores with.
        The model call counts forwards (`.calls`) over the whole run."""
        if self._bound is None:
            rows = self.model.get_output_embeddings().weight.shape[0]
            blocked = blocked_vocab(rows, self.meta.real_vocab_size, self.meta.mask_token_id, self.device)
            backend = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
            self._bound = (objectives.for_meta(self.meta, blocked, backend, self.dtype),
                           ModelForward(self.model, self.device))
        return self._bound

    def parent_config(self) -> ModelConfig:
        source = self.parent_path or self.meta.parent
        if not source:
            raise EvalError(f"the metadata of {self.model_dir} names no parent model; pass --parent PATH")
        gguf = "" if self.parent_path else self.meta.parent_gguf_file
        return ModelConfig(name_or_path=source, gguf_file=gguf, dtype=self.dtype)

    def parent(self) -> PreTrainedModel:
        """The parent causal LM (causal attention, eval mode), loaded on first use."""
        if self._parent is None:
            self._parent = load_weights(self.parent_config()).to(self.device).eval()
        return self._parent

    def judge(self) -> Judge:
        """The judge causal LM: the parent unless --judge names another model."""
        if self._judge is None:
            if self.judge_path:
                mcfg = ModelConfig(name_or_path=self.judge_path, dtype=self.dtype)
                model = load_weights(mcfg).to(self.device).eval()
                self._judge = Judge(model, load_tokenizer(mcfg), self.judge_path, self.tokenizer)
            else:
                self._judge = Judge(self.parent(), self.tokenizer, self.parent_config().name_or_path, self.tokenizer)
        return self._judge

    def seed_for(self, stream: str, *salt: int | str) -> int:
        """The seed of a named stream (adapt.train.rng) of this run; `salt` (a script name, a setting's index)
        makes it distinct per use, so each script draws the same numbers alone or in the suite."""
        return rng.seed_for(self.seed, stream, step=stream_step(*salt) if salt else None)

    def generator(self, stream: str, *salt: int | str) -> torch.Generator:
        """A CPU generator of `seed_for(stream, *salt)`."""
        return torch.Generator().manual_seed(self.seed_for(stream, *salt))


def stream_step(*salt: int | str) -> int:
    """One step number from names and indices (names by CRC-32: stable across runs, unlike hash())."""
    return rng.mix(*(zlib.crc32(s.encode()) if isinstance(s, str) else int(s) for s in salt))


def data_config(model_dir: Path, data_files: list[str] | None = None, cache_dir: str | None = None) -> DataConfig:
    """The data section of the model's training recipe (so held-out stays held out), else the defaults."""
    recipe = read_recipe(model_dir)
    dcfg = recipe.data if recipe is not None else DataConfig()
    if data_files:
        dcfg.train_files = [str(f) for f in data_files]
    if cache_dir:
        dcfg.cache_dir = cache_dir
    return dcfg


def context_from_args(args: argparse.Namespace) -> EvalContext:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer, meta = load_diffusion_model(args.model_dir, dtype=args.dtype, device=args.device)
    return EvalContext(Path(args.model_dir), model, tokenizer, meta, Denoiser(model, meta),
                       data_config(args.model_dir, args.data_files, args.cache_dir), args.dtype, args.seed,
                       args.parent, args.judge, load_draft_head(args.model_dir, model))


def diffusion_sample(ctx: EvalContext, x: torch.Tensor, sampler: str, steps: int, generator: torch.Generator,
                     **options) -> tuple[torch.Tensor, int]:
    """Fill the mask positions of x (B, L) with a sampler -> ((B, L) ids on CPU, model calls made)."""
    out = generate(ctx.denoiser, x, sampler=sampler, steps=steps, generator=generator, draft_head=ctx.draft_head,
                   **options)
    return out.ids.cpu(), out.nfe


@torch.no_grad()
def parent_sample(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, seed: int,
                  top_p: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Autoregressive samples with KV cache: prompt (B, P) -> (B, P + new_tokens) ids on CPU.

    Exactly `new_tokens` tokens are drawn (EOS may appear but does not stop the row), top-k off,
    so `top_p=1` is plain ancestral sampling ("reg" in 001 table 3) and 0.95 nucleus sampling.
    temperature 0 = greedy. The model's own generation_config (EOS, repetition penalty, top-k, ...)
    is set aside for the call: `generate` would otherwise fill every unset option from it.
    """
    torch.manual_seed(seed)  # HF generate draws from the global generator
    greedy = temperature == 0
    options = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=top_p, temperature=temperature)
    gcfg = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id or 0, **options)
    prompt = prompt.to(next(model.parameters()).device)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gcfg, use_cache=True)
    finally:
        model.generation_config = saved
    return out.cpu()
