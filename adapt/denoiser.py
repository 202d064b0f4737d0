"""The denoiser every sampler and evaluator calls: token ids in, log p_theta(x0_i | x_t) out.

It applies the shift (row i predicts token i from the logits at i-1), blocks ids the model must
never predict (the mask token, embedding padding rows), and counts model calls (NFE).
"""
from __future__ import annotations

import torch

from adapt.attention import to_additive
from adapt.diffusion import blocked_vocab, denoiser_log_probs, prediction_logits
from adapt.model import DiffusionMeta, forward_logits


class Denoiser:
    """Callable (B, L) long -> (B, L, V) float32 log-probabilities, aligned so row i predicts token i."""

    def __init__(self, model: torch.nn.Module, meta: DiffusionMeta):
        self.model = model
        self.meta = meta
        self.mask_id = meta.mask_token_id
        self.shift = meta.shift
        self.nfe = 0
        rows = model.get_output_embeddings().weight.shape[0]
        self.blocked = blocked_vocab(rows, meta.real_vocab_size, meta.mask_token_id, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        eager = getattr(self.model.config, "_attn_implementation", "sdpa") == "eager"
        if eager and self.meta.bidirectional:
            # eager builds a causal mask when given none; an explicit all-visible mask keeps it bidirectional
            return to_additive(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device),
                               self.model.dtype)
        return None

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (B, L, V) logits aligned so row i predicts token i (one model call)."""
        self.nfe += 1
        x = x.to(self.device)
        return prediction_logits(forward_logits(self.model, x, self._mask(x)), self.shift)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return denoiser_log_probs(self.logits(x), self.blocked)
