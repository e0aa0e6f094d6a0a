"""The web demo's engine: one loaded model that serves Segment, Compare and Look inside.

No web framework here (the page is :mod:`rfclip.demo.app`): everything takes plain values (an uploaded file's
path, the class text, the page's settings) and returns pictures, numbers and files, so it is tested without a
browser. The model loads once; every method runs on it through :meth:`rfclip.Segmenter.with_method` (a method
switch reloads nothing, and the text embeddings are cached across methods); one lock serialises the requests.
Every problem the user can fix is an :class:`rfclip.errors.RfclipError` in the words the CLI uses.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import RfclipError
from ..methods.base import spec_needs_masks

MAX_MEGAPIXELS = 40.0  # default upload limit (a 48 MP phone photo is over it; segment those with the CLI)
PROBS_BUDGET = 1 << 27  # elements of (C, H, W) probabilities kept for the pixel read-out (512 MB in fp32)
KEEP_REQUESTS = 32  # request folders (downloads) kept on disk; older ones are deleted

# The ready vocabularies: page label -> dataset name (rfclip.data); the class names are the benchmarks' files.
VOCABULARIES = {
    "PASCAL VOC (20 classes)": "voc20",
    "PASCAL VOC + background (21)": "voc21",
    "PASCAL Context (59)": "context59",
    "PASCAL Context + background (60)": "context60",
    "COCO-Object + background (81)": "coco_object",
    "COCO-Stuff (171)": "coco_stuff",
    "ADE20K (150)": "ade20k",
    "Cityscapes (19)": "cityscapes",
}

Progress = Callable[[float, str], None]


@dataclass
class Limits:
    """What one request may cost, so that no request holds the only worker for long. The defaults are served by a
    2-core CPU in about a minute (ViT-B/16: about 6 crops of 224 px per second); the operator raises them with
    ``rfclip demo --max-crops N`` and the like. A request over a limit is refused with a message naming it."""

    max_crops: int = 400  # forward crops of the model's input size per request (a whole-image forward: by area)
    max_short_side: int = 1024  # px, the resized short side (0 keeps the image's own)
    max_pamr_steps: int = 30
    max_classes: int = 200  # COCO-Stuff's 171 fit
    max_prompts: int = 400  # class names with their synonyms (each is embedded with 80 templates)
    request_seconds: float = 300.0  # computing time per request; a request past it stops

    def __post_init__(self):
        for name in ("max_crops", "max_short_side", "max_pamr_steps", "max_classes", "max_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RfclipError(f"{name} must be a whole number >= 1, got {value!r}")
        if not self.request_seconds > 0:
            raise RfclipError(f"request_seconds must be above 0, got {self.request_seconds!r}")


class RequestStopped(RfclipError):
    """A request that stopped because its client cancelled or disconnected (nobody reads the answer)."""


def crop_cost(height: int, width: int, crop: int, stride: int, native: int) -> int:
    """Forwards of a ``height`` x ``width`` input cut into ``crop`` windows at ``stride``, counted in crops of the
    model's ``native`` input side (a larger window counts by its area). Arithmetic only: a stride of 1 on a large
    image is counted, not listed."""
    if crop <= 0 or (crop >= height and crop >= width):
        return max(1, math.ceil(height * width / native**2))
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    return rows * cols * max(1, math.ceil(min(crop, height) * min(crop, width) / native**2))


def _no_progress(fraction: float, text: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------- choices
def method_choices(with_masks: bool = False) -> list[str]:
    """Every registered method, then each with every plug-in that can wrap it (``naclip+fsa``); the methods that
    need region masks (``corrclip``, ``+masks``) only ``with_masks`` (a mask source is given)."""
    from ..methods import method_specs

    return [s for s in method_specs() if with_masks or not spec_needs_masks(s)]


def inside_choices() -> list[str]:
    """The methods whose diagnostics Look inside can draw: RF-CLIP and its presets."""
    from ..methods import METHODS
    from ..methods.rfclip import RFCLIP

    return sorted(n for n, cls in METHODS.items() if issubclass(cls, RFCLIP))


def all_method_options() -> set[str]:
    """Every option name some registered method or plug-in takes."""
    from ..methods import METHODS, PLUGINS, method_option_names

    names: set[str] = set()
    for m in METHODS:
        names |= method_option_names(m, list(PLUGINS))
    return names


def method_description(spec: str) -> str:
    from ..methods import METHODS, PLUGINS, parse_method_spec

    base, plugins = parse_method_spec(spec)
    text = getattr(METHODS.get(base), "description", "")
    if plugins:
        text += " + " + ", ".join(f"{p} plug-in" for p in plugins if p in PLUGINS)
    return text


def vocabulary_text(label: str) -> str:
    """A ready vocabulary as class text: classes separated by "; ", synonyms by ", "."""
    from ..data import load_classnames

    if label not in VOCABULARIES:
        raise RfclipError(f"unknown vocabulary '{label}'; choose one of: {', '.join(VOCABULARIES)}")
    return "; ".join(", ".join(names) for names in load_classnames(VOCABULARIES[label]))


# ---------------------------------------------------------------------------------------------- inputs
def read_image(path: str | os.PathLike | None, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """An uploaded file -> H x W x 3 uint8. Errors name the file as the user knows it (the upload's file name, not
    the server's temporary path); the size is checked from the header before the pixels are decoded."""
    from ..inference import load_image

    if not path:
        raise RfclipError("no image; upload an image (JPEG, PNG, WebP, ...) or pick an example")
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        raise RfclipError(f"image {name} is too large to open safely (over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP); "
                          f"the demo takes images up to {max_megapixels:g} MP: downscale it") from None
    except Exception:  # not an image: load_image below says so in the CLI's words
        width = height = 0
    if width * height > max_megapixels * 1e6:
        raise RfclipError(f"image {name} is {width}x{height} pixels ({width * height / 1e6:.3g} MP); the demo takes "
                          f"images up to {max_megapixels:g} MP: downscale it, or segment it with `rfclip segment`")
    try:
        return load_image(path)
    except RfclipError as err:
        raise RfclipError(str(err).replace(path, name)) from None


def parse_option_text(text: str | None) -> dict:
    """The page's "method options" field, ``"beta=0.6 distraction_dims=4,162"`` (items separated by spaces or
    ``;``), as ``--option`` items."""
    from ..methods.options import parse_options

    items = (text or "").replace(";", " ").split()
    return parse_options(items)


@dataclass
class Settings:
    """The page's inference knobs; ``None`` keeps the server's setting (the CLI flags, else the library default)."""

    short_side: int | None = None
    slide_crop: int | None = None
    slide_stride: int | None = None
    prob_thd: float | None = None
    pamr: bool | None = None
    options: str = ""  # method options, "KEY=VALUE ..."

    def config(self) -> dict:
        out = {}
        for name in ("short_side", "slide_crop", "slide_stride", "prob_thd"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 0 or (name == "slide_stride" and value == 0):
                what = "a positive number" if name == "slide_stride" else "0 or more"
                raise RfclipError(f"{name.replace('_', ' ')} must be {what}, got {value:g}")
            out[name] = float(value) if name == "prob_thd" else int(value)
        if self.pamr is not None:
            out["pamr"] = bool(self.pamr)
        return out


def parse_layers_text(text: str | None, num_layers: int):
    """The page's "layers to draw" field -> sorted 0-based layers (one-line errors as ``explain --layers``)."""
    from ..methods.options import parse_layers

    return sorted(parse_layers(text, num_layers, name="layers"))


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PixelReader:
    """What a click on a result picture reads: the class of a pixel and its probability."""

    mask: np.ndarray  # (H, W) class indices
    best: np.ndarray | None  # (H, W) float16 probability of the pixel's class; None when not kept (too large)
    classes: list[str]

    def read(self, x: int, y: int) -> str:
        h, w = self.mask.shape
        if not (0 <= x < w and 0 <= y < h):
            return f"Pixel ({x}, {y}) is outside the {w} x {h} image."
        name = self.classes[int(self.mask[y, x])]
        if self.best is None:
            return f"Pixel ({x}, {y}): **{name}**"
        return f"Pixel ({x}, {y}): **{name}**, probability {float(self.best[y, x]):.2f}"


@dataclass
class SegmentResult:
    picture: Image.Image  # the image with the class colours (no legend: the page draws it, with the fractions)
    overlay: Path  # the overlay PNG with its legend, as `rfclip segment` writes it
    files: list[Path]  # mask PNG, JSON, overlay
    classes: list[str]
    fractions: list[float]
    colours: np.ndarray  # (C, 3) uint8, the overlay's colours
    reader: PixelReader
    method: str
    seconds: float
    regions: Image.Image | None = None  # the image with the mask source's regions (show_regions, demo --masks)


@dataclass
class CompareResult:
    overlays: tuple[Image.Image, Image.Image]  # the image with each method's class colours (same colours)
    disagreement: Image.Image  # the image with the pixels where the two masks differ in magenta
    methods: tuple[str, str]
    classes: list[str]
    fractions: tuple[list[float], list[float]]
    colours: np.ndarray
    agreement: float  # fraction of pixels with the same class
    seconds: tuple[float, float]


@dataclass
class InsideResult:
    clicked: Image.Image  # the input image with the clicked point marked
    figures: dict[str, Image.Image]  # rfclip.explain's pictures (attention, tokens, phi, fiedler, ...)
    summary: dict
    method: str
    seconds: float


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class ModelInfo:
    """How the model was given (for the page's header and the JSON's "model" entry)."""

    model: str
    pretrained: str | None
    checkpoint: str | None = None
    device: str = ""

    def label(self) -> str:
        src = f"checkpoint {os.path.basename(self.checkpoint)}" if self.checkpoint else f"pretrained '{self.pretrained}'"
        return f"{self.model} ({src})"


@dataclass
class DemoEngine:
    """One loaded model serving the demo's three views.

    ``base`` is a :class:`rfclip.Segmenter` (any method; the model, encoder, text cache and inference settings are
    what count), or ``None`` with ``unavailable`` saying why (e.g. weights missing offline): then every request is
    that error, and the page shows it.
    """

    base: object | None
    info: ModelInfo
    unavailable: str | None = None
    max_megapixels: float = MAX_MEGAPIXELS
    out_root: Path | None = None
    limits: Limits = field(default_factory=Limits)
    masks: object | None = None  # a rfclip.masks.MaskSource (demo --masks): offers the methods that need masks

    def __post_init__(self):
        self._lock = threading.Lock()
        self._segmenters: OrderedDict = OrderedDict()
        self._requests: list[Path] = []
        if self.out_root is None:
            self.out_root = Path(tempfile.mkdtemp(prefix="rfclip-demo-"))

    # ------------------------------------------------------------------ segmenters
    def _check_ready(self) -> None:
        if self.base is None:
            raise RfclipError(self.unavailable or "no model loaded; start the demo with --checkpoint FILE")

    @staticmethod
    def options_for(spec: str, settings: Settings) -> dict:
        """The page's method options that ``spec`` takes. The options are shared by every method of the page (one
        field for all, as Compare runs two), so a method ignores the ones it does not take; a name that no method
        takes is an error (a typo)."""
        from ..methods import method_option_names

        given = parse_option_text(settings.options)
        unknown = sorted(set(given) - all_method_options())
        if unknown:
            raise RfclipError(f"unknown method option(s) {', '.join(unknown)}; the methods take: "
                              f"{', '.join(sorted(all_method_options()))}")
        names = method_option_names(spec)
        return {k: v for k, v in given.items() if k in names}

    def segmenter(self, spec: str, settings: Settings):
        """The segmenter for a method spec (built once per spec and options, on the loaded model), with the page's
        inference settings."""
        from ..methods import parse_method_spec

        self._check_ready()
        base, plugins = parse_method_spec(spec)
        options = self.options_for(spec, settings)
        key = (spec, repr(sorted(options.items())))
        seg = self._segmenters.get(key)
        if seg is None:
            seg = self.base.with_method(base, plugins, **options)
            self._segmenters[key] = seg
            while len(self._segmenters) > 16:
                self._segmenters.popitem(last=False)
        self._segmenters.move_to_end(key)
        return seg.with_config(**settings.config())

    def _configured(self, settings: Settings):
        """The loaded model with the page's inference settings (for the limit checks; touches no shared cache)."""
        return self.base.with_config(**settings.config())

    def _request_dir(self) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self.out_root, prefix="req-"))
        self._requests.append(folder)
        while len(self._requests) > KEEP_REQUESTS:
            shutil.rmtree(self._requests.pop(0), ignore_errors=True)
        return folder

    @staticmethod
    def _classes(text: str | None):
        from ..text import parse_classes

        return parse_classes(text or "")

    # ------------------------------------------------------------------ distraction dims
    @staticmethod
    def methods_needing_dims() -> list[str]:
        """The registered methods that need the model's distraction dims (RF-CLIP and its presets)."""
        from ..methods import METHODS

        needing = []
        for name, cls in METHODS.items():
            try:
                method = cls()
            except Exception:  # noqa: BLE001 - a method that cannot be built with defaults is not one of them
                continue
            if getattr(method, "resolved_dims", None) is not None and getattr(method, "detects", True):
                needing.append(name)
        return sorted(needing)

    def dims_problem(self, settings: Settings | None = None) -> str | None:
        """Why RF-CLIP cannot run on the loaded weights (no built-in, calibrated or given distraction dims), or
        None. Asked when the page is built, so that the page says so when it opens."""
        from ..distraction_dims import resolve_distraction_dims

        if self.base is None:
            return None
        given = parse_option_text(settings.options) if settings is not None else {}
        try:
            resolve_distraction_dims(self.base.clip, given.get("distraction_dims"), given.get("dims_file"),
                                     width=self.base.encoder.width)
        except RfclipError as err:
            return str(err)
        return None

    # ------------------------------------------------------------------ limits
    def check_limits(self, seg_er, image: np.ndarray, vocabulary=None, forwards: int = 1, whole: bool = False) -> None:
        """Refuse a request over :attr:`limits` before any work, naming the limit and its flag. ``forwards``: how
        many times the image runs (Compare: 2); ``whole``: one whole-image forward (Look inside)."""
        from ..inference import rescale_size

        lim, cfg = self.limits, seg_er.config
        if vocabulary is not None:
            prompts = sum(len(names) for names in vocabulary)
            if len(vocabulary) > lim.max_classes:
                raise RfclipError(f"{len(vocabulary)} classes is over this demo's limit of {lim.max_classes} per "
                                  "request (--max-classes); give fewer classes")
            if prompts > lim.max_prompts:
                raise RfclipError(f"{prompts} class names and synonyms is over this demo's limit of {lim.max_prompts} "
                                  "per request (--max-prompts); give fewer names")
        h, w = rescale_size(*image.shape[:2], cfg.short_side)
        if min(h, w) > lim.max_short_side:
            what = f"short side {cfg.short_side}" if cfg.short_side else f"the image's own short side of {min(h, w)} px"
            raise RfclipError(f"{what} is over this demo's limit of {lim.max_short_side} px (--max-short-side); "
                              f"set a smaller short side")
        if cfg.pamr and cfg.pamr_steps > lim.max_pamr_steps:
            raise RfclipError(f"{cfg.pamr_steps} PAMR steps is over this demo's limit of {lim.max_pamr_steps} "
                              "(--max-pamr-steps)")
        native = seg_er.encoder.native_grid[0] * seg_er.encoder.patch_size[0]
        cost = forwards * (crop_cost(h, w, 0, 1, native) if whole else
                           crop_cost(h, w, cfg.slide_crop, cfg.slide_stride, native))
        if cost > lim.max_crops:
            raise RfclipError(f"these settings need {cost} crops of {native} px for a {w}x{h} input, over this demo's "
                              f"limit of {lim.max_crops} per request (--max-crops); use a larger stride, a smaller "
                              "short side or a crop other than 0")

    def _watch(self, seg_er, should_stop: Callable[[], bool] | None):
        """``seg_er`` (a per-request copy) checks in between forward chunks: a cancelled request or one past the
        time limit stops there, so that the next request is served within seconds."""
        started = time.monotonic()
        limit = self.limits.request_seconds

        def check_in() -> None:
            if should_stop is not None and should_stop():
                raise RequestStopped("the request was cancelled")
            if time.monotonic() - started > limit:
                raise RfclipError(f"the request took over {limit:g} s, this demo's limit per request "
                                  "(--request-timeout); use a smaller image or short side, a larger stride or fewer "
                                  "classes")

        check_in()  # a request cancelled while it waited for the model stops before any work
        seg_er.check_in = check_in
        return seg_er

    # ------------------------------------------------------------------ views
    def region_map(self, image: np.ndarray, image_path) -> np.ndarray:
        """The mask source's region map of the uploaded image (found by the upload's file name for saved maps)."""
        if self.masks is None:
            raise RfclipError("no mask source; start the demo with --masks SPEC (npz:DIR, sam2:CHECKPOINT, "
                              "sam:CHECKPOINT or hf:DIR) to use region masks")
        return self.masks(image, os.fspath(image_path))

    def regions(self, image_path) -> Image.Image:
        """The uploaded image with the mask source's regions drawn (colours and boundaries)."""
        from ..masks.draw import draw_regions

        image = read_image(image_path, self.max_megapixels)
        with self._lock:
            region_map = self.region_map(image, image_path)
        return draw_regions(image, region_map)

    def _masks_for(self, spec: str, image: np.ndarray, image_path) -> np.ndarray | None:
        if not spec_needs_masks(spec):
            return None
        if self.masks is None:
            raise RfclipError(f"method {spec} needs region masks; start the demo with --masks SPEC")
        return self.region_map(image, image_path)

    def segment(self, image_path, classes: str, method: str, settings: Settings,
                progress: Progress = _no_progress, should_stop: Callable[[], bool] | None = None,
                show_regions: bool = False) -> SegmentResult:
        """Segment the uploaded image; write the three files `rfclip segment` writes (mask PNG, overlay, JSON).
        ``should_stop``: True once the client has gone (the computation stops at the next forward chunk).
        ``show_regions`` (with a mask source) also draws the image's regions."""
        from .. import viz
        from ..outputs import output_paths, segmentation_record, write_outputs

        self._check_ready()
        progress(0.05, "reading the image")
        image = read_image(image_path, self.max_megapixels)
        vocabulary = self._classes(classes)
        self.check_limits(self._configured(settings), image, vocabulary)
        with self._lock:
            seg_er = self._watch(self.segmenter(method, settings), should_stop)
            region_map = self._masks_for(method, image, image_path)
            if show_regions and region_map is None and self.masks is not None:
                region_map = self.region_map(image, image_path)
            progress(0.15, "embedding the class names")
            text = seg_er.encode_classes(vocabulary)
            progress(0.3, f"segmenting with {seg_er.method_name}")
            t0 = time.perf_counter()
            seg = self._segment(seg_er, image, text, region_map if spec_needs_masks(method) else None)
            seconds = time.perf_counter() - t0
        progress(0.9, "drawing")
        reader = PixelReader(seg.mask.astype(np.uint16 if len(seg.classes) > 256 else np.uint8), self._best(seg),
                             seg.classes)  # kept per browser session: small integers
        seg.probs = None
        name = Path(os.path.basename(os.fspath(image_path)))
        paths = output_paths(self._request_dir(), name)
        record = segmentation_record(name, seg, seg_er, paths, seconds, checkpoint=self.info.checkpoint)
        write_outputs(paths, image, seg, record, alpha=0.5)
        n = len(seg.classes)
        picture = viz.overlay(image, seg.mask, seg.classes, alpha=0.5, palette=viz.palette(n), legend=False)
        regions = None
        if show_regions and region_map is not None:
            from ..masks.draw import draw_regions

            regions = draw_regions(image, region_map)
        return SegmentResult(picture=picture, overlay=paths["overlay"],
                             files=[paths["mask"], paths["json"], paths["overlay"]],
                             classes=seg.classes, fractions=list(viz.class_fractions(seg.mask, seg.classes).values()),
                             colours=viz.palette(n), reader=reader, method=seg_er.method_name, seconds=seconds,
                             regions=regions)

    def compare(self, image_path, classes: str, method_a: str, method_b: str, settings: Settings,
                progress: Progress = _no_progress, should_stop: Callable[[], bool] | None = None) -> CompareResult:
        """Two methods on the same image, vocabulary and settings; the pixels where their classes differ marked."""
        from .. import viz

        self._check_ready()
        progress(0.05, "reading the image")
        image = read_image(image_path, self.max_megapixels)
        vocabulary = self._classes(classes)
        self.check_limits(self._configured(settings), image, vocabulary, forwards=2)
        segs, seconds = [], []
        with self._lock:
            watch = self._watch(self.segmenter(method_a, settings), should_stop).check_in  # one clock for both
            for i, spec in enumerate((method_a, method_b)):
                seg_er = self.segmenter(spec, settings)
                seg_er.check_in = watch
                progress(0.1 + 0.4 * i, f"segmenting with {seg_er.method_name}")
                text = seg_er.encode_classes(vocabulary)
                region_map = self._masks_for(spec, image, image_path)
                extra = {} if region_map is None else {"masks": region_map}
                t0 = time.perf_counter()
                segs.append(seg_er.segment(image, text, return_probs=False, **extra))
                seconds.append(time.perf_counter() - t0)
        progress(0.9, "drawing")
        a, b = segs
        n = len(a.classes)
        pal = viz.palette(n)
        differ = a.mask != b.mask
        marks = viz.overlay(image, differ.astype(np.int64), ["same class", "different class"], alpha=0.6,
                            palette=np.array([[255, 255, 255], [255, 0, 255]], np.uint8), legend=False)
        fractions = tuple(list(viz.class_fractions(s.mask, s.classes).values()) for s in segs)
        return CompareResult(overlays=(viz.overlay(image, a.mask, a.classes, palette=pal, legend=False),
                                       viz.overlay(image, b.mask, b.classes, palette=pal, legend=False)),
                             disagreement=marks, methods=(method_a, method_b), classes=a.classes,
                             fractions=fractions, colours=pal, agreement=1.0 - float(differ.mean()),
                             seconds=tuple(seconds))

    def look_inside(self, image_path, point: tuple[float, float] | None, method: str, layers: str | None,
                    settings: Settings, progress: Progress = _no_progress,
                    should_stop: Callable[[], bool] | None = None) -> InsideResult:
        """RF-CLIP's diagnostics for the clicked point (``(x, y)`` in image pixels; None = the centre): the
        pictures `rfclip explain` draws, from :func:`rfclip.explain.explain_figures`."""
        from .. import viz
        from ..explain import explain_figures

        self._check_ready()
        progress(0.05, "reading the image")
        image = read_image(image_path, self.max_megapixels)
        self.check_limits(self._configured(settings), image, whole=True)
        with self._lock:
            seg_er = self._watch(self.segmenter(method, settings), should_stop)
            chosen = parse_layers_text(layers, seg_er.encoder.num_layers)
            progress(0.2, f"running {seg_er.method_name} with its diagnostics recorded")
            t0 = time.perf_counter()
            result = explain_figures(seg_er, image, classes=None, query_point=point, layers=chosen)
            seconds = time.perf_counter() - t0
        qx, qy = result.summary["query_point"]
        return InsideResult(clicked=viz.mark_point(Image.fromarray(image), (qx, qy)), figures=result.figures,
                            summary=result.summary, method=seg_er.method_name, seconds=seconds)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _segment(seg_er, image: np.ndarray, text, region_map: np.ndarray | None = None):
        """Probabilities only where they fit the budget (they feed the pixel read-out); ``region_map`` for the
        methods that need masks (``Segmenter.segment(..., masks=ARRAY)``)."""
        h, w = image.shape[:2]
        extra = {} if region_map is None else {"masks": region_map}
        return seg_er.segment(image, text, return_probs=text.num_classes * h * w <= PROBS_BUDGET, **extra)

    @staticmethod
    def _best(seg) -> np.ndarray | None:
        if seg.probs is None:
            return None
        return np.take_along_axis(seg.probs, seg.mask[None], 0)[0].astype(np.float16)
