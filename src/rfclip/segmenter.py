"""The Python API: ``Segmenter(...).segment(image, classes) -> Segmentation``."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .dense import DenseCLIP
from .devices import resolve_device
from .errors import RfclipError
from .inference import InferenceConfig, autocast_dtype, dense_logits, load_image, postprocess, preprocess
from .methods import build_method, method_option_names
from .text import ClassSpec, TextClassifier, TextQueries

DEFAULT_METHOD = "rfclip"


@dataclass
class Segmentation:
    """The result for one image, at its original resolution."""

    mask: np.ndarray  # (H, W) int64 class indices into `classes`
    probs: np.ndarray | None  # (C, H, W) float32 class probabilities (max over synonyms); None if not asked for
    classes: list[str]  # display name of each class (its first synonym)
    synonyms: list[list[str]]

    def fractions(self) -> dict[str, float]:
        """Fraction of the image's pixels given to each class."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.classes))
        return {name: float(n) / self.mask.size for name, n in zip(self.classes, counts)}


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
    """

    def __init__(self, model="ViT-B-16", pretrained: str | None = "openai", method: str = DEFAULT_METHOD,
                 plugins: Sequence[str] = (), checkpoint: str | os.PathLike | None = None, device=None,
                 templates: Sequence[str] | None = None, text_cache=None, quick_gelu: bool | None = None, **options):
        self.device = resolve_device(device)
        method_names = method_option_names(method, plugins)
        config_names = InferenceConfig.field_names()
        unknown = sorted(set(options) - method_names - config_names)
        if unknown:
            raise RfclipError(
                f"unknown option(s) {', '.join(unknown)}; method '{method}' takes: {', '.join(sorted(method_names)) or 'none'}; "
                f"inference takes: {', '.join(sorted(config_names))}"
            )
        self.config = InferenceConfig(**{k: v for k, v in options.items() if k in config_names})
        self.amp_dtype = autocast_dtype(self.device, self.config.precision)
        self.method = build_method(method, plugins, **{k: v for k, v in options.items() if k in method_names})
        self.method_name = method if not plugins else "+".join([method, *plugins])

        if isinstance(model, str):
            from .models.loading import load_clip

            self.clip = load_clip(model, pretrained, checkpoint=checkpoint, device=self.device, quick_gelu=quick_gelu)
        else:
            self.clip = model
            self.clip.model.to(self.device)
        self.encoder = DenseCLIP(self.clip.model.visual).to(self.device)
        self._compiled: dict = {}  # the torch.compile'd encoder, shared with with_config copies
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
        clone.config = replace(self.config, **changes)
        clone.amp_dtype = autocast_dtype(self.device, clone.config.precision)
        return clone

    def forward_encoder(self):
        """The encoder that runs the crops: :attr:`encoder`, or its ``torch.compile`` version with ``compile=True``
        (compiled once, on first use; the method's hooks are traced with it)."""
        if not self.config.compile:
            return self.encoder
        if "encoder" not in self._compiled:
            self._compiled["encoder"] = torch.compile(self.encoder)
        return self._compiled["encoder"]

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], text: TextQueries, return_probs: bool = True):
        """Segment uint8 RGB arrays with an embedded vocabulary; crops of all images share forwards.

        Returns a list of ``(mask, probs)`` torch tensors at each image's original size.
        """
        cfg = self.config
        inputs = [preprocess(img, cfg.short_side, self.device) for img in images]
        logits = dense_logits(self.forward_encoder(), self.method, inputs, text, cfg.slide_crop, cfg.slide_stride,
                              cfg.batch_size, self.amp_dtype)
        results = []
        for i, img in enumerate(images):
            lg, logits[i] = logits[i], None  # free each image's logits once it is done (large images)
            results.append(postprocess(lg, text, cfg, img.shape[:2], guide=inputs[i], return_probs=return_probs))
            inputs[i] = None
        return results

    def segment(self, image, classes: str | Sequence[ClassSpec] | TextQueries,
                return_probs: bool = True) -> Segmentation:
        """Segment one image (path, PIL image or H x W x 3 uint8 array) into ``classes``."""
        return self.segment_batch([image], classes, return_probs=return_probs)[0]

    def segment_batch(self, images: Sequence, classes: str | Sequence[ClassSpec] | TextQueries,
                      return_probs: bool = True) -> list[Segmentation]:
        """Segment several images with one vocabulary; their crops are batched together."""
        text = classes if isinstance(classes, TextQueries) else self.encode_classes(classes)
        arrays = [load_image(im) for im in images]
        out = []
        for (mask, probs) in self.predict(arrays, text, return_probs=return_probs):
            out.append(Segmentation(
                mask=mask.cpu().numpy().astype(np.int64),
                probs=probs.cpu().numpy() if probs is not None else None,
                classes=list(text.class_names),
                synonyms=[list(s) for s in text.synonyms],
            ))
        return out

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.clip.name!r}, source={self.clip.source!r}, method={self.method_name!r}, "
                f"device={str(self.device)!r})")
