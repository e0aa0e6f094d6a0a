"""FSA: every step against an independent few-line computation, the off switch, every base end to end, numerics.

Random weights: these tests check the mechanics (formulas, batching, precision), not accuracy.
"""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from conftest import make_clip

import rfclip.methods.fsa as fsa_mod
from rfclip.constants import FSA_LAMBDA
from rfclip.dense import DenseCLIP
from rfclip.errors import RfclipError
from rfclip.methods import METHODS, build_method
from rfclip.methods.fsa import (FSA, adaptation_ensemble, default_lambda, feedback_attention, feedback_from_log_probs,
                                isolated_log_probs, kl_matrix, nucleus_mask)
from rfclip.methods.naclip import neighbourhood_prior
from rfclip.methods.proxyclip import ProxyCLIP
from rfclip.segmenter import Segmenter

BASES = ["clip", "maskclip", "sclip", "clearclip", "naclip", "kk", "proxyclip", "rfclip"]


def tiny_vfm(seed: int = 0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=224, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)
    args.update(kw)
    return VisionTransformer(**args).eval()


@pytest.fixture(scope="module")
def vfm():
    return tiny_vfm()


def base_options(base, vfm):
    if base == "proxyclip":
        return {"vfm": vfm}
    if base == "rfclip":  # a random model has no calibrated distraction dimensions
        return {"distraction_dims": [3, 17, 40]}
    return {}


FAST = dict(text_cache=False, device="cpu", templates=["a photo of a {}."], short_side=None)  # one crop, one template


def skip_unregistered(base):
    if base not in METHODS:
        pytest.skip(f"method {base} is not registered")


# ------------------------------------------------------------------------------------------------ references
def kl_direct(p):
    """KL(P_i || P_j) by its definition, a (N, N, Q) tensor (small N only)."""
    logp = p.log()
    return (p[:, None, :] * (logp[:, None, :] - logp[None, :, :])).sum(-1).clamp_min(0)


def nucleus_loop(row, mass=0.45):
    """§3.4 with a plain loop over the sorted positions."""
    row = [float(x) for x in row.tolist()]
    order = sorted(range(len(row)), key=lambda j: -row[j])
    total = sum(math.exp(x) for x in row)
    keep, cum = set(), 0.0
    for pos, j in enumerate(order):
        cum += math.exp(row[j]) / total
        if cum <= mass or pos == 0:
            keep.add(j)
        else:
            break
    return keep


def reference_feedback(logp, lam, mass=0.45):
    """A_fb of one crop from the direct KL and the loop pruning."""
    S = 1.0 / (1.0 + kl_direct(logp.exp().double()).float())
    A = torch.zeros_like(S)
    for i in range(S.shape[0]):
        keep = sorted(nucleus_loop(S[i], mass))
        ell = S[i, keep] * torch.exp(lam * S[i, keep])
        A[i, keep] = torch.softmax(ell, dim=0)
    return A


def reference_ensemble(a_fb, A, has_cls, c):
    """Per-head loop with the block-diagonal CLS extension."""
    ext = torch.block_diag(torch.ones(1, 1), a_fb) if has_cls else a_fb
    return torch.stack([(ext @ A[h] + A[h] @ ext + c * ext) / 3 for h in range(A.shape[0])])


# ------------------------------------------------------------------------------------------------ single steps
def test_kl_matrix_product_form_equals_definition():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 9, 6) * 3, dim=-1)
    got = kl_matrix(logp)
    for b in range(2):
        torch.testing.assert_close(got[b], kl_direct(logp[b].exp()), atol=1e-5, rtol=1e-5)
    assert torch.all(got.diagonal(dim1=1, dim2=2).abs() < 1e-5)
    # rows against other columns (the row-block form used for memory)
    torch.testing.assert_close(kl_matrix(logp[:, 3:5], logp), got[:, 3:5])


def test_nucleus_pruning_matches_loop():
    torch.manual_seed(1)
    S = torch.rand(2, 40, 40) * 0.9
    S.diagonal(dim1=1, dim2=2).fill_(1.0)
    mask = nucleus_mask(S, 0.45)
    for b in range(2):
        for i in range(40):
            assert set(torch.nonzero(mask[b, i]).flatten().tolist()) == nucleus_loop(S[b, i], 0.45)
    frac = mask.float().mean().item()
    assert 0.17 <= frac <= 0.5
    # a row whose largest entry alone exceeds the mass still keeps it
    row = torch.tensor([[[50.0, 0.0, 0.0]]])
    assert nucleus_mask(row).tolist() == [[[True, False, False]]]


