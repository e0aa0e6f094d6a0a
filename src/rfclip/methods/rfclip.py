"""RF-CLIP (Li et al., "Target Refocusing via Attention Redistribution for Open-Vocabulary Semantic Segmentation:
An Explainability Perspective", AAAI 2026, arXiv 2511.16170) as hooks on :mod:`rfclip.dense`.

In every residual layer ``l`` (``rf_layers``, default all; Table 7) of the crop batch:

1. **Distractor localization** (eq. 6) on the pre-LN input ``f_i = X^{l-1}[i]`` of every patch token:
   ``phi_i = max_{j in D_dis} w_i[j]`` with the min-shift channel weights ``w_i = (f_i - min f_i) / sum(...)``,
   computed in fp32; ``T_dis = {i : phi_i > tau}``, ``tau = 5 / d``. The paper divides by the raw signed channel
   sum (``phi_norm="raw"``), which can be near zero or negative; min-shift (the released code's) is a deliberate
   deviation. On ViT-L/14 a token must also receive a large share of this layer's attention (column mean of the
   head-averaged attention over patch rows > ``theta_a``).
2. **Embedding redistribution** (eq. 13): the ``D_dis`` channels of the ``T_dis`` tokens are replaced by the
   mean of their 8 neighbours (3x3 window, centre excluded; at the grid border the in-grid neighbours, which the
   paper leaves open; all from the pre-update tensor); nothing else changes. The filtered stream is this layer's
   input from here on (its Q/K/V and residual).
3. **Defocus localization** (eq. 7-8): normalized cut of the patch graph ``W = sym(mean_{m<=l, h} KK_h^m)``
   (key-key softmax averaged over the layers so far and the heads) over all N patches, distraction tokens
   included (eq. 8); the Fiedler vector is split at its mean and the side holding fewer distraction tokens is the
   foreground (the paper leaves the sign of ``y`` open; ties: the side of the largest ``|y|`` among the
   non-distraction tokens); ``T_def = foreground \\ T_dis``. Where the graph is degenerate (eigengap below
   ``eigengap_tol``) or the foreground has no non-distraction token, ``T_def`` = all non-distraction tokens.
4. **Attention redistribution** (eq. 9-12), per head on the patch x patch block of this layer's query-key
   attention: distraction columns shrink by ``(1 - beta)`` (``beta = 0.7``, the paper's value); each row's freed
   budget goes to its ``T_def`` columns in proportion to their original weights. Rows keep their sums; the [CLS]
   row and column are untouched.

The last layer (eq. 14) attends with the key-key attention averaged over all layers (per head), without residual
and FFN. Steps 3-4 are skipped (SDPA is used) in layers where no crop of the batch has a distraction token.

Ablations of the paper map to options (see the class docstring); presets are registered as their own method
names: ``rfclip_nodefocus`` (Table 4 (VI) / Table 6 row 2), ``kk_proxy_baseline`` (Table 4 (I)),
``rfclip_code_embed`` (the released code's embedding filter), ``rfclip_code_constants`` (the released code's
``beta = 0.4`` and a 3x3 mean with the centre, where the paper's equations say 0.7 and the 8 neighbours).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..constants import (RF_ATTN_CONDITION_GEOMETRY, RF_BETA, RF_BETA_CODE, RF_CUT_THRESHOLD, RF_DEFOCUS_SIM,
                         RF_EIGENGAP_TOL, RF_EMBED_BLEND_CODE, RF_EMBED_EXCLUDE_CENTER, RF_EMBED_KERNEL,
                         RF_FIEDLER_RESIDUAL_TOL, RF_LAYERS, RF_POWER_MAX_SQUARINGS, RF_PROXY_ATTN,
                         RF_REDISTRIBUTE_TO, RF_TAU_MULT, RF_THETA_ATTN)
from ..dense import FinalAttention, ForwardContext, softmax_attention
from ..distraction_dims import ResolvedDims
from .base import Method, register_method
from .defocus import CUT_GRAPHS, CUT_THRESHOLDS, EIG_SOLVERS, FG_RULES, defocused_tokens, no_autocast, symmetrize
from .options import check_choice, coerce_fields, layer_spec, parse_layers, parse_switch
from .refocus import (EMBED_PADDINGS, PHI_NORMS, distraction_scores, embed_redistribute, lowpass_clamp,
                      random_like_count, redistribute_attention)

SUPPRESS_MODES = ("none", "mask", "lowpass", "mean", "median")
REDISTRIBUTE_TARGETS = ("defocused", "non_distraction", "cls")
DEFOCUS_SIMS = ("kk_avg", "kk_cur", "qk_cur", "qk_avg")
SIM_LAYERS = ("upto_current", "preceding_only")
SIM_HEADS = ("mean", "per_head")
PROXY_ATTNS = ("kk_layer_avg", "kk_last", "qq_last", "qq_plus_kk_last", "qk_last")
PROXY_LAYERS = ("all", "intermediate")
PROXY_HEADS = ("per_head", "head_mean")
EMBED_CHANNELS = ("dis", "all")
ATTN_RULES = ("theta", "five_over_n")


# =============================================================================================== forward state
@dataclasses.dataclass
class LayerSum:
    """Running sum of per-layer attention maps (B, H, T, T) fp32 and the number of layers in it."""

    total: Tensor | None = None
    count: int = 0

    def add(self, value: Tensor, own: bool = False) -> None:
        """Add one layer's map; ``own``: the sum may take ``value`` itself (the caller never modifies it later)."""
        if self.total is None:
            self.total = value if own else value.clone()
        else:
            self.total.add_(value)
        self.count += 1


