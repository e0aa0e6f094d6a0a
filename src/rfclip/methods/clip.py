"""Vanilla dense CLIP and MaskCLIP."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..dense import FinalAttention, ForwardContext
from .base import Method, register_method

register_method(Method)  # "clip": every hook at its default, i.e. the unmodified ViT with patch tokens kept


@register_method
@dataclasses.dataclass
class MaskCLIP(Method):
    """MaskCLIP (Zhou et al., ECCV 2022): the last block's query-key attention is dropped and each patch keeps its
    own value embedding, i.e. the attention is the identity.

    Read here with the last block's residual and FFN dropped (``keep_residual=False``), the form in which later
    papers (ClearCLIP, NACLIP, FSA) describe it; ``keep_residual=True`` keeps them.
    """

    name = "maskclip"
    description = "MaskCLIP: identity attention (value embeddings) in the last block, no residual/FFN"
    keep_residual: bool = False

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        T = v.shape[2]
        identity = torch.eye(T, device=v.device, dtype=torch.float32).expand(v.shape[0], 1, T, T)  # (B, 1, T, T)
        return FinalAttention(weights=identity, keep_residual=self.keep_residual)
