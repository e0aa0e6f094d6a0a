"""RF-CLIP: each step against its formula, the planted-distraction behaviour, ablation equivalences, batching.

Random weights test mechanics, not accuracy. A random CLIP has no over-activated channel, so distractions are
planted (a large value in chosen channels of chosen tokens' positional embeddings) or the threshold is lowered.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import make_clip
from rfclip.constants import DISTRACTION_DIMS
from rfclip.dense import DenseCLIP
from rfclip.errors import RfclipError
from rfclip.methods import build_method
from rfclip.methods.defocus import (bipartition, defocused_tokens, fiedler_vector, foreground_side, otsu_threshold,
                                    symmetrize)
from rfclip.methods.options import parse_layers
from rfclip.methods.refocus import distraction_scores, embed_redistribute, redistribute_attention
from rfclip.methods.rfclip import RFCLIP
from rfclip.testing import plant_distraction_tokens

TINY_DIMS = (5, 20, 41)


def random_attention(B, H, N, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(B, H, N + 1, N + 1, generator=g), dim=-1)


def disjoint_masks(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(B, N, generator=g)
    dis = r < 0.15
    target = (r > 0.5) & ~dis
    dis[0] = False  # crop 0: no distraction token at all
    return dis, target


# ------------------------------------------------------------------------------------ attention redistribution
@pytest.mark.parametrize("per_head", [False, True])
def test_redistribution_formula(per_head):
    B, H, N, beta = 3, 4, 30, 0.4
    A = random_attention(B, H, N)
    dis, target = disjoint_masks(B, N)
    if per_head:  # per-head targets: a different subset per head
        g = torch.Generator().manual_seed(1)
        target = target.unsqueeze(1) & (torch.rand(B, H, N, generator=g) < 0.7)
        target[:, :, 0] |= ~dis[:, 0:1]  # keep every head's target set non-empty
    out = redistribute_attention(A.clone(), dis, target, beta)
    torch.testing.assert_close(out.sum(-1), torch.ones(B, H, N + 1), atol=1e-5, rtol=0)
    assert out.min() >= 0
    # [CLS] row and column untouched; crop 0 (no distraction) untouched.
    assert torch.equal(out[:, :, 0], A[:, :, 0]) and torch.equal(out[:, :, :, 0], A[:, :, :, 0])
    assert torch.equal(out[0], A[0])
    P, Q = A[:, :, 1:, 1:].double(), out[:, :, 1:, 1:].double()
    md = dis[:, None, None, :].expand_as(P)
    mt = (target if target.dim() == 3 else target[:, None]).unsqueeze(-2).expand_as(P)
    # distraction columns shrink by exactly (1 - beta)
    torch.testing.assert_close(Q[md], (1 - beta) * P[md], rtol=1e-6, atol=1e-9)
    # the budget lands on the targets in proportion to their original weights
    budget = beta * (P * md).sum(-1, keepdim=True)
    share = (P * mt) / (P * mt).sum(-1, keepdim=True)
    torch.testing.assert_close(Q, P - beta * P * md + budget * share * mt, rtol=1e-5, atol=1e-7)
    # other columns unchanged
    other = ~md & ~mt
    assert torch.equal(Q[other], P[other])


def test_redistribution_to_cls_and_cls_row():
    B, H, N, beta = 2, 3, 12, 0.5
    A = random_attention(B, H, N, seed=3)
    dis, _ = disjoint_masks(B, N, seed=3)
    out = redistribute_attention(A.clone(), dis, None, beta, to_cls=True)
    torch.testing.assert_close(out.sum(-1), torch.ones(B, H, N + 1), atol=1e-5, rtol=0)
    budget = beta * (A[:, :, 1:, 1:] * dis[:, None, None, :]).sum(-1)
    torch.testing.assert_close(out[:, :, 1:, 0], A[:, :, 1:, 0] + budget)
    assert torch.equal(out[:, :, 0], A[:, :, 0])
    with_row = redistribute_attention(A.clone(), dis, ~dis, beta, cls_row=True)
    assert not torch.equal(with_row[1, :, 0], A[1, :, 0])
    torch.testing.assert_close(with_row.sum(-1), torch.ones(B, H, N + 1), atol=1e-5, rtol=0)


def test_redistribution_beta_zero_and_empty_target_are_identity():
    A = random_attention(2, 2, 10, seed=5)
    dis, target = disjoint_masks(2, 10, seed=5)
    assert torch.allclose(redistribute_attention(A.clone(), dis, target, 0.0), A)
    empty = torch.zeros_like(target)
    assert torch.equal(redistribute_attention(A.clone(), dis, empty, 0.4), A)


# ------------------------------------------------------------------------------------ embedding redistribution
def test_embed_redistribution_hand_computed():
    h, w, C, B = 3, 4, 7, 2
    dims = torch.tensor([1, 4])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1 + h * w, C, generator=g)
    dis = torch.zeros(B, h * w, dtype=torch.bool)
    dis[0, [0, 5, 11]] = True  # a corner, an interior token and the opposite corner
    dis[1, 6] = True
    out = embed_redistribute(x, dis, dims, (h, w), kernel=3)
    expected = x.clone()
    for b in range(B):
        for i in range(h * w):
            if not dis[b, i]:
                continue
            u, v = divmod(i, w)
            nb = [1 + uu * w + vv for uu in range(u - 1, u + 2) for vv in range(v - 1, v + 2) if 0 <= uu < h and 0 <= vv < w]
            for j in dims.tolist():
                expected[b, 1 + i, j] = x[b, nb, j].mean()
    torch.testing.assert_close(out, expected)
    changed = out != x
    allowed = torch.zeros_like(changed)
    for b in range(B):
        for i in torch.nonzero(dis[b]).flatten().tolist():
            allowed[b, 1 + i, dims] = True
    assert not (changed & ~allowed).any()


def test_embed_redistribution_eq13_eight_neighbours():
    """eq. 13 (the paper's default): the mean of the 8 neighbours, centre excluded; at the border the in-grid
    neighbours (3 at a corner, 5 along an edge)."""
    h, w, C = 4, 5, 6
    dims = torch.tensor([0, 3])
    x = torch.randn(1, 1 + h * w, C, generator=torch.Generator().manual_seed(1))
    dis = torch.zeros(1, h * w, dtype=torch.bool)
    dis[0, [0, 2, 7]] = True  # a corner, an edge token, an interior token
    out = embed_redistribute(x, dis, dims, (h, w), kernel=3, exclude_center=True)
    for i, count in ((0, 3), (2, 5), (7, 8)):
        u, v = divmod(i, w)
        nb = [1 + uu * w + vv for uu in range(u - 1, u + 2) for vv in range(v - 1, v + 2)
              if 0 <= uu < h and 0 <= vv < w and (uu, vv) != (u, v)]
        assert len(nb) == count
        torch.testing.assert_close(out[0, 1 + i, dims], x[0, nb][:, dims].mean(0))
    assert torch.equal(out[0, 1 + 1], x[0, 1 + 1])


def test_defaults_are_the_papers_and_the_code_values_stay_reachable():
    paper = build_method("rfclip")
    assert (paper.beta, paper.embed_exclude_center, paper.embed_padding, paper.phi_norm) == (0.7, True, "valid",
                                                                                            "minshift")
    code = build_method("rfclip_code_constants")
    assert (code.beta, code.embed_exclude_center) == (0.4, False)
    released_filter = build_method("rfclip_code_embed")
    assert (released_filter.embed_channels, released_filter.embed_padding, released_filter.embed_blend,
            released_filter.embed_exclude_center) == ("all", "zero", 0.4, False)
    assert build_method("rfclip", beta=0.4, embed_exclude_center=False).options() == code.options()


def test_embed_redistribution_code_variant():
    """Released-code variant: all channels, zero padding / 9, blend 0.4."""
    h = w = 3
    x = torch.randn(1, 10, 4)
    dis = torch.zeros(1, 9, dtype=torch.bool)
    dis[0, 0] = True
    out = embed_redistribute(x, dis, None, (h, w), kernel=3, blend=0.4, padding="zero")
    nb = [1, 2, 4, 5]  # token 0's in-grid 3x3 neighbourhood (tokens 0, 1, 3, 4 -> rows 1, 2, 4, 5)
    mean = x[0, nb].sum(0) / 9
    torch.testing.assert_close(out[0, 1], 0.6 * x[0, 1] + 0.4 * mean)
    assert torch.equal(out[0, 2:], x[0, 2:]) and torch.equal(out[0, 0], x[0, 0])


def test_distraction_scores():
    x = torch.randn(2, 5, 16)
    x[0, 3, 7] = 40.0
    dims = torch.tensor([7, 9])
    phi = distraction_scores(x, dims)
    g = x - x.amin(-1, keepdim=True)
    w = g / g.sum(-1, keepdim=True)
    torch.testing.assert_close(phi, w[..., [7, 9]].amax(-1))
    assert phi[0, 3] > 0.5
    big = (torch.rand(2, 5, 64) * 2000 + 1000).half()  # every value fits in fp16, the channel sums do not
    big[0, 3, 7] = 60000.0
    assert torch.isinf(big.sum(-1)).all()
    ref = distraction_scores(big.float(), dims)
    torch.testing.assert_close(distraction_scores(big, dims), ref)
    assert ref[0, 3] > 5 / 64
    torch.testing.assert_close(distraction_scores(x, dims, "abs"), (x.abs() / x.abs().sum(-1, keepdim=True))[..., [7, 9]].amax(-1))


# ------------------------------------------------------------------------------------ defocus (graph cut)
def structured_graphs(G, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(G, N, generator=g) > 0.6
    feats = 0.7 * torch.randn(G, N, 16, generator=g) + labels[..., None] * torch.randn(G, 1, 16, generator=g)
    S = torch.softmax(feats @ feats.transpose(1, 2) / 4, dim=-1)
    return 0.5 * (S + S.transpose(1, 2))


def scipy_fiedler(W: np.ndarray):
    D = np.diag(W.sum(1))
    vals, vecs = scipy.linalg.eigh(D - W, D)
    return vals[1], vecs[:, 1]


@pytest.mark.parametrize("solver", ["eigh", "power"])
def test_fiedler_matches_scipy(solver):
    W = structured_graphs(5, 40)
    fied = fiedler_vector(W, solver=solver)
    for b in range(W.shape[0]):
        w = W[b].double().numpy()
        val, ref = scipy_fiedler(w)
        got = fied.y[b].double().numpy()
        got = got * np.sign(got @ np.diag(w.sum(1)) @ ref)
        np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
        assert abs(fied.lam[b].item() - val) < 1e-5
    assert not fied.eigh_used.any() if solver == "power" else fied.eigh_used.all()


def small_gap_graphs():
    """Graphs whose eigengap lambda3 - lambda2 is small (1e-3 - 1e-2): softmax similarities of random features (as
    the key-key graphs of a random-weight ViT are) and a uniform random graph."""
    g = torch.Generator().manual_seed(0)
    graphs = []
    for scale in (0.02, 0.1):  # mu2 ~ 0.05 and ~ 0.83: both ends of the (1 + mu3) / (1 + mu2) convergence factor
        X = torch.randn(6, 196, 64, generator=g, dtype=torch.float64)
        S = torch.softmax(scale * X @ X.transpose(1, 2), dim=-1)
        graphs.append(0.5 * (S + S.transpose(1, 2)))
    U = torch.rand(4, 196, 196, generator=g, dtype=torch.float64)
    graphs.append(0.5 * (U + U.transpose(1, 2)))
    return torch.cat(graphs)


def reference_cut(W: torch.Tensor):
    """fp64 eigh of the normalized affinity: (y, eigengap mu2 - mu3, lambda2, M, D^-1/2)."""
    d = W.double().sum(-1)
    M = W.double() / torch.sqrt(d[..., :, None] * d[..., None, :])
    evals, Z = torch.linalg.eigh(M)
    return Z[..., -2] / d.sqrt(), evals[..., -2] - evals[..., -3], 1 - evals[..., -2], M, d.rsqrt()


def cut_difference(fg, ref, among=None):
    """Tokens (``among`` them) on a different side than the reference, up to the arbitrary sign of ``y``."""
    among = torch.ones_like(fg) if among is None else among
    return torch.minimum(((fg != ref) & among).sum(-1), ((fg == ref) & among).sum(-1))


def test_fiedler_power_converges_on_small_gap_graphs():
    W = small_gap_graphs()
    y_ref, gap, lam, M, dinv = reference_cut(W)
    ref_fg = y_ref > y_ref.mean(-1, keepdim=True)
    assert gap.max() < 0.02 and gap.min() < 2e-3  # the graphs are hard ...
    unconverged = fiedler_vector(W.float(), "power", min_squarings=10, max_squarings=10, tol=float("inf"),
                                 gap_tol=0.0)  # ... for the former fixed 10 squarings
    assert (cut_difference(bipartition(unconverged.y), ref_fg) > 0).sum() >= 3
    for solver in ("power", "eigh"):
        fied = fiedler_vector(W.float(), solver)
        # The residual the solver reports, and recomputed independently in fp64 from y.
        assert (fied.residual <= 1e-6).all(), fied.residual
        z = fied.y.double() / dinv
        z = z / z.norm(dim=-1, keepdim=True)
        Mz = (M @ z.unsqueeze(-1)).squeeze(-1)
        residual = (Mz - (z * Mz).sum(-1, keepdim=True) * z).norm(dim=-1)
        assert (residual < 5e-6).all(), residual
        # Foreground = eigh's up to sign. A token may only change sides where the residual allows it: closer to
        # the threshold than the bound |z - z_ref| <= residual / gap moves y (y = D^-1/2 z); over all 16 graphs
        # at most 2 tokens (one sits 3e-7 from the fp64 threshold: fp32 cannot decide it).
        margin = 2 * dinv.amax(-1, keepdim=True) * (residual / gap).unsqueeze(-1)
        decided = (y_ref - y_ref.mean(-1, keepdim=True)).abs() > margin
        assert decided.float().mean() > 0.95
        fg = bipartition(fied.y)
        assert torch.equal(cut_difference(fg, ref_fg, decided), torch.zeros(W.shape[0], dtype=torch.long))
        assert cut_difference(fg, ref_fg).sum() <= 2
        torch.testing.assert_close(fied.lam.double(), lam, atol=1e-5, rtol=0)
        assert (fied.gap.double() <= gap * (1 + 1e-3) + 1e-7).all()  # power: a lower bound; eigh: exact
    assert not fiedler_vector(W.float(), "power").eigh_used.any()  # all certified without the fallback


def degenerate_graphs(N=36):
    """All-equal tokens, equal tokens plus 1e-6 noise, and three identical clusters (lambda2 = lambda3 exactly)."""
    g = torch.Generator().manual_seed(0)
    equal = torch.ones(N, N)
    noisy = equal + 1e-6 * torch.rand(N, N, generator=g)
    blocks = torch.full((N, N), 0.01)
    for c in range(3):
        blocks[c * N // 3:(c + 1) * N // 3, c * N // 3:(c + 1) * N // 3] = 1.0
    W = torch.stack([equal, noisy, blocks])
    return 0.5 * (W + W.transpose(1, 2))


@pytest.mark.parametrize("solver", ["power", "eigh"])
def test_degenerate_graphs_make_no_graph_cut_choice(solver):
    """Where the eigengap is below the tolerance the Fiedler vector is arbitrary (the former power solver picked
    a one-token foreground): every non-distraction token is defocused instead, whichever solver runs."""
    W = degenerate_graphs()
    fied = fiedler_vector(W, solver)
    assert (fied.gap < 1e-4).all(), fied.gap
    assert fied.eigh_used.all()  # the power solver cannot certify a gap here: eigh decides on the exact gap
    dis = torch.zeros(3, W.shape[-1], dtype=torch.bool)
    dis[:, [0, 5]] = True
    defo, _ = defocused_tokens(W, dis, solver=solver)
    assert torch.equal(defo, ~dis)
    # The same graphs with a clear two-way structure added are cut (the rule only fires on degenerate graphs).
    W2 = W.clone()
    W2[:, :10, :10] += 5.0
    defo2, fied2 = defocused_tokens(W2, dis, solver=solver)
    assert (fied2.gap > 1e-2).all() and (defo2.sum(-1) < (~dis).sum(-1)).all()


def test_otsu_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    y = torch.cat([torch.randn(4, 20, generator=g) - 2, torch.randn(4, 13, generator=g) + 1.5], dim=1)
    t = otsu_threshold(y)
    for b in range(4):
        v = np.sort(y[b].numpy())
        best, best_t = -1, None
        for i in range(len(v) - 1):
            a, c = v[: i + 1], v[i + 1:]
            s = len(a) * len(c) * (a.mean() - c.mean()) ** 2
            if s > best:
                best, best_t = s, (v[i] + v[i + 1]) / 2
        assert abs(t[b].item() - best_t) < 1e-5


def test_foreground_rules_and_defocus_masks():
    y = torch.tensor([[0.9, 0.8, -0.1, -0.2, -0.3, -0.4], [-2.0, 0.1, 0.2, 0.3, 0.2, 0.1]])
    upper = bipartition(y, "mean")
    fg = foreground_side(y, upper, "max_abs")
    assert fg[0].tolist() == [True, True, False, False, False, False]  # side of |y| max = 0.9
    assert fg[1].tolist() == [True, False, False, False, False, False]  # side of |y| max = -2.0
    assert foreground_side(y, upper, "smaller_side").sum(-1).tolist() == [2, 1]
    col = torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1.0]])
    assert foreground_side(y, upper, "less_attended", col)[0].tolist() == [False, False, True, True, True, True]
    W = structured_graphs(3, 25, seed=4)
    dis = torch.zeros(3, 25, dtype=torch.bool)
    dis[1, :3] = True
    dis[2] = True  # every token is a distraction token: no defocused token can remain
    dis[2, 0] = False
    defo, _ = defocused_tokens(W, dis)
    assert not (defo & dis).any()
    assert defo.any(-1).all()  # non-empty (fallback to all non-distraction tokens)
    assert defo[2].tolist() == (~dis[2]).tolist()


def clustered_graph(sizes=(5, 80, 111), within=(8.0, 2.0, 2.0), between=0.2, seed=0):
    """A patch graph of clusters (the first: the distraction tokens, tight, as tokens sharing over-activated
    channels are) with small random weights on top. Returns W (1, N, N) and the cluster label of each node."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    same = labels[:, None] == labels[None, :]
    strength = torch.tensor(within)[labels]
    W = torch.where(same, strength[:, None].expand(-1, len(labels)), torch.full_like(same, between, dtype=torch.float))
    W = W + 0.05 * torch.rand(len(labels), len(labels), generator=g)
    return symmetrize(W)[None], labels


def test_side_rules_orient_away_from_the_distraction_tokens():
    y = torch.tensor([[0.9, 0.8, 0.7, -0.1, -0.2, -0.3], [0.1, 0.2, -0.4, -0.3, 0.5, -0.2]])
    dis = torch.tensor([[True, True, False, False, False, False], [False, False, False, False, False, False]])
    upper = bipartition(y)
    # crop 0: the distraction tokens hold the largest |y|: TokenCut's max_abs takes their side
    assert foreground_side(y, upper, "max_abs")[0].tolist() == [True, True, True, False, False, False]
    fewer = foreground_side(y, upper, "fewer_distraction", dis=dis)
    assert fewer[0].tolist() == [False, False, False, True, True, True]
    # crop 1: no distraction token on either side (a tie): max_abs over the non-distraction tokens (|-0.4| < 0.5)
    assert fewer[1].tolist() == upper[1].tolist()
    with pytest.raises(ValueError):
        foreground_side(y, upper, "fewer_distraction")
    # On a graph whose tightest cluster is the distraction tokens, the cut separates them: max_abs defocuses the
    # tokens of their side, fewer_distraction the others.
    W, labels = clustered_graph(sizes=(5, 40, 151), within=(8.0, 1.5, 1.0))
    dis = (labels == 0)[None]
    y = fiedler_vector(W).y
    side = bipartition(y)
    assert (side[0, :5] == side[0, 0]).all()  # the distraction tokens are on one side
    away, _ = defocused_tokens(W, dis)
    towards, _ = defocused_tokens(W, dis, rule="max_abs")
    assert not (away & towards).any() and torch.equal(away | towards, ~dis)
    assert torch.equal(away[0], side[0] != side[0, 0])  # the side without them
    assert (towards[0] == (side[0] == side[0, 0]) & ~dis[0]).all()


def test_cut_of_the_non_distraction_graph():
    """cut_graph='non_distraction': the Fiedler vector of the subgraph of the non-distraction patches (fp64 eigh of
    the submatrix as the reference), the threshold over those patches only, distraction tokens on neither side."""
    W, labels = clustered_graph()
    dis = (labels == 0)[None]
    keep = ~dis[0]
    sub = W[0][keep][:, keep].double()
    val, ref = scipy_fiedler(sub.numpy())
    for solver in ("power", "eigh"):
        fied = fiedler_vector(W, solver, valid=~dis)
        assert torch.equal(fied.y[dis], torch.zeros(5))
        got = fied.y[0][keep].double().numpy()
        got = got * np.sign(got @ np.diag(sub.sum(1).numpy()) @ ref)
        np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())
        assert abs(fied.lam[0].item() - val) < 1e-5
        upper = bipartition(fied.y, valid=~dis)
        assert not (upper & dis).any()
        torch.testing.assert_close(otsu_threshold(fied.y, ~dis), otsu_threshold(fied.y[:, keep]))
        target, _ = defocused_tokens(W, dis, solver=solver, cut_graph="non_distraction")
        clusters = {int(c) for c in labels[target[0]]}
        assert clusters in ({1}, {2})  # exactly one of the two non-distraction clusters
        assert int(target.sum()) in (80, 111)
    with pytest.raises(ValueError):
        defocused_tokens(W, dis, cut_graph="other")


