"""Per-dataset inference settings (resize, sliding window, logit scale, thresholds, normalisation) and their presets.

A preset is one paper's evaluation protocol, read from its repository's configs: one table of per-dataset values plus
the settings common to all its datasets. ``register_preset`` adds one more (see the tables below for the format).

* ``default``: the common protocol (SCLIP / NACLIP configs, which the RF-CLIP paper says it follows): short side
  336 (560 for Cityscapes), 224/112 sliding window everywhere, logit scale 40, ``prob_thd`` 0.1 on the three
  datasets with a background class (VOC21, Context60, COCO-Object), 0 elsewhere.
* ``naclip``: NACLIP's configs. Same as ``default`` except whole-image inference on VOC21 and VOC20.
* ``sclip``: SCLIP's configs. Logit scale 65 on VOC21 and 50 on Context60 / COCO-Object, ``area_thd`` 0.1 on
  VOC21 and short side 448 on COCO-Stuff.
* ``clearclip``: ClearCLIP's configs (mc-lan/ClearCLIP). Short side 448, 448/224 windows (Cityscapes 224/224), logit
  scale 50, ``prob_thd`` 0.5 / 0.15 / 0.4 on VOC21 / Context60 / COCO-Object, crops zero-padded to multiples of the
  patch size, ClearCLIP's VOC21 class names (a "background" class, no synonyms).
* ``proxyclip``: ProxyCLIP's configs (mc-lan/ProxyCLIP). 336/112 windows, ``prob_thd`` 0.2 / 0.15 / 0.25, Cityscapes at
  448 with 224/112 windows, ADE20K at 448, crops padded to multiples of 56, the ProxyCLIP / FSA class-name files.
* ``fsa``: FSA's configs (chi-chi-zx/FSA, derived from ProxyCLIP's). As ``proxyclip`` except ``prob_thd`` 0.20 /
  0.14 / 0.30 and Cityscapes windows 224/80.
* ``rfclip_release``: the released RF-CLIP code's configs (liblacklucy/RF-CLIP at c2b333e). Whole image on VOC21 and
  COCO-Stuff, 224/112 elsewhere, short side 336 (560 Cityscapes), logit scale 40, ``prob_thd`` 0.1 on VOC21 /
  Context60 / COCO-Object, PAMR off, and per-dataset options of the ``rfclip_release`` method (the preset's
  method): ``global_semantics_weight``, ``mean_vector_weight``, ``h_threshold``, and the crop's own [CLS] on
  Cityscapes (``cls_source="crop"``).
* ``corrclip``: CorrCLIP v1's configs (zdk258/CorrCLIP, method ``corrclip``, needs region masks): 336/112 windows
  (Cityscapes 224/112), short side 336 (448 ADE20K and Cityscapes), ``prob_thd`` 0.2 / 0.15 / 0.25, crops padded to
  56, its class-name files, and MetaCLIP ``ViT-B-16-quickgelu`` / ``metaclip_fullcc`` when no model is named.

Every preset normalises images with the constants of its repository's mmseg ``SegDataPreProcessor``: CLIP's mean and
std x 255 rounded to 3 decimals (``constants.MMSEG_CLIP_MEAN`` / ``MMSEG_CLIP_STD``); outside the presets rfclip uses
the exact CLIP constants.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

from ..constants import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, MMSEG_CLIP_MEAN, MMSEG_CLIP_STD
from ..errors import RfclipError

DATASET_NAMES = ("voc21", "voc20", "context60", "context59", "coco_stuff", "coco_object", "ade20k", "cityscapes")

# Other spellings accepted for dataset names (lower-cased, "-" read as "_").
DATASET_ALIASES = {
    "city_scapes": "cityscapes",
    "coco_stuff164k": "coco_stuff",
    "cocostuff": "coco_stuff",
    "coco_obj": "coco_object",
    "cocoobject": "coco_object",
    "ade": "ade20k",
    "ade20k150": "ade20k",
    "pascal_context60": "context60",
    "pascal_context59": "context59",
    "pc60": "context60",
    "pc59": "context59",
    "voc": "voc21",
    "pascal_voc": "voc21",
    "pascal_voc20": "voc20",
}

# Datasets whose class 0 is a background class (``prob_thd`` sends low-confidence pixels there).
BACKGROUND_DATASETS = ("voc21", "context60", "coco_object")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How one dataset is evaluated.

    ``short_side``: ``Resize(scale=(long_side, short_side), keep_ratio=True)``. ``slide_crop`` /
    ``slide_stride``: sliding window in pixels of the resized image (``slide_crop == 0``: one forward pass on
    the whole image). ``logit_scale``: multiplier before the softmax over queries. ``prob_thd``: pixels whose
    best class probability is below it become class 0. ``area_thd``: SCLIP's small-region filter (None = off).
    ``classnames``: which class-name set to use ("default" = SCLIP/NACLIP files, "fsa" = FSA/ProxyCLIP files,
    "clearclip" = ClearCLIP's VOC21 file, the default files elsewhere). ``pixel_mean`` / ``pixel_std``: RGB
    normalisation on the 0-255 scale. ``pad_crops_to``: zero-pad crops to multiples of this many pixels ("patch": the
    model's patch size; 0: off). ``method_options``: options of the preset's method for this dataset (applied
    where the method takes them and the user did not set them).
    """

    short_side: int
    slide_crop: int
    slide_stride: int
    logit_scale: float
    prob_thd: float
    area_thd: float | None = None
    long_side: int = 2048
    classnames: str = "default"
    pixel_mean: tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = CLIP_PIXEL_STD
    pad_crops_to: int | str = 0
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def whole_image(self) -> bool:
        return self.slide_crop <= 0

    def replace(self, **changes) -> "EvalSettings":
        """A copy with some fields changed (``None`` values are ignored, so CLI overrides can be passed as is)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise RfclipError(f"unknown evaluation setting(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def canonical_dataset_name(name: str) -> str:
    """``"City-Scapes"`` -> ``"cityscapes"``; an unknown name is an :class:`RfclipError` listing the valid ones."""
    key = str(name).strip().lower().replace("-", "_")
    key = DATASET_ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise RfclipError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    return key


# ------------------------------------------------------------------------------------------------ presets
@dataclasses.dataclass(frozen=True)
class Preset:
    """One paper's protocol: ``settings`` per dataset, a one-line ``description`` and the ``source`` it was read
    from."""

    name: str
    description: str
    source: str
    settings: Mapping[str, EvalSettings]
    method: str | None = None  # the method this protocol belongs to (`rfclip eval --preset` without --method)
    model: tuple[str, str] | None = None  # (open_clip name, pretrained tag) used when the user names no model


# Columns of the preset tables; a row may add a dict of other EvalSettings fields (SCLIP's area_thd).
TABLE_COLUMNS = ("short_side", "slide_crop", "slide_stride", "logit_scale", "prob_thd")
MMSEG_NORMALISATION = dict(pixel_mean=MMSEG_CLIP_MEAN, pixel_std=MMSEG_CLIP_STD)


def preset_settings(rows: Mapping[str, tuple], **common) -> dict[str, EvalSettings]:
    """EvalSettings per dataset from a table ``{dataset: (short_side, slide_crop, slide_stride, logit_scale,
    prob_thd[, {other fields}])}`` (every dataset once) and the fields ``common`` to all rows."""
    if sorted(rows) != sorted(DATASET_NAMES):
        raise ValueError(f"a preset table needs one row per dataset: {', '.join(DATASET_NAMES)}")
    out = {}
    for name in DATASET_NAMES:
        row = rows[name]
        extra = row[len(TABLE_COLUMNS)] if len(row) > len(TABLE_COLUMNS) else {}
        out[name] = EvalSettings(**dict(zip(TABLE_COLUMNS, row[:len(TABLE_COLUMNS)])), **common, **extra)
    return out


PRESETS: dict[str, dict[str, EvalSettings]] = {}
PRESET_INFO: dict[str, Preset] = {}


def register_preset(name: str, description: str, source: str, settings: Mapping[str, EvalSettings],
                    method: str | None = None, model: tuple[str, str] | None = None) -> Preset:
    """Add a preset (``rfclip eval --preset NAME``); a name already taken is replaced, with a warning. ``method``:
    the method the preset's ``method_options`` belong to, used when ``--method`` is not given."""
    key = str(name).strip().lower()
    if key in PRESETS:
        warnings.warn(f"settings preset '{key}' is registered again; the new table replaces the old one", stacklevel=2)
    preset = Preset(key, description, source, dict(settings), method, model)
    PRESET_INFO[key] = preset
    PRESETS[key] = dict(preset.settings)
    return preset


