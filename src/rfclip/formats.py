"""A :class:`~rfclip.segmenter.Segmentation` in the formats other tools read: COCO run-length encoding
(``pycocotools``), the Hugging Face ``transformers`` image-segmentation pipeline's output, ``supervision.Detections``.

Pure functions of the index mask (``seg.mask``, ``(H, W)`` class indices) and the class names; each class present in
the mask is one entry, in class order. The optional libraries are imported only when a function needs them.
"""

from __future__ import annotations

import numpy as np

from .errors import RfclipError


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RfclipError(f"this needs the package '{module.split('.')[0]}'; install it with "
                          f"pip install -e \".[{extra}]\"") from None


def present_classes(mask: np.ndarray, num_classes: int) -> list[int]:
    """Indices of the classes that own at least one pixel, in class order."""
    counts = np.bincount(np.asarray(mask).ravel(), minlength=num_classes)
    return [int(i) for i in np.flatnonzero(counts[:num_classes])]


def _bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a non-empty boolean ``(H, W)`` region: ``(x0, y0, x1, y1)``, x1/y1 exclusive."""
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def coco_rle(seg) -> list[dict]:
    """One COCO record per class present: ``{"class_index", "label", "fraction", "area", "bbox", "segmentation"}``.

    ``segmentation`` is COCO's compressed RLE (``{"size": [H, W], "counts": str}``, column-major, as
    ``pycocotools.mask.encode`` makes it; ``pycocotools.mask.decode`` gives the class's 0/1 mask back); ``bbox`` is
    COCO's ``[x, y, width, height]``.
    """
    mask_utils = _need("pycocotools.mask", "scale")
    mask = np.asarray(seg.mask)
    records = []
    for index in present_classes(mask, len(seg.classes)):
        region = mask == index
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        x0, y0, x1, y1 = _bbox(region)
        area = int(region.sum())
        records.append({
            "class_index": index,
            "label": seg.classes[index],
            "fraction": area / mask.size,
            "area": area,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        })
    return records


def hf_annotations(seg) -> list[dict]:
    """The ``transformers`` image-segmentation pipeline's semantic output: ``[{"score", "label", "mask"}]``, one per
    class present, ``mask`` a PIL ``"L"`` image (255 on the class, 0 elsewhere) and ``score`` None (as the pipeline
    gives for semantic segmentation)."""
    from PIL import Image

    mask = np.asarray(seg.mask)
    return [{"score": None, "label": seg.classes[i],
             "mask": Image.fromarray(((mask == i) * 255).astype(np.uint8))}
            for i in present_classes(mask, len(seg.classes))]


def detections(seg):
    """A ``supervision.Detections``: one detection per class present, with its boolean mask, its box (``xyxy``),
    ``class_id`` and ``data["class_name"]``; ``confidence`` is the class's mean probability over its pixels when the
    segmentation holds probabilities (``return_probs=True``), else None."""
    sv = _need("supervision", "scale")
    mask = np.asarray(seg.mask)
    ids = present_classes(mask, len(seg.classes))
    regions = np.stack([mask == i for i in ids]) if ids else np.zeros((0, *mask.shape), bool)  # (N, H, W)
    boxes = np.array([_bbox(r) for r in regions], dtype=np.float32).reshape(-1, 4)
    confidence = None
    if seg.probs is not None and ids:
        confidence = np.array([float(seg.probs[i][regions[k]].mean()) for k, i in enumerate(ids)], np.float32)
    return sv.Detections(xyxy=boxes, mask=regions, confidence=confidence, class_id=np.array(ids, dtype=int),
                         data={"class_name": np.array([seg.classes[i] for i in ids], dtype=object)})
