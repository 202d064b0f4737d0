"""Adaptation: setup -> fit -> train_step -> evaluate.

Every random draw of a step (data order, t, the masked positions, the attention pattern) comes
from generators seeded by (seed, step[, rank]), so resuming at step s replays exactly what an
uninterrupted run would have done, with no RNG state to carry.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from adapt import checkpoint, distributed, faults
from adapt.attention import anneal_ratio, build_mask, step_visibility, uses_block_mask, window_block_mask
from adapt.config import Config, to_yaml
from adapt.data import Blocks, batch_indices, build_blocks
from adapt.diffusion import blocked_vocab, corrupt, diffusion_loss_sum, maskable_positions, normaliser, sample_t
from adapt.likelihood import BoundEstimate, block_bounds, causal_nll
from adapt.metrics import MetricsLog
from adapt.model import DTYPES, DiffusionMeta, load_causal_lm, load_tokenizer, prepare_diffusion, set_causal


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to try."""


@dataclass
class State:
    cfg: Config
    engine: object
    tokenizer: object
    meta: DiffusionMeta
    blocks: Blocks
    blocked: torch.Tensor
    log: MetricsLog
    step: int = 0
    stop_requested: bool = False
    skipped: int = 0


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**63 - 1)
    return h


def _optimizer(cfg: Config, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    if cfg.dist.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    return torch.optim.AdamW(params, **kw)


def lr_lambda(cfg: Config):
    """Linear warmup to the peak, then cosine to min_lr_ratio * peak at max_steps."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def setup(cfg: Config) -> State:
    """Process group, model with mask token (and LoRA adapters), data, DeepSpeed engine; resumes when a
    checkpoint exists. The data are packed blocks (adapt) or prompt/response examples (sft)."""
    distributed.init()
    world = distributed.world_size()
    if cfg.model.attn_implementation == "flex_attention" and distributed.device().type == "cpu":
        raise TrainingError("FlexAttention has no backward pass on CPU (torch 2.13); train with "
                            "model.attn_implementation=sdpa on CPU (same masks, dense)")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    meta = replace(prepare_diffusion(model, tokenizer, cfg.model), shift=cfg.diffusion.shift, eps=cfg.diffusion.eps)
    set_causal(model, False)  # from here on the masks we pass decide what is visible
    rows = model.get_output_embeddings().weight.shape[0]  # before peft wraps the head, before ZeRO-3 partitions it
    if cfg.lora.enabled:
        from adapt.lora import apply_lora

        torch.manual_seed(cfg.train.seed)  # peft draws A from the global RNG: the same on every rank and run
        model = apply_lora(model, cfg.lora, meta)
    if distributed.is_main():
        blocks = _build_data(cfg, tokenizer)  # rank 0 fills the cache first
    distributed.barrier()
    blocks = _build_data(cfg, tokenizer)
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine = distributed.initialize(model, opt, sched, distributed.ds_config(cfg))
    blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id, device=distributed.device())
    run_dir = cfg.run_dir
    tag = checkpoint.find_resume(cfg)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        checkpoint.save_base(run_dir, model, tokenizer, meta)
    log = MetricsLog(run_dir, cfg.run.tensorboard, distributed.is_main())
    state = State(cfg, engine, tokenizer, meta, blocks, blocked, log)
    if tag is not None:
        client = distributed.load(engine, checkpoint.ckpt_root(run_dir), tag)
        state.step = int(client["step"])
        state.skipped = int(client.get("skipped_steps", 0))
        log.info(f"resumed from {checkpoint.ckpt_root(run_dir) / tag} at step {state.step}")
    log.info(f"world {world} | {len(blocks.train)} train blocks, {len(blocks.heldout)} held-out, "
             f"{cfg.data.block_size} tokens each | mask token id {meta.mask_token_id}")
    return state


def _build_data(cfg: Config, tokenizer) -> Blocks:
    if cfg.stage == "sft":
        from adapt.sft import build_examples

        return build_examples(cfg, tokenizer)
    return build_blocks(cfg.data, tokenizer)


def _logits(state: State, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return state.engine(input_ids=x.to(distributed.device()), attention_mask=mask, use_cache=False).logits


def global_batch(cfg: Config, step: int, n_blocks: int):
    """The whole step's draws across ranks: (block indices, t, generator for the masks), m * a * world rows.

    Every rank draws the same global batch (a pure function of seed and step) and keeps its own
    rows, so t is stratified over the global batch and a run's numbers do not depend on how many
    ranks share it.
    """
    world = distributed.world_size()
    n = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    idx = batch_indices(step, n_blocks, n, 0, 1, cfg.train.seed)
    gen = torch.Generator().manual_seed(_seed(cfg.train.seed, step, 1))
    t = sample_t(n, cfg.diffusion.eps, cfg.diffusion.t_sampling, gen)
    return idx, t, gen


def train_step(state: State, step: int) -> dict:
    """One optimizer step over micro_batch_size * grad_accum sequences per rank."""
    cfg, world = state.cfg, distributed.world_size()
    m, a, length = cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.block_size
    # dropout (lora.dropout) draws from the global RNG: seed it per (step, rank) so a resume replays it
    torch.manual_seed(_seed(cfg.train.seed, step, 3, distributed.rank()))
    idx, t_all, gen = global_batch(cfg, step, len(state.blocks.train))
    x0_all = state.blocks.train[idx]
    loss_mask = getattr(state.blocks, "train_loss_mask", None)  # sft: response positions only
    maskable_all = maskable_positions(x0_all, cfg.diffusion.shift, None if loss_mask is None else loss_mask[idx])
    xt_all, masked_all = corrupt(x0_all, t_all, state.meta.mask_token_id, maskable_all, gen)
    count = normaliser(cfg.diffusion.loss_norm, maskable_all, masked_all)
    n_masked = int(masked_all.sum())
    mine = slice(distributed.rank() * m * a, (distributed.rank() + 1) * m * a)
    x0, xt, masked, t = x0_all[mine], xt_all[mine], masked_all[mine], t_all[mine]
    docs = state.blocks.train_docs[idx[mine]] if cfg.attention.document_mask else None
    r = anneal_ratio(step, cfg.attention.anneal_steps)
    # one attention pattern per step, identical on every rank (DiffuLLaMA)
    visible = step_visibility(length, r, cfg.attention.anneal_schedule,
                              torch.Generator().manual_seed(_seed(cfg.train.seed, step, 2)))
    dev, dtype = distributed.device(), DTYPES[cfg.model.dtype]
    block_mask = visible is not None and uses_block_mask(cfg.model.attn_implementation, cfg.attention.anneal_schedule)
    total, bad = 0.0, False
    for k in range(a):
        sl = slice(k * m, (k + 1) * m)
        if block_mask:  # flex: the window as a BlockMask, hidden blocks skipped
            mask = window_block_mask(length, r, docs[sl].to(dev) if docs is not None else None, dev)
        else:
            mask = build_mask(visible, length, dtype, cfg.model.attn_implementation,
                              docs[sl].to(dev) if docs is not None else None)
        logits = _logits(state, xt[sl], mask if mask is None else mask.to(dev))
        loss_sum = diffusion_loss_sum(logits, x0[sl].to(dev), masked[sl].to(dev), t[sl], cfg.diffusion.shift,
                                      state.blocked)
        if step in faults.nan_steps():
            loss_sum = loss_sum * float("nan")
        finite = torch.isfinite(loss_sum)
        bad = bad or distributed.all_sum([float(not finite)])[0] > 0  # every rank takes the same branch
        if bad and k == a - 1:
            saved_lrs = _drop_update(state.engine)
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so the step's
        # gradient is d(sum of all token losses / global count). A non-finite loss sends no gradient.
        state.engine.backward(torch.where(finite, loss_sum, 0.0) / count * world * a)
        state.engine.step()
        total += loss_sum.item() if finite else 0.0
    if bad:
        if not state.engine.was_step_applied():  # DeepSpeed saw the overflow itself: no scheduler step ran
            for group, lr in zip(state.engine.optimizer.param_groups, saved_lrs):
                group["lr"] = lr
        check_finite_weights(state, f"after the skipped step {step + 1}")
    (total,) = distributed.all_sum([total])
    norm = state.engine.get_global_grad_norm()
    return {"loss": float("nan") if bad else total / count, "masked_tokens": int(n_masked), "anneal_ratio": r,
            "grad_norm": float(norm) if norm is not None and not bad else float("nan"), "skipped": bad,
            "lr": state.engine.get_lr()[0], "tokens": m * a * world * length}


def _drop_update(engine) -> list[float]:
    """Make the coming optimizer update a no-op: learning rate 0 for this step only (the scheduler
    sets the next step's rate afresh). AdamW's decoupled weight decay is scaled by lr, so it is off too.
    Returns the rates it replaced."""
    saved = [group["lr"] for group in engine.optimizer.param_groups]
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    return saved


def check_finite_weights(state: State, when: str) -> None:
    """Raise TrainingError unless every rank's parameters (its ZeRO-3 partition) are finite."""
    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in state.engine.module.parameters())
    if distributed.all_sum([float(not ok)])[0] > 0:
        raise TrainingError(f"the weights are no longer finite {when}; nothing was saved from this point. "
                            f"Lower optim.lr, raise optim.warmup_steps or use model.dtype=fp32, then rerun "
                            f"to resume from the last complete checkpoint")


@torch.no_grad()
def evaluate(state: State, attention: str = "bidirectional") -> dict:
    """Held-out negative ELBO (stratified t, fixed noise so runs compare pairwise), split over ranks.

    attention: bidirectional, or causal (the parent's attention; the 'before' view).
    SFT data (with a loss mask) are scored on their responses only, by `adapt.sft.evaluate_responses`.
    """
    if getattr(state.blocks, "heldout_loss_mask", None) is not None:
        from adapt.sft import evaluate_responses

        return evaluate_responses(state)
    cfg, engine = state.cfg, state.engine
    engine.eval()
    length = cfg.data.block_size
    visible = None if attention == "bidirectional" else step_visibility(length, 0.0, "random")
    mask = build_mask(visible, length, DTYPES[cfg.model.dtype], cfg.model.attn_implementation)
    mask = mask if mask is None else mask.to(distributed.device())
    rank, world = distributed.rank(), distributed.world_size()
    mine = state.blocks.heldout[rank::world]
    gen = torch.Generator().manual_seed(_seed(cfg.train.seed, 7919, rank))
    per_block = block_bounds(lambda x: _logits(state, x, _expand(mask, len(x))), mine, cfg.train.eval_t_samples,
                             cfg.diffusion.eps, state.meta.mask_token_id, cfg.diffusion.shift, state.blocked, gen,
                             batch_size=cfg.train.micro_batch_size)
    est = _gather_summary(per_block, length - int(cfg.diffusion.shift))
    engine.train()
    return est.as_dict()


def _expand(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    return None if mask is None else mask.expand(batch, -1, -1, -1)


def _gather_summary(per_block: torch.Tensor, tokens_per_block: int) -> BoundEstimate:
    """Mean and 95% interval of per-token bounds over the blocks of every rank."""
    per_token = per_block / tokens_per_block
    s, s2, n = distributed.all_sum([per_token.sum().item(), (per_token**2).sum().item(), float(len(per_token))])
    mean = s / n
    var = max(0.0, (s2 - n * mean**2) / (n - 1)) if n > 1 else float("nan")
    return BoundEstimate(mean, 1.96 * math.sqrt(var / n), int(n * tokens_per_block), int(n))


@torch.no_grad()
def parent_perplexity(state: State) -> dict:
    """Exact held-out perplexity of the parent causal LM on the same tokens (before any update)."""
    cfg = state.cfg
    state.engine.eval()
    set_causal(state.engine.module, True)
    rank, world = distributed.rank(), distributed.world_size()
    nll = causal_nll(lambda x: _logits(state, x, None), state.blocks.heldout[rank::world], state.blocked,
                     cfg.train.micro_batch_size)
    set_causal(state.engine.module, False)
    state.engine.train()
    total, tokens = distributed.all_sum([nll.sum().item(), float(len(nll) * (cfg.data.block_size - 1))])
    return {"parent_nll": total / tokens, "parent_ppl": math.exp(total / tokens)}


def _install_stop_handler(state: State) -> None:
    def handler(signum, frame):
        if state.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        state.stop_requested = True
        state.log.info("stop requested: finishing this step, saving a checkpoint, exiting (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def save(state: State) -> None:
    check_finite_weights(state, f"at step {state.step}")  # never a NaN written into a checkpoint
    client = {"step": state.step, "skipped_steps": state.skipped, "consumed_sequences": state.step * state.cfg.train.micro_batch_size
              * state.cfg.train.grad_accum * distributed.world_size()}
    checkpoint.save_resumable(state.engine, state.cfg.run_dir, state.step, state.cfg, client,
                              state.cfg.train.keep_last)


def fit(state: State) -> bool:
    """Train from state.step to max_steps; returns False when stopped early by a signal (after saving)."""
    cfg, log = state.cfg, state.log
    _install_stop_handler(state)
    log.start(state.step, cfg.train.max_steps)
    window: list[dict] = []
    bad_in_a_row = 0
    while state.step < cfg.train.max_steps:
        tic = time.perf_counter()
        out = train_step(state, state.step)
        state.step += 1
        out["seconds"] = time.perf_counter() - tic
        window.append(out)
        bad_in_a_row = bad_in_a_row + 1 if out["skipped"] else 0
        if out["skipped"]:
            state.skipped += 1
            log.info(f"step {state.step}: non-finite loss, update skipped ({bad_in_a_row} in a row, "
                     f"{state.skipped} in all; the run stops at {cfg.train.max_bad_steps} in a row)")
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingError(f"{bad_in_a_row} steps in a row had a non-finite loss (train.max_bad_steps="
                                    f"{cfg.train.max_bad_steps}); the last complete checkpoint is intact. Lower "
                                    f"optim.lr or use model.dtype=fp32, then rerun to resume from it")
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            log.status(state.step, window)
            window = []
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
            log.record(state.step, evaluate(state), "eval")
        if state.stop_requested:
            save(state)
            log.info(f"saved {checkpoint.ckpt_root(cfg.run_dir) / checkpoint.tag_for(state.step)}; "
                     f"rerun the same command to resume")
            return False
        if cfg.train.save_every and state.step % cfg.train.save_every == 0 and state.step < cfg.train.max_steps:
            save(state)
    save(state)
    return True


def show_batch(state: State) -> None:
    """Print one corrupted training sequence, so the data and masking can be eyeballed at start."""
    if not distributed.is_main():
        return
    idx = batch_indices(state.step, len(state.blocks.train), 1, 0, 1, state.cfg.train.seed)
    x0 = state.blocks.train[idx]
    loss_mask = getattr(state.blocks, "train_loss_mask", None)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0.5])
    maskable = maskable_positions(x0, state.cfg.diffusion.shift, None if loss_mask is None else loss_mask[idx])
    xt, _ = corrupt(x0, t, state.meta.mask_token_id, maskable, gen)
    text = state.tokenizer.decode(xt[0, :64]).replace(state.tokenizer.mask_token, "_")
    state.log.info(f"a training sequence at t=0.5 (first 64 tokens, _ = mask): {text!r}")


def run_adapt(cfg: Config) -> dict:
    """The adapt stage end to end: evaluate, train, export, evaluate, sample. Returns the summary."""
    from adapt.sampling.ancestral import ancestral_sample

    state = setup(cfg)
    summary: dict = {}
    if state.step == 0:
        show_batch(state)
        summary.update(parent_perplexity(state))
        summary.update({f"before_causal_{k}": v for k, v in evaluate(state, "causal").items()})
        summary.update({f"before_{k}": v for k, v in evaluate(state).items()})
        state.log.record(0, summary, "eval")
    if not fit(state):
        return summary
    summary.update({f"after_{k}": v for k, v in evaluate(state).items()})
    distributed.barrier()
    if distributed.is_main():
        out = checkpoint.export(cfg.run_dir)
        summary["export"] = str(out)
        if cfg.run.sample_length:
            summary["sample"] = _sample_text(out, cfg, ancestral_sample)
        state.log.record(state.step, summary, "summary")
        state.log.final(summary)
    distributed.barrier()
    return summary


def _sample_text(folder: Path, cfg: Config, sampler) -> str:
    from adapt.denoiser import Denoiser

    model, tokenizer, meta = checkpoint.load_diffusion_model(folder, dtype=cfg.model.dtype)
    den = Denoiser(model, meta)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    x = torch.full((1, cfg.run.sample_length + 1), meta.mask_token_id, dtype=torch.long)
    x[0, 0] = start
    out = sampler(den, x, steps=cfg.run.sample_steps, generator=torch.Generator().manual_seed(cfg.train.seed))
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)