# The SCLIP / NACLIP configs (wangf3014/SCLIP, sinahmr/NACLIP configs/cfg_*.py; segmentor defaults slide 224/112,
# logit scale 40, prob_thd 0) as the RF-CLIP paper follows them.
#                short  crop stride logit prob_thd
_DEFAULT_ROWS = {
    "voc21":       (336, 224, 112, 40.0, 0.1),
    "voc20":       (336, 224, 112, 40.0, 0.0),
    "context60":   (336, 224, 112, 40.0, 0.1),
    "context59":   (336, 224, 112, 40.0, 0.0),
    "coco_stuff":  (336, 224, 112, 40.0, 0.0),
    "coco_object": (336, 224, 112, 40.0, 0.1),
    "ade20k":      (336, 224, 112, 40.0, 0.0),
    "cityscapes":  (560, 224, 112, 40.0, 0.0),
}
register_preset("default", "the common SCLIP/NACLIP protocol the RF-CLIP paper follows: short side 336 (560 "
                "Cityscapes), slide 224/112, logit scale 40, prob_thd 0.1 on VOC21 / Context60 / COCO-Object",
                "wangf3014/SCLIP and sinahmr/NACLIP configs/cfg_*.py", preset_settings(_DEFAULT_ROWS, **MMSEG_NORMALISATION))
