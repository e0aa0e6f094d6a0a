"""Class-agnostic region masks (the mask tier): where they come from and how they are checked.

A region map is an integer array (H, W) at the image's own resolution: 0 = not segmented, k > 0 = region k
(CorrCLIP's ``instance_mask`` convention). A :class:`MaskSource` gives one for an image; saved ``.npz`` maps
(:class:`NpzMasks`) need nothing beyond the base install, the generators (SAM2, SAM, Hugging Face panoptic models)
need the ``masks`` extra. :func:`mask_source` turns the command line's ``--masks SPEC`` into a source.
"""

from __future__ import annotations

from ..errors import RfclipError
from .base import NPZ_KEY, MaskSource, NpzMasks, check_region_map, paint_by_area
from .generators import INSTALL_HINT, HFPanopticMasks, Sam2Masks, SamMasks

__all__ = ["MaskSource", "NpzMasks", "Sam2Masks", "SamMasks", "HFPanopticMasks", "check_region_map",
           "paint_by_area", "mask_source", "MASK_SPEC_FORMS", "NPZ_KEY", "INSTALL_HINT"]

# The forms of --masks, for help texts and errors.
MASK_SPEC_FORMS = {
    "npz": "npz:DIR  saved region maps DIR/<image stem>.npz (CorrCLIP's instance_mask files, e.g. EntitySeg's)",
    "sam2": "sam2:CHECKPOINT[@CONFIG]  SAM2 automatic masks (config from the checkpoint's shapes, or named: "
            "sam2.1_hiera_l, ... or a yaml file)",
    "sam": "sam:CHECKPOINT[@vit_b|vit_l|vit_h]  SAM automatic masks (size from the checkpoint's shapes)",
    "hf": "hf:DIR  a Mask2Former / EoMT folder for transformers (safetensors), panoptic segments",
}
# Generator settings a spec may set after '?', e.g. sam2:ckpt.pt?points_per_side=32
_SETTINGS = {"sam2": {"points_per_side": int, "pred_iou_thresh": float, "stability_score_thresh": float,
                      "points_per_batch": int},
             "sam": {"points_per_side": int, "pred_iou_thresh": float, "stability_score_thresh": float,
                     "points_per_batch": int}}


def _split_settings(scheme: str, rest: str) -> tuple[str, dict]:
    if "?" not in rest or scheme not in _SETTINGS:
        return rest, {}
    rest, query = rest.rsplit("?", 1)
    allowed, settings = _SETTINGS[scheme], {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in allowed:
            raise RfclipError(f"unknown {scheme} mask setting '{key}'; use {', '.join(allowed)} "
                              f"(e.g. {scheme}:CHECKPOINT?points_per_side=32)")
        try:
            settings[key] = allowed[key](value)
        except ValueError:
            raise RfclipError(f"{scheme} mask setting {key}={value!r} is not a number; e.g. {key}=8") from None
    return rest, settings


def mask_source(spec: str, device=None) -> MaskSource:
    """``npz:DIR``, ``sam2:CHECKPOINT[@CONFIG]``, ``sam:CHECKPOINT[@TYPE]`` or ``hf:DIR`` -> a :class:`MaskSource`.

    Generator settings may follow a ``?``: ``sam2:ckpt.pt?points_per_side=32&pred_iou_thresh=0.5``.
    """
    scheme, sep, rest = str(spec).partition(":")
    if not sep or scheme not in MASK_SPEC_FORMS or not rest:
        forms = "; ".join(f.split("  ")[0] for f in MASK_SPEC_FORMS.values())
        raise RfclipError(f"unknown mask source '{spec}'; use one of: {forms}")
    rest, settings = _split_settings(scheme, rest)
    if scheme == "npz":
        return NpzMasks(rest)
    if scheme == "hf":
        return HFPanopticMasks(rest, device=device)
    checkpoint, _, config = rest.partition("@")
    if scheme == "sam2":
        return Sam2Masks(checkpoint, config or None, device=device, **settings)
    return SamMasks(checkpoint, config or None, device=device, **settings)
