"""Benchmark evaluation end to end: ``evaluate()``, ``rfclip eval``, ``rfclip eval-all`` and ``convert-coco-object``
on generated datasets in the real mmseg layouts, with a random-weight model saved as an open_clip checkpoint folder.

Random weights test the mechanics (settings, batching, counting, files), not accuracy. The model is tiny (2 image
blocks of width 32, 1 text block with a 16-token context) so that the 80-template text pass and the forwards take
well under a second; masks are still compared with labels pixel by pixel.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfclip.cli import main
from rfclip.constants import PAPER_COLUMNS, PAPER_RFCLIP_MIOU
from rfclip.data import IoUAccumulator, build_dataset
from rfclip.errors import RfclipError
from rfclip.evaluate import configure, evaluate, result_paths, shard_batches, summary_markdown
from rfclip.models.loading import load_clip, random_clip
from rfclip.segmenter import Segmenter

from conftest import voc_palette

EVAL_CFG = dict(
    embed_dim=16,
    quick_gelu=True,
    vision_cfg=dict(image_size=64, layers=2, width=32, head_width=16, patch_size=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)
H, W = 48, 64  # image size; --short-side 64 makes it 64 x 85 (4 x 5 patches, 1 or 2 crops of 64)
FAST = ["--device", "cpu", "--short-side", "64", "--num-workers", "0"]


# ---------------------------------------------------------------------------------------------- generated data
def write_palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, np.uint8).tobytes())
    im.putpalette(voc_palette())
    im.save(path)


def make_voc2012(root: Path, num_images: int = 5, seed: int = 0) -> list[str]:
    """``root`` = .../VOCdevkit/VOC2012 with JPEG images, palette labels (0..20, 255 borders) and val.txt."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(num_images):
        name = f"2008_{i:06d}"
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:H, 0:W]
        img = np.clip(rng.integers(0, 256, (1, 1, 3)) + 3 * yy[..., None] - 2 * xx[..., None]
                      + rng.integers(0, 40, (H, W, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        label = np.zeros((H, W), np.uint8)
        for _ in range(3):  # a few rectangles of random classes
            c = rng.integers(1, 21)
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            label[y:y + rng.integers(8, 24), x:x + rng.integers(8, 32)] = c
        label[0, :] = 255  # ignored border
        label[-1, : W // 2] = 255
        write_palette_png(root / "SegmentationClass" / f"{name}.png", label)
        names.append(name)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n".join(names) + "\n")
    return names


def save_open_clip_folder(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """A random CLIP saved as an open_clip checkpoint folder (open_clip_config.json + safetensors)."""
    from safetensors.torch import save_file

    clip = random_clip(cfg, quick_gelu=cfg.get("quick_gelu", True), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("eval")
    voc = base / "data" / "VOCdevkit" / "VOC2012"
    names = make_voc2012(voc)
    ckpt = save_open_clip_folder(base / "ckpt", EVAL_CFG)
    return {"base": base, "root_dir": base / "data", "voc": voc, "names": names, "ckpt": ckpt,
            "cache": base / "cache"}


@pytest.fixture(autouse=True)
def _text_cache(data, monkeypatch):
    monkeypatch.setenv("RFCLIP_CACHE", str(data["cache"]))  # never write to the user's ~/.cache in tests


@pytest.fixture(scope="module")
def segmenter(data):
    return Segmenter(load_clip("tiny", checkpoint=data["ckpt"]), method="naclip", device="cpu", text_cache=False)


def reference_counts(seg, dataset, indices, **overrides) -> IoUAccumulator:
    """Counts from one image at a time through Segmenter.predict (no DataLoader, no image batching)."""
    configured = configure(seg, dataset, overrides)
    text = configured.encode_classes(dataset.classes)
    acc = IoUAccumulator(dataset.num_classes)
    for i in indices:
        item = dataset[i]
        ((mask, _),) = configured.predict([item["image"]], text, return_probs=False)
        acc.update(mask, item["label"])
    return acc


# ---------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,per,world", [(0, 4, 1), (1, 4, 2), (5, 2, 2), (7, 3, 2), (10, 1, 3), (9, 4, 4), (3, 2, 8)])
def test_shard_batches_partition(n, per, world):
    shards = [shard_batches(n, per, r, world) for r in range(world)]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert sorted(flat) == list(range(n))  # every image exactly once: no padding, no duplicates
    for r, shard in enumerate(shards):
        for batch in shard:  # whole batches of the single-process run, batch b on rank b % world
            assert batch == list(range(batch[0], min(batch[0] + per, n)))
            assert (batch[0] // per) % world == r
    assert shard_batches(n, per, 0, 1) == [list(range(s, min(s + per, n))) for s in range(0, n, per)]


# ---------------------------------------------------------------------------------------------- evaluate()
def test_evaluate_matches_per_image_reference(segmenter, data):
    ds = build_dataset("voc21", data["voc"])
    before = dict(vars(segmenter.config))
    result = evaluate(segmenter, ds, num_workers=2, images_per_batch=2, progress=False,
                      overrides={"short_side": 64})
    assert vars(segmenter.config) == before  # the caller's segmenter is not changed
    ref = reference_counts(segmenter, ds, range(len(ds)), short_side=64)
    for name, t in ref.state.items():
        assert result["counts"][name] == t.tolist(), name
    expected = ref.compute()
    assert result["miou"] == expected["miou"] and result["aacc"] == expected["aacc"]
    np.testing.assert_array_equal(result["iou"], expected["iou"])
    assert result["num_images"] == len(ds) == 5
    # the dataset's settings were used (default preset, VOC21), with the override on top
    s = result["settings"]
    assert (s["short_side"], s["slide_crop"], s["slide_stride"], s["logit_scale"], s["prob_thd"],
            s["background_class"]) == (64, 224, 112, 40.0, 0.1, 0)
    assert result["class_names"][0] == "background" and result["class_names"][15] == "person"
    assert set(result["per_class_iou"]) == set(result["class_names"])
    assert result["method"] == "naclip" and result["world_size"] == 1 and result["outputs"] is None
    assert result["images_per_s"] > 0 and result["num_workers"] == 2
    # every labelled pixel was counted once: gt areas equal the label histogram over the dataset
    hist = np.zeros(21, np.int64)
    for i in range(len(ds)):
        lab = ds[i]["label"]
        hist += np.bincount(lab[lab != 255], minlength=21)[:21]
    assert result["counts"]["gt_area"] == hist.tolist()


def test_evaluate_uses_each_preset(segmenter, data):
    naclip = evaluate(segmenter, build_dataset("voc21", data["voc"], preset="naclip"), limit=1, num_workers=0,
                      progress=False, overrides={"short_side": 64})
    assert naclip["settings"]["slide_crop"] == 0 and naclip["preset"] == "naclip"  # whole image on VOC
    sclip = evaluate(segmenter, build_dataset("voc21", data["voc"], preset="sclip"), limit=1, num_workers=0,
                     progress=False, overrides={"short_side": 64})
    assert sclip["settings"]["logit_scale"] == 65.0 and sclip["settings"]["area_thd"] == 0.1
    voc20 = evaluate(segmenter, build_dataset("voc20", data["voc"]), limit=1, num_workers=0, progress=False,
                     overrides={"short_side": 64})
    assert voc20["settings"]["prob_thd"] == 0.0 and len(voc20["iou"]) == 20
    with pytest.raises(RfclipError, match="unknown inference setting"):
        evaluate(segmenter, build_dataset("voc21", data["voc"]), overrides={"shortside": 3}, progress=False)


def test_evaluate_decodes_in_the_main_process_on_cpu_by_default(segmenter, data):
    """On CPU the model already uses every core: the default is no DataLoader workers, same numbers as 2 workers."""
    ds = build_dataset("voc21", data["voc"])
    auto = evaluate(segmenter, ds, limit=3, images_per_batch=2, progress=False, overrides={"short_side": 64})
    two = evaluate(segmenter, ds, limit=3, num_workers=2, images_per_batch=2, progress=False,
                   overrides={"short_side": 64})
    assert segmenter.device.type == "cpu" and auto["num_workers"] == 0 and two["num_workers"] == 2
    assert auto["counts"] == two["counts"]


def test_evaluate_limit_and_files(segmenter, data, tmp_path):
    ds = build_dataset("voc21", data["voc"])
    result = evaluate(segmenter, ds, limit=2, num_workers=0, images_per_batch=4, progress=False,
                      out=tmp_path / "res" / "voc.json", overrides={"short_side": 64, "slide_crop": 0})
    ref = reference_counts(segmenter, ds, range(2), short_side=64, slide_crop=0)
    assert result["counts"]["intersect"] == ref.intersect.tolist()
    assert result["counts"]["union"] == ref.union.tolist()
    assert result["num_images"] == 2 and result["limit"] == 2
    assert result["outputs"] == {"json": str(tmp_path / "res" / "voc.json"), "csv": str(tmp_path / "res" / "voc.csv")}
    doc = json.loads((tmp_path / "res" / "voc.json").read_text())
    assert doc["result"]["miou"] == pytest.approx(result["miou"])
    assert doc["result"]["num_images"] == 2 and doc["meta"]["dataset"] == "voc21"
    assert doc["class_names"] == result["class_names"]
    assert not list((tmp_path / "res").glob(".*"))  # no temporary files left behind
    assert result_paths(tmp_path) == (tmp_path / "results.json", tmp_path / "results.csv")
    assert result_paths(tmp_path / "new") == (tmp_path / "new" / "results.json", tmp_path / "new" / "results.csv")


# ---------------------------------------------------------------------------------------------- rfclip eval
def _printed_miou(text: str) -> float:
    return float(re.search(r"VOC21: mIoU (\d+\.\d+)", text).group(1))


def test_cli_eval_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "voc21.json"
    code = main(["eval", "--dataset", "voc21", "--root", str(data["voc"]), "--method", "naclip", "--checkpoint",
                 str(data["ckpt"]), "--out", str(out), "--images-per-batch", "3", *FAST])
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = json.loads(out.read_text())
    res = doc["result"]
    # the printed table and summary agree with the JSON
    assert f"mIoU: {res['miou']:.2f}" in printed and f"aAcc: {res['aacc']:.2f}" in printed
    assert _printed_miou(printed) == round(res["miou"], 2)
    assert "background" in printed and "television monitor" in printed
    assert doc["meta"]["method"] == "naclip" and doc["meta"]["settings"]["short_side"] == 64
    assert doc["meta"]["overrides"] == {"short_side": 64}
    assert res["num_images"] == 5
    # the CSV holds the same per-class IoU (4 decimals; empty for classes absent everywhere)
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == doc["class_names"]
    for row, iou in zip(rows, res["iou"]):
        if iou is None:
            assert row["iou"] == ""
        else:
            assert float(row["iou"]) == pytest.approx(iou, abs=5e-5)
    ious = [v for v in res["iou"] if v is not None]
    assert res["miou"] == pytest.approx(sum(ious) / len(ious))

    # --limit: the first N images only; the same numbers as evaluate() on them
    out2 = tmp_path / "limit.json"
    assert main(["eval", "--dataset", "voc21", "--root", str(data["voc"]), "--method", "naclip", "--checkpoint",
                 str(data["ckpt"]), "--out", str(out2), "--limit", "2", "--quiet", *FAST]) == 0
    limited = json.loads(out2.read_text())
    assert limited["result"]["num_images"] == 2 and limited["meta"]["limit"] == 2
    printed = capsys.readouterr().out
    assert "Class" not in printed and _printed_miou(printed) == round(limited["result"]["miou"], 2)
    seg = Segmenter(load_clip("tiny", checkpoint=data["ckpt"]), method="naclip", device="cpu")
    ref = reference_counts(seg, build_dataset("voc21", data["voc"]), range(2), short_side=64)
    assert limited["result"]["counts"]["intersect"] == ref.intersect.tolist()


def test_cli_eval_fsa_preset_and_pamr(data, tmp_path, capsys):
    out = tmp_path / "fsa.json"
    assert main(["eval", "--dataset", "voc21", "--root", str(data["voc"]), "--method", "naclip", "--preset", "fsa",
                 "--pamr", "--checkpoint", str(data["ckpt"]), "--out", str(out), "--limit", "1", "-q", *FAST]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["preset"] == "fsa" and meta["eval_settings"]["classnames"] == "fsa"
    assert meta["settings"]["pamr"] is True and meta["settings"]["slide_crop"] == 336
    assert meta["settings"]["prob_thd"] == 0.2
    capsys.readouterr()


@pytest.mark.skipif("rfclip" not in __import__("rfclip.methods").methods.METHODS, reason="rfclip method not registered")
def test_cli_eval_rfclip_method(data, tmp_path, capsys):
    out = tmp_path / "rf.json"
    code = main(["eval", "--dataset", "voc21", "--root", str(data["voc"]), "--method", "rfclip", "--option",
                 "distraction_dims=1,5,9", "--checkpoint", str(data["ckpt"]), "--out", str(out), "--limit", "2",
                 "-q", *FAST])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    doc = json.loads(out.read_text())
    assert doc["meta"]["method"] == "rfclip" and doc["result"]["num_images"] == 2
    assert list(doc["meta"]["method_options"]["distraction_dims"]) == [1, 5, 9]


def test_cli_eval_errors(data, tmp_path, capsys):
    base = ["--method", "naclip", "--checkpoint", str(data["ckpt"]), *FAST]
    assert main(["eval", "--dataset", "voc99", "--root", str(data["voc"]), *base]) == 2
    assert "unknown dataset 'voc99'" in capsys.readouterr().err
    assert main(["eval", "--dataset", "context60", "--root", str(data["voc"]), *base]) == 2
    err = capsys.readouterr().err
    assert "Context60" in err and err.count("\n") == 1  # one line naming the problem and the fix
    assert main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "nope"), *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["eval", "--dataset", "voc21", "--root", str(data["voc"]), "--out",
                 str(tmp_path / "file" / "r.json"), *base]) == 2
    assert "choose another --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- rfclip eval-all
def test_cli_eval_all_two_of_eight(data, tmp_path, capsys):
    out_dir = tmp_path / "all"
    code = main(["eval-all", "--root-dir", str(data["root_dir"]), "--method", "naclip", "--checkpoint",
                 str(data["ckpt"]), "--out-dir", str(out_dir), "--limit", "3", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # VOC2012 holds VOC21 and VOC20; the 6 others are reported as missing, not fatal
    for title in ("Context60", "COCO-Object", "Context59", "COCO-Stuff164k", "Cityscapes", "ADE20K"):
        assert f"skipping {title}" in captured.err
    per = {n: json.loads((out_dir / f"{n}.json").read_text()) for n in ("voc21", "voc20")}
    assert all((out_dir / f"{n}.csv").is_file() for n in per)
    md = (out_dir / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["mIoU (%)", "VOC21", "Context60", "COCO-Object", "VOC20", "Context59", "COCO-Stuff164k",
                      "Cityscapes", "ADE20K", "Avg"]
    ours = [c.strip() for c in table[1].strip("|").split("|")]
    assert ours[0] == "ours (naclip, default preset)"
    assert ours[1] == f"{per['voc21']['result']['miou']:.1f}" and ours[4] == f"{per['voc20']['result']['miou']:.1f}"
    assert ours[2] == ours[3] == ours[5] == "–"
    avg = (per["voc21"]["result"]["miou"] + per["voc20"]["result"]["miou"]) / 2
    assert ours[-1] == f"{avg:.1f}"
    assert "paper (RF-CLIP)" not in md  # a custom backbone has no paper row
    assert "method: naclip" in md and "--limit" in md and "## Not evaluated" in md
    summary = json.loads((out_dir / "results.json").read_text())
    assert set(summary["result"]["miou"]) == {"voc21", "voc20"} and len(summary["result"]["missing"]) == 6
    assert per["voc21"]["result"]["num_images"] == 3
    assert md in captured.out  # the table is printed too

    # none of the asked datasets present: one-line error
    assert main(["eval-all", "--root-dir", str(data["root_dir"]), "--datasets", "ade20k", "cityscapes",
                 "--checkpoint", str(data["ckpt"]), *FAST]) == 2
    assert "none of ade20k, cityscapes was found" in capsys.readouterr().err


def _fake_result(name: str, miou: float, model: str, pamr: bool) -> dict:
    return {"miou": miou, "aacc": 90.0, "num_images": 10, "images_per_s": 2.0, "split": "val", "limit": None,
            "model": {"name": model, "pretrained": "openai", "source": "open_clip:openai"}, "method": "rfclip",
            "method_options": {"beta": 0.7}, "preset": "default", "precision": "float32", "device": "cpu",
            "world_size": 1, "overrides": {},
            "settings": {"short_side": 336, "slide_crop": 224, "slide_stride": 112, "logit_scale": 40.0,
                         "prob_thd": 0.1, "area_thd": None, "pamr": pamr}}


@pytest.mark.parametrize("model,pamr", [("ViT-B-16", False), ("ViT-L-14", True)])
def test_summary_markdown_paper_row(model, pamr):
    ours = {n: 10.0 + i for i, n in enumerate(reversed(PAPER_COLUMNS))}  # given out of order
    results = {n: _fake_result(n, v, model, pamr) for n, v in ours.items()}
    md = summary_markdown(results)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    paper = [c.strip() for c in rows[2].strip("|").split("|")]
    assert paper[0] == "paper (RF-CLIP" + (" + PAMR" if pamr else "") + ")"
    expected = PAPER_RFCLIP_MIOU[(model, pamr)]
    assert paper[1:9] == [f"{v:.1f}" for v in expected]
    assert paper[9] == f"{sum(expected) / 8:.1f}"
    mine = [c.strip() for c in rows[1].strip("|").split("|")]
    assert mine[1:9] == [f"{ours[n]:.1f}" for n in PAPER_COLUMNS]
    assert "Not evaluated" not in md
    # another backbone: no paper row
    other = {n: _fake_result(n, 1.0, "ViT-B-32", False) for n in PAPER_COLUMNS}
    assert "paper (RF-CLIP" not in summary_markdown(other)
    # a subset: both averages over the evaluated columns only
    sub = {n: _fake_result(n, 50.0, model, pamr) for n in ("voc20", "ade20k")}
    rows = [line for line in summary_markdown(sub, {"voc21": "not found"}).splitlines() if line.startswith("| ")]
    paper_avg = (expected[PAPER_COLUMNS.index("voc20")] + expected[PAPER_COLUMNS.index("ade20k")]) / 2
    assert rows[2].strip("|").split("|")[-1].strip() == f"{paper_avg:.1f}"
    assert rows[1].strip("|").split("|")[-1].strip() == "50.0"


# ---------------------------------------------------------------------------------------------- convert-coco-object
def test_cli_convert_coco_object(tmp_path, capsys):
    src = tmp_path / "coco_stuff164k"
    rng = np.random.default_rng(1)
    raws = {}
    for i in range(2):
        name = f"00000000013{i}"
        (src / "images" / "val2017").mkdir(parents=True, exist_ok=True)
        (src / "annotations" / "val2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(src / "images" / "val2017" / f"{name}.jpg")
        raw = rng.choice(np.array([0, 1, 10, 11, 90, 91, 181, 255], np.uint8), size=(12, 16))
        Image.fromarray(raw).save(src / "annotations" / "val2017" / f"{name}.png")
        raws[name] = raw
    out = tmp_path / "coco_object"
    assert main(["convert-coco-object", str(src), "-o", str(out), "--num-workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 COCO-Object labels" in printed and f"--root {out}" in printed
    ds = build_dataset("coco_object", out)
    assert len(ds) == 2
    for item in ds:
        label = item["label"]
        raw = raws[item["name"]]
        # person (raw 0) -> 1, raw 1 -> 2, raw 10 -> 11; unused thing ids (11, 90) pass through as in the reference;
        # stuff (> 90) and unlabelled (255) -> background 0
        assert (label[raw == 0] == 1).all() and (label[raw == 1] == 2).all() and (label[raw == 10] == 11).all()
        assert (label[raw == 11] == 11).all() and (label[raw == 90] == 90).all()
        assert (label[raw == 91] == 0).all() and (label[raw == 181] == 0).all() and (label[raw == 255] == 0).all()
    assert main(["convert-coco-object", str(tmp_path / "missing"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
