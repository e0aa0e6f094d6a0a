"""NACLIP (Hajimiri et al., WACV 2025) and the key-key self-proxy baseline ``kk``."""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from ..constants import NACLIP_GAUSSIAN_STD
from ..dense import FinalAttention, ForwardContext, softmax_attention
from .base import Method, register_method
from .options import coerce_fields


@functools.lru_cache(maxsize=16)
def neighbourhood_prior(grid: tuple[int, int], std: float) -> Tensor:
    """NACLIP's Omega over 1+N tokens: ``exp(-|p - p'|^2 / (2 std^2))`` between patches on the grid, 0 in the CLS
    row and column, not normalised (diagonal 1). Returns (1+N, 1+N) fp32 on CPU (cached per grid)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (N, 2)
    dist2 = torch.cdist(pos, pos).pow(2)  # (N, N)
    omega = torch.zeros(h * w + 1, h * w + 1)
    omega[1:, 1:] = torch.exp(-dist2 / (2 * std**2))
    return omega


@register_method
@dataclasses.dataclass
class NACLIP(Method):
    """Last block ``y = O(softmax(s k k^T + Omega))`` (Omega not scaled by s), no residual, no FFN."""

    name = "naclip"
    description = "NACLIP: k-k attention plus a Gaussian neighbourhood prior in the last block, no residual/FFN"
    reduced_last_block = True
    gaussian_std: float = NACLIP_GAUSSIAN_STD

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not self.gaussian_std > 0:  # 0 divides by zero, NaN gives NaN scores
            raise ValueError(f"gaussian_std must be a finite number above 0, got {self.gaussian_std!r}")

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        omega = neighbourhood_prior(tuple(ctx.grid), float(self.gaussian_std)).to(k.device)
        return FinalAttention(weights=softmax_attention(k, k, ctx.scale, bias=omega), keep_residual=False)


@register_method
@dataclasses.dataclass
class KeyKey(Method):
    """Key-key self-proxy: last block ``y = O(softmax(s k k^T))``, no residual, no FFN (NACLIP's ``kk`` ablation).

    With ``layer_average=True`` the last block attends with the key-key attention averaged over all layers, per
    head: the baseline of RF-CLIP's ablations (Table 4 (I), Table 7 (IV) proxy) with every RF step off.
    """

    name = "kk"
    description = "key-key attention in the last block, no residual/FFN (layer_average=True: averaged over layers)"
    reduced_last_block = True
    layer_average: bool = False

    def attention(self, ctx: ForwardContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        if self.layer_average and layer < ctx.num_layers - 1:
            kk = softmax_attention(k, k, ctx.scale)  # (B, H, T, T)
            ctx.store["kk_sum"] = kk if "kk_sum" not in ctx.store else ctx.store["kk_sum"] + kk
        return None  # intermediate layers keep CLIP's own attention

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        kk = softmax_attention(k, k, ctx.scale)
        if self.layer_average:
            kk = (ctx.store.pop("kk_sum", 0) + kk) / ctx.num_layers
        return FinalAttention(weights=kk, keep_residual=False)
