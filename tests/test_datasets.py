"""Dataset readers on tiny generated datasets in every mmseg layout, class-name files and settings presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.data.datasets import (
    DATASETS,
    SegDataset,
    build_dataset,
    collate,
    find_dataset_root,
    load_classnames,
    parse_classnames,
)
from rfclip.data.settings import DATASET_NAMES, DATASET_SETTINGS, PRESETS, EvalSettings, get_settings
from rfclip.errors import RfclipError

from conftest import voc_palette

H, W = 20, 30


def _write_image(path: Path, seed: int, fmt: str = "JPEG") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # smooth image so JPEG round-trips closely
    base = rng.integers(0, 256, size=(1, 1, 3))
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.clip(base + yy[..., None] * 3 + xx[..., None] * 2, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format=fmt, **({"quality": 98} if fmt == "JPEG" else {}))
    return img


def _label(seed: int, values: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.choice(np.array(values, dtype=np.uint8), size=(H, W))
    lab[0, : len(values)] = values  # every value present
    return lab


def _write_label(path: Path, lab: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lab = np.ascontiguousarray(lab, dtype=np.uint8)
    if palette:
        im = Image.frombytes("P", (lab.shape[1], lab.shape[0]), lab.tobytes())
        im.putpalette(voc_palette())
    else:
        im = Image.fromarray(lab)  # mode L
    im.save(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """All eight layouts under one common folder (mmseg default folder names). Returns the common folder."""
    base = tmp_path_factory.mktemp("data")
    truth = {}

    # VOC2012: 3 images on disk, split lists 2 of them (with a blank line at the end)
    voc = base / "VOCdevkit" / "VOC2012"
    vals = [0, 1, 15, 20, 255]
    for i, n in enumerate(["2007_000001", "2007_000002", "2007_000003"]):
        _write_image(voc / "JPEGImages" / f"{n}.jpg", i)
        lab = _label(i, vals)
        _write_label(voc / "SegmentationClass" / f"{n}.png", lab, palette=True)
        truth[("voc", n)] = lab
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000003\n\n")

    # VOC2010 / Context
    ctx = base / "VOCdevkit" / "VOC2010"
    vals = [0, 1, 30, 59, 255]
    for i, n in enumerate(["2008_000002", "2008_000003"]):
        _write_image(ctx / "JPEGImages" / f"{n}.jpg", 10 + i)
        lab = _label(10 + i, vals)
        _write_label(ctx / "SegmentationClassContext" / f"{n}.png", lab, palette=True)
        truth[("ctx", n)] = lab
    (ctx / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (ctx / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n2008_000003")

    # COCO-Stuff164k with both label kinds (and the raw PNG, which must not be read)
    coco = base / "coco_stuff164k"
    for i, n in enumerate(["000000000139", "000000000285"]):
        _write_image(coco / "images" / "val2017" / f"{n}.jpg", 20 + i)
        stuff = _label(20 + i, [0, 5, 170, 255])
        obj = _label(30 + i, [0, 1, 80, 255])
        _write_label(coco / "annotations" / "val2017" / f"{n}_labelTrainIds.png", stuff, palette=False)
        _write_label(coco / "annotations" / "val2017" / f"{n}_instanceTrainIds.png", obj, palette=False)
        _write_label(coco / "annotations" / "val2017" / f"{n}.png", np.full((H, W), 7, np.uint8), palette=False)
        truth[("stuff", n)] = stuff
        truth[("obj", n)] = obj

    # ADE20K
    ade = base / "ADEChallengeData2016"
    for i, n in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        _write_image(ade / "images" / "validation" / f"{n}.jpg", 40 + i)
        lab = _label(40 + i, [0, 1, 75, 150])
        _write_label(ade / "annotations" / "validation" / f"{n}.png", lab, palette=False)
        truth[("ade", n)] = lab

    # Cityscapes: city subfolders, PNG images, other files around
    city = base / "cityscapes"
    for i, (c, n) in enumerate([("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019"),
                                ("frankfurt", "frankfurt_000000_000576")]):
        img = _write_image(city / "leftImg8bit" / "val" / c / f"{n}_leftImg8bit.png", 50 + i, fmt="PNG")
        lab = _label(50 + i, [0, 7, 18, 255])
        _write_label(city / "gtFine" / "val" / c / f"{n}_gtFine_labelTrainIds.png", lab, palette=False)
        _write_label(city / "gtFine" / "val" / c / f"{n}_gtFine_labelIds.png", lab + 1, palette=False)
        truth[("city", f"{c}/{n}")] = (img, lab)
    (city / "leftImg8bit" / "val" / "lindau" / "notes.txt").write_text("not an image")

    _TRUTH.update(truth)
    return base


_TRUTH: dict = {}


def _reduce(lab: np.ndarray) -> np.ndarray:
    lab = lab.astype(np.int64)
    out = np.where(lab == 0, 255, lab - 1)
    out[out == 254] = 255
    return out


# ------------------------------------------------------------------------------------------------ readers
def test_voc21_palette_indices_and_split(data_dir):
    ds = build_dataset("voc21", data_dir / "VOCdevkit" / "VOC2012")
    assert len(ds) == 2  # split list, not directory scan
    assert [ds[i]["name"] for i in range(2)] == ["2007_000001", "2007_000003"]
    # the PNGs really are palette images whose RGB values differ from the indices
    with Image.open(data_dir / "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png") as im:
        assert im.mode == "P"
        assert not np.array_equal(np.array(im.convert("L")), np.array(im))
    item = ds[0]
    assert item["label"].dtype == np.int64 and item["label"].shape == (H, W)
    np.testing.assert_array_equal(item["label"], _TRUTH[("voc", "2007_000001")].astype(np.int64))
    assert set(np.unique(item["label"])) == {0, 1, 15, 20, 255}
    assert item["image"].dtype == np.uint8 and item["image"].shape == (H, W, 3)
    assert item["index"] == 0
    assert ds.num_classes == 21 and len(ds.classes) == 21
    assert ds.background_class == 0 and ds.ignore_index == 255
    assert ds.settings == get_settings("voc21")
    assert ds.name == "voc21"


def test_voc20_reduce_zero_label(data_dir):
    ds = build_dataset("voc20", data_dir / "VOCdevkit" / "VOC2012")
    lab = ds[1]["label"]
    raw = _TRUTH[("voc", "2007_000003")]
    np.testing.assert_array_equal(lab, _reduce(raw))
    assert (lab[raw == 0] == 255).all() and (lab[raw == 255] == 255).all()
    assert (lab[raw == 1] == 0).all() and (lab[raw == 20] == 19).all() and (lab[raw == 15] == 14).all()
    assert ds.num_classes == 20 and ds.background_class is None


def test_context60_and_59(data_dir):
    root = data_dir / "VOCdevkit" / "VOC2010"
    d60 = build_dataset("context60", root)
    d59 = build_dataset("context59", root)
    assert len(d60) == len(d59) == 2
    raw = _TRUTH[("ctx", "2008_000003")]
    np.testing.assert_array_equal(d60[1]["label"], raw.astype(np.int64))
    np.testing.assert_array_equal(d59[1]["label"], _reduce(raw))
    assert (d59[1]["label"][raw == 59] == 58).all()
    assert d60.num_classes == 60 and d59.num_classes == 59
    assert d60.background_class == 0 and d59.background_class is None


def test_coco_stuff_and_object(data_dir):
    root = data_dir / "coco_stuff164k"
    stuff = build_dataset("coco_stuff", root)
    obj = build_dataset("coco_object", root)
    assert [stuff[i]["name"] for i in range(2)] == ["000000000139", "000000000285"]
    assert len(obj) == 2
    np.testing.assert_array_equal(stuff[0]["label"], _TRUTH[("stuff", "000000000139")].astype(np.int64))
    np.testing.assert_array_equal(obj[1]["label"], _TRUTH[("obj", "000000000285")].astype(np.int64))
    assert stuff.num_classes == 171 and obj.num_classes == 81
    assert obj.background_class == 0 and stuff.background_class is None


def test_ade20k_reduce(data_dir):
    ds = build_dataset("ade20k", data_dir / "ADEChallengeData2016")
    raw = _TRUTH[("ade", "ADE_val_00000002")]
    lab = ds[1]["label"]
    np.testing.assert_array_equal(lab, _reduce(raw))
    assert (lab[raw == 0] == 255).all() and (lab[raw == 150] == 149).all()
    assert ds.num_classes == 150


def test_cityscapes_recursive(data_dir):
    ds = build_dataset("cityscapes", data_dir / "cityscapes")
    names = [s[2] for s in ds.samples]
    assert names == ["frankfurt/frankfurt_000000_000294", "frankfurt/frankfurt_000000_000576",
                     "lindau/lindau_000000_000019"]
    for i, n in enumerate(names):
        item = ds[i]
        img, lab = _TRUTH[("city", n)]
        np.testing.assert_array_equal(item["image"], img)  # PNG: exact
        np.testing.assert_array_equal(item["label"], lab.astype(np.int64))  # labelTrainIds, not labelIds
    assert ds.num_classes == 19 and ds.settings.short_side == 560


def test_jpeg_decoded_rgb(data_dir):
    ds = build_dataset("ade20k", data_dir / "ADEChallengeData2016")
    with Image.open(ds.samples[0][0]) as im:
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(ds[0]["image"], ref)


def test_split_argument(data_dir, tmp_path):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(data_dir / "VOCdevkit" / "VOC2012", root)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n")
    ds = build_dataset("voc21", root, split="train")
    assert len(ds) == 1 and ds[0]["name"] == "2007_000002"


def test_dataloader_workers_and_collate(data_dir):
    ds = build_dataset("cityscapes", data_dir / "cityscapes")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 1]
    assert isinstance(batches[0], list) and isinstance(batches[0][0]["image"], np.ndarray)
    assert [b["name"] for batch in batches for b in batch] == [s[2] for s in ds.samples]


def test_preset_changes_settings_and_classnames(data_dir):
    ds = build_dataset("voc21", data_dir / "VOCdevkit" / "VOC2012", preset="fsa")
    assert ds.settings.slide_crop == 336 and ds.settings.prob_thd == pytest.approx(0.20)
    assert sum(len(c) for c in ds.classes) == 46
    assert ds.classes[20] == ["tvmonitor"]


# ------------------------------------------------------------------------------------------------ errors
def test_missing_root(tmp_path):
    with pytest.raises(RfclipError, match="does not exist"):
        build_dataset("voc21", tmp_path / "nope")


def test_wrong_root_names_missing_folder(data_dir):
    with pytest.raises(RfclipError) as e:
        build_dataset("voc21", data_dir / "VOCdevkit")  # one level too high
    msg = str(e.value)
    assert "missing folder JPEGImages" in msg and "VOCdevkit/VOC2012" in msg and "mmsegmentation" in msg
    with pytest.raises(RfclipError, match="missing folder SegmentationClassContext"):
        build_dataset("context60", data_dir / "VOCdevkit" / "VOC2012")
    with pytest.raises(RfclipError, match="missing folder leftImg8bit/val"):
        build_dataset("cityscapes", data_dir)


def test_missing_split_file(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    with pytest.raises(RfclipError, match="missing file ImageSets/Segmentation/val.txt"):
        build_dataset("voc21", root)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(RfclipError, match="empty"):
        build_dataset("voc21", root)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    with pytest.raises(RfclipError, match="listed images are missing"):
        build_dataset("voc21", root)
    _write_image(root / "JPEGImages" / "a.jpg", 0)
    with pytest.raises(RfclipError, match="label files are missing.*; point --root at .*VOC2012"):
        build_dataset("voc21", root)


def test_empty_image_folder(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(RfclipError, match="no \\*.jpg images in images/validation"):
        build_dataset("ade20k", root)


def test_coco_object_without_converted_labels(tmp_path):
    root = tmp_path / "coco_stuff164k"
    _write_image(root / "images" / "val2017" / "000000000139.jpg", 0)
    _write_label(root / "annotations" / "val2017" / "000000000139.png", np.zeros((H, W), np.uint8), False)
    with pytest.raises(RfclipError, match="convert-coco-object"):
        build_dataset("coco_object", root)


def test_rgb_label_and_size_mismatch(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _write_image(root / "images" / "validation" / "a.jpg", 0)
    _write_image(root / "images" / "validation" / "b.jpg", 1)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "annotations" / "validation" / "a.png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(root / "annotations" / "validation" / "b.png")
    ds = build_dataset("ade20k", root)
    with pytest.raises(RfclipError, match="mode RGB"):
        ds[0]
    with pytest.raises(RfclipError, match="30x20 but its label"):
        ds[1]


def test_unknown_names():
    with pytest.raises(RfclipError, match="unknown dataset 'voc22'.*voc21"):
        get_settings("voc22")
    with pytest.raises(RfclipError, match="unknown settings preset"):
        get_settings("voc21", "mmseg")
    assert get_settings("City-Scapes") is get_settings("cityscapes")
    assert get_settings("coco_stuff164k") is get_settings("coco_stuff")


# ------------------------------------------------------------------------------------------------ find root
def test_find_dataset_root(data_dir, tmp_path):
    assert find_dataset_root("voc21", data_dir) == data_dir / "VOCdevkit" / "VOC2012"
    assert find_dataset_root("voc20", data_dir) == data_dir / "VOCdevkit" / "VOC2012"
    assert find_dataset_root("context59", data_dir) == data_dir / "VOCdevkit" / "VOC2010"
    assert find_dataset_root("coco_stuff", data_dir) == data_dir / "coco_stuff164k"
    assert find_dataset_root("coco_object", data_dir) == data_dir / "coco_stuff164k"
    assert find_dataset_root("ade20k", data_dir) == data_dir / "ADEChallengeData2016"
    assert find_dataset_root("cityscapes", data_dir) == data_dir / "cityscapes"
    with pytest.raises(RfclipError, match="none of"):
        find_dataset_root("ade20k", tmp_path)
    with pytest.raises(RfclipError, match="does not exist"):
        find_dataset_root("ade20k", tmp_path / "nope")
    (tmp_path / "cityscapes").mkdir()  # present but incomplete: the layout error is reported
    with pytest.raises(RfclipError, match="missing folder leftImg8bit/val"):
        find_dataset_root("cityscapes", tmp_path)


# ------------------------------------------------------------------------------------------------ class names
QUERIES = {
    "default": {"voc21": 56, "voc20": 30, "coco_object": 113},
    "fsa": {"voc21": 46, "voc20": 20, "coco_object": 97},
}


@pytest.mark.parametrize("preset", ["default", "naclip", "sclip", "fsa"])
def test_classnames_counts(preset):
    key = "fsa" if preset == "fsa" else "default"
    for name in DATASET_NAMES:
        classes = load_classnames(name, preset)
        assert len(classes) == DATASETS[name].num_classes
        q = sum(len(c) for c in classes)
        assert q == QUERIES[key].get(name, DATASETS[name].num_classes), (name, preset)
        assert all(s and s == s.strip() for c in classes for s in c)


def test_classnames_content():
    voc = load_classnames("voc21")
    assert len(voc[0]) == 26 and voc[0][0] == "sky" and voc[0][-1] == "fence"
    assert voc[4] == ["ship"] and voc[11] == ["table"]
    assert voc[15][0] == "person" and len(voc[15]) == 7
    assert voc[20] == ["television monitor", "tv monitor", "monitor", "television", "screen"]
    fsa = load_classnames("voc21", "fsa")
    assert fsa[0] == voc[0] and fsa[15] == ["person"] and fsa[20] == ["tvmonitor"]
    obj = load_classnames("coco_object", "fsa")
    assert obj[0] == ["sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
                      "bed", "building", "cloud", "floor", "hill", "rail"]
    assert obj[1] == ["person"] and obj[80] == ["toothbrush"]
    assert load_classnames("coco_object")[1][-1] == "body"
    assert load_classnames("context60")[0] == ["background"]
    assert load_classnames("context60")[-1] == ["wood"]
    assert load_classnames("context60", strip=False)[-1] == ["wood "]  # the reference keeps the trailing space
    assert load_classnames("context60", "fsa") == load_classnames("context60")
    assert load_classnames("cityscapes")[0] == ["road"]


def test_parse_classnames():
    assert parse_classnames("a, b\nc ", ", ") == [["a", "b"], ["c"]]
    assert parse_classnames("a, b\nc \n", ", ", strip=False) == [["a", "b"], ["c "]]
    assert parse_classnames("a; b, c\nd", "; ") == [["a", "b, c"], ["d"]]


# ------------------------------------------------------------------------------------------------ settings
def test_default_settings():
    for name in DATASET_NAMES:
        s = DATASET_SETTINGS[name]
        assert (s.slide_crop, s.slide_stride, s.logit_scale, s.area_thd, s.long_side) == (224, 112, 40.0, None, 2048)
        assert s.short_side == (560 if name == "cityscapes" else 336)
        assert s.prob_thd == (0.1 if name in ("voc21", "context60", "coco_object") else 0.0)
        assert s.classnames == "default"
    assert PRESETS["default"] is DATASET_SETTINGS


def test_naclip_settings():
    p = PRESETS["naclip"]
    assert p["voc21"].slide_crop == 0 and p["voc20"].slide_crop == 0 and p["voc21"].whole_image
    assert p["voc21"].prob_thd == 0.1 and p["voc21"].logit_scale == 40
    for name in DATASET_NAMES[2:]:
        assert p[name] == DATASET_SETTINGS[name]


def test_sclip_settings():
    p = PRESETS["sclip"]
    assert (p["voc21"].logit_scale, p["voc21"].area_thd, p["voc21"].prob_thd) == (65.0, 0.1, 0.1)
    assert p["context60"].logit_scale == 50.0 and p["coco_object"].logit_scale == 50.0
    assert p["coco_stuff"].short_side == 448 and p["coco_stuff"].logit_scale == 40.0
    assert p["voc20"] == DATASET_SETTINGS["voc20"] and p["cityscapes"] == DATASET_SETTINGS["cityscapes"]
    assert all(p[n].area_thd is None for n in DATASET_NAMES if n != "voc21")


def test_fsa_settings():
    p = PRESETS["fsa"]
    expected = {  # short, crop, stride, prob_thd
        "voc21": (336, 336, 112, 0.20), "voc20": (336, 336, 112, 0.0), "context60": (336, 336, 112, 0.14),
        "context59": (336, 336, 112, 0.0), "coco_object": (336, 336, 112, 0.30), "coco_stuff": (336, 336, 112, 0.0),
        "cityscapes": (448, 224, 80, 0.0), "ade20k": (448, 336, 112, 0.0),
    }
    for name, (short, crop, stride, thd) in expected.items():
        s = p[name]
        assert (s.short_side, s.slide_crop, s.slide_stride, s.logit_scale) == (short, crop, stride, 40.0)
        assert s.prob_thd == pytest.approx(thd) and s.classnames == "fsa" and s.area_thd is None


def test_settings_frozen_and_replace():
    s = get_settings("voc21")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.short_side = 1
    t = s.replace(short_side=448, prob_thd=None)
    assert t.short_side == 448 and t.prob_thd == s.prob_thd and s.short_side == 336
    with pytest.raises(RfclipError, match="unknown evaluation setting"):
        s.replace(crop=3)
    assert EvalSettings(336, 224, 112, 40.0, 0.0).area_thd is None


def test_explicit_settings_override(data_dir):
    s = get_settings("voc21").replace(slide_crop=0)
    ds = SegDataset("voc21", data_dir / "VOCdevkit" / "VOC2012", settings=s)
    assert ds.settings.whole_image
