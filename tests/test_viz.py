"""Pictures: palette PNG masks, overlays with legends, heat maps, grids and line plots."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from rfclip import viz
from rfclip.errors import RfclipError


def _scene(h=120, w=160):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 100)], -1).astype(np.uint8)
    mask = np.zeros((h, w), np.int64)
    mask[20:70, 30:90] = 2
    mask[80:, 100:] = 4
    return img, mask


NAMES = ["background", "cat", "dog", "sky", "tree"]


def test_palette_deterministic_and_distinct():
    p = viz.palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    assert np.array_equal(p, viz.palette(300))
    assert np.array_equal(viz.palette(5), p[:5])
    assert len({tuple(c) for c in p[:20]}) == 20
    assert len({tuple(c) for c in p}) >= 290
    # The first 20 are far apart (Euclidean RGB distance).
    d = np.linalg.norm(p[:20, None].astype(float) - p[None, :20].astype(float), axis=-1)
    assert d[~np.eye(20, dtype=bool)].min() > 40
    assert viz.palette(0).shape == (0, 3)


def test_mask_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, (37, 53))
    mask[0, 0] = 255  # ignore label survives
    pal = viz.palette(21)
    path = viz.save_mask_png(tmp_path / "m.png", mask, pal)
    im = Image.open(path)
    assert im.mode == "P"
    assert np.array_equal(np.asarray(im), mask.astype(np.uint8))
    file_pal = np.asarray(im.getpalette()[: 21 * 3], dtype=np.uint8).reshape(21, 3)
    assert np.array_equal(file_pal, pal)
    # Looks right in a viewer: the RGB rendering is the palette colour.
    rgb = np.asarray(im.convert("RGB"))
    assert np.array_equal(rgb[5, 7], pal[mask[5, 7]])
    # Default palette.
    viz.save_mask_png(tmp_path / "d.png", mask[1:, 1:])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), mask[1:, 1:])


def test_mask_png_too_many_classes(tmp_path):
    with pytest.raises(RfclipError, match="256"):
        viz.save_mask_png(tmp_path / "m.png", np.full((4, 4), 300), None)
    with pytest.raises(RfclipError, match="256"):
        viz.save_mask_png(tmp_path / "m.png", np.zeros((4, 4), int), viz.palette(300))
    with pytest.raises(RfclipError):
        viz.save_mask_png(tmp_path / "m.png", np.full((4, 4), -1), None)
    assert not list(tmp_path.iterdir())


def test_class_fractions():
    _, mask = _scene()
    mask[0, 0] = 255
    fr = viz.class_fractions(mask, NAMES)
    assert list(fr) == NAMES
    assert fr["cat"] == 0.0 and fr["sky"] == 0.0
    assert abs(sum(fr.values()) - 1.0) < 1e-12
    valid = mask.size - 1
    assert abs(fr["dog"] - 50 * 60 / valid) < 1e-12
    assert viz.class_fractions(np.full((3, 3), 255), NAMES) == {n: 0.0 for n in NAMES}


def test_overlay_size_and_legend_colours():
    img, mask = _scene()
    pal = viz.palette(len(NAMES))
    out = viz.overlay(img, mask, NAMES)
    assert out.mode == "RGB"
    assert out.height == img.shape[0] and out.width > img.shape[1]
    arr = np.asarray(out)
    legend = arr[:, img.shape[1] :].reshape(-1, 3)
    present = {0, 2, 4}
    for c in range(len(NAMES)):
        hit = (legend == pal[c]).all(-1).any()
        assert hit == (c in present), (c, NAMES[c])
    # Mask interior is the alpha blend of image and colour; boundaries are darker.
    y, x = 40, 60
    expect = np.round(0.5 * img[y, x].astype(float) + 0.5 * pal[2]).astype(int)
    assert np.abs(arr[y, x].astype(int) - expect).max() <= 1
    assert arr[20, 60].sum() < arr[40, 60].sum()  # top edge of the dog box
    # No legend: just the image size.
    assert viz.overlay(img, mask, NAMES, legend=False).size == (img.shape[1], img.shape[0])
    # alpha = 0 leaves the image (away from boundaries).
    plain = np.asarray(viz.overlay(img, mask, NAMES, alpha=0.0, legend=False))
    assert np.array_equal(plain[40, 60], img[40, 60])


def test_overlay_legend_sorted_by_area_and_scales():
    img, mask = _scene()
    fr = viz.class_fractions(mask, NAMES)
    order = sorted((n for n in NAMES if fr[n] > 0), key=lambda n: -fr[n])
    assert order[0] == "background"
    big = viz.overlay(np.kron(img, np.ones((4, 4, 1), np.uint8)), np.kron(mask, np.ones((4, 4), int)), NAMES)
    small = viz.overlay(img, mask, NAMES)
    assert big.width - 640 > small.width - 160  # the legend panel grows with the image


def test_overlay_many_classes_and_ignore():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 80, (64, 64))
    mask[:4] = 255
    names = [f"class {i}" for i in range(80)]
    out = viz.overlay(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), mask, names)
    assert out.height >= 64 and out.width > 64  # a small image gets a legend panel taller than itself
    # All pixels ignored: no legend panel.
    out = viz.overlay(np.zeros((10, 12, 3), np.uint8), np.full((10, 12), 255), names)
    assert out.size == (12, 10)


def test_overlay_shape_mismatch():
    with pytest.raises(ValueError):
        viz.overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11), int), NAMES)


def test_save_image_atomic(tmp_path):
    img = Image.new("RGB", (20, 10), (1, 2, 3))
    p = viz.save_image_atomic(img, tmp_path / "sub" / "a.png")
    assert p.exists() and Image.open(p).size == (20, 10)
    viz.save_image_atomic(Image.new("RGBA", (5, 5)), tmp_path / "sub" / "b.jpg")
    viz.save_image_atomic(img, tmp_path / "sub" / "a.png")  # overwrite
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.png", "b.jpg"]
    with pytest.raises(RfclipError):
        viz.save_image_atomic(img, tmp_path / "x.notanimage")

    class Boom(Exception):
        pass

    class BadImage:
        mode = "RGB"

        def save(self, *a, **k):
            raise Boom()

    with pytest.raises(Boom):
        viz.save_image_atomic(BadImage(), tmp_path / "sub" / "a.png")
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.png", "b.jpg"]
    assert Image.open(tmp_path / "sub" / "a.png").size == (20, 10)  # old file intact


def test_heatmap_overlay():
    img, _ = _scene()
    heat = np.zeros((12, 16))
    heat[6, 8] = 1.0
    out = viz.heatmap_overlay(img, heat)
    assert out.size == (160, 120) and out.mode == "RGB"
    same = viz.heatmap_overlay(img, np.ones((120, 160)), alpha=0.0)
    assert np.array_equal(np.asarray(same), img)
    nan = viz.heatmap_overlay(img, np.full((120, 160), np.nan))
    assert nan.size == (160, 120)
    cm = viz.apply_colormap(np.array([0.0, 0.5, 1.0]))
    assert cm.shape == (3, 3) and cm[0, 2] > cm[0, 0] and cm[2, 0] > cm[2, 2]  # blue -> red


def test_grid_figure():
    panels = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (60, 30), (0, 255, 0)),
              Image.new("RGB", (50, 40), (0, 0, 255))]
    fig = viz.grid_figure(panels, ["a", "b", "c"], ncols=2)
    assert fig.width >= 2 * 60 and fig.height >= 2 * 40
    arr = np.asarray(fig).reshape(-1, 3)
    for c in ([255, 0, 0], [0, 255, 0], [0, 0, 255]):
        assert ((arr == c).all(-1)).sum() >= 30 * 50 - 1
    one_row = viz.grid_figure(panels, ["a", "b", "c"], ncols=5)
    assert one_row.width > fig.width and one_row.height < fig.height
    with pytest.raises(ValueError):
        viz.grid_figure(panels, ["a"], 2)


def test_line_plot():
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.02, 768)
    hl = [4, 162, 474]
    v[hl] = [0.9, -0.5, 0.7]
    img = viz.line_plot(v, hl, "mean weight", "dimension", "weight")
    assert img.size == (900, 300) and img.mode == "RGB"
    arr = np.asarray(img).astype(int)
    # Highlight markers in red and the curve in blue are drawn.
    red = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    blue = (arr[..., 2] > 150) & (arr[..., 0] < 80)
    assert red.sum() > 30 and blue.sum() > 200
    assert viz.line_plot(v, [], size=(400, 200)).size == (400, 200)
    # Degenerate inputs still draw.
    assert viz.line_plot(np.zeros(5), [2]).size == (900, 300)
    assert viz.line_plot(np.array([1.0, np.nan, 2.0, 3.0]), [0, 99]).size == (900, 300)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Files are staged with mkstemp (private, 0600) but must end up with the usual umask-based mode."""
    from rfclip._io import default_file_mode
    from rfclip.viz import save_image_atomic

    path = save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    assert (path.stat().st_mode & 0o777) == default_file_mode()
