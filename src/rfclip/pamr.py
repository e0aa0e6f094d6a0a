"""PAMR: Pixel-Adaptive Mask Refinement (Araslanov & Roth, CVPR 2020; https://github.com/visinf/1-stage-wseg).

NACLIP refines its cosine-logit maps with PAMR before the logit scale and the softmax (protocol §7). For each
pixel i and each dilation d, the 8 neighbours j on the 3 x 3 stencil dilated by d (replicate padding) get

    a_ij = mean_c( -|I_c(i) - I_c(j)| / (1e-8 + 0.1 * sigma_c(i)) ),    w_ij = softmax_j(a_ij)

where sigma_c(i) is the unbiased standard deviation of the 9 * |dilations| stencil values of channel c (the centre
counted once per dilation). The mask is then smoothed ``num_iter`` times with ``M_i <- sum_j w_ij M_j``.

This implementation gives the same numbers as the reference module but is memory-bounded: the weights (16, H, W)
are computed once per image, shifted neighbours are slices of one replicate-padded tensor (no unfold, no
(C, 16, H, W) intermediate), and the mask channels are refined in chunks. Everything is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import PAMR_DILATIONS, PAMR_STEPS

# Upper bound on the number of fp32 elements of one mask chunk (C_chunk * H * W): 2**26 elements = 256 MiB.
# A chunk needs about three such buffers (padded mask, new mask, interpolated input), so a 3000 x 4000 image
# with 21 classes runs in about 2.5 GB in addition to the output.
_MAX_CHUNK_ELEMS = 1 << 26


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the 8 neighbours per dilation, in stencil order, dilations in the given order."""
    out = []
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    out.append((dy, dx))
    return out


def _check_dilations(dilations: Sequence[int]) -> list[int]:
    dilations = [int(d) for d in dilations]
    if not dilations or min(dilations) < 1:
        raise ValueError(f"PAMR dilations must be positive integers, got {dilations}")
    return dilations


def _shifted(padded: Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """View of ``padded[..., pad + dy + y, pad + dx + x]`` for y < h, x < w (a slice, no copy)."""
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def pamr_weights(image: Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """The PAMR neighbour weights of one guidance image.

    Args:
        image: (K, H, W) guidance image (normalised; any number of channels K >= 1).
        dilations: the stencil dilations.

    Returns:
        (8 * len(dilations), H, W) fp32 weights, non-negative, summing to 1 over the first dimension. Neighbour
        ``j`` is at the offset ``_offsets(dilations)[j]``.
    """
    if image.dim() != 3:
        raise ValueError(f"pamr_weights expects a (K, H, W) image, got shape {tuple(image.shape)}")
    dilations = _check_dilations(dilations)
    k, h, w = image.shape
    pad = max(dilations)
    offsets = _offsets(dilations)
    # Stencil incl. the centre once per dilation, for the local standard deviation.
    stencil = [(0, 0)] * len(dilations) + offsets
    n = len(stencil)

    img = image.float()
    aff = torch.zeros((len(offsets), h, w), dtype=torch.float32, device=image.device)
    for c in range(k):
        # Replicate padding by max(d) then slicing equals replicate padding by d: both clamp the index.
        p = F.pad(img[c][None, None], [pad] * 4, mode="replicate")[0, 0]
        # Two-pass unbiased standard deviation over the n stencil values (as torch.std in the reference).
        mean = torch.zeros((h, w), dtype=torch.float32, device=image.device)
        for dy, dx in stencil:
            mean += _shifted(p, pad, dy, dx, h, w)
        mean /= n
        var = torch.zeros_like(mean)
        for dy, dx in stencil:
            diff = _shifted(p, pad, dy, dx, h, w) - mean
            var.addcmul_(diff, diff)
        var /= n - 1
        denom = var.sqrt_().mul_(0.1).add_(1e-8)  # (1e-8 + 0.1 * sigma)
        centre = img[c]
        for j, (dy, dx) in enumerate(offsets):
            # aff_j -= |I_i - I_j| / denom / K   (the mean over channels of the negative affinity)
            aff[j].sub_((centre - _shifted(p, pad, dy, dx, h, w)).abs_().div_(denom), alpha=1.0 / k)
    # In-place softmax over the neighbours.
    aff -= aff.amax(dim=0, keepdim=True)
    aff.exp_()
    aff /= aff.sum(dim=0, keepdim=True)
    return aff


def pamr(
    image: Tensor,
    logits: Tensor,
    num_iter: int = PAMR_STEPS,
    dilations: Sequence[int] = PAMR_DILATIONS,
    channel_chunk: int = 32,
) -> Tensor:
    """Refine logit maps with PAMR.

    Args:
        image: (B, K, H, W) normalised guidance image (K = 3 for RGB).
        logits: (B, Q, H', W') maps; bilinearly resized to (H, W) with ``align_corners=True`` first.
        num_iter: number of refinement steps.
        dilations: stencil dilations (8 neighbours each).
        channel_chunk: at most this many mask channels are refined at once (the chunk is also capped so that one
            chunk holds at most 2**26 fp32 values, which bounds memory on very large images).

    Returns:
        (B, Q, H, W) refined maps on ``image``'s device, in ``logits``' dtype (computed in fp32).
    """
    if image.dim() != 4 or logits.dim() != 4:
        raise ValueError(
            f"pamr expects image (B, K, H, W) and logits (B, Q, H', W'), got {tuple(image.shape)} and "
            f"{tuple(logits.shape)}"
        )
    if image.shape[0] != logits.shape[0]:
        raise ValueError(f"pamr: batch sizes differ (image {image.shape[0]}, logits {logits.shape[0]})")
    if num_iter < 0:
        raise ValueError(f"pamr: num_iter must be >= 0, got {num_iter}")
    if channel_chunk < 1:
        raise ValueError(f"pamr: channel_chunk must be >= 1, got {channel_chunk}")
    dilations = _check_dilations(dilations)  # before max(dilations) below
    b, _, h, w = image.shape
    q = logits.shape[1]
    device = image.device
    out = torch.empty((b, q, h, w), dtype=logits.dtype, device=device)
    chunk = max(1, min(channel_chunk, _MAX_CHUNK_ELEMS // max(1, h * w)))
    pad = max(dilations)
    offsets = _offsets(dilations)

    for bi in range(b):
        weights = pamr_weights(image[bi], dilations)  # (P, H, W)
        for q0 in range(0, q, chunk):
            q1 = min(q, q0 + chunk)
            m = logits[bi : bi + 1, q0:q1].to(device=device, dtype=torch.float32)
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)
            m = m[0]  # (C, H, W)
            for _ in range(num_iter):
                p = F.pad(m[None], [pad] * 4, mode="replicate")[0]
                new = torch.zeros_like(m)
                for j, (dy, dx) in enumerate(offsets):
                    new.addcmul_(_shifted(p, pad, dy, dx, h, w), weights[j])
                del p
                m = new
            out[bi, q0:q1] = m.to(logits.dtype)
    return out
