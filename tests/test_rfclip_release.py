"""rfclip_release: the released RF-CLIP code (c2b333e) reproduced.

* End to end against an independent reference of the released code (``release_reference.py``: batch 1, crop by crop,
  the last block through its own modules, SciPy's clustering) on random ViT-B/16-geometry weights with planted
  distraction tokens: per-pixel probabilities, whole image, sliding window with the whole-image [CLS], crop [CLS].
* Each piece against a few-line computation; batched equals one by one; bf16/fp16 autocast against fp32.
* The ``rfclip_release`` settings preset through ``evaluate`` and the CLI.

Random weights test mechanics, not accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import release_reference as ref
from conftest import make_clip
from rfclip.constants import DISTRACTION_DIMS, MMSEG_CLIP_MEAN, MMSEG_CLIP_STD, RELEASE_DATASET_EXTRAS
from rfclip.dense import DenseCLIP, ForwardContext
from rfclip.errors import RfclipError
from rfclip.inference import dense_logits, preprocess
from rfclip.methods import build_method
from rfclip.methods.cass import (blend_global_logits, cluster_members, complete_linkage_clusters, cosine_distances,
                                 nudge_cluster_text)
from rfclip.methods.rfclip_release import RFCLIPRelease, enhance, release_filter, similarity_graph
from rfclip.segmenter import Segmenter
from rfclip.testing import plant_distraction_tokens
from rfclip.text import TextQueries

VITB16 = dict(embed_dim=512, quick_gelu=True, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
B16_DIMS = DISTRACTION_DIMS[("ViT-B-16", "openai")]
TINY_DIMS = (5, 20, 41)
TOKENS = [3, 20, 50, 100, 150, 190]
FAST = dict(device="cpu", text_cache=False, templates=["a photo of a {}."])
OPTS = dict(global_semantics_weight=0.25, mean_vector_weight=0.05, h_threshold=0.10)  # larger than VOC21's: visible


@pytest.fixture(scope="module")
def vitb16():
    """Random ViT-B/16-geometry CLIP whose patch tokens TOKENS are distraction tokens in every layer."""
    return plant_distraction_tokens(make_clip(VITB16, seed=0), TOKENS, B16_DIMS)


@pytest.fixture(scope="module")
def tiny():
    return plant_distraction_tokens(make_clip(seed=0), TOKENS, TINY_DIMS)


def designed_vocabulary(dim: int, seed: int = 0, spread: float = 0.25) -> TextQueries:
    """8 query names in 6 classes whose embeddings form 5 groups (complete linkage at 0.10 splits them into clusters
    of 3, 2 and singles; a cluster spans two classes; a class has synonyms in different clusters)."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(5, dim, generator=g), dim=-1)

    def near(v):
        return F.normalize(v + spread * F.normalize(torch.randn(dim, generator=g), dim=0), dim=0)

    rows = [base[0], base[1], near(base[1]), near(base[1]), base[2], base[3], near(base[3]), base[4]]
    synonyms = [["a"], ["b", "b2"], ["c"], ["d"], ["e", "e2"], ["f", "f2"]]
    query_class = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5])
    return TextQueries(torch.stack(rows), query_class, [s[0] for s in synonyms], synonyms)


