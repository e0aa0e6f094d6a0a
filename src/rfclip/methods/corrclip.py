"""CorrCLIP v1 (Zhang et al., ICCV 2025) as its code computes it (zdk258/CorrCLIP at 103bc18, ``CorrCLIPv1/``).

Per crop (spec corrclip.md §1.2; ``open_clip/transformer.py`` ``VisionTransformer.forward``):

1. VFM features: the last DINO block's raw ``q + k``, CLS dropped, L2-normalised, on the VFM grid (42x42 at 336).
2. Mask merging: the crop's region map (padding = 10000) nearest-resized to the VFM grid; regions whose mean
   features are within ``max(sim) - sim <= 0.2`` of each other (DBSCAN, one sample) merge (:mod:`.regions`).
3. Scope reconstruction: ``A = softmax(4 S)`` restricted to same-region pairs, and for the unsegmented region (the
   smallest id) to pairs with ``S > mean(S)``.
4. Mask class tokens (MCT): one copy of the embedded [CLS] per region of the merged map resized to the CLIP grid;
   in every layer MCT r attends to [CLS] and the patches of region r only, and nothing attends to the MCTs, so the
   patch stream is CLIP's own. The MCTs run here as a query-only stream against each layer's keys and values.
5. Spatial branch: the mean of the residual streams entering layers ``L-1-NUM_SPATIAL .. L-2``.
6. Last block: main (the stream) and spatial (the mean) through ``ln_1`` and the v-projection only, values
   bilinearly upsampled to the VFM grid, ``out_proj(A v)``; semantic: the MCTs through the full block, scattered to
   their regions' patches. ``ln_post`` on each, ``main + 1.0 spatial + 0.5 semantic``, then ``proj``.

The image level (crops padded centred to multiples of 56, masks padded with 10000, map correction on the original
resolution) is in :mod:`rfclip.inference` and :mod:`rfclip.segmenter`, driven by this class's attributes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import (CORRCLIP_MERGE_EPS, CORRCLIP_NUM_SPATIAL, CORRCLIP_PAD_MULTIPLE, CORRCLIP_PAD_REGION,
                         CORRCLIP_SEMANTIC_WEIGHT, CORRCLIP_SPATIAL_WEIGHT, CORRCLIP_TAU)
from ..dense import FinalTokens, ForwardContext, softmax_attention
from ..errors import RfclipError
from .base import Method, UsesVFM, register_method
from .proxyclip import upsample_values
from .regions import UNSEGMENTED_RULES, dense_ids, merge_regions, region_mode, resize_nearest, scope_attention

MASKS_HINT = "give region masks: --masks SPEC on the command line, masks= in Python"


def num_spatial(depth: int) -> int:
    """CorrCLIP's NUM_SPATIAL: 5 / 12 / 28 layers for 12 / 24 / 32-layer ViTs, else depth - 4 (at least 1 here;
    the code's empty mean fails below 5 layers)."""
    return CORRCLIP_NUM_SPATIAL.get(int(depth), max(1, int(depth) - 4))


@dataclasses.dataclass
class MctStream:
    """The mask class tokens of a batch of crops, advanced layer by layer beside the patch stream."""

    tokens: Tensor | None  # (B, R, C) residual stream of the MCTs (R = most regions of any crop; extra rows unused)
    bias: Tensor  # (B, 1, R, 1+N) 0 where MCT r may attend ([CLS] and its region's patches), -inf elsewhere
    scatter: Tensor  # (B, N') index of the MCT of each VFM-grid patch


