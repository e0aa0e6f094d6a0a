"""RF-CLIP (Li et al., "Target Refocusing via Attention Redistribution for Open-Vocabulary Semantic Segmentation:
An Explainability Perspective", AAAI 2026, arXiv 2511.16170) as hooks on :mod:`rfclip.dense`.

In every residual layer ``l`` (``rf_layers``, default all; Table 7) of the crop batch:

1. **Distractor localization** (eq. 6) on the pre-LN input ``f_i = X^{l-1}[i]`` of every patch token:
   ``phi_i = max_{j in D_dis} w_i[j]`` with the min-shift channel weights ``w_i = (f_i - min f_i) / sum(...)``,
   computed in fp32; ``T_dis = {i : phi_i > tau}``, ``tau = 5 / d``. On ViT-L/14 a token must also receive a large
   share of this layer's attention (column mean of the head-averaged attention over patch rows > ``theta_a``).
2. **Embedding redistribution** (eq. 13): the ``D_dis`` channels of the ``T_dis`` tokens are replaced by their
   3x3 neighbourhood mean (valid neighbours, centre included, all from the pre-update tensor); nothing else
   changes. The filtered stream is this layer's input from here on (its Q/K/V and residual).
3. **Defocus localization** (eq. 7-8): normalized cut of the patch graph ``W = sym(mean_{m<=l, h} KK_h^m)``
   (key-key softmax averaged over the layers so far and the heads); the Fiedler vector is split at its mean
   and the side holding its largest ``|y|`` is the foreground; ``T_def = foreground \\ T_dis``.
4. **Attention redistribution** (eq. 9-12), per head on the patch x patch block of this layer's query-key
   attention: distraction columns shrink by ``(1 - alpha)``; each row's freed budget goes to its ``T_def``
   columns in proportion to their original weights. Rows keep their sums; the [CLS] row and column are untouched.

The last layer (eq. 14) attends with the key-key attention averaged over all layers (per head), without residual
and FFN. Steps 3-4 are skipped (SDPA is used) in layers where no crop of the batch has a distraction token.

Ablations of the paper map to options (see the class docstring); presets are registered as their own method
names: ``rfclip_nodefocus`` (Table 4 (VI) / Table 6 row 2), ``kk_proxy_baseline`` (Table 4 (I)),
``rfclip_code_embed`` (the released code's embedding filter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import (RF_ALPHA, RF_ATTN_CONDITION_MODELS, RF_CUT_THRESHOLD, RF_DEFOCUS_SIM, RF_EMBED_KERNEL,
                         RF_LAYERS, RF_POWER_SQUARINGS, RF_PROXY_ATTN, RF_REDISTRIBUTE_TO, RF_TAU_MULT,
                         RF_THETA_ATTN)
from ..dense import FinalAttention, ForwardContext, softmax_attention
from ..errors import RfclipError
from .base import Method, register_method
from .defocus import CUT_THRESHOLDS, EIG_SOLVERS, FG_RULES, defocused_tokens, no_autocast, symmetrize

PHI_NORMS = ("minshift", "abs", "raw")
SUPPRESS_MODES = ("none", "mask", "lowpass", "mean", "median")
REDISTRIBUTE_TARGETS = ("defocused", "non_distraction", "cls")
DEFOCUS_SIMS = ("kk_avg", "kk_cur", "qk_cur", "qk_avg")
SIM_LAYERS = ("upto_current", "preceding_only")
SIM_HEADS = ("mean", "per_head")
PROXY_ATTNS = ("kk_layer_avg", "kk_last", "qq_last", "qq_plus_kk_last", "qk_last")
PROXY_LAYERS = ("all", "intermediate")
PROXY_HEADS = ("per_head", "head_mean")
EMBED_CHANNELS = ("dis", "all")
EMBED_PADDINGS = ("valid", "zero")
ATTN_RULES = ("theta", "five_over_n")


# =============================================================================================== pure steps
def distraction_scores(patches: Tensor, dims: Tensor, norm: str = "minshift") -> Tensor:
    """eq. 6: ``phi_i = max_{j in dims} w_i[j]`` for tokens ``patches`` (B, N, C). Returns (B, N) fp32.

    Computed without an fp32 copy of the whole stream: sums accumulate in fp32 (an fp16 sum over a token with
    massive activations would overflow to inf and hide every distraction token).
    """
    C = patches.shape[-1]
    sel = patches.index_select(-1, dims)  # (B, N, k)
    if norm == "minshift":
        mn = patches.amin(-1).float()
        den = patches.sum(-1, dtype=torch.float32) - C * mn
        return (sel.amax(-1).float() - mn) / den.clamp_min(1e-8)
    if norm == "abs":
        den = patches.abs().sum(-1, dtype=torch.float32)
        return sel.abs().amax(-1).float() / den.clamp_min(1e-8)
    if norm == "raw":  # literal eq. 6 as transcribed: signed sum in the denominator
        den = patches.sum(-1, dtype=torch.float32)
        return torch.nan_to_num((sel.float() / den.unsqueeze(-1)).amax(-1), nan=0.0, posinf=1e4, neginf=-1e4)
    raise ValueError(f"phi_norm must be one of {PHI_NORMS}, got {norm!r}")


def _grid_of(t: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, k) -> (B, k, h, w)."""
    B, N, k = t.shape
    return t.transpose(1, 2).reshape(B, k, grid[0], grid[1])


