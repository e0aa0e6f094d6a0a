"""Defocus localization of RF-CLIP (paper eq. 7-8): a two-way normalized cut of the patch graph, batched.

The graph of one crop (or one crop and head) is a symmetric non-negative affinity ``W`` (N x N). The relaxed
normalized cut (Shi & Malik 2000) is the Fiedler vector ``y`` of the generalized eigenproblem
``(D - W) y = lambda D y`` (``D = diag(W 1)``), i.e. the eigenvector of the second-smallest eigenvalue. With
``M = D^-1/2 W D^-1/2`` and ``L_sym = I - M`` this is ``y = D^-1/2 z`` where ``z`` is the eigenvector of the
second-*largest* eigenvalue of ``M``; ``y`` is scaled so that ``y^T D y = 1`` (the scaling scipy's
``eigh(L, D)`` returns), its sign is arbitrary.

Two solvers, both batched over every leading dimension (crops, heads) and run on the tensors' device in fp32:

* ``"power"`` (default): the top eigenvector of ``M`` is known exactly (``D^1/2 1``), so the operator
  ``S = (M + I) / 2 - u1 u1^T`` is positive semi-definite with ``z`` as its top eigenvector; ``S`` is squared
  ``squarings`` times (``S^(2^k)``, trace-normalised; 10 squarings = 1024 power steps) and ``z`` is read off the
  column with the largest diagonal. It is a handful of batched matmuls (no per-matrix loop), converges like
  ``(mu3 / mu2)^(2^k)`` and is what makes RF-CLIP's per-layer cut cheap on GPU.
* ``"eigh"``: ``torch.linalg.eigh`` of ``M``, exact. On CUDA, PyTorch runs a per-matrix loop of cuSOLVER
  ``syevd`` calls for N > 32 (pytorch/pytorch#174674, #175585), about a millisecond per matrix, which is
  slower than the whole ViT forward for a batch of crops; on CPU it is as fast as ``"power"``.

Thresholds (``mean``, Table 5 default, or ``otsu``) and the rule deciding which side is the foreground are
applied with masks, never with per-crop index lists.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dense import no_autocast

CUT_THRESHOLDS = ("mean", "otsu")
FG_RULES = ("max_abs", "smaller_side", "less_attended")
EIG_SOLVERS = ("power", "eigh")

_EPS = 1e-12


def symmetrize(S: Tensor) -> Tensor:
    """``(S + S^T) / 2`` over the last two axes (NCut needs a symmetric affinity)."""
    return 0.5 * (S + S.transpose(-1, -2))


def _normalized_affinity(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``M = D^-1/2 W D^-1/2``, ``D^-1/2`` (..., N) and the unit top eigenvector ``u1 = D^1/2 1 / |.|``."""
    deg = W.sum(-1).clamp_min(_EPS)  # (..., N)
    dinv = deg.rsqrt()
    M = dinv.unsqueeze(-1) * W * dinv.unsqueeze(-2)
    M = symmetrize(M)
    u1 = deg.sqrt()
    u1 = u1 / u1.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return M, dinv, u1


def _second_eigvec_power(M: Tensor, u1: Tensor, squarings: int) -> Tensor:
    """Unit eigenvector of the second-largest eigenvalue of ``M`` by repeated squaring (see module doc)."""
    N = M.shape[-1]
    eye = torch.eye(N, dtype=M.dtype, device=M.device)
    S = 0.5 * (M + eye) - u1.unsqueeze(-1) * u1.unsqueeze(-2)  # PSD, eigenvalues (lambda_i + 1) / 2, u1 -> ~0
    P = S
    for _ in range(max(0, int(squarings))):
        P = torch.matmul(P, P)
        P = symmetrize(P)
        trace = P.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
        P = P / trace[..., None, None]
    col = P.diagonal(dim1=-2, dim2=-1).argmax(-1)  # (...,) the best-conditioned column of ~ z z^T
    z = torch.gather(P, -1, col[..., None, None].expand(*P.shape[:-1], 1)).squeeze(-1)  # (..., N)
    # One plain step with S cleans the rounding of the squarings, then re-orthogonalise against u1.
    z = torch.matmul(S, z.unsqueeze(-1)).squeeze(-1)
    z = z - (z * u1).sum(-1, keepdim=True) * u1
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def fiedler_vector(W: Tensor, solver: str = "power", squarings: int = 10) -> tuple[Tensor, Tensor]:
    """Fiedler vectors of symmetric non-negative affinities ``W`` (..., N, N), batched.

    Returns ``(y, lam)``: ``y`` (..., N) fp32 with ``(D - W) y = lam D y`` and ``y^T D y = 1`` (sign arbitrary), and
    ``lam`` (...,) the second-smallest generalized eigenvalue. Graphs with fewer than 2 nodes give ``y = 0``.
    """
    if solver not in EIG_SOLVERS:
        raise ValueError(f"eig_solver must be one of {EIG_SOLVERS}, got {solver!r}")
    N = W.shape[-1]
    if N < 2:
        return torch.zeros(W.shape[:-1], dtype=torch.float32, device=W.device), torch.zeros(W.shape[:-2], device=W.device)
    with no_autocast(W.device):
        W = W.float()
        M, dinv, u1 = _normalized_affinity(W)
        if solver == "eigh":
            _, Z = torch.linalg.eigh(M)  # ascending; the largest is u1 (eigenvalue 1)
            z = Z[..., :, -2]
        else:
            z = _second_eigvec_power(M, u1, squarings)
        mu = (z * torch.matmul(M, z.unsqueeze(-1)).squeeze(-1)).sum(-1)  # Rayleigh quotient of M
        y = dinv * z
    return y, 1.0 - mu