DATASET_SETTINGS: dict[str, EvalSettings] = PRESETS["default"]

# NACLIP's configs: as default, whole image (slide_crop 0) on VOC21 and VOC20 (spec protocol.md, NACLIP 0cac3a6).
register_preset("naclip", "NACLIP's configs: as default, whole image on VOC21 / VOC20",
                "sinahmr/NACLIP configs/cfg_*.py (spec protocol.md §4b)",
                preset_settings({**_DEFAULT_ROWS, "voc21": (336, 0, 112, 40.0, 0.1), "voc20": (336, 0, 112, 40.0, 0.0)},
                                **MMSEG_NORMALISATION))

# SCLIP's configs (wangf3014/SCLIP configs/cfg_*.py).
#                short  crop stride logit prob_thd
_SCLIP_ROWS = {
    "voc21":       (336, 224, 112, 65.0, 0.1, dict(area_thd=0.1)),
    "voc20":       (336, 224, 112, 40.0, 0.0),
    "context60":   (336, 224, 112, 50.0, 0.1),
    "context59":   (336, 224, 112, 40.0, 0.0),
    "coco_stuff":  (448, 224, 112, 40.0, 0.0),
    "coco_object": (336, 224, 112, 50.0, 0.1),
    "ade20k":      (336, 224, 112, 40.0, 0.0),
    "cityscapes":  (560, 224, 112, 40.0, 0.0),
}
register_preset("sclip", "SCLIP's configs (logit scale 65/50, area_thd on VOC21, 448 on COCO-Stuff)",
                "wangf3014/SCLIP configs/cfg_*.py", preset_settings(_SCLIP_ROWS, **MMSEG_NORMALISATION))

