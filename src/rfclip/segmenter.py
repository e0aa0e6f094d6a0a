"""The Python API: ``Segmenter(...).segment(image, classes) -> Segmentation``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .dense import DenseCLIP
from .devices import resolve_device
from .errors import RfclipError
from .inference import (InferenceConfig, autocast_dtype, check_pixel_stats, crops_per_forward, dense_logits,
                        pad_to_patch, padding_multiple, postprocess, preprocess, read_image)
from .methods import build_method, method_option_names
from .methods.regions import resize_nearest
from .text import ClassSpec, TextClassifier, TextQueries, parse_classes

DEFAULT_METHOD = "rfclip"


def method_precision(precision: str, method) -> str:
    """``precision="auto"`` means the method's own default where it has one (``rfclip_release``: fp32)."""
    default = getattr(method, "default_precision", None)
    return default if default and str(precision).lower() == "auto" else precision


@dataclass
class Segmentation:
    """The result for one image, at its original resolution."""

    mask: np.ndarray  # (H, W) int64 class indices into `classes`
    probs: np.ndarray | None  # (C, H, W) float32 class probabilities (max over synonyms); None if not asked for
    classes: list[str]  # display name of each class (its first synonym)
    synonyms: list[list[str]]
    input_conversion: str | None = None  # how a non-8-bit input was scaled to 0..255 (see inference.read_image)
    meta: dict | None = field(default=None, repr=False, compare=False)  # how it was made (outputs.describe_run)

    def fractions(self) -> dict[str, float]:
        """Fraction of the image's pixels given to each class."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.classes))
        return {name: float(n) / self.mask.size for name, n in zip(self.classes, counts)}

    def __repr__(self) -> str:
        height, width = self.mask.shape
        top = sorted(self.fractions().items(), key=lambda kv: -kv[1])[:3]
        shown = ", ".join(f"{name} {100 * f:.1f}%" for name, f in top if f > 0)
        more = f", +{len(self.classes) - len(top)} more" if len(self.classes) > len(top) else ""
        return (f"Segmentation({width}x{height}, {len(self.classes)} classes: {shown}{more}"
                f"{', probs' if self.probs is not None else ''})")

    # -------------------------------------------------------------------------------------- other formats
    def to_coco_rle(self) -> list[dict]:
        """Per class present, COCO compressed RLE with label, fraction, area and box (needs ``pycocotools``;
        see :func:`rfclip.formats.coco_rle`)."""
        from .formats import coco_rle

        return coco_rle(self)

    def to_hf(self) -> list[dict]:
        """The ``transformers`` image-segmentation pipeline's output: ``[{"score", "label", "mask"}]``."""
        from .formats import hf_annotations

        return hf_annotations(self)

    def to_detections(self):
        """A ``supervision.Detections`` with one masked detection per class present (needs ``supervision``)."""
        from .formats import detections

        return detections(self)

    def save(self, out: str | os.PathLike, image=None, name: str = "segmentation",
             formats: Sequence[str] | None = None) -> dict[str, Path]:
        """Write what ``rfclip segment`` writes for one image into the folder ``out``: ``NAME_mask.png``,
        ``NAME.json`` and, when the ``image`` (path, PIL image or array) is given, ``NAME_overlay.png``.
        ``formats`` picks among ``png``, ``overlay``, ``json``. Returns the paths written."""
        from .outputs import DEFAULT_FORMATS, FILE_KEYS, output_paths, segmentation_record, write_outputs

        formats = tuple(formats) if formats is not None else tuple(
            f for f in DEFAULT_FORMATS if f != "overlay" or image is not None)
        unknown = [f for f in formats if f not in FILE_KEYS]
        if unknown:
            raise RfclipError(f"unknown format(s) {', '.join(unknown)} for save(); choose from {', '.join(FILE_KEYS)}")
        if "overlay" in formats and image is None:
            raise RfclipError("the overlay needs the image; pass image=... to save()")
        rgb = read_image(image)[0] if image is not None else None
        if rgb is not None and rgb.shape[:2] != self.mask.shape:
            raise RfclipError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but the mask is "
                              f"{self.mask.shape[1]}x{self.mask.shape[0]}; pass the image that was segmented")
        paths = output_paths(Path(out), str(name), formats)
        record = segmentation_record(name, self, None, paths, None, run=dict(self.meta or {}))
        record["input_conversion"] = self.input_conversion
        write_outputs(paths, rgb, self, record, alpha=0.5)
        return paths


