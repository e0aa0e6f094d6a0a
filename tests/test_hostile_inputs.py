"""Real-world and hostile inputs (issue 15): nothing silently wrong, every user error one line, no hangs.

Each test uses the input that showed the problem. Models are tiny random-weight CLIPs saved as real checkpoint
files (OpenAI layout, float16 safetensors, as the loader reads OpenAI checkpoints); random weights test mechanics.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from open_clip.transformer import Attention
from PIL import Image

from conftest import make_clip
from rfclip.errors import RfclipError


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny CLIP as an OpenAI-layout float16 safetensors file (QuickGELU, geometry from the file)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("hostile") / "tiny.safetensors"
    state = make_clip().model.state_dict()
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- shared helpers
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from rfclip.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_model(monkeypatch):
    """Errors that must come before the model loads: loading it fails the test."""
    import rfclip.cli.common as common

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(common, "build_segmenter", refuse)


@pytest.fixture
def cli_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))


def segment_argv(checkpoint, out, *images, classes="red;green;blue"):
    return ["segment", *images, "--classes", classes, "--out", out, "--checkpoint", checkpoint, "--device", "cpu",
            "--method", "clearclip", "--short-side", "64"]


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    from rfclip import Segmenter

    return Segmenter("ViT-B-16", checkpoint=tiny_checkpoint, method="clearclip", device="cpu", text_cache=False,
                     short_side=64)


def one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("rfclip: error: ", "rfclip segment: error: ", "rfclip explain: error: ")), lines[0]
    assert expected in lines[0], lines[0]


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------- 11: next open_clip
class DevAttention(Attention):
    """What open_clip's development branch puts in ``ResidualAttentionBlock`` instead of ``nn.MultiheadAttention``:
    its own ``Attention`` (in_proj_weight, in_proj_bias, out_proj and num_heads, but no ``embed_dim``), called here
    the way the block calls ``nn.MultiheadAttention``."""

    def __init__(self, d_model, n_head, batch_first=True, **_):
        super().__init__(d_model, n_head)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        return super().forward(q_x, attn_mask=attn_mask), None


def test_attention_module_without_embed_dim_loads_and_segments(tiny_checkpoint, monkeypatch, rng):
    """A model whose blocks use an attention module of open_clip-dev's shape loads from a file, runs the dense
    forward and gives the same probabilities as the nn.MultiheadAttention model on the same weights."""
    from rfclip import Segmenter
    from rfclip.models.loading import load_clip

    reference = Segmenter(load_clip("ViT-B-16", checkpoint=tiny_checkpoint), method="naclip", device="cpu",
                          text_cache=False, short_side=0)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn, "MultiheadAttention", DevAttention)  # open_clip builds its blocks with it
        clip = load_clip("ViT-B-16", checkpoint=tiny_checkpoint)
    attn = clip.model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, DevAttention) and not hasattr(attn, "embed_dim")
    dev = Segmenter(clip, method="naclip", device="cpu", text_cache=False, short_side=0)
    assert (dev.encoder.width, dev.encoder.num_heads) == (reference.encoder.width, reference.encoder.num_heads)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    expected = reference.segment(image, "red;green;blue")
    got = dev.segment(image, "red;green;blue")
    np.testing.assert_allclose(got.probs, expected.probs, atol=1e-5)


def test_attention_without_the_used_attributes_is_a_one_line_error():
    from rfclip.dense import DenseCLIP

    clip = make_clip()
    block = clip.model.visual.transformer.resblocks[1]
    block.attn = torch.nn.Linear(4, 4)  # no in_proj_weight / num_heads
    with pytest.raises(RfclipError, match="block 1 lacks in_proj_weight, in_proj_bias, out_proj, num_heads"):
        DenseCLIP(clip.model.visual)


# ---------------------------------------------------------------------------------------------- 1: 16-bit and float
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    from rfclip.inference import read_image

    Image.fromarray(np.full((240, 320), 30000, np.uint16)).save(tmp_path / "g16.png")  # the input
    rgb, conversion = read_image(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (240, 320, 3)
    assert rgb.min() == rgb.max() == round(30000 * 255 / 65535)  # 117, not 255 (clipped) as before
    assert "16-bit" in conversion and "0..65535" in conversion
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    np.testing.assert_array_equal(read_image(tmp_path / "ramp.png")[0][0, :, 0], np.arange(256))
    rgb16, conversion = read_image(np.full((4, 5, 3), 65535, np.uint16))
    assert rgb16.min() == 255 and "uint16" in conversion
    assert read_image(np.zeros((4, 5, 3), np.uint8))[1] is None


def test_float_images_in_0_1_are_scaled_and_the_rest_refused(tmp_path):
    from rfclip.errors import ImageError
    from rfclip.inference import read_image

    Image.fromarray(np.full((24, 32), 0.5, np.float32)).save(tmp_path / "f01.tif")  # mode F, 0..1
    rgb, conversion = read_image(tmp_path / "f01.tif")
    assert rgb.min() == rgb.max() == 128 and "float" in conversion and "0..1" in conversion
    assert read_image(np.full((4, 5, 3), 1.0 + 1e-6))[0].max() == 255  # rounding overshoot is clipped
    Image.fromarray(np.full((24, 32), 200.0, np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(ImageError, match=r"values 200\.\.200, but rfclip reads float images as brightness in 0\.\.1; save it"):
        read_image(tmp_path / "f255.tif")
    nan = np.full((24, 32), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match="NaN or infinite"):
        read_image(tmp_path / "nan.tif")
    # the API's error for float 0..255 arrays suggests the conversion that fits them (not x * 255)
    with pytest.raises(ImageError) as err:
        read_image(np.full((4, 5, 3), 200.0, np.float32))
    assert "np.clip(x, 0, 255).round().astype(np.uint8)" in str(err.value) and "* 255" not in str(err.value)
    with pytest.raises(ImageError, match=r"values -3\.\.-3.*scale it to 0\.\.1"):
        read_image(np.full((4, 5, 3), -3.0))
    with pytest.raises(ImageError, match=r"got int64 with values 100\.\.100; convert with x.astype\(np.uint8\)"):
        read_image(np.full((4, 5, 3), 100, np.int64))
    Image.fromarray(np.full((4, 5), 3_000_000, np.int32), mode="I").save(tmp_path / "i32.tif")
    with pytest.raises(ImageError, match="32-bit integers"):
        read_image(tmp_path / "i32.tif")


def test_cli_records_the_conversion_once(tiny_checkpoint, tmp_path, capsys, cli_cache):
    for name in ("g16.png", "h16.png"):
        Image.fromarray(np.full((48, 64), 30000, np.uint16)).save(tmp_path / name)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "rgb.png")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *segment_argv(tiny_checkpoint, out, tmp_path / "g16.png", tmp_path / "h16.png",
                                                 tmp_path / "rgb.png"))
    assert code == 0, err
    assert err.splitlines() == [f"rfclip: note: {tmp_path / 'g16.png'} is 16-bit grey (mode I;16): values scaled "
                                "from 0..65535 to 0..255 (recorded as input_conversion in its JSON)"]  # once
    import json

    for name in ("g16", "h16"):
        assert "0..65535 to 0..255" in json.loads((out / f"{name}.json").read_text())["input_conversion"]
    assert json.loads((out / "rgb.json").read_text())["input_conversion"] is None


# ---------------------------------------------------------------------------------------------- 2: duplicate classes
def test_duplicate_class_names_are_refused_by_the_api_as_by_the_cli(segmenter):
    from rfclip.text import parse_classes

    with pytest.raises(RfclipError, match="class 'a' is listed twice"):
        segmenter.segment(np.zeros((32, 32, 3), np.uint8), "a;b;a")  # fractions() would be wrong
    with pytest.raises(RfclipError, match="listed twice"):
        parse_classes(["cat", ["dog", "puppy"], "cat, kitty"])
    assert parse_classes("cat,pet;dog,pet") == [["cat", "pet"], ["dog", "pet"]]  # a shared synonym is fine


# ---------------------------------------------------------------------------------------------- 3: nonsense settings
@pytest.mark.parametrize("settings, expected", [
    (dict(prob_thd=2), "prob_thd must be a finite number in 0..1"),
    (dict(prob_thd=float("nan")), "prob_thd must be a finite number in 0..1"),
    (dict(logit_scale=float("nan")), "logit_scale must be a finite number above 0"),
    (dict(logit_scale=0), "logit_scale must be a finite number above 0"),
    (dict(short_side=-5), "short_side must be a whole number >= 0"),
    (dict(slide_crop=-1), "slide_crop must be a whole number >= 0"),
    (dict(slide_stride=0), "slide_stride must be a whole number >= 1"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1"),
    (dict(area_thd=2.0), "area_thd must be a finite number in 0..1"),
    (dict(background_class=-1), "background_class must be a whole number >= 0"),
    (dict(pamr="yes"), "pamr must be true or false"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
])
def test_settings_out_of_range_are_refused_at_construction(settings, expected):
    from rfclip.inference import InferenceConfig

    with pytest.raises(RfclipError, match=expected.replace(".", r"\.")) as err:
        InferenceConfig(**settings)
    assert "\n" not in str(err.value)


def test_a_stride_larger_than_the_crop_is_refused_where_it_leaves_gaps():
    from rfclip.inference import sliding_windows

    with pytest.raises(RfclipError, match="slide_stride 300 is larger than slide_crop 224, which leaves pixels"):
        sliding_windows(336, 500, 224, 300)  # windows at 0..224 and 276..500: 224..276 uncovered
    assert sliding_windows(200, 224, 224, 300) == [(0, 200, 0, 224)]  # one window: no gap, nothing to refuse
    assert len(sliding_windows(224, 448, 224, 300)) == 2  # 0..224 and 224..448 (shifted back): no gap either


def test_settings_are_checked_by_with_config_and_against_the_model(segmenter):
    with pytest.raises(RfclipError, match="prob_thd"):
        segmenter.with_config(prob_thd=2)
    with pytest.raises(RfclipError, match="slide_crop 8 is smaller than the model's 16-pixel patch"):
        segmenter.with_config(slide_crop=8, slide_stride=8)
    with pytest.raises(RfclipError, match="background_class 7 is not one of the 2 classes"):
        segmenter.with_config(prob_thd=0.9, background_class=7).segment(np.zeros((32, 32, 3), np.uint8), "a;b")
    assert segmenter.with_config(short_side=336.0).config.short_side == 336  # an integral float is fine


@pytest.mark.parametrize("flag, value, expected", [
    ("--prob-thd", "2", "argument --prob-thd: expected a number in 0..1, got '2'"),
    ("--overlay-opacity", "5", "argument --overlay-opacity: expected a number in 0..1, got '5'"),
    ("--logit-scale", "nan", "argument --logit-scale: expected a finite number above 0, got 'nan'"),
    ("--short-side", "-5", "argument --short-side: expected 0 or more, got -5"),
])
def test_cli_settings_out_of_range(tmp_path, capsys, no_model, flag, value, expected):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    code, out, err = run_cli(capsys, "segment", tmp_path / "a.png", "--classes", "a;b", "--out", tmp_path / "out",
                             flag, value)
    one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_an_error_naming_the_checkpoint(tmp_path, rng):
    from safetensors.torch import save_file

    from rfclip import Segmenter
    from rfclip.models.loading import load_clip

    state = {k: v.half().contiguous() for k, v in make_clip().model.state_dict().items()}
    state["visual.transformer.resblocks.1.attn.in_proj_weight"][:] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(RfclipError, match=r"nan\.safetensors holds NaN or infinite weights \(first in "
                                          r"visual\.transformer\.resblocks\.1\.attn\.in_proj_weight\)"):
        load_clip("ViT-B-16", checkpoint=tmp_path / "nan.safetensors")
    clip = make_clip(seed=3)  # weights that go bad after loading: the outputs are checked too
    with torch.no_grad():
        clip.model.visual.transformer.resblocks[0].mlp.c_fc.weight[0, 0] = float("inf")
    seg = Segmenter(clip, method="clearclip", device="cpu", text_cache=False, short_side=0)
    with pytest.raises(RfclipError, match=r"model .* \(random\) produced non-finite scores"):
        seg.segment(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "a;b")


# ---------------------------------------------------------------------------------------------- 4: activation
def test_plain_fp32_state_dict_says_which_activation_and_how_to_force_the_other(tmp_path, monkeypatch, caplog):
    import copy
    import logging

    import open_clip
    from safetensors.torch import save_file

    from conftest import TINY_CFG
    from rfclip.models import loading

    cfg = {k: copy.deepcopy(v) for k, v in TINY_CFG.items() if k != "quick_gelu"}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "rfclip-tiny", cfg)  # a built-in name for it
    loading._builtin_shapes.cache_clear()
    try:
        state = make_clip().model.state_dict()
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
        with caplog.at_level(logging.INFO, logger="rfclip"):
            clip = loading.load_clip("rfclip-tiny", checkpoint=tmp_path / "plain.safetensors")
        warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert not clip.quick_gelu and len(warnings_) == 1
        assert "does not say which activation" in warnings_[0] and "using GELU" in warnings_[0]
        assert "--quick-gelu (quick_gelu=True in Python)" in warnings_[0]
        assert any("with GELU: open_clip's rfclip-tiny config" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rfclip"):
            assert loading.load_clip("rfclip-tiny", checkpoint=tmp_path / "plain.safetensors", quick_gelu=True).quick_gelu
            assert not loading.load_clip("rfclip-tiny", checkpoint=tmp_path / "plain.safetensors", quick_gelu=False).quick_gelu
        assert not caplog.records  # an explicit choice needs no note
    finally:
        loading._builtin_shapes.cache_clear()
    from rfclip.cli import build_parser

    parse = build_parser().parse_args
    base = ["segment", "a.png", "--classes", "a", "--out", "o"]
    assert [parse(base + flag).quick_gelu for flag in ([], ["--quick-gelu"], ["--no-quick-gelu"])] == [None, True, False]


# ---------------------------------------------------------------------------------------------- 5: thin images
def test_images_thinner_than_a_patch_are_segmented(segmenter, rng):
    for shape in ((1, 500, 3), (10, 2000, 3), (3, 3, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        out = segmenter.with_config(short_side=336).segment(image, "a;b")
        assert out.mask.shape == shape[:2] and out.probs.shape == (2, *shape[:2])
        np.testing.assert_allclose(out.probs.sum(0), 1.0, atol=1e-5)


def test_a_bad_image_in_a_folder_costs_no_other(tiny_checkpoint, tmp_path, capsys, cli_cache):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(np.full((1, 500, 3), 100, np.uint8)).save(folder / "b_thin.png")  # the crash
    (folder / "d_corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *segment_argv(tiny_checkpoint, out, folder), "--images-per-batch", "4")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"rfclip: error: cannot read image {folder / 'd_corrupt.jpg'}") and "(skipped)" in lines[0]
    assert lines[1] == ("rfclip: error: 1 of 4 images could not be read and were skipped (see above); fix or remove "
                        "them and segment them again")
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}{s}" for n in ("a", "b_thin", "c")
                                                            for s in (".json", "_mask.png", "_overlay.png")]
                                                           + ["run.json"])
    with Image.open(out / "b_thin_mask.png") as mask:
        assert mask.size == (500, 1)


def test_an_unreadable_file_among_named_images_is_skipped(tiny_checkpoint, tmp_path, capsys, cli_cache):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *segment_argv(tiny_checkpoint, out, tmp_path / "a.png", tmp_path / "garbage.jpg",
                                                 tmp_path / "missing.png"))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("rfclip: error: ") for line in lines), err
    assert f"cannot read image {tmp_path / 'garbage.jpg'}" in lines[0] and lines[0].endswith("(skipped)")
    assert f"image not found: {tmp_path / 'missing.png'}" in lines[1] and lines[1].endswith("(skipped)")
    assert "2 of 3 images could not be read and were skipped" in lines[2]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_mask.png", "a_overlay.png", "run.json"]


# ---------------------------------------------------------------------------------------------- 6: long class name
def test_legend_of_a_10000_character_class_name_measures_little(monkeypatch):
    from rfclip import viz

    calls = []
    measure = viz._text_size

    def counting(draw, text, font):
        calls.append(len(text))
        return measure(draw, text, font)

    monkeypatch.setattr(viz, "_text_size", counting)
    mask = np.zeros((240, 320), np.int64)
    mask[:, 160:] = 1
    picture = viz.overlay(np.zeros((240, 320, 3), np.uint8), mask, ["x" * 10_000, "b"])
    assert len(calls) <= 40  # binary search: ~log2(10000) measurements, not one per character
    assert sum(calls) <= 40 * 10_001  # and each measures at most the whole name once
    assert picture.width <= 320 + 320  # the name is truncated to the legend's width


# ---------------------------------------------------------------------------------------------- 7: user errors
def test_decompression_bomb_is_a_one_line_user_error(tmp_path, capsys, no_model, monkeypatch):
    from rfclip.errors import ImageError
    from rfclip.inference import read_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 20000 x 20000 PNG, scaled down: Pillow refuses > 2000
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(tmp_path / "huge.png")
    with pytest.raises(ImageError, match=r"too large to read safely .*downscale it first"):
        read_image(tmp_path / "huge.png")
    code, _, err = run_cli(capsys, "segment", tmp_path / "huge.png", "--classes", "a;b", "--out", tmp_path / "out")
    one_line_error(code, err, "too large to read safely")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")  # between the limit and twice it:
    with warnings_as_errors():
        assert read_image(tmp_path / "big.png")[0].shape == (40, 40, 3)  # read without Pillow's warning


@pytest.mark.parametrize("field, value, expected", [
    ("patch_size", "sixteen", "vision_config.patch_size is 'sixteen', not a positive whole number"),
    ("hidden_size", 64.5, "vision_config.hidden_size is 64.5"),
    ("num_attention_heads", 0, "vision_config.num_attention_heads is 0"),
    ("layer_norm_eps", "tiny", "vision_config.layer_norm_eps is 'tiny', not a positive number"),
])
def test_hf_config_with_a_bad_field_is_a_one_line_error(tmp_path, field, value, expected):
    import json

    from rfclip.models import hf
    from rfclip.models.loading import load_clip

    config = hf.hf_config_from_open_clip(_tiny_cfg(), True)
    config["vision_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config fails first
    with pytest.raises(RfclipError, match=expected.replace(".", r"\.").replace("(", r"\(")) as err:
        load_clip("ViT-B-16", checkpoint=tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)
    config["text_config"] = ["not", "an", "object"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RfclipError, match="text_config is a list, not an object"):
        load_clip("ViT-B-16", checkpoint=tmp_path)


def _tiny_cfg() -> dict:
    from conftest import TINY_CFG

    return {k: v for k, v in TINY_CFG.items() if k != "quick_gelu"}


def test_out_that_cannot_be_created_fails_before_the_model_loads(tmp_path, capsys, no_model):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    code, _, err = run_cli(capsys, "segment", tmp_path / "a.png", "--classes", "a;b", "--out", tmp_path / ("x" * 300))
    one_line_error(code, err, "name too long")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_late_errors_leave_no_empty_output_folder(tiny_checkpoint, tmp_path, capsys, cli_cache):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "new" / "out"  # two folders to create (and to remove again)
    code, _, err = run_cli(capsys, *segment_argv(tiny_checkpoint, out, tmp_path / "a.png"),
                           "--slide-crop", "8")  # known bad only once the model (its patch size) is loaded
    one_line_error(code, err, "slide_crop 8 is smaller than the model's 16-pixel patch")
    assert not (tmp_path / "new").exists()
    code, _, err = run_cli(capsys, *segment_argv(tiny_checkpoint, out, tmp_path / "a.png"), "--slide-stride", "300",
                           "--short-side", "400")  # 400 x 533: windows at x 0, 300, 309: 224..300 uncovered
    one_line_error(code, err, "slide_stride 300 is larger than slide_crop 224")  # found on the first image
    assert not (tmp_path / "new").exists()


def test_explain_query_outside_the_image_fails_before_the_model_loads(tmp_path, capsys, no_model):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    code, _, err = run_cli(capsys, "explain", tmp_path / "a.png", "--out", tmp_path / "explain",
                           "--query", "5000,5000")
    one_line_error(code, err, "query point (5000, 5000) lies outside the 64x48 image")
    assert not (tmp_path / "explain").exists()


# ---------------------------------------------------------------------------------------------- 8: non-ASCII legend
LEGEND_NAMES = ["café", "Straße", "Ωμέγα", "Москва", "猫", "🐱", "road"]


def drawn_legend(monkeypatch, names=LEGEND_NAMES, height=300):
    """The (text, font) pairs the overlay's legend draws."""
    from PIL import ImageDraw

    from rfclip import viz

    drawn = []
    draw_text = ImageDraw.ImageDraw.text

    def recording(self, xy, text, *args, **kwargs):
        if self.im.size[1] == height:  # the legend panel, not the glyph probes
            drawn.append((text, kwargs.get("font")))
        return draw_text(self, xy, text, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ImageDraw.ImageDraw, "text", recording)
        mask = np.repeat(np.arange(len(names)), 60)[None].repeat(height, 0)
        viz.overlay(np.zeros((height, 60 * len(names), 3), np.uint8), mask, names)
    return [(text, font) for text, font in drawn if not text.endswith("%")]