def _from_grid(t: Tensor) -> Tensor:
    """(B, k, h, w) -> (B, N, k)."""
    return t.flatten(2).transpose(1, 2)


def neighbourhood_mean(values: Tensor, grid: tuple[int, int], kernel: int = 3, exclude_center: bool = False,
                       padding: str = "valid") -> Tensor:
    """Mean over the ``kernel`` x ``kernel`` window of each token (B, N, k) -> (B, N, k) fp32.

    ``padding="valid"`` averages the in-grid neighbours only; ``"zero"`` pads with zeros and divides by the full
    window (the released code). ``exclude_center`` leaves the token itself out.
    """
    img = _grid_of(values.float(), grid)
    pad = kernel // 2
    area = float(kernel * kernel)
    sums = F.avg_pool2d(img, kernel, stride=1, padding=pad, count_include_pad=True) * area
    if padding == "valid":
        ones = torch.ones(1, 1, *grid, device=img.device, dtype=img.dtype)
        counts = F.avg_pool2d(ones, kernel, stride=1, padding=pad, count_include_pad=True) * area
        counts = counts.round()
    elif padding == "zero":
        counts = torch.full((1, 1, *grid), area, device=img.device, dtype=img.dtype)
    else:
        raise ValueError(f"embed_padding must be one of {EMBED_PADDINGS}, got {padding!r}")
    if exclude_center:
        sums = sums - img
        counts = (counts - 1).clamp_min(1)
    return _from_grid(sums / counts)


def neighbourhood_median(values: Tensor, grid: tuple[int, int], kernel: int = 3) -> Tensor:
    """Median over the in-grid ``kernel`` x ``kernel`` window (centre included). (B, N, k) -> (B, N, k) fp32."""
    img = _grid_of(values.float(), grid)
    B, k, h, w = img.shape
    pad = kernel // 2
    padded = F.pad(img, (pad, pad, pad, pad), value=float("nan"))
    windows = F.unfold(padded.reshape(B * k, 1, h + 2 * pad, w + 2 * pad), kernel)  # (B*k, K*K, h*w)
    med = windows.nanmedian(dim=1).values.reshape(B, k, h * w)
    return med.transpose(1, 2)


def embed_redistribute(x: Tensor, dis: Tensor, dims: Tensor | None, grid: tuple[int, int], kernel: int = 3,
                       exclude_center: bool = False, blend: float = 1.0, padding: str = "valid",
                       reducer: str = "mean") -> Tensor:
    """eq. 13: channels ``dims`` (all channels if None) of the distraction tokens ``dis`` (B, N) of ``x``
    (B, 1+N, C) become ``(1 - blend) f + blend * neighbourhood_mean(f)``. Everything else is unchanged.

    Returns a new tensor (``x`` is not modified); all tokens are updated from the pre-update values.
    """
    patches = x[:, 1:]
    sel = patches if dims is None else patches.index_select(-1, dims)  # (B, N, k)
    if reducer == "median":
        smooth = neighbourhood_median(sel, grid, kernel)
    else:
        smooth = neighbourhood_mean(sel, grid, kernel, exclude_center, padding)
    if blend != 1.0:
        smooth = (1.0 - blend) * sel.float() + blend * smooth
    new = torch.where(dis.unsqueeze(-1), smooth.to(x.dtype), sel)
    out = x.clone()
    if dims is None:
        out[:, 1:] = new
    else:
        out[:, 1:, dims] = new
    return out


