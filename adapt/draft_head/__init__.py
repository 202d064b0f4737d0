"""A draft head for self-speculative decoding: each draft conditioned on the token drawn before it.

The speculative decoder (adapt.decode.speculative) drafts the rest of a block from the noised stream in the call
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
never change; the head is written beside them as draft_head.safetensors; `load_draft_head(EXPORT, model)` reads
it, and the speculative decoder drafts through the head it is given (the output stays exact: the head only changes
which drafts are proposed).

    head.py      the module, its file in an export folder (save_head, load_head, load_draft_head), its features
    chains.py    the draft chains training reads (draft_chains, unroll)
    training.py  the KL fit and the acceptance it is judged by (fit, acceptance, collect)
"""
from adapt.draft_head.chains import Chains, draft_chains, unroll
from adapt.draft_head.head import DraftHead, captured_features, head_logits, load_draft_head, load_head, save_head
from adapt.draft_head.training import acceptance, chain_loss, collect, fit, heldout_acceptance

__all__ = ["Chains", "DraftHead", "acceptance", "captured_features", "chain_loss", "collect", "draft_chains", "fit",
           "head_logits", "heldout_acceptance", "load_draft_head", "load_head", "save_head", "unroll"]