# ClearCLIP's configs (mc-lan/ClearCLIP configs/cfg_*.py: Resize(scale=(2048, 448)) and model overrides; the
# segmentor's defaults slide_crop 448, slide_stride 224, logit_scale 50, prob_thd 0; crops padded to the patch size
# in forward_slide). ADE20K and COCO-Stuff: configs not public in the index; the same Resize and no overrides assumed.
#                short  crop stride logit prob_thd
_CLEARCLIP_ROWS = {
    "voc21":       (448, 448, 224, 50.0, 0.5),
    "voc20":       (448, 448, 224, 50.0, 0.0),
    "context60":   (448, 448, 224, 50.0, 0.15),
    "context59":   (448, 448, 224, 50.0, 0.0),
    "coco_stuff":  (448, 448, 224, 50.0, 0.0),
    "coco_object": (448, 448, 224, 50.0, 0.4),
    "ade20k":      (448, 448, 224, 50.0, 0.0),
    "cityscapes":  (448, 224, 224, 50.0, 0.0),
}
register_preset("clearclip", "ClearCLIP's configs: short side 448, slide 448/224 (Cityscapes 224/224), logit scale 50, "
                "prob_thd 0.5/0.15/0.4, crops padded to the patch size, its VOC21 class names",
                "mc-lan/ClearCLIP configs/cfg_*.py, clearclip_segmentor.py",
                preset_settings(_CLEARCLIP_ROWS, classnames="clearclip", pad_crops_to="patch", **MMSEG_NORMALISATION))

# ProxyCLIP's configs (mc-lan/ProxyCLIP configs/cfg_*.py; segmentor defaults slide_crop 336, slide_stride 112,
# logit_scale 40, prob_thd 0; crops padded to multiples of 56 in forward_slide). VOC20 / Context59: not in the
# index; FSA's copies of them (no overrides, short side 336) assumed.
#                short  crop stride logit prob_thd
_PROXYCLIP_ROWS = {
    "voc21":       (336, 336, 112, 40.0, 0.2),
    "voc20":       (336, 336, 112, 40.0, 0.0),
    "context60":   (336, 336, 112, 40.0, 0.15),
    "context59":   (336, 336, 112, 40.0, 0.0),
    "coco_stuff":  (336, 336, 112, 40.0, 0.0),
    "coco_object": (336, 336, 112, 40.0, 0.25),
    "ade20k":      (448, 336, 112, 40.0, 0.0),
    "cityscapes":  (448, 224, 112, 40.0, 0.0),
}
register_preset("proxyclip", "ProxyCLIP's configs: slide 336/112, prob_thd 0.2/0.15/0.25, ADE20K and Cityscapes "
                "(224/112) at 448, crops padded to 56, its class-name files", "mc-lan/ProxyCLIP configs/cfg_*.py, proxyclip_segmentor.py",
                preset_settings(_PROXYCLIP_ROWS, classnames="fsa", pad_crops_to=56, **MMSEG_NORMALISATION))

# FSA's configs (chi-chi-zx/FSA configs/cfg_*.py, FSA_Proxy_segmentor.py): ProxyCLIP's with other thresholds and a
# Cityscapes stride of 80.
#                short  crop stride logit prob_thd
_FSA_ROWS = {
    "voc21":       (336, 336, 112, 40.0, 0.20),
    "voc20":       (336, 336, 112, 40.0, 0.0),
    "context60":   (336, 336, 112, 40.0, 0.14),
    "context59":   (336, 336, 112, 40.0, 0.0),
    "coco_stuff":  (336, 336, 112, 40.0, 0.0),
    "coco_object": (336, 336, 112, 40.0, 0.30),
    "ade20k":      (448, 336, 112, 40.0, 0.0),
    "cityscapes":  (448, 224, 80, 40.0, 0.0),
}
register_preset("fsa", "FSA's configs (ProxyCLIP's, prob_thd 0.20/0.14/0.30, Cityscapes stride 80) and class-name files",
                "chi-chi-zx/FSA configs/cfg_*.py, FSA_Proxy_segmentor.py",
                preset_settings(_FSA_ROWS, classnames="fsa", pad_crops_to=56, **MMSEG_NORMALISATION))