def image(size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


# ============================================================================================ against the release
CASES = {  # name: (image size, slide_crop, cls_source)
    "whole-image": ((224, 288), 0, "image"),
    "slide-image-cls": ((288, 336), 224, "image"),
    "slide-crop-cls": ((288, 336), 224, "crop"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_released_code_vitb16(vitb16, case):
    size, crop, source = CASES[case]
    text = designed_vocabulary(512)
    clusters = ref.text_clusters(text.features, OPTS["h_threshold"])
    assert 1 < len(set(clusters.tolist())) < len(clusters)  # the vocabulary splits, some clusters have members
    seg = Segmenter(vitb16, method="rfclip_release", distraction_dims=list(B16_DIMS), short_side=None,
                    slide_crop=crop, slide_stride=112, cls_source=source, **OPTS, **FAST)
    assert seg.amp_dtype is None  # fp32 by default
    img = image(size)
    (mask, probs), = seg.predict([img], text)
    x = preprocess(img, None)
    trace: dict = {}
    ref.encode(vitb16.model.visual, x[None, :, :224, :224], B16_DIMS, trace=trace)
    assert all(int(m.sum()) >= len(TOKENS) for m in trace["dis"])  # the filter acts after every block
    kept = trace["similarity"] >= 0.4
    assert kept.sum() > kept.shape[0] and not kept.all()  # the enhancement keeps some pairs and zeroes others
    want = ref.release_probs(vitb16.model.visual, x, size, B16_DIMS, text.features, text.query_class,
                             text.num_classes, slide_crop=crop, cls_source=source, gsw=OPTS["global_semantics_weight"],
                             mvw=OPTS["mean_vector_weight"], h_threshold=OPTS["h_threshold"])
    diff = (probs - want).abs().max().item()
    print(f"\n{case}: max |p - p_release| = {diff:.2e}")
    assert diff < 1e-5
    assert torch.equal(mask, want.argmax(0))


# ============================================================================================ batching
@pytest.mark.parametrize("crop", [0, 224], ids=["whole-image", "slide"])
def test_batched_equals_one_by_one(vitb16, crop):
    """Crops of several images in one forward (two of one shape, one of another) equal each image alone: S, the
    [CLS], the cluster choice and the top-2 patches are per crop; the image [CLS] pass is batched too."""
    text = designed_vocabulary(512)
    seg = Segmenter(vitb16, method="rfclip_release", distraction_dims=list(B16_DIMS), short_side=None,
                    slide_crop=crop, **OPTS, **FAST)
    sizes = [(224, 288), (224, 288), (240, 256)] if crop == 0 else [(224, 336), (224, 336), (240, 256)]
    imgs = [image(s, seed=i) for i, s in enumerate(sizes)]
    together = seg.predict(imgs, text)
    worst = 0.0
    for img, (mask, probs) in zip(imgs, together):
        (m1, p1), = seg.predict([img], text)
        worst = max(worst, (probs - p1).abs().max().item())
        assert torch.equal(mask, m1)
    print(f"\n{'slide' if crop else 'whole'}: batched vs alone max |dp| = {worst:.2e}")
    assert worst < 1e-5
    assert not torch.equal(together[0][1], together[1][1])  # different images, different results


# ============================================================================================ precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_agrees_with_fp32(vitb16, precision):
    """bf16 / fp16 autocast: no NaN, masks agree with fp32 on >= 99.5% of the pixels.

    The class embeddings are patch features of the image minus the image's mean feature (with synonyms and a
    cluster), so that the mask has structure and the probabilities are about as peaked as with real weights (median
    top probability 0.70 here). Raw patch features of a random model share most of their direction (mean cosine 0.8),
    which makes every pixel a near-tie (median top probability 0.31; bf16 then agrees on 99.33%, fp16 on 99.90%)."""
    img = image((224, 336), seed=3)
    seg = Segmenter(vitb16, method="rfclip_release", distraction_dims=list(B16_DIMS), short_side=None,
                    slide_crop=224, **FAST)
    with torch.no_grad():
        feats = seg.encoder(preprocess(img, None)[None, :, :, :224], seg.method).features[0]  # (196, D)
    g = torch.Generator().manual_seed(0)
    picks = F.normalize(feats[torch.randperm(feats.shape[0], generator=g)[:6]] - feats.mean(0), dim=-1)
    rows = torch.cat([picks, F.normalize(picks[:2] + 0.05 * torch.randn(2, feats.shape[1], generator=g), dim=-1)])
    text = TextQueries(F.normalize(rows, dim=-1), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]),
                       list("abcdef"), [[c] for c in "abcdef"])
    (m32, p32), = seg.predict([img], text)
    assert p32.max(0).values.median() > 0.5  # a structured, reasonably confident mask
    try:
        low = seg.with_config(precision=precision)
    except RfclipError as err:
        pytest.skip(str(err))
    (m16, p16), = low.predict([img], text)
    assert torch.isfinite(p16).all()
    agree = (m16 == m32).float().mean().item()
    print(f"\n{precision}: mask agreement with fp32 {agree:.4%}, max |dp| {(p16 - p32).abs().max().item():.3f}")
    assert agree >= 0.995


# ============================================================================================ pieces
def test_filter_only_on_layers_1_to_L_minus_1_and_the_last_output(tiny):
    """Layer 0's input (ln_pre) is never filtered, even with planted tokens there; layers 1..L-1 and the last block's
    output are, and exactly the planted tokens are detected."""
    enc = DenseCLIP(tiny.model.visual)
    method = build_method("rfclip_release", distraction_dims=TINY_DIMS)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rec: dict = {}
    with torch.no_grad():
        enc(images, method, record=rec)
        x0, grid = enc.embed(images)
        ctx = ForwardContext(encoder=enc, images=images, grid=grid)
        method.begin(ctx)
        phi0 = release_filter(x0, method.dims_tensor(x0.device, enc.width), 5.0 / enc.width, grid)[1]
        assert phi0[:, TOKENS].all()  # layer 0's input has distraction tokens ...
        assert method.layer_input(ctx, 0, x0) is x0  # ... and is left alone
    L = enc.num_layers
    assert "rf.L0.dis" not in rec
    expected = torch.zeros(2, 196, dtype=torch.bool)
    expected[:, TOKENS] = True
    for layer in range(1, L + 1):
        assert torch.equal(rec[f"rf.L{layer}.dis"][0], expected), layer


def test_release_filter_formula():
    h, w, C = 4, 5, 12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + h * w, C, generator=g)
    x[0, 1 + 7, 3] += 40.0  # over-activations in dim 3 of two tokens (an interior one and a corner)
    x[1, 1 + 0, 9] += 40.0
    dims = torch.tensor([3, 9])
    tau = 5.0 / C
    out, dis = release_filter(x, dims, tau, (h, w))
    f = x[:, 1:]
    wgt = (f - f.amin(-1, keepdim=True)) / (f - f.amin(-1, keepdim=True)).sum(-1, keepdim=True)
    want_dis = wgt[..., [3, 9]].amax(-1) > tau
    assert torch.equal(dis, want_dis) and dis[0, 7] and dis[1, 0] and int(dis.sum()) == 2
    grid = f.transpose(1, 2).reshape(2, C, h, w)
    mean = F.conv2d(grid, torch.full((C, 1, 3, 3), 1 / 9), padding=1, groups=C).reshape(2, C, h * w).transpose(1, 2)
    want = x.clone()
    want[:, 1:] = torch.where(want_dis[..., None], 0.6 * f + 0.4 * mean, f)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])  # [CLS] untouched
    same, none = release_filter(torch.randn(1, 1 + h * w, C, generator=g), dims, 1.0, (h, w))
    assert not none.any()


