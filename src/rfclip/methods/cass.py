"""CASS's text and logit extras (Kim et al., CVPR 2025, "Distilling Spectral Graph for Object-Context Aware
Open-Vocabulary Semantic Segmentation"), as the released RF-CLIP code uses them (spec rf-clip-released-code.md §2):

* :func:`complete_linkage_clusters`: the query names grouped by complete-linkage hierarchical clustering of their
  cosine distances, cut at ``h_threshold`` (SciPy's ``fcluster(linkage(d, "complete"), t, "distance")``);
* :func:`nudge_cluster_text`: in each cluster, the name the [CLS] scores highest is moved towards the mean of its
  top-2 patch features (``mean_vector_weight``);
* :func:`blend_global_logits`: patch logits blended with the [CLS]-text similarity (``global_semantics_weight``).

Pure functions with shapes in the docstrings; everything per crop is batched over crops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_distances(text_features: Tensor) -> np.ndarray:
    """``clip(1 - cos(T_a, T_b), 0, 2)`` between all rows of ``text_features`` (Q, D), float64, zero diagonal,
    exactly symmetric (as sklearn's ``cosine_distances(X)``). Returns (Q, Q)."""
    t = F.normalize(text_features.detach().double().cpu(), dim=-1).numpy()
    d = np.clip(1.0 - t @ t.T, 0.0, 2.0)
    upper = np.triu(d, 1)
    return upper + upper.T


def complete_linkage_clusters(distances: np.ndarray, threshold: float) -> np.ndarray:
    """Flat clusters of complete-linkage agglomerative clustering cut at ``threshold``: two clusters merge while
    the largest distance between their members is ``<= threshold`` (SciPy's ``fcluster(linkage(squareform(d),
    "complete"), t=threshold, criterion="distance")``; complete linkage has no inversions, so stopping at the first
    merge above the threshold is that cut). ``distances`` (Q, Q) symmetric. Returns (Q,) int64 labels 0..K-1,
    numbered in order of each cluster's first member. Exact ties between merge distances are broken by the lowest
    index pair (SciPy may order them otherwise; real embeddings have none).
    """
    n = distances.shape[0]
    d = np.array(distances, dtype=np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    owner = np.arange(n)  # the cluster (its representative row) of each name
    for _ in range(n - 1):
        flat = int(np.argmin(d))
        i, j = divmod(flat, n)
        if not d[i, j] <= threshold:
            break
        merged = np.maximum(d[i], d[j])  # complete linkage: the farthest pair
        d[i, :] = merged
        d[:, i] = merged
        d[i, i] = np.inf
        d[j, :] = np.inf
        d[:, j] = np.inf
        owner[owner == j] = i
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(int(o), len(ids)) for o in owner], dtype=np.int64)


def cluster_members(labels: np.ndarray | Tensor, device=None) -> Tensor:
    """(Q,) cluster labels 0..K-1 -> (K, Q) bool membership."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    return labels.unsqueeze(0) == torch.arange(int(labels.max()) + 1, device=labels.device).unsqueeze(1)


def nudge_cluster_text(features: Tensor, scores: Tensor, text_features: Tensor, members: Tensor, weight: float,
                       topk: int = 2) -> Tensor:
    """CASS's per-crop text adjustment. ``features`` (B, N, D) L2-normalised patch features, ``scores`` (B, Q) the
    [CLS]-text similarities, ``text_features`` (Q, D) L2-normalised, ``members`` (K, Q) bool clusters.

    In each cluster the name with the highest score (the first on ties) becomes
    ``normalize((1 - weight) t + weight * normalize(mean of the topk patch features most similar to t))``; every
    other name keeps its embedding. Returns the adjusted text embeddings per crop (B, Q, D).
    """
    B, N, D = features.shape
    masked = scores.unsqueeze(1).masked_fill(~members.unsqueeze(0), float("-inf"))  # (B, K, Q)
    best = masked.argmax(dim=-1)  # (B, K) the best name of each cluster
    K = best.shape[1]
    chosen = F.normalize(text_features[best], dim=-1)  # (B, K, D)
    sims = torch.matmul(F.normalize(features, dim=-1), chosen.transpose(1, 2))  # (B, N, K)
    k = min(int(topk), N)
    top = sims.topk(k, dim=1).indices  # (B, k, K)
    picked = torch.gather(features, 1, top.reshape(B, k * K, 1).expand(-1, -1, D)).reshape(B, k, K, D)
    mean_vector = F.normalize(picked.mean(dim=1), dim=-1)  # (B, K, D)
    adjusted = F.normalize((1.0 - weight) * chosen + weight * mean_vector, dim=-1)
    out = text_features.unsqueeze(0).expand(B, -1, -1).clone()  # (B, Q, D)
    out.scatter_(1, best.unsqueeze(-1).expand(-1, -1, D), adjusted)
    return out


def blend_global_logits(features: Tensor, text_per_crop: Tensor, scores: Tensor, weight: float) -> Tensor:
    """``(1 - weight) <F_n, T'_c> + weight * g_c``: ``features`` (B, N, D), ``text_per_crop`` (B, Q, D), ``scores``
    g (B, Q). Returns (B, N, Q)."""
    logits = torch.matmul(features, text_per_crop.transpose(1, 2))  # (B, N, Q)
    return logits * (1.0 - weight) + scores.unsqueeze(1) * weight