@dataclasses.dataclass
class RFState:
    """RF-CLIP's state within one forward (``ctx.store["rfclip"]``)."""

    layers: frozenset[int]  # layers whose input is checked for distraction tokens (rf_layers)
    attn_condition: bool = False  # the ViT-L/14 attention condition is on
    dims: Tensor | None = None  # (k,) long distraction dims on the crops' device
    tau: float | None = None
    need_kk: bool = False  # keep the running key-key sum (last-layer proxy, or the kk_avg graph)
    need_qk: bool = False  # keep the running query-key sum (qk_avg graph)
    kk: LayerSum = dataclasses.field(default_factory=LayerSum)
    qk: LayerSum = dataclasses.field(default_factory=LayerSum)
    dis: Tensor | None = None  # (B, N) bool, this layer's distraction tokens T_dis
    dis_any: bool = False
    fiedler_y: Tensor | None = None  # the last cut's Fiedler vectors: the next layer's warm start (eig_solver=lanczos)
    generator: torch.Generator | None = None  # random_tokens control


# =============================================================================================== the method
@register_method
@dataclasses.dataclass
class RFCLIP(Method):
    """RF-CLIP. Options (paper defaults; 0-based layer indices):

    Distractor localization
        ``distraction_dims`` (None: built-in for OpenAI ViT-B/16, ViT-L/14; else ``dims_file`` or the calibration
        cache), ``dims_file``, ``tau_mult`` = 5 (tau = tau_mult / d, Fig. 6(a)), ``tau`` (absolute, overrides),
        ``phi_norm`` = minshift | abs | raw (the paper's eq. 6), ``attn_condition`` = auto (on for the ViT-L/14
        geometry: 24 layers, width 1024, patch 14) | on | off, ``theta_a`` = 0.1, ``attn_rule`` = theta (column
        mean > theta_a) | five_over_n (> 5/N), ``random_tokens`` (Table 4 (II): a random set of the same size
        instead of T_dis), ``rf_layers`` = all (Table 7; e.g. "0-5,9", checked against the model's layers).
    Embedding redistribution (eq. 13)
        ``embed_redistribution`` = True, ``embed_kernel`` = 3 (Table 5), ``embed_exclude_center`` = True (eq. 13),
        ``embed_channels`` = dis | all, ``embed_blend`` = 1.0, ``embed_padding`` = valid | zero,
        ``suppress_mode`` = none | mask | lowpass | mean | median (Table 1 strategies on T_dis).
    Attention redistribution (eq. 9-12)
        ``attn_redistribution`` = True, ``beta`` = 0.7 (the paper's attenuation factor: the fraction of the
        distraction attention moved; the released code's 0.4 in ``rfclip_code_constants``),
        ``redistribute_to`` = defocused | non_distraction | cls (Table 6),
        ``redistribute_cls_row`` = False.
    Defocus localization (eq. 7-8)
        ``defocus_sim`` = kk_avg | kk_cur | qk_cur | qk_avg (Table 5), ``defocus_sim_layers`` = upto_current |
        preceding_only, ``defocus_sim_heads`` = mean | per_head, ``cut_threshold`` = mean | otsu (Table 5),
        ``fg_rule`` = fewer_distraction (the side with fewer distraction tokens) | max_abs (TokenCut) |
        smaller_side | less_attended, ``cut_graph`` = all (eq. 8) | non_distraction (the graph of the
        non-distraction patches only), ``eig_solver`` = lanczos (Krylov steps from the previous layer's Fiedler
        vector, a proved eigengap; the graphs it does not settle go to power) | power | eigh,
        ``power_max_squarings`` = 16, ``fiedler_tol`` = 1e-6 (residual stopping rule of the iterative solvers; graphs
        above it fall back to eigh), ``eigengap_tol`` = 1e-4 (graphs with a smaller eigengap are degenerate: no
        graph-cut choice, every non-distraction token is defocused).
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
    embed_exclude_center: bool = RF_EMBED_EXCLUDE_CENTER
    embed_channels: str = "dis"
    embed_blend: float = 1.0
    embed_padding: str = "valid"
    suppress_mode: str = "none"
    # attention redistribution
    attn_redistribution: bool = True
    beta: float = RF_BETA
    redistribute_to: str = RF_REDISTRIBUTE_TO
    redistribute_cls_row: bool = False
    # defocus localization
    defocus_sim: str = RF_DEFOCUS_SIM
    defocus_sim_layers: str = "upto_current"
    defocus_sim_heads: str = "mean"
    cut_threshold: str = RF_CUT_THRESHOLD
    fg_rule: str = "fewer_distraction"
    cut_graph: str = "all"
    eig_solver: str = "lanczos"
    power_max_squarings: int = RF_POWER_MAX_SQUARINGS
    fiedler_tol: float = RF_FIEDLER_RESIDUAL_TOL
    eigengap_tol: float = RF_EIGENGAP_TOL
    # last layer
    proxy_attn: str = RF_PROXY_ATTN
    proxy_layers: str = "all"
    proxy_heads: str = "per_head"
    proxy_include_cls: bool = False
    proxy_renorm: bool = False
    redistribute_proxy: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_choice("phi_norm", self.phi_norm, PHI_NORMS)
        check_choice("attn_rule", self.attn_rule, ATTN_RULES)
        check_choice("embed_channels", self.embed_channels, EMBED_CHANNELS)
        check_choice("embed_padding", self.embed_padding, EMBED_PADDINGS)
        check_choice("suppress_mode", self.suppress_mode, SUPPRESS_MODES)
        check_choice("redistribute_to", self.redistribute_to, REDISTRIBUTE_TARGETS)
        check_choice("defocus_sim", self.defocus_sim, DEFOCUS_SIMS)
        check_choice("defocus_sim_layers", self.defocus_sim_layers, SIM_LAYERS)
        check_choice("defocus_sim_heads", self.defocus_sim_heads, SIM_HEADS)
        check_choice("cut_threshold", self.cut_threshold, CUT_THRESHOLDS)
        check_choice("fg_rule", self.fg_rule, FG_RULES)
        check_choice("cut_graph", self.cut_graph, CUT_GRAPHS)
        check_choice("eig_solver", self.eig_solver, EIG_SOLVERS)
        check_choice("proxy_attn", self.proxy_attn, PROXY_ATTNS)
        check_choice("proxy_layers", self.proxy_layers, PROXY_LAYERS)
        check_choice("proxy_heads", self.proxy_heads, PROXY_HEADS)
        self._attn_cond = parse_switch(self.attn_condition)
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (the fraction of distraction attention moved), got {self.beta}")
        if not 0.0 < float(self.embed_blend) <= 1.0:
            raise ValueError(f"embed_blend must be in (0, 1], got {self.embed_blend}")
        if int(self.embed_kernel) < 1 or int(self.embed_kernel) % 2 == 0:
            raise ValueError(f"embed_kernel must be an odd positive size (3, 5, 7), got {self.embed_kernel}")
        if self.tau is None and float(self.tau_mult) <= 0:
            raise ValueError(f"tau_mult must be positive, got {self.tau_mult}")
        if int(self.power_max_squarings) < 0:
            raise ValueError(f"power_max_squarings must be >= 0, got {self.power_max_squarings}")
        if not float(self.fiedler_tol) > 0:
            raise ValueError(f"fiedler_tol must be positive, got {self.fiedler_tol}")
        if not float(self.eigengap_tol) >= 0:
            raise ValueError(f"eigengap_tol must be >= 0, got {self.eigengap_tol}")
        self._check_combinations()
        self.resolved_dims = ResolvedDims("RF-CLIP")
        layer_spec(self.rf_layers)  # syntax now; the range once the model is known (prepare / begin)

    def _check_combinations(self) -> None:
        """Options that would silently undo or ignore each other are errors."""
        if self.suppress_mode in ("mean", "median", "lowpass") and self.embed_redistribution:
            raise ValueError(f"suppress_mode={self.suppress_mode} replaces the embedding redistribution (Table 1); "
                             "set embed_redistribution=false")
        if self.suppress_mode == "mask" and (self.attn_redistribution or self.redistribute_proxy):
            raise ValueError("suppress_mode=mask removes the attention to distraction tokens, which leaves none to "
                             "redistribute; set attn_redistribution=false (and redistribute_proxy=false)")
        if self.proxy_renorm and self.proxy_include_cls:
            raise ValueError("proxy_renorm renormalises the patch block, proxy_include_cls keeps the whole (already "
                             "row-stochastic) map; choose one")
        if self.proxy_layers != "all" and self.proxy_attn != "kk_layer_avg":
            raise ValueError(f"proxy_layers={self.proxy_layers} applies to proxy_attn=kk_layer_avg only, not "
                             f"{self.proxy_attn}")

    # ------------------------------------------------------------------------------------------ setup
    @property
    def detects(self) -> bool:
        """Whether this configuration needs distraction tokens at all (and therefore distraction dims)."""
        return bool(self.embed_redistribution or self.attn_redistribution or self.suppress_mode != "none"
                    or self.redistribute_proxy)

    def prepare(self, clip) -> None:
        transformer = getattr(clip.model.visual, "transformer", None)
        width = int(transformer.width) if transformer is not None else None
        if transformer is not None and hasattr(transformer, "resblocks"):
            parse_layers(self.rf_layers, len(transformer.resblocks))
        if self.detects:
            self.resolved_dims.resolve(clip, self.distraction_dims, self.dims_file, width=width)

    def uses_attn_condition(self, encoder) -> bool:
        """The ViT-L/14 attention condition: ``attn_condition`` on/off, or with ``auto`` from the encoder's geometry
        (layers, width, patch size) of CLIP ViT-L/14, whatever the model is called or however it was built."""
        if self._attn_cond is not None:
            return self._attn_cond
        geometry = (encoder.num_layers, encoder.width, encoder.patch_size[0])
        return encoder.patch_size[0] == encoder.patch_size[1] and geometry in RF_ATTN_CONDITION_GEOMETRY

    def dims_tensor(self, device: torch.device, width: int) -> Tensor:
        return self.resolved_dims.tensor(device, width, self.distraction_dims, self.dims_file)

    def threshold(self, width: int) -> float:
        return float(self.tau) if self.tau is not None else float(self.tau_mult) / width

    def begin(self, ctx: ForwardContext) -> None:
        device = ctx.images.device
        defocus = self.attn_redistribution and self.redistribute_to == "defocused"
        defocus_proxy = self.redistribute_proxy and self.redistribute_to == "defocused"
        st = RFState(
            layers=parse_layers(self.rf_layers, ctx.num_layers),
            attn_condition=self.uses_attn_condition(ctx.encoder),
            need_kk=(self.proxy_attn == "kk_layer_avg" or ((defocus or defocus_proxy) and self.defocus_sim == "kk_avg")),
            need_qk=(defocus or defocus_proxy) and self.defocus_sim == "qk_avg",
        )
        if self.detects:
            st.dims = self.dims_tensor(device, ctx.width)
            st.tau = self.threshold(ctx.width)
        if self.random_tokens:
            st.generator = torch.Generator(device=device)
            st.generator.manual_seed(0)
        ctx.store["rfclip"] = st

    # ------------------------------------------------------------------------------------------ hooks
    def layer_input(self, ctx: ForwardContext, layer: int, x: Tensor) -> Tensor:
        st: RFState = ctx.store["rfclip"]
        st.dis, st.dis_any = None, False
        rec = ctx.record is not None
        if not self.detects or layer not in st.layers:
            return x
        dims, tau = st.dims, st.tau
        phi = distraction_scores(x[:, 1:], dims, self.phi_norm)  # (B, N) fp32
        dis = phi > tau
        if rec:
            ctx.log(f"rf.L{layer}.phi", phi)
            ctx.log(f"rf.L{layer}.phi_pass", dis)
        if st.attn_condition and bool(dis.any()):
            col = self._column_attention(ctx, layer, x)  # (B, N)
            thr = float(self.theta_a) if self.attn_rule == "theta" else 5.0 / col.shape[-1]
            dis = dis & (col > thr)
            if rec:
                ctx.log(f"rf.L{layer}.col_attn", col)
        if self.random_tokens:
            dis = random_like_count(dis, st.generator)
        any_dis = bool(dis.any())
        st.dis, st.dis_any = dis, any_dis
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

    def attention(self, ctx: ForwardContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        st: RFState = ctx.store["rfclip"]
        rec = ctx.record is not None
        active = (st.dis_any and layer in st.layers
                  and (self.attn_redistribution or self.suppress_mode == "mask"))
        explicit = active or st.need_qk or rec  # this layer needs its query-key map A itself
        masked = active and self.suppress_mode == "mask"
        kk = A = None
        if st.need_kk and explicit and not masked:
            # q-k and k-k maps from one product (B, H, 2T, T): one GEMM over twice the rows instead of two
            T = q.shape[2]
            both = softmax_attention(torch.cat([q, k], dim=2), k, ctx.scale)
            A, kk = both[:, :, :T], both[:, :, T:]  # (B, H, T, T) fp32 each, disjoint views
            st.kk.add(kk, own=True)  # A is changed in place below, never kk
        elif st.need_kk:
            kk = softmax_attention(k, k, ctx.scale)  # (B, H, T, T) fp32
            st.kk.add(kk, own=True)
        if not explicit:
            return None
        if A is None:
            bias = None
            if masked:
                bias = torch.zeros(st.dis.shape[0], 1, 1, q.shape[2], device=q.device)
                bias[:, 0, 0, 1:].masked_fill_(st.dis, float("-inf"))
            A = softmax_attention(q, k, ctx.scale, bias=bias)  # (B, H, T, T) fp32
        if st.need_qk:
            st.qk.add(A)
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
        st: RFState = ctx.store["rfclip"]
        sim = self.defocus_sim
        if sim == "kk_avg":
            if self.defocus_sim_layers == "preceding_only":
                if st.kk.count <= 1:
                    return None
                return st.kk.total - kk, st.kk.count - 1
            return st.kk.total, st.kk.count
        if sim == "kk_cur":
            return (kk if kk is not None else softmax_attention(k, k, ctx.scale)), 1
        if sim == "qk_cur":
            return A, 1
        # qk_avg
        if self.defocus_sim_layers == "preceding_only":
            if st.qk.count <= 1:
                return None
            return st.qk.total - A, st.qk.count - 1
        return st.qk.total, st.qk.count

    def _targets(self, ctx: ForwardContext, layer: int, A: Tensor, q: Tensor, k: Tensor,
                 kk: Tensor | None) -> Tensor | None:
        """``T_def`` (B, N) or (B, H, N) bool for this layer's distraction set; None for the [CLS] target."""
        dis = ctx.store["rfclip"].dis
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
            st = ctx.store["rfclip"]
            warm = {"start": st.fiedler_y} if self.eig_solver == "lanczos" else {}
            target, fied = defocused_tokens(symmetrize(S), d, self.cut_threshold, self.fg_rule, col,
                                            self.eig_solver, cut_graph=self.cut_graph,
                                            gap_tol=float(self.eigengap_tol),
                                            max_squarings=int(self.power_max_squarings), tol=float(self.fiedler_tol),
                                            **warm)
            st.fiedler_y = fied.y
        if ctx.record is not None:
            y = fied.y
            ctx.log(f"rf.L{layer}.fiedler", y if y.dim() == 2 else y.mean(1))
            ctx.log(f"rf.L{layer}.eigengap", fied.gap if fied.gap.dim() == 1 else fied.gap.amin(1))
            ctx.log(f"rf.L{layer}.def", target if target.dim() == 2 else target.float().mean(1))
        return target

    def _redistribute(self, ctx: ForwardContext, layer: int, A: Tensor, q: Tensor, k: Tensor,
                      kk: Tensor | None) -> Tensor:
        dis = ctx.store["rfclip"].dis
        target = self._targets(ctx, layer, A, q, k, kk)
        with no_autocast(A.device):
            return redistribute_attention(A, dis, target, float(self.beta), to_cls=target is None,
                                          cls_row=bool(self.redistribute_cls_row))

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        st: RFState = ctx.store["rfclip"]
        L = ctx.num_layers
        last = L - 1
        rec = ctx.record is not None
        proxy = self.proxy_attn
        kk = None
        if proxy in ("kk_layer_avg", "kk_last", "qq_plus_kk_last") or st.need_kk:
            kk = softmax_attention(k, k, ctx.scale)
        if proxy == "kk_layer_avg":  # eq. 14: (1/L) sum_m KK^m, per head (same arithmetic as `kk`, layer_average)
            total = st.kk.total
            if self.proxy_layers == "intermediate" and total is not None:
                W = total / st.kk.count
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
        if self.redistribute_proxy and st.dis_any and last in st.layers:
            if st.need_kk:
                st.kk.add(kk)
            if st.need_qk:
                st.qk.add(softmax_attention(q, k, ctx.scale))
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
    """RF-CLIP with the released code's embedding filter: all channels, zero-padded 3x3 mean / 9 with the centre,
    blend 0.4."""

    name: ClassVar[str] = "rfclip_code_embed"
    description: ClassVar[str] = "RF-CLIP with the released code's embedding filter (all channels, 0.6 x + 0.4 mean)"
    embed_channels: str = "all"
    embed_padding: str = "zero"
    embed_exclude_center: bool = False
    embed_blend: float = RF_EMBED_BLEND_CODE


@register_method
@dataclasses.dataclass
class RFCLIPCodeConstants(RFCLIP):
    """RF-CLIP with the released code's constants where the paper's equations differ: ``beta = 0.4`` (the code's
    refocus routine keeps 0.6 of the sink columns) and the 3x3 mean with the centre (the code's filter) instead of
    the paper's 0.7 and 8 neighbours (eq. 9-13). rfclip's defaults before they followed the paper."""

    name: ClassVar[str] = "rfclip_code_constants"
    description: ClassVar[str] = "RF-CLIP with the released code's beta = 0.4 and a 3x3 mean with the centre"
    beta: float = RF_BETA_CODE
    embed_exclude_center: bool = False
