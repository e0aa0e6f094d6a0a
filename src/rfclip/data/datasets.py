"""Readers for the 8 benchmarks in the mmsegmentation on-disk layouts (protocol.md §1), without mmseg.

``build_dataset("voc21", ".../VOCdevkit/VOC2012")`` gives a :class:`SegDataset` whose items are
``dict(image=uint8 HxWx3 RGB, label=int64 HxW, name=str, index=int)``. Labels are the raw PNG values read with
Pillow (palette PNGs give palette indices, as mmseg's ``LoadAnnotations`` does), with ``reduce_zero_label`` applied
where the benchmark uses it; 255 is ignored everywhere. Images are decoded in ``__getitem__`` (so DataLoader workers
do the JPEG decoding); EXIF orientation is *not* applied (the files are used as stored, like the labels).
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import RfclipError
from .settings import EvalSettings, canonical_dataset_name, check_preset, get_settings

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where one benchmark's files are, relative to its ``data_root`` (mmseg layout), and how labels are encoded."""

    name: str
    title: str  # for messages
    img_dir: str  # may contain "{split}"
    img_suffix: str
    label_dir: str
    label_suffix: str
    split_file: str | None  # ann_file (basenames, one a line); None = recursive scan of img_dir
    default_split: str
    num_classes: int
    reduce_zero_label: bool
    background_class: int | None
    classnames_file: str
    root_hint: str  # what data_root should look like
    default_folders: tuple[str, ...]  # candidates under a common root folder (find_dataset_root)
    label_hint: str | None = None  # how to make missing label files (None: they come with the dataset)


_VOC_HINT = ".../VOCdevkit/VOC2012"
_CTX_HINT = ".../VOCdevkit/VOC2010"

DATASETS: dict[str, DatasetSpec] = {
    "voc21": DatasetSpec(
        "voc21", "VOC21", "JPEGImages", ".jpg", "SegmentationClass", ".png", "ImageSets/Segmentation/{split}.txt",
        "val", 21, False, 0, "voc21.txt", _VOC_HINT, ("VOCdevkit/VOC2012", "VOC2012"),
    ),
    "voc20": DatasetSpec(
        "voc20", "VOC20", "JPEGImages", ".jpg", "SegmentationClass", ".png", "ImageSets/Segmentation/{split}.txt",
        "val", 20, True, None, "voc20.txt", _VOC_HINT, ("VOCdevkit/VOC2012", "VOC2012"),
    ),
    "context60": DatasetSpec(
        "context60", "Context60", "JPEGImages", ".jpg", "SegmentationClassContext", ".png",
        "ImageSets/SegmentationContext/{split}.txt", "val", 60, False, 0, "context60.txt", _CTX_HINT,
        ("VOCdevkit/VOC2010", "VOC2010"),
    ),
    "context59": DatasetSpec(
        "context59", "Context59", "JPEGImages", ".jpg", "SegmentationClassContext", ".png",
        "ImageSets/SegmentationContext/{split}.txt", "val", 59, True, None, "context59.txt", _CTX_HINT,
        ("VOCdevkit/VOC2010", "VOC2010"),
    ),
    "coco_stuff": DatasetSpec(
        "coco_stuff", "COCO-Stuff164k", "images/{split}", ".jpg", "annotations/{split}", "_labelTrainIds.png", None,
        "val2017", 171, False, None, "coco_stuff.txt", ".../coco_stuff164k", ("coco_stuff164k",),
        "make them with mmseg's tools/dataset_converters/coco_stuff164k.py",
    ),
    "coco_object": DatasetSpec(
        "coco_object", "COCO-Object", "images/{split}", ".jpg", "annotations/{split}", "_instanceTrainIds.png", None,
        "val2017", 81, False, 0, "coco_object.txt", ".../coco_stuff164k (output folder of convert-coco-object)",
        ("coco_object", "coco_stuff164k"), "run `rfclip convert-coco-object` first",
    ),
    "ade20k": DatasetSpec(
        "ade20k", "ADE20K", "images/{split}", ".jpg", "annotations/{split}", ".png", None, "validation", 150, True,
        None, "ade20k.txt", ".../ADEChallengeData2016", ("ADEChallengeData2016", "ade/ADEChallengeData2016"),
    ),
    "cityscapes": DatasetSpec(
        "cityscapes", "Cityscapes", "leftImg8bit/{split}", "_leftImg8bit.png", "gtFine/{split}",
        "_gtFine_labelTrainIds.png", None, "val", 19, False, None, "city_scapes.txt", ".../cityscapes",
        ("cityscapes", "Cityscapes"), "make them with mmseg's tools/dataset_converters/cityscapes.py",
    ),
}

