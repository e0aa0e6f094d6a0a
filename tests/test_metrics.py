"""mIoU accumulator against hand-computed counts and a transcription of mmseg's IoUMetric; report writers."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from rfclip.data import metrics as M
from rfclip.data.metrics import IoUAccumulator, format_table, write_csv, write_json
from rfclip.errors import RfclipError


def mmseg_reference(preds, gts, num_classes, ignore_index=255):
    """mmseg 1.x IoUMetric.intersect_and_union + compute_metrics (histc-based), transcribed."""
    ti = torch.zeros(num_classes, dtype=torch.float64)
    tu = torch.zeros_like(ti)
    tp = torch.zeros_like(ti)
    tl = torch.zeros_like(ti)
    for pred, label in zip(preds, gts):
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label)
        mask = label != ignore_index
        pred_label = pred[mask]
        label = label[mask]
        intersect = pred_label[pred_label == label]
        kw = dict(bins=num_classes, min=0, max=num_classes - 1)
        ai = torch.histc(intersect.float(), **kw).double()
        ap = torch.histc(pred_label.float(), **kw).double()
        al = torch.histc(label.float(), **kw).double()
        ti += ai
        tp += ap
        tl += al
        tu += ap + al - ai
    iou = (ti / tu).numpy()
    acc = (ti / tl).numpy()
    aacc = (ti.sum() / tl.sum()).item()
    return ti, tu, tp, tl, iou, acc, aacc


def test_hand_computed():
    # K = 3; 255 ignored; class 2 is predicted but never in the ground truth
    gt = np.array([[0, 0, 1, 1],
                   [0, 255, 1, 255]])
    pred = np.array([[0, 1, 1, 2],
                     [0, 2, 1, 0]])
    acc = IoUAccumulator(3)
    acc.update(pred, gt)
    # valid pixels: (0,0) 0/0, (0,1) gt0/p1, (0,2) 1/1, (0,3) gt1/p2, (1,0) 0/0, (1,2) 1/1
    assert acc.intersect.tolist() == [2, 2, 0]
    assert acc.pred_area.tolist() == [2, 3, 1]
    assert acc.gt_area.tolist() == [3, 3, 0]
    assert acc.union.tolist() == [3, 4, 1]
    r = acc.compute()
    assert r["iou"] == pytest.approx([200 / 3, 50.0, 0.0])
    assert r["miou"] == pytest.approx((200 / 3 + 50 + 0) / 3)  # predicted-but-absent class counts as 0
    assert r["aacc"] == pytest.approx(400 / 6)
    assert r["acc"][:2] == pytest.approx([200 / 3, 200 / 3]) and math.isnan(r["acc"][2])
    assert r["macc"] == pytest.approx(200 / 3)
    assert r["num_images"] == 1


def test_absent_class_is_nan_and_left_out():
    gt = np.array([[0, 1], [1, 0]])
    pred = np.array([[0, 1], [0, 0]])
    acc = IoUAccumulator(4)  # classes 2 and 3 neither predicted nor present
    acc.update(pred, gt)
    r = acc.compute()
    assert r["iou"][0] == pytest.approx(200 / 3) and r["iou"][1] == pytest.approx(50.0)
    assert math.isnan(r["iou"][2]) and math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((200 / 3 + 50) / 2)


def test_out_of_range_values():
    # pred 5 and -1 (K=3) are dropped from pred_area but the pixels still count in gt_area;
    # gt 7 (not ignore) is dropped from gt_area but its pixel's in-range prediction counts in pred_area (as mmseg)
    gt = np.array([0, 0, 1, 7, 255])
    pred = np.array([0, 5, -1, 1, 2])
    acc = IoUAccumulator(3)
    acc.update(pred, gt)
    assert acc.intersect.tolist() == [1, 0, 0]
    assert acc.pred_area.tolist() == [1, 1, 0]
    assert acc.gt_area.tolist() == [2, 1, 0]
    ref = mmseg_reference([pred], [gt], 3)
    assert acc.intersect.tolist() == ref[0].long().tolist()
    assert acc.union.tolist() == ref[1].long().tolist()


def test_matches_mmseg_reference_random():
    rng = np.random.default_rng(0)
    k = 7
    preds, gts = [], []
    acc = IoUAccumulator(k)
    for i in range(6):
        h, w = rng.integers(5, 40, size=2)
        gt = rng.integers(0, k, size=(h, w))
        gt[rng.random((h, w)) < 0.15] = 255
        gt[rng.random((h, w)) < 0.03] = 9  # out of range, not ignored
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(-1, k + 2, size=(h, w)))
        pred[pred == 255] = 0
        if i == 2:
            pred[pred == 3] = 4  # class 3 never predicted
        preds.append(pred)
        gts.append(gt)
        acc.update(torch.from_numpy(pred) if i % 2 else pred.astype(np.int32), gt.astype(np.uint8))
    ti, tu, tp, tl, iou, cacc, aacc = mmseg_reference(preds, gts, k)
    assert acc.intersect.tolist() == ti.long().tolist()
    assert acc.union.tolist() == tu.long().tolist()
    assert acc.pred_area.tolist() == tp.long().tolist()
    assert acc.gt_area.tolist() == tl.long().tolist()
    r = acc.compute()
    np.testing.assert_allclose(r["iou"], iou * 100, equal_nan=True)
    np.testing.assert_allclose(r["acc"], cacc * 100, equal_nan=True)
    assert r["miou"] == pytest.approx(np.nanmean(iou) * 100)
    assert r["aacc"] == pytest.approx(aacc * 100)


def test_dataset_level_not_per_image_mean():
    acc = IoUAccumulator(2)
    acc.update(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]))  # image IoU0 = 3/4
    acc.update(np.array([1]), np.array([1]))
    r = acc.compute()
    assert r["iou"] == pytest.approx([75.0, 50.0])  # class 1: 1 / (2 + 1 - 1)


def test_merge_equals_single():
    rng = np.random.default_rng(1)
    data = [(rng.integers(0, 5, (8, 9)), rng.choice([0, 1, 2, 3, 4, 255], (8, 9))) for _ in range(6)]
    single = IoUAccumulator(5)
    a, b = IoUAccumulator(5), IoUAccumulator(5)
    for i, (p, g) in enumerate(data):
        single.update(p, g)
        (a if i < 2 else b).update(p, g)
    merged = a.merge(b)
    assert merged is a
    for key in single.state:
        assert torch.equal(single.state[key], merged.state[key])
    assert merged.num_images == 6
    np.testing.assert_allclose(merged.compute()["iou"], single.compute()["iou"], equal_nan=True)
    with pytest.raises(ValueError):
        a.merge(IoUAccumulator(4))


def test_input_checks_and_dtypes():
    acc = IoUAccumulator(3)
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="integer"):
        acc.update(np.zeros((2, 2), float), np.zeros((2, 2), int))
    ro = np.zeros((2, 2), np.uint8)
    ro.flags.writeable = False
    acc.update(ro, ro)
    acc.update(np.zeros((2, 2), np.uint16), torch.zeros(2, 2, dtype=torch.uint8))
    assert acc.intersect.tolist() == [8, 0, 0]
    assert acc.intersect.dtype == torch.int64
    acc.reset()
    assert acc.intersect.sum() == 0 and acc.num_images == 0


def test_empty_and_all_ignored():
    acc = IoUAccumulator(2)
    acc.update(np.array([[0, 1]]), np.array([[255, 255]]))
    r = acc.compute()
    assert all(math.isnan(v) for v in r["iou"]) and math.isnan(r["miou"]) and math.isnan(r["aacc"])


def test_all_reduce_noop_and_single_process_group(tmp_path):
    import torch.distributed as dist

    acc = IoUAccumulator(3)
    acc.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    before = {k: v.clone() for k, v in acc.state.items()}
    assert acc.all_reduce() is acc  # not initialised: no-op
    for k in before:
        assert torch.equal(before[k], acc.state[k])
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        acc.all_reduce()
        for k in before:
            assert torch.equal(before[k], acc.state[k])
        assert acc.num_images == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs():
    rng = np.random.default_rng(2)
    p, g = rng.integers(0, 4, (30, 40)), rng.choice([0, 1, 2, 3, 255], (30, 40))
    cpu, gpu = IoUAccumulator(4), IoUAccumulator(4)
    cpu.update(p, g)
    gpu.update(torch.from_numpy(p).cuda(), torch.from_numpy(g))
    for k in cpu.state:
        assert torch.equal(cpu.state[k], gpu.state[k])


# ------------------------------------------------------------------------------------------------ reports
def _result():
    acc = IoUAccumulator(3)
    acc.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    return acc.compute()


def test_format_table():
    r = _result()
    text = format_table(r, [["background", "sky"], ["cat"], ["dog"]])
    assert "background" in text and "sky" not in text and "cat" in text
    assert "nan" in text.splitlines()[4]  # dog: absent
    assert text.splitlines()[-1].startswith(f"mIoU: {r['miou']:.2f}")
    assert f"aAcc: {r['aacc']:.2f}" in text
    assert "0 " in format_table(r)  # class indices when no names


def test_write_json_and_csv(tmp_path):
    r = _result()
    p = write_json(tmp_path / "sub" / "res.json", r, {"dataset": "voc21", "path": tmp_path}, ["bg", "cat", "dog"])
    doc = json.loads(p.read_text())
    assert doc["meta"]["dataset"] == "voc21" and doc["meta"]["path"] == str(tmp_path)
    assert doc["result"]["iou"][2] is None and doc["result"]["miou"] == pytest.approx(r["miou"])
    assert doc["class_names"] == ["bg", "cat", "dog"]
    c = write_csv(tmp_path / "res.csv", r, [["bg"], ["cat"], ["dog"]])
    rows = list(csv.reader(c.open()))
    assert rows[0] == ["class_index", "class_name", "iou", "acc"]
    assert rows[2][:2] == ["1", "cat"] and float(rows[2][2]) == pytest.approx(r["iou"][1])
    assert rows[3][2] == "" and len(rows) == 4
    with pytest.raises(ValueError):
        write_csv(tmp_path / "x.csv", r, ["a"])


def test_atomic_write_keeps_old_file_on_error(tmp_path, monkeypatch):
    target = tmp_path / "res.json"
    target.write_text("old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(M.os, "fsync", boom)
    with pytest.raises(RfclipError, match="No space left"):
        write_json(target, _result(), {})
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["res.json"]  # no temp file left behind

    monkeypatch.undo()
    with pytest.raises(TypeError):  # unserialisable meta: fails before anything is written
        write_json(target, _result(), {"x": object()})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["res.json"]
