"""Distraction dimensions of a CLIP backbone: the built-in lists, calibration files, and the lookup RF-CLIP runs.

:func:`resolve_distraction_dims` is what RF-CLIP calls when a segmenter is built: explicit dims, then an explicit
file, then the built-in lists (:data:`rfclip.constants.DISTRACTION_DIMS`), then the calibration cache written by
:func:`rfclip.calibrate.calibrate` (``~/.cache/rfclip/distraction_dims/<hash of the model identity>.json``;
``$RFCLIP_CACHE`` or ``$XDG_CACHE_HOME/rfclip`` move the cache); otherwise a one-line error naming the
``rfclip calibrate`` command. This module sits low in the import graph (methods import it; it imports no method).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ._io import atomic_open
from .constants import DISTRACTION_DIMS
from .errors import RfclipError

FILE_FORMAT = "rfclip-distraction-dims/1"


# ------------------------------------------------------------------------------------------ cache files
def cache_root() -> Path:
    """rfclip's cache folder (the text-embedding cache lives next to it)."""
    base = os.environ.get("RFCLIP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                          "rfclip")
    return Path(base)


def model_identity(clip) -> str:
    """The string that names a loaded model's exact weights (``ClipModel.identity``)."""
    ident = getattr(clip, "identity", None)
    if ident:
        return str(ident)
    return f"{getattr(clip, 'name', 'model')}|{getattr(clip, 'pretrained', None)}|{getattr(clip, 'source', '')}"


def dims_file_for(clip, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`calibrate` saves (and RF-CLIP looks for) the dims of ``clip``."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "distraction_dims"
    digest = hashlib.sha1(model_identity(clip).encode("utf-8")).hexdigest()[:16]
    return root / f"{digest}.json"


def load_dims_file(path: str | os.PathLike, width: int | None = None) -> tuple[int, ...]:
    """Distraction dims from a calibration JSON (``{"dims": [...]}``) or a plain JSON list of ints."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RfclipError(f"distraction-dims file not found: {path}; run `rfclip calibrate` or check the path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RfclipError(f"cannot read distraction-dims file {path}: {err}; re-run `rfclip calibrate`") from None
    dims = data.get("dims") if isinstance(data, dict) else data
    return check_dims(dims, width, where=str(path))


def check_dims(dims: Any, width: int | None = None, where: str = "distraction_dims") -> tuple[int, ...]:
    """Validate a dims list: non-empty, unique integers in ``[0, width)``. Returns a sorted tuple."""
    if isinstance(dims, str):
        dims = [d for d in dims.replace(";", ",").split(",") if d.strip()]
    elif isinstance(dims, int):  # `--option distraction_dims=4` parses to a single int
        dims = [dims]
    try:
        out = tuple(sorted({int(d) for d in dims}))
    except (TypeError, ValueError):
        raise RfclipError(f"{where}: distraction dims must be a list of channel indices, got {dims!r}") from None
    if not out:
        raise RfclipError(f"{where}: the list of distraction dims is empty")
    if out[0] < 0 or (width is not None and out[-1] >= width):
        raise RfclipError(f"{where}: distraction dims {list(out)} out of range for a residual width of {width} "
                          f"(0-based channel indices are expected)")
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def builtin_dims(clip) -> tuple[int, ...] | None:
    """The paper's lists for OpenAI ViT-B/16 and ViT-L/14 (also when OpenAI weights come from a local file)."""
    name, tag = getattr(clip, "name", None), getattr(clip, "pretrained", None)
    dims = DISTRACTION_DIMS.get((name, tag))
    if dims is None and tag is None and str(getattr(clip, "source", "")).startswith("openai"):
        dims = DISTRACTION_DIMS.get((name, "openai"))
    return tuple(dims) if dims is not None else None


def calibrate_command(clip) -> str:
    """The command line that calibrates ``clip`` (for error messages)."""
    name = getattr(clip, "name", "MODEL")
    tag = getattr(clip, "pretrained", None)
    source = str(getattr(clip, "source", ""))
    if tag:
        return f"rfclip calibrate --model {name} --pretrained {tag} IMAGES_DIR"
    if ":" in source and not source.startswith(("random", "open_clip:")):
        return f"rfclip calibrate --model {name} --checkpoint {source.split(':', 1)[1]} IMAGES_DIR"
    return f"rfclip calibrate --model {name} --pretrained TAG IMAGES_DIR"


def resolve_distraction_dims(clip, distraction_dims=None, dims_file=None, width: int | None = None,
                             cache_dir: str | os.PathLike | None = None) -> tuple[tuple[int, ...], str]:
    """The distraction dims RF-CLIP uses for ``clip`` and where they came from.

    Order: ``distraction_dims`` (explicit), ``dims_file``, the built-in lists, the calibration cache. Raises
    :class:`RfclipError` naming the calibrate command when none applies.
    """
    if distraction_dims is not None:
        return check_dims(distraction_dims, width), "distraction_dims option"
    if dims_file is not None:
        return load_dims_file(dims_file, width), str(dims_file)
    dims = builtin_dims(clip)
    if dims is not None:
        return check_dims(dims, width, where=f"built-in dims of {getattr(clip, 'name', '?')}"), "built-in (paper)"
    cached = dims_file_for(clip, cache_dir)
    if cached.is_file():
        return load_dims_file(cached, width), str(cached)
    name = getattr(clip, "name", "this model")
    what = getattr(clip, "pretrained", None) or getattr(clip, "source", "")
    raise RfclipError(
        f"RF-CLIP has no distraction dimensions for {name} ({what}); find them once with "
        f"`{calibrate_command(clip)}` (a folder of ~100 or more natural images), or pass "
        f"--option distraction_dims=4,162,... / --option dims_file=FILE (Python: distraction_dims=[...])"
    )


class ResolvedDims:
    """The distraction dims one method instance uses, looked up once: from the model in the method's ``prepare``
    (:func:`resolve_distraction_dims`), or, for a method built without a model (tests, direct use), from its
    explicit ``distraction_dims`` / ``dims_file`` option on first use. Kept as a long tensor per device."""

    def __init__(self, method_name: str):
        self.method_name = method_name
        self.values: tuple[int, ...] | None = None
        self.source: str | None = None  # where the dims came from ("built-in (paper)", a file, the option)
        self._tensors: dict = {}

    def resolve(self, clip, distraction_dims=None, dims_file=None, width: int | None = None) -> None:
        self.values, self.source = resolve_distraction_dims(clip, distraction_dims, dims_file, width=width)
        self._tensors.clear()

    def tensor(self, device, width: int, distraction_dims=None, dims_file=None):
        """(k,) long tensor of the dims on ``device``, checked against the residual ``width``."""
        import torch

        if self.values is None:
            if distraction_dims is None and dims_file is None:
                raise RfclipError(f"{self.method_name} needs distraction dims: build it through Segmenter (which "
                                  "looks them up) or pass distraction_dims=[...] / dims_file=FILE")
            self.resolve(None, distraction_dims, dims_file, width)
        if self.values[-1] >= width:
            raise RfclipError(f"distraction dims {list(self.values)} out of range for a residual width of {width}")
        t = self._tensors.get(device)
        if t is None:
            t = self._tensors[device] = torch.tensor(self.values, dtype=torch.long, device=device)
        return t
