"""ProxyCLIP: proxy attention and value upsampling against direct computations, VFM features and loading."""

from __future__ import annotations

import math
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
from rfclip.models.pos_embed import POSITION_RULES, resample_patch_pos_embed
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


# ------------------------------------------------------------------------------------------------ positions
def vfm_input(x):
    """CLIP-normalised crops -> ImageNet-normalised (ProxyCLIP's UnNormalize + Normalize)."""
    raw = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    return (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def official_patch_positions(kind, patch_pos, native, grid):
    """The patch positions (1, native**2, C) at ``grid`` as each official model computes them, written out from
    their code: DINO ``interpolate_pos_encoding`` (also DINOv2 without registers: interpolate_offset 0.1); DINOv2 hub
    ``*_reg`` models (interpolate_offset 0, interpolate_antialias True, in fp32); MAE ``interpolate_pos_embed``."""
    dim = patch_pos.shape[-1]
    img = patch_pos.float().reshape(1, native, native, dim).permute(0, 3, 1, 2)
    if kind in ("dino", "dinov2_noreg"):
        h0, w0 = grid[0] + 0.1, grid[1] + 0.1
        out = F.interpolate(img, scale_factor=(h0 / math.sqrt(native ** 2), w0 / math.sqrt(native ** 2)), mode="bicubic")
    elif kind == "dinov2_reg":
        out = F.interpolate(img, size=grid, mode="bicubic", antialias=True)
    else:  # mae
        out = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


def official_forward(net, kind, x):
    """timm blocks with the official model's positions added to [CLS, (registers,) patches]; patch tokens out."""
    tokens = net.patch_embed(x).flatten(1, 2)  # (B, h*w, C)
    grid = (x.shape[-2] // net.patch_embed.patch_size[0], x.shape[-1] // net.patch_embed.patch_size[1])
    native = net.patch_embed.grid_size[0]
    B = x.shape[0]
    if net.no_embed_class:  # timm's DINOv2-with-registers: CLS position folded into cls_token
        pos = official_patch_positions(kind, net.pos_embed, native, grid)
        t = torch.cat([net.cls_token.expand(B, -1, -1), net.reg_token.expand(B, -1, -1), tokens + pos], 1)
    else:
        pos = official_patch_positions(kind, net.pos_embed[:, 1:], native, grid)
        t = torch.cat([net.cls_token.expand(B, -1, -1), tokens], 1) + torch.cat([net.pos_embed[:, :1], pos], 1)
    for blk in net.blocks:
        t = blk(t)
    return net.norm(t)[:, net.num_prefix_tokens:]


# kind: (timm name whose architecture flags the tiny model copies, patch, native image size, extra ViT args)
VFM_KINDS = {
    "dino": ("vit_base_patch8_224.dino", 8, 224, {}),
    "dinov2_reg": ("vit_base_patch14_reg4_dinov2.lvd142m", 14, 518, dict(reg_tokens=4, no_embed_class=True)),
    "dinov2_noreg": ("vit_base_patch14_dinov2.lvd142m", 14, 518, {}),
    "mae": ("vit_base_patch16_224.mae", 16, 224, {}),
}


@pytest.mark.parametrize("kind", list(VFM_KINDS))
def test_positions_at_336_match_the_official_formula(kind):
    name, patch, native, extra = VFM_KINDS[kind]
    torch.manual_seed(0)
    net = VisionTransformer(img_size=native, patch_size=patch, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                            dynamic_img_size=True, **extra).eval()
    with torch.no_grad():
        net.pos_embed.normal_(0, 1.0)  # positions that matter (timm's init is 0.02)
    vfm = VisionFoundationModel(net, name=name)
    grid = (336 // patch, 336 // patch)
    n_pos_prefix = 0 if net.no_embed_class else 1
    got = resample_patch_pos_embed(net.pos_embed[:, n_pos_prefix:], grid, net.patch_embed.grid_size, vfm.positions)
    want = official_patch_positions(kind, net.pos_embed[:, n_pos_prefix:], native // patch, grid)
    assert got.shape == (1, grid[0] * grid[1], 32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # ... and the features use them
    x = torch.randn(2, 3, 336, 336)
    feats, g = vfm.features(x)
    with torch.no_grad():
        want_feats = official_forward(net, kind, vfm_input(x))
        timm_feats = net.forward_features(vfm_input(x))[:, net.num_prefix_tokens:]
    assert g == grid
    torch.testing.assert_close(feats, want_feats, atol=1e-5, rtol=1e-5)
    if kind != "dinov2_reg":  # timm's own resampling (antialiased resize) is DINOv2-with-registers' rule only
        assert (timm_feats - want_feats).abs().max() > 1e-3
    else:
        torch.testing.assert_close(timm_feats, want_feats, atol=1e-5, rtol=1e-5)


def test_positions_unchanged_on_the_native_grid():
    posemb = torch.randn(1, 28 * 28, 8)
    for rule in POSITION_RULES.values():
        assert resample_patch_pos_embed(posemb, (28, 28), (28, 28), rule) is posemb
    rect = resample_patch_pos_embed(posemb.double(), (42, 30), (28, 28))
    assert rect.shape == (1, 42 * 30, 8) and rect.dtype == torch.float64  # input dtype back
    with pytest.raises(ValueError, match="patch positions"):
        resample_patch_pos_embed(posemb, (4, 4), (27, 27))
    with pytest.raises(RfclipError, match="unknown positions rule"):
        VisionFoundationModel(tiny_vit(), positions="nearest")


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
    with pytest.raises(RfclipError, match=r"is not a checkpoint \(it holds text\)"):
        load_vfm("dino", checkpoint=bad)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # looks like a torch.save zip, but is cut off
    with pytest.raises(RfclipError, match="cannot read"):
        load_vfm("dino", checkpoint=broken)


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
    with torch.no_grad():  # DINO's own positions at the 8 x 6 grid
        want = official_forward(model, "dino", vfm_input(x))
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


# ------------------------------------------------------------------------------------------------ SAM
def tiny_sam(seed=0):
    """A random SAM image encoder (timm's VisionTransformerSAM: windowed + global attention, relative positions,
    conv neck), small: 128 px input, 8 x 8 grid, 16 neck channels."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(seed)
    net = VisionTransformerSAM(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                               window_size=4, use_rel_pos=True, neck_chans=16, num_classes=0).eval()
    with torch.no_grad():  # SAM's init leaves these at zero
        net.pos_embed.normal_(0, 0.5)
        for blk in net.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    return net


def save_official_sam(net, path):
    """``net``'s weights in the layout of SAM's released sam_vit_*.pth: a plain state dict with the image encoder
    under ``image_encoder.`` (MLP layers named lin1/lin2), next to the prompt encoder and mask decoder."""
    state = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v.clone() for k, v in net.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(state, path)
    return path


def test_sam_official_layout_loads_and_runs_proxyclip_and_fsa(tmp_path, tiny_clip, random_image, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tiny_sam(seed=1)
    path = save_official_sam(source, tmp_path / "sam_vit_tiny.pth")
    vfm = load_vfm(tiny_sam(seed=2), checkpoint=path)  # other random weights, replaced by the file's
    assert type(vfm).__name__ == "SamImageEncoder" and vfm.kind == "sam"
    for (k, v), w in zip(source.state_dict().items(), vfm.model.state_dict().values()):
        assert torch.equal(v, w), k
    # Features: the ImageNet-normalised crop resized to the encoder's input (128 here, 1024 for SAM), neck output
    crop = torch.randn(2, 3, 80, 96)
    feats, grid = vfm.features(crop)
    with torch.no_grad():
        x = F.interpolate(vfm_input(crop), size=(128, 128), mode="bilinear", align_corners=False)
        want = source.forward_features(x).flatten(2).transpose(1, 2)
    assert grid == (8, 8) and feats.shape == (2, 64, 16)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)
    # End to end: proxyclip and proxyclip+fsa on the 8 x 8 SAM grid, FSA's lambda for SAM
    outs = {}
    for spec in ("proxyclip", "proxyclip+fsa"):
        seg = Segmenter(tiny_clip, method=spec, vfm=vfm, short_side=None, slide_crop=96, slide_stride=64, **FAST)
        out = seg.segment(random_image, "cat;dog;grass;sky")
        assert out.mask.shape == random_image.shape[:2] and np.isfinite(out.probs).all()
        outs[spec] = out.probs
    assert seg.method.vfm_kind == "sam" and seg.method.lam == 3.0
    assert not np.array_equal(outs["proxyclip"], outs["proxyclip+fsa"])


def test_sam_b_loads_by_name_from_the_official_file(tmp_path, no_cache, monkeypatch):
    """Real SAM ViT-B geometry (89M random weights) from a file in the official layout, offline. Its forward at
    1024 x 1024 takes ~25 s on a CPU, so only the loading and the grid are checked here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    net = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0)
    path = save_official_sam(net, tmp_path / "sam_vit_b_01ec64.pth")
    vfm = load_vfm("sam", checkpoint=path)
    assert vfm.name == "samvit_base_patch16.sa1b" and vfm.kind == "sam" and vfm.source == str(path)
    assert vfm.input_size == (1024, 1024) and vfm.grid(336, 336) == (64, 64) and vfm.grid(224, 500) == (64, 64)
    assert torch.equal(vfm.model.blocks[3].mlp.fc2.weight, net.blocks[3].mlp.fc2.weight)
    assert torch.equal(vfm.model.neck[2].weight, net.neck[2].weight)


def test_sam_aliases_and_lambda():
    from rfclip.methods.fsa import default_lambda

    assert resolve_vfm_name("sam") == resolve_vfm_name("sam_b") == "samvit_base_patch16.sa1b"
    assert resolve_vfm_name("sam_l") == "samvit_large_patch16.sa1b"
    assert resolve_vfm_name("SAM_H") == "samvit_huge_patch16.sa1b"
    for name in ("sam", "sam_l", "sam_h"):
        base = ProxyCLIP(vfm=name)
        assert base.vfm_kind == "sam"
        assert default_lambda(base) == 3.0 and default_lambda(base, width=1280) == 2.3  # FSA hyper_param.txt