def test_parse_layers():
    assert parse_layers("all", 12) == frozenset(range(12))
    assert parse_layers(None, 4) == frozenset(range(4))
    assert parse_layers("0-2,5", 12) == frozenset({0, 1, 2, 5})
    assert parse_layers([-1, 0], 12) == frozenset({0, 11})
    assert parse_layers("-3--1", 12) == parse_layers(["9-10", 11], 12) == frozenset({9, 10, 11})
    for spec, message in (([12], "layer 12 out of range for a 12-layer model"),
                          ("0-20", "layer 20 out of range for a 12-layer model"),
                          ("5-2", "the range 5-2 is empty"), ("-1-2", "the range -1-2 is empty"),
                          ("1-", "cannot read '1-'"), ("one", "cannot read 'one'"), ([True], "cannot read")):
        with pytest.raises(RfclipError, match=message) as err:
            parse_layers(spec, 12)
        assert "\n" not in str(err.value)


def test_rf_layers_checked_at_construction_and_once_the_model_is_known(tiny_clip):
    for bad in ("5-2", "1-", "0-x"):  # syntax: at construction
        with pytest.raises(RfclipError, match="rf_layers"):
            build_method("rfclip", rf_layers=bad)
    method = build_method("rfclip", distraction_dims=TINY_DIMS, rf_layers="0-20")  # range: the model decides
    with pytest.raises(RfclipError, match="layer 20 out of range for a 3-layer model"):
        method.prepare(tiny_clip)  # what Segmenter calls
    with pytest.raises(RfclipError, match="layer 20 out of range for a 3-layer model"):
        DenseCLIP(tiny_clip.model.visual)(torch.randn(1, 3, 64, 64), method)  # direct use: at the first forward
    from rfclip.segmenter import Segmenter

    with pytest.raises(RfclipError, match="layer 20 out of range"):
        Segmenter(tiny_clip, method="rfclip", distraction_dims=TINY_DIMS, rf_layers="0-20", device="cpu",
                  text_cache=False)


