"""Region-map steps of the mask tier (CorrCLIP v1), as stateless tensor functions.

A region map holds one integer id per pixel or patch; CorrCLIP's code treats the **smallest id present** as the
"unsegmented" region (0 when the map has a 0). The per-region Python loops of the official code become one-hot and
equality tensor operations here:

* :func:`nearest_indices` / :func:`resize_nearest`: ``F.interpolate(mode="nearest")`` on integer maps, exactly
  (by index, so ids above 2**24 survive, which a float round trip would not);
* :func:`connected_components`: ``DBSCAN(metric="precomputed", eps, min_samples=1)`` is the connected components of
  the graph ``d <= eps``, labelled in the order of each component's first member;
* :func:`merge_regions`: CorrCLIP's mask merging on one crop;
* :func:`scope_attention`: the scope-restricted correlation attention ``softmax(tau S)``;
* :func:`region_mode`: map correction (each region's pixels get the region's most frequent label).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import CORRCLIP_MERGE_EPS, CORRCLIP_PAD_REGION, CORRCLIP_TAU
from ..dense import no_autocast

UNSEGMENTED_RULES = ("smallest", "zero")  # official: the smallest id present; corrected: id 0 only


def nearest_indices(size_in: int, size_out: int, device=None) -> Tensor:
    """Source index of each output position of ``F.interpolate(mode="nearest")`` along one axis (size_out,)."""
    grid = torch.arange(size_in, dtype=torch.float32, device=device).view(1, 1, size_in)
    return F.interpolate(grid, size=size_out, mode="nearest")[0, 0].long()


def resize_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Integer maps (..., H, W) -> (..., h, w) as ``F.interpolate(maps.float(), size, mode="nearest")``."""
    H, W = maps.shape[-2:]
    if (H, W) == tuple(size):
        return maps
    rows = nearest_indices(H, size[0], maps.device)
    cols = nearest_indices(W, size[1], maps.device)
    return maps[..., rows[:, None], cols[None, :]]


def unsegmented_ids(maps: Tensor, rule: str = "smallest") -> Tensor:
    """The id treated as "unsegmented" in each map (B, N) -> (B,): the smallest id present (CorrCLIP's code), or 0
    (``rule="zero"``; -1, matching nothing, where a map has no 0)."""
    if rule == "smallest":
        return maps.min(dim=-1).values
    has_zero = (maps == 0).any(dim=-1)
    return torch.where(has_zero, torch.zeros_like(has_zero, dtype=maps.dtype), torch.full_like(maps[:, 0], -1))


def connected_components(adjacency: Tensor) -> Tensor:
    """Component labels (R,) 0..K-1 of the symmetric closure of a (R, R) bool graph, numbered in the order of each
    component's first node: the labels of ``DBSCAN(min_samples=1)`` (every point is a core point, so a cluster is
    everything reachable from its first unlabelled point)."""
    R = adjacency.shape[0]
    adj = adjacency | adjacency.T | torch.eye(R, dtype=torch.bool, device=adjacency.device)
    labels = torch.arange(R, device=adjacency.device)
    while True:  # min-label propagation: converges to each component's smallest member in at most R rounds
        new = torch.where(adj, labels[None, :], R).min(dim=1).values
        if torch.equal(new, labels):
            break
        labels = new
    return torch.unique(labels, return_inverse=True)[1]