def test_non_ascii_legend_never_draws_missing_glyph_boxes(monkeypatch):
    from PIL import ImageFont

    from rfclip import viz

    default = viz.get_font(20)
    if isinstance(default, ImageFont.FreeTypeFont) and default.getname()[0] == "Aileron":
        assert not viz.has_glyph(default, "é")  # the box: Pillow's default font has no "é"
    assert viz.has_glyph(default, "e")
    labels = drawn_legend(monkeypatch)
    assert len(labels) == len(LEGEND_NAMES)
    for text, font in labels:
        assert all(viz.has_glyph(font, c) for c in text), text  # drawn with a font that has its glyphs ...
        assert text in LEGEND_NAMES or text.isascii(), text  # ... as given, or as readable ASCII
    shown = dict(zip(LEGEND_NAMES, (t for t, _ in labels)))
    if any("DejaVuSans" in path for path in viz._fallback_font_files()):
        assert [shown[n] for n in ("café", "Straße", "Ωμέγα", "Москва")] == ["café", "Straße", "Ωμέγα", "Москва"]


def test_without_any_font_the_legend_falls_back_to_ascii_and_says_so_once(monkeypatch, caplog):
    import logging

    from rfclip import viz

    monkeypatch.setattr(viz, "_fallback_font_files", lambda: ())
    monkeypatch.setattr(viz, "_fallback_fonts", lambda size: ())
    monkeypatch.setattr(viz, "_warned_glyphs", False)
    with caplog.at_level(logging.WARNING, logger="rfclip"):
        labels = [t for t, _ in drawn_legend(monkeypatch)]
        drawn_legend(monkeypatch)
    default_has_accents = viz.has_glyph(viz.get_font(20), "é")
    assert labels[4:] == ["<U+732B>", "<U+1F431>", "road"]
    if not default_has_accents:
        assert labels[:2] == ["cafe", "Strasse"]
    assert all(t.isascii() or all(viz.has_glyph(viz.get_font(20), c) for c in t) for t in labels)
    assert len([r for r in caplog.records if "legends show such characters in ASCII" in r.getMessage()]) == 1


