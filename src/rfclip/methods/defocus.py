"""Defocus localization of RF-CLIP (paper eq. 7-8): a two-way normalized cut of the patch graph, batched.

The graph of one crop (or one crop and head) is a symmetric non-negative affinity ``W`` (N x N). The relaxed
normalized cut (Shi & Malik 2000) is the Fiedler vector ``y`` of the generalized eigenproblem
``(D - W) y = lambda D y`` (``D = diag(W 1)``), i.e. the eigenvector of the second-smallest eigenvalue. With
``M = D^-1/2 W D^-1/2`` and ``L_sym = I - M`` this is ``y = D^-1/2 z`` where ``z`` is the eigenvector of the
second-*largest* eigenvalue ``mu2`` of ``M``; ``y`` is scaled so that ``y^T D y = 1`` (the scaling scipy's
``eigh(L, D)`` returns), its sign is arbitrary. The **eigengap** is ``lambda3 - lambda2 = mu2 - mu3``.

Three solvers, all batched over every leading dimension (crops, heads) and run on the tensors' device in fp32:

* ``"lanczos"`` (RF-CLIP's default): Krylov steps (Lanczos with full re-orthogonalisation, in ``u1``'s complement)
  from a start vector, Rayleigh-Ritz on the Krylov basis after 12 steps and every 8 from there up to
  ``lanczos_max_steps``; a graph stops at its first check where the Ritz vector ``z`` has a residual
  ``|M z - mu z|`` of at most ``tol``. RF-CLIP starts each layer from the previous layer's Fiedler vector (the
  graph is the key-key attention averaged over the layers so far, so it changes little from one layer to the
  next): on planted ViT-B/16 graphs 12 steps suffice, against about 10 squarings of a 196 x 196 matrix. The
  eigengap is then **proved**, not estimated (:func:`_certify_gap`): for a shift ``sigma``, ``sigma I - M`` plus
  the rank-2 positive semi-definite ``2 u1 u1^T + 2 z z^T`` has a Cholesky factorisation only if ``mu3`` is below
  ``sigma`` (plus the factorisation's rounding bound), whatever ``z`` is, and the Rayleigh quotient ``mu`` of a unit
  ``z`` orthogonal to ``u1`` is at most ``mu2``, so ``mu2 - mu3 > mu - sigma``. The shift is a tenth of the
  Ritz gap above the second Ritz value (fp32 factorisation, whose rounding bound is about 1e-3 for N = 196), and
  where that fails, just low enough to decide ``gap >= gap_tol`` (fp64). Graphs without both (residual and proved
  gap) go to ``"power"`` (and from there to ``eigh``).

  **Why the cut is decided as with** ``"power"``: a graph's cut depends on (a) whether its eigengap is at least
  ``gap_tol`` (else no graph-cut choice) and (b) the sign pattern of ``y - mean(y)``. (a) ``"power"`` accepts a
  graph only with a proved gap of at least ``gap_tol`` and otherwise lets ``eigh`` decide on the exact gap;
  ``"lanczos"`` accepts a graph only with such a proof too (a different, equally sound proof) and otherwise
  hands it to ``"power"``: either way a graph is called degenerate iff its exact gap is below ``gap_tol``. (b)
  Both accept a vector only with a residual of at most ``tol`` next to a proved gap ``g``, so both are within
  ``tol / g`` of the exact eigenvector (Davis-Kahan): they can differ only on tokens that close to the threshold,
  which fp32 does not decide for either solver (``benchmarks/fiedler.py``: one token 4e-6 from the threshold on
  33 unstructured graphs, where fp32 rounding of the graph alone moves ``y`` by 1.5e-5).
* ``"power"``: the top eigenvector of ``M`` is known exactly (``u1 = D^1/2 1``), so the operator
  ``S = (M + I) / 2 - u1 u1^T`` is positive semi-definite with ``z`` as its top eigenvector. ``S`` is squared
  (``S^(2^k)``, trace-normalised), which converges like ``((1 + mu3) / (1 + mu2))^(2^k)``: the shift that makes
  ``S`` semi-definite shrinks the relative gap, so graphs with a small gap need many squarings (random-weight
  ViT-B/16 graphs: up to 13-14, i.e. 16384 power steps). After ``min_squarings`` and after every squaring
  from there on, ``z`` is read off ``S^(2^k)`` (the column with the largest diagonal, one plain step with
  ``S``) and its residual ``|M z - mu z|`` (``mu`` its Rayleigh quotient) is checked; a graph stops once the
  residual is at most ``tol`` **and** the same power certifies that its eigengap is at least ``gap_tol`` (the
  share of ``S^(2^k)`` outside ``z`` bounds ``((1 + mu3) / (1 + mu2))^(2^k)``; see :func:`_read_power`).
  Graphs that are not done after ``max_squarings`` are solved again with ``torch.linalg.eigh`` (the fallback):
  unconverged graphs, and every graph whose gap is too small to certify, degenerate ones included, which are
  therefore always decided on their exact gap. All of it is batched matmuls: no per-matrix loop except the
  fallback.
* ``"eigh"``: ``torch.linalg.eigh`` of ``M``, exact. On CUDA, PyTorch runs a per-matrix loop of cuSOLVER
  ``syevd`` calls for N > 32 (pytorch/pytorch#174674, #175585), about a millisecond per matrix, which is
  slower than the whole ViT forward for a batch of crops. ``benchmarks/fiedler.py`` compares the two.

**Degenerate graphs.** Where the eigengap is below ``gap_tol`` (all-equal or nearly equal tokens, or any graph
without a dominant two-way structure) the Fiedler vector is not determined: any vector of the (near-)degenerate
eigenspace is as good, and an unconverged power vector tends to single out one token. There the cut makes no
choice: :func:`defocused_tokens` returns every non-distraction token (the same rule as an empty foreground; Table
6's "to non-distraction tokens"), whichever solver ran.

**Subgraphs.** ``valid`` (..., N) restricts the graph to some nodes (RF-CLIP's ``cut_graph="non_distraction"``):
the other nodes lose all their edges and get the eigenvalue -1 in ``M`` (the bottom of the spectrum), so they
never take part in the cut; their ``y`` is 0 and they are left out of the threshold and the side rules.

Thresholds (``mean``, Table 5 default, or ``otsu``) and the rule deciding which side is the foreground are
applied with masks, never with per-crop index lists.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from ..constants import (RF_EIGENGAP_TOL, RF_FIEDLER_RESIDUAL_TOL, RF_LANCZOS_MAX_STEPS, RF_POWER_MAX_SQUARINGS,
                         RF_POWER_MIN_SQUARINGS)
from ..dense import no_autocast

CUT_THRESHOLDS = ("mean", "otsu")
FG_RULES = ("fewer_distraction", "max_abs", "smaller_side", "less_attended")
EIG_SOLVERS = ("lanczos", "power", "eigh")
CUT_GRAPHS = ("all", "non_distraction")

_EPS = 1e-12
_LANCZOS_FIRST_CHECK = 12  # Krylov steps before the first Ritz check (benchmarks/fiedler.py: enough from a warm start)
_LANCZOS_CHECK_EVERY = 8
_RHO_FLOOR = 1e-5  # smallest trace share outside z the gap bound trusts (fp32 rounding of S^(2^k) is ~1e-7)


class Fiedler(NamedTuple):
    """Fiedler vectors of a batch of graphs (every field has the graphs' leading shape ``...``)."""

    y: Tensor  # (..., N) fp32, (D - W) y = lam D y, y^T D y = 1, sign arbitrary; 0 on nodes outside the graph
    lam: Tensor  # (...,) second-smallest generalized eigenvalue lambda2 = 1 - mu2
    gap: Tensor  # (...,) eigengap lambda3 - lambda2: exact where eigh solved, else a certified lower bound
    residual: Tensor  # (...,) |M z - mu z| of the unit eigenvector z = D^1/2 y (the solver's accuracy)
    eigh_used: Tensor  # (...,) bool: solved by torch.linalg.eigh (solver="eigh", or the power solver's fallback)


def symmetrize(S: Tensor) -> Tensor:
    """``(S + S^T) / 2`` over the last two axes (NCut needs a symmetric affinity)."""
    return 0.5 * (S + S.transpose(-1, -2))


def _normalized_affinity(W: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``M = D^-1/2 W D^-1/2``, ``D^-1/2`` (..., N) and the unit top eigenvector ``u1 = D^1/2 1 / |.|``.

    Nodes outside ``valid`` lose their edges and get ``M_ii = -1`` (the bottom of the spectrum, never the cut).
    """
    if valid is not None:
        vf = valid.to(W.dtype)
        W = W * vf.unsqueeze(-1) * vf.unsqueeze(-2)
    deg = W.sum(-1).clamp_min(_EPS)  # (..., N)
    dinv = deg.rsqrt()
    M = dinv.unsqueeze(-1) * W * dinv.unsqueeze(-2)
    M = symmetrize(M)
    u1 = deg.sqrt()
    if valid is not None:
        M = M - torch.diag_embed((~valid).to(M.dtype))
        u1 = u1 * vf
        dinv = dinv * vf
    u1 = u1 / u1.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return M, dinv, u1


def _matvec(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` for symmetric ``A`` (G, N, N) and ``x`` (G, N), computed as the row-vector product ``x^T A``: on
    CPU a batched (1, N) x (N, N) product is about 7x faster than (N, N) x (N, 1) (which falls back to a slow
    batched gemv); every matrix the solver multiplies (M, S and the powers of S) is symmetric."""
    return torch.matmul(x.unsqueeze(-2), A).squeeze(-2)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _top_column(P: Tensor) -> Tensor:
    """The column of ``P`` (G, N, N) with the largest diagonal entry, (G, N): the best-conditioned column of
    a matrix close to ``z z^T``."""
    col = P.diagonal(dim1=-2, dim2=-1).argmax(-1)
    return torch.gather(P, -1, col[:, None, None].expand(*P.shape[:-1], 1)).squeeze(-1)


def _read_power(P: Tensor, S: Tensor, M: Tensor, u1: Tensor,
                squarings: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From ``P ~ S^(2^k)`` (G, N, N), trace 1, ``k = squarings``: the unit eigenvector estimate ``z``, its
    Rayleigh quotient ``mu``, its residual ``|M z - mu z|`` and a lower bound of the eigengap (all (G, ...)).

    Gap bound: the trace ``P`` keeps outside ``z``, ``rho = 1 - z^T P z``, is at least the share of the other
    eigenvectors, so ``((1 + mu3) / (1 + mu2))^(2^k) <= rho / (1 - rho)`` and ``mu2 - mu3 >= (1 + mu2) (1 - c)``
    with ``c = (rho / (1 - rho))^(2^-k)``. ``rho`` is floored at ``_RHO_FLOOR`` (well above the fp32 rounding of
    ``P``), so a rounded-away share never certifies a gap.
    """
    z = _matvec(S, _top_column(P))  # one plain step with S cleans the rounding of the squarings
    z = _unit(z - (z * u1).sum(-1, keepdim=True) * u1)
    Mz = _matvec(M, z)
    mu = (z * Mz).sum(-1)
    residual = (Mz - mu.unsqueeze(-1) * z).norm(dim=-1)
    rho = (1.0 - (z * _matvec(P, z)).sum(-1)).clamp(_RHO_FLOOR, 0.5)
    c = (rho / (1.0 - rho)) ** (0.5 ** squarings)
    return z, mu, residual, (1.0 + mu) * (1.0 - c)


def _power_solve(M: Tensor, u1: Tensor, min_squarings: int, max_squarings: int, tol: float,
                 gap_tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Repeated squaring with a residual stopping rule, for graphs (G, N, N). Returns ``(z, mu, gap, residual,
    converged)``; a graph stops at the first check where its residual is at most ``tol`` and its certified
    eigengap (a lower bound, returned as ``gap``) at least ``gap_tol``."""
    G, N = M.shape[0], M.shape[-1]
    eye = torch.eye(N, dtype=M.dtype, device=M.device)
    S_all = 0.5 * (M + eye) - u1.unsqueeze(-1) * u1.unsqueeze(-2)  # PSD, eigenvalues (mu_i + 1) / 2, u1 -> 0
    z_out = torch.zeros(G, N, dtype=M.dtype, device=M.device)
    mu_out = torch.zeros(G, dtype=M.dtype, device=M.device)
    gap_out = torch.zeros(G, dtype=M.dtype, device=M.device)
    res_out = torch.full((G,), float("inf"), dtype=M.dtype, device=M.device)
    active = torch.arange(G, device=M.device)  # graphs still iterating
    S, Ma, ua, P = S_all, M, u1, S_all
    first_check = max(0, min(int(min_squarings), int(max_squarings)))
    for k in range(int(max_squarings) + 1):
        if k > 0:
            P2 = torch.matmul(P, P)
            trace = P2.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)  # = trace of its symmetric part
            P = (P2 + P2.transpose(-1, -2)).mul_((0.5 / trace)[:, None, None])  # symmetrized, trace 1, one temporary
        if k < first_check:
            continue
        z, mu, res, gap = _read_power(P, S, Ma, ua, k)
        done = (res <= tol) & (gap >= gap_tol)
        if k == int(max_squarings):
            done = torch.ones_like(done)  # the last check records everything (unconverged: res > tol)
        if bool(done.any()):
            idx = active[done]
            z_out[idx], mu_out[idx], res_out[idx], gap_out[idx] = z[done], mu[done], res[done], gap[done]
            keep = ~done
            active, S, Ma, ua, P = active[keep], S[keep], Ma[keep], ua[keep], P[keep]
        if active.numel() == 0:
            break
    return z_out, mu_out, gap_out, res_out, (res_out <= tol) & (gap_out >= gap_tol)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the block on one CPU thread (then restore the count). The lanczos solver is a few hundred small
    operations ((1, N) x (N, N) products, vector updates, element-wise passes over G x N x N), too small to share
    between threads, and each multi-threaded one waits until every thread has been scheduled: on the 2-core VM
    shared with other jobs that ``benchmarks/README.md`` describes, 8 graphs took 150 ms with 2 threads and 15 ms
    with one."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cold_start(N: int, device: torch.device) -> Tensor:
    """The Krylov start without a warm start: a fixed pseudo-random vector (N,), the same for every graph and call
    (a crop's result must not depend on its batch)."""
    return torch.randn(N, generator=torch.Generator().manual_seed(0)).to(device)


def _lanczos_solve(M: Tensor, u1: Tensor, start: Tensor, max_steps: int,
                   tol: float, gap_tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Krylov (Lanczos with full re-orthogonalisation) + Rayleigh-Ritz from ``start`` (G, N) in ``u1``'s
    complement, for graphs (G, N, N). Returns ``(z, mu, gap, residual, certified)``; ``certified``: the residual is
    at most ``tol`` and the eigengap is proved to be at least ``gap_tol`` (``gap``, a lower bound), see
    :func:`_certify_gap`. The Ritz vector is checked after ``_LANCZOS_FIRST_CHECK`` steps and every
    ``_LANCZOS_CHECK_EVERY`` from there up to ``max_steps``; a graph stops at its first check with a residual of at
    most ``tol``."""
    G, N = u1.shape
    m = max(1, min(int(max_steps), N - 1))
    checks = set(range(min(_LANCZOS_FIRST_CHECK, m), m, _LANCZOS_CHECK_EVERY)) | {m}
    basis = M.new_zeros(G, m + 1, N)  # rows: u1, then the orthonormal Krylov basis in u1's complement
    basis[:, 0] = u1
    MV = M.new_zeros(G, m, N)  # M applied to the Krylov basis
    z_out, theta_out = torch.zeros_like(u1), u1.new_zeros(G, 2)
    active = torch.arange(G, device=M.device)  # graphs still iterating
    Ma = M
    v = torch.where(start.norm(dim=-1, keepdim=True) > 0, start, _cold_start(N, M.device).expand(G, N))
    for j in range(m):
        for _ in range(2):  # classical Gram-Schmidt twice against u1 and the basis so far
            Q = basis[:, :j + 1]
            v = v - torch.bmm(torch.bmm(v.unsqueeze(1), Q.transpose(1, 2)), Q).squeeze(1)
        v = _unit(v)
        basis[:, j + 1] = v
        v = _matvec(Ma, v)
        MV[:, j] = v
        if j + 1 not in checks:
            continue
        V = basis[:, 1:j + 2]
        H = torch.bmm(V, MV[:, :j + 1].transpose(1, 2))  # (G, j+1, j+1) = V M V^T
        theta, Y = torch.linalg.eigh(symmetrize(H))  # Ritz values ascending
        z = torch.bmm(Y[..., -1:].transpose(1, 2), V).squeeze(1)
        z = _unit(z - (z * basis[:, 0]).sum(-1, keepdim=True) * basis[:, 0])
        Mz = _matvec(Ma, z)
        res = (Mz - (z * Mz).sum(-1, keepdim=True) * z).norm(dim=-1)
        done = res <= tol if j + 1 < m else torch.ones_like(res, dtype=torch.bool)
        if bool(done.any()):
            idx = active[done]
            z_out[idx] = z[done]
            theta_out[idx] = theta[done][:, -2:] if j > 0 else torch.cat([theta[done] - 1.0, theta[done]], -1)
            keep = ~done
            if not bool(keep.any()):
                break
            active, Ma, basis, MV, v = active[keep], Ma[keep], basis[keep], MV[keep], v[keep]
    z = z_out
    Mz = _matvec(M, z)
    mu = (z * Mz).sum(-1)
    residual = (Mz - mu.unsqueeze(-1) * z).norm(dim=-1)
    theta = theta_out
    # mu3 lies at or above the second Ritz value theta[-2] (interlacing): a shift a tenth of the Ritz gap above it
    # certifies 0.9 of that gap whenever theta[-2] has converged to within that tenth; a cheap fp32 proof first,
    # an fp64 one at the shift that only decides "gap >= gap_tol" for the graphs it leaves.
    second = theta[..., -2]
    accurate = (residual <= tol) & ((z.norm(dim=-1) - 1.0).abs() < 1e-3)  # a unit z (the bound needs one)
    gap = torch.zeros_like(mu)
    sigma = second + 0.1 * (theta[..., -1] - second)
    todo = accurate & (sigma < mu - residual - gap_tol)
    if bool(todo.any()):
        gap[todo] = _certify_gap(*_rows(todo, M, u1, z, mu, residual, sigma))
    todo = accurate & (gap < gap_tol)
    if bool(todo.any()):
        gap[todo] = _certify_gap(*_rows(todo, M, u1, z, mu, residual, mu - residual - 2 * gap_tol), exact=True)
    return z, mu, gap, residual, accurate & (gap >= gap_tol)


def _rows(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """The ``mask`` (G,) rows of each tensor, without a copy where every row is taken."""
    return list(tensors) if bool(mask.all()) else [t[mask] for t in tensors]


def _certify_gap(M: Tensor, u1: Tensor, z: Tensor, mu: Tensor, residual: Tensor, sigma: Tensor,
                 exact: bool = False) -> Tensor:
    """A proved lower bound of ``mu2 - mu3`` for graphs (G, N, N), or 0 where the proof fails (G,).

    ``A = sigma I - M + 2 u1 u1^T + 2 z z^T`` is ``sigma I - M`` plus a positive semi-definite matrix of rank 2,
    so its smallest eigenvalue is at most the third smallest of ``sigma I - M``, ``sigma - mu3`` (Weyl's
    interlacing for a rank-2 update). A Cholesky factorisation of ``A`` that runs to the end proves that ``A + E``
    is positive definite, with ``|E|_2 <= gamma trace(A) / (1 - gamma)``, ``gamma = (N + 1) u / (1 - (N + 1) u)``
    (Demmel's backward error; ``u`` the unit roundoff), so ``mu3 < sigma + |E|_2``, whatever ``z`` is. The
    Rayleigh quotient ``mu`` of a unit ``z`` orthogonal to ``u1`` is at most ``mu2`` (Courant-Fischer; ``u1`` is
    the exact top eigenvector), so ``mu2 - mu3 > mu - sigma - |E|_2``, less the residual for the rounding of ``mu``
    and of ``A``. In fp32 (``exact=False``) ``|E|_2`` is about 1e-3 for N = 196; in fp64 (``exact=True``) 1e-11.
    """
    dtype = torch.float64 if exact else torch.float32
    N = M.shape[-1]
    E = torch.stack([u1, z], dim=-1).to(dtype)  # (G, N, 2)
    A = M.to(dtype, copy=True).baddbmm_(E, E.transpose(1, 2), beta=-1.0, alpha=2.0)  # 2 E E^T - M
    A.diagonal(dim1=-2, dim2=-1).add_(sigma.to(dtype).unsqueeze(-1))
    _, info = torch.linalg.cholesky_ex(A)
    unit = torch.finfo(dtype).eps / 2
    gamma = (N + 1) * unit / (1 - (N + 1) * unit)
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1).float()
    bound = mu - residual - sigma - (gamma / (1 - gamma)) * trace.abs() - 8 * unit * N
    return torch.where(info == 0, bound, torch.zeros_like(bound))


def _eigh_solve(M: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.linalg.eigh`` of graphs (G, N, N): ``(z, mu2, mu2 - mu3, residual)``."""
    evals, Z = torch.linalg.eigh(M)  # ascending; the largest is u1 (eigenvalue 1)
    z = Z[..., :, -2]
    mu = evals[..., -2]
    gap = evals[..., -2] - evals[..., -3] if M.shape[-1] > 2 else torch.full_like(mu, float("inf"))
    residual = (_matvec(M, z) - mu.unsqueeze(-1) * z).norm(dim=-1)
    return z, mu, gap, residual


def fiedler_vector(W: Tensor, solver: str = "power", *, valid: Tensor | None = None, start: Tensor | None = None,
                   min_squarings: int = RF_POWER_MIN_SQUARINGS, max_squarings: int = RF_POWER_MAX_SQUARINGS,
                   tol: float = RF_FIEDLER_RESIDUAL_TOL, gap_tol: float = RF_EIGENGAP_TOL,
                   lanczos_max_steps: int = RF_LANCZOS_MAX_STEPS) -> Fiedler:
    """Fiedler vectors of symmetric non-negative affinities ``W`` (..., N, N), batched.

    ``solver``: ``"power"`` (repeated squaring checked from ``min_squarings`` to ``max_squarings``: a graph is
    done once its residual is at most ``tol`` and its certified eigengap at least ``gap_tol``; ``eigh`` for the
    others, so a degenerate graph is always decided on its exact gap), ``"lanczos"`` (up to ``lanczos_max_steps``
    Krylov steps from ``start`` (..., N), a guess of ``y`` such as the previous layer's, with the same two conditions;
    the graphs that miss either go to ``"power"``) or ``"eigh"``.
    ``valid`` (..., N) bool: cut only the graph of these nodes. Graphs with fewer than 2 nodes give ``y = 0``
    and ``gap = 0``. Returns a :class:`Fiedler`.
    """
    if solver not in EIG_SOLVERS:
        raise ValueError(f"eig_solver must be one of {EIG_SOLVERS}, got {solver!r}")
    batch, N = W.shape[:-2], W.shape[-1]
    dev = W.device
    if N < 2:
        zeros = torch.zeros(batch, device=dev)
        return Fiedler(torch.zeros((*batch, N), device=dev), zeros, zeros, zeros,
                       torch.zeros(batch, dtype=torch.bool, device=dev))
    threads = _one_cpu_thread(dev) if solver == "lanczos" else contextlib.nullcontext()
    with no_autocast(dev), threads:
        if valid is not None:
            valid = valid.expand(W.shape[:-1])
        M, dinv, u1 = _normalized_affinity(W.float(), valid)
        Mf, uf = M.reshape(-1, N, N), u1.reshape(-1, N)
        if solver == "eigh":
            z, mu, gap, res = _eigh_solve(Mf)
            used = torch.ones(mu.shape, dtype=torch.bool, device=dev)
        elif solver == "power":
            z, mu, gap, res, converged = _power_solve(Mf, uf, min_squarings, max_squarings, tol, gap_tol)
            used = ~converged
        else:
            if start is None:
                z0 = _cold_start(N, dev).expand(Mf.shape[0], N)
            else:  # a guess of y -> z = D^1/2 y on the graph's nodes
                z0 = torch.where(dinv > 0, start.float().expand(dinv.shape) / dinv.clamp_min(_EPS),
                                 torch.zeros_like(dinv)).reshape(-1, N)
            z, mu, gap, res, converged = _lanczos_solve(Mf, uf, z0, lanczos_max_steps, tol, gap_tol)
            used = torch.zeros_like(converged)
            todo = ~converged
            if bool(todo.any()):  # the squaring solver for the rest
                zp, mup, gapp, resp, conv = _power_solve(Mf[todo], uf[todo], min_squarings, max_squarings, tol,
                                                         gap_tol)
                z[todo], mu[todo], gap[todo], res[todo] = zp, mup, gapp, resp
                used[todo] = ~conv
        if solver != "eigh" and bool(used.any()):
            z[used], mu[used], gap[used], res[used] = _eigh_solve(Mf[used])
        y = dinv * z.reshape(*batch, N)
        gap = gap.reshape(batch)
        if valid is not None:
            gap = torch.where(valid.sum(-1) >= 2, gap, torch.zeros_like(gap))
    return Fiedler(y, 1.0 - mu.reshape(batch), gap, res.reshape(batch), used.reshape(batch))


def otsu_threshold(y: Tensor, valid: Tensor | None = None) -> Tensor:
    """Otsu's threshold of the values ``y`` (..., N), exact over the N values (no histogram). Returns (...,).

    The split maximising the between-class variance of the sorted values; the threshold is the midpoint of the
    two values on either side of it, so ``y > threshold`` is the upper class. ``valid`` (..., N): only these
    values count.
    """
    N = y.shape[-1]
    y = y.float()
    if valid is None:
        valid = torch.ones_like(y, dtype=torch.bool)
    n = valid.sum(-1, keepdim=True)  # (..., 1)
    if N < 2:
        return y.mean(-1)
    s, _ = torch.sort(torch.where(valid, y, torch.full_like(y, float("inf"))), dim=-1)  # invalid values last
    s_fin = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    csum = torch.cumsum(s_fin, dim=-1)[..., :-1]  # sums of the lower class for split after index i = 0..N-2
    total = s_fin.sum(-1, keepdim=True)
    n0 = torch.arange(1, N, device=y.device, dtype=s.dtype)
    n1 = n - n0
    mu0 = csum / n0
    mu1 = (total - csum) / n1.clamp_min(1)
    between = torch.where(n1 >= 1, n0 * n1 * (mu0 - mu1) ** 2, torch.full_like(csum, -1.0))
    best = between.argmax(-1, keepdim=True)  # (..., 1)
    lo = torch.gather(s_fin, -1, best)
    hi = torch.gather(s_fin, -1, best + 1)
    return (0.5 * (lo + hi)).squeeze(-1)


def bipartition(y: Tensor, threshold: str = "mean", valid: Tensor | None = None) -> Tensor:
    """The side ``y > t`` (bool, same shape as ``y``) with ``t`` the mean (default) or Otsu's threshold of the
    ``valid`` values (all by default); invalid nodes are on neither side."""
    if threshold not in CUT_THRESHOLDS:
        raise ValueError(f"cut_threshold must be one of {CUT_THRESHOLDS}, got {threshold!r}")
    if threshold == "mean":
        if valid is None:
            t = y.mean(-1)
        else:
            t = (y * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    else:
        t = otsu_threshold(y, valid)
    upper = y > t.unsqueeze(-1)
    return upper if valid is None else upper & valid


def foreground_side(y: Tensor, upper: Tensor, rule: str = "fewer_distraction",
                    col_attention: Tensor | None = None, dis: Tensor | None = None,
                    valid: Tensor | None = None) -> Tensor:
    """Which side of the cut is the foreground (the defocused candidates). Returns a bool mask like ``upper``.

    * ``fewer_distraction`` (default): the side holding fewer distraction tokens ``dis`` (..., N); on a tie
      (e.g. a cut of the non-distraction graph), ``max_abs`` over the non-distraction tokens. The distraction
      tokens cluster together (they share their over-activated channels), so their side is the "focused" one the
      paper moves attention away from;
    * ``max_abs`` (TokenCut, arXiv 2202.11539): the side holding the node with the largest ``|y|``;
    * ``smaller_side``: the side with fewer nodes (ties: the upper side);
    * ``less_attended``: the side whose nodes receive less attention on average (``col_attention``, (..., N): the
      mean attention each token receives); the paper calls defocused tokens "attention-poor".

    ``valid`` (..., N): the nodes of the cut graph (default all); the other nodes are on neither side.
    """
    if rule not in FG_RULES:
        raise ValueError(f"fg_rule must be one of {FG_RULES}, got {rule!r}")
    valid = torch.ones_like(upper) if valid is None else valid.expand_as(upper)
    lower = ~upper & valid

    def max_abs(candidates: Tensor) -> Tensor:
        score = torch.where(candidates, y.abs(), torch.full_like(y, -1.0))
        return torch.gather(upper, -1, score.argmax(-1, keepdim=True))  # (..., 1)

    if rule == "fewer_distraction":
        if dis is None:
            raise ValueError("fg_rule='fewer_distraction' needs the distraction tokens")
        d = dis.expand_as(upper)
        up_dis = (upper & d).sum(-1, keepdim=True)
        lo_dis = (lower & d).sum(-1, keepdim=True)
        clean = valid & ~d
        tie = max_abs(torch.where(clean.any(-1, keepdim=True), clean, valid))
        take_upper = torch.where(up_dis == lo_dis, tie, up_dis < lo_dis)
    elif rule == "max_abs":
        take_upper = max_abs(valid)
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


def defocused_tokens(W: Tensor, dis: Tensor, threshold: str = "mean", rule: str = "fewer_distraction",
                     col_attention: Tensor | None = None, solver: str = "power", *,
                     cut_graph: str = "all", gap_tol: float = RF_EIGENGAP_TOL,
                     **solver_options) -> tuple[Tensor, Fiedler]:
    """``T_def``: the foreground of the normalized cut of ``W`` (..., N, N) minus the distraction tokens ``dis``.

    ``dis`` (..., N) bool broadcasts against the graph batch (e.g. (B, 1, N) for per-head graphs (B, H, N, N)).
    ``cut_graph``: ``"all"`` (eq. 8: every patch, distraction tokens included) or ``"non_distraction"`` (the graph
    of the non-distraction patches only). Every non-distraction token is defocused (no graph-cut choice) where the
    graph is degenerate (eigengap below ``gap_tol``) or the foreground holds no non-distraction token.
    ``solver_options`` go to :func:`fiedler_vector`. Returns ``(defocused (..., N) bool, Fiedler)``.
    """
    if cut_graph not in CUT_GRAPHS:
        raise ValueError(f"cut_graph must be one of {CUT_GRAPHS}, got {cut_graph!r}")
    keep = ~dis
    valid = keep.expand(W.shape[:-1]) if cut_graph == "non_distraction" else None
    fied = fiedler_vector(W, solver=solver, valid=valid, gap_tol=gap_tol, **solver_options)
    fg = foreground_side(fied.y, bipartition(fied.y, threshold, valid), rule, col_attention, dis, valid)
    defocused = fg & keep
    no_choice = ~defocused.any(-1, keepdim=True) | (fied.gap < gap_tol).unsqueeze(-1)
    return torch.where(no_choice, keep.expand_as(defocused), defocused), fied

