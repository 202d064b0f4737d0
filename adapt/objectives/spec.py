"""What is asked of an objective before any model exists: the `Spec` protocol (recipe checks, metadata fields,
memory-estimate answers, model-card notes, how its exports decode) and the records it answers with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from adapt.objectives.base import Objective


@dataclass(frozen=True)
class Decoding:
    """How an export must be decoded (adapt.objectives.decoding)."""

    block_length: int
    """0 = the whole sequence at once, any block length allowed; b > 0 = the block length the export must be
    decoded with."""
    clean_causal: bool
    """The clean stream is a causal LM, so the exact speculative decoder (adapt.decode.speculative) applies."""


@dataclass
class CardNotes:
    """What an export's model card says about its objective (adapt.export.card)."""

    tags: tuple[str, ...] = ()
    """Hub tags beyond the diffusion ones."""
    attention: str = ""
    """How the model attends and decodes, one clause; "" = the card's default for whole-sequence models."""
    plain_forward: str = ""
    """What a plain forward pass is (and is not); "" = the default."""
    limits: str = ""
    """An extra limitation line; "" = none."""


@runtime_checkable
class Spec(Protocol):
    """An objective as the code that runs before any model exists sees it: the recipe checks (adapt.recipe.load), the
    config schema (adapt.recipe.config), the training loop's set-up and attention curriculum (adapt.train.loop), the
    memory estimate (adapt.estimate), the export contract and model card (adapt.export) and the decoders
    (adapt.objectives.decoding) ask it, never the run-time `Objective`.

    Built around the registered run-time class it describes (`adapt.objectives.spec_of`); `name`, `sections`,
    `meta_fields`, `build` and `rebuild` are that class's own (they change with its constructor), the rest are the
    spec's answers.
    """

    objective: type
    """The run-time class (adapt.objectives.base.Objective) this spec describes and builds."""
    name: str
    """The objective's registered name (`diffusion.objective`, diffusion.json's `objective`)."""
    sections: dict[str, type]
    """The recipe sections under `diffusion` the objective reads (key -> dataclass; adapt.recipe.config.schema)."""

    def build(self, cfg, meta, blocked: "torch.Tensor") -> "Objective":
        """The training objective of a recipe (adapt.recipe.config.Config) for a model's metadata."""

    def rebuild(self, meta, blocked: "torch.Tensor", backend: str = "sdpa", dtype: str = "fp32") -> "Objective":
        """The objective an export was trained with, for its bound: only what the metadata holds."""

    def meta_fields(self, cfg) -> dict:
        """The diffusion.json fields the objective records from a recipe (its name and its own parameters)."""

    def recipe_problems(self, cfg) -> list[str]:
        """What in a recipe the objective cannot train with, each naming the key and the fix."""

    def export_problems(self, cfg, meta) -> list[str]:
        """What in a recipe disagrees with an export of this objective that the recipe continues from."""

    def anneal_target(self, cfg, length: int) -> int:
        """The block length the `blocks` attention schedule grows to (the whole sequence when there are none)."""

    def forward_positions(self, cfg, length: int) -> int:
        """Positions one training forward runs for sequences of `length` (memory estimates)."""

    def always_masked(self, cfg) -> bool:
        """Whether every training forward passes an attention mask (a dense one under sdpa/eager)."""

    def decode_block(self, meta) -> int:
        """The block length a decoder must use for an export (0: any, the whole sequence by default)."""

    def decoding(self, meta) -> Decoding:
        """How an export must be decoded, from its metadata (a DiffusionMeta or a diffusion.json dict)."""

    def card(self, meta: dict) -> CardNotes:
        """What the model card says about the objective, from an export's diffusion.json."""


def meta_get(meta, key: str, default=None):
    """Field `key` of a DiffusionMeta or of a diffusion.json dict (`default` when absent)."""
    return meta.get(key, default) if isinstance(meta, dict) else getattr(meta, key, default)
