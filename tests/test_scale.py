"""``rfclip segment`` over a dataset (issue 20, and issue 21 items 4, 8, 11): torchrun shards equal one process,
an interrupted run resumes and does each image once, changed settings are refused, every output format reads back
with its own library, and the faults (full disk, unreadable images, damaged tar members, a second run on the same
folder, missing list entries) are handled. Tiny random CLIP saved as a real checkpoint file; 48 x 64 images.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_clip
from rfclip.cli import main

FAST = ["--method", "clearclip", "--short-side", "64", "--device", "cpu", "--quiet"]
CLASSES = "red;green;blue"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("scale")
    state = make_clip().model.state_dict()
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(root / "tiny.safetensors"))
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"img{i:02d}.png")
    return root


@pytest.fixture(autouse=True)
def cache(base, monkeypatch):
    monkeypatch.setenv("RFCLIP_CACHE", str(base / "cache"))


def argv(base, out, *inputs, classes=CLASSES, extra=()):
    return ["segment", *map(str, inputs), "--classes", classes, "--out", str(out), "--checkpoint",
            str(base / "tiny.safetensors"), *FAST, *extra]


def run_cli(capsys, args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def no_temporary_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".rfclip-parts"]


def masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.rglob("*_mask.png"))}


def records(out: Path) -> dict[str, dict]:
    """Per-image JSON without what depends on the process (timing)."""
    found = {}
    for p in sorted(out.glob("*.json")):
        if p.name == "run.json":
            continue
        record = json.loads(p.read_text())
        record.pop("seconds")
        found[p.name] = record
    return found


# ---------------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_equal_one(base, tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rfclip",
           *argv(base, two, base / "photos", extra=["--format", "png,json,coco", "--images-per-batch", "2"])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = tmp_path / "one"
    code, _, err = run_cli(capsys, argv(base, one, base / "photos",
                                        extra=["--format", "png,json,coco", "--images-per-batch", "2"]))
    assert code == 0, err
    m1, m2 = masks(one), masks(two)
    assert len(m1) == 7 and m1.keys() == m2.keys()
    for name in m1:
        np.testing.assert_array_equal(m1[name], m2[name])
    assert records(one) == records(two)
    assert (one / "coco.jsonl").read_text() == (two / "coco.jsonl").read_text()  # merged in input order
    run2, run1 = json.loads((two / "run.json").read_text()), json.loads((one / "run.json").read_text())
    assert run2["world_size"] == 2 and [r["rank"] for r in run2["per_rank"]] == [0, 1]
    assert [r["written"] for r in run2["per_rank"]] == [4, 3]  # batches of 2: rank 0 gets batches 0 and 2, ...
    assert run2["counts"] == run1["counts"] == {"inputs": 7, "segmented": 7, "skipped_done_before": 0, "failed": 0}
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_parts_do_not_depend_on_the_world_size():
    from rfclip.jobs import plan_parts, rank_parts
    from rfclip.jobs.inputs import Item

    items = [Item(source=f"{i}.png", name=str(i)) for i in range(7)] + \
            [Item(source="s.tar", name=f"s/{i}", member=f"{i}.jpg", shard=0) for i in range(3)]
    parts = plan_parts(items, 2)
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert plan_parts(items, 3, by_shard=True) == [[0, 1, 2], [3, 4, 5], [6], [7, 8, 9]]
    for world in (1, 2, 3):
        shares = [i for r in range(world) for part in rank_parts(parts, r, world) for i in part]
        assert sorted(shares) == list(range(10))


# ---------------------------------------------------------------------------------------------- resume
KILL_SCRIPT = """
import os, signal, sys
import rfclip.jobs.segment as job
real = job.Sinks.write_image
count = [0]
def write_image(self, item, *args):
    real(self, item, *args)
    with open(os.environ["LOG"], "a") as f:
        f.write(item.name + "\\n")
    count[0] += 1
    if count[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # as timeout, docker, Slurm or torchrun stop a job
job.Sinks.write_image = write_image
from rfclip.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_then_rerun_does_every_image_once(base, tmp_path, capsys, monkeypatch):
    out, log = tmp_path / "out", tmp_path / "written.log"
    env = dict(os.environ, LOG=str(log), OMP_NUM_THREADS="1")
    args = argv(base, out, base / "photos", extra=["--images-per-batch", "1", "--format", "png,overlay,json,coco"])
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "rfclip: interrupted"
    first = log.read_text().split()
    assert 3 <= len(first) < 7
    assert no_temporary_files(out)  # no staged file, no lock file; only the COCO part of the run so far
    assert not (out / "run.json").exists()
    for name in first:  # the images finished before the signal are complete
        assert {f"{name}{s}" for s in ("_mask.png", "_overlay.png", ".json")} <= {p.name for p in out.iterdir()}

    import rfclip.jobs.segment as job

    real, again = job.Sinks.write_image, []

    def counting(self, item, *a):
        again.append(item.name)
        real(self, item, *a)

    monkeypatch.setattr(job.Sinks, "write_image", counting)
    code, stdout, err = run_cli(capsys, [a for a in args if a != "--quiet"])
    assert code == 0, err
    assert sorted(first + again) == [f"img{i:02d}" for i in range(7)]  # each image exactly once
    assert f"skipped {len(first)} images done before" in stdout
    lines = (out / "coco.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == [f"img{i:02d}" for i in range(7)]
    assert no_temporary_files(out) and not (out / ".rfclip-parts").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"inputs": 7, "segmented": 7 - len(first), "skipped_done_before": len(first), "failed": 0}
    code, stdout, _ = run_cli(capsys, [a for a in args if a != "--quiet"])  # all done: the model is not loaded
    assert code == 0 and "skipped 7 images done before" in stdout and len(again) == 7 - len(first)


def test_changed_settings_are_refused_naming_overwrite(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    photo = base / "photos" / "img00.png"
    assert run_cli(capsys, argv(base, out, photo, extra=["--format", "png"]))[0] == 0
    import rfclip.cli.common as common

    real = common.build_segmenter
    monkeypatch.setattr(common, "build_segmenter", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, argv(base, out, photo, classes="red;green", extra=["--format", "png"]))
    assert code == 2 and len(err.splitlines()) == 1
    assert "img00_mask.png was made with other settings" in err and "--overwrite" in err
    monkeypatch.setattr(common, "build_segmenter", real)
    code, _, err = run_cli(capsys, argv(base, out, photo, classes="red;green",
                                        extra=["--format", "png,json", "--overwrite"]))
    assert code == 0, err
    record = json.loads((out / "img00.json").read_text())
    assert record["job"]["classes"] == [["red"], ["green"]] and len(record["settings_id"]) == 16
    monkeypatch.setattr(common, "build_segmenter", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, argv(base, out, photo, extra=["--format", "json"]))
    assert code == 2 and 'classes [["red"], ["green"]] (now [["red"], ["green"], ["blue"]])' in err


# ---------------------------------------------------------------------------------------------- formats
def test_every_format_reads_back_with_its_own_library(base, tmp_path, capsys):
    import webdataset as wds
    from pycocotools import mask as mask_utils

    shards = tmp_path / "shards"
    shards.mkdir()
    photos = sorted((base / "photos").iterdir())
    for s in range(2):
        with wds.TarWriter(str(shards / f"{s:06d}.tar")) as tar:
            for k in range(2):
                tar.write({"__key__": f"s{s}k{k}", "png": photos[2 * s + k].read_bytes(), "cls": b"0"})
            if s == 1:
                tar.write({"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg"})  # a damaged member
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, argv(base, out, extra=["--input", str(shards / "{000000..000001}.tar"),
                                                          "--format", "png,overlay,json,coco,webdataset"]))
    assert code == 2 and "000001.tar:broken.jpg" in err and "1 of 5 images could not be read" in err
    run = json.loads((out / "run.json").read_text())
    assert [f["image"] for f in run["failed"]] == [f"{shards / '000001.tar'}:broken.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["000000", "000000.tar", "000001", "000001.tar", "coco.jsonl",
                                                     "run.json"]
    index = {k: np.asarray(Image.open(out / f"{s:06d}" / f"{k}_mask.png"))
             for s, k in [(0, "s0k0"), (0, "s0k1"), (1, "s1k0"), (1, "s1k1")]}
    # coco: pycocotools decodes each class's RLE to exactly the pixels of that class in the mask PNG
    lines = [json.loads(line) for line in (out / "coco.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["000000/s0k0", "000000/s0k1", "000001/s1k0", "000001/s1k1"]
    for record in lines:
        mask = index[record["name"].split("/")[1]]
        assert (record["height"], record["width"]) == mask.shape and record["classes"] == ["red", "green", "blue"]
        covered = np.zeros(mask.shape, int)
        for ann in record["annotations"]:
            decoded = mask_utils.decode({"size": ann["segmentation"]["size"],
                                         "counts": ann["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(decoded, mask == ann["class_index"])
            assert ann["area"] == int(mask_utils.area(ann["segmentation"] | {"counts": ann["segmentation"]["counts"]
                                                                              .encode()}))
            assert ann["fraction"] == pytest.approx(record["fractions"][ann["label"]])
            covered += decoded
        assert (covered == 1).all()
    # webdataset: the result shards, read by webdataset, hold every readable sample's mask and record
    got = {}
    for sample in wds.WebDataset(str(out / "{000000..000001}.tar"), shardshuffle=False):
        record = json.loads(sample["json"])
        got[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        assert record["settings_id"] == run["settings_id"]
    assert sorted(got) == sorted(index)
    for key in got:
        np.testing.assert_array_equal(got[key], index[key])


def test_python_formats(tmp_path):
    import supervision as sv
    from pycocotools import mask as mask_utils

    from rfclip import Segmenter

    seg_er = Segmenter(make_clip(), method="clearclip", device="cpu", short_side=64, text_cache=False)
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image[:, :32] = [250, 10, 10]
    result = seg_er.segment(image, "red;green;blue;white")
    present = sorted(set(np.unique(result.mask)))
    # COCO RLE
    rles = result.to_coco_rle()
    assert [r["class_index"] for r in rles] == present
    for r in rles:
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle), result.mask == r["class_index"])
        assert list(mask_utils.toBbox(rle)) == r["bbox"]
    # the transformers pipeline's output
    hf = result.to_hf()
    assert [a["label"] for a in hf] == [result.classes[i] for i in present]
    for a, i in zip(hf, present):
        assert a["score"] is None and a["mask"].mode == "L" and a["mask"].size == (64, 48)
        np.testing.assert_array_equal(np.asarray(a["mask"]) == 255, result.mask == i)
    # supervision
    det = result.to_detections()
    assert isinstance(det, sv.Detections) and len(det) == len(present)
    assert list(det.class_id) == present and list(det["class_name"]) == [result.classes[i] for i in present]
    np.testing.assert_array_equal(det.class_id[det.mask.argmax(0)], result.mask)
    assert det.confidence is not None and ((0 < det.confidence) & (det.confidence <= 1)).all()
    assert det.area.sum() == result.mask.size
    sv.MaskAnnotator().annotate(image.copy(), det)  # a supervision annotator takes it
    # save() writes what `rfclip segment` writes
    paths = result.save(tmp_path, image=image, name="photo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.json", "photo_mask.png", "photo_overlay.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths["mask"])), result.mask)
    record = json.loads(paths["json"].read_text())
    assert record["method"] == "clearclip" and record["fractions"] == pytest.approx(result.fractions())
    # a short repr: no arrays
    text = repr(result)
    assert text.startswith("Segmentation(64x48, 4 classes: ") and len(text) < 120 and "array" not in text


# ---------------------------------------------------------------------------------------------- faults
def test_full_disk_stops_with_one_line_and_keeps_finished_images(base, tmp_path, capsys, monkeypatch):
    import rfclip.outputs as outputs

    real, calls = outputs.save_png, []

    def full(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(outputs, "save_png", full)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, argv(base, out, base / "photos", extra=["--images-per-batch", "1"]))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"rfclip: error: cannot write outputs to {out}: No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["img00.json", "img00_mask.png", "img00_overlay.png"]
    json.loads((out / "img00.json").read_text())


def test_second_run_on_the_same_folder_is_refused(base, tmp_path, capsys):
    from rfclip.jobs.resume import output_lock

    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        code, _, err = run_cli(capsys, argv(base, out, base / "photos" / "img00.png"))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"output folder {out} is in use by another rfclip run (pid {os.getpid()}" in err
    assert list(out.iterdir()) == []
    stale = out / ".img00_mask.png.999.rfclip-tmp"  # left by a run killed with SIGKILL
    stale.write_bytes(b"partial")
    assert run_cli(capsys, argv(base, out, base / "photos" / "img00.png"))[0] == 0  # released
    assert not stale.exists() and no_temporary_files(out)


def test_missing_list_entries_and_unreadable_images_are_reported_and_listed(base, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    listing = tmp_path / "list.txt"
    photos = base / "photos"
    listing.write_text(f"# images\n{photos / 'img00.png'}\n{tmp_path / 'gone.png'}\n\n{tmp_path / 'bad.jpg'}\n"
                       f"{photos / 'img01.png'}\n")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, argv(base, out, extra=["--list", str(listing)]))
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == f"rfclip: error: listed in {listing} but not found: {tmp_path / 'gone.png'} (skipped)"
    assert lines[1].startswith(f"rfclip: error: cannot read image {tmp_path / 'bad.jpg'}")
    assert lines[2].startswith("rfclip: error: 2 of 4 images could not be read")
    run = json.loads((out / "run.json").read_text())
    assert sorted(f["image"] for f in run["failed"]) == [str(tmp_path / "bad.jpg"), str(tmp_path / "gone.png")]
    assert {"img00_mask.png", "img01_mask.png"} <= {p.name for p in out.rglob("*")}


# ---------------------------------------------------------------------------------------------- inputs
def test_folders_hidden_files_same_stems_and_recursion(base, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub" / ".hidden").mkdir(parents=True)
    photo = Image.open(base / "photos" / "img00.png")
    photo.save(src / "a.png")
    photo.convert("RGB").save(src / "a.jpg")
    photo.save(src / "._a.png")  # macOS metadata
    photo.save(src / ".a_mask.png.123.rfclip-tmp", format="PNG")  # a temporary file of an earlier run
    photo.save(src / "sub" / "b.png")
    photo.save(src / "sub" / ".hidden" / "c.png")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, argv(base, out, src, extra=["--format", "png"]))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg_mask.png", "a.png_mask.png", "run.json"]
    out2 = tmp_path / "out2"
    code, _, err = run_cli(capsys, argv(base, out2, src, extra=["--format", "png", "--recursive"]))
    assert code == 0, err
    assert sorted(p.relative_to(out2).as_posix() for p in out2.rglob("*.png")) == [
        "a.jpg_mask.png", "a.png_mask.png", "sub/b_mask.png"]
    out3 = tmp_path / "out3"  # result shards from files: --shard-size images each, whole or not at all
    code, _, err = run_cli(capsys, argv(base, out3, src, extra=["--format", "webdataset", "--shard-size", "2",
                                                                "--recursive"]))
    assert code == 0, err
    assert sorted(p.name for p in out3.iterdir()) == ["results-000000.tar", "results-000001.tar", "run.json"]
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(str(out3 / "results-{000000..000001}.tar"), shardshuffle=False)]
    assert keys == ["a_jpg", "a_png", "sub/b"]  # a WebDataset key holds no dot
    code, _, err = run_cli(capsys, argv(base, tmp_path / "o3", src, extra=["--format", "nothing"]))
    assert code == 2 and "unknown output format nothing" in err


def test_progress_has_an_eta_in_logs_and_expensive_runs_are_announced(base, tmp_path, capsys, monkeypatch):
    import rfclip.jobs.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    args = [a for a in argv(base, tmp_path / "out", base / "photos" / "img00.png", base / "photos" / "img01.png",
                            extra=["--images-per-batch", "1"]) if a != "--quiet"]
    code, _, err = run_cli(capsys, args)
    assert code == 0
    assert "rfclip: 1/2 images (50%)" in err and "img/s, ETA " in err  # stderr is not a terminal here
    monkeypatch.setattr("rfclip.cli.common.build_segmenter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run_cli(capsys, args + ["--short-side", "224", "--slide-crop", "16", "--slide-stride", "1",
                                           "--overwrite"])
    assert code == 130  # stopped where the model would load: the note came before
    assert err.splitlines()[0] == ("rfclip: note: this run is far more expensive than usual: 59356 crops per 64x48 "
                                   "image (--slide-stride 1 on 299x224; a stride of 8 gives 999)")
