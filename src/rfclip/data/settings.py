"""Per-dataset inference settings (resize, sliding window, logit scale, thresholds) and their presets.

Sources (see the project specs ``protocol.md`` §4b and ``fsa.md`` §7.2):

* ``default``: the setup RF-CLIP (and ClearCLIP, SC-CLIP) say they follow: short side 336 (560 for
  Cityscapes), 224/112 sliding window everywhere, logit scale 40, ``prob_thd`` 0.1 on the three datasets
  with a background class (VOC21, Context60, COCO-Object), 0 elsewhere.
* ``naclip``: NACLIP's configs. Same as ``default`` except whole-image inference on VOC21 and VOC20.
* ``sclip``: SCLIP's configs. Logit scale 65 on VOC21 and 50 on Context60 / COCO-Object, ``area_thd`` 0.1 on
  VOC21 and short side 448 on COCO-Stuff.
* ``fsa``: FSA's (= ProxyCLIP's) configs. 336/112 windows, ``prob_thd`` 0.20 / 0.14 / 0.30 on VOC21 /
  Context60 / COCO-Object, Cityscapes at 448 with 224/80 windows, ADE20K at 448. It also selects FSA's own
  class-name files (``assets/classnames_fsa``: "; " separator, no person / tv synonyms on VOC, a 17-word
  background on COCO-Object).
"""

from __future__ import annotations

import dataclasses

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
    ``classnames``: which class-name set to use ("default" = SCLIP/NACLIP files, "fsa" = FSA/ProxyCLIP files).
    """

    short_side: int
    slide_crop: int
    slide_stride: int
    logit_scale: float
    prob_thd: float
    area_thd: float | None = None
    long_side: int = 2048
    classnames: str = "default"

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


def _default_preset() -> dict[str, EvalSettings]:
    out = {}
    for name in DATASET_NAMES:
        out[name] = EvalSettings(
            short_side=560 if name == "cityscapes" else 336,
            slide_crop=224,
            slide_stride=112,
            logit_scale=40.0,
            prob_thd=0.1 if name in BACKGROUND_DATASETS else 0.0,
        )
    return out


def _naclip_preset() -> dict[str, EvalSettings]:
    out = _default_preset()
    for name in ("voc21", "voc20"):
        out[name] = dataclasses.replace(out[name], slide_crop=0)  # whole image (slide_stride unused)
    return out


def _sclip_preset() -> dict[str, EvalSettings]:
    out = _default_preset()
    out["voc21"] = dataclasses.replace(out["voc21"], logit_scale=65.0, area_thd=0.1)
    out["context60"] = dataclasses.replace(out["context60"], logit_scale=50.0)
    out["coco_object"] = dataclasses.replace(out["coco_object"], logit_scale=50.0)
    out["coco_stuff"] = dataclasses.replace(out["coco_stuff"], short_side=448)
    return out


def _fsa_preset() -> dict[str, EvalSettings]:
    prob = {"voc21": 0.20, "context60": 0.14, "coco_object": 0.30}
    out = {}
    for name in DATASET_NAMES:
        out[name] = EvalSettings(
            short_side=448 if name in ("cityscapes", "ade20k") else 336,
            slide_crop=224 if name == "cityscapes" else 336,
            slide_stride=80 if name == "cityscapes" else 112,
            logit_scale=40.0,
            prob_thd=prob.get(name, 0.0),
            classnames="fsa",
        )
    return out


DATASET_SETTINGS: dict[str, EvalSettings] = _default_preset()

PRESETS: dict[str, dict[str, EvalSettings]] = {
    "default": DATASET_SETTINGS,
    "naclip": _naclip_preset(),
    "sclip": _sclip_preset(),
    "fsa": _fsa_preset(),
}


def check_preset(preset: str) -> str:
    key = str(preset).strip().lower()
    if key not in PRESETS:
        raise RfclipError(f"unknown settings preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return key


def get_settings(dataset: str, preset: str = "default") -> EvalSettings:
    """The :class:`EvalSettings` of ``dataset`` under ``preset`` (``default``, ``naclip``, ``sclip``, ``fsa``)."""
    return PRESETS[check_preset(preset)][canonical_dataset_name(dataset)]
