"""The training loop: setup -> fit -> train_step, for any stage and any objective (its held-out evaluation:
adapt.train.evaluate).

The loop takes its data (`adapt.data.corpus.Sequences`, with loss masks for SFT) and its objective
(`adapt.objectives`) and knows neither stage; `adapt.train.stages` builds the data and runs the stages.
Every random draw of a step (data order, t, the masked positions, the attention pattern) comes from a
named stream of `adapt.train.rng` seeded by (seed, step[, rank]), so resuming at step s replays exactly what an
uninterrupted run would have done, with no RNG state to carry.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch

from adapt.train import checkpoint, distributed, faults, rng, runlock
from adapt import objectives
from adapt.model.attention import anneal_ratio, block_causal, curriculum_block, step_visibility
from adapt.recipe.config import Config, ConfigError, to_yaml
from adapt.data.corpus import Sequences, batch_indices
from adapt.objectives.diffusion import blocked_vocab, corrupt, distill_scale
from adapt.cli.errors import StoppedBeforeStart, TrainingError
from adapt.train.evaluate import evaluate
from adapt.export import exported_meta, load_weights, save_base
from adapt.train.metrics import MetricsLog
from adapt.model.causal import DiffusionMeta, load_tokenizer, prepare_diffusion, set_causal
from adapt.objectives import Attention, ModelForward, Objective
from adapt.train.optim import build_optimizer, lr_lambda
from adapt.recipe.load import model_problems
from adapt.train.teacher import ParentTeacher, teacher_logits


@dataclass
class State:
    cfg: Config
    engine: object
    tokenizer: object
    meta: DiffusionMeta
    data: Sequences
    objective: Objective
    """The training objective (adapt.objectives); it also gives the held-out bound."""
    log: MetricsLog
    teacher: ParentTeacher | None = None
    """The parent as distillation teacher (diffusion.distill.teacher=parent), else None."""
    step: int = 0
    stop_requested: bool = False
    skipped: int = 0

    @property
    def forward(self) -> ModelForward:
        """The model call under DeepSpeed: forward(ids, mask) -> logits."""
        return ModelForward(self.engine, distributed.device())


def setup(cfg: Config, build_data: Callable[[Config, object], Sequences]) -> State:
    """Process group, model with mask token (and LoRA adapters), data from `build_data(cfg, tokenizer)`,
    the objective, the DeepSpeed engine; resumes when a checkpoint exists."""
    _install_early_stop_handler()  # before init: a signal then still releases what this launch holds
    distributed.init(cfg.dist.timeout_s)
    lock = _lock_run_folder(cfg)
    try:
        return _build_state(cfg, build_data)
    except BaseException:  # nothing of this launch stays behind: its lock (and a folder it made) go
        if lock is not None:
            lock.release()
        raise


def _build_state(cfg: Config, build_data: Callable[[Config, object], Sequences]) -> State:
    world = distributed.world_size()
    if cfg.model.attn_implementation == "flex_attention" and distributed.device().type == "cpu":
        raise TrainingError("FlexAttention has no backward pass on CPU (torch 2.13); train with "
                            "model.attn_implementation=sdpa on CPU (same masks, dense)")
    tokenizer = load_tokenizer(cfg.model)
    model = load_weights(cfg.model)  # an adapter export: its adapter merged
    problems = model_problems(cfg, model.config)
    if problems:
        raise ConfigError(problems)
    exported = exported_meta(cfg.model.name_or_path)
    meta = prepare_diffusion(model, tokenizer, cfg.model, exported)
    spec = objectives.spec_for(cfg)
    meta = meta.with_fields(spec.meta_fields(cfg))  # an objective's own fields in meta.extra
    set_causal(model, False)  # from here on the masks we pass decide what is visible
    rows = model.get_output_embeddings().weight.shape[0]  # before peft wraps the head, before ZeRO-3 partitions it
    teacher = ParentTeacher.build(cfg, model, distributed.device())  # before LoRA wraps it and any update
    if cfg.lora.enabled:
        from adapt.model.lora import apply_lora

        torch.manual_seed(cfg.train.seed)  # peft draws A from the global RNG: the same on every rank and run
        model = apply_lora(model, cfg.lora, meta)
    data = build_data(cfg, tokenizer)  # one rank per cache folder prepares it (a file lock), the others wait
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine = distributed.initialize(model, opt, sched, distributed.ds_config(cfg))
    blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id, device=distributed.device())
    run_dir = cfg.run_dir
    tag = checkpoint.find_resume(cfg)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.config_file(run_dir).write_text(to_yaml(cfg))
        save_base(run_dir, model, tokenizer, meta)
    log = MetricsLog(run_dir, cfg.run.tensorboard, distributed.is_main())
    state = State(cfg, engine, tokenizer, meta, data, spec.build(cfg, meta, blocked), log, teacher)
    if tag is not None:
        client = distributed.load(engine, checkpoint.ckpt_root(run_dir), tag)
        state.step = int(client["step"])
        state.skipped = int(client.get("skipped_steps", 0))
        log.info(f"resumed from {checkpoint.ckpt_root(run_dir) / tag} at step {state.step}")
    log.info(f"world {world} | {len(data.train)} train blocks, {len(data.heldout)} held-out, "
             f"{cfg.data.seq_length} tokens each | mask token id {meta.mask_token_id}")
    if data.summary:
        log.info(data.summary)
    return state


def _lock_run_folder(cfg: Config) -> runlock.RunLock | None:
    """Rank 0 takes the run folder's lock (adapt.train.runlock; released at exit); every rank stops when another
    launch holds it. Returns rank 0's lock."""
    lock = runlock.acquire(cfg.run_dir) if distributed.is_main() else None
    problem = distributed.gather(lock if isinstance(lock, str) else None)[0]
    if problem:
        raise TrainingError(problem)
    return lock