# The released RF-CLIP code's configs (liblacklucy/RF-CLIP c2b333e configs/cfg_*.py, custom_segmentor.py; spec
# rf-clip-released-code.md §3.7): Resize(scale=(2048, 336)) (Cityscapes 560), the segmentor's slide 224/112 unless a
# config sets slide_crop=0 (VOC21, COCO-Stuff), logit scale 40, PAMR off (eval.py --pamr off), and the CASS extras
# per dataset (constants.RELEASE_DATASET_EXTRAS); Cityscapes takes each crop's own [CLS] (forward_slide).
def _release_rows() -> dict[str, tuple]:
    from ..constants import RELEASE_DATASET_EXTRAS

    rows = {}
    for name, (gsw, mvw, h, prob_thd, crop) in RELEASE_DATASET_EXTRAS.items():
        options = dict(global_semantics_weight=gsw, mean_vector_weight=mvw, h_threshold=h,
                       cls_source="crop" if name == "cityscapes" else "image")
        rows[name] = (560 if name == "cityscapes" else 336, crop, 112, 40.0, prob_thd, dict(method_options=options))
    return rows


register_preset("rfclip_release", "the released RF-CLIP code's configs (method rfclip_release): whole image on "
                "VOC21 / COCO-Stuff, else slide 224/112, short side 336 (560 Cityscapes), logit scale 40, prob_thd "
                "0.1 on VOC21 / Context60 / COCO-Object, PAMR off, per-dataset global_semantics_weight / "
                "mean_vector_weight / h_threshold, crop [CLS] on Cityscapes",
                "liblacklucy/RF-CLIP c2b333e configs/cfg_*.py, custom_segmentor.py, eval.py",
                preset_settings(_release_rows(), **MMSEG_NORMALISATION), method="rfclip_release")


# CorrCLIP v1's configs (zdk258/CorrCLIP 103bc18 CorrCLIPv1/configs/cfg_*.py, corrclip_segmentor.py): Resize(scale=
# (2048, 336)), 448 on ADE20K and Cityscapes; the segmentor's slide 336/112 (Cityscapes 224/112), logit scale 40,
# prob_thd 0.2 / 0.15 / 0.25 on VOC21 / Context60 / COCO-Object; crops padded to multiples of 56 (the method's own);
# its class-name files; MetaCLIP ViT-B-16-quickgelu / metaclip_fullcc (base_config.py) as the model.
#                short  crop stride logit prob_thd
_CORRCLIP_ROWS = {
    "voc21":       (336, 336, 112, 40.0, 0.2),
    "voc20":       (336, 336, 112, 40.0, 0.0),
    "context60":   (336, 336, 112, 40.0, 0.15),
    "context59":   (336, 336, 112, 40.0, 0.0),
    "coco_stuff":  (336, 336, 112, 40.0, 0.0),
    "coco_object": (336, 336, 112, 40.0, 0.25),
    "ade20k":      (448, 336, 112, 40.0, 0.0),
    "cityscapes":  (448, 224, 112, 40.0, 0.0),
}
register_preset("corrclip", "CorrCLIP v1's configs (method corrclip, needs --masks): slide 336/112, short side 336 "
                "(448 ADE20K and Cityscapes, 224/112 windows there), prob_thd 0.2/0.15/0.25, crops padded to 56, its "
                "class-name files, MetaCLIP ViT-B-16-quickgelu / metaclip_fullcc unless a model is named",
                "zdk258/CorrCLIP 103bc18 CorrCLIPv1/configs/cfg_*.py, base_config.py, corrclip_segmentor.py",
                preset_settings(_CORRCLIP_ROWS, classnames="corrclip", pad_crops_to=56, **MMSEG_NORMALISATION),
                method="corrclip", model=("ViT-B-16-quickgelu", "metaclip_fullcc"))


def preset_model(preset: str) -> tuple[str, str] | None:
    """The (model, pretrained) a preset runs when the user names no model (``corrclip``: MetaCLIP B/16), or None."""
    return PRESET_INFO[check_preset(preset)].model


def preset_method(preset: str) -> str | None:
    """The method a preset belongs to (``rfclip_release`` for the ``rfclip_release`` preset), or None."""
    return PRESET_INFO[check_preset(preset)].method


def check_preset(preset: str) -> str:
    key = str(preset).strip().lower()
    if key not in PRESETS:
        raise RfclipError(f"unknown settings preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return key


def get_settings(dataset: str, preset: str = "default") -> EvalSettings:
    """The :class:`EvalSettings` of ``dataset`` under ``preset`` (a name in :data:`PRESETS`)."""
    return PRESETS[check_preset(preset)][canonical_dataset_name(dataset)]
