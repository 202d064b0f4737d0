"""The distillation term (`diffusion.distill.*`): tau^2 KL(teacher || model) at the frontier or every masked
position, against direct computations; zero where the model already is its teacher (the unconverted parent at
b = 1); the training step's gradient is the diffusion loss's plus the term's; bad values are refused by name."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from test_joint_loss import Engine, diffusion_part, make_state

from adapt.recipe.config import ConfigError
from adapt.objectives.diffusion import (blocked_vocab, context_shares, distill_kl, frontier_positions,
                                        prediction_logits,
                             shift_logits)
from adapt import objectives
from adapt.objectives import Attention, BlockDiffusion, ModelForward, Noised
from adapt.objectives.distill import Distill
from adapt.model.causal import set_causal
from adapt.recipe.load import load_config
from adapt.train.loop import global_batch, step_attention, train_step

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


def test_context_shares_by_hand():
    m = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    # blocks of 4: earlier blocks count as seen; within a block, the hidden tokens before i are not
    want4 = torch.tensor([[1, 1, 1 - 1 / 2, 1 - 2 / 3, 1, 1 - 1 / 5, 1 - 1 / 6, 1 - 2 / 7]])
    assert torch.allclose(context_shares(m, 4), want4)
    # one span over the row: the share of x_<i shown
    want8 = torch.tensor([[1, 1, 1 - 1 / 2, 1 - 2 / 3, 1 - 2 / 4, 1 - 3 / 5, 1 - 3 / 6, 1 - 4 / 7]])
    assert torch.allclose(context_shares(m, 8), want8)
    # a partial last span (as if padded) changes nothing before the padding
    assert torch.allclose(context_shares(m[:, :7], 4), want4[:, :7])


def _tiny_draw(seed: int, t: float) -> tuple[ModelForward, torch.Tensor, Noised]:
    """A tiny parent's forward, two rows of 16 ids (seed `seed`) and a draw masking each but the first w.p. t."""
    forward = ModelForward(tiny_llama(V), "cpu")
    x0 = torch.randint(3, V - 1, (2, 16), generator=torch.Generator().manual_seed(seed))
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed + 1)) < t
    masked[:, 0] = False
    return forward, x0, Noised(x0.masked_fill(masked, MASK), masked, torch.full((2,), t))


def test_context_weights_each_masked_kl_by_its_share():
    """`context` is `masked` with each position's KL times its context share, computed here from the masks."""
    forward, x0, noised = _tiny_draw(4, 0.5)
    masked = noised.masked
    obj = _block_objective(8, "context")
    with torch.no_grad():
        logits, clean = obj.predict_joint(forward, x0, noised, Attention())
    student, teacher = prediction_logits(logits, obj.read_shift), shift_logits(clean)
    kl = distill_kl(student[masked], teacher[masked], obj.blocked)
    hidden_before = torch.zeros(x0.shape)
    for i in range(16):
        start = i - i % 8
        hidden_before[:, i] = masked[:, start:i].sum(-1)
    shares = 1 - hidden_before / torch.arange(16).clamp(min=1)
    got, plain = float(obj.distill_sum(logits, clean, noised)), float(kl.sum())
    assert got == pytest.approx(float((kl * shares[masked]).sum()), rel=1e-5)
    assert got < 0.95 * plain  # the shares are below 1 wherever a masked token precedes in its block


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


@pytest.mark.parametrize("positions", ["frontier", "masked", "context"])
def test_the_unconverted_parent_at_b1_is_its_own_teacher(positions):
    """At b = 1 every masked token is predicted from the clean row before it, the teacher's own row: the term is
    zero. At b = 4 the noised stream of the unconverted parent is not its clean stream, and the term is not."""
    forward, x0, noised = _tiny_draw(2, 0.6)
    terms = {}
    for b in (1, 4):
        obj = _block_objective(b, positions)
        with torch.no_grad():
            logits, clean = obj.predict_joint(forward, x0, noised, Attention())
        assert clean is not None  # the teacher's rows come from the same forward
        terms[b] = float(obj.distill_sum(logits, clean, noised))
    assert abs(terms[1]) < 1e-5 and terms[4] > 1e-3, terms


