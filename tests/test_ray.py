"""``rfclip.ray.segment`` on a local Ray instance (CPU): the same masks as ``Segmenter.segment``, written and read
back with Ray's own parquet writer (and pyarrow)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_clip

ray = pytest.importorskip("ray")  # the extra "ray"; CI installs it


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_data_gives_the_masks_of_segment(local_ray, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import rfclip.ray
    from rfclip import Segmenter

    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.half().contiguous() for k, v in make_clip().model.state_dict().items()}, str(checkpoint))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((48, 64, 3), (40, 40, 3), (64, 48, 3))]
    options = dict(checkpoint=str(checkpoint), method="clearclip", device="cpu", short_side=64)
    dataset = ray.data.from_items([{"image": im, "path": f"img{i}.png"} for i, im in enumerate(images)])
    result = rfclip.ray.segment(dataset, "red;green;blue", outputs=("mask", "mask_png", "coco"), batch_size=2,
                                concurrency=1, num_cpus=1, **options).materialize()  # one run of the actor
    rows = sorted(result.take_all(), key=lambda r: r["path"])

    local = Segmenter("ViT-B-16", **options)
    text = local.encode_classes("red;green;blue")
    expected = [local.segment_batch(images[:2], text)[i] for i in range(2)] + local.segment_batch(images[2:], text)
    for row, image, seg in zip(rows, images, expected):
        assert "image" not in row and row["mask"].dtype == np.uint8
        np.testing.assert_array_equal(row["mask"], seg.mask)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["mask_png"]))), seg.mask)
        assert json.loads(row["fractions"]) == pytest.approx(seg.fractions())
        assert json.loads(row["coco"]) == seg.to_coco_rle()

    result.select_columns(["path", "mask_png", "fractions"]).write_parquet(str(tmp_path / "parquet"))
    import pyarrow.parquet as pq

    back = sorted(pq.read_table(str(tmp_path / "parquet")).to_pylist(), key=lambda r: r["path"])
    assert len(back) == 3
    for row, seg in zip(back, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["mask_png"]))), seg.mask)


def test_bad_outputs_are_refused_before_ray_runs():
    import rfclip.ray
    from rfclip.errors import RfclipError

    with pytest.raises(RfclipError, match="unknown output"):
        rfclip.ray.segment(None, "a;b", outputs=("masks",))