class _Geometry:
    def __init__(self, layers, width, patch):
        self.num_layers, self.width, self.patch_size = layers, width, (patch, patch)


def test_attention_condition_from_the_encoder_geometry(tiny_clip, images, monkeypatch):
    auto = build_method("rfclip", distraction_dims=TINY_DIMS)
    assert auto.uses_attn_condition(_Geometry(24, 1024, 14))  # CLIP ViT-L/14 (and ViT-L-14-336)
    assert not auto.uses_attn_condition(_Geometry(12, 768, 16))  # ViT-B/16
    assert not auto.uses_attn_condition(_Geometry(24, 1024, 16))
    assert not build_method("rfclip", attn_condition="off").uses_attn_condition(_Geometry(24, 1024, 14))
    assert build_method("rfclip", attn_condition="on").uses_attn_condition(_Geometry(12, 768, 16))
    # build_method + DenseCLIP without Segmenter (no prepare): the geometry decides in begin(). The tiny model
    # stands in for L/14 here; theta_a = 1 rejects every token, so a planted token is no distraction token.
    import rfclip.methods.rfclip as rfclip_module

    planted = plant(tiny_clip, [17, 60], dim=20)
    enc = DenseCLIP(planted.model.visual)
    monkeypatch.setattr(rfclip_module, "RF_ATTN_CONDITION_GEOMETRY", ((enc.num_layers, enc.width, 16),))
    rec: dict = {}
    enc(images[:1], build_method("rfclip", distraction_dims=TINY_DIMS, theta_a=1.0), record=rec)
    assert rec["rf.L0.phi_pass"][0].sum() == 2 and not rec["rf.L0.dis"][0].any()


