"""RF-CLIP's pure tensor steps (stateless, shapes in the docstrings), tested alone:

* distractor localization, eq. 6: :func:`channel_weights`, :func:`distraction_scores`;
* embedding redistribution, eq. 13: :func:`neighbourhood_mean`, :func:`embed_redistribute` (and the Table 1
  alternatives :func:`neighbourhood_median`, :func:`lowpass_clamp`);
* attention redistribution, eq. 9-12 (attenuation factor ``beta``): :func:`redistribute_attention`;
* the Table 4 (II) control :func:`random_like_count`.

Defocus localization (eq. 7-8, the normalized cut) lives in :mod:`rfclip.methods.defocus`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dense import no_autocast

PHI_NORMS = ("minshift", "abs", "raw")
EMBED_PADDINGS = ("valid", "zero")


def channel_weights(x: Tensor, norm: str = "minshift", channels: Tensor | None = None) -> Tensor:
    """Embedding weights ``w[j] = g[j] / sum_k g[k]`` of tokens ``x`` (..., C), fp32, for all channels or only
    ``channels`` (k indices) -> (..., C) or (..., k). The one normalisation of eq. 6, also used by calibration.

    ``minshift`` (default, the released code): ``g = x - min x``, a distribution over channels, so ``tau = 5/d``
    means "five times the uniform share"; ``abs``: ``g = |x|``; ``raw``: ``g = x``, the paper's literal eq. 6 (the
    signed channel sum can be near zero or negative; non-finite weights are clipped to +-1e4).
    Sums accumulate in fp32 without an fp32 copy of the stream (an fp16 sum over a token with massive
    activations would overflow to inf and hide every distraction token).
    """
    C = x.shape[-1]
    sel = x if channels is None else x.index_select(-1, channels)
    if norm == "minshift":
        mn = x.amin(-1, keepdim=True).float()
        den = x.sum(-1, keepdim=True, dtype=torch.float32) - C * mn
        return (sel.float() - mn) / den.clamp_min(1e-8)
    if norm == "abs":
        den = x.abs().sum(-1, keepdim=True, dtype=torch.float32)
        return sel.abs().float() / den.clamp_min(1e-8)
    if norm == "raw":
        den = x.sum(-1, keepdim=True, dtype=torch.float32)
        return torch.nan_to_num(sel.float() / den, nan=0.0, posinf=1e4, neginf=-1e4)
    raise ValueError(f"phi_norm must be one of {', '.join(PHI_NORMS)}, got {norm!r}")


def distraction_scores(patches: Tensor, dims: Tensor, norm: str = "minshift") -> Tensor:
    """eq. 6: ``phi_i = max_{j in dims} w_i[j]`` for tokens ``patches`` (B, N, C). Returns (B, N) fp32."""
    return channel_weights(patches, norm, dims).amax(-1)


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


def redistribute_attention(A: Tensor, dis: Tensor, target: Tensor | None, beta: float, to_cls: bool = False,
                           cls_row: bool = False) -> Tensor:
    """eq. 9-12 on attention weights ``A`` (B, H, 1+N, 1+N), row-stochastic. Computed in fp32 (also under
    autocast); an fp32 ``A`` is changed **in place** and returned, any other dtype is copied to fp32 first.

    ``dis`` and ``target`` are (B, N) masks shared by the heads or (B, H, N) per head; ``T_def`` must not
    intersect ``T_dis``. For every patch query row ``r`` (and the [CLS] row when ``cls_row``):
    ``A'[r, j] = (1 - beta) A[r, j]`` for ``j`` in ``T_dis``; the budget ``beta * sum_{T_dis} A[r, :]`` is added
    to the ``T_def`` columns in proportion to ``A[r, j]`` (``to_cls``: all of it to column 0). Row sums are kept;
    a row whose target weights are all zero is left unchanged, so is every crop with an empty ``T_dis`` or
    ``T_def``. Only patch columns shrink; the [CLS] column changes only with ``to_cls``.
    """
    A = A.float()  # no copy when A is already fp32 (the maps of dense.softmax_attention are)
    r0 = 0 if cls_row else 1
    P = A[:, :, r0:, 1:]  # (B, H, R, N) view
    md = dis.float()
    md = md.unsqueeze(1) if md.dim() == 2 else md  # (B, 1|H, N)
    with no_autocast(A.device):  # the masked sums in fp32 whatever the autocast state
        if to_cls:
            dis_mass = torch.matmul(P, md.unsqueeze(-1))  # (B, H, R, 1)
            A[:, :, r0:, :1] += beta * dis_mass
            P.mul_(1.0 - beta * md.unsqueeze(-2))
            return A
        mt = target.float()
        mt = mt.unsqueeze(1) if mt.dim() == 2 else mt  # (B, 1|H, N)
        masks = torch.stack(torch.broadcast_tensors(md, mt), dim=-1)  # (B, 1|H, N, 2): both sums in one product
        mass = torch.matmul(P, masks)  # (B, H, R, 2)
        dis_mass, tgt_mass = mass[..., :1], mass[..., 1:]
        ok = (tgt_mass > 1e-30).float()
        ratio = ok * beta * dis_mass / tgt_mass.clamp_min(1e-30)  # (B, H, R, 1)
        # factor - 1 = -beta ok (x) md + ratio (x) mt: a rank-2 product, then P += P * (factor - 1) in place (one
        # (B, H, R, N) temporary instead of the three a broadcast sum of the terms would allocate)
        rows = torch.cat([-beta * ok, ratio], dim=-1)  # (B, H, R, 2), paired with masks (dis, target)
        P.addcmul_(P, torch.matmul(rows, masks.transpose(-1, -2)))
    return A


def random_like_count(dis: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random token set per crop with as many tokens as ``dis`` (B, N) has (Table 4 (II) control)."""
    B, N = dis.shape
    scores = torch.rand(B, N, generator=generator, device=dis.device)
    rank = scores.argsort(-1).argsort(-1)
    return rank < dis.sum(-1, keepdim=True)
