"""Real-world inputs, round 3 (issue 21): class lists as people write them, a text cache that cannot collide,
settings checked before work starts, messages that say what is true, outputs that say what was used, and the
Python API's niceties. Tiny random models; every test here failed before its fix."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.cli import main
from rfclip.errors import RfclipError
from rfclip.segmenter import Segmenter
from rfclip.text import TextClassifier, parse_classes


@pytest.fixture(scope="module")
def seg(tiny_clip):
    return Segmenter(tiny_clip, method="clip", text_cache=False, short_side=64, slide_crop=32, slide_stride=32)


def _image(path, size=(48, 40), seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


# ---------------------------------------------------------------------------------------------- 2. class lists
@pytest.mark.parametrize("text", ["road\ncar\nsky", "road\r\ncar\r\nsky\r\n", "road\ncar;sky", "\nroad\ncar\nsky\n"])
def test_a_new_line_separates_classes(text):
    assert parse_classes(text) == [["road"], ["car"], ["sky"]]


def test_a_line_keeps_its_synonyms():
    assert parse_classes("cat, kitty\ndog") == [["cat", "kitty"], ["dog"]]


@pytest.mark.parametrize("text", ["cat;Cat", "cat; CAT ;dog", ["cat", " Cat "], "road car;Road  Car"])
def test_names_differing_only_in_case_or_spaces_are_duplicates(text):
    with pytest.raises(RfclipError, match="listed twice"):
        parse_classes(text)


@pytest.mark.parametrize("classes, expected", [
    (["cat", 5], "not a name"),
    (["cat", None], "not a name"),
    ([["cat", 3]], "not a name"),
    (["cat", [], "dog"], "class 1 .* has no name"),
    (["cat", "  ", "dog"], "class 1 .* has no name"),
    (42, "must be a string or a list"),
    (b"cat;dog", "must be a string or a list"),
])
def test_python_api_refuses_what_is_not_a_class_name(classes, expected):
    with pytest.raises(RfclipError, match=expected):
        parse_classes(classes)


def test_classes_file_with_bom_and_crlf(tmp_path, capsys, monkeypatch):
    from rfclip.cli.segment import read_classes

    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffcat, kitty\r\ndog\r\n# comment\r\ngrass\r\n".encode("utf-8"))
    args = type("Args", (), {"classes_file": str(path), "classes": None})()
    assert read_classes(args) == [["cat", "kitty"], ["dog"], ["grass"]]


def test_segment_batch_of_no_images_is_empty_and_classes_are_checked(seg):
    assert seg.segment_batch([], "cat;dog") == []
    assert seg.predict([], seg.encode_classes("cat;dog")) == []
    with pytest.raises(RfclipError, match="listed twice"):
        seg.segment_batch([], "cat;Cat")


# ---------------------------------------------------------------------------------------------- 3. text cache
def test_text_cache_vocabularies_that_joined_alike_get_their_own_embeddings(tiny_clip, tmp_path):
    first, second = [["road\ncar"], ["sky"]], [["road"], ["car\nsky"]]
    TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu").encode(first)  # fills the disk cache
    cached = TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu").encode(second).features
    fresh = TextClassifier(tiny_clip, cache_dir=False, device="cpu").encode(second).features
    torch.testing.assert_close(cached, fresh)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_text_cache_key_depends_on_templates(tiny_clip, tmp_path):
    a = TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu", templates=["a photo of a {}."])
    b = TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu", templates=["a photo of a {}.", "{}"])
    assert a._disk_path(["cat"]) != b._disk_path(["cat"])
    a.encode("cat;dog")
    torch.testing.assert_close(TextClassifier(tiny_clip, cache_dir=tmp_path, device="cpu",
                                              templates=["a photo of a {}.", "{}"]).encode("cat;dog").features,
                               TextClassifier(tiny_clip, cache_dir=False, device="cpu",
                                              templates=["a photo of a {}.", "{}"]).encode("cat;dog").features)


# ---------------------------------------------------------------------------------------------- 11. Python API
def test_text_cache_true_means_the_default_cache(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path))
    s = Segmenter(tiny_clip, method="clip", text_cache=True)
    assert s.text.cache_dir == tmp_path / "text"
    with pytest.raises(RfclipError, match="text_cache"):
        Segmenter(tiny_clip, method="clip", text_cache=3)


# ---------------------------------------------------------------------------------------------- 5. settings
@pytest.fixture(scope="module")
def ckpt(tiny_clip, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.half().contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))  # OpenAI-like
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(3):
        _image(root / f"p{i}.png", seed=i)
    return root


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("size", [1, 15, 100000])
def test_calibrate_image_size_out_of_range(tiny_clip, photos, size):
    from rfclip.calibrate import calibrate

    with pytest.raises(RfclipError, match="image_size must be a whole number from the model's patch size 16 to 2048"):
        calibrate(tiny_clip, photos, image_size=size, save=False, device="cpu")


def test_calibrate_cli_checks_image_size_and_out_before_loading(photos, tmp_path, capsys, monkeypatch):
    import rfclip.models.loading as loading

    monkeypatch.setattr(loading, "load_clip", lambda *a, **k: pytest.fail("the model loaded before the check"))
    code, _, err = run_cli(capsys, "calibrate", photos, "--image-size", 100000)
    assert code == 2 and "larger than 2048" in err
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_cli(capsys, "calibrate", photos, "--out", tmp_path / "a_file" / "dims.json")
    assert code == 2 and "is a file, not a folder" in err and "--out" in err
    code, _, err = run_cli(capsys, "calibrate", photos, "--out", tmp_path)
    assert code == 2 and "it is a folder" in err


def test_calibrate_api_checks_out_file_before_computing(tiny_clip, photos, tmp_path, monkeypatch):
    import rfclip.calibrate as cal

    monkeypatch.setattr(cal, "token_profiles", lambda *a: pytest.fail("computed before the check"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RfclipError, match="is a file"):
        cal.calibrate(tiny_clip, photos, out_file=tmp_path / "a_file" / "d.json", device="cpu")


@pytest.mark.parametrize("options, expected", [
    (dict(pad_crops_to=100000), "pad_crops_to 100000 is larger than 512"),
    (dict(pad_crops_to=True), "pad_crops_to must be a whole number"),
    (dict(method="naclip", gaussian_std=0), "gaussian_std must be a finite number above 0"),
    (dict(method="naclip", gaussian_std=-1.0), "gaussian_std must be a finite number above 0"),
    (dict(method="naclip", gaussian_std=float("nan")), "gaussian_std must be a finite number"),
    (dict(method="naclip", gaussian_std="nan"), "gaussian_std must be a finite number"),
    (dict(method="rfclip", tau_mult=float("nan")), "tau_mult must be a finite number"),
    (dict(method="rfclip", theta_a="inf"), "theta_a must be a finite number"),
    (dict(method="rfclip", beta=True), "beta must be a number, got True"),
    (dict(method="naclip", gaussian_std=True), "gaussian_std must be a number"),
    (dict(method="rfclip+fsa+fsa"), "plug-in 'fsa' is named twice"),
    (dict(pixel_mean=(float("inf"), 0, 0)), "pixel_mean / pixel_std must be 3 RGB values"),
    (dict(pixel_std=(1.0, float("inf"), 1.0)), "pixel_mean / pixel_std must be 3 RGB values"),
    (dict(method="naclip+fsa", plugins=("fsa",)), "plug-in 'fsa' is named twice"),
])
def test_settings_are_checked_before_work_starts(tiny_clip, options, expected):
    options = dict(options)
    method = options.pop("method", "clip")
    with pytest.raises(RfclipError, match=expected):
        Segmenter(tiny_clip, method=method, text_cache=False, **options)


def test_cli_option_beta_true_is_refused_before_loading(photos, tmp_path, capsys, monkeypatch):
    import rfclip.models.loading as loading

    monkeypatch.setattr(loading, "load_clip", lambda *a, **k: pytest.fail("the model loaded before the check"))
    code, _, err = run_cli(capsys, "segment", photos / "p0.png", "--classes", "a;b", "--out", tmp_path / "o",
                           "--option", "beta=true")
    assert code == 2 and "beta must be a number" in err
    code, _, err = run_cli(capsys, "segment", photos / "p0.png", "--classes", "a;b", "--out", tmp_path / "o",
                           "--method", "rfclip+fsa", "--plugin", "fsa")
    assert code == 2 and "named twice" in err


def test_non_finite_scores_name_the_setting_when_the_weights_are_finite(tiny_clip, random_image):
    s = Segmenter(tiny_clip, method="clip", text_cache=False, short_side=64, pixel_std=(1e-38, 1e-38, 1e-38))
    with pytest.raises(RfclipError) as err:
        s.segment(random_image, "cat;dog")
    assert "pixel_std" in str(err.value) and "checkpoint" not in str(err.value)


def test_non_finite_scores_blame_the_checkpoint_when_the_weights_hold_nan(random_image):
    from conftest import make_clip

    clip = make_clip(seed=3)
    with torch.no_grad():
        clip.model.visual.proj[0, 0] = float("nan")
    s = Segmenter(clip, method="clip", text_cache=False, short_side=64)
    with pytest.raises(RfclipError, match="weights hold NaN/inf values; check the checkpoint"):
        s.segment(random_image, "cat;dog")


# ---------------------------------------------------------------------------------------------- 6. messages
def _special_paths(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {"named pipe (FIFO)": fifo, "symbolic link loop": loop, "is a folder": folder,
            "is a device": "/dev/null"}


def test_image_paths_that_are_not_files_say_what_they_are(tmp_path):
    from rfclip.inference import read_image

    for expected, path in _special_paths(tmp_path).items():
        with pytest.raises(RfclipError, match=re.escape(expected)) as err:
            read_image(path)  # a FIFO must not block
        assert "not found" not in str(err.value)


def test_unreadable_image_says_permission_denied(tmp_path, monkeypatch):
    import PIL.Image

    from rfclip.inference import read_image

    path = _image(tmp_path / "locked.png")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(PIL.Image, "open", denied)
    with pytest.raises(RfclipError, match="permission denied") as err:
        read_image(path)
    assert "valid JPEG" not in str(err.value)


def test_checkpoint_and_classes_file_paths_that_are_not_files(tmp_path, capsys, photos):
    paths = _special_paths(tmp_path)
    for expected, path in paths.items():
        if expected == "is a folder":
            continue  # a folder is a Hugging Face checkpoint
        code, _, err = run_cli(capsys, "segment", photos / "p0.png", "--classes", "a;b", "--out", tmp_path / "o",
                               "--checkpoint", path)
        assert code == 2 and expected in err and "not found" not in err, err
    for expected, path in paths.items():
        code, _, err = run_cli(capsys, "segment", photos / "p0.png", "--classes-file", path, "--out", tmp_path / "o")
        assert code == 2 and expected in err and "not found" not in err, err


def test_text_file_as_vfm_checkpoint_says_it_is_not_a_checkpoint(tmp_path):
    from rfclip.models.vfm import read_state_dict

    notes = tmp_path / "notes.pth"
    notes.write_text("these are my notes\n")
    with pytest.raises(RfclipError, match=r"is not a checkpoint \(it holds text\)"):
        read_state_dict(notes)
    for expected, path in _special_paths(tmp_path).items():
        with pytest.raises(RfclipError, match=re.escape(expected)):
            read_state_dict(path)


# ---------------------------------------------------------------------------------------------- 12. the house
def test_library_never_imports_the_command_line_package():
    import ast
    from pathlib import Path

    import rfclip

    root = Path(rfclip.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if module.lstrip(".").split(".")[0] == "cli" or module.startswith("rfclip.cli"):
                    upward.append(f"{path.relative_to(root)}: {module}")
    assert upward == []
    from rfclip.cli import common
    from rfclip.methods import options

    assert common.parse_options is options.parse_options and common.parse_value is options.parse_value
    assert options.parse_options(["beta=0.4", "distraction_dims=4,162"]) == {"beta": 0.4, "distraction_dims": [4, 162]}


def test_a_torch_tensor_is_an_image(seg, random_image):
    from rfclip.inference import read_image

    chw = torch.from_numpy(random_image).permute(2, 0, 1)
    for tensor in (chw, chw[None], torch.from_numpy(random_image), chw.float() / 255, (chw.float() / 255).half()):
        rgb, _ = read_image(tensor)
        np.testing.assert_array_equal(rgb, random_image)
    a = seg.segment(chw, "cat;dog").mask
    b = seg.segment(random_image, "cat;dog").mask
    np.testing.assert_array_equal(a, b)
    with pytest.raises(RfclipError, match="image tensor must be"):
        read_image(torch.zeros(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- 10. outputs
def test_json_records_what_was_used(tiny_clip, ckpt, photos, tmp_path, capsys):
    import hashlib

    code, _, err = run_cli(capsys, "segment", photos / "p0.png", "--classes", "road;sky", "--checkpoint", ckpt,
                           "--method", "rfclip", "--option", "distraction_dims=3,7", "--short-side", 64,
                           "--device", "cpu", "--out", tmp_path / "out", "-q")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "p0.json").read_text())
    assert record["crops_per_forward"] == 8  # the CPU default, not null
    assert record["distraction_dims"] == {"dims": [3, 7], "source": "distraction_dims option"}
    assert record["templates"]["set"] == "imagenet-80 (CLIP)" and record["templates"]["count"] == 80
    assert record["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_legend_names_are_not_cut_on_small_images(monkeypatch):
    from rfclip import viz

    cut = []
    real = viz._truncate
    monkeypatch.setattr(viz, "_truncate", lambda *a: cut.append(real(*a)) or cut[-1])
    mask = np.zeros((40, 48), np.int64)
    mask[20:] = 1
    picture = viz.overlay(np.zeros((40, 48, 3), np.uint8), mask, ["road", "sidewalk"])
    assert cut == ["road", "sidewalk"]
    assert picture.width > 48 + 80 and picture.height >= 40


def test_pillow_warnings_do_not_reach_stderr(tmp_path, capsys):
    import warnings

    from rfclip.inference import read_image

    path = tmp_path / "badexif.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        path, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image(path)
    assert [str(w.message) for w in caught] == []


def test_not_evaluated_list_does_not_repeat_the_dataset_name(tmp_path):
    from rfclip.data.datasets import find_dataset_root
    from rfclip.evaluate import summary_markdown

    with pytest.raises(RfclipError) as err:
        find_dataset_root("context60", tmp_path)
    result = {"miou": 50.0, "aacc": 90.0, "num_images": 10, "images_per_s": 2.0, "split": "val", "limit": None,
              "model": {"name": "ViT-B-32", "pretrained": "openai", "source": "open_clip:openai"}, "method": "naclip",
              "method_options": {}, "preset": "default", "precision": "float32", "device": "cpu", "world_size": 1,
              "overrides": {}, "settings": {"short_side": 336, "slide_crop": 224, "slide_stride": 112,
                                             "logit_scale": 40.0, "prob_thd": 0.0, "area_thd": None, "pamr": False}}
    md = summary_markdown({"voc20": result}, missing={"context60": str(err.value)})
    line = next(line for line in md.splitlines() if line.startswith("- Context60"))
    assert line.count("Context60") == 1, line


# ---------------------------------------------------------------------------------------------- 7. calibrate
def test_calibrate_skips_an_unreadable_image_and_warns_on_weak_peaks(ckpt, photos, tmp_path, capsys):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(photos, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "._p0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: not an input
    out = tmp_path / "dims.json"
    code, stdout, err = run_cli(capsys, "calibrate", folder, "--checkpoint", ckpt, "--device", "cpu", "--out", out,
                                "--topk", 2, "--quiet")
    assert code == 2 and err.count("(skipped)") == 1 and "broken.png" in err and "._p0" not in err, err
    assert "distraction dims from 3 images (1 unreadable skipped)" in stdout
    assert "warning: the peaks are weak" in err and "100 or more natural photos" in err
    assert json.loads(out.read_text())["num_images"] == 3


def test_calibrate_api_result_says_weak_peaks(tiny_clip, photos):
    from rfclip.calibrate import calibrate

    result = calibrate(tiny_clip, photos, topk=2, save=False, device="cpu")
    assert result.weakest_peak < 2.0 and "calibrate on 100 or more natural photos" in result.warning()
    with pytest.raises(RfclipError, match="none of the 1 images could be read"):
        calibrate(tiny_clip, [np.zeros((4, 4), np.int32)], save=False, device="cpu")