def _reference_step(ref, w: float, count: float, sums, noised, pair) -> float:
    """The step written out on `ref`: per micro-batch w x KL at the masked positions (position 0 aside) of
    `pair(rows, part)` = (student logits, teacher logits), both aligned so row i predicts token i, plus the
    diffusion sums, all divided by `count`; one engine step. Returns the distillation term's total."""
    m, kd_total = ref.cfg.train.micro_batch_size, 0.0
    for k in range(ref.cfg.train.grad_accum):
        sl = slice(k * m, (k + 1) * m)
        part = noised.rows(sl)
        student, teacher = pair(sl, part)
        sel = part.masked.clone()
        sel[:, 0] = False
        kd = w * distill_kl(student[sel], teacher[sel], ref.objective.blocked).sum()
        kd_total += kd.item()
        (kd / count).backward()
    for s in sums:
        (s / count).backward()
    ref.engine.step()
    return kd_total


def test_step_gradient_is_diffusion_plus_the_distillation_term(tmp_path):
    w = 0.7
    opts = ("diffusion.block.length=4", "diffusion.block.clean_attention=causal", "attention.anneal_steps=0")
    state = make_state(tmp_path, *opts, f"diffusion.distill.weight={w}", "diffusion.distill.positions=masked")
    out = train_step(state, 2)
    assert state.engine.calls == 2  # the teacher's rows come from the step's own forward: no extra call
    ref = make_state(tmp_path, *opts)
    sums, count, idx = diffusion_part(ref, 2)
    obj, cfg = ref.objective, ref.cfg
    x0 = ref.data.train[idx]
    noised = obj.corrupt(x0, obj.maskable(x0), global_batch(cfg, 2, len(ref.data.train))[1])  # the step's draw

    def pair(sl, part):
        both = obj.logits(ref.forward, part.xt, step_attention(cfg, 2).rows(sl), x0[sl], clean_rows=True)
        logits, clean = both[:, :16], both[:, 16:]  # the noised rows, then the clean stream's own rows
        return logits, torch.cat([clean[:, :1], clean[:, :-1]], 1).detach()  # row i-1 predicts token i

    kd_total = _reference_step(ref, w, count, sums, noised, pair)
    want, got = ref.engine.grads[0], state.engine.summed_grads()
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-5
    assert out["distill"] == pytest.approx(kd_total / count, rel=1e-5)
    assert out["loss"] == pytest.approx(sum(s.item() for s in sums) / count, rel=1e-5)  # the ELBO part alone
    plain = make_state(tmp_path, *opts)
    train_step(plain, 2)  # without the term the gradient differs: the comparison above can fail
    assert max(float((plain.engine.summed_grads()[n] - want[n]).abs().max()) for n in want) > 1e-4


