"""The mask-source interface, the region-map check and the saved-masks source (CorrCLIP's ``.npz`` files)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import RfclipError

NPZ_KEY = "instance_mask"  # CorrCLIP's key in its pre-generated region-mask files


@runtime_checkable
class MaskSource(Protocol):
    """Gives the region map of an image: ``source(image, path) -> (H, W) int32``, 0 = not segmented.

    ``image`` is the RGB uint8 array (H, W, 3) the segmenter reads; ``path`` is its file when it came from one
    (saved-mask sources find their file by the image's stem). ``describe()`` says what the source is, for result
    records.
    """

    def __call__(self, image: np.ndarray, path: str | None = None) -> np.ndarray: ...

    def describe(self) -> dict: ...


def check_region_map(region_map, size: tuple[int, int], name: str = "region map") -> np.ndarray:
    """``region_map`` as an int32 array (H, W) of the image's ``size``; anything else is a one-line user error."""
    arr = np.asarray(region_map)
    if arr.ndim != 2:
        raise RfclipError(f"{name} has shape {arr.shape}; give one integer region id per pixel, shape (H, W)")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise RfclipError(f"{name} has dtype {arr.dtype}; give integer region ids (0 = not segmented, k > 0 = region k)")
    if arr.shape != tuple(size):
        raise RfclipError(f"{name} is {arr.shape[0]}x{arr.shape[1]} (HxW) but the image is {size[0]}x{size[1]}; "
                          "give the map at the image's own resolution")
    if arr.size and arr.min() < 0:
        raise RfclipError(f"{name} has negative ids (min {int(arr.min())}); use 0 for not segmented and k > 0 for regions")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise RfclipError(f"{name} has ids above 2**31 - 1; renumber the regions 1..K")
    return arr.astype(np.int32, copy=False)


class NpzMasks:
    """Saved region maps: ``DIR/<image stem>.npz`` with the array ``instance_mask`` (CorrCLIP's files).

    Read with ``allow_pickle=False``: a file that holds Python objects is refused, never unpickled.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise RfclipError(f"mask folder {self.folder} does not exist; give the folder of .npz region maps "
                              "(make them with `rfclip masks IMAGES --masks sam2:CHECKPOINT --out DIR`)")

    def path_for(self, image_path: str | Path) -> Path:
        return self.folder / f"{Path(image_path).stem}.npz"

    def __call__(self, image: np.ndarray, path: str | None = None) -> np.ndarray:
        if path is None:
            raise RfclipError("saved masks are found by the image's file name, and this image has none; "
                              "pass the region map itself (masks=ARRAY) or segment the image from its file")
        file = self.path_for(path)
        if not file.is_file():
            raise RfclipError(f"no region map {file} for image {path}; make it with `rfclip masks` or check --masks")
        try:
            with np.load(file, allow_pickle=False) as data:
                if NPZ_KEY not in data:
                    raise RfclipError(f"{file} has no array '{NPZ_KEY}' (it has: {', '.join(data.files) or 'none'}); "
                                      "give CorrCLIP-format region maps")
                arr = data[NPZ_KEY]
        except RfclipError:
            raise
        except (ValueError, OSError, EOFError) as exc:  # a pickled object array or a damaged file
            raise RfclipError(f"cannot read region map {file} ({exc}); remake it with `rfclip masks`") from None
        return check_region_map(arr, image.shape[:2], name=f"region map {file.name}")

    def describe(self) -> dict:
        return {"source": "npz", "folder": str(self.folder)}


def paint_by_area(masks, size: tuple[int, int]) -> np.ndarray:
    """Paint SAM / SAM2 automatic masks into one region map as CorrCLIP does: ascending area, ids 1..n.

    ``masks``: the generator's records (dicts with ``segmentation``, a bool (H, W) array, and ``area``, its pixel
    count). They are sorted by ``area`` (stable: equal areas keep the generator's order), the i-th gets id i
    (1-based), and a later (larger) mask overwrites the earlier ones where they overlap, so a pixel ends with the
    largest mask that covers it. Pixels no mask covers stay 0. Returns int32 (H, W).
    """
    region_map = np.zeros(tuple(size), dtype=np.int32)
    for region_id, record in enumerate(sorted(masks, key=lambda r: r["area"]), start=1):
        region_map[np.asarray(record["segmentation"], dtype=bool)] = region_id
    return region_map
