"""The warm-started Krylov solver of RF-CLIP's normalized cut (``eig_solver="lanczos"``, the default): agreement with
``eigh`` on graphs of known spectrum, its eigengap proof (never above the true gap, fails where it must), the
fallback on degenerate graphs, and its use inside RF-CLIP (the previous layer's vector as the start)."""

from __future__ import annotations

import pytest
import torch

import rfclip.methods.defocus as defocus
import rfclip.methods.rfclip as rfclip_module
from rfclip.dense import DenseCLIP
from rfclip.methods import build_method
from rfclip.methods.defocus import _certify_gap, _normalized_affinity, defocused_tokens, fiedler_vector
from rfclip.testing import plant_distraction_tokens

TINY_DIMS = (5, 20, 41)


def graph_with_spectrum(mu: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric affinity W (N, N) whose normalized affinity D^-1/2 W D^-1/2 has the eigenvalues 1 and ``mu``
    (N - 1,), fp64, and its exact Fiedler vector y (D-orthonormal). W need not be non-negative: the solvers only
    use that it is symmetric with positive degrees ``W 1 = d``."""
    g = torch.Generator().manual_seed(seed)
    N = mu.numel() + 1
    d = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    u1 = d.sqrt() / d.sqrt().norm()
    Q, _ = torch.linalg.qr(torch.cat([u1[:, None], torch.randn(N, N - 1, generator=g, dtype=torch.float64)], 1))
    M = Q @ torch.diag(torch.cat([torch.ones(1, dtype=torch.float64), mu])) @ Q.T
    W = d.sqrt()[:, None] * M * d.sqrt()[None, :]
    top = int(mu.argmax())
    return 0.5 * (W + W.T), Q[:, 1 + top] / d.sqrt()


def spectra(N=96):
    """mu2 - mu3 from 0.3 down to 2e-3 (below the squaring solver's comfort), the rest spread over [-0.9, mu3]."""
    g = torch.Generator().manual_seed(1)
    out = []
    for mu2, gap in ((0.8, 0.3), (0.5, 0.05), (0.2, 0.01), (0.9, 2e-3)):
        rest = (mu2 - gap) - (mu2 - gap + 0.9) * torch.rand(N - 3, generator=g, dtype=torch.float64)
        out.append((torch.cat([torch.tensor([mu2, mu2 - gap], dtype=torch.float64), rest]), gap))
    return out


def test_lanczos_agrees_with_eigh_on_known_spectra():
    cases = [graph_with_spectrum(mu, seed=i) for i, (mu, _) in enumerate(spectra())]
    W = torch.stack([w for w, _ in cases]).float()
    y_true = torch.stack([y for _, y in cases])
    gaps = torch.tensor([gap for _, gap in spectra()], dtype=torch.float64)
    mu2 = torch.stack([mu[0] for mu, _ in spectra()])
    for start in (None, y_true.float() + 0.3 * torch.randn(y_true.shape, generator=torch.Generator().manual_seed(2))):
        fied = fiedler_vector(W, "lanczos", start=start)
        assert not fied.eigh_used.any()
        assert (fied.residual <= 1e-6).all(), fied.residual
        torch.testing.assert_close(fied.lam.double(), 1 - mu2, atol=1e-5, rtol=0)
        assert (fied.gap.double() <= gaps * (1 + 1e-4)).all(), (fied.gap, gaps)  # a lower bound ...
        assert (fied.gap.double() >= 1e-4).all()  # ... that proves every one of these gaps
        y = fied.y.double()
        y = y * torch.sign((y * y_true).sum(-1, keepdim=True))
        scale = y_true.abs().amax(-1, keepdim=True)
        assert ((y - y_true).abs() / scale).amax() < 5e-3 / gaps.min()  # |z - z_true| <= residual / gap
        ref = fiedler_vector(W, "eigh")
        same_side = (fied.y > fied.y.mean(-1, keepdim=True)) == (ref.y > ref.y.mean(-1, keepdim=True))
        assert all(bool(s.all() or not s.any()) for s in same_side)  # the same cut up to the sign of y


def test_warm_start_converges_at_the_first_check():
    mu, _ = spectra()[2]
    W, y = graph_with_spectrum(mu)
    calls = []
    original = defocus._matvec

    def counting(A, x):
        calls.append(x.shape)
        return original(A, x)

    defocus._matvec = counting
    try:
        warm = fiedler_vector(W[None].float(), "lanczos", start=y[None].float())
        n_warm = len(calls)
        calls.clear()
        cold = fiedler_vector(W[None].float(), "lanczos")
        n_cold = len(calls)
    finally:
        defocus._matvec = original
    assert n_warm < n_cold and not warm.eigh_used.any() and not cold.eigh_used.any()
    torch.testing.assert_close(warm.lam, cold.lam, atol=1e-6, rtol=0)


def test_the_gap_proof_is_sound_and_fails_where_it_must():
    """``_certify_gap`` never claims more than the true gap: not for the exact vector, not for a wrong unit vector,
    at any shift; it proves a gap with a shift between mu3 and mu2 and fails with one below mu3."""
    mu, gap = spectra()[1]
    W, _ = graph_with_spectrum(mu)
    M, _, u1 = _normalized_affinity(W[None].float())
    evals, Z = torch.linalg.eigh(M.double())
    mu2, mu3 = float(evals[0, -2]), float(evals[0, -3])
    exact = Z[:, :, -2].float()
    wrong = torch.randn(1, M.shape[-1], generator=torch.Generator().manual_seed(0))
    wrong = wrong - (wrong * u1).sum(-1, keepdim=True) * u1
    wrong = wrong / wrong.norm()
    for z in (exact, wrong):
        Mz = (z[:, None] @ M).squeeze(1)
        rq = (z * Mz).sum(-1)
        res = (Mz - rq[:, None] * z).norm(dim=-1)
        for sigma in torch.linspace(mu3 - 0.2, mu2, 21):
            for exact_arith in (False, True):
                bound = _certify_gap(M, u1, z, rq, res, sigma.reshape(1), exact=exact_arith)
                assert float(bound) <= mu2 - mu3 + 1e-6, (sigma, bound)
                if sigma < mu3:
                    assert float(bound) == 0.0  # A is not positive definite: no proof
    Mz = (exact[:, None] @ M).squeeze(1)
    rq = (exact * Mz).sum(-1)
    res = (Mz - rq[:, None] * exact).norm(dim=-1)
    mid = torch.tensor([0.5 * (mu2 + mu3)])
    assert 0.4 * gap < float(_certify_gap(M, u1, exact, rq, res, mid, exact=True)) <= gap
    assert 0.4 * gap < float(_certify_gap(M, u1, exact, rq, res, mid)) <= gap  # fp32: 1e-3 less at N = 96


@pytest.mark.parametrize("start", ["none", "zero"])
def test_degenerate_graphs_fall_back_and_make_no_choice(start):
    """Graphs with lambda2 = lambda3 (or all-equal tokens): no proof, so the squaring solver runs, cannot prove a
    gap either, and eigh decides on the exact gap; the cut makes no choice, as with the other solvers."""
    N = 36
    equal = torch.ones(N, N)
    blocks = torch.full((N, N), 0.01)
    for c in range(3):
        blocks[c * N // 3:(c + 1) * N // 3, c * N // 3:(c + 1) * N // 3] = 1.0
    W = torch.stack([equal, blocks])
    calls = []
    original = defocus._power_solve

    def spy(M, *args, **kwargs):
        calls.append(M.shape[0])
        return original(M, *args, **kwargs)

    defocus._power_solve = spy
    try:
        fied = fiedler_vector(W, "lanczos", start=torch.zeros(2, N) if start == "zero" else None)
        dis = torch.zeros(2, N, dtype=torch.bool)
        dis[:, [0, 5]] = True
        defo, _ = defocused_tokens(W, dis, solver="lanczos")
    finally:
        defocus._power_solve = original
    assert calls and calls[0] == 2  # both went to the squaring solver ...
    assert fied.eigh_used.all() and (fied.gap < 1e-4).all()  # ... and from there to eigh
    assert torch.equal(defo, ~dis)


@pytest.mark.parametrize("N", [2, 3, 5])
def test_tiny_graphs(N):
    W = torch.rand(4, N, N, generator=torch.Generator().manual_seed(N)) + 0.1
    W = 0.5 * (W + W.transpose(1, 2))
    fied = fiedler_vector(W, "lanczos")
    ref = fiedler_vector(W, "eigh")
    torch.testing.assert_close(fied.lam, ref.lam, atol=1e-5, rtol=0)
    proved = ~fied.eigh_used
    assert (fied.gap[proved] <= ref.gap[proved] + 1e-5).all()


def test_subgraph_cut_matches_eigh():
    """cut_graph="non_distraction": nodes outside ``valid`` never enter the Krylov space; same cut as eigh."""
    mu, _ = spectra()[0]
    W, _ = graph_with_spectrum(mu)
    W = W.abs()[None].float()  # non-negative, as a real graph
    valid = torch.ones(1, W.shape[-1], dtype=torch.bool)
    valid[0, :7] = False
    fied = fiedler_vector(W, "lanczos", valid=valid, start=torch.randn(1, W.shape[-1]))
    ref = fiedler_vector(W, "eigh", valid=valid)
    assert torch.equal(fied.y[~valid], torch.zeros(7))
    torch.testing.assert_close(fied.lam, ref.lam, atol=1e-5, rtol=0)
    y, r = fied.y[valid], ref.y[valid]
    torch.testing.assert_close(y * torch.sign((y * r).sum()), r, atol=1e-4 * float(r.abs().max()), rtol=0)


def test_rfclip_warm_starts_each_layer_from_the_previous_one(tiny_clip):
    """In RF-CLIP the first cut starts cold and every later one from the previous layer's vector; the features
    equal those of the squaring solver and of eigh on the planted model (large eigengaps)."""
    enc = DenseCLIP(plant_distraction_tokens(tiny_clip, [3, 4, 60, 100, 150], TINY_DIMS).model.visual)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    starts = []
    original = rfclip_module.defocused_tokens

    def spy(W, dis, *args, **kwargs):
        starts.append(kwargs.get("start"))
        return original(W, dis, *args, **kwargs)

    feats = {}
    rfclip_module.defocused_tokens = spy
    try:
        with torch.inference_mode():
            for solver in ("lanczos", "power", "eigh"):
                starts.clear()
                feats[solver] = enc(x, build_method("rfclip", distraction_dims=TINY_DIMS, eig_solver=solver))[0]
                if solver == "lanczos":  # a cut in every layer but the last (which attends with the proxy)
                    assert len(starts) == enc.num_layers - 1 and starts[0] is None
                    assert all(s is not None and s.shape == (2, 196) for s in starts[1:])
                else:
                    assert all(s is None for s in starts)
    finally:
        rfclip_module.defocused_tokens = original
    torch.testing.assert_close(feats["lanczos"], feats["power"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["lanczos"], feats["eigh"], atol=1e-5, rtol=1e-5)


def test_the_solver_gives_the_thread_count_back():
    """The lanczos solver runs on one CPU thread and restores the caller's count, also when it raises."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W = torch.rand(2, 30, 30) + 0.1
        fiedler_vector(0.5 * (W + W.transpose(1, 2)), "lanczos")
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            fiedler_vector(torch.rand(2, 30, 30), "lanczos", start=torch.rand(3, 7))  # start of the wrong shape
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
