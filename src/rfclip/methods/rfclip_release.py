"""RF-CLIP as released: what the authors' published code (github.com/liblacklucy/RF-CLIP at commit c2b333e)
computes, as hooks on :mod:`rfclip.dense` (spec ``rf-clip-released-code.md`` §2-3). ``rfclip`` is the paper's
algorithm; this is the code, which differs from it (README, "Which RF-CLIP?").

Per crop, with L blocks (0-based b) and ``filter`` the released embedding filter (min-shift phi > 5/d over the
model's distraction dims; detected patch tokens become ``0.6 f + 0.4 * zero-padded 3x3 mean`` over all channels)::

    X_0 = ln_pre(embed)                              # not filtered
    X_b = filter(Block_{b-1}(X_{b-1}))  b = 1..L-1    # plain CLIP attention; key-key maps KK_b kept
    Y   = filter(Block_{L-1}(X_{L-1}))                # the standard last block: guide and [CLS] only
    G   = mean(X_1, ..., X_{L-1}, Y)                  # all 1+N rows
    S   = cos(G[1:], G[1:]), entries < enhance_threshold set to 0
    Xe, Ge = X_{L-1}, G with patch rows S X_{L-1}[1:], S G[1:]
    dec(U) = out_proj(A_U V[1:]),  A_U = mean(KK_0..KK_{L-2}, softmax(K K^T / sqrt(d_h)) of ln_1(U))[1:, 1:]
    F   = normalize(ln_post((dec(Xe) + dec(Ge)) / 2) @ proj) ;  cls = normalize(ln_post(Y[0]) @ proj)

then CASS's text and logit extras (:mod:`rfclip.methods.cass`) in the logits hook: the query names clustered once
per vocabulary (complete linkage, ``h_threshold``), each cluster's best name (by ``<cls, T_c>``) nudged to its top-2
patches (``mean_vector_weight``), and ``(1 - gsw) <F, T'> + gsw <cls, T>`` (``global_semantics_weight``). The
[CLS] is the crop's own in whole-image inference, the whole image's with a sliding window (one extra forward per
image), or each crop's with ``cls_source="crop"`` (the released Cityscapes setting).

Every constant of the released code is passed explicitly (``rfclip.constants.RELEASE_*``), so this method does not
follow the paper-reading ``rfclip``'s defaults. It runs in fp32 by default (``precision="auto"``); the release ran
fp16.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..constants import (RELEASE_EMBED_BLEND, RELEASE_EMBED_KERNEL, RELEASE_EMBED_PADDING, RELEASE_ENHANCE_THRESHOLD,
                         RELEASE_FIRST_FILTERED_LAYER, RELEASE_GSW, RELEASE_H_THRESHOLD, RELEASE_MVW,
                         RELEASE_PHI_NORM, RELEASE_TAU_MULT, RELEASE_TOPK_PATCHES)
from ..dense import FinalTokens, ForwardContext, softmax_attention
from ..distraction_dims import ResolvedDims
from .base import Method, register_method
from .cass import blend_global_logits, complete_linkage_clusters, cluster_members, cosine_distances, nudge_cluster_text
from .defocus import no_autocast
from .options import check_choice, coerce_fields
from .refocus import distraction_scores, embed_redistribute

CLS_SOURCES = ("image", "crop")


# =============================================================================================== pure steps
def release_filter(x: Tensor, dims: Tensor, tau: float, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The released embedding filter on tokens x (B, 1+N, C): ``phi`` with min-shift weights over ``dims``,
    ``T_dis = phi > tau``; those patch tokens become ``0.6 f + 0.4 * mean3x3(f)`` over all channels with zero
    padding (the window always divided by 9, centre included). Returns (x', T_dis (B, N) bool); x is not
    modified, and returned as is when no token is detected."""
    dis = distraction_scores(x[:, 1:], dims, RELEASE_PHI_NORM) > tau
    if not bool(dis.any()):
        return x, dis
    x = embed_redistribute(x, dis, None, grid, kernel=RELEASE_EMBED_KERNEL, exclude_center=False,
                           blend=RELEASE_EMBED_BLEND, padding=RELEASE_EMBED_PADDING)
    return x, dis


def similarity_graph(guide_patches: Tensor, threshold: float) -> Tensor:
    """``S_ij = cos(G_i, G_j)``, set to 0 where ``< threshold`` (not normalised). (B, N, C) -> (B, N, N) fp32."""
    with no_autocast(guide_patches.device):
        g = torch.nn.functional.normalize(guide_patches.float(), dim=-1)
        S = torch.matmul(g, g.transpose(1, 2))
    return S.masked_fill_(S < threshold, 0.0)


