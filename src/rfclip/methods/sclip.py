"""SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..dense import FinalAttention, ForwardContext, softmax_attention
from .base import Method, register_method


@register_method
@dataclasses.dataclass
class SCLIP(Method):
    """Last block attention ``softmax(s q q^T) + softmax(s k k^T)``: the sum of two row-stochastic maps, not
    renormalised (rows sum to 2), with the residual and FFN kept, as in SCLIP's released code (``csa=True``)."""

    name = "sclip"
    description = "SCLIP: q-q plus k-k attention in the last block, residual and FFN kept"

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        weights = softmax_attention(q, q, ctx.scale) + softmax_attention(k, k, ctx.scale)  # (B, H, T, T)
        return FinalAttention(weights=weights, keep_residual=True)