def global_rows(cfg: Config) -> int:
    """Sequences in one step's global batch: micro_batch_size x grad_accum on every rank."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * distributed.world_size()


def global_batch(cfg: Config, step: int, n_blocks: int, mixture=None) -> tuple[torch.Tensor, torch.Generator]:
    """The whole step's block indices across ranks (m * a * world rows) and the generator of its noise.

    Every rank draws the same global batch (a pure function of seed and step) and keeps its own
    rows, so t is stratified over the global batch and a run's numbers do not depend on how many
    ranks share it.
    """
    n, seed = global_rows(cfg), cfg.train.seed
    idx = batch_indices(step, n_blocks, n, 0, 1, seed) if mixture is None else mixture.draw(step, n, seed)
    return idx, rng.generator(cfg.train.seed, "noise", step)


def step_attention(cfg: Config, step: int) -> Attention:
    """The step's attention: one annealed pattern, identical on every rank (DiffuLLaMA), or None once bidirectional."""
    r, length, schedule = (anneal_ratio(step, cfg.attention.anneal_steps), cfg.data.seq_length,
                           cfg.attention.anneal_schedule)
    if schedule == "blocks":  # the block length grows to the objective's target (LLaDA 2.0's warmup)
        block = curriculum_block(objectives.spec_for(cfg).anneal_target(cfg, length), length, r)
        return Attention(None if block >= length else block_causal(length, block), r, schedule, block=block)
    visible = step_visibility(length, r, schedule, rng.generator(cfg.train.seed, "attention", step))
    return Attention(visible, r, schedule)


def train_step(state: State, step: int) -> dict:
    """One optimizer step over micro_batch_size * grad_accum sequences per rank.

    "loss" is the diffusion loss; with the joint causal term (objective.ar_weight alpha > 0) "ar_loss" is the
    clean sequences' causal NLL per scored token, and the step minimises loss + alpha * ar_loss; with distillation
    "distill" is its term per normalised token, added to the loss minimised (never to a bound)."""
    cfg, world, obj, data = state.cfg, distributed.world_size(), state.objective, state.data
    m, a = cfg.train.micro_batch_size, cfg.train.grad_accum
    faults.maybe_stall(step)
    # dropout (lora.dropout) draws from the global RNG: seed it per (step, rank) so a resume replays it
    torch.manual_seed(rng.seed_for(cfg.train.seed, "dropout", step, distributed.rank()))
    idx, gen = global_batch(cfg, step, len(data.train), data.mixture)
    idx = obj.batch_rows(idx)
    x0_all = data.train[idx]
    loss_mask = None if data.train_loss_mask is None else data.train_loss_mask[idx]
    maskable_all = obj.maskable(x0_all, loss_mask)
    noised = obj.corrupt(x0_all, maskable_all, gen)
    count = obj.normaliser(maskable_all, noised.masked)
    n_masked = int(noised.masked.sum())
    mine = slice(distributed.rank() * m * a, (distributed.rank() + 1) * m * a)
    x0 = x0_all[mine]
    noised = noised.rows(mine)
    joint = obj.joint_term(state.forward, obj.scored(x0_all, loss_mask), mine, distributed.all_sum)
    attention = step_attention(cfg, step)
    attention.docs = data.train_docs[idx[mine]] if cfg.attention.document_mask else None
    totals, seen, bad = {"loss": 0.0, "distill": 0.0}, set(), False
    for k in range(a):
        sl = slice(k * m, (k + 1) * m)
        sums = _micro_sums(state, step, x0[sl], noised.rows(sl), attention.rows(sl), joint, sl)
        finite = torch.stack([torch.isfinite(v) for v in sums.values()]).all()
        bad = bad or distributed.all_sum([float(not finite)])[0] > 0  # every rank takes the same branch
        if bad and k == a - 1:
            saved_lrs = _drop_update(state.engine)
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so the step's
        # gradient is d(sum of all token losses / global count). A non-finite loss sends no gradient.
        kept = {name: torch.where(finite, v, 0.0) for name, v in sums.items()}
        loss = (kept["loss"] + kept.get("distill", 0.0)) / count
        if "ar" in kept:
            loss = loss + joint.term(kept["ar"])
        state.engine.backward(loss * world * a)
        state.engine.step()
        seen |= sums.keys()
        for name in totals.keys() & sums.keys():
            totals[name] += sums[name].item() if finite else 0.0
    faults.maybe_nan_weight(step, state.engine)
    if bad:
        if not state.engine.was_step_applied():  # DeepSpeed saw the overflow itself: no scheduler step ran
            for group, lr in zip(state.engine.optimizer.param_groups, saved_lrs):
                group["lr"] = lr
        check_finite_weights(state, f"after the skipped step {step + 1}")
    total, distilled = distributed.all_sum([totals["loss"], totals["distill"]])
    norm = state.engine.get_global_grad_norm()
    extra = ({} if joint is None else {"ar_loss": joint.mean(bad)}) | (
        {"distill": float("nan") if bad else distilled / count} if "distill" in seen else {}) | _rows(data, step, cfg)
    return {"loss": float("nan") if bad else total / count, "masked_tokens": n_masked,
            "anneal_ratio": attention.ratio, "skipped": bad, "lr": state.engine.get_lr()[0],
            "grad_norm": float(norm) if norm is not None and not bad else float("nan"),
            "tokens": m * a * world * cfg.data.seq_length} | extra