# Class-name sets: asset folder and synonym separator. A dataset missing from a set's folder falls back to the
# default set (FSA's / ProxyCLIP's files differ from SCLIP/NACLIP's only for VOC21, VOC20 and COCO-Object; ClearCLIP's
# public VOC21 file has a "background" class and no synonyms, its parser splits on ",").
CLASSNAME_SETS = {"default": ("classnames", ", "), "fsa": ("classnames_fsa", "; "),
                  "clearclip": ("classnames_clearclip", ","), "corrclip": ("classnames_corrclip", "; ")}


# ------------------------------------------------------------------------------------------------ class names
def parse_classnames(text: str, sep: str = ", ", strip: bool = True) -> list[list[str]]:
    """Parse a class-name file: line i is class i, synonyms separated by ``sep``.

    The reference parser (``get_cls_idx``) splits on exactly ``sep`` and removes only ``"\\n"``, so the last line of
    ``context60.txt`` stays ``"wood "``. With ``strip=True`` (default) each synonym is stripped. This does not change
    the text features: CLIP's tokenizer collapses whitespace and splits "wood ." and "wood." into the same tokens.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":  # a final newline (the reference files have none)
        lines = lines[:-1]
    out = []
    for line in lines:
        names = line.split(sep)
        if strip:
            names = [n.strip() for n in names]
        out.append(names)
    return out


def _asset_text(folder: str, filename: str) -> str | None:
    res = resources.files("rfclip").joinpath("assets", folder, filename)
    if not res.is_file():
        return None
    return res.read_text(encoding="utf-8")


def load_classnames(name: str, preset: str = "default", strip: bool = True) -> list[list[str]]:
    """Synonyms per class for ``name``: the SCLIP/NACLIP files, or the set ``preset`` selects (FSA / ProxyCLIP's,
    ClearCLIP's).

    ``preset`` is a settings preset (``default``, ``naclip``, ``sclip``, ``clearclip``, ``proxyclip``, ``fsa``, ...)
    or a class-name set name (``default``, ``fsa``, ``clearclip``).
    """
    spec = DATASETS[canonical_dataset_name(name)]
    key = str(preset).strip().lower()
    set_name = key if key in CLASSNAME_SETS else get_settings(spec.name, key).classnames
    for candidate in (set_name, "default"):
        folder, sep = CLASSNAME_SETS[candidate]
        text = _asset_text(folder, spec.classnames_file)
        if text is not None:
            classes = parse_classnames(text, sep, strip)
            if len(classes) != spec.num_classes:
                raise RfclipError(
                    f"class-name file {folder}/{spec.classnames_file} has {len(classes)} lines, expected "
                    f"{spec.num_classes} for {spec.title}"
                )
            return classes
    raise RfclipError(f"class-name file {spec.classnames_file} is missing from the installed package; "
                      "reinstall rfclip")


# ------------------------------------------------------------------------------------------------ file lists
def _root_error(spec: DatasetSpec, root: Path, what: str) -> RfclipError:
    return RfclipError(f"{spec.title} root {root}: {what}; point --root at {spec.root_hint} (mmsegmentation layout)")


def _check_root(spec: DatasetSpec, root: Path, split: str) -> tuple[Path, Path, Path | None]:
    """Check that the folders (and split list) exist; return (img_dir, label_dir, split_file)."""
    if not root.is_dir():
        raise _root_error(spec, root, "folder does not exist")
    img_dir = root / spec.img_dir.format(split=split)
    label_dir = root / spec.label_dir.format(split=split)
    for d, rel in ((img_dir, spec.img_dir), (label_dir, spec.label_dir)):
        if not d.is_dir():
            raise _root_error(spec, root, f"missing folder {rel.format(split=split)}")
    split_file = None
    if spec.split_file is not None:
        split_file = root / spec.split_file.format(split=split)
        if not split_file.is_file():
            raise _root_error(spec, root, f"missing file {spec.split_file.format(split=split)}")
    return img_dir, label_dir, split_file


def _scan(img_dir: Path, suffix: str) -> list[str]:
    """Relative paths (posix, without ``suffix``) of the files under ``img_dir`` ending with ``suffix``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(img_dir, followlinks=True):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, img_dir)
        for fn in filenames:
            if fn.endswith(suffix) and not fn.startswith("."):
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                found.append(rel.replace(os.sep, "/")[: -len(suffix)])
    return sorted(found)


