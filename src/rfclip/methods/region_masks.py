"""The ``+masks`` plug-in: CorrCLIP's two uses of class-agnostic region masks on any method.

* **Map correction** (every base): after the argmax at the original resolution, each region's pixels take the
  region's most frequent label; the unsegmented region (the smallest id, CorrCLIP's rule) keeps its labels.
* **Scope restriction** (bases whose last block is one attention map, i.e. that use ``final_attention``): in the
  last block a patch of a segmented region attends only to patches of its own region and to unsegmented patches;
  pairs with an unsegmented patch and the [CLS] row and column stay as the base has them. The kept weights are
  rescaled to the row's original sum (a softmax restricted to the allowed keys, for softmax bases; SCLIP's rows keep
  their sum of 2). A row left with no weight keeps the base's row. CorrCLIP's own unsegmented rule (``S > mean(S)`` on
  VFM similarities) needs a VFM and is only in ``corrclip``.

``scope=False`` / ``map_correction=False`` switch either part off; both off is exactly the base.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..constants import CORRCLIP_PAD_REGION
from ..dense import FinalAttention, ForwardContext, softmax_attention
from ..errors import RfclipError
from .base import Plugin, computes_last_layer, register_plugin
from .regions import UNSEGMENTED_RULES, region_mode, resize_nearest, unsegmented_ids


def restrict_to_regions(weights: Tensor, region_maps: Tensor, has_cls: bool, rule: str = "smallest") -> Tensor:
    """Attention ``weights`` (B, H|1, T, T) restricted to same-region pairs, unsegmented pairs free (see the module
    docstring). ``region_maps`` (B, N) ids on the attention's patch grid; T = N (+1 with ``has_cls``, token 0 the
    [CLS]). Returns (B, H|1, T, T) fp32 with each row's original sum."""
    w = weights.float()
    unseg = region_maps == unsegmented_ids(region_maps, rule)[:, None]  # (B, N)
    allowed = (region_maps[:, :, None] == region_maps[:, None, :]) | unseg[:, :, None] | unseg[:, None, :]
    if has_cls:
        allowed = torch.nn.functional.pad(allowed, (1, 0, 1, 0), value=True)  # [CLS] row and column kept
    kept = w * allowed[:, None]
    total, kept_total = w.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
    restricted = kept * (total / kept_total.clamp_min(torch.finfo(kept.dtype).tiny))
    return torch.where(kept_total > 0, restricted, w)


@register_plugin("masks")
@dataclasses.dataclass
class RegionMasks(Plugin):
    """``+masks`` on ``base`` (needs region masks: ``--masks`` / ``masks=``). ``map_correction``: the per-region mode
    of the labels; ``scope``: restrict the last block's attention to regions (bases with one attention map);
    ``unsegmented``: ``smallest`` (CorrCLIP's rule) or ``zero``."""

    map_correction: bool = True
    scope: bool = True
    unsegmented: str = "smallest"

    suffix = "masks"
    adds = "region masks (scope restriction, map correction)"
    needs_masks = True
    region_pad_value = CORRCLIP_PAD_REGION

    def __post_init__(self) -> None:
        if getattr(self.base, "needs_masks", False):  # before _check_base: corrclip, or a base already with +masks
            raise RfclipError(f"{self.base.name} already uses region masks; use it without +masks")
        self._check_base()
        if not self.accepts(type(self.base)):
            raise RfclipError(f"{self.base.name} already uses region masks; use it without +masks")
        if self.unsegmented not in UNSEGMENTED_RULES:
            raise ValueError(f"unsegmented must be one of {', '.join(UNSEGMENTED_RULES)}, got {self.unsegmented!r}")

    @staticmethod
    def accepts(base_cls: type) -> bool:
        """Any base that does not already use masks (corrclip does both itself)."""
        return not getattr(base_cls, "needs_masks", False)

    @property
    def restricts_scope(self) -> bool:
        """Whether the scope restriction applies: on, and the base's last block is one attention map."""
        return bool(self.scope) and not computes_last_layer(self.base)

    def options(self) -> dict:
        return {**self.base.options(), "map_correction": self.map_correction, "scope": self.scope,
                "unsegmented": self.unsegmented}

    # --- image level
    def correct_map(self, labels: Tensor, region_map: Tensor) -> Tensor:
        return region_mode(labels, region_map, self.unsegmented) if self.map_correction else labels

    # --- hooks: the base's (Plugin), with the last attention restricted
    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        first = self.base.final_attention(ctx, q, k, v)
        if not self.restricts_scope or ctx.regions is None:
            return first
        weights = first.weights if first.weights is not None else softmax_attention(q, k, ctx.scale)
        grid = tuple(first.grid) if first.grid is not None else tuple(ctx.grid)
        region_maps = resize_nearest(ctx.regions, grid).flatten(1)  # (B, N) on the attention's patch grid
        return dataclasses.replace(first, weights=restrict_to_regions(weights, region_maps, first.has_cls,
                                                                      self.unsegmented))