def merge_regions(region_map: Tensor, features: Tensor, eps: float = CORRCLIP_MERGE_EPS,
                  rule: str = "smallest", merge_padding: bool = True) -> Tensor:
    """CorrCLIP's mask merging on one crop (CorrCLIPv1 ``VisionTransformer.forward``, "Mask Merging").

    ``region_map`` (N,) int64 ids on the VFM grid, ``features`` (N, c) L2-normalised VFM features. With more than
    two ids present: each region's mean feature, L2-normalised; the unsegmented region (the smallest id) is left
    out; ``d = max(sim) - sim`` over the cosine similarities of the others; DBSCAN(eps, min_samples=1) on ``d``;
    region r of cluster c gets id ``c + 10000``. The crop's padding (id 10000) is a region like any other and is
    merged and renumbered with them (the code's behaviour); ``merge_padding=False`` keeps it out of the merging, with
    its own id, and numbers the clusters from 10001 so that none takes it. Returns the merged map (N,) int64.
    """
    values, inverse = torch.unique(region_map, return_inverse=True)
    if values.numel() <= 2:
        return region_map
    onehot = F.one_hot(inverse, values.numel()).T.to(features.dtype)  # (R, N)
    means = F.normalize((onehot @ features) / onehot.sum(dim=1, keepdim=True), dim=-1)  # (R, c)
    merged = torch.ones_like(values, dtype=torch.bool)
    if rule == "smallest" or int(values[0]) == 0:
        merged[0] = False  # the unsegmented region keeps its id
    base = CORRCLIP_PAD_REGION
    if not merge_padding and bool((values[merged] == CORRCLIP_PAD_REGION).any()):
        merged &= values != CORRCLIP_PAD_REGION
        base += 1
    new_values = values.clone()
    if bool(merged.any()):
        kept = means[merged]
        sim = kept @ kept.T
        new_values[merged] = connected_components((sim.max() - sim) <= eps).to(values.dtype) + base
    return new_values[inverse]


def scope_attention(features: Tensor, region_maps: Tensor, tau: float = CORRCLIP_TAU,
                    rule: str = "smallest") -> Tensor:
    """CorrCLIP's scope-restricted correlation attention (Value Reconstruction + Scope Reconstruction).

    ``features`` (B, N, c) L2-normalised VFM features, ``region_maps`` (B, N) ids (after merging). ``S = F Fᵀ``;
    pair (i, j) is allowed when i and j are in the same region other than the unsegmented one, or when either is in
    the unsegmented region and ``S_ij > mean(S)`` (the mean over all N x N pairs of the crop). Returns
    ``softmax(tau S)`` over the allowed pairs, (B, 1, N, N) fp32.
    """
    with no_autocast(features.device):
        f = features.float()
        sim = torch.matmul(f, f.transpose(-1, -2))  # (B, N, N)
        unseg = region_maps == unsegmented_ids(region_maps, rule)[:, None]  # (B, N)
        same = region_maps[:, :, None] == region_maps[:, None, :]
        same &= ~unseg[:, :, None]
        either = unseg[:, :, None] | unseg[:, None, :]
        allowed = same | (either & (sim > sim.mean(dim=(-2, -1), keepdim=True)))
        return (tau * sim).masked_fill_(~allowed, float("-inf")).softmax(dim=-1).unsqueeze(1)


def dense_ids(region_maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-map dense region indices: ``(index (B, N) in 0..R_b-1 in the order of the ids, counts R_b (B,))``."""
    out, counts = [], []
    for m in region_maps:
        values, inverse = torch.unique(m, return_inverse=True)
        out.append(inverse)
        counts.append(values.numel())
    return torch.stack(out), torch.tensor(counts, device=region_maps.device)


def region_mode(labels: Tensor, region_map: Tensor, rule: str = "smallest") -> Tensor:
    """Map correction: every region's pixels take its most frequent label (ties: the smallest label, as CPU
    ``torch.mode``); the unsegmented region keeps its labels (CorrCLIP's code skips the smallest id, so a map with
    no 0 leaves its first region uncorrected; ``rule="zero"`` skips id 0 only). ``labels`` (H, W) long,
    ``region_map`` (H, W) int -> (H, W) long."""
    values, inverse = torch.unique(region_map.reshape(-1), return_inverse=True)
    flat = labels.reshape(-1).long()
    C = int(flat.max()) + 1 if flat.numel() else 1
    counts = torch.bincount(inverse * C + flat, minlength=values.numel() * C).view(values.numel(), C)
    corrected = counts.argmax(dim=1)[inverse]
    keep = values[inverse] == (values[0] if rule == "smallest" else 0)
    return torch.where(keep, flat, corrected).view_as(labels)
