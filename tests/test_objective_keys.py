"""What an objective owns: how its exports decode (adapt.objectives.decoding)."""
from __future__ import annotations

from adapt import objectives
from adapt.model import DiffusionMeta
from adapt.objectives import Decoding


def test_decoding_asks_the_exports_objective():
    whole = DiffusionMeta(mask_token_id=1, real_vocab_size=8)
    block = DiffusionMeta(mask_token_id=1, real_vocab_size=8, objective="block", block_length=4,
                          clean_attention="causal")
    assert objectives.decoding(whole) == Decoding(block_length=0, clean_causal=False)
    assert objectives.decoding(block) == Decoding(block_length=4, clean_causal=True)
    # a diffusion.json dict, and one written before objectives had names (named by its block length)
    assert objectives.decoding({"block_length": 8, "clean_attention": "block"}) == Decoding(8, False)
    assert objectives.decoding({"block_length": 0, "clean_attention": "causal"}) == Decoding(0, False)
