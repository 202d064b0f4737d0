"""The decoder's draft chains as training and measurement read them: one forward over [x_t | x_0] under the
export's block mask gives, at every block, the features the speculative decoder drafts from (adapt.draft_head)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapt.model.attention import to_additive
from adapt.draft_head.head import DraftHead, captured_features


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
