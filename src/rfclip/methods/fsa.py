"""FSA (Chi et al., ICCV 2025): feedback self-adaptive attention, a plug-in on the last block of any base method.

``Segmenter(method="naclip+fsa")`` or ``Segmenter(method="naclip", plugins=["fsa"])``. The base method decides the
last block's attention A (per head or shared by heads), its values and whether the residual/FFN are kept; FSA replaces
A by the adaptation ensemble built from the base's own first-pass prediction (spec fsa.md §3, §5):

1. first pass, attention branch only: ``Z = 20 · Φ(Out(A)) Tᵀ`` over the patch tokens (no residual, no FFN);
2. attention isolation: subtract ``z_u = 35 · Φ(Out(c·U)) Tᵀ``, U uniform over the patch tokens (c = the base's row
   sum: 1, or 2 for SCLIP); ``log P = log_softmax(Z − z_u)`` over the text queries;
3. patch correspondence ``S_ij = 1 / (1 + max(KL(P_i ‖ P_j), 0))``, the KL as one matrix product;
4. confidence pruning: per row, the most similar keys holding 45 % of the row's softmax(S) mass (nucleus rule);
5. ``A_fb = softmax(S · exp(λ S))`` over the kept keys (one map shared by all heads);
6. ``A_ens = (A_fb A + A A_fb + c · A_fb) / 3`` per head, with A_fb extended block-diagonally over the CLS token;
7. second pass: the base's last block with A_ens instead of A (done by :class:`rfclip.dense.DenseCLIP`).

The first-pass and uniform features (steps 1-2) and the ensemble (step 6) are computed in fp32 whatever the autocast
dtype; the class distributions, the KL similarity, the pruning and A_fb (steps 2-5) in fp64 (fp32 on devices without
fp64, e.g. MPS): near-ties of S decide which keys the nucleus rule keeps, and fp32 merges them. Batched over crops; the N x N maps are built a block of rows at a time so that memory
stays bounded for large grids. ``fsa=False`` returns the base's attention untouched (exactly the
base method); ``fsa_lambda=0`` is *not* the identity (it only removes the sharpening).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import FSA_LAMBDA, FSA_PATCH_LOGIT_SCALE, FSA_PRUNE_MASS, FSA_UNIFORM_LOGIT_SCALE
from ..dense import FinalAttention, ForwardContext, softmax_attention
from ..errors import RfclipError
from .base import Method, Plugin, computes_last_layer, register_plugin

_ROW_BLOCK_ELEMENTS = 1 << 24  # B x rows x N elements per N x N block (128 MB in fp64)


def exact_dtype(device: torch.device | str) -> torch.dtype:
    """fp64 where the device has it (the KL similarity and the pruning), else fp32 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ---------------------------------------------------------------------------------------------- the FSA steps
def isolated_log_probs(patch_features: Tensor, uniform_features: Tensor, text_features: Tensor,
                       patch_scale: float = FSA_PATCH_LOGIT_SCALE,
                       uniform_scale: float = FSA_UNIFORM_LOGIT_SCALE, dtype: torch.dtype | None = None) -> Tensor:
    """Attention isolation (§3.1-3.2): ``log_softmax(patch_scale · F Tᵀ − uniform_scale · f_u Tᵀ)`` over queries.

    ``patch_features`` (B, N, D) and ``uniform_features`` (B, D) are L2-normalised first-pass features, ``text_features``
    (Q, D). Returns log P (B, N, Q) in ``dtype`` (default: :func:`exact_dtype`, fp64). The official code takes
    ``log(P + 1e-10)`` in fp16, where the 1e-10 rounds away; ``log_softmax`` is that without the NaN of log(0).
    """
    dtype = dtype or exact_dtype(patch_features.device)
    text = text_features.to(dtype)
    z = patch_scale * torch.matmul(patch_features.to(dtype), text.T)  # (B, N, Q)
    z_uni = uniform_scale * torch.matmul(uniform_features.to(dtype), text.T)  # (B, Q)
    return torch.log_softmax(z - z_uni.unsqueeze(1), dim=-1)


