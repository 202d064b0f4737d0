"""The draft head module (see adapt.draft_head), its file in an export folder, and the features it reads."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from adapt.export.contract import HEAD_FILE
from adapt.model.causal import ModelLoadError


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


def load_draft_head(folder: str | Path, model: nn.Module) -> DraftHead | None:
    """The export's draft head for the speculative decoder, on `model`'s device in its dtype, or None when the folder
    has none; ModelLoadError naming the fix when its file does not load."""
    from safetensors import SafetensorError

    try:
        head = load_head(folder, model.config.hidden_size)
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as err:
        raise ModelLoadError(f"{Path(folder) / HEAD_FILE} does not load as a draft head ({str(err).splitlines()[0]}); "
                             f"train it again with `python -m adapt.draft_head {folder}`, or delete it") from None
    weight = model.get_input_embeddings().weight
    return None if head is None else head.to(device=weight.device, dtype=weight.dtype)


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
