"""Image-level inference: loading, resizing, batched sliding window, post-processing.

The reference code (SCLIP/NACLIP/RF-CLIP) runs every sliding-window crop through the ViT one at a time. Here
all crops of all images in a call are grouped by shape and run in chunks of ``batch_size`` crops per forward;
overlapping crop logits are averaged exactly as in the mmseg-style reference (raw cosine logits, before softmax).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ._io import file_problem
from .constants import (CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, LOGIT_SCALE, LONG_SIDE_CAP, PAMR_DILATIONS, PAMR_STEPS,
                        SHORT_SIDE, SLIDE_CROP, SLIDE_STRIDE)
from .errors import ImageError, RfclipError
from .text import TextQueries

log = logging.getLogger(__name__)


@dataclass
class InferenceConfig:
    """Image-level settings. Defaults: the RF-CLIP / SCLIP / NACLIP sliding-window protocol (protocol.md §4)."""

    short_side: int | None = SHORT_SIDE  # resize so the short side is this (long side capped at 2048); None/0: keep
    slide_crop: int = SLIDE_CROP  # sliding-window crop; 0 = whole image in one forward
    slide_stride: int = SLIDE_STRIDE
    logit_scale: float = LOGIT_SCALE  # softmax temperature over queries
    prob_thd: float = 0.0  # pixels whose best class probability is below this become `background_class`
    background_class: int = 0
    area_thd: float | None = None  # SCLIP's VOC21 small-region suppression (None = off)
    pamr: bool = False
    pamr_steps: int = PAMR_STEPS
    pamr_dilations: tuple[int, ...] = PAMR_DILATIONS
    batch_size: int | None = None  # crops per forward; None: 64 on a GPU, 8 on CPU (see crops_per_forward)
    precision: str = "auto"  # "auto" (bf16 on CUDA when supported, else fp16; fp32 on CPU) | "fp32" | "bf16" | "fp16"
    compile: bool = False  # torch.compile the encoder forward (pays off on GPU over many images; first calls compile)
    pixel_mean: tuple[float, ...] = CLIP_PIXEL_MEAN  # RGB normalisation, 0-255 scale (presets: the mmseg-rounded ones)
    pixel_std: tuple[float, ...] = CLIP_PIXEL_STD
    pad_crops_to: int | str = 0  # zero-pad each crop to multiples of this many px (ClearCLIP: "patch", ProxyCLIP: 56)

    def __post_init__(self):
        """Check every setting's type and range (also on ``dataclasses.replace``): one-line RfclipError."""
        self.short_side = _whole("short_side", self.short_side, 0, none_ok=True, hint="0 or None keeps the size")
        self.slide_crop = _whole("slide_crop", self.slide_crop, 0, hint="0 runs the whole image in one forward")
        self.slide_stride = _whole("slide_stride", self.slide_stride, 1)  # > crop: see sliding_windows
        self.logit_scale = _number("logit_scale", self.logit_scale, 0.0, None, low_open=True)
        self.prob_thd = _number("prob_thd", self.prob_thd, 0.0, 1.0)
        self.background_class = _whole("background_class", self.background_class, 0)
        if self.area_thd is not None:
            self.area_thd = _number("area_thd", self.area_thd, 0.0, 1.0)
        self.pamr_steps = _whole("pamr_steps", self.pamr_steps, 0)
        self.batch_size = _whole("batch_size", self.batch_size, 1, none_ok=True, hint="or None for the device default")
        for name in ("pamr", "compile"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise RfclipError(f"{name} must be true or false, got {value!r}")
            setattr(self, name, bool(value))
        if str(self.precision).lower() not in PRECISIONS:
            raise RfclipError(f"unknown precision '{self.precision}'; choose {', '.join(PRECISIONS)}")
        if not (isinstance(self.pad_crops_to, str) and self.pad_crops_to.strip().lower() == "patch"):
            self.pad_crops_to = _whole("pad_crops_to", self.pad_crops_to, 0, hint="or 'patch'")
            if self.pad_crops_to > MAX_CROP_PADDING:
                raise RfclipError(f"pad_crops_to {self.pad_crops_to} is larger than {MAX_CROP_PADDING} px (every crop "
                                  f"would be padded to that size); the papers pad to 56 or the patch size")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_CROP_PADDING = 512  # pad_crops_to above this only adds zeros (ProxyCLIP pads to 56, ClearCLIP to the patch)

# Crops per forward when ``batch_size`` is None. A GPU needs large batches to be busy. On CPU one 224 crop already
# keeps the cores busy, and larger batches only make every activation larger: with glibc's default allocator each
# buffer above 32 MB is fresh mmap'ed memory, zero-filled page by page on first touch. Measured on a 2-core CPU
# (random ViT-B/16, dense CLIP, benchmarks/throughput.py): 0.70 images/s at 6-8 crops per forward, 0.50 at 36.
DEFAULT_CROPS_PER_FORWARD = {"cuda": 64, "cpu": 8}


def crops_per_forward(batch_size: int | None, device: torch.device) -> int:
    """``batch_size``, or the device's default (:data:`DEFAULT_CROPS_PER_FORWARD`; 64 elsewhere) when None."""
    if batch_size is not None:
        return int(batch_size)
    return DEFAULT_CROPS_PER_FORWARD.get(torch.device(device).type, 64)


def _whole(name: str, value, minimum: int, none_ok: bool = False, hint: str = ""):
    """``value`` as an int >= ``minimum`` (an integral float such as 336.0 is accepted), else a one-line error."""
    if value is None and none_ok:
        return None
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok and isinstance(value, (float, np.floating)) and float(value).is_integer():
        value, ok = int(value), True
    if not ok or value < minimum:
        raise RfclipError(f"{name} must be a whole number >= {minimum}{' (' + hint + ')' if hint else ''}, "
                          f"got {value!r}; give a value in range")
    return int(value)


def _number(name: str, value, low: float, high: float | None, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, ...`` with ``low_open``), else a one-line error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    in_range = math.isfinite(number) and (number > low if low_open else number >= low) and (high is None or number <= high)
    if isinstance(value, (bool, np.bool_)) or not in_range:
        span = f"{'above' if low_open else 'at least'} {low:g}" if high is None else f"in {low:g}..{high:g}"
        raise RfclipError(f"{name} must be a finite number {span}, got {value!r}; give a value in range")
    return number


# ------------------------------------------------------------------------------------------- images in
def load_image(image) -> np.ndarray:
    """A path, PIL image or H x W (x 1/3/4) array -> H x W x 3 uint8 RGB (see :func:`read_image`)."""
    return read_image(image)[0]


def read_image(image) -> tuple[np.ndarray, str | None]:
    """A path, PIL image or H x W (x 1/3/4) array -> ``(H x W x 3 uint8 RGB, conversion)``.

    EXIF orientation is applied; grayscale, palette and RGBA inputs become RGB (alpha is dropped). Inputs that are
    not 8-bit are scaled to 0..255 by their range, and ``conversion`` says how (None for 8-bit inputs):

    * integer images by their type's full range: 16-bit PNG/TIFF (``I;16``) and ``uint16`` arrays by 65535 (a TIFF
      that declares fewer bits per sample, e.g. 12, by 2^bits - 1);
    * float images (``F`` TIFFs, float arrays) whose values lie in 0..1 (within one 8-bit step) by 255.

    Anything else cannot be interpreted and is refused with a one-line :class:`ImageError` naming the conversion
    to make: NaN or infinite values, float values outside 0..1, other integer types, 32-bit integer files.
    """
    with warnings.catch_warnings(record=True) as caught:  # Pillow's warnings ("Corrupt EXIF data") go to the log
        warnings.simplefilter("always")
        try:
            return _read_image(image)
        finally:
            for w in caught:
                if "PIL" in w.filename or issubclass(w.category, Image.DecompressionBombWarning):
                    log.info("%s: %s", image if isinstance(image, (str, os.PathLike)) else "the image", w.message)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _read_image(image) -> tuple[np.ndarray, str | None]:
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        rgb, conversion = _read_file(name)
    elif isinstance(image, Image.Image):
        name = "the PIL image"
        rgb, conversion = _pil_to_rgb(image, name)
    elif isinstance(image, np.ndarray):
        name = "the image array"
        rgb, conversion = _array_to_rgb(image)
    elif isinstance(image, torch.Tensor):
        name = "the image tensor"
        rgb, conversion = _array_to_rgb(_tensor_to_array(image))
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; give a path, a PIL image, an "
                         "H x W x 3 uint8 array or a 3 x H x W tensor")
    if conversion:
        log.info("%s: %s", name, conversion)
    return rgb, conversion


