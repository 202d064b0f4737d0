"""Generative perplexity: the exact NLL of token sequences under a judge causal LM.

The judge scores continuations given their prefix (BOS alone for unconditional samples). When its
tokenizer is the model's (the parent is the default judge), token ids are scored as they are;
otherwise prefix and continuation are decoded and re-encoded with the judge's tokenizer, and the
perplexity is per judge token. Dataset perplexity is exp(total NLL / total tokens), 001_*.txt
appendix A.1; the mean of per-sequence perplexities (the order used by SEDD) is reported beside it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from adapt.model.causal import start_token


def _same_vocab(a, b) -> bool:
    """True when every token of tokenizer `a` has the same id in tokenizer `b`."""
    if a is b:
        return True
    vb = b.get_vocab()
    return all(vb.get(tok) == i for tok, i in a.get_vocab().items())


def perplexity_summary(nlls: Sequence[torch.Tensor]) -> dict[str, float]:
    """Dataset perplexity of per-sequence token NLLs (each (T_i,) nats) with a 95% CI over sequences."""
    nlls = [n for n in nlls if n.numel()]
    if not nlls:
        raise ValueError("no tokens to score")
    total = sum(float(n.sum()) for n in nlls)
    tokens = sum(n.numel() for n in nlls)
    per_seq = torch.tensor([float(n.mean()) for n in nlls], dtype=torch.float64)
    mean_nll = total / tokens
    ci = 1.96 * float(per_seq.std()) / math.sqrt(len(nlls)) if len(nlls) > 1 else float("nan")
    return {"nll": mean_nll, "ppl": math.exp(mean_nll), "ppl_low": math.exp(mean_nll - ci),
            "ppl_high": math.exp(mean_nll + ci), "ppl_seq_mean": float(per_seq.exp().mean()),
            "tokens": tokens, "sequences": len(nlls)}


class Judge:
    """A causal LM that scores continuations: `token_nll` and `perplexity`."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, source_tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source_tokenizer
        self.same_vocab = _same_vocab(tokenizer, source_tokenizer)
        start = start_token(tokenizer)
        self.start_id = 0 if start is None else start

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_judge(self, prefix: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Source ids -> judge ids (identity for a shared vocabulary); the judge prefix starts with its BOS."""
        if self.same_vocab:
            return list(prefix), list(cont)
        text_p = self.source.decode(prefix, skip_special_tokens=True)
        text_c = self.source.decode(cont, skip_special_tokens=True)
        enc = self.tokenizer(text_p, add_special_tokens=False)["input_ids"] if text_p else []
        return [self.start_id] + enc, self.tokenizer(text_c, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def token_nll(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                  batch_size: int = 8) -> list[torch.Tensor]:
        """-log p_judge(c_j | prefix, c_<j) of every continuation token -> list of (T_i,) float64 tensors."""
        pairs = [self._to_judge(list(p), list(c)) for p, c in zip(prefixes, continuations)]
        if any(not p for p, _ in pairs):
            raise ValueError("every prefix needs at least one token (BOS)")
        out = []
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            seqs = [p + c for p, c in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            attn = torch.zeros(len(seqs), width, dtype=torch.long)
            for j, s in enumerate(seqs):  # right padding keeps positions of real tokens unchanged
                ids[j, :len(s)] = torch.tensor(s)
                attn[j, :len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                use_cache=False).logits
            for j, (p, c) in enumerate(chunk):
                rows = logits[j, len(p) - 1:len(p) + len(c) - 1].float()
                out.append(F.cross_entropy(rows, torch.tensor(c, device=rows.device), reduction="none")
                           .double().cpu())
        return out

    def perplexity(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                   batch_size: int = 8) -> dict[str, float]:
        """Generative perplexity of the continuations given their prefixes (see `perplexity_summary`)."""
        summary = perplexity_summary(self.token_nll(prefixes, continuations, batch_size))
        summary["judge"] = self.name
        return summary
