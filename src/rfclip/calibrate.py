"""Calibration: find the distraction dimensions of any CLIP ViT the way the paper does.

RF-CLIP needs, for each backbone, the few channels ``D_dis`` of the residual stream in which CLIP over-activates
some tokens. The paper found them (Sec. "How do distraction tokens surface?", Fig. 3 / Fig. 7) as the peaks of
the per-dimension *mean embedding weight*:

* for every patch token ``i`` of an image, average its layer inputs over all layers,
  ``f_i = (1/L) sum_l X^{l-1}[i]`` (the unmodified CLIP forward);
* normalise to channel weights ``w_i[j] = (f_i[j] - min_k f_i[k]) / sum_k (f_i[k] - min f_i)`` (the same
  min-shift normalisation as the distractor test, eq. 6);
* average ``w_i`` over the tokens and the images; the ``topk`` largest channels are ``D_dis``.

:func:`calibrate` does this for any ViT CLIP and writes a small JSON file that RF-CLIP picks up automatically
(``~/.cache/rfclip/distraction_dims/<hash of the model identity>.json``; ``$RFCLIP_CACHE`` or
``$XDG_CACHE_HOME/rfclip`` move the cache). The lookup itself (built-in lists, files, cache) is
:mod:`rfclip.distraction_dims`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._io import check_writable_file, file_problem
from .constants import CLIP_MEAN, CLIP_STD, LONG_SIDE_CAP, RF_CALIBRATE_TOPK
from .dense import DenseCLIP, Hooks
from .devices import resolve_device
from .distraction_dims import FILE_FORMAT, dims_file_for, model_identity, write_json_atomic
from .errors import ImageError, RfclipError
from .inference import autocast_dtype, load_image
from .methods.refocus import channel_weights

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")  # as segment
# rfclip's own rule, not the paper's: on natural images the distraction dims stand far above the other channels
# (OpenAI ViT-B/16: several times the median); weaker peaks mean too few or unnatural images.
WEAK_PEAK_RATIO = 2.0  # the weakest kept dim's mean weight over the median dim's
ENOUGH_IMAGES = 100  # natural images to calibrate on (the paper's three datasets gave the same peaks)


# ------------------------------------------------------------------------------------------ embedding weights
def embedding_weights(x: Tensor, norm: str = "minshift") -> Tensor:
    """Channel weights of token embeddings ``x`` (..., C) -> (..., C) fp32 (eq. 6's normalisation,
    :func:`rfclip.methods.refocus.channel_weights`); each row sums to 1 except with ``raw``."""
    return channel_weights(x, norm)


# ------------------------------------------------------------------------------------------ calibration
@dataclass
class CalibrationResult:
    """What :func:`calibrate` found."""

    dims: tuple[int, ...]  # the top-k channels, sorted
    mean_weight: np.ndarray  # (C,) per-dimension mean embedding weight (Fig. 3 (a))
    num_images: int
    num_tokens: int
    path: Path | None  # the JSON written (None when save=False)
    ranked: list[int] = field(default_factory=list)  # all channels, largest mean weight first (top 32)
    skipped: list[str] = field(default_factory=list)  # one line per image that could not be read (skipped)

    @property
    def weakest_peak(self) -> float:
        """The weakest kept dim's mean weight over the median dim's."""
        return float(min(self.mean_weight[d] for d in self.dims) / np.median(self.mean_weight))

    def warning(self) -> str | None:
        """A line when the peaks are too weak to trust (too few or unnatural images), else None."""
        if self.weakest_peak >= WEAK_PEAK_RATIO:
            return None
        return (f"the peaks are weak: the weakest of the {len(self.dims)} dims is {self.weakest_peak:.1f}x the median "
                f"dimension (real distraction dims stand out far more), from {self.num_images} image"
                f"{'s' if self.num_images != 1 else ''}; calibrate on {ENOUGH_IMAGES} or more natural photos "
                "(scenes with objects, as in VOC, COCO or ADE20K), not drawings or synthetic images")

    def summary(self) -> str:
        w = self.mean_weight
        med = float(np.median(w))
        peaks = ", ".join(f"{d} ({w[d] / med:.1f}x median)" for d in self.dims)
        where = f"; saved to {self.path}" if self.path is not None else ""
        skipped = f" ({len(self.skipped)} unreadable skipped)" if self.skipped else ""
        return f"distraction dims from {self.num_images} images{skipped}: {peaks}{where}"


def list_images(images, recursive: bool = True) -> list:
    """A folder (searched recursively), one file, or a sequence of paths / arrays / PIL images -> a list."""
    if isinstance(images, (str, os.PathLike)):
        root = Path(images).expanduser()
        problem = file_problem(root)
        if problem is None:
            return [root]
        if not root.is_dir():
            what = f"images not found: {root}" if problem == "not found" else f"images {root}: {problem}"
            raise RfclipError(f"{what}; give a folder of images or an image file")
        walker = root.rglob("*") if recursive else root.glob("*")
        files = sorted(p for p in walker if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))  # hidden, ._*
        if not files:
            raise RfclipError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
        return files
    items = list(images)
    if not items:
        raise RfclipError("no images given for calibration")
    return items


def check_image_size(image_size, patch: int) -> None:
    """The square crop side: at least one patch, at most :data:`LONG_SIDE_CAP` (a larger side only costs memory:
    100000 px would ask for tens of GB). A one-line :class:`RfclipError`."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or not patch <= image_size <= LONG_SIDE_CAP:
        raise RfclipError(f"image_size must be a whole number from the model's patch size {patch} to "
                          f"{LONG_SIDE_CAP} px, got {image_size!r}; omit it for the model's native input size")


