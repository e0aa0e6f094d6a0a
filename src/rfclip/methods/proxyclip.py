"""ProxyCLIP (Lan et al., ECCV 2024): the last block attends with a proxy attention from a vision foundation model.

Last block (spec fsa.md §2, ProxyCLIP's released code): CLIP's q and k are not used; the values of the patch tokens
are upsampled bilinearly to the VFM's patch grid; the attention is

    S = Ĝᵀ Ĝ (cosine similarities of the VFM patch features), μ = mean(S) per crop,
    L = γ (S − β μ),  L < 0 -> −inf,  A = softmax(L)          (one map shared by all heads)

and the block has no residual and no FFN. The output tokens live on the VFM grid (no CLS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import PROXY_BETA, PROXY_GAMMA
from ..dense import FinalAttention, ForwardContext, no_autocast
from .base import Method, UsesVFM, register_method


def proxy_attention(features: Tensor, beta: float = PROXY_BETA, gamma: float = PROXY_GAMMA) -> Tensor:
    """ProxyCLIP's attention from VFM patch features (B, N, c): returns (B, 1, N, N) fp32, rows sum to 1.

    μ is the mean of all N x N similarities of each crop (diagonal included); entries with γ(S − βμ) < 0 get
    weight 0 (strict ``<``: zeros are kept). The diagonal is never pruned: the reference keeps it anyway unless
    μ > 1/β (a nearly uniform crop), where its rows would be all −inf and give NaN; here they keep the patch itself.
    """
    with no_autocast(features.device):  # fp32 similarities also under autocast (the pruning compares them to mu)
        g = F.normalize(features.float(), dim=-1)
        sim = torch.matmul(g, g.transpose(-1, -2))  # (B, N, N)
        mu = sim.mean(dim=(-2, -1), keepdim=True)
        logits = gamma * (sim - beta * mu)
        pruned = logits < 0
        pruned.diagonal(dim1=-2, dim2=-1).fill_(False)
        logits = logits.masked_fill(pruned, float("-inf"))
        return logits.softmax(dim=-1).unsqueeze(1)


def upsample_values(values: Tensor, grid: tuple[int, int], size: tuple[int, int], has_cls: bool = True) -> Tensor:
    """Per-head values (B, H, [1+]h*w, dh) on the CLIP grid -> (B, H, H'*W', dh) on ``size``: bilinear,
    ``align_corners=False`` (ProxyCLIP); the CLS row is dropped."""
    if has_cls:
        values = values[:, :, 1:]
    B, H, N, dh = values.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"{N} value tokens do not fill a {h}x{w} grid")
    if (h, w) == tuple(size):
        return values
    x = values.permute(0, 1, 3, 2).reshape(B, H * dh, h, w)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.reshape(B, H, dh, size[0] * size[1]).transpose(-1, -2)


@register_method
@dataclasses.dataclass
class ProxyCLIP(UsesVFM, Method):
    """ProxyCLIP. ``vfm``: a timm model name, an alias (dino, dino_b16, dinov2, dinov2_noreg, mae, sam, sam_l,
    sam_h) or a loaded module (see :mod:`rfclip.models.vfm`); ``vfm_checkpoint``: local weights for it (also the
    official DINO / DINOv2 / MAE / SAM files); ``beta``/``gamma``: the proxy attention's shift and scale."""

    name = "proxyclip"
    description = "ProxyCLIP: last block attends with VFM (DINO ViT-B/8) feature similarities, CLIP values upsampled"
    reduced_last_block = True
    vfm: Any = "vit_base_patch8_224.dino"
    vfm_checkpoint: str | None = None
    beta: float = PROXY_BETA
    gamma: float = PROXY_GAMMA

    def __post_init__(self) -> None:
        if not (float(self.gamma) > 0):
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        self._vfm = None

    @property
    def vfm_kind(self) -> str:
        """``mae``, ``dinov2``, ``dino``, ``sam`` or ``other`` (FSA's lambda depends on it)."""
        from ..models.vfm import vfm_kind

        if self._vfm is not None:
            return self._vfm.kind
        return vfm_kind(self.vfm) if isinstance(self.vfm, str) else "other"

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        vfm = self.load_vfm(ctx.images.device)
        features, vgrid = vfm.features(ctx.images)  # (B, N', c)
        weights = proxy_attention(features, float(self.beta), float(self.gamma))  # (B, 1, N', N')
        values = upsample_values(v, tuple(ctx.grid), vgrid)  # (B, H, N', dh)
        if ctx.record is not None:
            ctx.log("proxy_kept_fraction", (weights > 0).float().mean(dim=(1, 2, 3)))
        return FinalAttention(weights=weights, values=values, keep_residual=False, grid=vgrid, has_cls=False)
