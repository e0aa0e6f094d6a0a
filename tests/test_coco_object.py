"""COCO-Object conversion (protocol §1.3) on a generated raw COCO-Stuff sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfclip.data.coco_object import (
    CLSID_TO_TRID,
    COCO_OBJECT_LUT,
    UNUSED_THING_IDS,
    convert_coco_object,
    convert_mask,
    output_name,
)
from rfclip.data.datasets import build_dataset, load_classnames
from rfclip.errors import RfclipError

# raw value -> expected COCO-Object id (reference semantics)
EXPECTED = {
    0: 1,  # person
    1: 2,  # bicycle
    2: 3,  # car
    9: 10,  # traffic light
    10: 11,  # fire hydrant
    12: 12,  # stop sign (raw 11 is unused: raw 12 -> dense 11 -> +1)
    89: 80,  # toothbrush
    91: 0,  # first stuff class
    150: 0,
    181: 0,  # last stuff class
    255: 0,  # unlabeled -> background, not ignore
    11: 11,  # unused id: no entry, passes through unchanged
    90: 90,  # unused id
    200: 200,  # no entry (never in real data): unchanged
}


def test_table():
    assert len(CLSID_TO_TRID) == 171 + 1
    things = [k for k in CLSID_TO_TRID if k <= 90]
    assert len(things) == 80 and sorted(CLSID_TO_TRID[k] for k in things) == list(range(1, 81))
    assert all(CLSID_TO_TRID[k] == 0 for k in CLSID_TO_TRID if k > 90)
    assert not set(UNUSED_THING_IDS) & set(CLSID_TO_TRID)
    for raw, out in EXPECTED.items():
        assert COCO_OBJECT_LUT[raw] == out, raw
    names = load_classnames("coco_object")
    assert names[CLSID_TO_TRID[0]][0] == "person" and names[CLSID_TO_TRID[2]] == ["car"]
    assert names[CLSID_TO_TRID[9]] == ["traffic light"] and names[CLSID_TO_TRID[10]] == ["fire hydrant"]
    assert names[CLSID_TO_TRID[12]] == ["stop sign"] and names[CLSID_TO_TRID[89]] == ["toothbrush"]


def test_convert_mask_dtype():
    m = np.array([[0, 2, 255]], dtype=np.int64)
    out = convert_mask(m)
    assert out.dtype == np.uint8 and out.tolist() == [[1, 3, 0]]
    with pytest.raises(RfclipError):
        convert_mask(np.array([[300]]))


def test_output_name():
    assert output_name("/x/000000000139.png") == "000000000139_instanceTrainIds.png"
    assert output_name("a.b.png") == "a_instanceTrainIds.png"  # the reference splits at the first dot


RAW = np.array([[0, 2, 11, 91, 181, 255],
                [1, 10, 12, 89, 90, 9],
                [200, 0, 0, 255, 255, 2]], dtype=np.uint8)


def _make_coco(root: Path, splits=("val2017",), n=2) -> dict:
    raws = {}
    for split in splits:
        for i in range(n):
            name = f"0000000001{i:02d}" if split == "val2017" else f"0000000009{i:02d}"
            img_dir = root / "images" / split
            ann_dir = root / "annotations" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            ann_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((3, 6, 3), 100 + i, np.uint8)).save(img_dir / f"{name}.jpg")
            raw = np.roll(RAW, i, axis=1)
            Image.fromarray(raw).save(ann_dir / f"{name}.png")
            # mmseg's COCO-Stuff output lives next to the raw files and must be skipped
            Image.fromarray(np.full_like(raw, 5)).save(ann_dir / f"{name}_labelTrainIds.png")
            raws[(split, name)] = raw
    return raws


def _expected(raw):
    return np.vectorize(lambda v: EXPECTED[int(v)])(raw).astype(np.uint8)


def test_convert_in_place(tmp_path):
    root = tmp_path / "coco_stuff164k"
    raws = _make_coco(root)
    done = convert_coco_object(root, progress=False, num_workers=0)
    assert done == {"val2017": 2}
    ann = root / "annotations" / "val2017"
    assert sorted(p.name for p in ann.iterdir()) == sorted(
        [f"{n}.png" for _, n in raws] + [f"{n}_labelTrainIds.png" for _, n in raws]
        + [f"{n}_instanceTrainIds.png" for _, n in raws]
    )
    for (_, name), raw in raws.items():
        with Image.open(ann / f"{name}_instanceTrainIds.png") as im:
            assert im.mode == "L"
            out = np.array(im)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, _expected(raw))
    # specific pixels of the first file
    with Image.open(ann / "000000000100_instanceTrainIds.png") as im:
        out = np.array(im)
    assert out[0, 0] == 1 and out[0, 1] == 3 and out[0, 2] == 11 and out[0, 3] == 0 and out[0, 5] == 0
    # running again (now with *_instanceTrainIds.png present) converts the same raw files only
    assert convert_coco_object(root, progress=False, num_workers=2) == {"val2017": 2}
    assert len(list(ann.iterdir())) == 6

    ds = build_dataset("coco_object", root)
    assert len(ds) == 2
    item = ds[0]
    np.testing.assert_array_equal(item["label"], _expected(raws[("val2017", "000000000100")]).astype(np.int64))
    assert item["image"].shape == (3, 6, 3)


def test_convert_to_other_root_with_train(tmp_path):
    src = tmp_path / "coco_stuff164k"
    raws = _make_coco(src, splits=("train2017", "val2017"))
    out = tmp_path / "coco_object"
    done = convert_coco_object(src, out, splits=("train2017", "val2017"), progress=False, num_workers=2)
    assert done == {"train2017": 2, "val2017": 2}
    for split in ("train2017", "val2017"):
        assert sorted(p.name for p in (out / "images" / split).iterdir()) == sorted(
            f"{n}.jpg" for s, n in raws if s == split)
        assert sorted(p.name for p in (out / "annotations" / split).iterdir()) == sorted(
            f"{n}_instanceTrainIds.png" for s, n in raws if s == split)
    # the input folder is untouched
    assert not list((src / "annotations" / "val2017").glob("*_instanceTrainIds.png"))
    np.testing.assert_array_equal(build_dataset("coco_object", out)[1]["label"],
                                  _expected(raws[("val2017", "000000000101")]))
    # images already copied are skipped on a second run
    assert convert_coco_object(src, out, progress=False) == {"val2017": 2}


def test_check_count(tmp_path):
    root = tmp_path / "coco_stuff164k"
    _make_coco(root)
    with pytest.raises(RfclipError, match="found 2 raw labels.*expected 123287"):
        convert_coco_object(root, check_count=True, progress=False)
    assert not list((root / "annotations" / "val2017").glob("*_instanceTrainIds.png"))


def test_errors(tmp_path):
    with pytest.raises(RfclipError, match="does not exist"):
        convert_coco_object(tmp_path / "nope", progress=False)
    root = tmp_path / "coco_stuff164k"
    root.mkdir()
    with pytest.raises(RfclipError, match="missing folder annotations/val2017"):
        convert_coco_object(root, progress=False)
    (root / "annotations" / "val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(root / "annotations" / "val2017" / "x_labelTrainIds.png")
    with pytest.raises(RfclipError, match="no raw"):
        convert_coco_object(root, progress=False)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(root / "annotations" / "val2017" / "x.png")
    with pytest.raises(RfclipError, match="missing folder images/val2017"):
        convert_coco_object(root, tmp_path / "out", progress=False)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "annotations" / "val2017" / "y.png")
    with pytest.raises(RfclipError, match="not single-channel"):
        convert_coco_object(root, progress=False, num_workers=2)
