"""Positional embeddings of vision foundation models at any patch grid, as each official model computes them.

timm resizes a ViT's absolute positional embedding with ``F.interpolate(size=new_grid, mode="bicubic",
antialias=True)``. The official models that ProxyCLIP and FSA load do not all do that (checked in their code):

========================  ==============================================================  ==========================
VFM (official code)       interpolation of the patch positions                            :data:`POSITION_RULES` key
========================  ==============================================================  ==========================
DINO (facebookresearch/   bicubic, ``scale_factor = ((h + 0.1) / h0, (w + 0.1) / w0)``,   ``dino``
dino,                     no antialias (``VisionTransformer.interpolate_pos_encoding``)
``vision_transformer.py``)
DINOv2 with registers     bicubic to ``size=(h, w)`` with antialias (hub models           ``size_antialias``
(``dinov2_vitb14_reg``)   ``*_reg``: ``interpolate_offset=0.0, interpolate_antialias=True``)
DINOv2 without registers  as DINO: ``interpolate_offset=0.1``, no antialias                ``dino``
(``dinov2_vitb14``)       (``_make_dinov2_model`` defaults)
MAE as ProxyCLIP loads    bicubic to ``size=(h, w)``, ``align_corners=False``, no          ``size``
it                        antialias (MAE's ``util/pos_embed.py:interpolate_pos_embed``, run
                          once at load time for ``img_size = slide_crop``)
other timm ViTs           timm's own: bicubic to ``size`` with antialias                  ``size_antialias``
========================  ==============================================================  ==========================

The "+ 0.1" matters: bicubic sampling uses the given scale factor for the source coordinates, so
``scale_factor=(h + 0.1) / h0`` samples other points than ``size=h`` (and antialiasing changes a downsampled grid
further). All rules keep the prefix (CLS) positions as they are and compute in fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class PositionRule:
    """How a VFM resamples its patch positions: ``offset > 0`` gives DINO's ``scale_factor = (h + offset) / h0``
    (else ``size=(h, w)``); ``antialias`` is ``F.interpolate``'s flag."""

    offset: float = 0.0
    antialias: bool = False


POSITION_RULES = {
    "dino": PositionRule(offset=0.1, antialias=False),  # DINO; DINOv2 without registers
    "size_antialias": PositionRule(offset=0.0, antialias=True),  # DINOv2 with registers; timm's default
    "size": PositionRule(offset=0.0, antialias=False),  # MAE as ProxyCLIP loads it
}


def resample_patch_pos_embed(posemb: Tensor, new_size: Sequence[int], old_size: Sequence[int],
                             rule: PositionRule = POSITION_RULES["dino"]) -> Tensor:
    """Patch positional embeddings ``(1, h0 * w0, C)`` on ``old_size`` = (h0, w0) -> ``(1, h * w, C)`` on
    ``new_size`` = (h, w), raster order, bicubic as ``rule`` says (see the module docstring).

    Stateless; computes in fp32 and returns the input dtype. The same grid returns ``posemb`` itself (the official
    models skip the interpolation there too).
    """
    h, w = int(new_size[0]), int(new_size[1])
    h0, w0 = int(old_size[0]), int(old_size[1])
    if posemb.ndim != 3 or posemb.shape[1] != h0 * w0:
        raise ValueError(f"expected (1, {h0 * w0}, C) patch positions for a {h0}x{w0} grid, got {tuple(posemb.shape)}")
    if (h, w) == (h0, w0):
        return posemb
    dim = posemb.shape[-1]
    grid = posemb.float().reshape(1, h0, w0, dim).permute(0, 3, 1, 2)  # (1, C, h0, w0)
    if rule.offset:
        scale = (float(h + rule.offset) / h0, float(w + rule.offset) / w0)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=rule.antialias)
    else:
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=rule.antialias)
    if tuple(out.shape[-2:]) != (h, w):  # floor((h + offset) / h0 * h0) must be h
        raise ValueError(f"positions resampled to {tuple(out.shape[-2:])} instead of {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(posemb.dtype)
