"""Layer-wise learning rates (`optim.layer_lr_decay`, `optim.embedding_lr_scale`) as optimizer groups: the rates
follow the formula on a tiny 2-layer model (plain, tied, under peft), the scheduler scales every group alike,
and the defaults give the one group of before, with the same training losses."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

from adapt.recipe.load import load_config
from adapt.cli.errors import TrainingError
from adapt.train.optim import build_optimizer, lr_groups, lr_lambda

V = 40
LR = 1e-3


def cfg_of(*overrides: str):
    return load_config(None, [f"optim.lr={LR}", "optim.warmup_steps=2", "train.max_steps=10", *overrides])


def rate_of(groups: list[dict], model: torch.nn.Module) -> dict[str, float]:
    """parameter name -> the rate of its group (trainable parameters only)."""
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: rate[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def expected(name: str, decay: float, emb: float, layers: int = 2) -> float:
    if "embed_tokens" in name or "lm_head" in name:
        return LR * emb
    for i in range(layers):
        if f"layers.{i}." in name:
            return LR * decay ** (layers - 1 - i)
    return LR


@pytest.mark.parametrize("tie", [False, True])
def test_rates_follow_the_formula(tie):
    model = tiny_llama(V, tie=tie)
    groups = lr_groups(cfg_of("optim.layer_lr_decay=0.5", "optim.embedding_lr_scale=2.0"), model)
    assert [g["lr"] for g in groups] == [LR, 2 * LR, LR * 0.5]  # the unscaled group first
    rates = rate_of(groups, model)
    assert rates == {n: expected(n, 0.5, 2.0) for n in rates}
    assert rates["model.layers.0.self_attn.q_proj.weight"] == LR * 0.5 and rates["model.norm.weight"] == LR
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # a tied matrix once


def test_scheduler_scales_every_group():
    model = tiny_llama(V)
    cfg = cfg_of("optim.layer_lr_decay=0.8", "optim.embedding_lr_scale=0.1")
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    base = [g["lr"] for g in lr_groups(cfg, model)]
    for step in range(4):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * lr_lambda(cfg)(step) for b in base])
        opt.step()
        sched.step()


def test_peft_prefixes_and_the_mask_row():
    from adapt.model.lora import apply_lora
    from adapt.model.causal import DiffusionMeta

    cfg = cfg_of("optim.layer_lr_decay=0.5", "optim.embedding_lr_scale=3.0", "lora.enabled=true", "lora.r=2")
    model = apply_lora(tiny_llama(V), cfg.lora, DiffusionMeta(V - 1, V - 1))
    rates = rate_of(lr_groups(cfg, model), model)
    adapters = [n for n in rates if "lora_" in n]
    assert adapters and all(n.startswith("base_model.model.model.layers.") for n in adapters)
    assert all(rates[n] == expected(n, 0.5, 3.0) for n in adapters)
    delta = [n for n in rates if "embed_tokens" in n]  # peft's trainable-token delta of the mask row
    assert delta and all(rates[n] == 3 * LR for n in delta)


def test_defaults_are_the_one_group_of_before():
    model = tiny_llama(V)
    before = copy.deepcopy(model)
    cfg = cfg_of()
    opt = build_optimizer(cfg, model)
    (group,) = opt.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()] and group["lr"] == LR
    old = torch.optim.AdamW([p for p in before.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95),
                            weight_decay=0.0)  # the optimizer as it was built before the groups
    decayed = copy.deepcopy(before)
    other = build_optimizer(cfg_of("optim.layer_lr_decay=0.5"), decayed)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {"new": [], "old": [], "decayed": []}
    for _ in range(3):
        for key, m, o in (("new", model, opt), ("old", before, old), ("decayed", decayed, other)):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            o.step()
            o.zero_grad()
            losses[key].append(loss.item())
    assert losses["new"] == losses["old"]
    assert losses["decayed"][2] != losses["old"][2]  # the groups do change training: the check can fail


def test_decay_needs_layers():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = torch.nn.Embedding(V, 8), torch.nn.Linear(8, V)

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.proj

    assert len(lr_groups(cfg_of("optim.embedding_lr_scale=2.0"), Flat())) == 1  # only the embedding scale
    with pytest.raises(TrainingError, match="layer_lr_decay"):
        lr_groups(cfg_of("optim.layer_lr_decay=0.9"), Flat())