def otsu_threshold(y: Tensor) -> Tensor:
    """Otsu's threshold of the values ``y`` (..., N), exact over the N values (no histogram). Returns (...,).

    The split maximising the between-class variance of the sorted values; the threshold is the midpoint of the
    two values on either side of it, so ``y > threshold`` is the upper class.
    """
    N = y.shape[-1]
    if N < 2:
        return y.mean(-1)
    s, _ = torch.sort(y.float(), dim=-1)
    csum = torch.cumsum(s, dim=-1)[..., :-1]  # sums of the lower class for split after index i = 0..N-2
    total = s.sum(-1, keepdim=True)
    n0 = torch.arange(1, N, device=y.device, dtype=s.dtype)
    n1 = N - n0
    mu0 = csum / n0
    mu1 = (total - csum) / n1
    between = n0 * n1 * (mu0 - mu1) ** 2
    best = between.argmax(-1, keepdim=True)  # (..., 1)
    lo = torch.gather(s, -1, best)
    hi = torch.gather(s, -1, best + 1)
    return (0.5 * (lo + hi)).squeeze(-1)


def bipartition(y: Tensor, threshold: str = "mean") -> Tensor:
    """The side ``y > t`` (bool, same shape as ``y``) with ``t`` the mean (default) or Otsu's threshold."""
    if threshold not in CUT_THRESHOLDS:
        raise ValueError(f"cut_threshold must be one of {CUT_THRESHOLDS}, got {threshold!r}")
    t = y.mean(-1) if threshold == "mean" else otsu_threshold(y)
    return y > t.unsqueeze(-1)


def foreground_side(y: Tensor, upper: Tensor, rule: str = "max_abs", col_attention: Tensor | None = None) -> Tensor:
    """Which side of the cut is the foreground (the defocused candidates). Returns a bool mask like ``upper``.

    * ``max_abs`` (TokenCut, arXiv 2202.11539): the side holding the node with the largest ``|y|``;
    * ``smaller_side``: the side with fewer nodes (ties: the upper side);
    * ``less_attended``: the side whose nodes receive less attention on average (``col_attention``, (..., N): the
      mean attention each token receives); the paper calls defocused tokens "attention-poor".
    """
    if rule not in FG_RULES:
        raise ValueError(f"fg_rule must be one of {FG_RULES}, got {rule!r}")
    lower = ~upper
    if rule == "max_abs":
        seed = y.abs().argmax(-1, keepdim=True)
        take_upper = torch.gather(upper, -1, seed)  # (..., 1)
    elif rule == "smaller_side":
        take_upper = (upper.sum(-1, keepdim=True) <= lower.sum(-1, keepdim=True))
    else:
        if col_attention is None:
            raise ValueError("fg_rule='less_attended' needs the column attention")
        a = col_attention.float()
        up_mean = (a * upper).sum(-1, keepdim=True) / upper.sum(-1, keepdim=True).clamp_min(1)
        lo_mean = (a * lower).sum(-1, keepdim=True) / lower.sum(-1, keepdim=True).clamp_min(1)
        take_upper = up_mean <= lo_mean
    return torch.where(take_upper, upper, lower)


def defocused_tokens(W: Tensor, dis: Tensor, threshold: str = "mean", rule: str = "max_abs",
                     col_attention: Tensor | None = None, solver: str = "power",
                     squarings: int = 10) -> tuple[Tensor, Tensor]:
    """``T_def``: foreground of the normalized cut of ``W`` (..., N, N) minus the distraction tokens ``dis``.

    ``dis`` (..., N) bool broadcasts against the graph batch (e.g. (B, 1, N) for per-head graphs (B, H, N, N)).
    Where the foreground holds no non-distraction token, every non-distraction token is defocused (fallback).
    Returns ``(defocused (..., N) bool, fiedler y (..., N))``.
    """
    y, _ = fiedler_vector(W, solver=solver, squarings=squarings)
    fg = foreground_side(y, bipartition(y, threshold), rule, col_attention)
    keep = ~dis
    defocused = fg & keep
    empty = ~defocused.any(-1, keepdim=True)
    return torch.where(empty, keep.expand_as(defocused), defocused), y
