"""The ``+masks`` plug-in: map correction on every base, scope restriction where the last block is one attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from rfclip.errors import RfclipError
from rfclip.methods import build_method, method_specs
from rfclip.methods.region_masks import restrict_to_regions
from rfclip.models.vfm import VisionFoundationModel
from rfclip.segmenter import Segmenter

FAST = dict(device="cpu", text_cache=False, templates=["a photo of a {}."], short_side=None, slide_crop=64,
            slide_stride=48)


def dino():
    torch.manual_seed(3)
    net = VisionTransformer(img_size=224, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True).eval()
    return VisionFoundationModel(net, name="vit_base_patch8_224.dino")


BASES = {"rfclip": {"distraction_dims": [1, 5, 9]}, "naclip": {}, "proxyclip": {"vfm": None}, "rfclip_release": {"distraction_dims": [1, 5, 9]}}


def image_and_regions(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(80, 100, 3), dtype=np.uint8)
    regions = np.zeros((80, 100), np.int32)
    regions[5:40, 10:60] = 2
    regions[45:, :50] = 4
    regions[45:, 50:] = 7
    return img, regions


def segmenter(clip, spec, **options):
    opts = dict(BASES[spec.split("+")[0]])
    if "vfm" in opts:
        opts["vfm"] = dino()
    return Segmenter(clip, method=spec, **opts, **options, **FAST)


@pytest.mark.parametrize("base", list(BASES))
def test_plugin_on_bases(tiny_clip, base):
    img, regions = image_and_regions()
    text = None
    plain = segmenter(tiny_clip, base)
    text = plain.encode_classes("cat;dog;grass;sky")
    (mask0, probs0), = plain.predict([img], text)
    masked = segmenter(tiny_clip, f"{base}+masks")
    assert masked.method.needs_masks and masked.method.name == f"{base}+masks"
    (mask, probs), = masked.predict([img], text, regions=[regions])
    for v in (2, 4, 7):  # map correction: one label per region, its mode
        inside = mask[torch.from_numpy(regions == v)]
        assert torch.unique(inside).numel() == 1
    assert torch.equal(mask[torch.from_numpy(regions == 0)], probs[:, torch.from_numpy(regions == 0)].argmax(0))
    scoped = masked.method.restricts_scope
    assert scoped == (base != "rfclip_release")  # rfclip_release computes its last layer itself
    assert ((probs - probs0).abs().max() > 1e-4) == scoped
    # both parts off: exactly the base; a map with one region and no correction: exactly the base
    off = segmenter(tiny_clip, f"{base}+masks", scope=False, map_correction=False)
    (m_off, p_off), = off.predict([img], text, regions=[regions])
    assert torch.equal(m_off, mask0) and torch.allclose(p_off, probs0, atol=1e-6)
    flat = segmenter(tiny_clip, f"{base}+masks", map_correction=False)
    (m_flat, p_flat), = flat.predict([img], text, regions=[np.zeros_like(regions)])
    assert torch.allclose(p_flat, probs0, atol=1e-5)


def test_restrict_to_regions_against_a_loop():
    g = torch.Generator().manual_seed(0)
    B, H, N = 2, 3, 12
    w = torch.rand(B, H, N + 1, N + 1, generator=g)
    w[0, 0, 3] = 0  # a row with weight only outside its region keeps the base's row
    w[0, 0, 3, 4] = 1.0
    maps = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 0, 1], [3, 3, 5, 5, 5, 3, 6, 6, 6, 3, 5, 6]])
    got = restrict_to_regions(w, maps, has_cls=True)
    for b in range(B):
        unseg = int(maps[b].min())
        for h in range(H):
            for i in range(N + 1):
                row = w[b, h, i].clone()
                if i > 0 and int(maps[b, i - 1]) != unseg:
                    keep = torch.tensor([True] + [int(maps[b, j]) in (int(maps[b, i - 1]), unseg) for j in range(N)])
                    if (row * keep).sum() > 0:
                        row = row * keep * (row.sum() / (row * keep).sum())
                torch.testing.assert_close(got[b, h, i], row)


def test_specs_and_refusals():
    specs = method_specs()
    assert {"rfclip+masks", "naclip+masks", "proxyclip+masks", "corrclip"} <= set(specs)
    assert "corrclip+masks" not in specs and "corrclip+fsa" not in specs
    with pytest.raises(RfclipError, match="already uses region masks"):
        build_method("corrclip+masks")


def test_plugin_needs_masks(tiny_clip):
    seg = segmenter(tiny_clip, "naclip+masks")
    with pytest.raises(RfclipError, match="--masks"):
        seg.segment(image_and_regions()[0], "a;b")


def test_demo_offers_mask_methods_only_with_masks():
    from rfclip.demo.engine import method_choices

    assert not {"corrclip", "naclip+masks"} & set(method_choices())
    assert {"corrclip", "naclip+masks", "rfclip_release+masks"} <= set(method_choices(with_masks=True))


def test_fsa_over_masks_keeps_both(tiny_clip):
    """``naclip+masks+fsa``: FSA's feedback on the region-restricted attention, and the regions still corrected."""
    img, regions = image_and_regions()
    stacked = segmenter(tiny_clip, "naclip+masks+fsa")
    assert stacked.method.needs_masks and stacked.method.restricts_scope
    text = stacked.encode_classes("cat;dog;grass;sky")
    (mask, probs), = stacked.predict([img], text, regions=[regions])
    for v in (2, 4, 7):
        assert torch.unique(mask[torch.from_numpy(regions == v)]).numel() == 1
    (_, p_fsa), = segmenter(tiny_clip, "naclip+fsa").predict([img], text)
    (_, p_masks), = segmenter(tiny_clip, "naclip+masks").predict([img], text, regions=[regions])
    assert (probs - p_fsa).abs().max() > 1e-4 and (probs - p_masks).abs().max() > 1e-4
    with pytest.raises(RfclipError, match="--masks"):
        stacked.segment(img, "a;b")