def kl_matrix(log_p: Tensor, log_q: Tensor | None = None) -> Tensor:
    """``KL_ij = KL(P_i ‖ P_j) = Σ_q P_iq log P_iq − Σ_q P_iq log P_jq``, clamped at 0, as one matrix product.

    ``log_p`` (B, R, Q) holds the rows i, ``log_q`` (B, N, Q) the columns j (default: ``log_p``). Returns (B, R, N)
    in the inputs' dtype (fp32 at least: pass fp64 for FSA's pruning); never forms a (R, N, Q) tensor. Underflowed
    probabilities are exact zeros times finite logs: no NaN.
    """
    log_p = _at_least_fp32(log_p)
    log_q = log_p if log_q is None else _at_least_fp32(log_q).to(log_p.dtype)
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(dim=-1, keepdim=True)  # (B, R, 1)
    return (neg_entropy - torch.matmul(p, log_q.transpose(-1, -2))).clamp_min_(0)


def nucleus_mask(similarity: Tensor, mass: float = FSA_PRUNE_MASS) -> Tensor:
    """Confidence-based pruning (§3.4), the official ``SparseAtten``: per row, sort S descending, take the softmax of
    the sorted row (temperature 1), keep the sorted positions whose cumulative mass is <= ``mass`` and always the
    first one, then map back to the keys.

    Exactly that many keys are kept. Among keys tied at the boundary the sort decides (the official code leaves it to
    ``torch.sort``); here the sort is stable, so the lower key index comes first. Computed in the input's dtype (fp32
    at least): give fp64 similarities, fp32 merges near-ties. Returns a bool mask of the shape of ``similarity``.
    """
    s = _at_least_fp32(similarity)
    ordered, order = s.sort(dim=-1, descending=True, stable=True)
    keep_sorted = ordered.softmax(dim=-1).cumsum(dim=-1) <= mass  # a prefix of the sorted row
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def feedback_attention(similarity: Tensor, lam: float, mass: float = FSA_PRUNE_MASS) -> tuple[Tensor, Tensor]:
    """§3.4-3.5: ``softmax(S · exp(λ S))`` over the keys kept by :func:`nucleus_mask`. Returns (A_fb, keep), A_fb in
    the similarity's dtype (fp32 at least)."""
    s = _at_least_fp32(similarity)
    keep = nucleus_mask(s, mass)
    logits = (s * torch.exp(lam * s)).masked_fill_(~keep, float("-inf"))
    return logits.softmax(dim=-1), keep


