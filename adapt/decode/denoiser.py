"""The denoiser every sampler and evaluator calls: token ids in, log p_theta(x0_i | x_t) out.

It applies the shift (row i predicts token i from the logits at i-1), blocks ids the model must
never predict (the mask token, embedding padding rows), and counts model calls (NFE).

`PrefixCachedDenoiser` keeps the keys/values of the given prompt and runs the model on the rest
only. Under bidirectional attention this is an APPROXIMATION: the prompt's keys/values are
computed from the prompt alone, without seeing the tokens being generated, whereas the exact
model lets every prompt position attend to the whole sequence. The generated positions still
attend to the prompt and to each other. With a causal export (meta.bidirectional False) it is exact.
bench/sampling_speed.py measures the difference on the embedded model.
"""
from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from adapt.model.attention import to_additive
from adapt.objectives.diffusion import blocked_vocab
from adapt.model.causal import DiffusionMeta, cache_kwarg, forward_logits

_CACHE_BACKENDS = ("eager", "sdpa")


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
        self._blocked_ids = self.blocked.nonzero().flatten()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def backend(self) -> str:
        return getattr(self.model.config, "_attn_implementation", "sdpa")

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.backend == "eager" and self.meta.bidirectional:
            # eager builds a causal mask when given none; an explicit all-visible mask keeps it bidirectional
            return to_additive(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device),
                               self.model.dtype)
        return None

    def _log_probs_into(self, out: torch.Tensor, logits: torch.Tensor) -> None:
        """out (B, R, V) float32 view <- log-softmax of logits (B, R, V) with blocked ids at -inf.

        Same values as adapt.objectives.diffusion.denoiser_log_probs, without the temporaries: blocked columns
        are filled in place and the softmax writes straight into `out` (a sampler pays for this at
        every model call; see bench/sampling_speed.py).
        """
        logits = logits.float()
        logits.index_fill_(-1, self._blocked_ids, -math.inf)
        for b in range(out.shape[0]):
            torch.log_softmax(logits[b], -1, out=out[b])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        x = x.to(self.device)
        logits = forward_logits(self.model, x, self._mask(x))  # (B, L, V), row j predicts token j+1 with the shift
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        if self.shift:  # row i of the output predicts token i; row 0 (never used) repeats row 0
            self._log_probs_into(out[:, 1:], logits[:, :-1])
            out[:, 0] = out[:, 1]
        else:
            self._log_probs_into(out, logits)
        return out


class PrefixCachedDenoiser(Denoiser):
    """A `Denoiser` that reuses the keys/values of the prefix given in every row (see module docstring).

    Call `update_prefix(x)` to (re)build the cache from the longest prefix of x (B, L) that holds no
    mask in any row; with the shift the prefix's last token is left out of the cache, so the logits
    that predict the first generated token are recomputed at every call. Calls whose prefix differs
    from the cached one fall back to the full model. Rows of prefix positions in the output are
    one-hot on the given token (they are never sampled). Prefix builds count as model calls (`nfe`).
    """

    def __init__(self, model: torch.nn.Module, meta: DiffusionMeta):
        super().__init__(model, meta)
        if self.backend not in _CACHE_BACKENDS:
            raise ValueError(f"the prefix cache needs attn_implementation in {_CACHE_BACKENDS} (a 4D mask "
                             f"over cached keys), got {self.backend!r}; load the model with sdpa or eager")
        self.cache: DynamicCache | None = None
        self.prefix: torch.Tensor | None = None
        self.cache_arg = cache_kwarg(model)

    @property
    def cache_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    @torch.no_grad()
    def update_prefix(self, x: torch.Tensor) -> None:
        """Cache the keys/values of x's given prefix if it grew since the last build."""
        x = x.to(self.device)
        masked_cols = (x == self.mask_id).any(0).nonzero()
        first = int(masked_cols[0]) if len(masked_cols) else x.shape[1]
        n = first - 1 if self.shift else first
        if n <= 0 or (n == self.cache_len and torch.equal(self.prefix, x[:, :n])):
            return
        cache = DynamicCache(config=self.model.config)
        self.nfe += 1
        self.model(input_ids=x[:, :n], attention_mask=self._mask(x[:, :n]), use_cache=True, logits_to_keep=1,
                   **{self.cache_arg: cache})
        self.cache, self.prefix = cache, x[:, :n].clone()

    def _tail_mask(self, q: int, kv: int) -> torch.Tensor:
        """(1, 1, q, kv) additive mask of the last q positions over all kv keys."""
        visible = torch.ones(q, kv, dtype=torch.bool, device=self.device)
        if not self.meta.bidirectional:
            visible = visible.tril(kv - q)
        return to_additive(visible, self.model.dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        n = self.cache_len
        if n == 0 or x.shape[0] != self.prefix.shape[0] or not torch.equal(x[:, :n], self.prefix):
            return super().__call__(x)
        self.nfe += 1
        B, L = x.shape
        out = self.model(input_ids=x[:, n:], attention_mask=self._tail_mask(L - n, L), use_cache=True,
                         **{self.cache_arg: self.cache}).logits  # (B, L - n, V): positions n .. L-1
        self.cache.crop(-(L - n))
        logp = torch.full((B, L, out.shape[-1]), -math.inf, dtype=torch.float32, device=self.device)
        first = n + 1 if self.shift else n
        logp[:, :first].scatter_(-1, x[:, :first, None], 0.0)
        self._log_probs_into(logp[:, first:], out[:, :-1] if self.shift else out)
        return logp