def _read_split(split_file: Path) -> list[str]:
    names = [line.strip() for line in split_file.read_text().splitlines()]
    return [n for n in names if n]


def _make_samples(spec: DatasetSpec, root: Path, split: str) -> list[tuple[str, str, str]]:
    img_dir, label_dir, split_file = _check_root(spec, root, split)
    rel_img = spec.img_dir.format(split=split)
    if split_file is not None:
        names = _read_split(split_file)
        if not names:
            raise _root_error(spec, root, f"split list {spec.split_file.format(split=split)} is empty")
    else:
        names = _scan(img_dir, spec.img_suffix)
        if not names:
            raise _root_error(spec, root, f"no *{spec.img_suffix} images in {rel_img}")
    samples = []
    missing_img, missing_label = [], []
    for n in names:
        ip = img_dir / f"{n}{spec.img_suffix}"
        lp = label_dir / f"{n}{spec.label_suffix}"
        if not ip.is_file():
            missing_img.append(ip)
        if not lp.is_file():
            missing_label.append(lp)
        samples.append((str(ip), str(lp), n))
    if missing_img:
        raise _root_error(
            spec, root, f"{len(missing_img)} of {len(names)} listed images are missing (first: {missing_img[0]})"
        )
    if missing_label:
        what = f"{len(missing_label)} of {len(names)} label files are missing (first: {missing_label[0]})"
        if spec.label_hint is None:
            raise _root_error(spec, root, what)
        raise RfclipError(f"{spec.title} root {root}: {what}; {spec.label_hint}")
    return samples


