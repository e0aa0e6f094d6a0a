"""ClearCLIP (Lan et al., ECCV 2024): q-q attention, no residual, no FFN in the last block."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..dense import FinalAttention, ForwardContext, softmax_attention
from .base import Method, register_method


@register_method
@dataclasses.dataclass
class ClearCLIP(Method):
    """Last block ``y = O(softmax(s q q^T))``: self-self query attention, residual and FFN dropped."""

    name = "clearclip"
    description = "ClearCLIP: q-q attention in the last block, no residual/FFN"
    reduced_last_block = True

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        return FinalAttention(weights=softmax_attention(q, q, ctx.scale), keep_residual=False)
