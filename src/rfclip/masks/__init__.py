"""Class-agnostic region masks (the mask tier): where they come from and how they are checked.

A region map is an integer array (H, W) at the image's own resolution: 0 = not segmented, k > 0 = region k
(CorrCLIP's ``instance_mask`` convention). A :class:`MaskSource` gives one for an image; saved ``.npz`` maps
(:class:`NpzMasks`) need nothing beyond the base install, the generators (SAM2, SAM, Hugging Face panoptic models)
need the ``masks`` extra.
"""

from .base import MaskSource, NpzMasks, check_region_map

__all__ = ["MaskSource", "NpzMasks", "check_region_map"]
