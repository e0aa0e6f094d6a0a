"""The images of a job: files, folders (optionally recursive), a list file, WebDataset tar shards.

Listing reads no pixels (large folders start at once); images are decoded when their batch comes, in DataLoader
workers where there are some (:class:`ItemDataset`). Every item has an output name, unique within the job: its path
relative to the folder it was found in (or the list's common folder, or ``SHARD/KEY`` in a tar shard) without the
suffix; two inputs that differ only by suffix (``a.jpg``, ``a.png``) keep it (``a.jpg``, ``a.png``).

Hidden files (a leading dot, macOS ``._*`` included) are never inputs: rfclip's own temporary files are hidden.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable

from ..errors import ImageError, RfclipError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclasses.dataclass(frozen=True)
class Item:
    """One input image: a file, or the bytes ``offset:offset+size`` of member ``member`` of the tar ``source``."""

    source: str
    name: str  # output name: relative, without suffix, '/' between folders
    member: str | None = None
    offset: int = -1
    size: int = -1
    shard: int = -1  # index of its tar shard in Inputs.shards (-1: a file)

    @property
    def label(self) -> str:
        """How messages and run.json name it."""
        return self.source if self.member is None else f"{self.source}:{self.member}"


@dataclasses.dataclass
class Inputs:
    items: list[Item]
    shards: list[str]  # tar shards, in the order their items come
    problems: list[tuple[str, str]]  # (input, reason): missing list entries, missing or damaged shards


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES


def expand_shards(pattern: str) -> list[str]:
    """``shards/{000000..000099}.tar`` -> the 100 names (brace expansion, as WebDataset writes it)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def folder_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders with ``recursive``), sorted; hidden files and folders skipped."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_name(p.name) and p.is_file())
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        found += [Path(root) / f for f in files if is_image_name(f)]
    return sorted(found)


def read_list(path: str | os.PathLike) -> list[str]:
    """A file of image paths, one per line (blank lines and lines starting with '#' skipped)."""
    path = Path(path)
    if not path.is_file():
        raise RfclipError(f"list file not found: {path}; give a text file with one image path per line to --list")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RfclipError(f"cannot read list file {path}: {err}; give a UTF-8 text file, one path per line") from None
    entries = [line.strip() for line in lines]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise RfclipError(f"list file {path} lists no images; write one image path per line")
    return entries


def tar_items(shard: str, index: int) -> tuple[list[Item], str | None]:
    """The images of a WebDataset shard (one per sample key: the first member with an image suffix) and, when the
    tar is damaged, why (the members before the damage are kept)."""
    items: list[Item] = []
    seen: set[str] = set()
    stem = Path(shard).name.split(".")[0]
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if is_hidden(base) or "." not in base:
                    continue
                key = os.path.join(folder, base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower()
                if key in seen or ext not in IMAGE_SUFFIXES:
                    continue
                seen.add(key)
                items.append(Item(source=shard, name=f"{stem}/{key}", member=member.name, offset=member.offset_data,
                                  size=member.size, shard=index))
    except (tarfile.TarError, EOFError, OSError) as err:
        return items, f"tar shard {shard} is damaged after {len(items)} images ({err}); the rest of it is skipped"
    return items, None


def list_inputs(images: Iterable[str] = (), recursive: bool = False, list_file: str | None = None,
                shard_patterns: Iterable[str] = ()) -> Inputs:
    """Every input of a job, in a deterministic order: the named files and folders, then the list file's entries,
    then the shards' images. Missing list entries and damaged shards are problems (reported, not fatal)."""
    named: list[Item] = []
    shards: list[str] = [s for p in shard_patterns for s in expand_shards(p)]
    problems: list[tuple[str, str]] = []
    for entry in images:
        path = Path(entry)
        if path.is_dir():
            found = folder_images(path, recursive)
            if not found:
                raise RfclipError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                                  + ("" if recursive else "; add --recursive to look in its sub-folders"))
            named += [Item(source=str(p), name=p.relative_to(path).as_posix()) for p in found]
        elif path.suffix.lower() == ".tar":
            shards.append(str(path))
        else:
            named.append(Item(source=str(path), name=path.name))
    if list_file is not None:
        entries = read_list(list_file)
        existing = []
        for entry in entries:
            if os.path.isfile(entry):
                existing.append(entry)
            else:
                problems.append((entry, f"listed in {list_file} but not found: {entry}"))
        if existing:
            common = os.path.commonpath([os.path.dirname(os.path.abspath(e)) for e in existing])
            named += [Item(source=e, name=os.path.relpath(os.path.abspath(e), common).replace(os.sep, "/"))
                      for e in existing]
    items = list(named)
    for index, shard in enumerate(shards):
        if not os.path.isfile(shard):
            problems.append((shard, f"tar shard not found: {shard}"))
            continue
        found, damage = tar_items(shard, index)
        items += found
        if damage:
            problems.append((shard, damage))
    return Inputs(items=name_outputs(items), shards=shards, problems=problems)


def name_outputs(items: list[Item]) -> list[Item]:
    """Items with their output names: the relative name without suffix, or with it where two share a stem."""
    def stem(name: str) -> str:
        head, _, base = name.rpartition("/")
        return (head + "/" if head else "") + (base.rsplit(".", 1)[0] if "." in base else base)

    counts: dict[str, int] = {}
    for item in items:
        counts[stem(item.name)] = counts.get(stem(item.name), 0) + 1
    named = [dataclasses.replace(it, name=stem(it.name) if counts[stem(it.name)] == 1 else it.name) for it in items]
    owners: dict[str, Item] = {}
    for item in named:
        if item.name in owners:
            raise RfclipError(f"images {owners[item.name].label} and {item.label} would both write {item.name}_mask.png "
                              "(and the rest of its files); rename one of them or segment them into different --out "
                              "folders")
        owners[item.name] = item
    return named


# ---------------------------------------------------------------------------------------------- decoding
def header_error(path: str) -> str | None:
    """Why the image file ``path`` cannot be read, from its header and structure (``PIL.Image.verify``, no pixels
    decoded), or None when it looks readable. The message is the one decoding would give."""
    from PIL import Image

    from ..inference import read_image

    try:
        with Image.open(path) as pil:
            pil.verify()
        return None
    except Exception:  # noqa: BLE001 - decoding says precisely why
        try:
            read_image(path)
        except ImageError as err:
            return str(err)
        return None


def read_item(item: Item):
    """``(H x W x 3 uint8, conversion)`` of an item; an unreadable one raises :class:`ImageError`."""
    from PIL import Image

    from ..inference import _pil_to_rgb, read_image

    if item.member is None:
        return read_image(item.source)
    try:
        with open(item.source, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
        if len(data) != item.size:
            raise OSError("the tar ends inside this member")
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            return _pil_to_rgb(pil, f"image {item.label}")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {item.label}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         "; the tar member is damaged") from None


class ItemDataset:
    """Map-style dataset for a DataLoader: index -> ``{"index", "image", "conversion", "error"}``; an unreadable
    image gives ``image`` None and ``error`` its one-line reason (it is skipped, never fatal)."""

    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        try:
            rgb, conversion = read_item(self.items[index])
            return {"index": index, "image": rgb, "conversion": conversion, "error": None}
        except ImageError as err:
            return {"index": index, "image": None, "conversion": None, "error": str(err)}


def collate(batch: list[dict]) -> list[dict]:
    return batch
