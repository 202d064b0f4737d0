"""The two halves of an objective: its spec answers before any model exists, for a subclass registered alone too."""
from __future__ import annotations

from adapt import objectives
from adapt.model.causal import DiffusionMeta
from adapt.objectives import OBJECTIVES, BlockDiffusion, MaskedDiffusion, Objective, Spec
from adapt.recipe.load import load_config


class Renamed(MaskedDiffusion):
    name = "renamed"


def test_the_spec_describes_the_class_it_is_built_around(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, Renamed.name, Renamed)
    cfg = load_config(None, ["diffusion.objective=renamed"])
    spec = objectives.spec_for(cfg)
    assert isinstance(spec, Spec) and spec.objective is Renamed and spec.name == "renamed"
    assert spec.meta_fields(cfg)["objective"] == "renamed" and spec.sections == MaskedDiffusion.sections
    meta = DiffusionMeta(mask_token_id=1, real_vocab_size=8).with_fields(spec.meta_fields(cfg))
    assert objectives.spec_for_meta(meta).objective is Renamed
    built = spec.build(cfg, meta, None)
    assert type(built) is Renamed and isinstance(built, Objective)
    assert type(objectives.for_meta(meta, None)) is Renamed


def test_block_diffusion_answers_for_its_blocks():
    cfg = load_config(None, ["diffusion.objective=block", "diffusion.block.length=4", "attention.anneal_steps=0"])
    spec = objectives.spec_for(cfg)
    assert spec.objective is BlockDiffusion and spec.forward_positions(cfg, 32) == 64 and spec.always_masked(cfg)
    assert spec.anneal_target(cfg, 32) == 4 and spec.anneal_target(cfg, 2) == 2
    whole = objectives.spec_of(MaskedDiffusion)
    assert whole.forward_positions(cfg, 32) == 32 and not whole.always_masked(cfg)
    assert whole.anneal_target(cfg, 32) == 32
    assert spec.decode_block({"block_length": 4}) == 4 and whole.decode_block({"block_length": 4}) == 0