def test_the_parent_under_lora_is_the_model_with_its_adapters_disabled():
    """distill_teacher=parent with LoRA: the teacher's logits are the parent's causal logits (no second copy), the
    adapted model's differ, and the adapters are on again afterwards."""
    from peft import LoraConfig as PeftLora, get_peft_model

    from adapt.objectives import MaskedDiffusion
    from adapt.train.teacher import ParentTeacher

    base = tiny_llama(V)
    parent = copy.deepcopy(base)
    peft_model = get_peft_model(base, PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # adapters that change the output (peft starts B at zero)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    obj = MaskedDiffusion(MASK, True, blocked_vocab(V, V - 1, MASK))
    x0 = torch.randint(3, V - 1, (2, 16), generator=torch.Generator().manual_seed(4))
    engine = Engine(peft_model, 1)
    with torch.no_grad(), ParentTeacher(None, torch.device("cpu")).forward(engine) as parent_forward:
        teacher = obj.causal_logits(parent_forward, x0)
    with torch.no_grad():
        want = obj.causal_logits(ModelForward(parent, "cpu"), x0)
        adapted = obj.causal_logits(ModelForward(engine, "cpu"), x0)
    assert torch.allclose(teacher, want, atol=1e-5) and not teacher.requires_grad
    assert (adapted - want).abs().max() > 1e-2  # the adapters matter: the comparison above can fail
    assert engine.calls == 2  # the teacher ran through the engine, as DeepSpeed's ZeRO hooks need


def test_step_gradient_with_the_frozen_parent_as_teacher(tmp_path):
    """Whole-sequence objective, full fine-tuning: a frozen copy of the parent teaches every masked position; the
    step's gradient is the diffusion loss's plus w x KL(parent's causal distribution || model), the copy gets no
    gradient and stays the parent."""
    from adapt.train.teacher import ParentTeacher

    w = 0.5
    opts = (f"diffusion.distill.weight={w}", "diffusion.distill.teacher=parent", "diffusion.distill.positions=masked")
    state = make_state(tmp_path, *opts)
    state.teacher = ParentTeacher.build(state.cfg, state.engine.module, torch.device("cpu"))
    frozen = {n: p.clone() for n, p in state.teacher.frozen.named_parameters()}
    out = train_step(state, 1)
    assert all(p.grad is None and torch.equal(p, frozen[n]) for n, p in state.teacher.frozen.named_parameters())
    ref = make_state(tmp_path)
    sums, count, idx = diffusion_part(ref, 1)
    obj, cfg = ref.objective, ref.cfg
    x0 = ref.data.train[idx]
    noised = obj.corrupt(x0, obj.maskable(x0), global_batch(cfg, 1, len(ref.data.train))[1])
    parent = copy.deepcopy(ref.engine.module)
    set_causal(parent, True)  # HF's own causal path, not the 4D mask the teacher passes

    def pair(sl, part):
        logits = obj.predict(ref.forward, x0[sl], part, step_attention(cfg, 1).rows(sl))
        with torch.no_grad():
            causal = parent(input_ids=x0[sl], attention_mask=None, use_cache=False).logits
        shifted = [torch.cat([z[:, :1], z[:, :-1]], 1) for z in (logits, causal)]  # row i-1 predicts token i
        return shifted[0], shifted[1]

    kd_total = _reference_step(ref, w, count, sums, noised, pair)
    want, got = ref.engine.grads[0], state.engine.summed_grads()
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-5
    assert out["distill"] == pytest.approx(kd_total / count, rel=1e-5) and out["distill"] > 0
    assert out["loss"] == pytest.approx(sum(s.item() for s in sums) / count, rel=1e-5)


def test_a_linear_schedule_scales_the_term_by_the_steps_left(tmp_path):
    """distill_schedule=linear at step 2 of 4 trains as the constant term at half the weight (1 - 2 / 4): the same
    gradient, the logged term halved; at full weight the gradient differs, so the comparison can fail."""
    opts = ("diffusion.block.length=4", "diffusion.block.clean_attention=causal", "attention.anneal_steps=0",
            "diffusion.distill.positions=masked", "train.max_steps=4")
    linear = make_state(tmp_path, *opts, "diffusion.distill.weight=1", "diffusion.distill.schedule=linear")
    half = make_state(tmp_path, *opts, "diffusion.distill.weight=0.5")
    full = make_state(tmp_path, *opts, "diffusion.distill.weight=1")
    outs = [train_step(s, 2) for s in (linear, half, full)]
    grads = [s.engine.summed_grads() for s in (linear, half, full)]
    assert max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[1]) < 1e-6
    assert max(float((grads[2][n] - grads[1][n]).abs().max()) for n in grads[1]) > 1e-4
    assert outs[0]["distill"] == pytest.approx(outs[1]["distill"], rel=1e-6) and outs[0]["distill"] > 0
    assert outs[0]["loss"] == pytest.approx(outs[2]["loss"], rel=1e-6)  # the bound's part is never scaled