def test_similarity_graph_and_enhancement():
    g = torch.Generator().manual_seed(1)
    guide = torch.randn(2, 1 + 9, 16, generator=g)
    guide[:, 1:4] += 2 * torch.randn(1, 1, 16, generator=g)  # three similar tokens: pairs above the threshold
    S = similarity_graph(guide[:, 1:], 0.4)
    cos = F.cosine_similarity(guide[:, 1:, None], guide[:, None, 1:], dim=-1)
    torch.testing.assert_close(S, torch.where(cos < 0.4, torch.zeros_like(cos), cos), atol=1e-6, rtol=0)
    assert (S == 0).any() and ((S > 0) & ~torch.eye(9, dtype=torch.bool)).any()
    x = torch.randn(2, 10, 16, generator=g)
    out = enhance(x, S)
    assert torch.equal(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.einsum("bij,bjc->bic", S, x[:, 1:]))


def test_each_decoding_uses_its_own_last_key_key_map(tiny):
    enc = DenseCLIP(tiny.model.visual)
    method = build_method("rfclip_release", distraction_dims=TINY_DIMS)
    images = torch.randn(1, 3, 112, 112)
    _, grid = enc.embed(images)
    ctx = ForwardContext(encoder=enc, images=images, grid=grid)
    method.begin(ctx)
    st = ctx.store["rfclip_release"]
    g = torch.Generator().manual_seed(2)
    L, H, T = enc.num_layers, enc.num_heads, 1 + 49
    st.kk_sum = torch.softmax(torch.randn(1, H, T, T, generator=g), -1) * (L - 1)  # the earlier layers' maps
    block = enc.blocks[-1]

    def few_lines(u, k_from):
        _, k, _ = ref.qkv(block, block.ln_1(k_from[0]))
        _, _, v = ref.qkv(block, block.ln_1(u[0]))
        kk = torch.softmax(k @ k.transpose(1, 2) * k.shape[-1] ** -0.5, -1)
        A = (st.kk_sum[0] + kk)[:, 1:, 1:] / L
        return block.attn.out_proj((A @ v[:, 1:]).transpose(0, 1).reshape(T - 1, -1))

    u1, u2 = torch.randn(1, T, enc.width, generator=g), torch.randn(1, T, enc.width, generator=g)
    with torch.no_grad():
        for u in (u1, u2):
            torch.testing.assert_close(method._decode(ctx, u)[0], few_lines(u, u), atol=1e-5, rtol=1e-5)
        assert (method._decode(ctx, u1)[0] - few_lines(u1, u2)).abs().max() > 1e-3  # another input's map differs