def lowpass_clamp(x: Tensor, dis: Tensor, dims: Tensor, tau: float, iterations: int = 3) -> Tensor:
    """Table 1 "low-pass filtering": clamp the ``dims`` channels of the ``dis`` tokens so that their min-shift
    weight is at most ``tau`` (fixed point over a few passes). Returns a new tensor."""
    f = x[:, 1:].float()
    mn = f.amin(-1, keepdim=True)
    g = f - mn
    mask = dis.unsqueeze(-1)
    for _ in range(iterations):
        den = g.sum(-1, keepdim=True)
        gd = g.index_select(-1, dims)
        over = (gd > tau * den) & mask
        c = over.sum(-1, keepdim=True).float()
        rest = den - (gd * over).sum(-1, keepdim=True)
        cap = tau * rest / (1.0 - c * tau).clamp_min(1e-6)
        g[..., dims] = torch.where(over, torch.minimum(gd, cap), gd)
    out = x.clone()
    out[:, 1:] = torch.where(mask, (g + mn).to(x.dtype), x[:, 1:])
    return out


def redistribute_attention(A: Tensor, dis: Tensor, target: Tensor | None, alpha: float, to_cls: bool = False,
                           cls_row: bool = False) -> Tensor:
    """eq. 9-12 on attention weights ``A`` (B, H, 1+N, 1+N), row-stochastic, changed **in place** and returned.

    ``dis`` and ``target`` are (B, N) masks shared by the heads or (B, H, N) per head; ``T_def`` must not
    intersect ``T_dis``. For every patch query row ``r`` (and the [CLS] row when ``cls_row``):
    ``A'[r, j] = (1 - alpha) A[r, j]`` for ``j`` in ``T_dis``; the budget ``alpha * sum_{T_dis} A[r, :]`` is added
    to the ``T_def`` columns in proportion to ``A[r, j]`` (``to_cls``: all of it to column 0). Row sums are kept;
    a row whose target weights are all zero is left unchanged, so is every crop with an empty ``T_dis`` or
    ``T_def``. Only patch columns shrink; the [CLS] column changes only with ``to_cls``.
    """
    r0 = 0 if cls_row else 1
    P = A[:, :, r0:, 1:]  # (B, H, R, N) view
    md = dis.float()
    md = md.unsqueeze(1) if md.dim() == 2 else md  # (B, 1|H, N)
    dis_mass = torch.matmul(P, md.unsqueeze(-1))  # (B, H, R, 1)
    if to_cls:
        A[:, :, r0:, :1] += alpha * dis_mass
        P.mul_(1.0 - alpha * md.unsqueeze(-2))
        return A
    mt = target.float()
    mt = mt.unsqueeze(1) if mt.dim() == 2 else mt
    tgt_mass = torch.matmul(P, mt.unsqueeze(-1))  # (B, H, R, 1)
    ok = (tgt_mass > 1e-30).float()
    ratio = ok * alpha * dis_mass / tgt_mass.clamp_min(1e-30)  # (B, H, R, 1)
    factor = 1.0 - (alpha * ok) * md.unsqueeze(-2) + ratio * mt.unsqueeze(-2)  # (B, H, R, N)
    P.mul_(factor)
    return A


