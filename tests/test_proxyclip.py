"""ProxyCLIP: proxy attention and value upsampling against direct computations, VFM features and loading."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from rfclip.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from rfclip.dense import DenseCLIP
from rfclip.errors import RfclipError, WeightsNotFoundError
from rfclip.methods import build_method
from rfclip.methods.proxyclip import ProxyCLIP, proxy_attention, upsample_values
from rfclip.models import vfm as vfm_mod
from rfclip.models.vfm import VisionFoundationModel, load_vfm, resolve_vfm_name
from rfclip.segmenter import Segmenter

from conftest import make_clip

FAST = dict(text_cache=False, device="cpu", templates=["a photo of a {}."])


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=224, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)
    args.update(kw)
    return VisionTransformer(**args).eval()


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """Empty weight caches."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


# ------------------------------------------------------------------------------------------------ formulas
def test_proxy_attention_matches_direct_per_crop():
    torch.manual_seed(0)
    feats = torch.randn(3, 20, 8)
    feats[1] += 0.7  # a crop with a higher mean similarity: mu must be per crop
    got = proxy_attention(feats, beta=1.2, gamma=3.0)
    assert got.shape == (3, 1, 20, 20)
    for b in range(3):
        g = F.normalize(feats[b], dim=-1)
        S = g @ g.T
        L = 3.0 * (S - 1.2 * S.mean())
        L[L < 0] = float("-inf")
        torch.testing.assert_close(got[b, 0], torch.softmax(L, dim=-1))
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 1, 20))
    assert torch.all(got.diagonal(dim1=-2, dim2=-1) > 0)


def test_proxy_attention_nearly_uniform_crop_has_no_nan():
    """mu > 1/beta (all features alike) prunes every entry in the reference (NaN); the diagonal is kept here."""
    feats = torch.randn(1, 1, 8) + 0.01 * torch.randn(1, 10, 8)
    got = proxy_attention(feats)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], torch.eye(10))


def test_upsample_values_matches_per_head_interpolation():
    torch.manual_seed(1)
    B, H, h, w, dh = 2, 3, 4, 5, 6
    v = torch.randn(B, H, 1 + h * w, dh)
    got = upsample_values(v, (h, w), (8, 10))
    assert got.shape == (B, H, 80, dh)
    for b in range(B):
        for head in range(H):
            grid = v[b, head, 1:].reshape(h, w, dh).permute(2, 0, 1)[None]
            want = F.interpolate(grid, size=(8, 10), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(got[b, head], want.permute(1, 2, 0).reshape(80, dh))
    assert torch.equal(upsample_values(v, (h, w), (h, w)), v[:, :, 1:])


def test_last_block_formula(tiny_clip):
    """The dense forward with proxyclip equals out_proj(A · upsampled V) -> ln_post -> proj, on the VFM grid."""
    visual = tiny_clip.model.visual
    block = visual.transformer.resblocks[-1]
    vit = tiny_vit()
    images = torch.randn(2, 3, 224, 224)
    got, grid, _ = DenseCLIP(visual)(images, build_method("proxyclip", vfm=vit))
    assert grid == (28, 28)
    x = visual._embeds(images)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)[2]
    heads = block.attn.num_heads
    v = v.reshape(2, x.shape[1], heads, -1).transpose(1, 2)  # (B, H, T, dh)
    vu = upsample_values(v, (14, 14), (28, 28))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    raw = images * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    g = vit.forward_features((raw - mean) / std)[:, 1:]
    A = proxy_attention(g)
    y = block.attn.out_proj((A @ vu).transpose(1, 2).reshape(2, 28 * 28, -1))
    want = F.normalize(visual.ln_post(y) @ visual.proj, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ VFM features
@pytest.mark.parametrize("size,grid", [((224, 224), (28, 28)), ((336, 336), (42, 42)), ((100, 61), (12, 7))])
def test_vfm_features_any_crop_size(size, grid):
    vfm = VisionFoundationModel(tiny_vit())
    feats, g = vfm.features(torch.randn(2, 3, *size))
    assert g == grid and feats.shape == (2, grid[0] * grid[1], 32)
    assert torch.isfinite(feats).all()


def test_vfm_drops_register_tokens():
    vit = tiny_vit(patch_size=14, reg_tokens=4, no_embed_class=True)
    vfm = VisionFoundationModel(vit)
    assert vfm.num_prefix_tokens == 5
    feats, g = vfm.features(torch.randn(1, 3, 224, 224))
    assert g == (16, 16) and feats.shape == (1, 256, 32)


def test_vfm_needs_dynamic_size():
    with pytest.raises(RfclipError, match="dynamic_img_size"):
        VisionFoundationModel(VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2))