def _square_crop(image: np.ndarray, size: int, device) -> Tensor:
    """Resize the short side to ``size`` (bilinear), centre-crop ``size`` x ``size``, CLIP-normalise. (3, s, s)."""
    x = torch.from_numpy(image).to(device).permute(2, 0, 1).float()[None]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, int(h * scale + 0.5)), max(size, int(w * scale + 0.5))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean) / std)[0]


class _InputProfile(Hooks):
    """Vanilla CLIP that keeps each patch token's layer inputs summed (the unmodified residual stream)."""

    def begin(self, ctx):
        ctx.store["sum"] = None

    def layer_input(self, ctx, layer, x):
        f = x[:, 1:].float()
        ctx.store["sum"] = f if ctx.store["sum"] is None else ctx.store["sum"] + f
        if layer == ctx.num_layers - 1:
            self.last = ctx.store["sum"] / ctx.num_layers  # (B, N, C) layer-averaged input per token
        return x


def token_profiles(encoder, images: Tensor) -> Tensor:
    """Layer-averaged input embeddings ``f_i`` (B, N, C) fp32 of the patch tokens of ``images`` (unmodified CLIP)."""
    method = _InputProfile()
    encoder(images, method)
    return method.last


def calibrate(model, images, topk: int = RF_CALIBRATE_TOPK, *, pretrained: str | None = "openai", checkpoint=None,
              device=None, image_size: int | None = None, batch_size: int = 16, max_images: int | None = None,
              norm: str = "minshift", out_file: str | os.PathLike | None = None, save: bool = True,
              cache_dir: str | os.PathLike | None = None, precision: str = "auto",
              progress: Callable[[int, int], None] | None = None,
              on_skip: Callable[[str], None] | None = None) -> CalibrationResult:
    """Find a backbone's distraction dimensions the way the paper does and save them for RF-CLIP.

    Args:
        model: a loaded :class:`rfclip.models.ClipModel`, a :class:`rfclip.Segmenter` (its model is used), or an
            open_clip model name (loaded with ``pretrained`` / ``checkpoint``).
        images: a folder of images (searched recursively), one image file, or a sequence of paths / uint8 arrays.
            A few hundred natural images are plenty; the paper's three datasets gave the same peaks.
        topk: number of dimensions to keep (8 for both of the paper's backbones).
        image_size: square crop side (short side resized, centre crop); default the model's native input size.
        batch_size: images per forward. ``max_images``: use at most this many (the first ones, sorted by path).
        norm: channel-weight normalisation (``minshift`` as in eq. 6; ``abs``; ``raw``).
        out_file: where to write the JSON; default :func:`dims_file_for` (where RF-CLIP looks).
        save: write the file at all. ``cache_dir``: another folder for the default file name.
        precision: ``auto`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
        progress: called as ``progress(done, total)`` after every batch.
        on_skip: called with a one-line reason for each image that cannot be read; it is skipped (default: logged
            as a warning). No readable image at all is an error.

    Returns:
        :class:`CalibrationResult` with the dims (sorted), the per-dimension mean weight and the file written.
    """
    if topk < 1:
        raise RfclipError(f"topk must be at least 1, got {topk}")
    if hasattr(model, "encoder") and hasattr(model, "clip"):  # a Segmenter
        clip, encoder, dev = model.clip, model.encoder, model.device
    else:
        dev = resolve_device(device)
        if isinstance(model, str):
            from .models.loading import load_clip

            clip = load_clip(model, pretrained, checkpoint=checkpoint, device=dev)
        else:
            clip = model
            clip.model.to(dev)
        encoder = DenseCLIP(clip.model.visual).to(dev)
    if topk > encoder.width:
        raise RfclipError(f"topk={topk} is larger than the residual width {encoder.width}")
    if image_size is None:
        image_size = encoder.native_grid[0] * encoder.patch_size[0]
    check_image_size(image_size, max(encoder.patch_size))
    amp = autocast_dtype(dev, precision)
    path = None
    if save:  # checked now, not after the whole computation
        path = Path(out_file).expanduser() if out_file is not None else dims_file_for(clip, cache_dir)
        check_writable_file(path, "choose another --out (out_file)")
    items = list_images(images)
    if max_images is not None:
        items = items[: max(1, int(max_images))]
    total = torch.zeros(encoder.width, dtype=torch.float64, device=dev)
    skipped: list[str] = []
    count = 0
    done = 0
    batch_size = max(1, batch_size)
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            crops = []
            for im in chunk:
                try:
                    crops.append(_square_crop(load_image(im), image_size, dev))
                except ImageError as err:  # one bad file never costs the others, as in `rfclip segment`
                    skipped.append(str(err))
                    (on_skip or log.warning)(str(err) + " (skipped)")
            done += len(chunk)
            if not crops:
                continue
            batch = torch.stack(crops)
            ctx = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
            with ctx:
                prof = token_profiles(encoder, batch)  # (B, N, C)
            w = embedding_weights(prof, norm)  # (B, N, C)
            total += w.sum(dim=(0, 1)).double()
            count += w.shape[0] * w.shape[1]
            if progress is not None:
                progress(done, len(items))
    if count == 0:
        raise RfclipError(f"none of the {len(items)} images could be read (the first: {skipped[0]}); give readable "
                          "images")
    num_images = len(items) - len(skipped)
    mean_weight = (total / max(count, 1)).float().cpu().numpy()
    order = np.argsort(-mean_weight, kind="stable")
    dims = tuple(sorted(int(d) for d in order[:topk]))
    if save:
        write_json_atomic(path, {
            "format": FILE_FORMAT,
            "model": getattr(clip, "name", None),
            "pretrained": getattr(clip, "pretrained", None),
            "source": getattr(clip, "source", None),
            "identity": model_identity(clip),
            "dims": list(dims),
            "topk": int(topk),
            "norm": norm,
            "num_images": num_images,
            "num_tokens": int(count),
            "image_size": int(image_size),
            "mean_weight": [round(float(v), 8) for v in mean_weight],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
    return CalibrationResult(dims=dims, mean_weight=mean_weight, num_images=num_images, num_tokens=int(count),
                             path=path, ranked=[int(d) for d in order[:32]], skipped=skipped)