# ------------------------------------------------------------------------------------ whole forward
def plant(clip, tokens, dim, value=60.0):
    """A copy of ``clip`` whose patch tokens ``tokens`` over-activate channel ``dim`` (positional embedding)."""
    import copy

    planted = copy.deepcopy(clip)
    with torch.no_grad():
        pos = planted.model.visual.positional_embedding
        for t in tokens:
            pos[1 + t, dim] += value
    return planted


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_planted_distraction_detected_and_attention_share_drops(tiny_clip, images):
    tokens = [17, 60, 61, 122, 190]
    planted = plant(tiny_clip, tokens, dim=20)
    enc = DenseCLIP(planted.model.visual)
    method = build_method("rfclip", distraction_dims=TINY_DIMS)
    rec: dict = {}
    with torch.no_grad():
        feats, _, _ = enc(images, method, record=rec)
    assert torch.isfinite(feats).all()
    dis = rec["rf.L0.dis"][0].bool()  # (B, N)
    expected = torch.zeros_like(dis)
    expected[:, tokens] = True
    assert torch.equal(dis, expected)
    before, after = rec["rf.L0.attn"][0], rec["rf.L0.attn_after"][0]  # head-averaged (B, T, T)
    share_before = before[:, 1:, 1:][..., tokens].sum(-1)  # attention each patch query pays the planted tokens
    share_after = after[:, 1:, 1:][..., tokens].sum(-1)
    torch.testing.assert_close(share_after, (1 - method.beta) * share_before, rtol=1e-4, atol=1e-7)
    assert (share_after < share_before).all()
    defocused = rec["rf.L0.def"][0].bool()
    assert not (defocused & dis).any() and defocused.any(-1).all()
    gained = (after - before)[:, 1:, 1:].sum(1)  # column gains
    assert (gained[defocused] >= -1e-6).all() and (gained[~defocused & ~dis] .abs() < 1e-6).all()