def attend_only(encoder, block, tokens: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """One pre-LN block for query tokens (B, R, C) that attend to another sequence's keys/values (B, H, T, dh)
    with ``bias`` (B, 1, R, T) and are not attended to: ``x + attn``, then ``+ FFN``. Returns (B, R, C)."""
    attn = block.attn
    C = encoder.width
    w_q = attn.in_proj_weight[:C]
    b_q = attn.in_proj_bias[:C] if attn.in_proj_bias is not None else None
    q = F.linear(block.ln_1(tokens), w_q, b_q)  # (B, R, C)
    q = q.unflatten(-1, (encoder.num_heads, encoder.head_dim)).transpose(1, 2)  # (B, H, R, dh)
    weights = softmax_attention(q, k, encoder.head_dim ** -0.5, bias)  # (B, H, R, T)
    x = tokens + block.ls_1(encoder.attention_output(block, weights, v))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@register_method
@dataclasses.dataclass
class CorrCLIP(UsesVFM, Method):
    """CorrCLIP v1. ``vfm`` / ``vfm_checkpoint``: the VFM whose last-block q+k give the correlations (DINO ViT-B/8
    by default, any timm ViT rfclip loads); ``main_weight`` / ``spatial_weight`` / ``semantic_weight``: the three
    branches' weights (1, 1, 0.5); ``tau``: the attention's scale; ``merge`` / ``merge_eps``: region merging;
    ``merge_padding``: the crop's padding (id 10000) takes part in the merging as a region (the code) or keeps its
    own id (False); ``num_spatial``: layers in the spatial mean (None: per depth); ``map_correction``: the per-region mode of the
    final labels; ``unsegmented``: ``smallest`` (the code: the smallest id of a map is its unsegmented region, also
    when the map has no 0) or ``zero`` (only id 0 is unsegmented)."""

    name = "corrclip"
    description = "CorrCLIP v1: DINO q+k correlations within region masks, mask class tokens, spatial branch (needs masks)"
    needs_masks: ClassVar[bool] = True
    crop_multiple: ClassVar[int] = CORRCLIP_PAD_MULTIPLE  # crops padded centred to multiples of 56 px
    region_pad_value: ClassVar[int] = CORRCLIP_PAD_REGION  # the padding's region id
    vfm: Any = "vit_base_patch8_224.dino"
    vfm_checkpoint: str | None = None
    main_weight: float = 1.0
    spatial_weight: float = CORRCLIP_SPATIAL_WEIGHT
    semantic_weight: float = CORRCLIP_SEMANTIC_WEIGHT
    tau: float = CORRCLIP_TAU
    merge: bool = True
    merge_eps: float = CORRCLIP_MERGE_EPS
    merge_padding: bool = True
    num_spatial: int | None = None
    map_correction: bool = True
    unsegmented: str = "smallest"

    def __post_init__(self) -> None:
        if self.unsegmented not in UNSEGMENTED_RULES:
            raise ValueError(f"unsegmented must be one of {', '.join(UNSEGMENTED_RULES)}, got {self.unsegmented!r}")
        if not float(self.tau) > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.num_spatial is not None and int(self.num_spatial) < 1:
            raise ValueError(f"num_spatial must be at least 1, got {self.num_spatial}")
        self._vfm = None

    def prepare(self, clip) -> None:
        super().prepare(clip)  # the VFM (UsesVFM)
        depth = len(clip.model.visual.transformer.resblocks)
        if self.layers_in_spatial(depth) > depth - 1:
            raise RfclipError(f"num_spatial {self.num_spatial} exceeds the {depth - 1} layers before the last; "
                              f"give at most {depth - 1}")

    def layers_in_spatial(self, depth: int) -> int:
        return int(self.num_spatial) if self.num_spatial is not None else num_spatial(depth)

    # ------------------------------------------------------------------ image level
    def correct_map(self, labels: Tensor, region_map: Tensor) -> Tensor:
        """Map correction at the original resolution (``map_correction=False``: the labels unchanged)."""
        return region_mode(labels, region_map, self.unsegmented) if self.map_correction else labels

    # ------------------------------------------------------------------ hooks
    def begin(self, ctx: ForwardContext) -> None:
        if ctx.regions is None:
            raise RfclipError(f"method {self.name} needs region masks; {MASKS_HINT}")
        vfm = self.load_vfm(ctx.images.device)
        features, vgrid = vfm.last_query_key(ctx.images)  # (B, N', c) fp32
        B = features.shape[0]
        region_maps = resize_nearest(ctx.regions, vgrid).reshape(B, -1)  # (B, N')
        if self.merge:
            region_maps = torch.stack([merge_regions(m, f, float(self.merge_eps), self.unsegmented,
                                                     bool(self.merge_padding))
                                       for m, f in zip(region_maps, features)])
        attention = scope_attention(features, region_maps, float(self.tau), self.unsegmented)  # (B, 1, N', N')
        # mask class tokens: one per id of the merged map on the CLIP grid
        token_maps = resize_nearest(region_maps.view(B, *vgrid), tuple(ctx.grid))  # (B, h, w)
        index, _ = dense_ids(token_maps.flatten(1))  # (B, N) in 0..R_b-1
        R = int(index.max()) + 1
        member = F.one_hot(index, R).transpose(1, 2).bool()  # (B, R, N)
        allowed = torch.cat([member.new_ones(B, R, 1), member], dim=2)  # [CLS] and the region's patches
        bias = torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))[:, None]
        scatter = resize_nearest(index.view(B, *ctx.grid), vgrid).flatten(1)  # (B, N')
        first = ctx.num_layers - 1 - self.layers_in_spatial(ctx.num_layers)
        ctx.store.update(corr_attention=attention, corr_grid=vgrid, corr_mct=MctStream(None, bias, scatter),
                         corr_spatial=[], corr_first_spatial=first)

    def layer_input(self, ctx: ForwardContext, layer: int, x: Tensor) -> Tensor:
        store = ctx.store
        if layer == 0:  # the MCTs are copies of the embedded [CLS] (after ln_pre)
            mct = store["corr_mct"]
            mct.tokens = x[:, :1].expand(-1, mct.bias.shape[2], -1).clone()
        if store["corr_first_spatial"] <= layer <= ctx.num_layers - 2:
            store["corr_spatial"].append(x)
        return x

    def attention(self, ctx: ForwardContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        mct = ctx.store["corr_mct"]
        mct.tokens = attend_only(ctx.encoder, ctx.encoder.blocks[layer], mct.tokens, k, v, mct.bias)
        return None  # the patch stream: CLIP's own attention

    def final_tokens(self, ctx: ForwardContext, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> FinalTokens:
        enc, block, store = ctx.encoder, ctx.encoder.blocks[-1], ctx.store
        vgrid, attention, mct = store["corr_grid"], store["corr_attention"], store["corr_mct"]
        B = x.shape[0]
        # main and spatial branches: ln_1, v-projection, values upsampled to the VFM grid, out_proj(A v)
        spatial = torch.stack(store.pop("corr_spatial")).mean(dim=0)  # (B, 1+N, C)
        C = enc.width
        w_v = block.attn.in_proj_weight[2 * C:]
        b_v = block.attn.in_proj_bias[2 * C:] if block.attn.in_proj_bias is not None else None
        v_spatial = F.linear(block.ln_1(spatial), w_v, b_v).unflatten(-1, (enc.num_heads, enc.head_dim)).transpose(1, 2)
        values = upsample_values(torch.cat([v, v_spatial]), tuple(ctx.grid), vgrid)  # (2B, H, N', dh)
        out = enc.attention_output(block, attention.repeat(2, 1, 1, 1), values)  # (2B, N', C)
        # semantic branch: the MCTs through the full last block, each scattered to its region's patches
        tokens = attend_only(enc, block, mct.tokens, k, v, mct.bias)  # (B, R, C)
        semantic = torch.gather(tokens, 1, mct.scatter[:, :, None].expand(-1, -1, tokens.shape[-1]))  # (B, N', C)
        ln_post = ctx.encoder.visual.ln_post
        combined = (float(self.main_weight) * ln_post(out[:B]) + float(self.spatial_weight) * ln_post(out[B:])
                    + float(self.semantic_weight) * ln_post(semantic))
        return FinalTokens(patches=combined, cls=None, grid=vgrid, after_ln_post=True)
