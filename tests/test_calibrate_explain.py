"""Calibration of distraction dimensions (recovers planted ones; the file RF-CLIP picks up) and `explain`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.calibrate import calibrate, embedding_weights
from rfclip.distraction_dims import dims_file_for, load_dims_file, resolve_distraction_dims
from rfclip.errors import RfclipError
from rfclip.explain import explain, explain_figures
from rfclip.segmenter import Segmenter

PLANTED = (7, 33)


@pytest.fixture(scope="module")
def planted_clip(tiny_clip):
    """Layer 0's MLP writes a large constant into channels 7 and 33 of every token (massive activations)."""
    clip = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        clip.model.visual.transformer.resblocks[0].mlp.c_proj.bias[list(PLANTED)] += 12.0
    return clip


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(60 + 10 * i, 80, 3), dtype=np.uint8) for i in range(5)]


def test_embedding_weights_normalisations():
    x = torch.tensor([[1.0, -1.0, 3.0]])
    torch.testing.assert_close(embedding_weights(x), torch.tensor([[2 / 6, 0.0, 4 / 6]]))
    torch.testing.assert_close(embedding_weights(x, "abs"), torch.tensor([[0.2, 0.2, 0.6]]))
    torch.testing.assert_close(embedding_weights(x, "raw"), torch.tensor([[1 / 3, -1 / 3, 1.0]]))


def test_calibrate_recovers_planted_dims_and_rfclip_picks_them_up(planted_clip, arrays, tmp_path, monkeypatch):
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RfclipError, match="rfclip calibrate"):
        Segmenter(planted_clip, method="rfclip", device="cpu", text_cache=False)
    calls = []
    result = calibrate(planted_clip, arrays, topk=2, device="cpu", batch_size=2,
                       progress=lambda done, total: calls.append((done, total)))
    assert result.dims == PLANTED
    assert calls[-1] == (5, 5) and result.num_images == 5 and result.num_tokens == 5 * 196
    assert result.path == dims_file_for(planted_clip) and result.path.is_file()
    data = json.loads(result.path.read_text())
    assert data["dims"] == list(PLANTED) and len(data["mean_weight"]) == 64 and data["num_images"] == 5
    w = result.mean_weight
    assert w[list(PLANTED)].min() > 3 * np.median(w)
    assert "7" in result.summary()
    # RF-CLIP finds the saved file by the model identity.
    seg = Segmenter(planted_clip, method="rfclip", device="cpu", text_cache=False)
    assert seg.method.resolved_dims.values == PLANTED and seg.method.resolved_dims.source == str(result.path)
    # An unmodified model does not have these peaks.
    unplanted = copy.deepcopy(planted_clip)
    with torch.no_grad():
        unplanted.model.visual.transformer.resblocks[0].mlp.c_proj.bias[list(PLANTED)] -= 12.0
    plain = calibrate(unplanted, arrays[:2], topk=2, device="cpu", save=False)
    assert plain.dims != PLANTED and plain.path is None


def test_calibrate_from_a_folder_and_dims_file(planted_clip, arrays, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, a in enumerate(arrays[:3]):
        Image.fromarray(a).save(folder / ("sub" if i else ".") / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "dims.json"
    result = calibrate(planted_clip, folder, topk=2, device="cpu", out_file=out, image_size=112)
    assert result.dims == PLANTED and result.num_images == 3 and result.num_tokens == 3 * 49
    assert load_dims_file(out, width=64) == PLANTED
    seg = Segmenter(planted_clip, method="rfclip", dims_file=str(out), device="cpu", text_cache=False)
    assert seg.method.resolved_dims.values == PLANTED
    dims, src = resolve_distraction_dims(planted_clip, distraction_dims="3, 9")
    assert dims == (3, 9)
    with pytest.raises(RfclipError, match="out of range"):
        load_dims_file(out, width=16)
    with pytest.raises(RfclipError, match="not found"):
        calibrate(planted_clip, tmp_path / "missing", device="cpu")
    with pytest.raises(RfclipError, match="no images"):
        calibrate(planted_clip, _empty_dir(tmp_path), device="cpu")


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir(exist_ok=True)
    return d


def test_explain_writes_readable_images(tiny_clip, tmp_path):
    clip = copy.deepcopy(tiny_clip)
    with torch.no_grad():  # planted distraction tokens so that every diagnostic has something to show
        for t in (20, 21, 100, 150):
            clip.model.visual.positional_embedding[1 + t, 20] += 60.0
    seg = Segmenter(clip, method="rfclip", distraction_dims=(5, 20, 41), device="cpu", text_cache=False,
                    templates=["a photo of a {}."], short_side=224)
    image = np.random.default_rng(1).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    result = explain(seg, image, "cat;dog", tmp_path / "ex", query_point=(100, 60), layers="0-1")
    for name in ("attention", "self_attention", "tokens", "phi", "fiedler", "embedding_weights", "segmentation"):
        path = result.files[name]
        assert path.is_file() and path.suffix == ".png", name
        with Image.open(path) as im:
            assert im.width >= 200 and im.height >= 100, name
            assert np.asarray(im.convert("L")).std() > 5, name  # not a blank picture
    summary = json.loads(result.files["summary"].read_text())
    assert [e["layer"] for e in summary["layers"]] == [0, 1]
    assert summary["layers"][0]["distraction"] == 4 and summary["layers"][0]["redistributed"]
    before, after = summary["layers"][0]["query_attention_on_distraction"]
    assert after == pytest.approx((1 - seg.method.beta) * before, rel=1e-3)  # beta = 0.7 (paper)
    assert summary["query_patch"] == [60 // 16, 100 // 16]
    with pytest.raises(RfclipError, match="outside"):
        explain(seg, image, None, tmp_path / "ex2", query_point=(500, 10))
    other = Segmenter(tiny_clip, method="kk", device="cpu", text_cache=False)
    with pytest.raises(RfclipError, match="rfclip"):
        explain(other, image, None, tmp_path / "ex3")
    # The same pictures and numbers as arrays, without files (what the web demo shows for a clicked point).
    figures = explain_figures(seg, image, "cat;dog", query_point=(100, 60), layers="0-1")
    assert not figures.files and not (tmp_path / "ex2").exists()
    assert set(figures.figures) == set(result.files) - {"summary"}
    assert {k: v for k, v in summary.items() if k != "files"} == figures.summary
    for name, fig in figures.figures.items():
        with Image.open(result.files[name]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(fig.convert("RGB"))), name
