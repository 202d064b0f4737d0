"""A draft head for self-speculative decoding: each draft conditioned on the token drawn before it.

The speculative decoder (adapt.sampling.speculative) drafts the rest of a block from the noised stream in the call
that draws the block's next token e from the clean stream, so the draft for e + 1 is made without knowing x_e,
the one for e + 2 without x_e and x_{e+1}: a 2-, 3-, 4-ahead prediction, which the clean stream then rejects most
of the time. Apple's "Your LLM knows the future" (2025) conditions each mask-token draft on the token sampled
before it through a small sampler head; EAGLE (Li et al. 2024) feeds a draft head the feature that produced the
previous token. This head does both, on the export's frozen features:

    f_j = h_j + W_out silu(W_in rmsnorm([h_j ; E(x_{j-1}) ; f_{j-1}])),    q(x_j) = softmax(lm_head(f_j))

h_j is the noised stream's final feature (the input of the LM head) at row j - 1 (the shift: row j - 1 predicts
column j), E the model's token embedding, f_{j-1} the previous draft's feature, and for the first draft of a call
the clean stream's feature that drew x_e. W_out starts at zero, so an untrained head drafts exactly as the
noised stream does. Training (`python -m adapt.draft_head EXPORT`) fits it to the clean stream's own next-token
distributions (the decoder's acceptance is sum_x min(p, q) at T = 1, largest when q = p), by the KL from the clean
stream, on the training split of the export's corpus, with the data's tokens as the previous ones (the decoder
draws the next draft only after the previous one, and counts it only if that one is kept). The export's weights
never change; the head is written beside them as draft_head.safetensors, which the speculative decoder uses when
present (the output stays exact: the head only changes which drafts are proposed).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from adapt.attention import to_additive
from adapt.diffusion import denoiser_log_probs, distill_kl

HEAD_FILE = "draft_head.safetensors"
ATTR = "adapt_draft_head"
"""The attribute a loaded model carries its export's head under (a plain attribute: not in the model's state)."""


class DraftHead(nn.Module):
    """f_j = h_j + W_out silu(W_in rmsnorm([h_j ; e_{j-1} ; f_{j-1}])), all (..., D)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.hidden, self.width = hidden, width
        self.norm = nn.RMSNorm(3 * hidden)
        self.inp = nn.Linear(3 * hidden, width)
        self.out = nn.Linear(width, hidden)
        nn.init.zeros_(self.out.weight)  # untrained: the noised stream's own drafts
        nn.init.zeros_(self.out.bias)

    def forward(self, noised: torch.Tensor, prev_emb: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        """In the head's own dtype (features of a bf16 model feed an fp32 head in training)."""
        dtype = self.inp.weight.dtype
        noised = noised.to(dtype)
        x = torch.cat([noised, prev_emb.to(dtype), carry.to(dtype)], -1)
        return noised + self.out(F.silu(self.inp(self.norm(x))))


def save_head(head: DraftHead, folder: Path, info: dict) -> Path:
    """Write the head into `folder` (atomically: a partial file never has the final name)."""
    from safetensors.torch import save_file

    path = Path(folder) / HEAD_FILE
    tmp = path.with_name(f".{HEAD_FILE}.partial")
    meta = {"hidden": str(head.hidden), "width": str(head.width), "info": json.dumps(info)}
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_head(folder: str | Path, hidden: int) -> DraftHead | None:
    """The head saved in an export folder, or None when it has none; ValueError when it does not fit the model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if int(meta.get("hidden", -1)) != hidden:
        raise ValueError(f"{path} was trained for features of width {meta.get('hidden')}, the model's are {hidden}; "
                         f"train it again with `python -m adapt.draft_head {folder}` or delete it")
    head = DraftHead(hidden, int(meta["width"]))
    head.load_state_dict(load_file(str(path)))
    return head.eval().requires_grad_(False)


def attach(model: nn.Module, head: DraftHead | None) -> None:
    """Give `model` its draft head (None removes it) without making it part of the model's weights."""
    object.__setattr__(model, ATTR, head)


def attached(model: nn.Module) -> DraftHead | None:
    return model.__dict__.get(ATTR)


@contextlib.contextmanager
def captured_features(model: nn.Module):
    """Yields a list that receives, for each forward inside the block, the LM head's input (B, Q, D)."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    lm_head = model.get_output_embeddings()
    return lm_head(features.to(lm_head.weight.dtype))


@dataclass
class Chains:
    """Draft chains of one length m (blocks whose next token is at offset k = b - 1 - m), n of them.
    noised (n, m, D): the noised rows j - 1 drafting j; prev (n, m): x_{j-1}; carry (n, D): the clean feature
    that drew the first x_e; target (n, m, D): the clean rows j - 1 (the clean stream's p(x_j | x_<j));
    answer (n, m): x_j."""

    noised: torch.Tensor
    prev: torch.Tensor
    carry: torch.Tensor
    target: torch.Tensor
    answer: torch.Tensor

    @staticmethod
    def cat(parts: list["Chains"]) -> "Chains":
        return Chains(*(torch.cat([getattr(p, f) for p in parts]) for f in ("noised", "prev", "carry", "target",
                                                                           "answer")))

    def __len__(self) -> int:
        return len(self.prev)

    def take(self, idx: torch.Tensor) -> "Chains":
        return Chains(self.noised[idx], self.prev[idx], self.carry[idx], self.target[idx], self.answer[idx])

    def to(self, device) -> "Chains":
        return Chains(*(getattr(self, f).to(device) for f in ("noised", "prev", "carry", "target", "answer")))


@torch.no_grad()
def draft_chains(model: nn.Module, meta, x0: torch.Tensor, k: int) -> Chains:
    """The decoder's state at every block of x0 (B, L) whose first k tokens are decided: one forward over [x_t | x_0]
    under the export's block mask, x_t masking each block from offset k on. -> the chains drafting offsets
    k + 1 .. b - 1 of every block (block 0 only for k >= 1: at k = 0 its next token would be BOS, which is given)."""
    from adapt.objectives.block import block_visibility

    b, (batch, length) = meta.block_length, x0.shape
    offset = torch.arange(length, device=x0.device) % b
    xt = torch.where(offset[None] >= k, torch.full_like(x0, meta.mask_token_id), x0)
    see = block_visibility(length, b, x0.device, clean_causal=True, noised_causal=meta.noised_attention == "causal")
    pos = torch.arange(length, device=x0.device).repeat(2)[None].expand(batch, -1)
    with captured_features(model) as seen:
        model(input_ids=torch.cat([xt, x0], 1), attention_mask=to_additive(see, model.dtype),
              position_ids=pos, use_cache=False)
    feats = seen[0]
    starts = torch.arange(b if k == 0 else 0, length, b, device=x0.device)  # block 0 has no clean row before BOS
    e = starts + k
    rows = e[:, None] + torch.arange(b - 1 - k, device=x0.device)[None]  # (blocks, m): rows j - 1
    return Chains(noised=feats[:, rows].flatten(0, 1), prev=x0[:, rows].flatten(0, 1),
                  carry=feats[:, length + e - 1].flatten(0, 1), target=feats[:, length + rows].flatten(0, 1),
                  answer=x0[:, rows + 1].flatten(0, 1))


def unroll(head: DraftHead | None, model: nn.Module, chains: Chains) -> list[torch.Tensor]:
    """The draft features f_j of every step of the chains (teacher-forced previous tokens); no head: h_j."""
    if head is None:
        return list(chains.noised.unbind(1))
    emb, carry, out = model.get_input_embeddings(), chains.carry, []
    for s in range(chains.prev.shape[1]):
        carry = head(chains.noised[:, s], emb(chains.prev[:, s]), carry)
        out.append(carry)
    return out


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


# --- training ---------------------------------------------------------------------------------------------------

def collect(model: nn.Module, meta, rows: torch.Tensor, batch: int, ks: list[int],
            every_k: bool = False) -> dict[int, Chains]:
    """Chains of every k in `ks`, from the rows (N, L) in batches, computed on the model's device and kept on the
    CPU; the k of a batch cycles through `ks`, or with every_k each batch gives the chains of every k."""
    from adapt.metrics import Progress

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
    from adapt.metrics import Progress

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