def _read_file(path: str) -> tuple[np.ndarray, str | None]:
    problem = file_problem(path)
    if problem == "not found":
        raise ImageError(f"image not found: {path}; check the path")
    if problem is not None:
        raise ImageError(f"image {path} {problem}; give an image file (JPEG, PNG, ...)")
    try:
        with warnings.catch_warnings():
            # Between Pillow's pixel limit and twice it Pillow only warns; such images are read (and resized).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                pil.load()
                return _pil_to_rgb(pil, f"image {path}")
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels.group(1)) / 1e6:.0f} megapixels, " if pixels else ""
        raise ImageError(f"image {path} is too large to read safely ({size}above Pillow's limit of "
                         f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f}); downscale it first") from None
    except PermissionError:
        raise ImageError(f"cannot read image {path}: permission denied; make the file readable "
                         f"(chmod a+r) or copy it where you can read it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                         "give a valid JPEG/PNG/WebP/... file") from None


def _tiff_bits(pil: Image.Image) -> int | None:
    tags = getattr(pil, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) else None


def _pil_to_rgb(pil: Image.Image, name: str) -> tuple[np.ndarray, str | None]:
    fmt, tiff_bits = pil.format, _tiff_bits(pil)  # before exif_transpose, whose copy forgets them
    pil = ImageOps.exif_transpose(pil)
    mode = pil.mode
    if mode.startswith("I;16") or mode == "I":
        if mode == "I" and fmt is None:
            raise ImageError(f"{name} has mode I (32-bit integers), which has no standard brightness range; "
                             "convert it to 8-bit (mode L/RGB) or 16-bit (mode I;16) first")
        # PNG, PGM, ... hold at most 16-bit integers (older Pillow reads them as "I"); a TIFF says its depth.
        bits = tiff_bits if fmt == "TIFF" else 16
        if bits is None or not 1 <= bits <= 16:
            raise ImageError(f"{name} holds {bits or 32}-bit integers, which have no standard brightness range; "
                             "save it as an 8- or 16-bit image")
        return _scale_integers(np.asarray(pil), bits, f"{bits}-bit grey (mode {mode})", name)
    if mode == "F":
        return _scale_floats(np.asarray(pil), "float grey, mode F", name,
                             fix="save it as an 8- or 16-bit image, or as float values in 0..1")
    if mode in ("RGBA", "LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in pil.info):
        pil = pil.convert("RGBA").convert("RGB")  # drop alpha; a white composite would invent colours
    elif mode != "RGB":
        pil = pil.convert("RGB")
    return np.asarray(pil, dtype=np.uint8).copy(), None


def _scale_integers(values: np.ndarray, bits: int, what: str, name: str) -> tuple[np.ndarray, str]:
    """Integers in 0..2^bits-1 -> uint8 RGB, ``round(v * 255 / (2^bits - 1))`` in exact integer arithmetic."""
    top = (1 << bits) - 1
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > top:
        raise ImageError(f"{name} holds values {lo}..{hi}, outside the 0..{top} of a {bits}-bit image; "
                         "save it as an 8- or 16-bit image")
    scaled = ((values.astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8)
    return _to_rgb(scaled), f"{what}: values scaled from 0..{top} to 0..255"


_FLOAT_TOLERANCE = 1.0 / 255  # float images may overshoot 0..1 by rounding; one 8-bit step is accepted (clipped)


def _scale_floats(values: np.ndarray, what: str, name: str, fix: str) -> tuple[np.ndarray, str]:
    """Float values in 0..1 -> uint8 RGB by ``round(255 v)``; anything else has no known range and is refused."""
    finite = np.isfinite(values)
    if not finite.all():
        raise ImageError(f"{name} ({what}) has NaN or infinite values; replace them (e.g. np.nan_to_num(x)) or {fix}")
    lo, hi = float(values.min()), float(values.max())
    if lo >= -_FLOAT_TOLERANCE and hi <= 1 + _FLOAT_TOLERANCE:
        scaled = np.rint(np.clip(values.astype(np.float32), 0, 1) * 255).astype(np.uint8)
        return _to_rgb(scaled), f"{what} in 0..1: values scaled to 0..255"
    raise ImageError(f"{name} ({what}) has values {lo:g}..{hi:g}, but rfclip reads float images as brightness "
                     f"in 0..1; {fix}")


def _to_rgb(values: np.ndarray) -> np.ndarray:
    """H x W or H x W x 1/3/4 -> H x W x 3 (grey repeated, alpha dropped), contiguous and writable."""
    if values.ndim == 2:
        values = values[..., None]
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    out = np.ascontiguousarray(values[..., :3])
    return out if out.flags.writeable else out.copy()  # torch warns on (and cannot share) read-only arrays


def _tensor_to_array(image: Tensor) -> np.ndarray:
    """A torch image -> an H x W (x C) array: ``(C, H, W)`` as torchvision writes images (or ``(1, C, H, W)``), or
    ``(H, W, C)`` / ``(H, W)``; values keep their type's meaning (uint8 0..255, float 0..1)."""
    x = image.detach()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.permute(1, 2, 0)
    elif x.dim() not in (2, 3):
        raise ImageError(f"image tensor must be 3 x H x W (or H x W x 3, or 1 x 3 x H x W), got shape "
                         f"{tuple(image.shape)}")
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.cpu().numpy()


def _array_to_rgb(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    arr = image[..., None] if image.ndim == 2 else image
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image array must be H x W x 3 (or 1/4 channels), got shape {image.shape}")
    if arr.dtype == np.uint8:
        return _to_rgb(arr), None
    if arr.dtype == np.uint16:
        return _scale_integers(arr, 16, "uint16 array", "the image array")
    if np.issubdtype(arr.dtype, np.floating):
        if np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 255:  # most likely 0..255 values as floats
            fix = "convert with np.clip(x, 0, 255).round().astype(np.uint8) if they are 0..255 brightness"
        else:
            fix = "scale it to 0..1 (e.g. (x - x.min()) / (x.max() - x.min())) or convert it to uint8"
        return _scale_floats(arr, f"{arr.dtype} array", "the image array", fix=fix)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        lo, hi = (int(arr.min()), int(arr.max()))
        if arr.dtype == np.bool_:
            fix = "convert with x.astype(np.uint8) * 255"
        elif 0 <= lo and hi <= 255:
            fix = "convert with x.astype(np.uint8)"
        else:
            fix = "convert it to uint8 (0..255) or uint16 (0..65535)"
        raise ImageError(f"image array must be uint8 (0..255), uint16 (0..65535) or float (0..1), got {arr.dtype} "
                         f"with values {lo}..{hi}; {fix}")
    raise ImageError(f"image array must be uint8, uint16 or float, got {arr.dtype}; convert it to uint8")


def rescale_size(height: int, width: int, short_side: int | None, long_cap: int = LONG_SIDE_CAP) -> tuple[int, int]:
    """mmcv ``Resize(scale=(long_cap, short_side), keep_ratio=True)``: the short side becomes ``short_side``
    unless the long side would pass ``long_cap``; sizes round with ``int(x + 0.5)``."""
    if not short_side:
        return height, width
    scale = min(long_cap / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def pad_to_patch(image: Tensor, patch: tuple[int, int]) -> Tensor:
    """(3, h, w) -> (3, max(h, patch_h), max(w, patch_w)): a side shorter than one patch (a 1 x 500 image after
    the long-side cap) is extended by repeating its last row / column, so that it still gives a patch grid. The
    caller cuts the padding's logits off again."""
    pad_h, pad_w = max(0, patch[0] - image.shape[-2]), max(0, patch[1] - image.shape[-1])
    if not (pad_h or pad_w):
        return image
    return F.pad(image[None], (0, pad_w, 0, pad_h), mode="replicate")[0]


def preprocess(image: np.ndarray, short_side: int | None, device=None, mean: Sequence[float] = CLIP_PIXEL_MEAN,
               std: Sequence[float] = CLIP_PIXEL_STD) -> Tensor:
    """uint8 H x W x 3 -> resized (bilinear, as mmcv/cv2), normalised (3, h, w) fp32 tensor: ``(x - mean) / std``
    with RGB ``mean`` / ``std`` on the 0-255 scale (default: CLIP's; the papers' configs round them, see
    ``constants.MMSEG_CLIP_MEAN``)."""
    x = torch.from_numpy(image).to(device).permute(2, 0, 1).float()[None]  # (1, 3, H, W) in 0..255
    size = rescale_size(x.shape[-2], x.shape[-1], short_side)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t)[0]


# ------------------------------------------------------------------------------------------- dense logits
def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg-style windows ``(y1, y2, x1, x2)``: the last window is shifted back inside the image, no padding;
    an image smaller than the crop gives one smaller crop. ``crop=0`` is one window over the whole image. A stride
    larger than the crop is refused where it would leave pixels uncovered (mmseg would average them over 0 windows)."""
    if crop <= 0:
        return [(0, height, 0, width)]
    if stride <= 0:
        raise RfclipError(f"slide_stride must be positive, got {stride}")
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride + crop, height)
            x2 = min(j * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    if stride > crop:  # windows may leave gaps (the last window, shifted back, may close them)
        for spans in ({(w[0], w[1]) for w in windows}, {(w[2], w[3]) for w in windows}):
            reach = 0
            for start, end in sorted(spans):
                if start > reach:
                    raise RfclipError(f"slide_stride {stride} is larger than slide_crop {crop}, which leaves pixels "
                                      f"between windows without a prediction on this {width}x{height} input; use "
                                      "a stride <= the crop")
                reach = max(reach, end)
    return windows


def crop_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """Zeros ``(left, right, top, bottom)`` that make a crop's sides multiples of ``multiple`` (0: none), split
    evenly with the odd pixel right / bottom, as ClearCLIP's and ProxyCLIP's ``compute_padsize``."""
    if multiple <= 0:
        return 0, 0, 0, 0
    extra_w, extra_h = -width % multiple, -height % multiple
    return extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2


def padding_multiple(pad_crops_to: int | str, patch_size: int) -> int:
    """``InferenceConfig.pad_crops_to`` in pixels: ``"patch"`` is the model's patch size (ClearCLIP), a number >= 0
    is taken as is (0: no padding)."""
    if isinstance(pad_crops_to, str) and pad_crops_to.strip().lower() == "patch":
        return int(patch_size)
    if isinstance(pad_crops_to, bool) or not isinstance(pad_crops_to, int) or pad_crops_to < 0:
        raise RfclipError(f"pad_crops_to must be a number of pixels >= 0 or 'patch', got {pad_crops_to!r}")
    return pad_crops_to


def check_pixel_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    """Three finite RGB means and three finite positive standard deviations (0-255 scale)."""
    try:
        ok = (len(mean) == 3 and len(std) == 3 and all(math.isfinite(float(v)) and float(v) > 0 for v in std)
              and all(math.isfinite(float(v)) for v in mean) and not any(isinstance(v, bool) for v in (*mean, *std)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RfclipError(f"pixel_mean / pixel_std must be 3 RGB values each on the 0-255 scale (std > 0), got "
                          f"{mean!r} / {std!r}; e.g. pixel_mean=122.771,116.746,104.094")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = run in fp32).

    ``auto`` is bf16 on CUDA (fp16 where bf16 is not supported) and fp32 elsewhere: CPUs without native bf16
    matrix units run bf16 slower than fp32. An explicit ``bf16``/``fp16`` runs autocast on any device whose
    autocast supports that dtype (CPU: bf16, and fp16 in recent torch); otherwise it is a user error.
    """
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise RfclipError(f"unknown precision '{precision}'; choose {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type != "cuda" and not _autocast_supports(device.type, dtype):
        raise RfclipError(f"precision '{precision}' is not supported on {device.type} by torch {torch.__version__} "
                          f"(autocast); use precision fp32{' or bf16' if dtype == torch.float16 else ''}")
    return dtype


def _autocast_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device_type, dtype)`` really switches autocast on (older torch only warns)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError):
        return False


_UPSAMPLE_BUDGET = 1 << 26  # elements of upsampled crop logits held at once (256 MB in fp32)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def _amp(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


def image_cls_tokens(encoder, method, images: Sequence[Tensor], batch_size: int = 64,
                     amp_dtype: torch.dtype | None = None, check_in: Callable[[], None] | None = None) -> list[Tensor]:
    """The [CLS] embedding (D,) fp32 of each whole image, from ``cls_only`` forwards batched by image shape
    (for methods whose logits use the whole image's [CLS] with a sliding window, e.g. ``rfclip_release``)."""
    out: list[Tensor | None] = [None] * len(images)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for idx, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[-2:]), []).append(idx)
    for indices in by_shape.values():
        for chunk in _chunks(indices, batch_size):
            if check_in is not None:
                check_in()
            with _amp(images[chunk[0]].device, amp_dtype):
                cls = encoder(torch.stack([images[i] for i in chunk]), method, cls_only=True).cls  # (B, D)
            if cls is None:
                raise ValueError(f"method {getattr(method, 'name', method)!r} asks for the image [CLS] but its "
                                 "forward returns none")
            for i, c in zip(chunk, cls.float()):
                out[i] = c
    return out


def dense_logits(encoder, method, images: Sequence[Tensor], text: TextQueries, crop: int, stride: int,
                 batch_size: int = 64, amp_dtype: torch.dtype | None = None, pad_to: int = 0,
                 regions: Sequence[Tensor] | None = None,
                 check_in: Callable[[], None] | None = None) -> list[Tensor]:
    """Cosine logits per query for preprocessed images, averaged over sliding-window crops.

    ``images``: list of (3, H_i, W_i) normalised tensors. Crops of all images are grouped by shape and run
    ``batch_size`` at a time; ``pad_to`` > 0 zero-pads each crop to multiples of it (:func:`crop_padding`) and
    cuts the padding off the upsampled logits. The method's ``logits`` hook turns each crop's features (and its
    [CLS]: the crop's own, or with ``needs_image_cls`` the whole image's from :func:`image_cls_tokens` when the
    image has several windows) into logits. ``regions``: one (H_i, W_i) int64 region map per image (mask-tier
    methods): each crop's map travels with it, padded with the method's ``region_pad_value``, as ``ctx.regions``.
    ``check_in`` is called before every forward chunk and may raise to stop the work (the demo stops a request
    whose client has gone). Returns a list of (Q, H_i, W_i) fp32 tensors (before softmax).
    """
    device = images[0].device
    text_features = text.features.to(device=device, dtype=torch.float32)  # (Q, D)
    canvases = [torch.zeros(text_features.shape[0], *img.shape[-2:], device=device) for img in images]
    counts = []  # how many windows cover each pixel: built on the host once per image, not per crop on the device
    by_shape: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
    windowed = []  # images cut into more than one window
    for idx, img in enumerate(images):
        count = np.zeros((1, *img.shape[-2:]), dtype=np.float32)
        windows = sliding_windows(img.shape[-2], img.shape[-1], crop, stride)
        for win in windows:
            by_shape.setdefault((win[1] - win[0], win[3] - win[2]), []).append((idx, win))
            count[:, win[0]:win[1], win[2]:win[3]] += 1
        counts.append(torch.from_numpy(count).to(device))
        if len(windows) > 1:
            windowed.append(idx)
    needs_text = getattr(method, "needs_text_in_forward", False)
    logits_hook = getattr(method, "logits", None)
    image_cls: dict[int, Tensor] = {}
    if windowed and getattr(method, "needs_image_cls", False):  # a single window is the whole image: its own [CLS]
        image_cls = dict(zip(windowed, image_cls_tokens(encoder, method, [images[i] for i in windowed], batch_size,
                                                        amp_dtype, check_in)))
    for shape, crops in by_shape.items():
        left, right, top, bottom = crop_padding(*shape, pad_to)
        padded = (shape[0] + top + bottom, shape[1] + left + right)
        for chunk in _chunks(crops, batch_size):
            if check_in is not None:
                check_in()
            batch = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])  # (B, 3, h, w)
            extra = {}
            if regions is not None:  # (B, h, w) region maps of the crops, padded like them
                crop_regions = torch.stack([regions[i][y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])
                if padded != shape:
                    crop_regions = F.pad(crop_regions, (left, right, top, bottom),
                                         value=int(getattr(method, "region_pad_value", 0)))
                extra["regions"] = crop_regions
            if padded != shape:
                batch = F.pad(batch, (left, right, top, bottom))
            with _amp(device, amp_dtype):
                features, grid, cls = encoder(batch, method, text_features=text_features if needs_text else None,
                                              **extra)
            if image_cls:
                cls = torch.stack([image_cls[i] if i in image_cls else c for (i, _), c in zip(chunk, cls.float())])
            if logits_hook is None:
                logits = features.float() @ text_features.T  # (B, N, Q)
            else:
                logits = logits_hook(features.float(), cls, text_features)  # (B, N, Q)
            logits = logits.transpose(1, 2).reshape(len(chunk), -1, *grid)  # (B, Q, h_p, w_p)
            # Upsample a few crops at a time: B x Q x crop x crop at once can take GBs (171 classes, 64 crops).
            per_step = max(1, _UPSAMPLE_BUDGET // (logits.shape[1] * padded[0] * padded[1]))
            for start in range(0, len(chunk), per_step):
                up = F.interpolate(logits[start:start + per_step], size=padded, mode="bilinear", align_corners=False)
                up = up[:, :, top:top + shape[0], left:left + shape[1]]  # the padding cut off
                for crop_logits, (i, (y1, y2, x1, x2)) in zip(up, chunk[start:start + per_step]):
                    canvases[i][:, y1:y2, x1:x2] += crop_logits
    return [canvas.div_(count) for canvas, count in zip(canvases, counts)]


# ------------------------------------------------------------------------------------------- post-processing
_RESIZE_BUDGET = 1 << 25  # elements of resized (full-resolution) logits held at once (128 MB in fp32)


def _channel_ranges(num: int, size: tuple[int, int], budget: int = _RESIZE_BUDGET) -> list[tuple[int, int]]:
    step = max(1, budget // max(1, size[0] * size[1]))
    return [(q0, min(num, q0 + step)) for q0 in range(0, num, step)]


def _resized(logits: Tensor, q0: int, q1: int, size: tuple[int, int]) -> Tensor:
    """Channels ``q0:q1`` of ``logits`` (Q, h, w) bilinearly resized to ``size`` (fp32). Channels are resized
    independently, so resizing a few at a time gives exactly the numbers of resizing them all at once."""
    part = logits[q0:q1]
    if tuple(part.shape[-2:]) == tuple(size):  # bilinear with align_corners=False to the same size is the identity
        return part.float()
    return F.interpolate(part[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def _best_query(logits: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, list, Tensor | None]:
    """Max and argmax over queries of the resized logits, a few channels at a time. Returns ``(top (H, W),
    best (H, W) long, channel ranges, the resized logits when they fit in one chunk (else None))``."""
    ranges = _channel_ranges(logits.shape[0], size)
    top = best = whole = None
    for q0, q1 in ranges:
        lg = _resized(logits, q0, q1, size)
        if len(ranges) == 1:
            whole = lg
        m, i = lg.max(dim=0)
        if top is None:
            top, best = m, i
        else:  # strict: ties keep the earlier query, as one argmax over all queries
            upd = m > top
            top, best = torch.where(upd, m, top), torch.where(upd, i + q0, best)
    return top, best, ranges, whole


def class_probabilities(logits: Tensor, text: TextQueries, logit_scale: float,
                        size: tuple[int, int] | None = None) -> Tensor:
    """``softmax_q(logit_scale * resize(logits))`` then the max over each class's synonyms.

    ``logits`` (Q, h, w) -> (C, H, W) fp32 at ``size`` (default: the logits' own size). The resize and the softmax
    go a few query channels at a time (a max pass, then an exp pass), so that beside the output only
    O(H * W) memory is needed: no full-resolution (Q, H, W) logits on large images.
    """
    Q = logits.shape[0]
    size = tuple(size or logits.shape[-2:])
    C = text.num_classes
    query_class = text.query_class.to(logits.device)
    plain = Q == C and bool((query_class == torch.arange(C, device=logits.device)).all())
    top, _, ranges, whole = _best_query(logits, size)
    probs = (torch.empty if plain else torch.zeros)(C, *size, dtype=torch.float32, device=logits.device)
    total = torch.zeros(size, dtype=torch.float32, device=logits.device)
    for q0, q1 in ranges:
        lg = whole if whole is not None else _resized(logits, q0, q1, size)
        e = lg.sub(top).mul_(logit_scale).exp_()  # (k, H, W), exp(s (l - l_max)) <= 1
        total += e.sum(dim=0)
        if plain:
            probs[q0:q1] = e
        else:  # max over synonyms; the common normaliser keeps the order
            probs.scatter_reduce_(0, query_class[q0:q1].view(-1, 1, 1).expand_as(e), e, reduce="amax")
    return probs.div_(total)


def class_mask(logits: Tensor, text: TextQueries, logit_scale: float, prob_thd: float = 0.0,
               background_class: int = 0, size: tuple[int, int] | None = None) -> Tensor:
    """The mask of :func:`postprocess` without the (C, H, W) probabilities: the class of the best query (the
    softmax is monotonic and a class scores as the max over its synonyms) and, where ``prob_thd`` is set, the best
    probability ``1 / sum_q exp(s (l_q - l_max))``. ``logits`` (Q, h, w) -> (H, W) long at ``size``."""
    size = tuple(size or logits.shape[-2:])
    top, best, ranges, whole = _best_query(logits, size)
    mask = text.query_class.to(logits.device)[best]
    if prob_thd > 0:
        total = torch.zeros(size, dtype=torch.float32, device=logits.device)
        for q0, q1 in ranges:
            lg = whole if whole is not None else _resized(logits, q0, q1, size)
            total += lg.sub(top).mul_(logit_scale).exp_().sum(dim=0)
        mask[total.reciprocal_() < prob_thd] = background_class
    return mask


def suppress_small_areas(probs: Tensor, area_thd: float) -> Tensor:
    """SCLIP's VOC21 rule: a foreground class predicted on at most ``area_thd`` of the foreground pixels gets
    probability 0 everywhere. ``probs`` (C, H, W), changed in place and returned."""
    pred = probs.argmax(0)
    areas = torch.bincount(pred.flatten(), minlength=probs.shape[0]).float()
    small = areas <= area_thd * areas[1:].sum()
    small[0] = False
    probs[small] = 0  # one masked write (no per-class host sync on GPU)
    return probs


def postprocess(logits: Tensor, text: TextQueries, cfg: InferenceConfig, out_size: tuple[int, int],
                guide: Tensor | None = None, return_probs: bool = True) -> tuple[Tensor, Tensor | None]:
    """Averaged logits (Q, h, w) at the resized resolution -> mask (H, W) long and probs (C, H, W) at ``out_size``.

    Steps (protocol §4.5): bilinear resize to the original size; optional PAMR guided by the normalised image;
    softmax over queries with ``logit_scale``; max over synonyms; optional ``area_thd``; argmax; pixels whose best
    probability is below ``prob_thd`` become ``background_class``.
    """
    out_size = (int(out_size[0]), int(out_size[1]))
    if cfg.pamr:
        from .pamr import pamr

        if guide is None:
            raise ValueError("PAMR needs the guidance image")
        logits = _resized(logits, 0, logits.shape[0], out_size)  # PAMR refines full-resolution maps
        guide = F.interpolate(guide[None].float(), size=out_size, mode="bilinear", align_corners=False)
        logits = pamr(guide, logits[None], num_iter=cfg.pamr_steps, dilations=tuple(cfg.pamr_dilations))[0]
    # Without PAMR the resize to out_size happens inside, a few channels at a time (bounded memory).
    if not return_probs and cfg.area_thd is None:  # the mask alone: no (C, H, W) probabilities in memory
        return class_mask(logits, text, cfg.logit_scale, cfg.prob_thd, cfg.background_class, out_size), None
    probs = class_probabilities(logits, text, cfg.logit_scale, out_size)
    del logits
    if cfg.area_thd is not None:
        probs = suppress_small_areas(probs, cfg.area_thd)
    best, mask = probs.max(dim=0)
    if cfg.prob_thd > 0:
        mask[best < cfg.prob_thd] = cfg.background_class
    return mask, (probs if return_probs else None)