def test_aliases():
    assert resolve_vfm_name("dino") == "vit_base_patch8_224.dino"
    assert resolve_vfm_name("MAE") == "vit_base_patch16_224.mae"
    assert resolve_vfm_name("vit_small_patch8_224.dino") == "vit_small_patch8_224.dino"
    assert ProxyCLIP(vfm="mae").vfm_kind == "mae" and ProxyCLIP().vfm_kind == "dino"


# ------------------------------------------------------------------------------------------------ loading
def test_offline_error_is_fast_and_one_line(no_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        load_vfm("dino")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "\n" not in msg and "vit_base_patch8_224.dino" in msg and "--vfm-checkpoint" in msg


def test_unreachable_hub_error_is_fast(no_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(vfm_mod, "offline_requested", lambda: False)
    monkeypatch.setattr(vfm_mod, "reachable", lambda url, timeout=None: False)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="unreachable.*--vfm-checkpoint"):
        Segmenter(make_clip(), method="proxyclip+fsa", vfm="vit_base_patch16_224.dino", **FAST)
    assert time.perf_counter() - start < 5


def test_bad_vfm_names_and_files(tmp_path):
    with pytest.raises(RfclipError, match="unknown VFM"):
        load_vfm("no_such_model_xyz")
    with pytest.raises(RfclipError, match="not found"):
        load_vfm("dino", checkpoint=tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RfclipError, match="cannot read"):
        load_vfm("dino", checkpoint=bad)


@pytest.fixture(scope="module")
def small_vit_state():
    """Random weights of timm's vit_small_patch8_224 (the DINO ViT-S/8 architecture)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    return model.eval(), {k: v.contiguous() for k, v in model.state_dict().items()}


def test_load_from_local_safetensors(tmp_path, small_vit_state):
    model, state = small_vit_state
    path = tmp_path / "vfm.safetensors"
    save_file(state, str(path))
    vfm = load_vfm("vit_small_patch8_224.dino", checkpoint=path)
    assert vfm.name == "vit_small_patch8_224.dino" and vfm.source == str(path) and vfm.kind == "dino"
    x = torch.randn(1, 3, 64, 48)
    feats, grid = vfm.features(x)
    assert grid == (8, 6)
    with torch.no_grad():
        raw = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        want = model.forward_features((raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                                      / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))[:, 1:]
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-4)


def test_load_original_dino_layout_and_mismatch(tmp_path, small_vit_state):
    model, state = small_vit_state
    # DINO's full training checkpoints keep the backbone under teacher/backbone.*
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, path)
    vfm = load_vfm("vit_small_patch8_224.dino", checkpoint=path)
    assert torch.equal(vfm.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(RfclipError, match="does not fit timm model vit_tiny_patch16_224"):
        load_vfm("vit_tiny_patch16_224", checkpoint=path)


def test_cached_weights_are_found(no_cache, small_vit_state):
    """A file in torch.hub's checkpoint folder (where torch.hub / timm's URL fallback put DINO) is used offline."""
    _, state = small_vit_state
    folder = no_cache / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "dino_deitsmall8_pretrain.pth")
    vfm = load_vfm("vit_small_patch8_224.dino")
    assert vfm.source.endswith("dino_deitsmall8_pretrain.pth")


# ------------------------------------------------------------------------------------------------ end to end
def test_proxyclip_segmenter_tiny(tiny_clip, random_image):
    seg = Segmenter(tiny_clip, method="proxyclip", vfm=tiny_vit(), short_side=None, **FAST)
    assert seg.method.options()["vfm"] == "VisionTransformer"
    out = seg.segment(random_image, "cat;dog;grass")
    assert out.mask.shape == random_image.shape[:2] and np.isfinite(out.probs).all()


def test_proxyclip_and_fsa_b16_geometry_end_to_end():
    """Random ViT-B/16-geometry CLIP + random timm vit_base_patch8_224 (the DINO B/8 architecture).

    80 px crops keep it to a few seconds on a CPU: CLIP grid 5x5, VFM grid 10x10."""
    cfg = dict(embed_dim=512, quick_gelu=True,
               vision_cfg=dict(image_size=224, layers=12, width=768, head_width=64, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=1))
    clip = make_clip(cfg)
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(80, 80, 3), dtype=np.uint8)
    outs = {}
    for spec in ("proxyclip", "proxyclip+fsa"):
        seg = Segmenter(clip, method=spec, vfm=vit, short_side=None, slide_crop=80, **FAST)
        text = seg.encode_classes("cat;dog;grass;sky")
        (mask, probs), = seg.predict([image], text)
        assert mask.shape == (80, 80) and torch.isfinite(probs).all()
        outs[spec] = probs
    assert seg.method.lam == 3.0
    assert not torch.equal(outs["proxyclip"], outs["proxyclip+fsa"])
