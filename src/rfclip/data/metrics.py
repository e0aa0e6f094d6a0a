"""mIoU with mmsegmentation ``IoUMetric`` semantics (protocol.md §8), plus result tables and atomic writers.

Per image, on the pixels whose label is not ``ignore_index``: ``intersect[c]`` (pred == gt == c), ``pred_area[c]``
and ``gt_area[c]``, with values outside 0..K-1 dropped (mmseg's ``histc(min=0, max=K-1)``). These are summed over
the dataset; ``IoU[c] = intersect / union`` is NaN where union == 0 and left out of the mean (nanmean); a class
that is predicted but absent from the ground truth has IoU 0 and counts. All reported values are percentages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_open
from ..errors import RfclipError


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.asarray(x)
        if a.dtype == np.uint16 or a.dtype == np.uint32 or a.dtype == np.uint64:
            a = a.astype(np.int64)
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:
            a = a.copy()
        t = torch.from_numpy(a)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"segmentation maps must be integer arrays, got {t.dtype}")
    return t.long()


class IoUAccumulator:
    """Dataset-level intersect / union counts for ``num_classes`` classes.

    ``update(pred, gt)`` takes integer arrays of the same shape (numpy or torch, any device). Counts are int64 and
    live on ``device`` (CPU by default); the per-image bin counts are computed on the device of ``pred``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.intersect = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.union = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.pred_area = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.gt_area = torch.zeros(k, dtype=torch.int64, device=self.device)
        self.num_images = 0

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return {"intersect": self.intersect, "union": self.union, "pred_area": self.pred_area,
                "gt_area": self.gt_area}

    @staticmethod
    def counts(pred, gt, num_classes: int, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(intersect, pred_area, gt_area) of one image, int64 vectors of length ``num_classes`` on pred's device."""
        p = _as_tensor(pred)
        g = _as_tensor(gt).to(p.device)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} differs from label shape {tuple(g.shape)}")
        k = num_classes
        p = p.reshape(-1)
        g = g.reshape(-1)
        valid = g != ignore_index
        p = p[valid]
        g = g[valid]
        p_in = (p >= 0) & (p < k)
        g_in = (g >= 0) & (g < k)
        pred_area = torch.bincount(p[p_in], minlength=k)
        gt_area = torch.bincount(g[g_in], minlength=k)
        intersect = torch.bincount(p[p_in & (p == g)], minlength=k)
        return intersect, pred_area, gt_area

    def update(self, pred, gt) -> None:
        inter, parea, garea = self.counts(pred, gt, self.num_classes, self.ignore_index)
        inter, parea, garea = (t.to(self.device) for t in (inter, parea, garea))
        self.intersect += inter
        self.pred_area += parea
        self.gt_area += garea
        self.union += parea + garea - inter
        self.num_images += 1

    def merge(self, other: "IoUAccumulator") -> "IoUAccumulator":
        """Add ``other``'s counts into this accumulator (returns self)."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge accumulators with different num_classes / ignore_index")
        for name, t in self.state.items():
            t += other.state[name].to(self.device)
        self.num_images += other.num_images
        return self

    def all_reduce(self) -> "IoUAccumulator":
        """Sum the counts over all processes when torch.distributed is initialised; a no-op otherwise."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = self.device
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        packed = torch.stack([self.intersect, self.union, self.pred_area, self.gt_area]).to(device)
        n = torch.tensor([self.num_images], dtype=torch.int64, device=device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
        packed = packed.to(self.device)
        self.intersect, self.union, self.pred_area, self.gt_area = (packed[i].clone() for i in range(4))
        self.num_images = int(n.item())
        return self

    def compute(self) -> dict:
        """``dict(iou, acc, miou, macc, aacc, num_images)``; per-class lists with NaN for absent classes; all in %."""
        inter = self.intersect.double().cpu()
        union = self.union.double().cpu()
        gt = self.gt_area.double().cpu()
        iou = (inter / union).numpy() * 100  # torch division: 0/0 -> NaN, no warning
        acc = (inter / gt).numpy() * 100
        total_gt = gt.sum().item()
        aacc = inter.sum().item() / total_gt * 100 if total_gt > 0 else math.nan
        return {
            "iou": [float(v) for v in iou],
            "acc": [float(v) for v in acc],
            "miou": _nanmean(iou),
            "macc": _nanmean(acc),
            "aacc": float(aacc),
            "num_images": self.num_images,
        }


def _nanmean(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


# ------------------------------------------------------------------------------------------------ reports
def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _names(class_names, n: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n)]
    names = [c[0] if isinstance(c, (list, tuple)) else str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for {n} classes")
    return names


def format_table(result: dict, class_names=None) -> str:
    """Per-class IoU / Acc table followed by mIoU, mAcc and aAcc (2 decimals, as mmseg prints them)."""
    n = len(result["iou"])
    names = _names(class_names, n)
    w = max([5] + [len(s) for s in names])
    lines = [f"{'Class':<{w}} | {'IoU':>6} | {'Acc':>6}", f"{'-' * w}-+-{'-' * 6}-+-{'-' * 6}"]
    for name, iou, acc in zip(names, result["iou"], result["acc"]):
        lines.append(f"{name:<{w}} | {_fmt(iou):>6} | {_fmt(acc):>6}")
    lines.append(f"{'-' * w}-+-{'-' * 6}-+-{'-' * 6}")
    lines.append(f"mIoU: {_fmt(result['miou'])}  mAcc: {_fmt(result.get('macc', math.nan))}  "
                 f"aAcc: {_fmt(result['aacc'])}")
    return "\n".join(lines)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename (no half-written file)."""
    path = Path(path)
    try:
        with atomic_open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    except OSError as e:
        raise RfclipError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def _json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    if isinstance(x, torch.Tensor):
        return _json_safe(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | os.PathLike, result: dict, meta: dict | None = None, class_names=None) -> Path:
    """Write ``{"meta": meta, "result": result[, "class_names": ...]}`` atomically; NaN is written as null."""
    doc = {"meta": meta or {}, "result": result}
    if class_names is not None:
        doc["class_names"] = _names(class_names, len(result["iou"]))
    text = json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def write_csv(path: str | os.PathLike, result: dict, class_names=None) -> Path:
    """Write one row per class (``class_index, class_name, iou, acc``; empty cell for NaN) atomically."""
    names = _names(class_names, len(result["iou"]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_index", "class_name", "iou", "acc"])
    for i, (name, iou, acc) in enumerate(zip(names, result["iou"], result["acc"])):
        w.writerow([i, name, "" if math.isnan(iou) else f"{iou:.4f}", "" if math.isnan(acc) else f"{acc:.4f}"])
    return atomic_write_text(path, buf.getvalue())