def _rows(data, step: int, cfg: Config) -> dict:
    """A mixture's rows per source in the step's global batch (for the log's realised mixture); {} for one source."""
    mix = data.mixture
    if mix is None or len(mix.sizes) < 2:
        return {}
    counts = torch.bincount(mix.sources(step, global_rows(cfg), cfg.train.seed), minlength=len(mix.sizes)).tolist()
    return {"rows": dict(zip(mix.labels, counts))}


def _micro_sums(state: State, step: int, x0: torch.Tensor, part, attention: Attention, joint, rows: slice) -> dict:
    """One micro-batch's forward: its loss sums by name (loss: the diffusion loss; distill: the distillation term;
    ar: the joint causal term's NLL), the terms that are off left out."""
    obj = state.objective
    logits, causal_logits = obj.predict_joint(state.forward, x0, part, attention)
    sums = {"loss": obj.loss_sum(logits, x0, part)}
    if step in faults.nan_steps():
        sums["loss"] = sums["loss"] * float("nan")
    teacher = teacher_logits(state.teacher, state.engine, distributed.device(), obj, x0, part, logits, causal_logits,
                             attention)
    distill = obj.distill_sum(logits, teacher, part)
    if distill is not None:
        sums["distill"] = distill * distill_scale(state.cfg.diffusion.distill.schedule, step, state.cfg.train.max_steps)
    if joint is not None:
        sums["ar"] = joint.loss_sum(x0, rows, attention.docs, causal_logits)
    return sums


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


def _install_early_stop_handler() -> None:
    """Until `fit` takes over, Ctrl-C and SIGTERM raise StoppedBeforeStart (a second one acts as the default)."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise StoppedBeforeStart(signum)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _install_stop_handler(state: State) -> None:
    def handler(signum, frame):
        if state.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        state.stop_requested = True
        if state.step >= state.cfg.train.max_steps:  # training is over and its last checkpoint saved
            state.log.info("stop requested after the last step, whose checkpoint is saved: finishing the evaluation "
                           "and export (Ctrl-C again to abort them; rerunning the same command redoes them)")
        else:
            state.log.info("stop requested: finishing this step, saving a checkpoint, exiting (Ctrl-C again to abort)")
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def save(state: State) -> None:
    check_finite_weights(state, f"at step {state.step}")  # never a NaN written into a checkpoint
    client = {"step": state.step, "skipped_steps": state.skipped,
              "consumed_sequences": state.step * state.cfg.train.micro_batch_size
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
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < cfg.train.max_steps:
            # the last step's bound is the stage's evaluation after training
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
    data, obj = state.data, state.objective
    idx = batch_indices(state.step, len(data.train), 1, 0, 1, state.cfg.train.seed)
    x0 = data.train[idx]
    maskable = obj.maskable(x0, None if data.train_loss_mask is None else data.train_loss_mask[idx])
    xt, _ = corrupt(x0, torch.tensor([0.5]), state.meta.mask_token_id, maskable, torch.Generator().manual_seed(0))
    text = state.tokenizer.decode(xt[0, :64]).replace(state.tokenizer.mask_token, "_")
    state.log.info(f"a training sequence at t=0.5 (first 64 tokens, _ = mask): {text!r}")