def official_sparse_atten_fp64(similarity):
    """FSA's SparseAtten (sort descending, softmax of the sorted row, cumsum <= 0.45, first kept, back to the keys),
    in fp64, the sort stable so that ties go in key order."""
    srt, idx = torch.sort(similarity.double(), descending=True, dim=-1, stable=True)
    keep = torch.softmax(srt, dim=-1).cumsum(-1) <= 0.45
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def test_nucleus_ties_at_the_boundary():
    """Hand-built rows where the 45 % boundary falls inside a group of equal similarities. Sorted cumulative masses
    (exp-weights over the row): row 0: .185 .336 | .487: the boundary splits the three 0.8s after the first, so the
    official rule keeps 2 keys (1 and the lowest-index 0.8, key 2), not all keys equal to the last kept one. Row 1:
    key 6 is 1e-12 above the other 0.8s and goes first (fp32 would merge it with them). Row 2: three exact 1.0s
    (KL clamped at 0), .191 .381 | .572: two of them."""
    S = torch.tensor([[0.5, 1.0, 0.8, 0.3, 0.8, 0.2, 0.8, 0.1],
                      [0.5, 1.0, 0.8, 0.3, 0.8, 0.2, 0.8 + 1e-12, 0.1],
                      [1.0, 0.2, 1.0, 0.2, 1.0, 0.2, 0.2, 0.2]], dtype=torch.float64)
    want = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0],
                         [0, 1, 0, 0, 0, 0, 1, 0],
                         [1, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(nucleus_mask(S), want)
    assert torch.equal(nucleus_mask(S[None]), want[None])  # batched
    assert torch.equal(official_sparse_atten_fp64(S), want)
    for i in range(3):
        assert set(torch.nonzero(want[i]).flatten().tolist()) == nucleus_loop(S[i])
    # the kept count is the official prefix length: 2 per row, never the whole tie group
    assert nucleus_mask(S).sum(-1).tolist() == [2, 2, 2]
    assert torch.equal(nucleus_mask(S.float())[1], want[0])  # fp32 merges row 1's near-tie


def test_pruning_of_an_ill_conditioned_case_is_the_official_rule_in_fp64():
    """Near-parallel text embeddings: the patches' class distributions are nearly alike, KLs are ~1e-3 and the
    similarities crowd below 1. The feedback attention keeps exactly the keys the official formulas keep in fp64
    (broadcast KL, 1 / (1 + KL), SparseAtten); in fp32 some near-ties come out the other way."""
    g = torch.Generator().manual_seed(0)
    N, Q, D = 196, 20, 64
    base = F.normalize(torch.randn(D, generator=g), dim=0)
    text = F.normalize(base + 1e-3 * torch.randn(Q, D, generator=g), dim=-1)
    feats = F.normalize(torch.randn(2, N, D, generator=g), dim=-1)
    uni = F.normalize(torch.randn(2, D, generator=g), dim=-1)
    logp = isolated_log_probs(feats, uni, text)  # fp64
    p = logp.exp()
    kl = (p.unsqueeze(2) * (logp.unsqueeze(2) - logp.unsqueeze(1))).sum(-1).clamp(min=0)  # official kl_divergence
    sim = 1 / (kl + 1.0)
    want = official_sparse_atten_fp64(sim)
    a_fb, kept = feedback_from_log_probs(logp, lam=3.0, block_elements=2 * 50 * N)  # several row blocks
    assert a_fb.dtype == torch.float32
    assert torch.equal(a_fb > 0, want)
    torch.testing.assert_close(kept, want.double().mean(dim=(1, 2)).float())
    a32, _ = feedback_from_log_probs(logp.float(), lam=3.0)
    assert (a32 > 0).ne(want).sum() > 0  # the case is ill-conditioned: fp32 loses some of these decisions


def test_feedback_attention_matches_reference():
    torch.manual_seed(2)
    logp = torch.log_softmax(torch.randn(3, 12, 5) * 2, dim=-1)
    a_fb, kept = feedback_from_log_probs(logp, lam=3.0, block_elements=3 * 12 * 5)  # several row blocks
    for b in range(3):
        torch.testing.assert_close(a_fb[b], reference_feedback(logp[b], 3.0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a_fb.sum(-1), torch.ones(3, 12))
    assert torch.all(a_fb.argmax(-1) == torch.arange(12))  # the query itself (KL = 0) gets the largest weight
    assert kept.shape == (3,) and torch.all((kept > 0) & (kept <= 1))
    # the single-block path gives the same result
    torch.testing.assert_close(feedback_from_log_probs(logp, lam=3.0)[0], a_fb)


@pytest.mark.parametrize("has_cls,c", [(True, 1.0), (True, 2.0), (False, 1.0)])
def test_adaptation_ensemble_matches_loop(has_cls, c):
    torch.manual_seed(3)
    B, H, N = 2, 3, 7
    T = N + has_cls
    a_fb = torch.softmax(torch.randn(B, N, N), -1)
    A = c * torch.softmax(torch.randn(B, H, T, T), -1)
    got = adaptation_ensemble(a_fb, A, has_cls, torch.full((B,), c))
    for b in range(B):
        torch.testing.assert_close(got[b], reference_ensemble(a_fb[b], A[b], has_cls, c))
    torch.testing.assert_close(got.sum(-1), torch.full((B, H, T), c))  # the base's row sums are kept
    shared = adaptation_ensemble(a_fb, A[:, :1], has_cls, c)  # head-shared base attention
    torch.testing.assert_close(shared, got[:, :1])


def test_isolated_log_probs_definition():
    torch.manual_seed(4)
    f = F.normalize(torch.randn(2, 5, 8), dim=-1)
    u = F.normalize(torch.randn(2, 8), dim=-1)
    t = F.normalize(torch.randn(4, 8), dim=-1)
    f64, u64, t64 = f.double(), u.double(), t.double()
    want = torch.log_softmax(20 * f64 @ t64.T - 35 * (u64 @ t64.T)[:, None], dim=-1)
    torch.testing.assert_close(isolated_log_probs(f, u, t), want, atol=1e-12, rtol=1e-12)  # fp64 by default
    torch.testing.assert_close(isolated_log_probs(f, u, t, dtype=torch.float32), want.float())


# ------------------------------------------------------------------------------------------------ inside the forward
class Capture:
    """Wraps a method to keep the last block's q, k, v and the first-pass attention."""

    def __init__(self, method):
        self.method = method
        self.seen = {}

    def __getattr__(self, item):
        return getattr(self.method, item)

    def final_attention(self, ctx, q, k, v):
        self.seen.update(q=q, k=k, v=v)
        out = self.method.final_attention(ctx, q, k, v)
        self.seen["final"] = out
        return out


@pytest.mark.parametrize("base", ["naclip", "sclip", "clip"])
def test_fsa_last_block_against_independent_computation(tiny_clip, base, monkeypatch):
    """Isolation (uniform baseline), feedback attention and ensemble of a +fsa forward, recomputed per crop."""
    visual = tiny_clip.model.visual
    block = visual.transformer.resblocks[-1]
    encoder = DenseCLIP(visual)
    text = F.normalize(torch.randn(5, visual.output_dim, generator=torch.Generator().manual_seed(5)), dim=-1)
    images = torch.randn(2, 3, 224, 160, generator=torch.Generator().manual_seed(6))
    seen_logp = {}
    real = fsa_mod.feedback_from_log_probs

    def spy(log_p, lam):
        seen_logp["lp"] = log_p
        return real(log_p, lam)

    monkeypatch.setattr(fsa_mod, "feedback_from_log_probs", spy)
    method = Capture(build_method(base + "+fsa"))
    encoder(images, method, text_features=text)
    q, k, v = (method.seen[n] for n in "qkv")
    s = q.shape[-1] ** -0.5
    sm = lambda a, b: torch.softmax(s * a @ b.transpose(-1, -2), dim=-1)  # noqa: E731
    if base == "naclip":
        A = torch.softmax(s * k @ k.transpose(-1, -2) + neighbourhood_prior((14, 10), 5.0), dim=-1)
    elif base == "sclip":
        A = sm(q, q) + sm(k, k)
    else:
        A = sm(q, k)
    c = 2.0 if base == "sclip" else 1.0
    for b in range(2):
        Ab, vb = A[b], v[b]  # (H, T, T), (H, T, dh)
        H, T, dh = vb.shape
        out = lambda att, val: block.attn.out_proj((att @ val).transpose(0, 1).reshape(att.shape[1], H * dh))  # noqa
        phi = lambda y: F.normalize(visual.ln_post(y) @ visual.proj, dim=-1)  # noqa: E731
        f_patch = phi(out(Ab, vb))[1:]
        U = torch.full((1, T - 1), c / (T - 1))  # uniform over the patch tokens (row sum of the base)
        f_uni = phi(out(U.expand(H, 1, T - 1), vb[:, 1:]))[0]
        logp = torch.log_softmax(20 * f_patch @ text.T - 35 * f_uni @ text.T, dim=-1)
        assert seen_logp["lp"].dtype == torch.float64
        torch.testing.assert_close(seen_logp["lp"][b].float(), logp, atol=2e-5, rtol=1e-4)
        a_fb = reference_feedback(logp, FSA_LAMBDA["default"])
        want = reference_ensemble(a_fb, Ab, True, c)
        torch.testing.assert_close(method.seen["final"].weights[b], want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("base", BASES)
def test_fsa_off_is_exactly_the_base(tiny_clip, random_image, vfm, base):
    skip_unregistered(base)
    opts = base_options(base, vfm)
    plain = Segmenter(tiny_clip, method=base, **FAST, **opts)
    off = Segmenter(tiny_clip, method=base + "+fsa", fsa=False, **FAST, **opts)
    on = Segmenter(tiny_clip, method=base, plugins=["fsa"], **FAST, **opts)
    assert not off.method.needs_text_in_forward and on.method.needs_text_in_forward
    text = plain.encode_classes("cat,kitty;dog;grass;sky")
    (m0, p0), = plain.predict([random_image], text)
    (m1, p1), = off.predict([random_image], text)
    (m2, p2), = on.predict([random_image], text)
    assert torch.equal(p0, p1) and torch.equal(m0, m1)
    assert p2.shape == p0.shape and torch.isfinite(p2).all()
    assert not torch.equal(p0, p2)  # FSA on changes the prediction
    assert on.method.name == base + "+fsa"


def test_lambda_zero_is_not_the_identity(tiny_clip):
    images = torch.randn(1, 3, 224, 224)
    text = F.normalize(torch.randn(3, tiny_clip.model.visual.output_dim), dim=-1)
    enc = DenseCLIP(tiny_clip.model.visual)
    base = enc(images, build_method("naclip"))[0]
    lam0 = enc(images, build_method("naclip+fsa", fsa_lambda=0), text_features=text)[0]
    assert not torch.allclose(base, lam0)


def test_batched_crops_equal_single_crops(tiny_clip, vfm):
    images = torch.randn(3, 3, 160, 128)
    text = F.normalize(torch.randn(4, tiny_clip.model.visual.output_dim), dim=-1)
    enc = DenseCLIP(tiny_clip.model.visual)
    for spec, opts in (("sclip+fsa", {}), ("proxyclip+fsa", {"vfm": vfm})):
        method = build_method(spec, **opts)
        batched = enc(images, method, text_features=text)[0]
        single = torch.cat([enc(images[i:i + 1], method, text_features=text)[0] for i in range(3)])
        # rounding differs between batch sizes; a key at the exact pruning threshold may flip, hence the tolerance
        torch.testing.assert_close(batched, single, atol=5e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ options
def test_lambda_defaults_and_options(tiny_clip):
    assert build_method("naclip+fsa").lam == FSA_LAMBDA["default"] == 3.0
    assert build_method("naclip+fsa", fsa_lambda=1.5).lam == 1.5
    assert default_lambda(ProxyCLIP(vfm="mae")) == FSA_LAMBDA["mae"] == 4.5
    assert default_lambda(ProxyCLIP(vfm="vit_base_patch14_reg4_dinov2.lvd142m")) == 3.0
    assert default_lambda(build_method("naclip"), width=1280) == FSA_LAMBDA["vit_h"] == 2.3

    class FakeH:
        name = "ViT-H-14"
        model = tiny_clip.model

    m = build_method("clearclip+fsa")
    m.prepare(FakeH)
    assert m.lam == 2.3
    with pytest.raises(RfclipError, match="fsa_lambda"):
        build_method("naclip+fsa", fsa_lambda=-1)
    with pytest.raises(RfclipError, match="unknown option"):
        build_method("naclip+fsa", fsa_mass=0.3)
    m = build_method("naclip", plugins=["fsa"], gaussian_std=3.0, fsa_lambda=2.0)
    assert isinstance(m, FSA) and m.base.gaussian_std == 3.0 and m.gaussian_std == 3.0
    assert m.options() == {"gaussian_std": 3.0, "fsa": True, "fsa_lambda": 2.0}
    assert m.reduced_last_block and "FSA" in m.description


def test_needs_text(tiny_clip):
    enc = DenseCLIP(tiny_clip.model.visual)
    with pytest.raises(RfclipError, match="text"):
        enc(torch.randn(1, 3, 64, 64), build_method("naclip+fsa"))


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_underflow_gives_no_nan(dtype):
    """Logits spanning hundreds of units: probabilities underflow, yet the fp32 block stays finite."""
    torch.manual_seed(7)
    B, N, Q, D = 2, 30, 6, 16
    f = (torch.randn(B, N, D) * 20).to(dtype)  # not normalised on purpose: |logits| in the hundreds
    u = (torch.randn(B, D) * 20).to(dtype)
    t = torch.randn(Q, D).to(dtype)
    logp = isolated_log_probs(f, u, t)
    assert logp.dtype == torch.float64 and torch.isfinite(logp).all()
    assert (logp.exp() == 0).any()  # some probabilities really underflow
    a_fb, kept = feedback_from_log_probs(logp.to(dtype), 3.0)
    assert torch.isfinite(a_fb).all() and torch.isfinite(kept).all()
    torch.testing.assert_close(a_fb.sum(-1), torch.ones(B, N))
    base = torch.softmax(torch.randn(B, 4, N + 1, N + 1), -1).to(dtype)
    ens = adaptation_ensemble(a_fb.to(dtype), base, True)
    assert ens.dtype == torch.float32 and torch.isfinite(ens).all()
    s, keep = feedback_attention(torch.rand(B, N, N).to(dtype), 4.5)
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("spec", ["naclip+fsa", "sclip+fsa", "proxyclip+fsa"])
def test_bf16_autocast_forward(tiny_clip, random_image, vfm, spec):
    opts = {"vfm": vfm} if spec.startswith("proxyclip") else {}
    seg = Segmenter(tiny_clip, method=spec, precision="bf16", **FAST, **opts)
    out = seg.segment(random_image, "cat;dog;grass")
    assert np.isfinite(out.probs).all()
    ref = Segmenter(tiny_clip, method=spec, **FAST, **opts).segment(random_image, "cat;dog;grass")
    assert np.abs(out.probs - ref.probs).mean() < 0.1


def test_records_diagnostics(tiny_clip):
    enc = DenseCLIP(tiny_clip.model.visual)
    text = F.normalize(torch.randn(3, tiny_clip.model.visual.output_dim), dim=-1)
    record = {}
    enc(torch.randn(2, 3, 224, 224), build_method("naclip+fsa"), text_features=text, record=record)
    kept = record["fsa_kept_fraction"][0]
    assert kept.shape == (2,) and torch.all((kept > 0.0) & (kept <= 1.0))


B16_VISION_TINY_TEXT = dict(embed_dim=512, quick_gelu=True,
                            vision_cfg=dict(image_size=224, layers=12, width=768, head_width=64, patch_size=16),
                            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=1))


@pytest.mark.parametrize("base", ["clip", "sclip", "clearclip", "naclip", "rfclip"])
def test_every_base_with_fsa_on_b16_geometry(base):
    """``BASE+fsa`` end to end on a random CLIP with ViT-B/16's image encoder (12 blocks, width 768, 14x14 grid per
    224 crop), two overlapping crops batched in one forward: finite probabilities, the mask at the input size, and
    a prediction that differs from the base alone (the feedback changed the last block). ``proxyclip+fsa`` at this
    geometry (with a timm ViT-B/8) is in test_proxyclip.py."""
    skip_unregistered(base)
    clip = make_clip(B16_VISION_TINY_TEXT)
    image = np.random.default_rng(1).integers(0, 256, size=(224, 336, 3), dtype=np.uint8)
    opts = {"distraction_dims": [4, 162, 474]} if base == "rfclip" else {}
    probs = {}
    for spec in (base, f"{base}+fsa"):
        seg = Segmenter(clip, method=spec, slide_crop=224, slide_stride=112, **FAST, **opts)
        text = seg.encode_classes("cat;dog;grass;sky;road")
        (mask, p), = seg.predict([image], text)
        assert mask.shape == (224, 336) and p.shape == (5, 224, 336)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(0), torch.ones(()), atol=1e-4)
        probs[spec] = p
    assert not torch.equal(probs[base], probs[f"{base}+fsa"])
