"""What `rfclip segment` (and the web demo's downloads) write for one image: the mask PNG, the overlay with its
legend and the JSON record, each staged and renamed into place so that an error leaves no partial file."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__, viz
from ._io import atomic_open
from .errors import RfclipError


def output_paths(out: Path, image: Path) -> dict[str, Path]:
    """The three files written for ``image`` into ``out``: ``NAME_mask.png``, ``NAME_overlay.png``, ``NAME.json``."""
    stem = image.stem
    return {"mask": out / f"{stem}_mask.png", "overlay": out / f"{stem}_overlay.png", "json": out / f"{stem}.json"}


def _staged(target: Path) -> Path:
    return target.with_name(f".{target.name}.part{os.getpid()}{target.suffix}")


def save_mask(path: Path, mask: np.ndarray, num_classes: int) -> None:
    """A palette PNG for up to 256 classes (pixel value = class index); a 16-bit grey PNG beyond that."""
    if num_classes <= 256:
        viz.save_mask_png(path, mask, viz.palette(num_classes))
    else:
        viz.save_image_atomic(Image.fromarray(mask.astype(np.uint16)), path)


def write_outputs(paths: dict[str, Path], image: np.ndarray, seg, record: dict, alpha: float) -> None:
    """Write the three files of one image: each to a temporary name first, then renamed into place, so that an
    error leaves no partial file (and no file of this image unless all three were written). Each staged file is
    itself written through :func:`rfclip._io.atomic_open`, so it is complete, synced and has the usual permissions."""
    n = len(seg.classes)
    staged = {key: _staged(target) for key, target in paths.items()}
    try:
        save_mask(staged["mask"], seg.mask, n)
        viz.save_image_atomic(viz.overlay(image, seg.mask, seg.classes, alpha=alpha, palette=viz.palette(n)),
                              staged["overlay"])
        with atomic_open(staged["json"], "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        for key, target in paths.items():
            os.replace(staged[key], target)
    except OSError as err:
        raise RfclipError(f"cannot write outputs to {paths['json'].parent}: {err.strerror or err}; "
                          "check the free space and permissions of --out") from None
    finally:
        for tmp in staged.values():
            try:
                tmp.unlink()
            except OSError:
                pass


def pixel_fractions(seg) -> list[float]:
    """Fraction of the image's pixels given to each class (sums to 1; class names are unique, see parse_classes)."""
    return list(viz.class_fractions(seg.mask, seg.classes).values())


def summary(seg) -> str:
    """"road 41.2%, sky 22.0%, ..." (classes present, largest first)."""
    fr = pixel_fractions(seg)
    order = sorted(range(len(seg.classes)), key=lambda i: -fr[i])
    return ", ".join(f"{seg.classes[i]} {100 * fr[i]:.1f}%" for i in order if fr[i] > 0)


def segmentation_record(path: Path, seg, segmenter, files: dict[str, Path], seconds: float,
                        checkpoint: str | os.PathLike | None = None) -> dict:
    """The JSON record of one segmented image (classes, fractions, files, method, model, settings, timing)."""
    fractions = pixel_fractions(seg)
    height, width = seg.mask.shape
    mask_format = "palette PNG, pixel value = class index" if len(seg.classes) <= 256 else "16-bit grey PNG, pixel value = class index"
    return {
        "image": str(path),
        "image_size": {"width": int(width), "height": int(height)},
        "classes": [
            {"index": i, "name": name, "synonyms": list(syn), "fraction": fractions[i]}
            for i, (name, syn) in enumerate(zip(seg.classes, seg.synonyms))
        ],
        "fractions": {name: fractions[i] for i, name in enumerate(seg.classes)},
        "outputs": {"mask": files["mask"].name, "overlay": files["overlay"].name, "mask_format": mask_format},
        "method": segmenter.method_name,
        "method_options": segmenter.method.options(),
        "model": {**segmenter.clip.describe(),
                  "checkpoint": os.path.abspath(os.fspath(checkpoint)) if checkpoint else None},
        "device": str(segmenter.device),
        "precision": {"asked": segmenter.config.precision,
                      "used": str(segmenter.amp_dtype).replace("torch.", "") if segmenter.amp_dtype else "float32"},
        "settings": dataclasses.asdict(segmenter.config),
        **segmenter.provenance(checkpoint),  # crops per forward used, distraction dims, templates, checkpoint hash
        "seconds": round(seconds, 3),
        "rfclip_version": __version__,
    }
