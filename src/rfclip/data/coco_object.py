"""COCO-Object labels from raw COCO-Stuff164k annotations (protocol.md §1.3; GroupViT/TCL/NACLIP
``datasets/cvt_coco_object.py``).

Raw COCO-Stuff PNGs hold 0-based stuffthingmaps ids (0..181, 255 = unlabeled). The reference builds the dense
COCO-Stuff table (raw id -> 0..170, skipping the 11 unused thing ids), adds 1 to every entry, then sends every raw
id > 90 (all stuff, and 255) to 0 = background. The 80 thing ids become 1..80 in COCO order (person = 1). Each
entry is applied against the *original* mask, and a raw value with no entry (the 11 unused ids, 182..254) passes
through unchanged, exactly as in the reference.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import RfclipError

COCO_LEN = 123287  # train2017 + val2017 raw label files, asserted by the reference script
UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
LABEL_SUFFIX = "_instanceTrainIds.png"


def _build_table() -> dict[int, int]:
    used = [i for i in range(182) if i not in UNUSED_THING_IDS]
    table = {raw: dense for dense, raw in enumerate(used)}  # COCO-Stuff dense table, 0..170
    table[255] = 255
    out = {}
    for raw, dense in table.items():
        out[raw] = 0 if raw > 90 else dense + 1
    return out


CLSID_TO_TRID: dict[int, int] = _build_table()


def _build_lut() -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)  # values with no entry pass through
    for raw, tr in CLSID_TO_TRID.items():
        lut[raw] = tr
    return lut


COCO_OBJECT_LUT = _build_lut()


def convert_mask(mask: np.ndarray) -> np.ndarray:
    """Raw COCO-Stuff ids (uint8 HxW) -> COCO-Object train ids (uint8 HxW)."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise RfclipError(f"raw COCO-Stuff labels must be 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    return COCO_OBJECT_LUT[mask]


def output_name(raw_png: str | os.PathLike) -> str:
    """``000000000139.png`` -> ``000000000139_instanceTrainIds.png`` (the reference splits at the first dot)."""
    return os.path.basename(raw_png).split(".")[0] + LABEL_SUFFIX


def raw_label_files(folder: Path) -> list[Path]:
    """The raw ``*.png`` labels in ``folder``, without any file having ``TrainIds`` in its name, sorted."""
    if not folder.is_dir():
        return []
    return sorted(
        Path(e.path) for e in os.scandir(folder)
        if e.is_file() and e.name.endswith(".png") and "TrainIds" not in e.name and not e.name.startswith(".")
    )


def _convert_one(src: Path, dst_dir: Path) -> None:
    try:
        with Image.open(src) as im:
            mask = np.array(im)
    except (OSError, ValueError) as e:
        raise RfclipError(f"cannot read raw COCO-Stuff label {src}: {e}") from e
    if mask.ndim != 2:
        raise RfclipError(f"raw COCO-Stuff label {src} is not single-channel (shape {mask.shape})")
    out = convert_mask(mask)
    dst = dst_dir / output_name(src)
    tmp = dst_dir / f".{dst.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            Image.fromarray(out).save(f, format="PNG")
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RfclipError(f"cannot write {dst}: {e.strerror or e}") from e


def _copy_images(src_dir: Path, dst_dir: Path, progress: bool, desc: str) -> int:
    files = sorted((e for e in os.scandir(src_dir) if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name)
    dst_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for e in tqdm(files, desc=desc, disable=not progress, unit="img"):
        dst = dst_dir / e.name
        if dst.is_file() and dst.stat().st_size == e.stat().st_size:
            continue
        tmp = dst_dir / f".{e.name}.tmp"
        try:
            shutil.copyfile(e.path, tmp)
            os.replace(tmp, dst)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise RfclipError(f"cannot copy {e.path} to {dst}: {err.strerror or err}") from err
        n += 1
    return n


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def convert_coco_object(coco_stuff_root: str | os.PathLike, out_root: str | os.PathLike | None = None,
                        splits=("val2017",), check_count: bool = False, num_workers: int = 8,
                        progress: bool = True) -> dict[str, int]:
    """Write ``out_root/annotations/<split>/<name>_instanceTrainIds.png`` for each raw COCO-Stuff label.

    ``coco_stuff_root`` is the ``coco_stuff164k`` folder (``images/<split>/*.jpg``, ``annotations/<split>/*.png``
    raw stuffthingmaps). ``out_root`` defaults to ``coco_stuff_root``; when it differs, ``images/<split>`` is
    copied there too (files already present with the same size are skipped). ``check_count`` asserts, like the
    reference, that train2017 + val2017 hold 123287 raw labels. Returns ``{split: number of labels written}``.
    """
    src_root = Path(coco_stuff_root).expanduser()
    dst_root = Path(out_root).expanduser() if out_root is not None else src_root
    if isinstance(splits, str):
        splits = (splits,)
    if not src_root.is_dir():
        raise RfclipError(f"COCO-Stuff root {src_root} does not exist; point it at .../coco_stuff164k")
    lists = {}
    for split in splits:
        ann = src_root / "annotations" / split
        if not ann.is_dir():
            raise RfclipError(
                f"COCO-Stuff root {src_root}: missing folder annotations/{split}; point it at .../coco_stuff164k "
                "with stuffthingmaps_trainval2017.zip unpacked into annotations/"
            )
        files = raw_label_files(ann)
        if not files:
            raise RfclipError(
                f"COCO-Stuff root {src_root}: no raw *.png labels in annotations/{split} "
                "(files with 'TrainIds' in the name are not raw labels)"
            )
        lists[split] = files
    if check_count:
        total = sum(len(lists[s]) if s in lists else len(raw_label_files(src_root / "annotations" / s))
                    for s in ("train2017", "val2017"))
        if total != COCO_LEN:
            raise RfclipError(
                f"COCO-Stuff root {src_root}: found {total} raw labels in annotations/train2017 + val2017, "
                f"expected {COCO_LEN}; the download looks incomplete"
            )
    copy_images = not _same_dir(src_root, dst_root)
    done = {}
    for split, files in lists.items():
        if copy_images:
            img_src = src_root / "images" / split
            if not img_src.is_dir():
                raise RfclipError(f"COCO-Stuff root {src_root}: missing folder images/{split}; point it at "
                                  ".../coco_stuff164k with the images unpacked into images/")
            _copy_images(img_src, dst_root / "images" / split, progress, f"copy images/{split}")
        dst_dir = dst_root / "annotations" / split
        try:
            dst_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RfclipError(f"cannot create {dst_dir}: {e.strerror or e}") from e
        bar = tqdm(total=len(files), desc=f"coco_object {split}", disable=not progress, unit="img")
        try:
            if num_workers and num_workers > 1:
                pool = ThreadPoolExecutor(max_workers=num_workers)
                try:
                    for fut in [pool.submit(_convert_one, f, dst_dir) for f in files]:
                        fut.result()
                        bar.update(1)
                finally:  # on an error, drop the queued files instead of converting them all first
                    pool.shutdown(wait=True, cancel_futures=True)
            else:
                for f in files:
                    _convert_one(f, dst_dir)
                    bar.update(1)
        finally:
            bar.close()
        done[split] = len(files)
    return done
