"""The base of every method (hooks from :mod:`rfclip.dense` plus name, options, ``prepare``) and the registry."""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import Tensor

from ..dense import ForwardContext, Hooks, softmax_attention
from ..errors import RfclipError
from .options import coerce_options

if TYPE_CHECKING:  # pragma: no cover
    from ..models.loading import ClipModel


@dataclasses.dataclass
class Method(Hooks):
    """A segmentation method: hooks (:class:`rfclip.dense.Hooks`) plus a name, options and a ``prepare`` step.

    Subclasses are dataclasses: their fields are the method's options (``Segmenter(method="naclip",
    gaussian_std=3)``), with the paper's values as defaults.
    """

    name: ClassVar[str] = "clip"
    description: ClassVar[str] = "vanilla CLIP: unmodified last block, patch tokens through ln_post and proj"
    reduced_last_block: ClassVar[bool] = False  # drop the last block's residual and FFN (ClearCLIP's finding)
    # the mask tier: a method that needs region masks (``masks=`` / ``--masks``) gets each crop's region map in
    # ``ctx.regions`` (crops padded to multiples of ``crop_multiple`` px, the padding's id ``region_pad_value``)
    needs_masks: ClassVar[bool] = False
    crop_multiple: ClassVar[int] = 0
    region_pad_value: ClassVar[int] = 0

    def prepare(self, clip: "ClipModel") -> None:
        """Called once with the loaded model, before any forward (check backbone-specific needs here)."""

    def options(self) -> dict:
        """The method's option values."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    # --- image-level hooks (called by :func:`rfclip.inference.dense_logits`, outside the forward)
    default_precision: ClassVar[str | None] = None  # what precision="auto" means for this method (None: the default)

    @property
    def needs_image_cls(self) -> bool:
        """True when :meth:`logits` needs the [CLS] of the whole image with a sliding window: inference then runs
        one extra whole-image forward per image (``cls_only``) and passes its [CLS] to every crop of the image."""
        return False

    def logits(self, features: Tensor, cls: Tensor | None, text_features: Tensor) -> Tensor:
        """Cosine logits of one batch of crops: ``features`` (B, N, D) fp32 L2-normalised, ``cls`` (B, D) the crop's
        own [CLS] (or the whole image's, see :attr:`needs_image_cls`; None when the forward has none), and the
        query embeddings ``text_features`` (Q, D) fp32. Returns (B, N, Q). Default: ``features @ text_features.T``."""
        return features @ text_features.T


class UsesVFM:
    """For methods that run a vision foundation model beside CLIP (dataclass fields ``vfm``: a name or a module,
    ``vfm_checkpoint``): the VFM is loaded once, on the CLIP model's device, in ``prepare`` (so that a missing file
    fails before any image), and a module given as ``vfm`` is named by its model name in the options."""

    _vfm = None

    def load_vfm(self, device=None):
        """The VFM, loaded on first use and moved to ``device`` when it is elsewhere."""
        if self._vfm is None:
            from ..models.vfm import load_vfm

            self._vfm = load_vfm(self.vfm, self.vfm_checkpoint, device=device)
        elif device is not None and self._vfm._scale.device != torch.device(device):
            self._vfm = self._vfm.to(device)
        return self._vfm

    def prepare(self, clip) -> None:
        try:
            device = next(clip.model.parameters()).device
        except (AttributeError, StopIteration):
            device = None
        self.load_vfm(device)

    def options(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no deep copy of a module
        if not isinstance(out["vfm"], str):
            out["vfm"] = getattr(self._vfm, "name", type(self.vfm).__name__)
        return out


@dataclasses.dataclass
class Plugin(Method):
    """A method wrapped by a plug-in (``naclip+fsa``, ``rfclip+masks``): every hook and image-level property is the
    base's unless the plug-in overrides it, and the base's options and helpers (e.g. ProxyCLIP's ``vfm_kind``) are
    visible through it. A subclass sets ``suffix`` (its name after ``+``) and ``adds`` (what it adds, for the
    description) and registers itself with :func:`register_plugin`."""

    base: Method
    suffix: ClassVar[str] = ""
    adds: ClassVar[str] = ""

    def _check_base(self) -> None:
        """Called first by a subclass's ``__post_init__``."""
        if not isinstance(self.base, Method):
            raise TypeError(f"+{self.suffix} wraps a Method, got {type(self.base).__name__}")
        if getattr(self.base, "needs_masks", False) and not self.needs_masks:  # e.g. naclip+masks+fsa
            self.needs_masks = True  # instance attributes: the class attributes stay what the registry reads
            self.region_pad_value = self.base.region_pad_value

    # --- identity of the wrapped method
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}+{self.suffix}"

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"{self.base.description}; + {self.adds}"

    @property
    def reduced_last_block(self) -> bool:  # type: ignore[override]
        return self.base.reduced_last_block

    @property
    def default_precision(self):  # type: ignore[override]
        return self.base.default_precision

    @property
    def crop_multiple(self) -> int:  # type: ignore[override]
        return int(getattr(self.base, "crop_multiple", 0))

    @property
    def needs_image_cls(self) -> bool:
        return self.base.needs_image_cls

    @property
    def needs_text_in_forward(self) -> bool:
        return self.base.needs_text_in_forward

    def __getattr__(self, item: str):
        if item.startswith("_") or item == "base":  # private state and the base itself are never forwarded
            raise AttributeError(item)
        return getattr(self.__dict__["base"] if "base" in self.__dict__ else None, item)

    # --- hooks: the base's
    def prepare(self, clip) -> None:
        self.base.prepare(clip)

    def begin(self, ctx: ForwardContext) -> None:
        self.base.begin(ctx)

    def layer_input(self, ctx: ForwardContext, layer: int, x: Tensor) -> Tensor:
        return self.base.layer_input(ctx, layer, x)

    def attention(self, ctx: ForwardContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        return self.base.attention(ctx, layer, q, k, v)

    def final_tokens(self, ctx: ForwardContext, x: Tensor, q: Tensor, k: Tensor, v: Tensor):
        return self.base.final_tokens(ctx, x, q, k, v)

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor):
        return self.base.final_attention(ctx, q, k, v)

    def logits(self, features: Tensor, cls: Tensor | None, text_features: Tensor) -> Tensor:
        return self.base.logits(features, cls, text_features)


