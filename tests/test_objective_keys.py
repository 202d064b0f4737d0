"""What an objective owns: its recipe keys and how its exports decode. A new key added to one objective from this
file alone (a subclass of its section with a ranged field, a subclass of the objective that reads it, one registry
entry) is validated, saved in the run's resolved config, and written to the export's diffusion.json: no module of
the package changes."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from adapt import objectives
from adapt.recipe.config import ConfigError, from_dict, to_yaml
from adapt.export.contract import read_meta, save_meta
from adapt.recipe.limits import ranged
from adapt.model.causal import DiffusionMeta
from adapt.objectives import OBJECTIVES, BlockDiffusion, Decoding
from adapt.objectives.block import BlockConfig
from adapt.recipe.load import load_config


@dataclass
class StridedConfig(BlockConfig):
    """Block diffusion's keys and one more."""

    stride: int = ranged(2, 1, 64)
    """A new key with its range, declared beside the field."""


class StridedBlocks(BlockDiffusion):
    """Block diffusion that records its stride (reads diffusion.block.stride)."""

    name = "strided"
    sections = {**BlockDiffusion.sections, "block": StridedConfig}

    def __init__(self, *args, stride: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.stride = stride

    @classmethod
    def options(cls, cfg) -> dict:
        return super().options(cfg) | {"stride": cfg.diffusion.block.stride}

    @classmethod
    def meta_fields(cls, cfg) -> dict:
        return super().meta_fields(cfg) | {"stride": cfg.diffusion.block.stride}


BASE = ["diffusion.objective=strided", "diffusion.block.length=4", "attention.anneal_steps=0"]


@pytest.fixture
def strided(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, StridedBlocks.name, StridedBlocks)


def test_a_new_key_is_validated_saved_and_exported(strided, tmp_path):
    cfg = load_config(None, [*BASE, "diffusion.block.stride=8"])
    assert cfg.diffusion.block.stride == 8 and load_config(None, BASE).diffusion.block.stride == 2
    for bad in ("diffusion.block.stride=0", "diffusion.block.stride=65", "diffusion.block.stride=x"):
        with pytest.raises(ConfigError, match="`diffusion.block.stride` must be"):
            load_config(None, [*BASE, bad])
    with pytest.raises(ConfigError, match="unknown key `diffusion.block.stride`"):  # block diffusion has none
        load_config(None, ["diffusion.objective=block", "diffusion.block.length=4", "diffusion.block.stride=8"])
    # the run's resolved config (as training writes it) holds it, and reads back (a resumed run, recipe.yaml)
    saved = yaml.safe_load(to_yaml(cfg))
    assert saved["diffusion"]["block"]["stride"] == 8
    assert from_dict(saved).diffusion.block.stride == 8
    # the export's metadata: written beside the usual fields, read back, the usual fields unchanged
    meta = DiffusionMeta(mask_token_id=1, real_vocab_size=8).with_fields(StridedBlocks.meta_fields(cfg))
    save_meta(tmp_path, meta)
    written = yaml.safe_load((tmp_path / "diffusion.json").read_text())
    assert written["stride"] == 8 and written["block_length"] == 4 and written["objective"] == "strided"
    assert read_meta(tmp_path).extra == {"stride": 8} and objectives.meta_class(read_meta(tmp_path)) is StridedBlocks
    assert objectives.from_config(cfg, meta, None).stride == 8


def test_decoding_asks_the_exports_objective():
    whole = DiffusionMeta(mask_token_id=1, real_vocab_size=8)
    block = DiffusionMeta(mask_token_id=1, real_vocab_size=8, objective="block", block_length=4,
                          clean_attention="causal")
    assert objectives.decoding(whole) == Decoding(block_length=0, clean_causal=False)
    assert objectives.decoding(block) == Decoding(block_length=4, clean_causal=True)
    # a diffusion.json dict, and one written before objectives had names (named by its block length)
    assert objectives.decoding({"block_length": 8, "clean_attention": "block"}) == Decoding(8, False)
    assert objectives.decoding({"block_length": 0, "clean_attention": "causal"}) == Decoding(0, False)
