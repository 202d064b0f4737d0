"""The joint causal loss (`diffusion.ar_loss_weight`): off, it leaves the training step bit for bit as it was;
on, the step's gradient is the diffusion loss's plus alpha x that of the clean sequences' causal cross-entropy,
computed here directly from the model's own causal attention. A stand-in engine records each micro-step's
gradients, so `adapt.train.loop.train_step` runs unchanged without DeepSpeed."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from adapt import objectives
from adapt.data.corpus import Sequences
from adapt.objectives.diffusion import blocked_vocab
from adapt.train.metrics import MetricsLog
from adapt.model.causal import DiffusionMeta, set_causal
from adapt.recipe.load import load_config
from adapt.train.loop import State, global_batch, step_attention, train_step

V, L, N = 48, 16, 8
MASK = V - 1


class Engine:
    """The part of a DeepSpeed engine train_step uses, around a plain model; `step` keeps the gradients."""

    def __init__(self, model, accum: int):
        self.module, self.accum, self.grads, self.calls = model, accum, [], 0
        self.optimizer = type("Opt", (), {"param_groups": [{"lr": 0.0}]})()

    def __call__(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)

    def backward(self, loss):
        (loss / self.accum).backward()  # DeepSpeed's scaling by the accumulation steps

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.module.named_parameters()})
        self.module.zero_grad(set_to_none=True)

    def summed_grads(self) -> dict[str, torch.Tensor]:
        return {n: sum(g[n] for g in self.grads) for n in self.grads[0]}

    def get_global_grad_norm(self):
        return None

    def get_lr(self):
        return [0.0]


def make_state(tmp_path, *overrides: str, loss_mask: bool = False) -> State:
    cfg = load_config(None, ["model.dtype=fp32", f"data.seq_length={L}", "train.micro_batch_size=2",
                             "train.grad_accum=2", "attention.anneal_steps=0", f"run.output_dir={tmp_path}",
                             *overrides])
    model = tiny_llama(V)
    set_causal(model, False)  # as setup does: the masks passed decide what is visible
    ids = torch.randint(3, V - 1, (N, L), generator=torch.Generator().manual_seed(0))
    mask = None
    if loss_mask:  # SFT-like: a prompt of 3..7 tokens carries no loss
        mask = torch.arange(L)[None, :] >= torch.arange(3, 3 + N)[:, None] % 5 + 3
    data = Sequences(ids, torch.zeros_like(ids), ids[:2], torch.zeros_like(ids[:2]), train_loss_mask=mask)
    meta = DiffusionMeta(MASK, V - 1)
    obj = objectives.from_config(cfg, meta, blocked_vocab(V, V - 1, MASK))
    return State(cfg, Engine(model, cfg.train.grad_accum), None, meta, data, obj, MetricsLog(tmp_path, False, False))


def diffusion_part(state: State, step: int) -> tuple[list[torch.Tensor], float, torch.Tensor]:
    """The step's diffusion loss sums per micro-batch, its count and its x0, as the loop has always drawn them."""
    cfg, obj, data = state.cfg, state.objective, state.data
    idx, gen = global_batch(cfg, step, len(data.train))
    x0 = data.train[idx]
    maskable = obj.maskable(x0, None if data.train_loss_mask is None else data.train_loss_mask[idx])
    noised = obj.corrupt(x0, maskable, gen)
    attention, m = step_attention(cfg, step), cfg.train.micro_batch_size
    sums = []
    for k in range(cfg.train.grad_accum):
        sl = slice(k * m, (k + 1) * m)
        part = noised.rows(sl)
        sums.append(obj.loss_sum(obj.predict(state.forward, x0[sl], part, attention.rows(sl)), x0[sl], part))
    return sums, obj.normaliser(maskable, noised.masked), idx


@pytest.mark.parametrize("overrides", [(), ("diffusion.ar_loss_weight=0.0",)])
def test_weight_zero_is_the_step_of_before(tmp_path, overrides):
    state = make_state(tmp_path, *overrides)
    out = train_step(state, 3)
    assert "ar_loss" not in out and state.engine.calls == 2  # one forward per micro-batch, no causal one
    got = state.engine.grads
    ref = make_state(tmp_path)
    sums, count, _ = diffusion_part(ref, 3)
    for s in sums:  # the step as it was written before the joint term: sum / count * world * accumulation
        ref.engine.backward(s / count * 1 * 2)
        ref.engine.step()
    want = ref.engine.grads
    assert out["loss"] == sum(s.item() for s in sums) / count
    for g, w in zip(got, want):
        assert all(torch.equal(g[n], w[n]) for n in w)


@pytest.mark.parametrize("block", [0, 4])
def test_joint_gradient_is_diffusion_plus_alpha_causal_ce(tmp_path, block):
    alpha = 0.3
    state = make_state(tmp_path, f"diffusion.ar_loss_weight={alpha}", f"diffusion.block.length={block}",
                       loss_mask=True)
    out = train_step(state, 1)
    assert state.engine.calls == 4  # a diffusion and a causal forward per micro-batch
    ref = make_state(tmp_path, f"diffusion.block.length={block}", loss_mask=True)
    sums, count, idx = diffusion_part(ref, 1)
    x0, eligible = ref.data.train[idx], ref.data.train_loss_mask[idx]
    set_causal(ref.engine.module, True)  # the model's own causal attention, no mask of ours
    logits = ref.engine.module(input_ids=x0).logits[:, :-1].masked_fill(ref.objective.blocked, -math.inf)
    scored = eligible[:, 1:]  # token i scored from logits i-1; position 0 is never a target
    ce = F.cross_entropy(logits[scored], x0[:, 1:][scored])  # the token mean over scored positions
    (sum(sums) / count + alpha * ce).backward()
    ref.engine.step()
    want, got = ref.engine.grads[0], state.engine.summed_grads()
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-6
    assert out["ar_loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert out["loss"] == pytest.approx(sum(s.item() for s in sums) / count, rel=1e-6)
    plain = make_state(tmp_path, f"diffusion.block.length={block}", loss_mask=True)
    train_step(plain, 1)  # without the term the gradient differs: the comparison above can fail
    assert max(float((plain.engine.summed_grads()[n] - want[n]).abs().max()) for n in want) > 1e-4


def test_status_line_and_metrics_carry_the_causal_part(tmp_path, capsys):
    log = MetricsLog(tmp_path, False, True)
    step = {"loss": 5.0, "masked_tokens": 9, "lr": 1e-4, "anneal_ratio": 1.0, "grad_norm": 1.0, "tokens": 64,
            "seconds": 0.5, "skipped": False}
    log.status(1, [step | {"ar_loss": 3.0}, step | {"ar_loss": 4.0}])
    log.status(2, [step])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["ar_loss"] == 3.5 and "ar_loss" not in rows[1]
    assert "| ar 3.5000 |" in capsys.readouterr().err


def test_weight_is_checked():
    from adapt.recipe.config import ConfigError

    for bad in (["diffusion.ar_loss_weight=-0.1"],
                ["diffusion.ar_loss_weight=0.5", "model.attn_implementation=flash_attention_2",
                 "attention.anneal_steps=0"]):
        with pytest.raises(ConfigError, match="ar_loss_weight"):
            load_config(None, bad)
