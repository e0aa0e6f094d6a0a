"""Each paper's protocol: settings presets against tables written from the repositories' configs, the image
normalisation constants, ClearCLIP / ProxyCLIP crop padding, and `eval --help`."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfclip.constants import CLIP_MEAN, CLIP_STD
from rfclip.data import DATASET_NAMES, load_classnames
from rfclip.data.settings import PRESET_INFO, PRESETS, EvalSettings, get_settings, preset_settings, register_preset
from rfclip.errors import RfclipError
from rfclip.evaluate import configure
from rfclip.inference import InferenceConfig, crop_padding, dense_logits, padding_multiple, preprocess
from rfclip.segmenter import Segmenter

FAST = dict(text_cache=False, device="cpu", templates=["a photo of a {}."])

# mmseg SegDataPreProcessor of every repository below (SCLIP clip_segmentor.py, NACLIP naclip.py, ClearCLIP
# clearclip_segmentor.py, ProxyCLIP proxyclip_segmentor.py, FSA FSA_Proxy_segmentor.py)
MMSEG_MEAN, MMSEG_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)

ORDER = ("voc21", "voc20", "context60", "context59", "coco_stuff", "coco_object", "ade20k", "cityscapes")
# Written from the configs (configs/cfg_*.py: Resize scale=(2048, S) and model overrides; segmentor defaults):
# short side, slide crop, slide stride, logit scale, prob_thd, area_thd -- in ORDER.
SOURCE_TABLES = {
    # SCLIP / NACLIP configs: segmentor defaults 224/112, logit 40; prob_thd 0.1 where a background class is
    "default": [(336, 224, 112, 40, 0.1, None), (336, 224, 112, 40, 0.0, None), (336, 224, 112, 40, 0.1, None),
                (336, 224, 112, 40, 0.0, None), (336, 224, 112, 40, 0.0, None), (336, 224, 112, 40, 0.1, None),
                (336, 224, 112, 40, 0.0, None), (560, 224, 112, 40, 0.0, None)],
    # NACLIP (protocol.md §4b): whole image on VOC21 / VOC20
    "naclip": [(336, 0, 112, 40, 0.1, None), (336, 0, 112, 40, 0.0, None), (336, 224, 112, 40, 0.1, None),
               (336, 224, 112, 40, 0.0, None), (336, 224, 112, 40, 0.0, None), (336, 224, 112, 40, 0.1, None),
               (336, 224, 112, 40, 0.0, None), (560, 224, 112, 40, 0.0, None)],
    # SCLIP cfg_voc21: logit_scale=65, prob_thd=0.1, area_thd=0.1; cfg_context60 / cfg_coco_object: 50, 0.1;
    # cfg_coco_stuff164k: scale (2048, 448); cfg_city_scapes: (2048, 560)
    "sclip": [(336, 224, 112, 65, 0.1, 0.1), (336, 224, 112, 40, 0.0, None), (336, 224, 112, 50, 0.1, None),
              (336, 224, 112, 40, 0.0, None), (448, 224, 112, 40, 0.0, None), (336, 224, 112, 50, 0.1, None),
              (336, 224, 112, 40, 0.0, None), (560, 224, 112, 40, 0.0, None)],
    # ClearCLIP: Resize (2048, 448) everywhere; segmentor slide_crop=448, slide_stride=224, logit_scale=50;
    # cfg_voc21 prob_thd=0.5, cfg_context60 0.15, cfg_coco_object 0.4, cfg_city_scapes slide_crop=224
    "clearclip": [(448, 448, 224, 50, 0.5, None), (448, 448, 224, 50, 0.0, None), (448, 448, 224, 50, 0.15, None),
                  (448, 448, 224, 50, 0.0, None), (448, 448, 224, 50, 0.0, None), (448, 448, 224, 50, 0.4, None),
                  (448, 448, 224, 50, 0.0, None), (448, 224, 224, 50, 0.0, None)],
    # ProxyCLIP: segmentor slide_crop=336, slide_stride=112, logit_scale=40; cfg_voc21 prob_thd=0.2, cfg_context60
    # 0.15, cfg_coco_object 0.25; cfg_ade20k Resize (2048, 448); cfg_city_scapes (2048, 448), 224/112
    "proxyclip": [(336, 336, 112, 40, 0.2, None), (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.15, None),
                  (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.25, None),
                  (448, 336, 112, 40, 0.0, None), (448, 224, 112, 40, 0.0, None)],
    # FSA: as ProxyCLIP with cfg_voc21 0.2, cfg_context60 0.14, cfg_coco_object 0.3, cfg_city_scapes stride 80
    "fsa": [(336, 336, 112, 40, 0.2, None), (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.14, None),
            (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.3, None),
            (448, 336, 112, 40, 0.0, None), (448, 224, 80, 40, 0.0, None)],
    # released RF-CLIP (c2b333e): segmentor 224/112, logit 40; cfg_voc21 / cfg_coco_stuff164k slide_crop=0; prob_thd
    # 0.1 on cfg_voc21 / cfg_context60 / cfg_coco_object; cfg_city_scapes (2048, 560) (method options: test_rfclip_release)
    "rfclip_release": [(336, 0, 112, 40, 0.1, None), (336, 224, 112, 40, 0.0, None), (336, 224, 112, 40, 0.1, None),
                       (336, 224, 112, 40, 0.0, None), (336, 0, 112, 40, 0.0, None), (336, 224, 112, 40, 0.1, None),
                       (336, 224, 112, 40, 0.0, None), (560, 224, 112, 40, 0.0, None)],
    # CorrCLIP v1 (CorrCLIPv1/configs): slide 336/112 (cfg_city_scapes 224/112), Resize (2048, 336), (2048, 448) on
    # ADE20K and Cityscapes, logit 40, prob_thd 0.2 / 0.15 / 0.25 on VOC21 / Context60 / COCO-Object
    "corrclip": [(336, 336, 112, 40, 0.2, None), (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.15, None),
                 (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.0, None), (336, 336, 112, 40, 0.25, None),
                 (448, 336, 112, 40, 0.0, None), (448, 224, 112, 40, 0.0, None)],
}
# class-name set, crop padding (ClearCLIP: compute_padsize(H, W, patch_size); ProxyCLIP / FSA: compute_padsize(.., 56))
SOURCE_COMMON = {"default": ("default", 0), "naclip": ("default", 0), "sclip": ("default", 0),
                 "clearclip": ("clearclip", "patch"), "proxyclip": ("fsa", 56), "fsa": ("fsa", 56),
                 "rfclip_release": ("default", 0), "corrclip": ("corrclip", 56)}


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("preset", list(SOURCE_TABLES))
def test_preset_is_its_repository_table(preset):
    classnames, pad = SOURCE_COMMON[preset]
    for name, (short, crop, stride, logit, thd, area) in zip(ORDER, SOURCE_TABLES[preset]):
        s = get_settings(name, preset)
        assert (s.short_side, s.slide_crop, s.slide_stride, s.logit_scale, s.area_thd) == (short, crop, stride, logit, area), \
            (preset, name)
        assert s.prob_thd == pytest.approx(thd), (preset, name)
        assert (s.classnames, s.pad_crops_to, s.long_side) == (classnames, pad, 2048), (preset, name)
        assert (s.pixel_mean, s.pixel_std) == (MMSEG_MEAN, MMSEG_STD), (preset, name)
    assert PRESET_INFO[preset].source and PRESET_INFO[preset].description


def test_every_preset_is_tested_and_default_is_exact_clip():
    assert set(PRESETS) == set(SOURCE_TABLES)
    cfg = InferenceConfig()
    assert cfg.pixel_mean == tuple(255 * m for m in CLIP_MEAN) and cfg.pixel_std == tuple(255 * s for s in CLIP_STD)
    assert cfg.pad_crops_to == 0
    assert EvalSettings(336, 224, 112, 40.0, 0.0).pixel_mean == cfg.pixel_mean  # outside the presets: exact CLIP


def test_preset_settings_reach_the_segmenter(tiny_clip):
    seg = Segmenter(tiny_clip, method="clearclip", **FAST)
    dataset = types.SimpleNamespace(settings=get_settings("voc21", "clearclip"), background_class=0)
    cfg = configure(seg, dataset).config
    assert (cfg.short_side, cfg.slide_crop, cfg.slide_stride, cfg.logit_scale, cfg.prob_thd) == (448, 448, 224, 50, 0.5)
    assert (cfg.pixel_mean, cfg.pixel_std, cfg.pad_crops_to) == (MMSEG_MEAN, MMSEG_STD, "patch")
    dataset.settings = get_settings("cityscapes", "proxyclip")
    cfg = configure(seg, dataset, overrides={"pad_crops_to": 0}).config
    assert (cfg.short_side, cfg.slide_crop, cfg.slide_stride, cfg.pad_crops_to) == (448, 224, 112, 0)


def test_clearclip_voc21_class_names():
    voc = load_classnames("voc21", "clearclip")
    assert voc[0] == ["background"] and voc[15] == ["person"] and voc[20] == ["tvmonitor"]
    assert len(voc) == 21 and all(len(c) == 1 for c in voc)
    for name in DATASET_NAMES[1:]:  # ClearCLIP's other files are not public: the SCLIP/NACLIP ones
        assert load_classnames(name, "clearclip") == load_classnames(name), name
    assert load_classnames("voc21", "proxyclip") == load_classnames("voc21", "fsa")


def test_one_more_preset_is_one_table():
    rows = {name: (336, 0 if name in ("voc21", "coco_stuff") else 224, 112, 40.0, 0.1 if name == "voc21" else 0.0)
            for name in DATASET_NAMES}
    try:
        register_preset("test_release", "a test table", "tests", preset_settings(rows, pixel_mean=MMSEG_MEAN,
                                                                                 pixel_std=MMSEG_STD))
        s = get_settings("VOC21", "Test_Release")
        assert s.whole_image and s.prob_thd == 0.1 and s.pixel_mean == MMSEG_MEAN
        assert get_settings("ade20k", "test_release").slide_crop == 224
        with pytest.warns(UserWarning, match="registered again"):
            register_preset("test_release", "again", "tests", preset_settings(rows))
        with pytest.raises(ValueError, match="one row per dataset"):
            preset_settings({"voc21": rows["voc21"]})
    finally:
        PRESETS.pop("test_release", None)
        PRESET_INFO.pop("test_release", None)
    with pytest.raises(RfclipError, match="unknown settings preset.*clearclip"):
        get_settings("voc21", "test_release")


def test_eval_help_describes_the_presets():
    out = subprocess.run([sys.executable, "-m", "rfclip", "eval", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "ClearCLIP setup" not in out
    assert re.search(r"\n  default +the common SCLIP/NACLIP protocol the RF-CLIP paper follows", out)
    for name in PRESETS:
        assert f"\n  {name} " in out, name
    assert "--pad-crops-to" in out


# ------------------------------------------------------------------------------------------------ normalisation
def test_preprocess_with_the_mmseg_constants(rng):
    image = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    got = preprocess(image, None, mean=MMSEG_MEAN, std=MMSEG_STD)
    want = (torch.from_numpy(image).permute(2, 0, 1).float() - torch.tensor(MMSEG_MEAN).view(3, 1, 1)) \
        / torch.tensor(MMSEG_STD).view(3, 1, 1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    exact = preprocess(image, None)
    assert 1e-5 < (exact - got).abs().max() < 1e-3  # the rounding is small but not nothing


def test_pixel_stats_option_and_errors(tiny_clip, random_image):
    seg = Segmenter(tiny_clip, method="clip", pixel_mean=[122.771, 116.746, 104.094], pixel_std=MMSEG_STD, **FAST)
    assert seg.config.pixel_mean == MMSEG_MEAN  # lists from --option become tuples
    exact = Segmenter(tiny_clip, method="clip", **FAST)
    a = seg.segment(random_image, "cat;dog").probs
    b = exact.segment(random_image, "cat;dog").probs
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 1e-2
    with pytest.raises(RfclipError, match="pixel_mean / pixel_std"):
        Segmenter(tiny_clip, method="clip", pixel_std=(1.0, 0.0, 1.0), **FAST)
    with pytest.raises(RfclipError, match="pixel_mean / pixel_std"):
        exact.with_config(pixel_mean=(1.0, 2.0))
    with pytest.raises(RfclipError, match="pad_crops_to"):
        exact.with_config(pad_crops_to="half")


# ------------------------------------------------------------------------------------------------ crop padding
def test_crop_padding_is_compute_padsize():
    # compute_padsize(H, W, p): lr = p - W % p, l = lr // 2, r = lr - l (the same for t, b from H)
    assert crop_padding(336, 336, 56) == (0, 0, 0, 0)
    assert crop_padding(300, 330, 56) == (3, 3, 18, 18)
    assert crop_padding(17, 31, 16) == (0, 1, 7, 8)
    assert crop_padding(100, 100, 0) == (0, 0, 0, 0)
    assert padding_multiple("patch", 14) == 14 and padding_multiple(56, 16) == 56 and padding_multiple(0, 16) == 0


def test_padded_crops_equal_the_reference_loop(tiny_clip, rng):
    """ClearCLIP's / ProxyCLIP's forward_slide with padding: each crop zero-padded (centred) to multiples of p, its
    logits upsampled to the padded size, the padding cut off, the crops averaged."""
    seg = Segmenter(tiny_clip, method="clearclip", **FAST)
    text = seg.encode_classes("cat;dog;grass")
    image = torch.from_numpy(rng.standard_normal((3, 70, 90)).astype(np.float32))
    crop, stride, p = 40, 30, 16
    got = dense_logits(seg.encoder, seg.method, [image], text, crop, stride, pad_to=p)[0]
    Q = text.features.shape[0]
    canvas, count = torch.zeros(Q, 70, 90), torch.zeros(1, 70, 90)
    for h_idx in range(max(70 - crop + stride - 1, 0) // stride + 1):
        for w_idx in range(max(90 - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(h_idx * stride + crop, 70), min(w_idx * stride + crop, 90)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            c = image[None, :, y1:y2, x1:x2]
            H, W = c.shape[-2:]
            lr, tb = (p - W % p) % p, (p - H % p) % p
            l, t = lr // 2, tb // 2
            c = F.pad(c, (l, lr - l, t, tb - t))
            feats, grid, _ = seg.encoder(c, seg.method)
            logits = (F.normalize(feats, dim=-1) @ text.features.T).transpose(1, 2).reshape(1, Q, *grid)
            logits = F.interpolate(logits, size=c.shape[-2:], mode="bilinear", align_corners=False)
            canvas[:, y1:y2, x1:x2] += logits[0, :, t:t + H, l:l + W]
            count[:, y1:y2, x1:x2] += 1
    torch.testing.assert_close(got, canvas / count, atol=1e-5, rtol=1e-5)
    unpadded = dense_logits(seg.encoder, seg.method, [image], text, crop, stride)[0]
    assert (got - unpadded).abs().max() > 1e-3  # 40 px crops: padding changes the grid


def test_segmenter_pads_to_the_patch_size(tiny_clip, random_image):
    seg = Segmenter(tiny_clip, method="clearclip", short_side=None, slide_crop=100, slide_stride=60, **FAST)
    text = seg.encode_classes("cat;dog")
    (m0, p0), = seg.predict([random_image], text)
    (m1, p1), = seg.with_config(pad_crops_to="patch").predict([random_image], text)
    (m2, p2), = seg.with_config(pad_crops_to=16).predict([random_image], text)
    assert torch.equal(p1, p2) and not torch.equal(p0, p1)
    assert p1.shape == p0.shape and torch.isfinite(p1).all()