@pytest.mark.parametrize("bad, key", [
    (["diffusion.distill.weight=1", "diffusion.block.length=4", "diffusion.block.clean_attention=causal",
      "diffusion.distill.schedule=cosine"], "distill.schedule"),
    (["diffusion.distill.weight=-0.5"], "distill.weight"),
    (["diffusion.distill.weight=.nan"], "distill.weight"),
    (["diffusion.distill.weight=1", "diffusion.distill.top_k=-1"], "distill.top_k"),
    (["diffusion.distill.weight=1", "diffusion.distill.temperature=0"], "distill.temperature"),
    (["diffusion.distill.weight=1", "diffusion.distill.positions=everywhere"], "distill.positions"),
    (["diffusion.distill.weight=1"], "distill.teacher=clean"),  # the whole-sequence objective has no clean stream
    (["diffusion.distill.weight=1", "diffusion.block.length=4", "attention.anneal_schedule=blocks"],
     "clean_attention=causal"),  # the block clean stream sees the token it would teach
])
def test_bad_values_are_refused_by_name(bad, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, bad)


def test_the_parent_of_an_exported_diffusion_model_is_refused(tmp_path, tiny_model_dir):
    """A run that continues from an export has no causal parent to learn from: refused before anything loads."""
    from test_sft import exported

    folder = exported(tmp_path / "export", tiny_model_dir)
    with pytest.raises(ConfigError, match="distill.teacher=parent` needs the causal parent"):
        load_config(None, [f"model.name_or_path={folder}", "attention.anneal_steps=0",
                           "diffusion.distill.weight=1", "diffusion.distill.teacher=parent"])
    fresh = load_config(None, ["diffusion.distill.weight=1", "diffusion.distill.teacher=parent"])
    assert fresh.diffusion.distill.teacher == "parent"  # from the causal parent itself: accepted


# --- on-policy distillation (OPDLM) -------------------------------------------------------------------

def test_the_teacher_mask_sees_a_drafted_block_causally():
    from adapt.objectives.block import block_visibility

    v = block_visibility(4, 2, clean_causal=True, noised_causal=True).int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],  # drafted block 0: causal inside, nothing clean before it
                         [1, 1, 0, 0, 0, 0, 0, 0],
                         [0, 0, 1, 0, 1, 1, 0, 0],  # drafted block 1: itself causally, clean block 0
                         [0, 0, 1, 1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 1, 0, 0, 0],  # the clean stream: causal
                         [0, 0, 0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 1, 1, 1, 1]])
    assert torch.equal(v, want)
    assert not torch.equal(block_visibility(4, 2, clean_causal=True).int(), want)  # the training mask differs


