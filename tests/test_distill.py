"""The distillation term (`diffusion.distill_*`): tau^2 KL(teacher || model) at the frontier or every masked
position, against direct computations; zero where the model already is its teacher (the unconverted parent at
b = 1); the training step's gradient is the diffusion loss's plus the term's; bad values are refused by name."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from test_joint_loss import diffusion_part, make_state

from adapt.config import ConfigError
from adapt.diffusion import blocked_vocab, distill_kl, frontier_positions
from adapt.objectives import Attention, BlockDiffusion, ModelForward, Noised
from adapt.objectives.base import Distill
from adapt.recipe import load_config
from adapt.train import global_batch, step_attention, train_step

V = 48
MASK = V - 1


def test_frontier_positions_by_hand():
    m = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    # blocks of 4: [0 1 1 1] -> offset 1 (0 shown before, 2 and 3 hidden after); [0 0 1 0] -> none (3 is shown);
    # [1 1 1 1] -> offset 0 (nothing before, all hidden after)
    want = torch.zeros_like(m)
    want[0, [1, 8]] = True
    assert torch.equal(frontier_positions(m, 4), want)
    # one span over the whole row: the first masked position is a frontier only if all later ones are masked
    assert not frontier_positions(m, 12).any()
    assert torch.equal(frontier_positions(torch.tensor([[0, 0, 1, 1]], dtype=torch.bool), 4),
                       torch.tensor([[0, 0, 1, 0]], dtype=torch.bool))
    # a partial last span behaves as if padded with hidden positions
    assert torch.equal(frontier_positions(torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool), 3),
                       torch.tensor([[0, 0, 0, 1, 0]], dtype=torch.bool))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_value_and_gradient_against_a_direct_computation(tau):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, V, generator=g, requires_grad=True)
    teacher = torch.randn(5, V, generator=g, requires_grad=True)
    blocked = blocked_vocab(V, V - 3, MASK)
    got = distill_kl(student, teacher, blocked, temperature=tau)
    keep = ~blocked
    log_s = F.log_softmax(student[:, keep] / tau, -1)
    log_t = F.log_softmax(teacher[:, keep].detach() / tau, -1)
    want = tau ** 2 * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    # d/dz_s of tau^2 KL = tau (p_s - p_t) on the ids that are not blocked, 0 on the blocked ones
    direct = torch.zeros(5, V)
    direct[:, keep] = tau * (log_s.exp() - log_t.exp()).detach()
    assert torch.allclose(student.grad, direct, atol=1e-5)
    assert teacher.grad is None  # the teacher is a target, never trained by this term


def test_top_k_of_the_whole_vocabulary_is_the_full_kl():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    blocked = blocked_vocab(V, V - 1, MASK)
    full = distill_kl(student, teacher, blocked)
    assert torch.allclose(distill_kl(student, teacher, blocked, top_k=V), full, atol=1e-6)
    # top 5: the teacher's 5 most likely ids renormalised, against the student's full log-probabilities
    log_t = F.log_softmax(teacher.masked_fill(blocked, -math.inf), -1)
    log_s = F.log_softmax(student.masked_fill(blocked, -math.inf), -1)
    top, ids = log_t.topk(5, -1)
    p = (top - top.logsumexp(-1, keepdim=True)).exp()
    want = (p * (p.log() - log_s.gather(-1, ids))).sum(-1)
    got = distill_kl(student, teacher, blocked, top_k=5)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, full, atol=1e-3)


def _block_objective(b: int, positions: str) -> BlockDiffusion:
    return BlockDiffusion(MASK, True, blocked_vocab(V, V - 1, MASK), block_length=b, clean_causal=True,
                          distill=Distill(1.0, positions))


@pytest.mark.parametrize("positions", ["frontier", "masked"])
def test_the_unconverted_parent_at_b1_is_its_own_teacher(positions):
    """At b = 1 every masked token is predicted from the clean row before it, the teacher's own row: the term is
    zero. At b = 4 the noised stream of the unconverted parent is not its clean stream, and the term is not."""
    model = tiny_llama(V)
    forward = ModelForward(model, "cpu")
    x0 = torch.randint(3, V - 1, (2, 16), generator=torch.Generator().manual_seed(2))
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    masked[:, 0] = False
    noised = Noised(x0.masked_fill(masked, MASK), masked, torch.full((2,), 0.6))
    terms = {}
    for b in (1, 4):
        obj = _block_objective(b, positions)
        with torch.no_grad():
            logits, clean = obj.predict_joint(forward, x0, noised, Attention())
        assert clean is not None  # the teacher's rows come from the same forward
        terms[b] = float(obj.distill_sum(logits, clean, noised))
    assert abs(terms[1]) < 1e-5 and terms[4] > 1e-3, terms


def test_step_gradient_is_diffusion_plus_the_distillation_term(tmp_path):
    w = 0.7
    opts = ("diffusion.block_length=4", "diffusion.clean_attention=causal", "attention.anneal_steps=0")
    state = make_state(tmp_path, *opts, f"diffusion.distill_weight={w}", "diffusion.distill_positions=masked")
    out = train_step(state, 2)
    assert state.engine.calls == 2  # the teacher's rows come from the step's own forward: no extra call
    ref = make_state(tmp_path, *opts)
    sums, count, idx = diffusion_part(ref, 2)
    obj, cfg = ref.objective, ref.cfg
    x0 = ref.data.train[idx]
    noised = obj.corrupt(x0, obj.maskable(x0), global_batch(cfg, 2, len(ref.data.train))[1])  # the step's draw
    m = cfg.train.micro_batch_size
    kd_total = 0.0
    for k in range(cfg.train.grad_accum):
        sl = slice(k * m, (k + 1) * m)
        part = noised.rows(sl)
        both = obj.logits(ref.forward, part.xt, step_attention(cfg, 2).rows(sl), x0[sl], clean_rows=True)
        logits, clean = both[:, :16], both[:, 16:]  # the noised rows, then the clean stream's own rows
        teacher = torch.cat([clean[:, :1], clean[:, :-1]], 1).detach()  # row i-1 predicts token i
        sel = part.masked.clone()
        sel[:, 0] = False
        kd = w * distill_kl(logits[sel], teacher[sel], obj.blocked).sum()
        kd_total += kd.item()
        (kd / count).backward()
    for s in sums:
        (s / count).backward()
    ref.engine.step()
    want, got = ref.engine.grads[0], state.engine.summed_grads()
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-5
    assert out["distill"] == pytest.approx(kd_total / count, rel=1e-5)
    assert out["loss"] == pytest.approx(sum(s.item() for s in sums) / count, rel=1e-5)  # the ELBO part alone
    plain = make_state(tmp_path, *opts)
    train_step(plain, 2)  # without the term the gradient differs: the comparison above can fail
    assert max(float((plain.engine.summed_grads()[n] - want[n]).abs().max()) for n in want) > 1e-4


@pytest.mark.parametrize("bad, key", [
    (["diffusion.distill_weight=-0.5"], "distill_weight"),
    (["diffusion.distill_weight=.nan"], "distill_weight"),
    (["diffusion.distill_weight=1", "diffusion.distill_top_k=-1"], "distill_top_k"),
    (["diffusion.distill_weight=1", "diffusion.distill_temperature=0"], "distill_temperature"),
    (["diffusion.distill_weight=1", "diffusion.distill_positions=everywhere"], "distill_positions"),
    (["diffusion.distill_weight=1"], "distill_teacher=clean"),  # the whole-sequence objective has no clean stream
    (["diffusion.distill_weight=1", "diffusion.block_length=4", "attention.anneal_schedule=blocks"],
     "clean_attention=causal"),  # the block clean stream sees the token it would teach
])
def test_bad_values_are_refused_by_name(bad, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, bad)
