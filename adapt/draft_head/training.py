"""Fitting a draft head to the clean stream's next-token distributions, and measuring how often its drafts are
kept (adapt.draft_head)."""
from __future__ import annotations

import torch
from torch import nn

from adapt.objectives.diffusion import denoiser_log_probs, distill_kl
from adapt.draft_head.chains import Chains, draft_chains, unroll
from adapt.draft_head.head import DraftHead, head_logits


def chain_loss(head: DraftHead, model: nn.Module, chains: Chains, blocked: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_clean || q_head) over every drafted position of the chains."""
    feats = unroll(head, model, chains)
    kl = [distill_kl(head_logits(model, f), head_logits(model, chains.target[:, s]), blocked)
          for s, f in enumerate(feats)]
    return torch.cat(kl).mean()


@torch.no_grad()
def acceptance(head: DraftHead | None, model: nn.Module, chains: Chains, blocked: torch.Tensor) -> dict:
    """Per drafted offset s (1 = the token after x_e): the mean sum_x min(p, q) (a draft's chance to be kept at
    T = 1, its earlier drafts given) and how often q's argmax is p's (greedy), with the head or without (None)."""
    out, chains = {}, chains.to(model.get_input_embeddings().weight.device)
    for s, f in enumerate(unroll(head, model, chains)):
        q = denoiser_log_probs(head_logits(model, f), blocked).exp()
        p = denoiser_log_probs(head_logits(model, chains.target[:, s]), blocked).exp()
        out[s + 1] = {"kept_t1": float(torch.minimum(p, q).sum(-1).mean()),
                      "greedy": float((q.argmax(-1) == p.argmax(-1)).float().mean()), "n": len(q)}
    return out


def collect(model: nn.Module, meta, rows: torch.Tensor, batch: int, ks: list[int],
            every_k: bool = False) -> dict[int, Chains]:
    """Chains of every k in `ks`, from the rows (N, L) in batches, computed on the model's device and kept on the
    CPU; the k of a batch cycles through `ks`, or with every_k each batch gives the chains of every k."""
    from adapt.train.metrics import Progress

    device = model.get_input_embeddings().weight.device
    parts: dict[int, list[Chains]] = {k: [] for k in ks}
    starts = range(0, len(rows), batch)
    progress = Progress("draft head features", len(starts))
    for i, start in enumerate(starts):
        x0 = rows[start:start + batch].to(device)
        for k in ks if every_k else [ks[i % len(ks)]]:
            parts[k].append(draft_chains(model, meta, x0, k).to("cpu"))
        progress.update()
    return {k: Chains.cat(p) for k, p in parts.items() if p}


def heldout_acceptance(head, model, held: dict[int, Chains], blocked) -> dict:
    """acceptance() per k of the held-out chains, keyed "k=K" then by drafted offset."""
    return {f"k={k}": acceptance(head, model, c, blocked) for k, c in held.items()}


def fit(head: DraftHead, model: nn.Module, train: dict[int, Chains], blocked: torch.Tensor, epochs: int,
        lr: float, chains_per_step: int, generator: torch.Generator, say=print) -> list[float]:
    """AdamW on the mean KL, minibatches of `chains_per_step` chains of one length, lengths interleaved; -> the
    mean loss of each epoch."""
    from adapt.train.metrics import Progress

    opt, device = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0), head.inp.weight.device
    losses = []
    for epoch in range(epochs):
        order = [(k, idx) for k, c in train.items()
                 for idx in torch.randperm(len(c), generator=generator).split(chains_per_step)]
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        total = 0.0
        progress = Progress(f"draft head epoch {epoch + 1}", len(order), "steps")
        for k, idx in order:
            loss = chain_loss(head, model, train[k].take(idx).to(device), blocked)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            progress.update()
        losses.append(total / max(len(order), 1))
        say(f"draft head: epoch {epoch + 1}/{epochs}, mean KL {losses[-1]:.4f}")
    return losses