# ---------------------------------------------------------------------------------------------- 9: noise
def test_read_only_arrays_from_pillow_give_no_warning(segmenter, tmp_path):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    image = np.asarray(Image.open(tmp_path / "a.png"))  # the most common input: read-only
    assert not image.flags.writeable
    with warnings_as_errors():
        segmenter.segment(image, "a;b")


def test_raw_pickle_checkpoint_is_refused_without_torch_warnings(tmp_path, capsys, cli_cache):
    import pickle

    from rfclip.models.loading import load_clip

    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump({"a": 1}, f)
    with warnings_as_errors(), pytest.raises(RfclipError, match="pickled Python objects"):
        load_clip("ViT-B-16", checkpoint=tmp_path / "raw.pt")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    code, _, err = run_cli(capsys, *segment_argv(tmp_path / "raw.pt", tmp_path / "out", tmp_path / "a.png"))
    one_line_error(code, err, "pickled Python objects")


def test_convert_and_eval_write_no_progress_bars_into_logs(tiny_checkpoint, tmp_path, capsys, cli_cache):
    from test_evaluate import make_voc2012

    src = tmp_path / "coco_stuff164k"
    for sub in ("images", "annotations"):
        (src / sub / "val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(src / "images" / "val2017" / "000000000139.jpg")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(src / "annotations" / "val2017" / "000000000139.png")
    code, _, err = run_cli(capsys, "convert-coco-object", src, "-o", tmp_path / "coco_object", "--num-workers", "1")
    assert code == 0 and err == ""  # stderr is not a terminal here: no progress bar
    make_voc2012(tmp_path / "VOC2012", num_images=2)
    code, _, err = run_cli(capsys, "eval", "--dataset", "voc21", "--root", tmp_path / "VOC2012", "--out",
                           tmp_path / "res" / "voc.json", "--checkpoint", tiny_checkpoint, "--device", "cpu",
                           "--method", "clearclip", "--short-side", "64", "--num-workers", "0")
    assert code == 0 and err == ""


def test_segmenter_given_a_weights_file_points_at_checkpoint(tiny_checkpoint):
    from rfclip import Segmenter

    for model in (str(tiny_checkpoint), tiny_checkpoint, "missing/model.safetensors"):
        with pytest.raises(RfclipError, match=r"is a weights file, not an open_clip model name; pass the file as "
                                              r"checkpoint="):
            Segmenter(model, device="cpu")


# ---------------------------------------------------------------------------------------------- 10: README
def test_readme_quick_start_installs_cpu_torch_first_and_tests_as_ci_does():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2  # 1: set up and segment an image; 2: set up and run the tests
    first, second = commands
    cpu = first.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < first.index("pip install -e .") < first.index("rfclip segment")  # no CUDA wheel before the CPU one
    ci = (root / ".ci" / "run").read_text()
    pins = re.search(r"torch==\S+ torchvision==\S+", ci).group(0)
    assert pins in first and pins in second
    assert re.search(r"pytest( -n auto)?$", second).group(0) == re.search(r"python -m (pytest.*)$", ci, re.M).group(1)
    assert "fiedler.png" in readme and "written only when some layer finds distraction tokens" in readme