def test_rf_steps_off_equals_kk_layer_average(tiny_clip, images):
    enc = DenseCLIP(tiny_clip.model.visual)
    want, _, _ = enc(images, build_method("kk", layer_average=True))
    got, _, _ = enc(images, build_method("kk_proxy_baseline", proxy_include_cls=True))
    assert torch.equal(got, want)
    got2, _, _ = enc(images, build_method("rfclip", distraction_dims=TINY_DIMS, embed_redistribution=False,
                                       attn_redistribution=False, proxy_include_cls=True))
    assert torch.equal(got2, want)


def test_kk_proxy_baseline_default_against_open_clip(tiny_clip, images):
    """RF-CLIP's default last layer and its baseline (Table 4 (I)), recomputed from open_clip's own blocks: the mean
    over all L layers of softmax(s k k^T) (each layer's keys from its real input), per head, sliced to the patch
    block without renormalising, applied to the patch values; no residual, no FFN; ln_post and proj."""
    visual = tiny_clip.model.visual
    blocks = visual.transformer.resblocks
    x = visual._embeds(images)  # (B, T, C): open_clip's patch + class + positional embedding and ln_pre
    maps = []
    for i, block in enumerate(blocks):
        z = block.ln_1(x)
        q, k, v = torch.nn.functional.linear(z, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        B, T, C = k.shape
        heads = block.attn.num_heads
        k, v = (t.reshape(B, T, heads, C // heads).transpose(1, 2) for t in (k, v))
        maps.append(torch.softmax(k @ k.transpose(-1, -2) / (C // heads) ** 0.5, dim=-1))
        if i < len(blocks) - 1:
            x = block(x)
    A = torch.stack(maps).mean(0)[:, :, 1:, 1:]  # (B, H, N, N), rows sum to less than 1
    assert (A.sum(-1) < 1).all()
    out = (A @ v[:, :, 1:]).transpose(1, 2).reshape(B, T - 1, C)
    want = torch.nn.functional.normalize(visual.ln_post(blocks[-1].attn.out_proj(out)) @ visual.proj, dim=-1)
    enc = DenseCLIP(visual)
    with torch.inference_mode():
        got, _, _ = enc(images, build_method("kk_proxy_baseline"))
        rf, _, _ = enc(images, build_method("rfclip", distraction_dims=TINY_DIMS))  # no distraction token here
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(rf, got)


def test_no_distraction_tokens_changes_nothing(tiny_clip, images):
    """A random CLIP has no token above tau = 5/d: RF-CLIP equals its baseline and records no redistribution."""
    enc = DenseCLIP(tiny_clip.model.visual)
    base, _, _ = enc(images, build_method("kk_proxy_baseline"))
    rec: dict = {}
    got, _, _ = enc(images, build_method("rfclip", distraction_dims=TINY_DIMS), record=rec)
    assert torch.equal(got, base)
    assert not any(k.endswith("attn_after") for k in rec)
    assert all(not v[0].any() for k, v in rec.items() if k.endswith(".dis"))


def test_crops_in_a_batch_are_independent(tiny_clip, images):
    """Per-crop masks: a crop's features do not depend on the other crops of its batch."""
    planted = plant(tiny_clip, [3, 100], dim=5, value=25.0)
    enc = DenseCLIP(planted.model.visual)
    imgs = images.clone()
    imgs[1] *= 0.05  # a nearly flat crop: different distraction sets per crop
    method = build_method("rfclip", distraction_dims=TINY_DIMS, tau_mult=3.0)
    rec: dict = {}
    batch, _, _ = enc(imgs, method, record=rec)
    counts = [int(v[0].sum()) for k, v in rec.items() if k.endswith(".dis")]
    assert sum(counts) > 0
    for i in range(imgs.shape[0]):
        single, _, _ = enc(imgs[i:i + 1], method)
        torch.testing.assert_close(single[0], batch[i], atol=2e-5, rtol=1e-4)


# Each option set with what it must do relative to the default on the planted model: "same" (equal features: the
# option cannot change anything there), "differs", or "dis" (it only changes T_dis: features equal iff T_dis is).
OPTION_SETS = [
    (dict(eig_solver="eigh"), "same"),  # both solvers agree on these graphs (large eigengaps)
    (dict(attn_condition="on", theta_a=0.0), "same"),  # every token passes a zero attention threshold
    (dict(cut_threshold="otsu", fg_rule="smaller_side"), "differs"),
    (dict(fg_rule="less_attended", defocus_sim_heads="per_head"), "differs"),
    (dict(fg_rule="max_abs"), "differs"), (dict(cut_graph="non_distraction"), "differs"),
    (dict(defocus_sim="kk_cur"), "differs"), (dict(defocus_sim="qk_cur"), "differs"),
    (dict(defocus_sim="qk_avg"), "differs"), (dict(defocus_sim_layers="preceding_only"), "differs"),
    (dict(defocus_sim="qk_avg", defocus_sim_layers="preceding_only"), "differs"),
    (dict(redistribute_to="non_distraction"), "differs"), (dict(redistribute_to="cls"), "differs"),
    (dict(redistribute_cls_row=True), "differs"),
    (dict(embed_kernel=5, embed_exclude_center=False), "differs"),
    (dict(embed_channels="all", embed_blend=0.4, embed_padding="zero"), "differs"),
    (dict(suppress_mode="mask", attn_redistribution=False), "differs"),
    (dict(suppress_mode="lowpass", embed_redistribution=False), "differs"),
    (dict(suppress_mode="mean", embed_redistribution=False), "differs"),
    (dict(suppress_mode="median", attn_redistribution=False, embed_redistribution=False), "differs"),
    (dict(random_tokens=True), "differs"), (dict(phi_norm="abs"), "dis"), (dict(phi_norm="raw"), "dis"),
    (dict(attn_condition="on", attn_rule="five_over_n"), "dis"), (dict(rf_layers="1-2"), "differs"),
    (dict(proxy_attn="kk_last"), "differs"), (dict(proxy_attn="qq_last"), "differs"),
    (dict(proxy_attn="qq_plus_kk_last"), "differs"), (dict(proxy_attn="qk_last"), "differs"),
    (dict(proxy_layers="intermediate"), "differs"), (dict(proxy_heads="head_mean"), "differs"),
    (dict(proxy_renorm=True), "differs"), (dict(proxy_include_cls=True), "differs"),
    (dict(redistribute_proxy=True), "differs"), (dict(beta=1.0), "differs"), (dict(beta=0.0), "differs"),
]
PLANTED = [3, 4, 60, 100, 150]


@pytest.fixture(scope="module")
def planted_tiny(tiny_clip):
    """The tiny model with PLANTED as distraction tokens in every layer (rfclip.testing)."""
    return DenseCLIP(plant_distraction_tokens(tiny_clip, PLANTED, TINY_DIMS).model.visual)


def run_recorded(enc, x, **options):
    rec: dict = {}
    with torch.inference_mode():
        feats, grid, _ = enc(x, build_method("rfclip", distraction_dims=TINY_DIMS, **options), record=rec)
    return feats, grid, rec


def check_record(rec, num_layers, opts):
    """Invariants every recorded layer must satisfy, whatever the options."""
    for layer in range(num_layers):
        dis = rec.get(f"rf.L{layer}.dis")
        after = rec.get(f"rf.L{layer}.attn_after")
        if after is not None:  # rows stay row-stochastic and non-negative after the redistribution (or the mask)
            after = after[0]
            torch.testing.assert_close(after.sum(-1), torch.ones(after.shape[:-1]), atol=1e-5, rtol=0,
                                       msg=f"{opts} L{layer}")
            assert after.min() >= 0, (opts, layer)
            if opts.get("suppress_mode") == "mask":  # masked distraction columns receive nothing
                d = dis[0].bool()
                assert after[:, 1:, 1:].transpose(1, 2)[d].abs().max() == 0, (opts, layer)
        defocused = rec.get(f"rf.L{layer}.def")
        if defocused is not None:
            d = dis[0].bool()
            t = defocused[0]
            t = t.bool() if t.dim() == 2 else (t > 0)  # per-head graphs log the share of heads
            assert not (t & d).any() and t.any(-1).all(), (opts, layer)


def test_every_option_runs_and_does_what_it_says(planted_tiny):
    """Every option on the tiny model with distraction tokens planted in every layer: finite features; recorded
    attention rows still sum to 1 and T_def avoids T_dis; each option either provably leaves the output unchanged
    or changes it (an option that silently does nothing fails here)."""
    enc = planted_tiny
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base, _, rec = run_recorded(enc, x)
    for layer in range(enc.num_layers):  # the default finds exactly the planted tokens and redistributes
        dis = rec[f"rf.L{layer}.dis"][0]
        assert dis[:, PLANTED].all() and int(dis.sum()) == 2 * len(PLANTED), layer
        if layer < enc.num_layers - 1:
            assert f"rf.L{layer}.attn_after" in rec and f"rf.L{layer}.def" in rec
    check_record(rec, enc.num_layers, {})
    base_dis = [rec[f"rf.L{layer}.dis"][0] for layer in range(enc.num_layers)]
    for opts, expect in OPTION_SETS:
        feats, grid, rec = run_recorded(enc, x, **opts)
        assert grid == (14, 14) and feats.shape == base.shape, opts
        assert torch.isfinite(feats).all(), opts
        check_record(rec, enc.num_layers, opts)
        same = torch.allclose(feats, base, atol=1e-5, rtol=0)
        if expect == "dis":
            expect = "same" if all(torch.equal(rec[f"rf.L{layer}.dis"][0], base_dis[layer])
                                   for layer in range(enc.num_layers)) else "differs"
        assert same == (expect == "same"), f"{opts}: expected the output to be {expect}"
    for name in ("rfclip_nodefocus", "rfclip_code_embed", "rfclip_code_constants"):
        with torch.inference_mode():
            feats, _, _ = enc(x, build_method(name, distraction_dims=TINY_DIMS))
        assert torch.isfinite(feats).all() and not torch.allclose(feats, base, atol=1e-5, rtol=0), name


def test_attention_condition_filters(tiny_clip, images):
    planted = plant(tiny_clip, [17, 60], dim=20)
    enc = DenseCLIP(planted.model.visual)
    rec_on: dict = {}
    enc(images[:1], build_method("rfclip", distraction_dims=TINY_DIMS, attn_condition="on", theta_a=1.0), record=rec_on)
    assert not rec_on["rf.L0.dis"][0].any() and rec_on["rf.L0.phi_pass"][0].sum() == 2
    rec_off: dict = {}
    enc(images[:1], build_method("rfclip", distraction_dims=TINY_DIMS, attn_condition="off", theta_a=1.0),
        record=rec_off)
    assert rec_off["rf.L0.dis"][0].sum() == 2


def test_options_are_validated():
    for bad in (dict(cut_threshold="median"), dict(beta=1.5), dict(alpha=0.4), dict(embed_kernel=4),
                dict(proxy_attn="x"), dict(attn_condition="maybe"), dict(lam=0.3), dict(cut_graph="some"),
                dict(fg_rule="largest")):
        with pytest.raises(RfclipError):
            build_method("rfclip", **bad)
    # combinations that would silently undo or ignore each other: one-line errors at construction
    for bad, message in ((dict(suppress_mode="mean"), "set embed_redistribution=false"),
                         (dict(suppress_mode="median"), "set embed_redistribution=false"),
                         (dict(suppress_mode="lowpass"), "set embed_redistribution=false"),
                         (dict(suppress_mode="mask"), "set attn_redistribution=false"),
                         (dict(suppress_mode="mask", attn_redistribution=False, redistribute_proxy=True),
                          "redistribute_proxy=false"),
                         (dict(proxy_renorm=True, proxy_include_cls=True), "choose one"),
                         (dict(proxy_layers="intermediate", proxy_attn="qq_last"), "kk_layer_avg only")):
        with pytest.raises(RfclipError, match=message) as err:
            build_method("rfclip", **bad)
        assert "\n" not in str(err.value)
    build_method("rfclip", suppress_mode="mean", embed_redistribution=False)  # Table 4 (III)/(IV) stay possible
    build_method("rfclip", suppress_mode="mask", attn_redistribution=False)
    m = build_method("rfclip", beta="0.3", embed_redistribution="false", embed_kernel="5", tau="0.01")
    assert (m.beta, m.embed_redistribution, m.embed_kernel, m.tau) == (0.3, False, 5, 0.01)
    with pytest.raises(RfclipError):
        build_method("rfclip", attn_redistribution="sometimes")
    m = build_method("rfclip_nodefocus")
    assert m.redistribute_to == "non_distraction" and isinstance(m, RFCLIP)
    assert not build_method("kk_proxy_baseline").detects


# ------------------------------------------------------------------------------------ dims lookup
@dataclasses.dataclass
class FakeClip:
    name: str
    pretrained: str | None
    source: str = "open_clip:openai"
    identity: str = "fake"


def test_dims_lookup_and_missing_dims_error(tiny_clip, tmp_path, monkeypatch):
    from rfclip.distraction_dims import resolve_distraction_dims

    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path))
    dims, src = resolve_distraction_dims(FakeClip("ViT-B-16", "openai"))
    assert dims == DISTRACTION_DIMS[("ViT-B-16", "openai")] and "built-in" in src
    dims, _ = resolve_distraction_dims(FakeClip("ViT-L-14", None, source="openai-torchscript:/x/ViT-L-14.pt"))
    assert dims == DISTRACTION_DIMS[("ViT-L-14", "openai")]
    with pytest.raises(RfclipError) as err:
        resolve_distraction_dims(FakeClip("ViT-B-32", "laion2b_s34b_b79k"))
    assert "rfclip calibrate --model ViT-B-32 --pretrained laion2b_s34b_b79k IMAGES_DIR" in str(err.value)
    # ViT-L-14-336 is not assumed to share ViT-L/14's dims: calibrate (or pass dims) like any other model
    with pytest.raises(RfclipError, match="rfclip calibrate --model ViT-L-14-336 --pretrained openai"):
        resolve_distraction_dims(FakeClip("ViT-L-14-336", "openai"))
    with pytest.raises(RfclipError, match="rfclip calibrate"):
        resolve_distraction_dims(FakeClip("ViT-L-14-336", None, source="openai-torchscript:/x/ViT-L-14-336.pt"))
    with pytest.raises(RfclipError):
        resolve_distraction_dims(FakeClip("ViT-B-16", "openai"), distraction_dims=[800], width=768)

    from rfclip.segmenter import Segmenter

    with pytest.raises(RfclipError, match="rfclip calibrate"):
        Segmenter(tiny_clip, method="rfclip", device="cpu", text_cache=False)
    Segmenter(tiny_clip, method="kk_proxy_baseline", device="cpu", text_cache=False)  # needs no dims


# ------------------------------------------------------------------------------------ end to end
VITB16_VISION = dict(
    embed_dim=512, quick_gelu=True,
    vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
)


def test_segmenter_end_to_end_vitb16_geometry():
    """Real ViT-B/16 image-encoder geometry (12 x 768, 14 x 14 grid), random weights, the paper's dims, planted
    over-activations so that every RF step runs."""
    from rfclip.segmenter import Segmenter

    clip = make_clip(VITB16_VISION, seed=0)
    dims = DISTRACTION_DIMS[("ViT-B-16", "openai")]
    with torch.no_grad():
        clip.model.visual.positional_embedding[[1 + 20, 1 + 100], dims[1]] += 300.0
    seg = Segmenter(clip, method="rfclip", distraction_dims=dims, device="cpu", text_cache=False,
                    templates=["a photo of a {}."], short_side=224, slide_crop=224, slide_stride=112)
    image = np.random.default_rng(0).integers(0, 256, size=(224, 240, 3), dtype=np.uint8)
    out = seg.segment(image, "cat;dog;sky")
    assert out.mask.shape == (224, 240) and out.probs.shape == (3, 224, 240)
    assert np.isfinite(out.probs).all()
    rec: dict = {}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        seg.encoder(x, seg.method, record=rec)
    assert rec["rf.L0.dis"][0].sum() == 2 and "rf.L0.attn_after" in rec and "rf.L0.fiedler" in rec