def masks_needed_error(method_name: str) -> RfclipError:
    return RfclipError(f"method {method_name} needs region masks; give --masks SPEC (e.g. --masks npz:DIR) on the "
                       "command line, or masks= (a mask source, or a region map per image) in Python")


def check_mask_source(masks):
    """``masks`` as a :class:`rfclip.masks.MaskSource` (anything callable as ``source(image, path)``) or None."""
    if masks is not None and not callable(masks):
        raise RfclipError(f"masks must be a mask source (e.g. rfclip.masks.NpzMasks(DIR)), got {type(masks).__name__}; "
                          "pass region maps per image with segment(image, classes, masks=ARRAY)")
    return masks


def region_maps_for(rgb_images, paths, masks=None, source=None) -> list | None:
    """One int32 (H, W) region map per image: from ``masks`` (arrays, one per image, checked), else from the mask
    ``source`` (``source(image, path)``), else None."""
    from .masks import check_region_map

    if masks is not None:
        masks = [masks] if not isinstance(masks, (list, tuple)) else list(masks)
        if len(masks) != len(rgb_images):
            raise RfclipError(f"{len(masks)} region maps for {len(rgb_images)} images; give one map per image")
        return [check_region_map(m, rgb.shape[:2], name=f"region map of image {i}")
                for i, (m, rgb) in enumerate(zip(masks, rgb_images))]
    if source is not None:
        return [check_region_map(source(rgb, path), rgb.shape[:2]) for rgb, path in zip(rgb_images, paths)]
    return None


def _checked(cfg: InferenceConfig) -> InferenceConfig:
    """``cfg`` with the normalisation as float tuples; bad pixel statistics or crop padding are user errors."""
    check_pixel_stats(cfg.pixel_mean, cfg.pixel_std)
    padding_multiple(cfg.pad_crops_to, 16)
    return replace(cfg, pixel_mean=tuple(float(v) for v in cfg.pixel_mean),
                   pixel_std=tuple(float(v) for v in cfg.pixel_std))


def _split_options(method: str, plugins: Sequence[str], options: dict) -> tuple[dict, dict]:
    """Keyword options -> (method options, inference settings); a name neither takes is an error listing both."""
    method_names = method_option_names(method, plugins)
    config_names = InferenceConfig.field_names()
    unknown = sorted(set(options) - method_names - config_names)
    if unknown:
        raise RfclipError(
            f"unknown option(s) {', '.join(unknown)}; method '{method}' takes: {', '.join(sorted(method_names)) or 'none'}; "
            f"inference takes: {', '.join(sorted(config_names))}"
        )
    return ({k: v for k, v in options.items() if k in method_names},
            {k: v for k, v in options.items() if k in config_names})