def random_like_count(dis: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random token set per crop with as many tokens as ``dis`` (B, N) has (Table 4 (II) control)."""
    B, N = dis.shape
    scores = torch.rand(B, N, generator=generator, device=dis.device)
    rank = scores.argsort(-1).argsort(-1)
    return rank < dis.sum(-1, keepdim=True)


def parse_layers(spec, num_layers: int) -> frozenset[int]:
    """``None``/``"all"`` -> every layer; ``"0-5,9"``, ``[0, 1, -1]`` (0-based; negatives count from the end)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return frozenset(range(num_layers))
    if isinstance(spec, str):
        items: list = []
        for part in spec.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-", 1)[0],
                                                                             part[1:].split("-", 1)[1])
                items.extend(range(int(a) % num_layers, int(b) % num_layers + 1))
            else:
                items.append(int(part))
    elif isinstance(spec, int):
        items = [spec]
    else:
        items = [int(i) for i in spec]
    out = set()
    for i in items:
        if not -num_layers <= i < num_layers:
            raise RfclipError(f"rf_layers: layer {i} out of range for a {num_layers}-layer model (0-based)")
        out.add(i % num_layers)
    return frozenset(out)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _as_bool_or_auto(value) -> bool | None:
    """``"auto"``/None -> None; booleans and on/off/true/false/1/0 strings -> bool."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s == "auto":
        return None
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"attn_condition must be auto, on or off; got {value!r}")


# =============================================================================================== the method
@register_method
@dataclasses.dataclass
class RFCLIP(Method):
    """RF-CLIP. Options (paper defaults; 0-based layer indices):

    Distractor localization
        ``distraction_dims`` (None: built-in for OpenAI ViT-B/16, ViT-L/14; else ``dims_file`` or the calibration
        cache), ``dims_file``, ``tau_mult`` = 5 (tau = tau_mult / d, Fig. 6(a)), ``tau`` (absolute, overrides),
        ``phi_norm`` = minshift | abs | raw, ``attn_condition`` = auto (on for ViT-L/14) | on | off, ``theta_a`` = 0.1,
        ``attn_rule`` = theta (column mean > theta_a) | five_over_n (> 5/N), ``random_tokens`` (Table 4 (II):
        a random set of the same size instead of T_dis), ``rf_layers`` = all (Table 7).
    Embedding redistribution (eq. 13)
        ``embed_redistribution`` = True, ``embed_kernel`` = 3 (Table 5), ``embed_exclude_center`` = False,
        ``embed_channels`` = dis | all, ``embed_blend`` = 1.0, ``embed_padding`` = valid | zero,
        ``suppress_mode`` = none | mask | lowpass | mean | median (Table 1 strategies on T_dis).
    Attention redistribution (eq. 9-12)
        ``attn_redistribution`` = True, ``alpha`` = 0.4 (fraction of the distraction attention moved; the paper's
        attenuation factor), ``redistribute_to`` = defocused | non_distraction | cls (Table 6),
        ``redistribute_cls_row`` = False.
    Defocus localization (eq. 7-8)
        ``defocus_sim`` = kk_avg | kk_cur | qk_cur | qk_avg (Table 5), ``defocus_sim_layers`` = upto_current |
        preceding_only, ``defocus_sim_heads`` = mean | per_head, ``cut_threshold`` = mean | otsu (Table 5),
        ``fg_rule`` = max_abs | smaller_side | less_attended, ``eig_solver`` = power | eigh,
        ``power_squarings`` = 10.
    Last layer (eq. 14)
        ``proxy_attn`` = kk_layer_avg | kk_last | qq_last | qq_plus_kk_last | qk_last (Table 7),
        ``proxy_layers`` = all | intermediate, ``proxy_heads`` = per_head | head_mean, ``proxy_include_cls`` =
        False (patch block only, not renormalised, as the released code), ``proxy_renorm`` = False,
        ``redistribute_proxy`` = False.

    Table 4 in options: (I) ``kk_proxy_baseline``; (II) ``suppress_mode="mean", random_tokens=True`` with both
    redistributions off; (III) ``suppress_mode="mean"`` with both off; (IV) (III) + ``attn_redistribution``,
    ``redistribute_to="non_distraction"``; (V) ``embed_redistribution`` only; (VI) ``rfclip_nodefocus``;
    (VII) ``rfclip``.
    """

    name: ClassVar[str] = "rfclip"
    description: ClassVar[str] = ("RF-CLIP: distraction tokens found per layer lose attention to defocused tokens "
                                  "(normalized cut); layer-averaged key-key last layer")
    reduced_last_block: ClassVar[bool] = True

    # distractor localization
    distraction_dims: Any = None
    dims_file: str | None = None
    tau_mult: float = RF_TAU_MULT
    tau: float | None = None
    phi_norm: str = "minshift"
    attn_condition: Any = "auto"
    theta_a: float = RF_THETA_ATTN
    attn_rule: str = "theta"
    random_tokens: bool = False
    rf_layers: Any = RF_LAYERS
    # embedding redistribution
    embed_redistribution: bool = True
    embed_kernel: int = RF_EMBED_KERNEL
    embed_exclude_center: bool = False
    embed_channels: str = "dis"
    embed_blend: float = 1.0
    embed_padding: str = "valid"
    suppress_mode: str = "none"
    # attention redistribution
    attn_redistribution: bool = True
    alpha: float = RF_ALPHA
    redistribute_to: str = RF_REDISTRIBUTE_TO
    redistribute_cls_row: bool = False
    # defocus localization
    defocus_sim: str = RF_DEFOCUS_SIM
    defocus_sim_layers: str = "upto_current"
    defocus_sim_heads: str = "mean"
    cut_threshold: str = RF_CUT_THRESHOLD
    fg_rule: str = "max_abs"
    eig_solver: str = "power"
    power_squarings: int = RF_POWER_SQUARINGS
    # last layer
    proxy_attn: str = RF_PROXY_ATTN
    proxy_layers: str = "all"
    proxy_heads: str = "per_head"
    proxy_include_cls: bool = False
    proxy_renorm: bool = False
    redistribute_proxy: bool = False

    def __post_init__(self) -> None:
        self._coerce_types()
        _check_choice("phi_norm", self.phi_norm, PHI_NORMS)
        _check_choice("attn_rule", self.attn_rule, ATTN_RULES)
        _check_choice("embed_channels", self.embed_channels, EMBED_CHANNELS)
        _check_choice("embed_padding", self.embed_padding, EMBED_PADDINGS)
        _check_choice("suppress_mode", self.suppress_mode, SUPPRESS_MODES)
        _check_choice("redistribute_to", self.redistribute_to, REDISTRIBUTE_TARGETS)
        _check_choice("defocus_sim", self.defocus_sim, DEFOCUS_SIMS)
        _check_choice("defocus_sim_layers", self.defocus_sim_layers, SIM_LAYERS)
        _check_choice("defocus_sim_heads", self.defocus_sim_heads, SIM_HEADS)
        _check_choice("cut_threshold", self.cut_threshold, CUT_THRESHOLDS)
        _check_choice("fg_rule", self.fg_rule, FG_RULES)
        _check_choice("eig_solver", self.eig_solver, EIG_SOLVERS)
        _check_choice("proxy_attn", self.proxy_attn, PROXY_ATTNS)
        _check_choice("proxy_layers", self.proxy_layers, PROXY_LAYERS)
        _check_choice("proxy_heads", self.proxy_heads, PROXY_HEADS)
        self._attn_cond = _as_bool_or_auto(self.attn_condition)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the fraction of distraction attention moved), got {self.alpha}")
        if not 0.0 < float(self.embed_blend) <= 1.0:
            raise ValueError(f"embed_blend must be in (0, 1], got {self.embed_blend}")
        if int(self.embed_kernel) < 1 or int(self.embed_kernel) % 2 == 0:
            raise ValueError(f"embed_kernel must be an odd positive size (3, 5, 7), got {self.embed_kernel}")
        if self.tau is None and float(self.tau_mult) <= 0:
            raise ValueError(f"tau_mult must be positive, got {self.tau_mult}")
        if int(self.power_squarings) < 0:
            raise ValueError(f"power_squarings must be >= 0, got {self.power_squarings}")
        self._dims: tuple[int, ...] | None = None
        self._dims_source: str | None = None
        self._model_name: str | None = None
        self._dims_cache: dict[torch.device, Tensor] = {}

    def _coerce_types(self) -> None:
        """Options given as strings (command line) become the type of their default."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default
            if value is None or isinstance(default, str) or default is None or default is dataclasses.MISSING:
                continue
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    b = _as_bool_or_auto(value)
                    if b is None:
                        raise ValueError(f"{f.name} must be true or false, got {value!r}")
                    setattr(self, f.name, b)
            elif isinstance(default, int):
                setattr(self, f.name, int(value))
            elif isinstance(default, float):
                setattr(self, f.name, float(value))
        if self.tau is not None:
            self.tau = float(self.tau)

    # ------------------------------------------------------------------------------------------ setup
    @property
    def detects(self) -> bool:
        """Whether this configuration needs distraction tokens at all (and therefore distraction dims)."""
        return bool(self.embed_redistribution or self.attn_redistribution or self.suppress_mode != "none"
                    or self.redistribute_proxy)

    def prepare(self, clip) -> None:
        from ..calibrate import resolve_distraction_dims

        self._model_name = getattr(clip, "name", None)
        width = int(clip.model.visual.transformer.width) if hasattr(clip.model.visual, "transformer") else None
        if self.detects:
            self._dims, self._dims_source = resolve_distraction_dims(clip, self.distraction_dims, self.dims_file,
                                                                     width=width)
            self._dims_cache.clear()

    def uses_attn_condition(self) -> bool:
        if self._attn_cond is not None:
            return self._attn_cond
        return self._model_name in RF_ATTN_CONDITION_MODELS

    def _resolve_dims_lazily(self, width: int) -> tuple[int, ...]:
        if self._dims is None:
            if self.distraction_dims is None and self.dims_file is None:
                raise RfclipError("RF-CLIP needs distraction dims: build it through Segmenter (which looks them up) "
                                  "or pass distraction_dims=[...] / dims_file=FILE")
            from ..calibrate import check_dims, load_dims_file

            if self.distraction_dims is not None:
                self._dims, self._dims_source = check_dims(self.distraction_dims, width), "distraction_dims option"
            else:
                self._dims, self._dims_source = load_dims_file(self.dims_file, width), str(self.dims_file)
        if self._dims[-1] >= width:
            raise RfclipError(f"distraction dims {list(self._dims)} out of range for a residual width of {width}")
        return self._dims

    def dims_tensor(self, device: torch.device, width: int) -> Tensor:
        t = self._dims_cache.get(device)
        if t is None:
            t = torch.tensor(self._resolve_dims_lazily(width), dtype=torch.long, device=device)
            self._dims_cache[device] = t
        return t

    def threshold(self, width: int) -> float:
        return float(self.tau) if self.tau is not None else float(self.tau_mult) / width

    def begin(self, ctx: ForwardContext) -> None:
        st = ctx.store
        st["rf_layers"] = parse_layers(self.rf_layers, ctx.num_layers)
        st["rf_dis"] = None
        st["rf_dis_any"] = False
        st["rf_kk_sum"] = None
        st["rf_kk_count"] = 0
        st["rf_qk_sum"] = None
        st["rf_qk_count"] = 0
        device = ctx.images.device
        if self.detects:
            st["rf_dims"] = self.dims_tensor(device, ctx.width)
            st["rf_tau"] = self.threshold(ctx.width)
        if self.random_tokens:
            gen = torch.Generator(device=device)
            gen.manual_seed(0)
            st["rf_gen"] = gen
        defocus = self.attn_redistribution and self.redistribute_to == "defocused"
        defocus_proxy = self.redistribute_proxy and self.redistribute_to == "defocused"
        st["rf_need_kk_sum"] = (self.proxy_attn == "kk_layer_avg"
                                or ((defocus or defocus_proxy) and self.defocus_sim == "kk_avg"))
        st["rf_need_qk_sum"] = (defocus or defocus_proxy) and self.defocus_sim == "qk_avg"

    # ------------------------------------------------------------------------------------------ hooks
    def layer_input(self, ctx: ForwardContext, layer: int, x: Tensor) -> Tensor:
        st = ctx.store
        st["rf_dis"], st["rf_dis_any"] = None, False
        rec = ctx.record is not None
        if not self.detects or layer not in st["rf_layers"]:
            return x
        dims, tau = st["rf_dims"], st["rf_tau"]
        phi = distraction_scores(x[:, 1:], dims, self.phi_norm)  # (B, N) fp32
        dis = phi > tau
        if rec:
            ctx.log(f"rf.L{layer}.phi", phi)
            ctx.log(f"rf.L{layer}.phi_pass", dis)
        if self.uses_attn_condition() and bool(dis.any()):
            col = self._column_attention(ctx, layer, x)  # (B, N)
            thr = float(self.theta_a) if self.attn_rule == "theta" else 5.0 / col.shape[-1]
            dis = dis & (col > thr)
            if rec:
                ctx.log(f"rf.L{layer}.col_attn", col)
        if self.random_tokens:
            dis = random_like_count(dis, st.get("rf_gen"))
        any_dis = bool(dis.any())
        st["rf_dis"], st["rf_dis_any"] = dis, any_dis
        if rec:
            ctx.log(f"rf.L{layer}.dis", dis)
        if not any_dis:
            return x
        if self.suppress_mode in ("mean", "median"):
            x = embed_redistribute(x, dis, None, ctx.grid, int(self.embed_kernel), reducer=self.suppress_mode)
        elif self.suppress_mode == "lowpass":
            x = lowpass_clamp(x, dis, dims, tau)
        if self.embed_redistribution:
            x = embed_redistribute(x, dis, dims if self.embed_channels == "dis" else None, ctx.grid,
                                   int(self.embed_kernel), bool(self.embed_exclude_center), float(self.embed_blend),
                                   self.embed_padding)
        return x

    def _column_attention(self, ctx: ForwardContext, layer: int, x: Tensor) -> Tensor:
        """Mean attention each patch receives from the patch rows, head-averaged, from the unfiltered input."""
        q, k, _ = ctx.encoder.qkv(ctx.encoder.blocks[layer], x)
        A = softmax_attention(q, k, ctx.scale)  # (B, H, T, T)
        return A.mean(1)[:, 1:, 1:].mean(1)

    def _accumulate(self, st: dict, key: str, value: Tensor, own: bool = False) -> None:
        """Add ``value`` to the running sum ``key``; ``own``: the sum may take ``value`` itself (not modified later)."""
        if st[key] is None:
            st[key] = value if own else value.clone()
        else:
            st[key].add_(value)
        st[key.replace("_sum", "_count")] += 1

    def attention(self, ctx: ForwardContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        st = ctx.store
        rec = ctx.record is not None
        kk = None
        if st["rf_need_kk_sum"]:
            kk = softmax_attention(k, k, ctx.scale)  # (B, H, T, T) fp32
            self._accumulate(st, "rf_kk_sum", kk, own=True)
        active = (st["rf_dis_any"] and layer in st["rf_layers"]
                  and (self.attn_redistribution or self.suppress_mode == "mask"))
        if not active and not st["rf_need_qk_sum"] and not rec:
            return None
        bias = None
        if active and self.suppress_mode == "mask":
            bias = torch.zeros(st["rf_dis"].shape[0], 1, 1, q.shape[2], device=q.device)
            bias[:, 0, 0, 1:].masked_fill_(st["rf_dis"], float("-inf"))
        A = softmax_attention(q, k, ctx.scale, bias=bias)  # (B, H, T, T) fp32
        if st["rf_need_qk_sum"]:
            self._accumulate(st, "rf_qk_sum", A)
        if rec:
            ctx.log(f"rf.L{layer}.attn", A.mean(1))
        if not active:
            return None  # SDPA: the explicit A above was only needed for recording / the similarity sum
        if self.attn_redistribution:
            A = self._redistribute(ctx, layer, A, q, k, kk)
        if rec:
            ctx.log(f"rf.L{layer}.attn_after", A.mean(1))
        return A

    def _similarity(self, ctx: ForwardContext, A: Tensor, q: Tensor, k: Tensor,
                    kk: Tensor | None) -> tuple[Tensor, float] | None:
        """The cut's affinity source ``(S, n)``: the graph is ``S / n`` (S: (B, H, T, T) before the head reduction),
        or None when there is no graph yet. The running sums already include this layer; ``preceding_only`` takes
        it back out."""
        st = ctx.store
        sim = self.defocus_sim
        if sim == "kk_avg":
            if self.defocus_sim_layers == "preceding_only":
                if st["rf_kk_count"] <= 1:
                    return None
                return st["rf_kk_sum"] - kk, st["rf_kk_count"] - 1
            return st["rf_kk_sum"], st["rf_kk_count"]
        if sim == "kk_cur":
            return (kk if kk is not None else softmax_attention(k, k, ctx.scale)), 1
        if sim == "qk_cur":
            return A, 1
        # qk_avg
        if self.defocus_sim_layers == "preceding_only":
            if st["rf_qk_count"] <= 1:
                return None
            return st["rf_qk_sum"] - A, st["rf_qk_count"] - 1
        return st["rf_qk_sum"], st["rf_qk_count"]

    def _targets(self, ctx: ForwardContext, layer: int, A: Tensor, q: Tensor, k: Tensor,
                 kk: Tensor | None) -> Tensor | None:
        """``T_def`` (B, N) or (B, H, N) bool for this layer's distraction set; None for the [CLS] target."""
        dis = ctx.store["rf_dis"]
        if self.redistribute_to == "cls":
            return None
        if self.redistribute_to == "non_distraction":
            return ~dis
        sim = self._similarity(ctx, A, q, k, kk)
        if sim is None:  # no graph yet (layer 0 with preceding_only): fall back to all non-distraction tokens
            return ~dis
        src, n = sim
        with no_autocast(A.device):
            if self.defocus_sim_heads == "mean":
                S = src[:, :, 1:, 1:].float().mean(1) / n  # (B, N, N)
                d = dis
                col = A.mean(1)[:, 1:, 1:].mean(-2) if self.fg_rule == "less_attended" else None
            else:
                S = src[:, :, 1:, 1:].float() / n  # (B, H, N, N)
                d = dis.unsqueeze(1)
                col = A[:, :, 1:, 1:].mean(-2) if self.fg_rule == "less_attended" else None
            target, y = defocused_tokens(symmetrize(S), d, self.cut_threshold, self.fg_rule, col,
                                         self.eig_solver, int(self.power_squarings))
        if ctx.record is not None:
            ctx.log(f"rf.L{layer}.fiedler", y if y.dim() == 2 else y.mean(1))
            ctx.log(f"rf.L{layer}.def", target if target.dim() == 2 else target.float().mean(1))
        return target

    def _redistribute(self, ctx: ForwardContext, layer: int, A: Tensor, q: Tensor, k: Tensor,
                      kk: Tensor | None) -> Tensor:
        dis = ctx.store["rf_dis"]
        target = self._targets(ctx, layer, A, q, k, kk)
        with no_autocast(A.device):
            return redistribute_attention(A, dis, target, float(self.alpha), to_cls=target is None,
                                          cls_row=bool(self.redistribute_cls_row))

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        st = ctx.store
        L = ctx.num_layers
        last = L - 1
        rec = ctx.record is not None
        proxy = self.proxy_attn
        kk = None
        if proxy in ("kk_layer_avg", "kk_last", "qq_plus_kk_last") or st["rf_need_kk_sum"]:
            kk = softmax_attention(k, k, ctx.scale)
        if proxy == "kk_layer_avg":  # eq. 14: (1/L) sum_m KK^m, per head (same arithmetic as `kk`, layer_average)
            total = st["rf_kk_sum"]
            if self.proxy_layers == "intermediate" and total is not None:
                W = total / st["rf_kk_count"]
            else:
                W = kk if total is None else (total + kk) / L
        elif proxy == "kk_last":
            W = kk
        elif proxy == "qq_last":
            W = softmax_attention(q, q, ctx.scale)
        elif proxy == "qq_plus_kk_last":
            W = softmax_attention(q, q, ctx.scale) + kk
        else:
            W = softmax_attention(q, k, ctx.scale)
        if self.redistribute_proxy and st["rf_dis_any"] and last in st["rf_layers"]:
            if st["rf_need_kk_sum"]:
                self._accumulate(st, "rf_kk_sum", kk)
            if st["rf_need_qk_sum"]:
                self._accumulate(st, "rf_qk_sum", softmax_attention(q, k, ctx.scale))
            W = W.clone()  # W may be the key-key map just added to the running sum
            if rec:
                ctx.log(f"rf.L{last}.attn", W.mean(1))
            W = self._redistribute(ctx, last, W, q, k, kk)
            if rec:
                ctx.log(f"rf.L{last}.attn_after", W.mean(1))
        if self.proxy_heads == "head_mean":
            W = W.mean(1, keepdim=True)
        if rec:
            ctx.log("rf.proxy", W.mean(1)[:, 1:, 1:])
        if self.proxy_include_cls:
            return FinalAttention(weights=W, keep_residual=False)
        W = W[:, :, 1:, 1:]  # patch block of the softmax over all 1+N tokens (released code), not renormalised
        if self.proxy_renorm:
            W = W / W.sum(-1, keepdim=True).clamp_min(1e-12)
        return FinalAttention(weights=W, values=v[:, :, 1:], keep_residual=False, has_cls=False)


# =============================================================================================== presets
@register_method
@dataclasses.dataclass
class RFCLIPNoDefocus(RFCLIP):
    """RF-CLIP without defocus localization: the budget goes to all non-distraction tokens (Table 4 (VI))."""

    name: ClassVar[str] = "rfclip_nodefocus"
    description: ClassVar[str] = "RF-CLIP without the graph cut: freed attention to all non-distraction tokens"
    redistribute_to: str = "non_distraction"


@register_method
@dataclasses.dataclass
class KKProxyBaseline(RFCLIP):
    """RF-CLIP with every RF step off: CLIP with the layer-averaged key-key last layer (Table 4 (I))."""

    name: ClassVar[str] = "kk_proxy_baseline"
    description: ClassVar[str] = "RF-CLIP's ablation baseline: layer-averaged key-key last layer, no RF steps"
    embed_redistribution: bool = False
    attn_redistribution: bool = False


@register_method
@dataclasses.dataclass
class RFCLIPCodeEmbed(RFCLIP):
    """RF-CLIP with the released code's embedding filter: all channels, zero-padded 3x3 mean, blend 0.4."""

    name: ClassVar[str] = "rfclip_code_embed"
    description: ClassVar[str] = "RF-CLIP with the released code's embedding filter (all channels, 0.6 x + 0.4 mean)"
    embed_channels: str = "all"
    embed_padding: str = "zero"
    embed_blend: float = 0.4
