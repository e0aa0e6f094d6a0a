"""Image-level inference invariants on random-weight models."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.errors import RfclipError
from rfclip.inference import load_image, rescale_size, sliding_windows
from rfclip.segmenter import Segmenter
from rfclip.text import parse_classes

CLASSES = "road;car;tree;sky"


@pytest.fixture(scope="module")
def segmenter(tiny_clip):
    return Segmenter(tiny_clip, method="naclip", device="cpu", text_cache=False)


def test_output_size_and_probabilities(segmenter, random_image):
    out = segmenter.segment(random_image, CLASSES)
    H, W = random_image.shape[:2]
    assert out.mask.shape == (H, W) and out.probs.shape == (4, H, W)
    np.testing.assert_allclose(out.probs.sum(0), 1.0, atol=1e-5)
    assert out.mask.min() >= 0 and out.mask.max() < 4
    np.testing.assert_array_equal(out.mask, out.probs.argmax(0))
    assert out.classes == ["road", "car", "tree", "sky"]
    assert abs(sum(out.fractions().values()) - 1) < 1e-9


def test_single_crop_window_equals_whole_image(segmenter, rng):
    image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    slide = segmenter.with_config(short_side=None, slide_crop=224, slide_stride=112).segment(image, CLASSES)
    whole = segmenter.with_config(short_side=None, slide_crop=0).segment(image, CLASSES)
    np.testing.assert_allclose(slide.probs, whole.probs, atol=1e-6)
    np.testing.assert_array_equal(slide.mask, whole.mask)


def test_batched_crops_equal_one_by_one(segmenter, random_image):
    batched = segmenter.with_config(batch_size=64).segment(random_image, CLASSES)
    single = segmenter.with_config(batch_size=1).segment(random_image, CLASSES)
    np.testing.assert_allclose(batched.probs, single.probs, atol=1e-5)


def test_images_batched_together_equal_separate_runs(segmenter, rng):
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(150, 200, 3), (200, 150, 3), (120, 120, 3)]]
    together = segmenter.segment_batch(images, CLASSES)
    for image, out in zip(images, together):
        alone = segmenter.segment(image, CLASSES)
        np.testing.assert_allclose(out.probs, alone.probs, atol=1e-5)


def test_synonyms_score_as_max_and_background_threshold(segmenter, random_image):
    syn = segmenter.segment(random_image, "road,street;car;tree")
    assert syn.classes == ["road", "car", "tree"] and syn.synonyms[0] == ["road", "street"]
    thd = segmenter.with_config(prob_thd=1.01).segment(random_image, "road,street;car;tree")
    assert (thd.mask == 0).all()  # every pixel is below an impossible threshold -> background class 0


def test_pamr_runs(segmenter, random_image):
    out = segmenter.with_config(pamr=True).segment(random_image, CLASSES)
    np.testing.assert_allclose(out.probs.sum(0), 1.0, atol=1e-5)


def test_sliding_window_grid_matches_mmseg():
    wins = sliding_windows(336, 500, 224, 112)
    assert len(wins) == 2 * 4
    assert wins[-1] == (112, 336, 276, 500)  # the last window is shifted back inside the image
    assert sliding_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]
    assert sliding_windows(10, 20, 0, 112) == [(0, 10, 0, 20)]


def test_rescale_follows_mmcv_keep_ratio():
    assert rescale_size(375, 500, 336) == (336, 448)
    assert rescale_size(500, 375, 336) == (448, 336)
    assert rescale_size(100, 1000, 336) == (205, 2048)  # the long side is capped at 2048
    assert rescale_size(10, 20, None) == (10, 20)


def test_parse_classes():
    assert parse_classes("cat,kitty;dog;grass") == [["cat", "kitty"], ["dog"], ["grass"]]
    assert parse_classes("road, car, tree") == [["road"], ["car"], ["tree"]]
    assert parse_classes(["cat", ["dog", "puppy"], "sky, heaven"]) == [["cat"], ["dog", "puppy"], ["sky", "heaven"]]
    for empty in ["", ";;", " , ", []]:
        with pytest.raises(RfclipError, match="empty class list"):
            parse_classes(empty)


def test_load_image_modes(tmp_path):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :10] = 255
    gray = Image.fromarray(rgb[..., 0], "L")
    rgba = Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)]), "RGBA")
    assert load_image(gray).shape == (20, 30, 3)
    assert load_image(rgba).shape == (20, 30, 3)
    assert load_image(rgb[..., 0]).shape == (20, 30, 3)
    # EXIF orientation 6 (rotate 90 CW to display) turns a 20x30 stored image into 30x20
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(path, exif=exif)
    assert load_image(path).shape == (30, 20, 3)


def test_load_image_errors(tmp_path):
    with pytest.raises(RfclipError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(RfclipError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(RfclipError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))


def test_unknown_method_and_option(tiny_clip):
    with pytest.raises(RfclipError, match="unknown method 'nope'"):
        Segmenter(tiny_clip, method="nope", device="cpu")
    with pytest.raises(RfclipError, match="unknown option"):
        Segmenter(tiny_clip, method="naclip", device="cpu", gaussian_sd=3)
    seg = Segmenter(tiny_clip, method="naclip", device="cpu", gaussian_std=3.0, slide_crop=0)
    assert seg.method.gaussian_std == 3.0 and seg.config.slide_crop == 0


def test_with_method_shares_the_model_and_equals_a_fresh_segmenter(segmenter, random_image):
    """A method switch reuses the loaded model, encoder and text cache, and segments as a new Segmenter would."""
    text = segmenter.encode_classes(CLASSES)
    other = segmenter.with_method("sclip", pamr=True)
    assert other.clip is segmenter.clip and other.encoder is segmenter.encoder and other.text is segmenter.text
    assert other.method_name == "sclip" and other.config.pamr and not segmenter.config.pamr
    assert segmenter.method_name == "naclip" and segmenter.method.name == "naclip"
    fresh = Segmenter(segmenter.clip, method="sclip", device="cpu", text_cache=False, pamr=True)
    np.testing.assert_allclose(other.segment(random_image, text).probs, fresh.segment(random_image, text).probs,
                               atol=1e-6)
    fsa = segmenter.with_method("naclip", plugins=["fsa"], gaussian_std=3.0)
    assert fsa.method_name == "naclip+fsa" and fsa.method.options()["gaussian_std"] == 3.0
    with pytest.raises(RfclipError, match="unknown option"):
        segmenter.with_method("sclip", gaussian_std=3.0)
    with pytest.raises(RfclipError, match="unknown method"):
        segmenter.with_method("nope")


def test_text_cache_on_disk(tiny_clip, tmp_path):
    from rfclip.text import TextClassifier

    first = TextClassifier(tiny_clip, cache_dir=tmp_path).encode("cat;dog")
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = TextClassifier(tiny_clip, cache_dir=tmp_path)
    again._embed_queries = None  # a cache hit must not run the text encoder
    second = again.encode("cat;dog")
    torch.testing.assert_close(first.features, second.features)
    norms = first.features.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_encoder_equals_eager(tiny_clip, random_image):
    """``compile=True`` (``--compile``) runs the same hooks through torch.compile: same probabilities as eager.
    NACLIP exercises a replaced last-layer attention inside the compiled graph."""
    seg = Segmenter(tiny_clip, method="naclip", device="cpu", text_cache=False, templates=["{}"], short_side=None,
                    slide_crop=32, slide_stride=16)
    text = seg.encode_classes("cat;dog;grass")
    (_, eager), = seg.predict([random_image], text)
    (_, compiled), = seg.with_config(compile=True).predict([random_image], text)
    assert torch.allclose(eager, compiled, atol=1e-4)
