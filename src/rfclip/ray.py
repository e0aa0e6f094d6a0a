"""Segment a Ray Data dataset on a cluster: ``rfclip.ray.segment(dataset, classes, ...)`` (extra ``ray``).

>>> import ray, rfclip.ray
>>> images = ray.data.read_images("s3://bucket/photos/", include_paths=True)
>>> masks = rfclip.ray.segment(images, "road;car;tree;sky", num_gpus=1, concurrency=8)
>>> masks.write_parquet("s3://bucket/masks/")          # Ray's own writers: parquet, images, webdataset, ...

``map_batches`` runs a callable class (:class:`SegmentBatch`): each Ray worker builds one
:class:`~rfclip.segmenter.Segmenter` and embeds the classes once, then segments batch after batch. Ray schedules the
workers (``concurrency``, ``num_gpus``), streams the data and retries failed tasks; resuming is Ray's (write to a new
path, or filter what is done). The rows keep their columns (``path``, labels, ...) and gain ``mask`` (``(H, W)``
class indices, uint8 up to 256 classes, else uint16), ``classes`` and ``fractions`` (JSON text), and, on request,
``mask_png`` (the PNG ``rfclip segment`` writes) and ``coco`` (COCO RLE per class, JSON text; needs pycocotools).
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np

from .errors import RfclipError

OUTPUT_COLUMNS = ("mask", "mask_png", "coco")


class SegmentBatch:
    """The callable class ``map_batches`` runs: one Segmenter per Ray worker, a batch of images per call."""

    def __init__(self, classes, segmenter_kwargs: dict, image_column: str = "image", outputs=("mask",),
                 keep_image: bool = False):
        from .segmenter import Segmenter

        self.segmenter = Segmenter(**segmenter_kwargs)
        self.text = self.segmenter.encode_classes(classes)
        self.image_column, self.outputs, self.keep_image = image_column, tuple(outputs), keep_image

    def __call__(self, batch: dict) -> dict:
        from .viz import mask_image

        images = list(batch[self.image_column])
        results = self.segmenter.segment_batch(images, self.text, return_probs=False)
        out = {k: v for k, v in batch.items() if k != self.image_column or self.keep_image}
        n = len(self.text.class_names)
        dtype = np.uint8 if n <= 256 else np.uint16
        if "mask" in self.outputs:
            out["mask"] = _column([r.mask.astype(dtype) for r in results])
        if "mask_png" in self.outputs:
            pngs = []
            for r in results:
                buf = io.BytesIO()
                mask_image(r.mask, n).save(buf, format="PNG")
                pngs.append(buf.getvalue())
            out["mask_png"] = np.array(pngs, dtype=object)
        if "coco" in self.outputs:
            out["coco"] = np.array([json.dumps(r.to_coco_rle()) for r in results], dtype=object)
        out["classes"] = np.array([json.dumps(r.classes) for r in results], dtype=object)
        out["fractions"] = np.array([json.dumps(r.fractions()) for r in results], dtype=object)
        return out


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """Equal shapes stack into one tensor; different shapes make an object array (Ray's variable-shaped tensors)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def segment(dataset, classes, *, model="ViT-B-16", pretrained: str | None = "openai", method: str | None = None,
            plugins: Sequence[str] = (), checkpoint=None, device=None, image_column: str = "image",
            outputs: Sequence[str] = ("mask",), keep_image: bool = False, batch_size: int = 4,
            concurrency: int | tuple[int, int] = 1, num_gpus: float | None = None, num_cpus: float | None = None,
            text_cache=None, **options):
    """Map a ``ray.data.Dataset`` of images (column ``image_column``: H x W x 3 uint8 arrays, as
    ``ray.data.read_images`` gives) to segmentations with ``map_batches``.

    ``model``, ``pretrained``, ``method``, ``plugins``, ``checkpoint``, ``device`` and keyword ``options`` are those
    of :class:`~rfclip.segmenter.Segmenter` (each worker loads the model: give a name or a checkpoint path every
    worker can read). ``outputs``: any of ``mask``, ``mask_png``, ``coco``. ``batch_size`` images per call (their
    crops share forward passes); ``concurrency`` workers (or Ray's ``(min, max)`` autoscaling range), each with
    ``num_gpus`` / ``num_cpus``. Returns the lazy mapped dataset; write it with Ray's writers.
    """
    from .segmenter import DEFAULT_METHOD
    from .text import parse_classes

    unknown = [o for o in outputs if o not in OUTPUT_COLUMNS]
    if unknown:
        raise RfclipError(f"unknown output(s) {', '.join(unknown)}; choose from {', '.join(OUTPUT_COLUMNS)}")
    vocabulary = parse_classes(classes) if isinstance(classes, str) else classes
    kwargs = dict(model=model, pretrained=pretrained, method=method or DEFAULT_METHOD, plugins=tuple(plugins),
                  checkpoint=checkpoint, device=device, text_cache=text_cache, **options)
    remote = {k: v for k, v in (("num_gpus", num_gpus), ("num_cpus", num_cpus)) if v is not None}
    return dataset.map_batches(SegmentBatch, fn_constructor_kwargs=dict(
        classes=vocabulary, segmenter_kwargs=kwargs, image_column=image_column, outputs=tuple(outputs),
        keep_image=keep_image), batch_size=batch_size, batch_format="numpy", concurrency=concurrency, **remote)
