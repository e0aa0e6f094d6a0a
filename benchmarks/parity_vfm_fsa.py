"""Parity of rfclip's VFMs, FSA pruning and preset normalisation with the official code's formulas (random weights).

Prints, before (rfclip's earlier behaviour, recomputed here) and after (the current code):

1. VFM positions at a 336 crop: patch features and ProxyCLIP's proxy similarities / attention of a random VFM
   (DINO ViT-B/8, DINOv2 with and without registers, MAE ViT-B/16 geometry) against the official model's positional
   interpolation written out here (DINO: scale_factor (h + 0.1) / h0; DINOv2 reg: antialiased resize; MAE: resize);
   before = timm's dynamic_img_size resampling (antialiased bicubic resize).
2. FSA pruning on an ill-conditioned case (near-parallel text embeddings, N = 784): mask entries that differ from
   the official kl_divergence + SparseAtten evaluated in fp64; before = fp32 chain and "keep every key tied with the
   last kept one".
3. Preset normalisation: per-pixel probabilities with CLIP's exact mean/std (before) and the mmseg-rounded ones the
   papers' code uses (the presets now), random ViT-B/16-geometry CLIP.
4. SAM (only if the segment_anything package is importable): rfclip's SAM VFM against segment_anything's
   ImageEncoderViT on the same random weights in the official checkpoint layout.

    PYTHONPATH=src python benchmarks/parity_vfm_fsa.py [--skip-sam]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

from rfclip.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, MMSEG_CLIP_MEAN, MMSEG_CLIP_STD
from rfclip.methods import fsa
from rfclip.methods.proxyclip import proxy_attention
from rfclip.models.loading import random_clip
from rfclip.models.vfm import VisionFoundationModel, load_vfm
from rfclip.segmenter import Segmenter


# ---------------------------------------------------------------------------------------------- 1. positions
def official_positions(kind: str, patch_pos, native: int, grid):
    dim = patch_pos.shape[-1]
    img = patch_pos.float().reshape(1, native, native, dim).permute(0, 3, 1, 2)
    if kind in ("dino", "dinov2_noreg"):
        out = F.interpolate(img, scale_factor=((grid[0] + 0.1) / native, (grid[1] + 0.1) / native), mode="bicubic")
    elif kind == "dinov2_reg":
        out = F.interpolate(img, size=grid, mode="bicubic", antialias=True)
    else:
        out = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


def official_features(net, kind: str, x):
    tokens = net.patch_embed(x).flatten(1, 2)
    grid = (x.shape[-2] // net.patch_embed.patch_size[0], x.shape[-1] // net.patch_embed.patch_size[1])
    native = net.patch_embed.grid_size[0]
    if net.no_embed_class:
        pos = official_positions(kind, net.pos_embed, native, grid)
        t = torch.cat([net.cls_token.expand(len(x), -1, -1), net.reg_token.expand(len(x), -1, -1), tokens + pos], 1)
    else:
        pos = official_positions(kind, net.pos_embed[:, 1:], native, grid)
        t = torch.cat([net.cls_token.expand(len(x), -1, -1), tokens], 1) + torch.cat([net.pos_embed[:, :1], pos], 1)
    for blk in net.blocks:
        t = blk(t)
    return net.norm(t)[:, net.num_prefix_tokens:]


def positions(pos_std: float | None) -> None:
    cases = {"dino": "vit_base_patch8_224.dino", "dinov2_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
             "dinov2_noreg": "vit_base_patch14_dinov2.lvd142m", "mae": "vit_base_patch16_224.mae"}
    for kind, name in cases.items():
        torch.manual_seed(0)
        net = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0, dynamic_img_size=True).eval()
        if pos_std is not None:
            with torch.no_grad():
                net.pos_embed.normal_(0, pos_std)
        vfm = VisionFoundationModel(net, name=name)
        crop = torch.randn(1, 3, 336, 336)
        x = crop * vfm._scale + vfm._shift
        with torch.no_grad():
            ref = official_features(net, kind, x)
            before = net.forward_features(x)[:, net.num_prefix_tokens:]
            after, _ = vfm.features(crop)

        def sims(g):
            g = F.normalize(g, dim=-1)
            return g @ g.transpose(-1, -2)

        for label, f in (("before", before), ("after", after)):
            print(f"  {kind:12s} {label:6s}: max|d features| {(f - ref).abs().max():.2e}   "
                  f"max|d similarity| {(sims(f) - sims(ref)).abs().max():.2e}   "
                  f"max|d proxy attention| {(proxy_attention(f) - proxy_attention(ref)).abs().max():.2e}")


# ---------------------------------------------------------------------------------------------- 2. pruning
def official_mask_fp64(log_p):
    p = log_p.exp()
    kl = (p.unsqueeze(2) * (log_p.unsqueeze(2) - log_p.unsqueeze(1))).sum(-1).clamp(min=0.0)
    sim = 1 / (kl + 1.0)
    srt, idx = torch.sort(sim, descending=True, dim=-1, stable=True)
    keep = F.softmax(srt, dim=-1).cumsum(-1) <= 0.45
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def old_feedback_mask(log_p32):
    """rfclip before: fp32 KL and similarity, keep every key tied with the last kept one."""
    p = log_p32.exp()
    kl = ((p * log_p32).sum(-1, keepdim=True) - p @ log_p32.transpose(-1, -2)).clamp_min(0)
    s = 1.0 / (1.0 + kl)
    ordered = s.sort(dim=-1, descending=True).values
    count = (ordered.softmax(-1).cumsum(-1) <= 0.45).sum(-1, keepdim=True).clamp_min(1)
    return s >= ordered.gather(-1, count - 1)


def pruning(seeds=(0, 1, 2)) -> None:
    N, Q, D = 784, 20, 512
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        base = F.normalize(torch.randn(D, generator=g), dim=0)
        text = F.normalize(base + 1e-3 * torch.randn(Q, D, generator=g), dim=-1)
        feats = F.normalize(torch.randn(1, N, D, generator=g), dim=-1)
        uni = F.normalize(torch.randn(1, D, generator=g), dim=-1)
        log_p = fsa.isolated_log_probs(feats, uni, text)  # fp64
        want = official_mask_fp64(log_p)
        before = old_feedback_mask(fsa.isolated_log_probs(feats, uni, text, dtype=torch.float32))
        after = fsa.feedback_from_log_probs(log_p, 3.0)[0] > 0
        print(f"  seed {seed}: mask entries differing from the official rule in fp64 (of {N * N}): "
              f"before {int((before != want).sum())}, after {int((after != want).sum())}")


# ---------------------------------------------------------------------------------------------- 3. normalisation
def normalisation() -> None:
    cfg = dict(embed_dim=512, quick_gelu=True,
               vision_cfg=dict(image_size=224, layers=12, width=768, head_width=64, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=1))
    clip = random_clip(cfg, quick_gelu=True, seed=0)
    img = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    for method in ("clip", "maskclip", "sclip", "clearclip"):
        seg = Segmenter(clip, method=method, short_side=None, slide_crop=224, device="cpu", text_cache=False,
                        templates=["a photo of a {}."])
        text = seg.encode_classes("cat;dog;grass;sky;road;car")
        (_, exact), = seg.predict([img], text)
        (_, rounded), = seg.with_config(pixel_mean=MMSEG_CLIP_MEAN, pixel_std=MMSEG_CLIP_STD).predict([img], text)
        print(f"  {method:10s} max|d probability| exact vs mmseg-rounded constants: {(exact - rounded).abs().max():.2e}")


# ---------------------------------------------------------------------------------------------- 4. SAM
def sam() -> None:
    try:
        from segment_anything.modeling import ImageEncoderViT
    except ImportError:
        print("  segment_anything is not installed: skipped")
        return
    torch.manual_seed(0)
    net = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0).eval()
    state = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for k, v in state.items():
            if "rel_pos" in k or k.endswith("pos_embed"):
                v.normal_(0, 0.5)
    official = ImageEncoderViT(depth=12, embed_dim=768, img_size=1024, mlp_ratio=4,
                               norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12,
                               patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11],
                               window_size=14, out_chans=256).eval()
    official.load_state_dict({k[len("image_encoder."):]: v for k, v in state.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sam_vit_b_01ec64.pth")
        torch.save(state, path)
        vfm = load_vfm("sam", checkpoint=path)
    crop = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        start = time.perf_counter()
        ours, grid = vfm.features(crop)
        seconds = time.perf_counter() - start
        raw = crop * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        x = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        ref = official(F.interpolate(x, size=(1024, 1024), mode="bilinear", align_corners=False))
    ref = ref.flatten(2).transpose(1, 2)
    print(f"  SAM ViT-B, 336 crop -> grid {grid}: max|d features| {(ours - ref).abs().max():.2e} "
          f"(max|features| {ref.abs().max():.2f}); rfclip's forward {seconds:.1f} s on {torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-sam", action="store_true")
    args = parser.parse_args()
    print("1. VFM features at a 336 crop vs the official positional interpolation (timm's random init, pos std 0.02)")
    positions(None)
    print("   ... with larger positions (pos_embed ~ N(0, 0.5))")
    positions(0.5)
    print("2. FSA pruning, near-parallel text embeddings")
    pruning()
    print("3. Image normalisation")
    normalisation()
    if not args.skip_sam:
        print("4. SAM image encoder vs segment_anything")
        sam()


if __name__ == "__main__":
    sys.exit(main())