# ------------------------------------------------------------------------------------------------ dataset
def read_label(path: str, reduce_zero_label: bool = False) -> np.ndarray:
    """A label PNG as int64 HxW raw values (palette indices for palette PNGs), ``reduce_zero_label`` applied."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "1"):
            raise RfclipError(
                f"label {path} has mode {im.mode}; expected a single-channel index PNG (palette or grayscale), "
                "not a colour-coded image"
            )
        arr = np.array(im)
    if arr.ndim != 2:
        raise RfclipError(f"label {path} is not a single-channel image (shape {arr.shape})")
    label = arr.astype(np.int64)
    if reduce_zero_label:
        # mmseg on uint8: label[label == 0] = 255; label = label - 1; label[label == 254] = 255
        label = np.where(label == 0, IGNORE_INDEX, label - 1)
        label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
    return label


def read_image(path: str) -> np.ndarray:
    """An image as uint8 HxWx3 RGB, decoded as stored (no EXIF orientation)."""
    with Image.open(path) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8).copy()


class SegDataset(Dataset):
    """One benchmark split. Items: ``dict(image, label, name, index)``; see the module docstring."""

    ignore_index = IGNORE_INDEX

    def __init__(self, name: str, root: str | os.PathLike, preset: str = "default", split: str | None = None,
                 settings: EvalSettings | None = None, classes: list[list[str]] | None = None):
        self.spec = DATASETS[canonical_dataset_name(name)]
        self.name = self.spec.name
        self.root = Path(root).expanduser()
        self.split = split or self.spec.default_split
        self.preset = check_preset(preset)
        self.settings = settings if settings is not None else get_settings(self.name, self.preset)
        self.classes = classes if classes is not None else load_classnames(self.name, self.settings.classnames)
        if len(self.classes) != self.spec.num_classes:
            raise RfclipError(f"{self.spec.title} needs {self.spec.num_classes} classes, got {len(self.classes)}")
        self.samples = _make_samples(self.spec, self.root, self.split)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def background_class(self) -> int | None:
        return self.spec.background_class

    @property
    def reduce_zero_label(self) -> bool:
        return self.spec.reduce_zero_label

    @property
    def class_names(self) -> list[str]:
        """The first synonym of each class (for tables)."""
        return [c[0] for c in self.classes]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        img_path, label_path, name = self.samples[index]
        image = read_image(img_path)
        label = read_label(label_path, self.spec.reduce_zero_label)
        if image.shape[:2] != label.shape:
            raise RfclipError(
                f"{self.spec.title}: image {img_path} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]}"
            )
        return {"image": image, "label": label, "name": name, "index": index}

    def __repr__(self) -> str:
        return f"SegDataset({self.name}, {len(self)} images, root={self.root}, split={self.split})"


def build_dataset(name: str, root: str | os.PathLike, preset: str = "default", split: str | None = None) -> SegDataset:
    """The benchmark ``name`` read from its mmseg ``data_root`` (e.g. ``.../VOCdevkit/VOC2012`` for VOC21)."""
    return SegDataset(name, root, preset=preset, split=split)


def collate(batch: list[dict]) -> list[dict]:
    """DataLoader ``collate_fn`` for images of different sizes: the batch stays a list of item dicts."""
    return list(batch)


def find_dataset_root(name: str, root_dir: str | os.PathLike, split: str | None = None) -> Path:
    """Locate ``name``'s data_root under a common folder using mmseg's default folder names.

    Tries ``root_dir/<folder>`` for each default folder (``VOCdevkit/VOC2012``, ``VOCdevkit/VOC2010``,
    ``coco_stuff164k``, ``ADEChallengeData2016``, ``cityscapes``; COCO-Object also ``coco_object``), then
    ``root_dir`` itself, and returns the first whose layout is complete enough to build the dataset.
    """
    spec = DATASETS[canonical_dataset_name(name)]
    base = Path(root_dir).expanduser()
    split = split or spec.default_split
    if not base.is_dir():
        raise RfclipError(f"--root-dir {base} does not exist; point it at the folder holding the datasets")
    candidates = [base / f for f in spec.default_folders] + [base]
    first_error = None
    for cand in candidates:
        if not cand.is_dir():
            continue
        try:
            _check_root(spec, cand, split)
            if spec.name == "coco_object":  # the converted labels must be there too
                label_dir = cand / spec.label_dir.format(split=split)
                if not any(e.name.endswith(spec.label_suffix) for e in os.scandir(label_dir)):
                    raise RfclipError(
                        f"{spec.title} root {cand}: no *{spec.label_suffix} labels in "
                        f"{spec.label_dir.format(split=split)}; {spec.label_hint}"
                    )
            return cand
        except RfclipError as e:
            if cand != base:  # root_dir itself is only a fallback; its layout errors would mislead
                first_error = first_error or e
    if first_error is not None:
        raise first_error
    tried = ", ".join(str(c) for c in candidates[:-1])
    raise RfclipError(f"{spec.title}: none of {tried} exists under --root-dir {base}")
