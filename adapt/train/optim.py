"""The optimiser of a run: AdamW over parameter groups with their own rates (layer-wise decay, the embedding
scale) and the schedule (linear warmup, cosine decay to optim.min_lr_ratio)."""
from __future__ import annotations

import math
import re

import torch

from adapt.train import distributed
from adapt.recipe.config import Config
from adapt.cli.errors import TrainingError


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """AdamW (DeepSpeedCPUAdam under optimizer offload) over the trainable parameters, in `lr_groups`."""
    params = lr_groups(cfg, model)
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    return distributed.adamw(params, cfg.dist.offload_optimizer, **kw)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
"""The decoder-layer index in a parameter name (`model.layers.3.`, peft's `base_model.model.model.layers.3.`)."""


def lr_groups(cfg: Config, model: torch.nn.Module) -> list[dict]:
    """The trainable parameters as optimizer groups, one per learning-rate scale (RND1-style layer-wise rates):
    decoder layer l of N gets lr * optim.layer_lr_decay^(N-1-l), the input embeddings and the output head (the
    mask token's row included, and peft's trainable-token delta) lr * optim.embedding_lr_scale, the rest lr.
    The unscaled group comes first (the rate logged); the defaults give one group of every parameter. The
    scheduler's LambdaLR multiplies each group's rate by the same factor."""
    names = [n for n, _ in model.named_parameters()]
    depth = 1 + max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=-1)
    decay, emb = cfg.optim.layer_lr_decay, cfg.optim.embedding_lr_scale
    if decay != 1.0 and depth == 0:
        raise TrainingError(f"optim.layer_lr_decay={decay} needs decoder layers named `layers.<i>` (or h.<i>, "
                            f"blocks.<i>); {type(model).__name__} has none: set optim.layer_lr_decay=1")
    heads = [model.get_input_embeddings(), model.get_output_embeddings()]
    embedding = {id(p) for m in heads if m is not None for p in m.parameters()}
    groups: dict[float, list] = {1.0: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = _LAYER.search(name)
        scale = 1.0
        if id(p) in embedding:
            scale = emb
        elif layer:
            scale = decay ** (depth - 1 - int(layer.group(1)))
        groups.setdefault(scale, []).append(p)
    order = [1.0] + sorted((s for s in groups if s != 1.0), reverse=True)
    return [{"params": groups[s], "lr": cfg.optim.lr * s} for s in order if groups[s]]


def lr_lambda(cfg: Config):
    """Linear warmup to the peak, then cosine to min_lr_ratio * peak at max_steps."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f
