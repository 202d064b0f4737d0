"""The models under evaluation, loaded once per run: the diffusion model, its parent causal LM, a judge.

Every script takes the same leading arguments (MODEL_DIR, --device, --dtype, --seed, --parent,
--judge, ...); `context_from_args` turns them into an `EvalContext` that loads the parent and the
judge only when a metric needs them, so `eval.suite` pays for each model once.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import GenerationConfig, PreTrainedModel

from adapt.checkpoint import load_diffusion_model
from adapt.config import DataConfig, ModelConfig, from_dict
from adapt.denoiser import Denoiser
from adapt.model import DiffusionMeta, load_causal_lm, load_tokenizer
from adapt.sampling import SAMPLERS, generate
from eval.judge import Judge


@dataclass
class EvalContext:
    """A loaded diffusion model plus lazily loaded parent and judge causal LMs."""

    model_dir: Path
    model: PreTrainedModel
    tokenizer: object
    meta: DiffusionMeta
    denoiser: Denoiser
    data: DataConfig
    """Where the held-out text comes from (the training recipe's data section when exported with one)."""
    dtype: str = "fp32"
    seed: int = 0
    parent_path: str = ""
    """Overrides meta.parent (an HF folder, hub id, .gguf or embedded:...)."""
    judge_path: str = ""
    """Judge causal LM for generative perplexity; empty = the parent."""
    _parent: PreTrainedModel | None = field(default=None, repr=False)
    _judge: Judge | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parent_config(self) -> ModelConfig:
        source = self.parent_path or self.meta.parent
        if not source:
            raise SystemExit(f"error: {self.model_dir}/diffusion.json names no parent model; pass --parent PATH")
        gguf = "" if self.parent_path else self.meta.parent_gguf_file
        return ModelConfig(name_or_path=source, gguf_file=gguf, dtype=self.dtype)

    def parent(self) -> PreTrainedModel:
        """The parent causal LM (causal attention, eval mode), loaded on first use."""
        if self._parent is None:
            self._parent = load_causal_lm(self.parent_config()).to(self.device).eval()
        return self._parent

    def judge(self) -> Judge:
        """The judge causal LM: the parent unless --judge names another model."""
        if self._judge is None:
            if self.judge_path:
                mcfg = ModelConfig(name_or_path=self.judge_path, dtype=self.dtype)
                model = load_causal_lm(mcfg).to(self.device).eval()
                self._judge = Judge(model, load_tokenizer(mcfg), self.judge_path, self.tokenizer)
            else:
                self._judge = Judge(self.parent(), self.tokenizer, self.parent_config().name_or_path, self.tokenizer)
        return self._judge

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU generator seeded from the run seed and `salt`, so each stage draws the same numbers alone or in the suite."""
        return torch.Generator().manual_seed(hash((self.seed, *salt)) % (2 ** 63))


def data_config(model_dir: Path, data_files: list[str] | None = None, cache_dir: str | None = None) -> DataConfig:
    """The data section of the model's training recipe (so held-out stays held out), else the defaults."""
    recipe = Path(model_dir) / "recipe.yaml"
    dcfg = from_dict(yaml.safe_load(recipe.read_text())).data if recipe.is_file() else DataConfig()
    if data_files:
        dcfg.train_files = list(data_files)
    if cache_dir:
        dcfg.cache_dir = cache_dir
    return dcfg


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """MODEL_DIR and the options every eval script shares."""
    parser.add_argument("model_dir", type=Path, help="exported diffusion model folder (e.g. checkpoints/<run>/final)")
    parser.add_argument("--out-dir", type=Path, default=Path("eval_out"), help="folder for results JSON and plots")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parent", default="", help="parent causal LM (default: the one named in diffusion.json)")
    parser.add_argument("--judge", default="", help="judge causal LM for generative perplexity (default: the parent)")
    parser.add_argument("--data-files", nargs="*", default=None, help="text/jsonl files to hold out from "
                        "(default: the training recipe's data, else the embedded corpus)")
    parser.add_argument("--cache-dir", default=None, help="cache of tokenised blocks (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def context_from_args(args: argparse.Namespace) -> EvalContext:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer, meta = load_diffusion_model(args.model_dir, dtype=args.dtype, device=args.device)
    return EvalContext(Path(args.model_dir), model, tokenizer, meta, Denoiser(model, meta),
                       data_config(args.model_dir, args.data_files, args.cache_dir), args.dtype, args.seed,
                       args.parent, args.judge)


def check_samplers(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise SystemExit(f"error: unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    return names


def diffusion_sample(ctx: EvalContext, x: torch.Tensor, sampler: str, steps: int, generator: torch.Generator,
                     **options) -> tuple[torch.Tensor, int]:
    """Fill the mask positions of x (B, L) with a sampler -> ((B, L) ids on CPU, model calls made)."""
    out = generate(ctx.denoiser, x, sampler=sampler, steps=steps, generator=generator, **options)
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