def random_groups(seed, q=24, dim=16):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(5, dim, generator=g), dim=-1)
    members = torch.randint(0, 5, (q,), generator=g)
    scale = 0.1 + 0.5 * torch.rand(q, 1, generator=g)
    return F.normalize(centres[members] + scale * torch.randn(q, dim, generator=g), dim=-1)


def same_partition(a, b) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


@pytest.mark.parametrize("seed", range(4))
def test_complete_linkage_equals_scipy(seed):
    text = random_groups(seed)
    d = cosine_distances(text)
    assert np.array_equal(d, d.T) and not d.diagonal().any()
    condensed = squareform(d, checks=True)
    merges = linkage(condensed, method="complete")[:, 2]
    splits = 0
    for t in [0.0, 0.05, 0.1, 0.2, float(np.median(d)), 0.5, 1.0, 2.0,
              float(merges[len(merges) // 2])]:  # a merge height itself: fcluster keeps merges <= t
        want = fcluster(linkage(condensed, method="complete"), t=t, criterion="distance") - 1
        got = complete_linkage_clusters(d, t)
        assert same_partition(got, want), t
        assert sorted(set(got.tolist())) == list(range(len(set(want.tolist()))))
        splits += 1 < len(set(got.tolist())) < len(got)
    assert splits >= 3  # several thresholds split the vocabulary into clusters with several members


def test_clusters_of_a_real_vocabulary_and_the_cache(tiny, monkeypatch):
    """VOC21's names through the (random) text encoder, at a threshold that splits them; computed once."""
    from rfclip.data import load_classnames
    import rfclip.methods.rfclip_release as release_mod

    seg = Segmenter(tiny, method="rfclip_release", distraction_dims=list(TINY_DIMS), **FAST)
    text = seg.encode_classes(load_classnames("voc21"))
    d = cosine_distances(text.features)
    t = float(np.quantile(squareform(d), 0.05))
    want = fcluster(linkage(squareform(d), method="complete"), t=t, criterion="distance") - 1
    method = build_method("rfclip_release", distraction_dims=TINY_DIMS, h_threshold=t)
    calls = []
    real = release_mod.complete_linkage_clusters
    monkeypatch.setattr(release_mod, "complete_linkage_clusters", lambda *a: calls.append(1) or real(*a))
    members = method.clusters(text.features)
    assert 1 < members.shape[0] < members.shape[1] and members.sum(0).eq(1).all()
    assert same_partition(members.float().argmax(0).numpy(), want)
    method.clusters(text.features.clone())
    assert len(calls) == 1  # once per vocabulary
    method.clusters(text.features[:5])
    assert len(calls) == 2


def test_nudge_and_blend_equal_the_per_crop_loop():
    g = torch.Generator().manual_seed(3)
    text = designed_vocabulary(32, seed=1).features
    labels = ref.text_clusters(text, 0.10)
    members = cluster_members(labels)
    feats = F.normalize(torch.randn(3, 20, 32, generator=g), dim=-1)
    cls = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    scores = cls @ text.T
    adjusted = nudge_cluster_text(feats, scores, text, members, 0.3)
    got = blend_global_logits(feats, adjusted, scores, 0.2)
    for b in range(3):
        want = ref.cass_logits(feats[b], cls[b], text, labels, gsw=0.2, mvw=0.3)
        torch.testing.assert_close(got[b], want, atol=1e-6, rtol=1e-5)
    changed = (adjusted - text).abs().amax(-1) > 1e-6  # one name per cluster per crop moved
    assert torch.equal(changed.sum(-1), torch.full((3,), members.shape[0]))
    # the method's hook: the same with its options
    method = build_method("rfclip_release", distraction_dims=TINY_DIMS, global_semantics_weight=0.2,
                          mean_vector_weight=0.3, h_threshold=0.10)
    torch.testing.assert_close(method.logits(feats, cls, text), got)


class SpyLogits:
    """Wraps a method and keeps the [CLS] given to each logits call."""

    def __init__(self, method):
        self.method, self.seen = method, []

    def __getattr__(self, item):
        return getattr(self.method, item)

    def logits(self, features, cls, text_features):
        self.seen.append(cls.clone())
        return self.method.logits(features, cls, text_features)


@pytest.mark.parametrize("mode", ["whole-image", "slide-image", "slide-crop"])
def test_cls_sources(tiny, mode):
    enc = DenseCLIP(tiny.model.visual)
    source = "crop" if mode == "slide-crop" else "image"
    method = SpyLogits(build_method("rfclip_release", distraction_dims=TINY_DIMS, cls_source=source))
    img = torch.randn(3, 160, 288, generator=torch.Generator().manual_seed(4))
    text = designed_vocabulary(32)
    crop = 0 if mode == "whole-image" else 112
    with torch.no_grad():
        dense_logits(enc, method, [img], text, crop, 64)
        whole = enc(img[None], method.method)
        cls_pass = enc(img[None], method.method, cls_only=True)
        crops = enc(torch.stack([img[:, :112, 0:112], img[:, 48:160, 176:288]]), method.method)
    assert cls_pass.features is None and torch.equal(cls_pass.cls, whole.cls)  # cls_only: same [CLS], no features
    ref_cls = ref.encode(tiny.model.visual, img[None], TINY_DIMS, cls_only=True)[1]
    torch.testing.assert_close(whole.cls[0], ref_cls, atol=1e-5, rtol=1e-5)
    seen = torch.cat(method.seen)
    if mode == "whole-image":
        assert seen.shape[0] == 1 and torch.equal(seen[0], whole.cls[0])
    elif mode == "slide-image":  # every crop gets the whole image's [CLS]
        assert seen.shape[0] == 8 and all(torch.equal(c, cls_pass.cls[0]) for c in seen)
    else:  # every crop its own
        assert seen.shape[0] == 8 and len({tuple(c.tolist()) for c in seen}) == 8
        torch.testing.assert_close(seen[0], crops.cls[0])
        torch.testing.assert_close(seen[-1], crops.cls[1])


def test_single_window_image_needs_no_extra_pass(tiny):
    calls = []

    class Counting(DenseCLIP):
        def forward(self, images, method, text_features=None, record=None, cls_only=False):
            calls.append(cls_only)
            return super().forward(images, method, text_features, record, cls_only)

    enc = Counting(tiny.model.visual)
    method = build_method("rfclip_release", distraction_dims=TINY_DIMS)
    text = designed_vocabulary(32)
    with torch.no_grad():
        dense_logits(enc, method, [torch.randn(3, 112, 112), torch.randn(3, 112, 200)], text, 112, 64, batch_size=8)
    assert calls == [True, False]  # one [CLS] pass for the 3-window image; the 4 crops (one shape) in one forward


def test_options_and_guards(tiny):
    for bad in (dict(cls_source="whole"), dict(mean_vector_weight=1.5), dict(global_semantics_weight=-0.1),
                dict(h_threshold=-1), dict(enhance_threshold=2), dict(tau_mult=0), dict(beta=0.7)):
        with pytest.raises(RfclipError):
            build_method("rfclip_release", **bad)
    m = build_method("rfclip_release", h_threshold="0.2", cls_source="crop")
    assert m.h_threshold == 0.2 and not m.needs_image_cls and isinstance(m, RFCLIPRelease)
    d = build_method("rfclip_release")
    assert (d.global_semantics_weight, d.mean_vector_weight, d.h_threshold) == RELEASE_DATASET_EXTRAS["voc21"][:3]
    assert d.enhance_threshold == 0.4 and d.tau_mult == 5.0 and d.cls_source == "image" and d.needs_image_cls
    with pytest.raises(RfclipError, match="fsa"):
        build_method("rfclip_release+fsa")
    with pytest.raises(RfclipError, match="distraction"):
        Segmenter(make_clip(), method="rfclip_release", **FAST)  # no built-in dims for a random model
    seg = Segmenter(tiny, method="rfclip_release", distraction_dims=list(TINY_DIMS), precision="bf16", **FAST)
    assert seg.amp_dtype == torch.bfloat16  # an explicit precision wins over the method's fp32 default


def test_vitl14_geometry_builtin_dims():
    """ViT-L/14 width and patch size (3 blocks for speed) named as OpenAI's ViT-L-14: the built-in L/14 dims are
    used (no option), planted tokens are filtered in every layer, and a batch equals its crops alone."""
    import dataclasses

    cfg = dict(embed_dim=768, quick_gelu=True, vision_cfg=dict(image_size=224, layers=3, width=1024, patch_size=14,
                                                               head_width=64),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
    dims = DISTRACTION_DIMS[("ViT-L-14", "openai")]
    clip = dataclasses.replace(plant_distraction_tokens(make_clip(cfg), TOKENS, dims), name="ViT-L-14",
                               pretrained="openai")
    seg = Segmenter(clip, method="rfclip_release", **FAST)
    assert seg.method.resolved_dims.values == dims
    rec: dict = {}
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = seg.encoder(images, seg.method, record=rec)
        alone = seg.encoder(images[1:], seg.method)
    assert out.grid == (16, 16)
    assert all(bool(rec[f"rf.L{layer}.dis"][0][:, TOKENS].all()) for layer in range(1, 4))
    torch.testing.assert_close(out.features[1:], alone.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls[1:], alone.cls, atol=1e-5, rtol=1e-5)


# ============================================================================================ preset and evaluation
def test_preset_table():
    from rfclip.data.settings import get_settings, preset_method

    assert preset_method("rfclip_release") == "rfclip_release" and preset_method("default") is None
    table = {  # configs/cfg_*.py of c2b333e: gsw, mvw, h_threshold, prob_thd, slide_crop; short side
        "voc21": (0.1, 0.03, 0.10, 0.1, 0, 336), "voc20": (0.4, 0.02, 0.10, 0.0, 224, 336),
        "context60": (0.25, 0.04, 0.09, 0.1, 224, 336), "context59": (0.25, 0.04, 0.09, 0.0, 224, 336),
        "coco_object": (0.25, 0.01, 0.10, 0.1, 224, 336), "coco_stuff": (0.2, 0.02, 0.02, 0.0, 0, 336),
        "ade20k": (0.3, 0.05, 0.06, 0.0, 224, 336), "cityscapes": (0.1, 0.03, 0.14, 0.0, 224, 560),
    }
    for name, (gsw, mvw, h, prob, crop, short) in table.items():
        s = get_settings(name, "rfclip_release")
        assert (s.short_side, s.slide_crop, s.slide_stride, s.logit_scale, s.prob_thd) == (short, crop, 112, 40.0, prob)
        assert s.pixel_mean == MMSEG_CLIP_MEAN == (122.771, 116.746, 104.094)
        assert s.pixel_std == MMSEG_CLIP_STD == (68.501, 66.632, 70.323)
        assert s.pad_crops_to == 0 and s.classnames == "default"
        assert dict(s.method_options) == dict(global_semantics_weight=gsw, mean_vector_weight=mvw, h_threshold=h,
                                              cls_source="crop" if name == "cityscapes" else "image")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from test_evaluate import EVAL_CFG, make_voc2012, save_open_clip_folder

    base = tmp_path_factory.mktemp("release_eval")
    root = base / "data" / "VOCdevkit" / "VOC2012"
    make_voc2012(root, num_images=3)
    return {"root": root, "root_dir": base / "data", "ckpt": save_open_clip_folder(base / "ckpt", EVAL_CFG),
            "cache": base / "cache"}


def test_evaluate_applies_the_preset_method_options(voc, monkeypatch):
    from rfclip.data import build_dataset
    from rfclip.evaluate import configure, evaluate
    from rfclip.models.loading import load_clip

    monkeypatch.setenv("RFCLIP_CACHE", str(voc["cache"]))
    clip = load_clip("tiny", checkpoint=voc["ckpt"])
    seg = Segmenter(clip, method="rfclip_release", distraction_dims=[1, 5, 9], mean_vector_weight=0.07,
                    device="cpu", text_cache=False)
    voc20 = build_dataset("voc20", voc["root"], preset="rfclip_release")
    cfg = configure(seg, voc20)
    m = cfg.method
    assert (m.global_semantics_weight, m.h_threshold, m.mean_vector_weight) == (0.4, 0.10, 0.07)  # the user's wins
    assert cfg.config.slide_crop == 224 and cfg.config.pixel_mean == MMSEG_CLIP_MEAN
    assert seg.method.global_semantics_weight == 0.1  # the original segmenter is unchanged
    result = evaluate(seg, build_dataset("voc21", voc["root"], preset="rfclip_release"), limit=2, num_workers=0,
                      progress=False)
    assert result["settings"]["slide_crop"] == 0 and result["settings"]["prob_thd"] == 0.1
    assert result["method_options"]["global_semantics_weight"] == 0.1 and result["precision"] == "float32"
    assert result["preset_method_options"] == {"global_semantics_weight": 0.1, "h_threshold": 0.10,
                                               "cls_source": "image"}
    other = Segmenter(clip, method="naclip", device="cpu", text_cache=False)
    assert configure(other, voc20).method is other.method  # options the method does not take are not applied


def test_cli_eval_preset_picks_the_method(voc, tmp_path, capsys, monkeypatch):
    from rfclip.cli import main

    monkeypatch.setenv("RFCLIP_CACHE", str(voc["cache"]))
    out = tmp_path / "voc21.json"
    code = main(["eval", "--dataset", "voc21", "--root", str(voc["root"]), "--preset", "rfclip_release",
                 "--option", "distraction_dims=1,5,9", "--checkpoint", str(voc["ckpt"]), "--out", str(out),
                 "--limit", "2", "-q", "--device", "cpu", "--num-workers", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    doc = json.loads(out.read_text())
    assert doc["meta"]["method"] == "rfclip_release" and doc["meta"]["preset"] == "rfclip_release"
    assert doc["meta"]["settings"]["pixel_mean"] == list(MMSEG_CLIP_MEAN)
    code = main(["eval", "--dataset", "voc21", "--root", str(voc["root"]), "--preset", "rfclip_release",
                 "--method", "naclip", "--checkpoint", str(voc["ckpt"]), "--out", str(tmp_path / "n.json"),
                 "--limit", "1", "--device", "cpu", "--num-workers", "0"])
    printed = capsys.readouterr()
    assert code == 0 and "method naclip does not take them" in printed.err


def test_cli_eval_all_preset_table(voc, tmp_path, capsys, monkeypatch):
    from rfclip.cli import main

    monkeypatch.setenv("RFCLIP_CACHE", str(voc["cache"]))
    code = main(["eval-all", "--root-dir", str(voc["root_dir"]), "--preset", "rfclip_release", "--datasets", "voc21",
                 "voc20", "--option", "distraction_dims=1,5,9", "--checkpoint", str(voc["ckpt"]), "--out-dir",
                 str(tmp_path / "out"), "--limit", "1", "-q", "--device", "cpu", "--num-workers", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    md = (tmp_path / "out" / "results.md").read_text()
    assert "ours (rfclip_release, rfclip_release preset)" in md
    assert "per dataset: global_semantics_weight, mean_vector_weight" in md
    assert "global_semantics_weight 0.4" in md and "global_semantics_weight 0.1" in md


def test_cli_segment_method(voc, tmp_path, capsys, monkeypatch):
    from rfclip.cli import main

    monkeypatch.setenv("RFCLIP_CACHE", str(voc["cache"]))
    image = next((voc["root"] / "JPEGImages").iterdir())
    code = main(["segment", str(image), "--classes", "road;car;tree;sky", "--method", "rfclip_release", "--option",
                 "distraction_dims=1,5,9", "--option", "cls_source=crop", "--checkpoint", str(voc["ckpt"]), "--out",
                 str(tmp_path), "--device", "cpu", "--short-side", "64", "-q"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert record["method"] == "rfclip_release" and record["method_options"]["cls_source"] == "crop"
    assert record["precision"] == {"asked": "auto", "used": "float32"}


def test_eval_all_table_paper_row_beside_the_release():
    """ViT-B/16 with the rfclip_release preset: the paper's RF-CLIP row beside ours, the per-dataset options listed."""
    from rfclip.constants import PAPER_COLUMNS, PAPER_RFCLIP_MIOU
    from rfclip.data.settings import get_settings
    from rfclip.evaluate import summary_markdown
    from test_evaluate import _fake_result

    results = {}
    for i, name in enumerate(PAPER_COLUMNS):
        r = _fake_result(name, 30.0 + i, "ViT-B-16", False)
        r.update(method="rfclip_release", preset="rfclip_release",
                 method_options={"tau_mult": 5.0, **get_settings(name, "rfclip_release").method_options})
        results[name] = r
    md = summary_markdown(results)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| ours (rfclip_release, rfclip_release preset) |")
    paper = [c.strip() for c in rows[2].strip("|").split("|")]
    assert paper[0] == "paper (RF-CLIP)" and paper[1:9] == [f"{v:.1f}" for v in PAPER_RFCLIP_MIOU[("ViT-B-16", False)]]
    assert "- method: rfclip_release (tau_mult=5.0); per dataset: cls_source, global_semantics_weight, " \
           "h_threshold, mean_vector_weight" in md
    assert "| Cityscapes | val |" in md and "cls_source crop" in md