def computes_last_layer(method) -> bool:
    """Whether a method (an instance or a class) computes its last layer itself (``final_tokens``) instead of giving
    one attention map (``final_attention``); a plug-in instance answers for the method it wraps."""
    while isinstance(method, Plugin):
        method = method.base
    cls = method if isinstance(method, type) else type(method)
    return not issubclass(cls, Plugin) and getattr(cls, "final_tokens", Method.final_tokens) is not Method.final_tokens


def qk_attention(ctx: ForwardContext, q: Tensor, k: Tensor) -> Tensor:
    """CLIP's own attention softmax(q k^T / sqrt(dh)), explicit. Returns (B, H, T, T) fp32."""
    return softmax_attention(q, k, ctx.scale)


# ---------------------------------------------------------------------------------------------- registry
METHODS: dict[str, type[Method]] = {}
PLUGINS: dict[str, Callable[..., Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class under ``cls.name`` (a second class under a taken name replaces it, with a warning)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        warnings.warn(f"method '{cls.name}' registered again: {cls.__qualname__} replaces "
                      f"{METHODS[cls.name].__qualname__}", stacklevel=2)
    METHODS[cls.name] = cls
    return cls


def register_plugin(name: str):
    """Register a plug-in factory ``factory(base_method, **options) -> Method`` under ``name``."""
    def wrap(factory):
        if name in PLUGINS and PLUGINS[name] is not factory:
            warnings.warn(f"plugin '{name}' registered again: {factory.__qualname__} replaces it", stacklevel=2)
        PLUGINS[name] = factory
        return factory

    return wrap


def plugin_accepts(plugin: str, base_cls: type[Method]) -> bool:
    """Whether plug-in ``plugin`` can wrap methods of class ``base_cls`` (its factory's ``accepts``, default yes)."""
    accepts = getattr(PLUGINS[plugin], "accepts", None)
    return True if accepts is None else bool(accepts(base_cls))


def method_specs() -> list[str]:
    """Every method name, then every ``method+plugin`` combination that can be built (``naclip+fsa``)."""
    names = sorted(METHODS)
    return names + [f"{m}+{p}" for p in sorted(PLUGINS) for m in names if plugin_accepts(p, METHODS[m])]


def spec_needs_masks(spec: str) -> bool:
    """Whether a method spec (``corrclip``, ``naclip+masks``) needs region masks (``--masks`` / ``masks=``)."""
    base, extra = parse_method_spec(spec)
    _check_names(base, extra)
    return bool(getattr(METHODS[base], "needs_masks", False)) or any(
        getattr(PLUGINS[p], "needs_masks", False) for p in extra)


def _option_names(cls) -> set[str]:
    """A method's option names: its dataclass fields (a plugin's ``base`` field is the wrapped method, not an option)."""
    if not dataclasses.is_dataclass(cls):
        return set()
    return {f.name for f in dataclasses.fields(cls) if f.name != "base"}


def parse_method_spec(spec: str, plugins: tuple[str, ...] | list[str] = ()) -> tuple[str, list[str]]:
    """``"naclip+fsa"`` -> ``("naclip", ["fsa"])``; explicit ``plugins`` are appended."""
    parts = [p.strip().lower() for p in str(spec).split("+") if p.strip()]
    if not parts:
        raise RfclipError("empty method name; choose one of: " + ", ".join(sorted(METHODS)))
    base, extra = parts[0], parts[1:] + [p.lower() for p in plugins]
    return base, extra


def method_option_names(spec: str, plugins=()) -> set[str]:
    """All option names accepted by a method spec (base + plugins)."""
    base, extra = parse_method_spec(spec, plugins)
    _check_names(base, extra)
    names = _option_names(METHODS[base])
    for plugin in extra:
        names |= _option_names(PLUGINS[plugin])
    return names


def _check_names(base: str, plugins: list[str]) -> None:
    if base not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise RfclipError(f"unknown method '{base}'; choose one of: {known} (plugins: +{', +'.join(sorted(PLUGINS))})")
    for plugin in plugins:
        if plugin not in PLUGINS:
            raise RfclipError(f"unknown plugin '{plugin}'; available plugins: {', '.join(sorted(PLUGINS)) or 'none'}")
    twice = sorted({p for p in plugins if plugins.count(p) > 1})
    if twice:  # a plug-in wraps the method once; twice would run its step twice (or clash on its options)
        raise RfclipError(f"plug-in '{twice[0]}' is named twice in '{'+'.join([base, *plugins])}'; name each plug-in "
                          "once (e.g. --method naclip+fsa, or --plugin fsa, not both)")


def build_method(spec: str, plugins=(), **options) -> Method:
    """Build a method from its name (``"rfclip"``, ``"naclip+fsa"``) and options.

    Options are routed to the base method or the plugin that declares them; an option nobody declares is an
    error naming the valid ones.
    """
    base, extra = parse_method_spec(spec, plugins)
    _check_names(base, extra)
    base_cls = METHODS[base]
    base_names = _option_names(base_cls)
    plugin_names = {p: _option_names(PLUGINS[p]) for p in extra}
    known = set(base_names).union(*plugin_names.values()) if plugin_names else set(base_names)
    unknown = sorted(set(options) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise RfclipError(f"unknown option(s) {', '.join(unknown)} for method '{spec}'; valid options: {valid}")
    try:
        method = base_cls(**coerce_options(base_cls, {k: v for k, v in options.items() if k in base_names}))
        for plugin in extra:
            factory = PLUGINS[plugin]
            own = {k: v for k, v in options.items() if k in plugin_names[plugin]}
            method = factory(method, **(coerce_options(factory, own) if isinstance(factory, type) else own))
    except (TypeError, ValueError) as err:
        raise RfclipError(f"bad option for method '{spec}': {err}") from None
    return method
