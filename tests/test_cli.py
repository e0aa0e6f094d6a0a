"""The ``rfclip`` command line, end to end, on random-weight checkpoint files written here (no downloads).

The main checkpoint has ViT-B/16's image encoder (12 blocks, width 768, patch 16, 224 px; 86 M weights) so that
sliding windows, grids and crop batching run at the real geometry; its text encoder is shrunk (1 block, width 64)
because ViT-B/16's real one costs about 1 TFLOP per class name on CPU (80 prompt templates). It is saved in
float16 as an OpenAI-layout safetensors file, the form the loader reads as an OpenAI checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.cli import _load_module, main
from rfclip.cli.common import parse_options, parse_value
from rfclip.methods import METHODS

VIT_B16_IMAGE_TINY_TEXT = dict(
    embed_dim=512,
    vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
)
TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=224, layers=3, width=64, head_width=16, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)
FAST = ["--short-side", "224", "--device", "cpu"]  # 240 x 320 images -> 224 x 299 -> 2 crops each


def random_state_dict(cfg: dict, seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Random weights for an open_clip CLIP config, without initialising a model (shapes from the meta device)."""
    import open_clip

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.CLIP(**cfg, quick_gelu=True).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        leaf = key.split(".")[-2] if "." in key else key
        if leaf.startswith("ln") and key.endswith("weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        elif key.endswith("bias"):
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cli")
    save_file(random_state_dict(VIT_B16_IMAGE_TINY_TEXT), str(root / "vitb16.safetensors"))
    save_file(random_state_dict(TINY, dtype=torch.float16), str(root / "tiny.safetensors"))
    save_file(random_state_dict(TINY, dtype=torch.float32), str(root / "tiny_fp32.safetensors"))  # open_clip layout
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    base = np.stack([xx * 255 // 319, yy * 255 // 239, 255 - xx * 255 // 319], -1).astype(np.int16)
    for name in ("a.jpg", "b.png", "c.png"):
        img = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / name)
    (root / "garbage.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "truncated.png").write_bytes((root / "b.png").read_bytes()[:2000])
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "empty_classes.txt").write_text("# nothing here\n\n")
    (root / "classes.txt").write_text("# classes\nred, crimson\ngreen\nblue  # the sky\n")
    (root / "a_file").write_text("x")
    (root / "folder").mkdir()
    Image.open(root / "a.jpg").save(root / "folder" / "d.png")
    (root / "folder" / "readme.txt").write_text("not an image, skipped\n")
    (root / "no_images").mkdir()
    return root


@pytest.fixture(autouse=True)
def text_cache(tmp_path_factory, monkeypatch):
    """One text-embedding cache for the module's runs (same checkpoint and classes -> embedded once)."""
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "rfclip-cache"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def check_outputs(out: Path, image: Path, classes: list[str], method: str) -> dict:
    stem = image.stem
    record = json.loads((out / f"{stem}.json").read_text())
    with Image.open(image) as im:
        width, height = im.size
    assert record["image_size"] == {"width": width, "height": height}
    assert [c["name"] for c in record["classes"]] == classes
    assert list(record["fractions"]) == classes
    assert sum(record["fractions"].values()) == pytest.approx(1.0)
    assert all(0.0 <= f <= 1.0 for f in record["fractions"].values())
    assert record["method"] == method
    assert record["settings"]["short_side"] == 224
    assert record["model"]["checkpoint"] and record["model"]["source"].endswith("vitb16.safetensors")
    with Image.open(out / f"{stem}_mask.png") as mask_png:
        assert mask_png.mode == "P" and mask_png.size == (width, height)
        mask = np.asarray(mask_png)
    assert mask.max() < len(classes)
    counts = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size
    np.testing.assert_allclose(counts, [record["fractions"][c] for c in classes], atol=1e-9)
    with Image.open(out / f"{stem}_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.height == height and overlay.width > width  # legend panel
    return record


# ---------------------------------------------------------------------------------------------- success
def test_segment_two_images_batched(files, capsys):
    out = files / "out_naclip"
    code, stdout, stderr = run_cli(
        capsys, "segment", files / "a.jpg", files / "b.png", "--classes-file", files / "classes.txt",
        "--method", "naclip", "--option", "gaussian_std=3", "--pamr", "--images-per-batch", "2",
        "--checkpoint", files / "vitb16.safetensors", "--out", out, *FAST)
    assert code == 0, stderr
    assert stderr == ""
    assert listing(out) == ["a.json", "a_mask.png", "a_overlay.png", "b.json", "b_mask.png", "b_overlay.png",
                            "run.json"]
    for image in ("a.jpg", "b.png"):
        record = check_outputs(out, files / image, ["red", "green", "blue"], "naclip")
        assert record["classes"][0]["synonyms"] == ["red", "crimson"]
        assert record["method_options"] == {"gaussian_std": 3}
        assert record["settings"]["pamr"] is True
        assert f"{files / image}: " in stdout
    assert "wrote 6 files" in stdout


@pytest.mark.skipif("rfclip" not in METHODS, reason="the rfclip method is not registered yet")
def test_segment_default_method(files, capsys):
    out = files / "out_default"
    code, stdout, stderr = run_cli(
        capsys, "segment", files / "folder", "--classes", "red;green,lime;blue", "--option", "distraction_dims=1,2,3",
        "--checkpoint", files / "vitb16.safetensors", "--out", out, "--quiet", *FAST)
    assert code == 0, stderr
    assert stdout == "" and stderr == ""
    assert listing(out) == ["d.json", "d_mask.png", "d_overlay.png", "run.json"]  # the folder's image files only
    record = check_outputs(out, files / "folder" / "d.png", ["red", "green", "blue"], "rfclip")
    assert record["classes"][1]["synonyms"] == ["green", "lime"]


def test_console_entry_point(files):
    """The real ``python -m rfclip`` process: exit status and a one-line message on stderr."""
    env = {**os.environ, "RFCLIP_CACHE": str(files / "cache")}
    proc = subprocess.run([sys.executable, "-m", "rfclip", "segment", str(files / "missing.jpg"), "--classes", "a;b",
                           "--out", str(files / "out_sub")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"rfclip: error: image not found: {files / 'missing.jpg'}; check the path"]
    assert not (files / "out_sub").exists()


def test_help(capsys):
    code, stdout, _ = run_cli(capsys, "--help")
    assert code == 0 and "segment" in stdout
    code, stdout, _ = run_cli(capsys, "segment", "--help")
    assert code == 0
    assert "examples:" in stdout and "--classes" in stdout and "--checkpoint" in stdout


# ---------------------------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "missing image": (["{d}/nope.jpg"], [], "image not found"),
    "corrupt jpeg": (["{d}/garbage.jpg"], [], "cannot read image"),
    "truncated png": (["{d}/truncated.png"], [], "truncated"),
    "only bad images": (["{d}/garbage.jpg", "{d}/truncated.png"], [], "none of the 2 images can be read"),
    "folder without images": (["{d}/no_images"], [], "holds no image files"),
    "empty classes": (["{d}/a.jpg"], ["--classes", ""], "empty class list"),
    "only separators": (["{d}/a.jpg"], ["--classes", ";;"], "empty class list"),
    "empty classes file": (["{d}/a.jpg"], ["--classes-file", "{d}/empty_classes.txt"], "lists no classes"),
    "missing classes file": (["{d}/a.jpg"], ["--classes-file", "{d}/none.txt"], "classes file not found"),
    "duplicate class": (["{d}/a.jpg"], ["--classes", "cat;dog;cat"], "listed twice"),
    "unknown method": (["{d}/a.jpg"], ["--method", "nomethod"], "unknown method 'nomethod'"),
    "unknown plugin": (["{d}/a.jpg"], ["--method", "naclip+nothing"], "unknown plugin"),
    "unknown option": (["{d}/a.jpg"], ["--method", "naclip", "--option", "colour=3"], "unknown option(s) colour"),
    "malformed option": (["{d}/a.jpg"], ["--method", "naclip", "--option", "gaussian_std"], "KEY=VALUE"),
    "option twice": (["{d}/a.jpg"], ["--method", "naclip", "--pamr", "--option", "pamr=false"], "given both"),
    "missing checkpoint": (["{d}/a.jpg"], ["--method", "naclip", "--checkpoint", "{d}/none.pt"], "checkpoint not found"),
    "text file as checkpoint": (["{d}/a.jpg"], ["--method", "naclip", "--checkpoint", "{d}/notes.txt"],
                                "not a model checkpoint"),
    "checkpoint of another geometry": (["{d}/a.jpg"], ["--method", "naclip", "--model", "ViT-B-16",
                                                       "--checkpoint", "{d}/tiny_fp32.safetensors"], "does not fit"),
    "output is a file": (["{d}/a.jpg"], ["--method", "naclip", "--out", "{d}/a_file"], "not a folder"),
    "output under a file": (["{d}/a.jpg"], ["--method", "naclip", "--out", "{d}/a_file/sub"], "is a file"),
    "bad device": (["{d}/a.jpg"], ["--method", "naclip", "--device", "banana"], "unknown device"),
    "bad precision": (["{d}/a.jpg"], ["--method", "naclip", "--precision", "fp8"], "invalid choice"),
    "bad number": (["{d}/a.jpg"], ["--method", "naclip", "--batch-size", "0"], "positive"),
    "same output names": (["{d}/a.jpg", "{d}/sub/a.jpg"], ["--method", "naclip"], "would both write"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(files, capsys, case):
    images, extra, expected = BAD_INPUTS[case]
    (files / "sub").mkdir(exist_ok=True)
    if not (files / "sub" / "a.jpg").exists():
        Image.open(files / "a.jpg").save(files / "sub" / "a.jpg")
    out = files / f"out_bad_{case.replace(' ', '_')}"
    argv = ["segment", *[i.format(d=files) for i in images]]
    extra = [e.format(d=files) for e in extra]
    if "--classes" not in extra and "--classes-file" not in extra:
        argv += ["--classes", "cat;dog"]
    if "--out" not in extra:
        argv += ["--out", str(out)]
    if "--device" not in extra:
        argv += ["--device", "cpu"]
    before = {p: p.read_bytes() for p in files.iterdir() if p.is_file()}
    code, stdout, stderr = run_cli(capsys, *argv, *extra)
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(("rfclip: error: ", "rfclip segment: error: ")), lines[0]
    assert expected in lines[0]
    assert stdout == ""
    assert listing(out) == []
    assert {p: p.read_bytes() for p in files.iterdir() if p.is_file()} == before  # inputs untouched


def test_weights_not_available_offline(files, capsys, monkeypatch, tmp_path):
    """The default model (ViT-B-16 openai) with empty download caches and no network: a one-line error."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    method = [] if "rfclip" in METHODS else ["--method", "naclip"]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "segment", files / "a.jpg", "--classes", "cat;dog", "--out", out,
                                   "--device", "cpu", *method)
    assert code == 2
    assert len(stderr.splitlines()) == 1
    assert "not in the local cache" in stderr and "--checkpoint" in stderr
    assert listing(out) == []


def test_error_on_a_later_image_keeps_earlier_outputs(files, capsys, monkeypatch):
    """An error while writing image 2 leaves image 1's files complete and nothing (not even temp files) of image 2."""
    from rfclip import viz

    real_overlay = viz.overlay
    calls = []

    def failing_overlay(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(viz, "overlay", failing_overlay)
    out = files / "out_partial"
    code, _, stderr = run_cli(capsys, "segment", files / "a.jpg", files / "b.png", files / "c.png",
                              "--classes", "cat;dog", "--method", "clearclip", "--images-per-batch", "1",
                              "--checkpoint", files / "tiny.safetensors", "--out", out, *FAST)
    assert code == 2
    assert stderr.startswith("rfclip: error: cannot write outputs") and "No space left" in stderr
    assert len(stderr.splitlines()) == 1
    assert listing(out) == ["a.json", "a_mask.png", "a_overlay.png"]
    assert json.loads((out / "a.json").read_text())["method"] == "clearclip"
    assert Image.open(out / "a_mask.png").size == (320, 240)


def test_unexpected_error_is_one_line_and_debug_shows_it(files, capsys, monkeypatch):
    import rfclip.cli.segment as segment

    def boom(args):
        raise RuntimeError("internal failure\nsecond line")

    monkeypatch.setattr(segment, "run", boom)
    argv = ["segment", files / "a.jpg", "--classes", "a;b", "--out", files / "out_boom"]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 1
    assert stderr.splitlines() == ["rfclip: error: unexpected RuntimeError: internal failure "
                                   "(rerun with --debug for the traceback, and please report it)"]
    with pytest.raises(RuntimeError, match="internal failure"):
        main([str(a) for a in argv] + ["--debug"])


def test_keyboard_interrupt(files, capsys, monkeypatch):
    import rfclip.cli.segment as segment

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment, "run", interrupted)
    code, _, stderr = run_cli(capsys, "segment", files / "a.jpg", "--classes", "a;b", "--out", files / "o")
    assert code == 130 and stderr == "rfclip: interrupted\n"


def test_no_command_prints_help(capsys):
    code, _, stderr = run_cli(capsys)
    assert code == 2 and "COMMAND" in stderr


# ---------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False), ("none", None),
    ("1,2,3", [1, 2, 3]), ("4,", [4]), ("0.1,x", [0.1, "x"]), ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}),
    ("vit_b", "vit_b"), ("dino_vitb16", "dino_vitb16"),
])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_parse_options():
    assert parse_options(["beta=0.4", "distraction-dims=4,162", "name=x=y"]) == {
        "beta": 0.4, "distraction_dims": [4, 162], "name": "x=y"}


def test_registry_skips_only_missing_subcommand_modules(monkeypatch):
    import rfclip.cli as cli

    assert _load_module("segment") is not None
    assert _load_module("no_such_subcommand") is None  # not written yet: skipped

    def import_with_missing_dependency(name):
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")

    monkeypatch.setattr(cli.importlib, "import_module", import_with_missing_dependency)
    with pytest.raises(ModuleNotFoundError, match="somedep"):  # a broken subcommand is not hidden
        _load_module("segment")


def test_calibrate_then_segment_with_the_saved_dims(files, capsys, tmp_path):
    """`rfclip calibrate` writes a dims file that `rfclip segment --method rfclip` then reads."""
    dims_file = tmp_path / "dims.json"
    code, out, err = run_cli(capsys, "calibrate", "--checkpoint", files / "tiny.safetensors", "--device", "cpu",
                             "--topk", "3", "--out", dims_file, files / "folder")
    assert code == 0, err
    dims = json.loads(dims_file.read_text())["dims"]
    assert len(dims) == 3 and all(0 <= d < 64 for d in dims)
    assert out.strip().splitlines()[-1] == "distraction_dims=" + ",".join(map(str, sorted(dims)))
    seg_out = tmp_path / "seg"
    code, _, err = run_cli(capsys, "segment", files / "a.jpg", "--classes", "red;green;blue", "--checkpoint",
                           files / "tiny.safetensors", "--option", f"dims_file={dims_file}", "--out", seg_out, *FAST)
    assert code == 0, err
    assert (seg_out / "a_mask.png").is_file()


def test_calibrate_missing_images(files, capsys, tmp_path):
    code, _, err = run_cli(capsys, "calibrate", "--checkpoint", files / "tiny.safetensors", tmp_path / "nothing")
    assert code == 2 and err.count("\n") == 1 and "images not found" in err


def test_explain_writes_its_pictures(files, capsys, tmp_path):
    out = tmp_path / "explain"
    code, stdout, err = run_cli(capsys, "explain", files / "a.jpg", "--classes", "red;green", "--checkpoint",
                                files / "tiny.safetensors", "--option", "distraction_dims=1,2,3", "--query", "100,50",
                                "--out", out, *FAST)
    assert code == 0, err
    written = {Path(line).name for line in stdout.split()}
    assert {"attention.png", "tokens.png", "embedding_weights.png", "summary.json"} <= written
    for name in written:
        assert (out / name).stat().st_size > 0
    with Image.open(out / "attention.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_explain_needs_rfclip(files, capsys, tmp_path):
    code, _, err = run_cli(capsys, "explain", files / "a.jpg", "--checkpoint", files / "tiny.safetensors",
                           "--method", "naclip", "--out", tmp_path / "x", *FAST)
    assert code == 2 and "rfclip" in err and err.count("\n") == 1


def test_inference_flags_reach_the_segmenter_options():
    from rfclip.cli import build_parser
    from rfclip.cli.common import segmenter_options

    args = build_parser().parse_args(["segment", "a.jpg", "--classes", "a;b", "--out", "o", "--compile",
                                      "--precision", "bf16", "--batch-size", "8", "--option", "beta=0.5"])
    assert segmenter_options(args) == {"compile": True, "precision": "bf16", "batch_size": 8, "beta": 0.5}
    assert segmenter_options(build_parser().parse_args(["segment", "a.jpg", "--classes", "a", "--out", "o"])) == {}