def feedback_from_log_probs(log_p: Tensor, lam: float, mass: float = FSA_PRUNE_MASS,
                            block_elements: int = _ROW_BLOCK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """§3.3-3.5 from the isolated log-probabilities (B, N, Q): returns A_fb (B, N, N) fp32 and the fraction of keys
    kept per crop (B,). The KL similarity, the pruning and the softmax run in log_p's dtype (fp32 at least; FSA
    passes fp64), A_fb is stored in fp32. Rows are processed in blocks (every step is row-wise), batched over crops."""
    log_p = _at_least_fp32(log_p)
    B, N, _ = log_p.shape
    a_fb = torch.empty(B, N, N, dtype=torch.float32, device=log_p.device)
    kept = torch.zeros(B, dtype=torch.float32, device=log_p.device)
    rows = max(1, block_elements // max(1, B * N))
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        similarity = 1.0 / (1.0 + kl_matrix(log_p[:, start:stop], log_p))  # (B, r, N)
        a_fb[:, start:stop], keep = feedback_attention(similarity, lam, mass)
        kept += keep.sum(dim=(-2, -1), dtype=torch.float32)
    return a_fb, kept / (N * N)


def adaptation_ensemble(a_fb: Tensor, base: Tensor, has_cls: bool, row_sum: Tensor | float = 1.0) -> Tensor:
    """§3.6 / §5: ``A_ens = (A_fb A + A A_fb + c · A_fb) / 3``.

    ``a_fb`` (B, N, N) over the patch tokens, shared by heads; ``base`` (B, H or 1, T, T) with T = N (+1 with CLS).
    With a CLS token A_fb is extended to block-diag(1, A_fb) (§5.3). ``row_sum`` c (scalar or (B,)) is the base's row
    sum (SCLIP: 2), so that A_ens has the base's row sums. Returns (B, H or 1, T, T) fp32.
    """
    a_fb = a_fb.float()
    base = base.float()
    B, N, _ = a_fb.shape
    if has_cls:
        ext = a_fb.new_zeros(B, N + 1, N + 1)
        ext[:, 0, 0] = 1.0
        ext[:, 1:, 1:] = a_fb
    else:
        ext = a_fb
    if base.shape[-1] != ext.shape[-1]:
        raise ValueError(f"base attention over {base.shape[-1]} tokens, feedback attention over {ext.shape[-1]}")
    ext = ext.unsqueeze(1)  # (B, 1, T, T)
    c = torch.as_tensor(row_sum, dtype=torch.float32, device=a_fb.device).reshape(-1, 1, 1, 1)
    out = torch.matmul(ext, base)
    out += torch.matmul(base, ext)
    out += c * ext
    return out.div_(3.0)


# ---------------------------------------------------------------------------------------------- fp32 last-block pieces
def _attention_output_fp32(ctx: ForwardContext, weights: Tensor, values: Tensor) -> Tensor:
    """``ls_1(out_proj(concat_h(A_h V_h)))`` of the last block in fp32. weights (B, H|1, R, T), values (B, H, T, dh)."""
    block = ctx.encoder.blocks[-1]
    out = torch.matmul(weights.float(), values.float())  # (B, H, R, dh)
    B, H, R, dh = out.shape
    out = out.transpose(1, 2).reshape(B, R, H * dh)
    proj = block.attn.out_proj
    out = F.linear(out, proj.weight.float(), None if proj.bias is None else proj.bias.float())
    ls = getattr(block, "ls_1", None)
    if ls is not None and not isinstance(ls, nn.Identity):
        gamma = getattr(ls, "gamma", None)
        out = out * gamma.float() if gamma is not None else ls(out)
    return out


def _to_text_space_fp32(ctx: ForwardContext, y: Tensor) -> Tensor:
    """``normalize(ln_post(y) @ proj)`` in fp32."""
    visual = ctx.encoder.visual
    ln = visual.ln_post
    if isinstance(ln, nn.LayerNorm):
        y = F.layer_norm(y.float(), ln.normalized_shape, None if ln.weight is None else ln.weight.float(),
                         None if ln.bias is None else ln.bias.float(), ln.eps)
    else:
        y = ln(y.float())
    if visual.proj is not None:
        y = y @ visual.proj.float()
    return F.normalize(y, dim=-1)


def is_vit_h(clip=None, width: int | None = None) -> bool:
    """ViT-H/14 (width 1280) backbone?"""
    if clip is not None:
        name = str(getattr(clip, "name", "") or "").lower().replace("_", "-")
        if "vit-h" in name:
            return True
        try:
            width = int(clip.model.visual.transformer.width)
        except AttributeError:
            pass
    return width == 1280


def default_lambda(base: Method, clip=None, width: int | None = None) -> float:
    """λ from FSA's ``hyper_param.txt``: 4.5 with an MAE VFM; else (SAM, DINO, DINOv2 or no VFM) 2.3 for a CLIP
    ViT-H/14 and 3.0 for ViT-B/16 and ViT-L/14 (constants.FSA_LAMBDA)."""
    if getattr(base, "vfm_kind", None) == "mae":
        return FSA_LAMBDA["mae"]
    if is_vit_h(clip, width):
        return FSA_LAMBDA["vit_h"]
    return FSA_LAMBDA["default"]


# ---------------------------------------------------------------------------------------------- the plug-in
@register_plugin("fsa")
@dataclasses.dataclass
class FSA(Plugin):
    """FSA on top of ``base``. ``fsa=False`` switches it off (exactly the base); ``fsa_lambda`` is the sharpening λ
    (None: 3.0, 2.3 for ViT-H/14, 4.5 with ProxyCLIP's MAE VFM; SAM, DINO and DINOv2 take 3.0 / 2.3)."""

    fsa: bool = True
    fsa_lambda: float | None = None

    suffix = "fsa"
    adds = "FSA feedback self-adaptive attention in the last block"

    def __post_init__(self) -> None:
        self._check_base()
        if computes_last_layer(self.base):
            raise RfclipError(f"the fsa plug-in changes the last block's attention, but {self.base.name} computes its "
                              "last layer itself (no single attention map); use fsa with another method")
        if self.fsa_lambda is not None:
            lam = float(self.fsa_lambda)
            if not math.isfinite(lam) or lam < 0:
                raise ValueError(f"fsa_lambda must be a finite number >= 0, got {self.fsa_lambda}")
            self.fsa_lambda = lam
        self._lambda: float | None = None

    @staticmethod
    def accepts(base_cls: type) -> bool:
        """FSA replaces the last block's attention map: a base that computes its last layer itself has none."""
        return not computes_last_layer(base_cls)

    def options(self) -> dict:
        return {**self.base.options(), "fsa": self.fsa, "fsa_lambda": self.lam}

    @property
    def lam(self) -> float:
        """The λ in use."""
        if self.fsa_lambda is not None:
            return self.fsa_lambda
        return self._lambda if self._lambda is not None else default_lambda(self.base)

    @property
    def needs_text_in_forward(self) -> bool:
        return bool(self.fsa) or self.base.needs_text_in_forward

    # --- hooks: everything but the last block's attention is the base's
    def prepare(self, clip) -> None:
        self.base.prepare(clip)
        self._lambda = default_lambda(self.base, clip)

    def final_attention(self, ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        first = self.base.final_attention(ctx, q, k, v)
        if not self.fsa:
            return first
        if ctx.text_features is None:
            raise RfclipError("FSA needs the text embeddings inside the forward; pass text_features to the encoder")
        lam = self.lam
        if self.fsa_lambda is None and self._lambda is None:
            lam = default_lambda(self.base, width=ctx.width)
        with torch.autocast(ctx.images.device.type, enabled=False):
            weights = first.weights
            if weights is None:  # CLIP's own attention, made explicit
                weights = softmax_attention(q, k, ctx.scale)
            weights = weights.float()
            values = (v if first.values is None else first.values).float()
            s = 1 if first.has_cls else 0
            if weights.shape[-1] != values.shape[2]:
                raise ValueError(f"attention over {weights.shape[-1]} tokens but {values.shape[2]} values")
            patch_weights = weights[:, :, s:]  # (B, H|1, N, T): rows of the patch tokens
            row_sum = patch_weights.sum(dim=-1).mean(dim=(1, 2))  # (B,): 1, or 2 for SCLIP
            # 1. first pass from the attention branch only; 2. the uniform-attention baseline over the patch tokens
            patch_out = _attention_output_fp32(ctx, patch_weights, values)  # (B, N, C)
            mean_values = values[:, :, s:].mean(dim=2, keepdim=True) * row_sum.view(-1, 1, 1, 1)  # (B, H, 1, dh)
            uniform_out = _attention_output_fp32(ctx, torch.ones_like(mean_values[:, :1, :, :1]), mean_values)
            log_p = isolated_log_probs(_to_text_space_fp32(ctx, patch_out),
                                       _to_text_space_fp32(ctx, uniform_out)[:, 0], ctx.text_features)
            # 3.-5. correspondence, pruning, sharpened feedback attention; 6. the ensemble with the base attention
            a_fb, kept = feedback_from_log_probs(log_p, lam)
            a_ens = adaptation_ensemble(a_fb, weights, first.has_cls, row_sum)
        if ctx.record is not None:
            ctx.log("fsa_kept_fraction", kept)
            ctx.log("fsa_feedback_support", 1.0 / a_fb.square().sum(-1).mean(-1))  # effective keys per row
        return dataclasses.replace(first, weights=a_ens)
