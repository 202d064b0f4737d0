"""The stages, peers above one training loop (`adapt.train.loop`): each builds its data, evaluates before,
trains, exports, evaluates after and shows what the model does.

    adapt  causal LM -> diffusion LM on packed text blocks (DiffuLLaMA)
    sft    diffusion LM -> instruction-following diffusion LM on prompt/response pairs (LLaDA's SFT):
           the same loop on blocks whose loss mask covers the response and its EOS padding only
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import yaml

from adapt.train import checkpoint, distributed
from adapt.train import curve
from adapt.data import sft
from adapt.recipe.config import Config
from adapt.data.corpus import Sequences, DataError, build_sequences, source_problems
from adapt.train.evaluate import evaluate, parent_perplexity
from adapt.export import export, load_diffusion_model
from adapt.data.store import cache_lock
from adapt.train.loop import State, fit, setup, show_batch

MIXTURE_LOG_STEPS = 1000
"""The start-up log shows each source's realised share of the rows of this many first steps (at most)."""


def _say(text: str) -> None:
    rank = distributed.rank()
    print(f"[adapt{f' rank {rank}' if rank else ''}] {text}", file=sys.stderr, flush=True)


def _adapt_data(cfg: Config, tokenizer) -> Sequences:
    """The token stores' blocks (every rank: the first per cache folder prepares what is missing while the others
    wait on its lock), the mixture's realised shares in the start-up summary."""
    data = build_sequences(cfg.data, tokenizer, _say)
    if data.mixture is not None and len(data.mixture.sizes) > 1:
        n = cfg.train.micro_batch_size * cfg.train.grad_accum * distributed.world_size()
        data.summary += "\n[adapt] " + data.mixture.describe(min(cfg.train.max_steps, MIXTURE_LOG_STEPS), n,
                                                             cfg.train.seed)
    return data


def _sft_data(cfg: Config, tokenizer) -> Sequences:
    """The SFT examples, encoded by the first rank per cache folder while the others wait (a file lock)."""
    with cache_lock(Path(cfg.data.cache_dir) / "sft.lock", _say):
        return sft.build_examples(cfg, tokenizer)


def _layout_problems(cfg: Config) -> list[str]:
    """A run whose checkpoints predate the token store (their configs have no data.sources) cannot resume from
    it: the store cuts and orders blocks differently (no batch tail dropped, whole held-out documents)."""
    tags = checkpoint.complete_tags(cfg.run_dir) if cfg.run.resume == "auto" else []
    if not tags:
        return []
    saved = yaml.safe_load(checkpoint.config_file(checkpoint.ckpt_root(cfg.run_dir) / tags[-1]).read_text()) or {}
    if "sources" in (saved.get("data") or {}):
        return []
    return [f"{cfg.run_dir} was trained on data layout 1 (blocks packed at start-up, before the token store, data "
            f"layout 2): resuming would not replay its data order. Finish it with the version it started with "
            f"(the commit before adapt/data/store.py was added), or start it anew on the store: run.resume=never or "
            f"another run.name"]


def run_adapt(cfg: Config) -> dict:
    """The adapt stage end to end: evaluate, train, export, evaluate, sample. Returns the summary."""
    problems = source_problems(cfg.data) + _layout_problems(cfg)
    if problems:  # at once, before the model loads
        raise DataError("; ".join(problems))
    state = setup(cfg, _adapt_data)
    summary: dict = {}
    if state.step == 0:
        show_batch(state)
        summary.update(parent_perplexity(state))
        before = state.cfg.train.eval_before
        if before in ("both", "causal"):
            summary.update({f"before_causal_{k}": v for k, v in evaluate(state, "causal").items()})
        if before in ("both", "bidirectional"):
            summary.update({f"before_{k}": v for k, v in evaluate(state).items()})
        state.log.record(0, summary, "eval")
    if not fit(state):
        return summary
    summary.update({f"after_{k}": v for k, v in evaluate(state).items()})
    _finish(state, summary, lambda folder: {"sample": _sample_text(folder, cfg)} if cfg.run.sample_length else {})
    if distributed.is_main():
        state.log.final(summary)
    return summary


def run_sft(cfg: Config) -> dict:
    """The sft stage end to end: evaluate, train, export, evaluate, answer one held-out prompt."""
    if cfg.data.sources:
        raise DataError("the sft stage reads prompt/response examples from data.train_files; data.sources (a "
                        "weighted mixture of plain text) is for the adapt stage")
    state = setup(cfg, _sft_data)
    summary: dict = {}
    if state.step == 0:
        show_batch(state)
        summary.update({f"before_{k}": v for k, v in evaluate(state).items()})
        state.log.record(0, summary, "eval")
    if not fit(state):
        return summary
    summary.update({f"after_{k}": v for k, v in evaluate(state).items()})
    d = state.data
    _finish(state, summary, lambda folder: _answer(folder, cfg, d.heldout[0], d.heldout_loss_mask[0])
            if cfg.run.sample_length else {})
    if distributed.is_main():
        sft.report(summary)
    return summary


STAGES = {"adapt": run_adapt, "sft": run_sft}
"""stage name (config `stage`) -> its run function."""


def _finish(state: State, summary: dict, show) -> None:
    """Export on rank 0, then `show(export folder)` (a sample) and curve.png, recorded in the summary."""
    distributed.barrier()
    if distributed.is_main():
        # the final bound is in metrics.jsonl before the export, so the export's model card states it
        state.log.record(state.step, {k: v for k, v in summary.items() if k.startswith("after_")}, "eval")
        out = export(state.cfg.run_dir)
        summary["export"] = str(out)
        summary.update(show(out))
        drawn = curve.try_draw(state.cfg.run_dir, state.log.info)  # the bounds against tokens, from metrics.jsonl
        if drawn is not None:
            summary["curve"] = str(drawn)
        state.log.record(state.step, summary, "summary")
    distributed.barrier()


def _sample_text(folder: Path, cfg: Config) -> str:
    """An unconditional ancestral sample of run.sample_length tokens from the export (a block export is
    decoded block by block with its cache)."""
    from adapt.decode.denoiser import Denoiser
    from adapt.decode import generate
    from adapt.model.causal import start_token
    from adapt.decode.canvas import prompt_canvas

    model, tokenizer, meta = load_diffusion_model(folder, dtype=cfg.model.dtype)
    x = prompt_canvas(start_token(tokenizer), meta.mask_token_id, cfg.run.sample_length)
    out = generate(Denoiser(model, meta), x, "ancestral", steps=cfg.run.sample_steps,
                   generator=torch.Generator().manual_seed(cfg.train.seed))
    return tokenizer.decode(out.ids[0, 1:], skip_special_tokens=True)


def _answer(folder: Path, cfg: Config, ids: torch.Tensor, response: torch.Tensor) -> dict:
    """Fill the response positions of a held-out example with the exported model (ancestral sampler)."""
    from adapt.decode.denoiser import Denoiser
    from adapt.decode.ancestral import ancestral_sample

    model, tokenizer, meta = load_diffusion_model(folder, dtype=cfg.model.dtype)
    x = ids.clone()[None]
    x[0, response] = meta.mask_token_id
    out = ancestral_sample(Denoiser(model, meta), x, steps=cfg.run.sample_steps,
                           generator=torch.Generator().manual_seed(cfg.train.seed))[0, response].tolist()
    return {"prompt": tokenizer.decode(ids[~response]), "sample": tokenizer.decode(sft.until_eos(out, tokenizer)),
            "reference": tokenizer.decode(sft.until_eos(ids[response].tolist(), tokenizer))}
