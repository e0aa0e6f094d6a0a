"""The mask tier end to end on random checkpoints, as a user runs it: ``rfclip masks`` with a real (tiny) SAM
generator, then ``rfclip segment --method corrclip --masks npz:DIR`` (also ``naclip+masks``) reading those files,
an image without a saved map skipped and listed, and a rerun that resumes. Random weights: mechanics, not accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SAM_FEW_POINTS = "points_per_side=2&pred_iou_thresh=0&stability_score_thresh=0"  # random weights: keep every mask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    from segment_anything.build_sam import _build_sam

    from test_evaluate import EVAL_CFG, save_open_clip_folder

    base = tmp_path_factory.mktemp("mask_tier")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    torch.manual_seed(0)
    sam = _build_sam(32, 2, 2, [1], checkpoint=None)  # segment-anything's own constructor, tiny
    torch.save(sam.state_dict(), base / "sam_tiny.pth")  # the release layout: the bare state dict
    dino = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    torch.save(dino.state_dict(), base / "dino_deitsmall8_pretrain.pth")  # DINO's release layout
    return {"images": images, "sam": base / "sam_tiny.pth", "dino": base / "dino_deitsmall8_pretrain.pth",
            "clip": save_open_clip_folder(base / "clip", EVAL_CFG), "cache": base / "cache"}


def test_masks_then_corrclip_and_plugin_segment(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RFCLIP_CACHE", str(files["cache"]))
    maps = tmp_path / "maps"
    assert main(["masks", str(files["images"]), "--masks", f"sam:{files['sam']}?{SAM_FEW_POINTS}", "--out", str(maps),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in maps.iterdir()) == ["img0.npz", "img1.npz", "img2.npz", "run.json"]
    assert json.loads((maps / "run.json").read_text())["counts"]["written"] == 3
    with np.load(maps / "img0.npz", allow_pickle=False) as data:
        region_map = data["instance_mask"]
    assert region_map.shape == (48, 64) and region_map.dtype == np.int32 and region_map.max() > 0

    (maps / "img2.npz").unlink()  # one image without its map: skipped and listed, the others segmented
    common = ["--checkpoint", str(files["clip"]), "--device", "cpu", "--vfm", "vit_small_patch8_224.dino",
              "--vfm-checkpoint", str(files["dino"]), "--short-side", "64", "-q"]
    out = tmp_path / "seg"
    code = main(["segment", str(files["images"]), "--classes", "road;car;sky", "--method", "corrclip", "--masks",
                 f"npz:{maps}", "--out", str(out), *common])
    err = capsys.readouterr().err
    assert code == 2 and "img2" in err and "no region map" in err
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["segmented"] == 2 and [f["image"].endswith("img2.png") for f in run["failed"]] == [True]
    record = json.loads((out / "img0.json").read_text())
    assert record["method"] == "corrclip" and record["settings_id"]
    mask = np.array(Image.open(out / "img0_mask.png"))
    for region in np.unique(region_map[region_map > 0])[1:]:  # map correction: every region but the smallest id
        assert len(np.unique(mask[region_map == region])) == 1

    # the missing map made, the rerun does only that image
    assert main(["masks", str(files["images"]), "--masks", f"sam:{files['sam']}?{SAM_FEW_POINTS}", "--out",
                 str(maps), "--device", "cpu"]) == 0
    before = (out / "img0_mask.png").stat().st_mtime_ns
    assert main(["segment", str(files["images"]), "--classes", "road;car;sky", "--method", "corrclip", "--masks",
                 f"npz:{maps}", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert (out / "img2_mask.png").exists() and (out / "img0_mask.png").stat().st_mtime_ns == before
    # other masks are other settings: refused, naming --overwrite
    code = main(["segment", str(files["images"]), "--classes", "road;car;sky", "--method", "corrclip", "--masks",
                 f"npz:{tmp_path}", "--out", str(out), *common])
    assert code == 2 and "--overwrite" in capsys.readouterr().err

    # +masks on another method: map correction over the same saved maps
    out2 = tmp_path / "plugin"
    assert main(["segment", str(files["images"] / "img0.png"), "--classes", "road;car;sky", "--method",
                 "naclip+masks", "--masks", f"npz:{maps}", "--out", str(out2), "--checkpoint", str(files["clip"]),
                 "--device", "cpu", "-q"]) == 0
    mask = np.array(Image.open(out2 / "img0_mask.png"))
    for region in np.unique(region_map[region_map > 0])[1:]:
        assert len(np.unique(mask[region_map == region])) == 1