class Segmenter:
    """Training-free open-vocabulary segmentation with a CLIP ViT.

    >>> seg = Segmenter("ViT-B-16", "openai", method="rfclip")
    >>> out = seg.segment("street.jpg", "road;car;tree;sky")
    >>> out.mask.shape, out.classes

    ``model`` is an open_clip model name (with ``pretrained`` tag) or an already loaded
    :class:`rfclip.models.ClipModel`; ``checkpoint`` loads local weights instead (OpenAI ``.pt``, open_clip,
    ``.safetensors``, Hugging Face folder); ``quick_gelu`` forces the activation (default: decided by where the
    weights come from; OpenAI weights use QuickGELU). ``method`` is a registered method name, optionally with plugins
    (``"naclip+fsa"``). Keyword ``options`` go to :class:`rfclip.inference.InferenceConfig` (``slide_crop``,
    ``pamr``, ``prob_thd``, ...) or to the method (e.g. RF-CLIP's ``beta``); unknown names are an error.
    ``masks``: a :class:`rfclip.masks.MaskSource` giving each image's region map, for methods that need region
    masks (``corrclip``, ``+masks``); ``segment(..., masks=ARRAY)`` gives one image's map directly.
    """

    def __init__(self, model="ViT-B-16", pretrained: str | None = "openai", method: str = DEFAULT_METHOD,
                 plugins: Sequence[str] = (), checkpoint: str | os.PathLike | None = None, device=None,
                 templates: Sequence[str] | None = None, text_cache=None, quick_gelu: bool | None = None,
                 masks=None, **options):
        self.device = resolve_device(device)
        self.masks = check_mask_source(masks)  # where region maps come from (mask-tier methods), or None
        method_options, config_options = _split_options(method, plugins, options)
        self.config = _checked(InferenceConfig(**config_options))
        self.method_options = method_options  # as given (not the defaults): preset method options never override them
        self._method_spec = (method, tuple(plugins))
        self.method = build_method(method, plugins, **method_options)
        self.amp_dtype = autocast_dtype(self.device, method_precision(self.config.precision, self.method))
        self.method_name = method if not plugins else "+".join([method, *plugins])
        self.checkpoint = checkpoint  # local weights loaded (recorded in the outputs), or None

        if isinstance(model, (str, os.PathLike)):
            from .models.loading import load_clip

            self.clip = load_clip(model, pretrained, checkpoint=checkpoint, device=self.device, quick_gelu=quick_gelu)
        else:
            self.clip = model
            self.clip.model.to(self.device)
        self.encoder = DenseCLIP(self.clip.model.visual).to(self.device)
        self._check_config(self.config)
        self._compiled: dict = {}  # the torch.compile'd encoder, shared with with_config copies
        self.check_in: Callable[[], None] | None = None  # called between forward chunks; raises to stop (demo)
        self.method.prepare(self.clip)
        self.text = TextClassifier(self.clip, templates=templates, device=self.device, cache_dir=text_cache)

    # --------------------------------------------------------------------------------------------------
    def encode_classes(self, classes: str | Sequence[ClassSpec]) -> TextQueries:
        """Embed a vocabulary once, to reuse over many images."""
        return self.text.encode(classes)

    def with_config(self, **changes) -> "Segmenter":
        """A shallow copy with other inference settings (shares the model and the text cache)."""
        clone = object.__new__(Segmenter)
        clone.__dict__.update(self.__dict__)
        clone.config = _checked(replace(self.config, **changes))
        self._check_config(clone.config)
        clone.amp_dtype = autocast_dtype(self.device, method_precision(clone.config.precision, clone.method))
        return clone

    def with_method_defaults(self, **options) -> "Segmenter":
        """A shallow copy whose method is rebuilt with ``options`` under the options given at construction (which
        win), e.g. a settings preset's per-dataset method options. Options the method does not take are an error."""
        method, plugins = self._method_spec
        unknown = sorted(set(options) - method_option_names(method, plugins))
        if unknown:
            raise RfclipError(f"method '{self.method_name}' does not take option(s) {', '.join(unknown)}")
        merged = {**options, **self.method_options}
        clone = object.__new__(Segmenter)
        clone.__dict__.update(self.__dict__)
        clone.method = build_method(method, plugins, **merged)
        clone.method.prepare(self.clip)
        clone.amp_dtype = autocast_dtype(self.device, method_precision(clone.config.precision, clone.method))
        return clone

    def with_method(self, method: str, plugins: Sequence[str] = (), **options) -> "Segmenter":
        """A copy that runs another method on the same loaded model, encoder and text cache (no reload).

        ``options`` are the new method's options and inference settings that change (as for the constructor);
        inference settings not given stay as they are here.
        """
        method_options, config_options = _split_options(method, plugins, options)
        built = build_method(method, plugins, **method_options)
        built.prepare(self.clip)
        clone = self.with_config(**config_options)
        clone.method = built
        clone.method_name = method if not plugins else "+".join([method, *plugins])
        clone.method_options = method_options
        clone._method_spec = (method, tuple(plugins))
        clone.amp_dtype = autocast_dtype(self.device, method_precision(clone.config.precision, built))
        return clone

    def _check_config(self, cfg: InferenceConfig) -> None:
        """Settings that depend on the model: a sliding-window crop must hold at least one patch."""
        patch = max(self.encoder.patch_size)
        if 0 < cfg.slide_crop < patch:
            raise RfclipError(f"slide_crop {cfg.slide_crop} is smaller than the model's {patch}-pixel patch; use a "
                              f"crop of at least {patch} (default 224), or 0 for the whole image")

    def _check_finite(self, logits: list[torch.Tensor]) -> None:
        """Non-finite scores would silently give every pixel class 0. The checkpoint is blamed only when its weights
        hold NaN/inf; fp16 overflow names the precision; otherwise the settings that produced them are named."""
        if bool(torch.stack([torch.isfinite(lg).all() for lg in logits]).all()):
            return
        model = f"model {getattr(self.clip, 'name', '?')} ({getattr(self.clip, 'source', '?')})"
        if not all(bool(torch.isfinite(p).all()) for p in self.clip.model.parameters()):
            raise RfclipError(f"{model} produced non-finite scores: its weights hold NaN/inf values; check the "
                              "checkpoint (download or copy it again)")
        if self.amp_dtype == torch.float16:
            raise RfclipError(f"{model} produced non-finite scores in fp16 (overflow); run with precision fp32 or bf16")
        defaults = InferenceConfig()
        changed = {f: getattr(self.config, f) for f in ("logit_scale", "pixel_mean", "pixel_std", "pad_crops_to")
                   if getattr(self.config, f) != getattr(defaults, f)}
        given = {**self.method_options, **changed}
        settings = ", ".join(f"{k}={v}" for k, v in given.items()) or "its default options"
        raise RfclipError(f"method {self.method_name} produced non-finite scores on {model}, whose weights are "
                          f"finite; the settings produced them ({settings}): try other values or the defaults")

    def forward_encoder(self):
        """The encoder that runs the crops: :attr:`encoder`, or its ``torch.compile`` version with ``compile=True``
        (compiled once, on first use; the method's hooks are traced with it)."""
        if not self.config.compile:
            return self.encoder
        if "encoder" not in self._compiled:
            self._compiled["encoder"] = torch.compile(self.encoder)
        return self._compiled["encoder"]

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], text: TextQueries, return_probs: bool = True,
                regions: Sequence | None = None):
        """Segment uint8 RGB arrays with an embedded vocabulary; crops of all images share forwards. An image whose
        resized short side is below one patch is padded to one patch (its last row / column repeated).
        ``regions``: one integer region map (H, W) per image at its original size, for methods that need masks
        (nearest-resized with the image, cropped and padded with each window; map correction at the original size).

        Returns a list of ``(mask, probs)`` torch tensors at each image's original size.
        """
        cfg = self.config
        if len(images) == 0:
            return []
        uses_masks = bool(getattr(self.method, "needs_masks", False))
        if uses_masks and regions is None:
            raise masks_needed_error(self.method_name)
        if uses_masks and len(regions) != len(images):
            raise RfclipError(f"{len(regions)} region maps for {len(images)} images; give one map per image")
        if cfg.prob_thd > 0 and cfg.background_class >= text.num_classes:
            raise RfclipError(f"background_class {cfg.background_class} is not one of the {text.num_classes} classes; "
                              f"give an index below {text.num_classes}")
        inputs = [preprocess(img, cfg.short_side, self.device, cfg.pixel_mean, cfg.pixel_std) for img in images]
        padded = [pad_to_patch(x, self.encoder.patch_size) for x in inputs]  # sides below one patch
        originals = resized = None
        if uses_masks:
            originals = [torch.as_tensor(np.asarray(r)).to(self.device, torch.int64) for r in regions]
            resized = [_resize_region_map(r, x.shape[-2:], p.shape[-2:]) for r, x, p in zip(originals, inputs, padded)]
        pad_to = padding_multiple(cfg.pad_crops_to, self.encoder.patch_size[0]) or int(
            getattr(self.method, "crop_multiple", 0))
        logits = dense_logits(self.forward_encoder(), self.method, padded, text, cfg.slide_crop, cfg.slide_stride,
                              crops_per_forward(cfg.batch_size, self.device), self.amp_dtype, pad_to=pad_to,
                              regions=resized, check_in=self.check_in)
        logits = [lg[:, :x.shape[-2], :x.shape[-1]] for lg, x in zip(logits, inputs)]  # padding cut off
        del padded
        self._check_finite(logits)
        results = []
        for i, img in enumerate(images):
            lg, logits[i] = logits[i], None  # free each image's logits once it is done (large images)
            mask, probs = postprocess(lg, text, cfg, img.shape[:2], guide=inputs[i], return_probs=return_probs)
            correct = getattr(self.method, "correct_map", None)
            if originals is not None and correct is not None:  # map correction at the original resolution
                mask = correct(mask, originals[i])
            results.append((mask, probs))
            inputs[i] = None
        return results

    def segment(self, image, classes: str | Sequence[ClassSpec] | TextQueries,
                return_probs: bool = True, masks=None) -> Segmentation:
        """Segment one image (path, PIL image or H x W x 3 array; see :func:`rfclip.inference.read_image` for
        16-bit and float inputs) into ``classes``. ``masks``: the image's integer region map (H, W) (0 = not
        segmented), for methods that need masks; default: from the segmenter's mask source."""
        return self.segment_batch([image], classes, return_probs=return_probs,
                                  masks=None if masks is None else [masks])[0]

    def segment_batch(self, images: Sequence, classes: str | Sequence[ClassSpec] | TextQueries,
                      return_probs: bool = True, masks: Sequence | None = None) -> list[Segmentation]:
        """Segment several images with one vocabulary; their crops are batched together. ``masks``: one region
        map per image (default: from the segmenter's mask source, for methods that need masks). No images: ``[]``."""
        if isinstance(images, (str, os.PathLike)) or not hasattr(images, "__len__"):
            raise RfclipError(f"segment_batch takes a list of images, got {type(images).__name__}; use segment() "
                              "for one image")
        if len(images) == 0:
            if not isinstance(classes, TextQueries):
                parse_classes(classes)  # the class list is checked all the same
            return []
        text = classes if isinstance(classes, TextQueries) else self.encode_classes(classes)
        loaded = [read_image(im) for im in images]
        rgbs = [rgb for rgb, _ in loaded]
        regions = None
        if getattr(self.method, "needs_masks", False) or masks is not None:
            paths = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else None for im in images]
            regions = region_maps_for(rgbs, paths, masks, self.masks)
        out = []
        from .outputs import describe_run

        meta = describe_run(self, self.checkpoint)
        results = self.predict(rgbs, text, return_probs=return_probs, regions=regions)
        for (mask, probs), (_, conversion) in zip(results, loaded):
            out.append(Segmentation(
                mask=mask.cpu().numpy().astype(np.int64),
                probs=probs.cpu().numpy() if probs is not None else None,
                classes=list(text.class_names),
                synonyms=[list(s) for s in text.synonyms],
                input_conversion=conversion,
                meta=meta,
            ))
        return out

    def provenance(self, checkpoint: str | os.PathLike | None = None) -> dict:
        """What a result was made with beyond the settings, for result files: the crops per forward actually used,
        the distraction dims and where they came from (built in, a calibration file, the option), the prompt
        templates, and the SHA-256 of the checkpoint file (a path alone does not say which weights)."""
        from ._io import file_sha256
        from .text import imagenet_templates

        dims = None
        for method in (self.method, getattr(self.method, "base", None)):  # a plug-in wraps its method
            resolved = getattr(method, "resolved_dims", None)
            if resolved is not None and resolved.values is not None:
                dims = {"dims": list(resolved.values), "source": resolved.source}
                break
        templates = list(self.text.templates)
        checkpoint = checkpoint if checkpoint is not None else self.checkpoint
        return {
            "crops_per_forward": crops_per_forward(self.config.batch_size, self.device),
            "distraction_dims": dims,
            "templates": {"set": "imagenet-80 (CLIP)" if templates == imagenet_templates() else "custom",
                          "count": len(templates),
                          "sha256": hashlib.sha256(json.dumps(templates).encode()).hexdigest()},
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
        }

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.clip.name!r}, source={self.clip.source!r}, method={self.method_name!r}, "
                f"device={str(self.device)!r})")


def _resize_region_map(region_map: torch.Tensor, size, padded_size) -> torch.Tensor:
    """A region map at the original size -> the resized image's ``size`` (nearest, as CorrCLIP resizes its masks),
    then extended to ``padded_size`` by repeating its last row / column (as :func:`pad_to_patch` does the image)."""
    out = resize_nearest(region_map, tuple(size))
    if tuple(padded_size) != tuple(size):
        rows = torch.arange(padded_size[0], device=out.device).clamp(max=out.shape[0] - 1)
        cols = torch.arange(padded_size[1], device=out.device).clamp(max=out.shape[1] - 1)
        out = out[rows[:, None], cols[None, :]]
    return out