def enhance(tokens: Tensor, S: Tensor) -> Tensor:
    """Patch rows of ``tokens`` (B, 1+N, C) replaced by ``S @ tokens[1:]`` (fp32, raw sums); [CLS] row kept."""
    with no_autocast(tokens.device):
        patches = torch.matmul(S, tokens[:, 1:].float())
    return torch.cat([tokens[:, :1].float(), patches], dim=1)


# =============================================================================================== forward state
@dataclasses.dataclass
class ReleaseState:
    """State of one forward (``ctx.store["rfclip_release"]``)."""

    dims: Tensor  # (k,) long distraction dims on the crops' device
    tau: float
    kk_sum: Tensor | None = None  # (B, H, T, T) fp32: sum of the key-key maps of layers 0..L-2
    kk_count: int = 0
    guide_sum: Tensor | None = None  # (B, T, C) fp32: sum of the filtered block outputs X_1..X_{L-1}


# =============================================================================================== the method
@register_method
@dataclasses.dataclass
class RFCLIPRelease(Method):
    """RF-CLIP as released (c2b333e). Options (defaults: the released VOC21 config):

    ``distraction_dims`` / ``dims_file`` (None: built-in for OpenAI ViT-B/16 and ViT-L/14, else the calibration
    cache, as ``rfclip``), ``tau_mult`` = 5 (tau = tau_mult / d), ``enhance_threshold`` = 0.4 (cosine similarities
    of the guide below it are zeroed), ``h_threshold`` = 0.10 (complete-linkage cut of the query names),
    ``mean_vector_weight`` = 0.03, ``global_semantics_weight`` = 0.1, ``cls_source`` = image | crop (the [CLS] of
    the logits with a sliding window: the whole image's, or each crop's own as on the released Cityscapes).
    """

    name: ClassVar[str] = "rfclip_release"
    description: ClassVar[str] = ("RF-CLIP as the authors' released code computes it (filtered layers, cosine-enhanced "
                                  "two-branch key-key last layer, CASS text clusters and [CLS] blend)")
    default_precision: ClassVar[str | None] = "fp32"

    distraction_dims: Any = None
    dims_file: str | None = None
    tau_mult: float = RELEASE_TAU_MULT
    enhance_threshold: float = RELEASE_ENHANCE_THRESHOLD
    h_threshold: float = RELEASE_H_THRESHOLD
    mean_vector_weight: float = RELEASE_MVW
    global_semantics_weight: float = RELEASE_GSW
    cls_source: str = "image"

    def __post_init__(self) -> None:
        coerce_fields(self)
        check_choice("cls_source", self.cls_source, CLS_SOURCES)
        if float(self.tau_mult) <= 0:
            raise ValueError(f"tau_mult must be positive, got {self.tau_mult}")
        for name in ("mean_vector_weight", "global_semantics_weight"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if float(self.h_threshold) < 0:
            raise ValueError(f"h_threshold must be >= 0 (a cosine distance), got {self.h_threshold}")
        if not -1.0 <= float(self.enhance_threshold) <= 1.0:
            raise ValueError(f"enhance_threshold must be in [-1, 1] (a cosine similarity), got {self.enhance_threshold}")
        self.resolved_dims = ResolvedDims("rfclip_release")
        self._clusters: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------------------------------ setup
    @property
    def needs_image_cls(self) -> bool:
        return self.cls_source == "image"

    def prepare(self, clip) -> None:
        width = int(clip.model.visual.transformer.width) if hasattr(clip.model.visual, "transformer") else None
        self.resolved_dims.resolve(clip, self.distraction_dims, self.dims_file, width=width)

    def dims_tensor(self, device: torch.device, width: int) -> Tensor:
        return self.resolved_dims.tensor(device, width, self.distraction_dims, self.dims_file)

    # ------------------------------------------------------------------------------------------ forward hooks
    def begin(self, ctx: ForwardContext) -> None:
        ctx.store["rfclip_release"] = ReleaseState(dims=self.dims_tensor(ctx.images.device, ctx.width),
                                                   tau=float(self.tau_mult) / ctx.width)

    def _filter(self, ctx: ForwardContext, x: Tensor, layer: int) -> Tensor:
        """The filter on block ``layer - 1``'s output (recorded as ``rf.L{layer}.dis``; ``layer = L``: the last)."""
        st: ReleaseState = ctx.store["rfclip_release"]
        x, dis = release_filter(x, st.dims, st.tau, ctx.grid)
        if ctx.record is not None:
            ctx.log(f"rf.L{layer}.dis", dis)
        return x

    def layer_input(self, ctx: ForwardContext, layer: int, x: Tensor) -> Tensor:
        """Layers 1..L-1: the filter on the previous block's output (= this layer's input); kept for the guide."""
        if layer < RELEASE_FIRST_FILTERED_LAYER:
            return x
        x = self._filter(ctx, x, layer)
        if not ctx.cls_only:
            st: ReleaseState = ctx.store["rfclip_release"]
            st.guide_sum = x.float() if st.guide_sum is None else st.guide_sum + x.float()
        return x

    def attention(self, ctx: ForwardContext, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """Plain CLIP attention (None: SDPA); the key-key map of this layer's input is summed for the decodings."""
        if not ctx.cls_only:
            st: ReleaseState = ctx.store["rfclip_release"]
            with no_autocast(k.device):
                kk = softmax_attention(k, k, ctx.scale)  # (B, H, T, T) fp32
            st.kk_sum = kk if st.kk_sum is None else st.kk_sum.add_(kk)
            st.kk_count += 1
        return None

    def final_tokens(self, ctx: ForwardContext, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> FinalTokens:
        encoder, block = ctx.encoder, ctx.encoder.blocks[-1]
        L = ctx.num_layers
        y = encoder.residual_block(block, x, q, k, v)  # the standard last block on the filtered input
        y = self._filter(ctx, y, L)
        if ctx.cls_only:
            return FinalTokens(patches=None, cls=y[:, 0])
        st: ReleaseState = ctx.store["rfclip_release"]
        if st.kk_count != L - 1 or st.guide_sum is None:
            raise RuntimeError("rfclip_release needs the key-key maps and outputs of every earlier layer")
        guide = (st.guide_sum + y.float()) / L  # (B, 1+N, C): mean of the L filtered block outputs
        S = similarity_graph(guide[:, 1:], float(self.enhance_threshold))  # (B, N, N)
        if ctx.record is not None:
            ctx.log("release.similarity_kept", (S > 0).float().mean((1, 2)))
        decoded = self._decode(ctx, enhance(x, S).to(x.dtype)) + self._decode(ctx, enhance(guide, S).to(x.dtype))
        return FinalTokens(patches=decoded / 2, cls=y[:, 0])

    def _decode(self, ctx: ForwardContext, u: Tensor) -> Tensor:
        """``out_proj(A V[1:])`` of the last block on tokens u (B, 1+N, C), A the layer-averaged key-key attention
        whose last map comes from u itself, per head, patch block of the softmax over all tokens, not renormalised;
        no residual, no FFN. Returns (B, N, C)."""
        st: ReleaseState = ctx.store["rfclip_release"]
        encoder, block = ctx.encoder, ctx.encoder.blocks[-1]
        _, k, v = encoder.qkv(block, u)
        with no_autocast(k.device):
            kk = softmax_attention(k, k, ctx.scale)
            A = (st.kk_sum[:, :, 1:, 1:] + kk[:, :, 1:, 1:]) / ctx.num_layers  # (B, H, N, N)
        return block.ls_1(encoder.attention_output(block, A, v[:, :, 1:]))

    # ------------------------------------------------------------------------------------------ logits hook
    def clusters(self, text_features: Tensor) -> Tensor:
        """(K, Q) bool: the query names clustered by complete linkage at ``h_threshold``, once per vocabulary."""
        t = text_features.detach().float().cpu().contiguous()
        key = (hashlib.blake2b(t.numpy().tobytes(), digest_size=16).hexdigest(), tuple(t.shape),
               float(self.h_threshold), str(text_features.device))
        members = self._clusters.get(key)
        if members is None:
            labels = complete_linkage_clusters(cosine_distances(t), float(self.h_threshold))
            members = cluster_members(labels, device=text_features.device)
            if len(self._clusters) >= 8:
                self._clusters.clear()
            self._clusters[key] = members
        return members

    def logits(self, features: Tensor, cls: Tensor | None, text_features: Tensor) -> Tensor:
        if cls is None:
            raise ValueError("rfclip_release needs the [CLS] of the crop or of the image")
        with no_autocast(features.device):
            features, cls, text = features.float(), cls.float(), text_features.float()
            scores = cls @ text.T  # (B, Q): [CLS]-text similarity with the unadjusted names
            adjusted = nudge_cluster_text(features, scores, text, self.clusters(text),
                                          float(self.mean_vector_weight), RELEASE_TOPK_PATCHES)  # (B, Q, D)
            return blend_global_logits(features, adjusted, scores, float(self.global_semantics_weight))

