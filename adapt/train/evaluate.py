"""Held-out evaluation of a training run: the objective's bound on the run's held-out blocks, and the parent's
exact perplexity on the same tokens. Called by the stages before and after training (adapt.train.stages) and by the
loop every train.eval_every steps (adapt.train.loop.fit); the draws are fixed (the `eval` stream of adapt.train.rng), so
bounds compare pairwise across runs."""
from __future__ import annotations

from typing import Protocol

import torch

from adapt.train import faults, likelihood, rng
from adapt.recipe.config import Config
from adapt.data.corpus import Sequences
from adapt.model.causal import set_causal
from adapt.objectives import ModelForward, Objective


class Run(Protocol):
    """What evaluation reads of a training run (adapt.train.loop.State)."""

    cfg: Config
    data: Sequences
    objective: Objective
    engine: object

    @property
    def forward(self) -> ModelForward: ...


@torch.no_grad()
def evaluate(state: Run, attention: str = "bidirectional") -> dict:
    """The objective's held-out bound (fixed draws, so runs compare pairwise), split over ranks.

    attention: bidirectional, or causal (the parent's attention; the 'before' view). Sequences with a loss
    mask (SFT) are scored on their eligible positions; the data's named parts are reported beside.
    """
    cfg, data, obj = state.cfg, state.data, state.objective
    faults.maybe_slow_eval()
    state.engine.eval()
    view = obj.eval_attention(attention != "bidirectional", cfg.data.seq_length,
                              data.heldout_docs if cfg.attention.document_mask else None)
    maskable = obj.scored(data.heldout, data.heldout_loss_mask)  # the parent's positions, shift or not
    out = likelihood.heldout_bound(obj, state.forward, data.heldout, maskable, cfg.train.eval_t_samples,
                                   cfg.train.eval_method, rng.generator(cfg.train.seed, "eval"),
                                   cfg.train.micro_batch_size, view, data.heldout_parts)
    state.engine.train()
    return out


@torch.no_grad()
def parent_perplexity(state: Run) -> dict:
    """Exact held-out perplexity of the parent causal LM on the same tokens (before any update)."""
    faults.maybe_slow_eval()
    state.engine.eval()
    set_causal(state.engine.module, True)
    out = likelihood.parent_perplexity(state.forward, state.data.heldout, state.objective.blocked,
                                       state.cfg.train.micro_batch_size)
    set_causal(state.engine.module, False)
    state.engine.train()
    return out