def _clean_and_random_logits(x0: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction logits whose most likely id is x0's token (a clean fill), and random ones (a wrong fill), in the
    layout the objective's `predict` gives (row i-1 predicting token i when `shift`)."""
    clean = F.one_hot(x0, V).float() * 10
    clean = torch.cat([clean[:, 1:], clean[:, -1:]], 1) if shift else clean
    return clean, torch.randn(*x0.shape, V, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("b", [0, 4])
def test_onpolicy_teacher_on_a_clean_fill_is_the_parents_causal_forward(b):
    """With drafts equal to the data the on-policy teacher is exactly the parent's causal forward of x0 (for block
    diffusion, each drafted block after the clean blocks before it); with wrong drafts it is not. Drafts keep the
    visible tokens and never use a blocked id."""
    from adapt.objectives import MaskedDiffusion

    model = tiny_llama(V)
    forward = ModelForward(model, "cpu")
    blocked = blocked_vocab(V, V - 1, MASK)
    obj = _block_objective(b, "masked") if b else MaskedDiffusion(MASK, True, blocked, distill=Distill(1.0, "masked"))
    x0 = torch.randint(3, V - 1, (2, 16), generator=torch.Generator().manual_seed(6))
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    masked[:, 0] = False
    noised = Noised(x0.masked_fill(masked, MASK), masked, torch.full((2,), 0.5))
    clean_fill, wrong_fill = _clean_and_random_logits(x0, obj.read_shift)
    with torch.no_grad():
        causal = obj.causal_logits(forward, x0)
        teacher = obj.onpolicy_teacher(forward, x0, noised, clean_fill, Attention())
        wrong = obj.onpolicy_teacher(forward, x0, noised, wrong_fill, Attention())
    assert torch.equal(obj.drafts(noised, clean_fill), x0)
    drafts = obj.drafts(noised, wrong_fill.index_fill(-1, torch.tensor([MASK]), 1e9))  # the mask id is blocked
    assert torch.equal(drafts[~masked], x0[~masked]) and not (drafts == MASK).any()
    assert (teacher - causal).abs().max() < 1e-4
    assert (wrong - causal).abs().max() > 1e-2


def test_step_with_half_the_rows_on_policy(tmp_path):
    """distill_onpolicy=0.5 on the block objective (teacher: its causal clean stream): per micro-batch one forward
    of the step and one of the teacher on the drafted row; the gradient is the diffusion loss's plus the term's
    with the on-policy teacher on the first row and the clean stream on the second."""
    w = 1.0
    opts = ("diffusion.block.length=4", "diffusion.block.clean_attention=causal", "attention.anneal_steps=0",
            f"diffusion.distill.weight={w}", "diffusion.distill.positions=masked")
    state = make_state(tmp_path, *opts, "diffusion.distill.onpolicy=0.5")
    out = train_step(state, 2)
    assert state.engine.calls == 4  # 2 micro-batches x (the step's forward + the teacher's)
    ref = make_state(tmp_path, *opts)
    sums, count, idx = diffusion_part(ref, 2)
    obj, cfg = ref.objective, ref.cfg
    x0 = ref.data.train[idx]
    noised = obj.corrupt(x0, obj.maskable(x0), global_batch(cfg, 2, len(ref.data.train))[1])

    def pair(sl, part):
        attention = step_attention(cfg, 2).rows(sl)
        both = obj.logits(ref.forward, part.xt, attention, x0[sl], clean_rows=True)
        logits, clean = both[:, :16], both[:, 16:]
        with torch.no_grad():
            first = slice(0, 1)
            on = obj.onpolicy_teacher(ref.forward, x0[sl][first], part.rows(first), logits[first],
                                      attention.rows(first))
        teacher = torch.cat([on, clean[1:].detach()])
        return logits, torch.cat([teacher[:, :1], teacher[:, :-1]], 1)

    kd_total = _reference_step(ref, w, count, sums, noised, pair)
    want, got = ref.engine.grads[0], state.engine.summed_grads()
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-5
    assert out["distill"] == pytest.approx(kd_total / count, rel=1e-5)
    off = make_state(tmp_path, *opts)
    train_step(off, 2)  # all rows off-policy: another gradient, so the comparison above can fail
    assert max(float((off.engine.summed_grads()[n] - want[n]).abs().max()) for n in want) > 1e-5


@pytest.mark.parametrize("bad, key", [
    (["diffusion.distill.weight=1", "diffusion.distill.teacher=parent", "diffusion.distill.onpolicy=1.5"],
     "distill.onpolicy"),
    (["diffusion.distill.weight=1", "diffusion.distill.teacher=parent", "diffusion.distill.onpolicy=-0.1"],
     "distill.onpolicy"),
])
def test_bad_onpolicy_shares_are_refused(bad, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, bad)


@pytest.mark.parametrize("off", [
    ["diffusion.distill.weight=0", "diffusion.distill.schedule=linear"],
    ["diffusion.distill.onpolicy=0.5", "diffusion.distill.teacher=parent", "diffusion.distill.positions=masked"],
    ["diffusion.objective=block", "diffusion.block.length=4", "attention.anneal_steps=0", "diffusion.distill_weight=0",
     "diffusion.distill_schedule=linear", "diffusion.distill_onpolicy=1"],  # the old names too
])
def test_a_weight_of_zero_switches_the_term_off_whatever_its_other_keys_say(off):
    cfg = load_config(None, off)
    assert cfg.diffusion.distill.weight == 0
    assert objectives.selected(cfg).options(cfg)["distill"] is None
