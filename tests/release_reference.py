"""An independent restatement of what the released RF-CLIP code (liblacklucy/RF-CLIP at c2b333e) computes, for
tests: one image, one crop at a time with batch 1, straight from the spec's formulas (rf-clip-released-code.md §2)
over the raw weights of an open_clip model. Nothing here comes from rfclip's forward or methods: the intermediate
layers compute their attention by hand, the last block is run through the block's own modules, the filter is a
depthwise 3x3 convolution with weights 1/9, the text clusters come from SciPy's linkage/fcluster, and the CASS
adjustment is a loop over clusters. Arithmetic as the release orders it (``0.6 x + 0.4 x`` for undetected tokens,
stacked means), in fp32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

SIGMA, ALPHA, BETA, TOPK = 5.0, 0.4, 0.4, 2  # feat_denoising sigma/alpha, feat_enhancing beta, top-2 patches


def positional(visual, gh: int, gw: int):
    """The release's interpolate_pos_encoding: bicubic with scale_factor (g + 0.1) / sqrt(N)."""
    pos = visual.positional_embedding
    n = pos.shape[0] - 1
    side = int(math.sqrt(n))
    if (gh, gw) == (side, side):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, mode="bicubic", scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
                          align_corners=False, recompute_scale_factor=False)
    assert patch.shape[-2:] == (gh, gw)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)


def denoise(x, gh: int, gw: int, dims):
    """feat_denoising on one crop's tokens x (1+N, C)."""
    C = x.shape[-1]
    feat = x[1:]
    low = feat.min(dim=-1, keepdim=True).values
    norm = (feat - low) / (feat - low).sum(dim=-1, keepdim=True).clamp(min=1e-8)
    mask = norm[:, list(dims)].max(dim=-1).values > SIGMA * (1.0 / C)  # (N,)
    grid = feat.T.reshape(1, C, gh, gw)
    avg = F.conv2d(grid, torch.full((C, 1, 3, 3), 1.0 / 9.0), padding=1, groups=C)
    smoothed = torch.where(mask.view(1, 1, gh, gw), avg, grid).reshape(C, gh * gw).T
    out = x.clone()
    out[1:] = (1 - ALPHA) * x[1:] + ALPHA * smoothed
    return out, mask


def split_heads(t, heads):
    T, C = t.shape
    return t.reshape(T, heads, C // heads).transpose(0, 1)  # (H, T, dh)


def qkv(block, z):
    heads = block.attn.num_heads
    q, k, v = F.linear(z, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def encode(visual, crop, dims, enhance_threshold=BETA, cls_only=False, trace=None):
    """One crop (1, 3, H, W) -> (patch features (N, D) normalised, [CLS] (D,) normalised, grid)."""
    blocks = list(visual.transformer.resblocks)
    ps = visual.conv1.kernel_size[0]
    gh, gw = crop.shape[-2] // ps, crop.shape[-1] // ps
    x = visual.conv1(crop).reshape(visual.conv1.out_channels, -1).T  # (N, C)
    x = torch.cat([visual.class_embedding[None], x], dim=0)
    x = visual.ln_pre(x + positional(visual, gh, gw))
    kks, guides = [], []
    for i, block in enumerate(blocks[:-1]):
        q, k, v = qkv(block, block.ln_1(x))
        scale = q.shape[-1] ** -0.5
        attn = torch.softmax((q * scale) @ k.transpose(1, 2), dim=-1)
        out = (attn @ v).transpose(0, 1).reshape(x.shape)
        x = x + block.attn.out_proj(out)
        x = x + block.mlp(block.ln_2(x))
        kks.append(torch.softmax((k * scale) @ k.transpose(1, 2), dim=-1))
        x, mask = denoise(x, gh, gw, dims)
        if trace is not None:
            trace.setdefault("dis", []).append(mask)
        guides.append(x)
    last = blocks[-1]
    y = last(x[None])[0]  # the standard block through its own modules
    y, mask = denoise(y, gh, gw, dims)
    if trace is not None:
        trace.setdefault("dis", []).append(mask)
    guides.append(y)
    cls = F.normalize(visual.ln_post(y[0]) @ visual.proj, dim=-1)
    if cls_only:
        return None, cls, (gh, gw)
    G = torch.stack(guides, dim=0).mean(dim=0)
    simi = F.cosine_similarity(G[1:].unsqueeze(1), G[1:].unsqueeze(0), dim=-1)  # (N, N)
    if trace is not None:
        trace["similarity"] = simi.clone()
    simi[simi < enhance_threshold] = 0

    def decode(u):
        _, k, v = qkv(last, last.ln_1(u))
        kk = torch.softmax((k * k.shape[-1] ** -0.5) @ k.transpose(1, 2), dim=-1)
        A = torch.stack([m[:, 1:, 1:] for m in kks + [kk]], dim=0).mean(dim=0)  # (H, N, N)
        out = (A @ v[:, 1:]).transpose(0, 1).reshape(u.shape[0] - 1, -1)
        return last.attn.out_proj(out)

    xe = x.clone()
    xe[1:] = simi @ x[1:]
    ge = G.clone()
    ge[1:] = simi @ G[1:]
    out = torch.stack([decode(xe), decode(ge)], dim=0).mean(dim=0)
    feats = F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)
    return feats, cls, (gh, gw)


def text_clusters(text, h_threshold):
    """custom_segmentor.hierarchical_clustering: complete linkage on cosine distances, fcluster - 1."""
    t = F.normalize(text.double(), dim=-1).numpy()
    d = np.clip(1.0 - t @ t.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    d = (d + d.T) / 2
    return fcluster(linkage(squareform(d, checks=False), method="complete"), t=h_threshold, criterion="distance") - 1


def cass_logits(feats, cls, text, clusters, gsw, mvw):
    """custom_segmentor.hierarchical_prompt + the global blend for one crop: (N, Q)."""
    g = cls @ text.T  # (Q,)
    adjusted = text.clone()
    for c in range(len(set(clusters.tolist()))):
        idx = np.where(clusters == c)[0]
        best = int(idx[np.argmax(g.numpy()[idx])])
        t = F.normalize(text[best][None], dim=1)
        sims = (F.normalize(feats, dim=1) @ t.T).squeeze(1)
        top = torch.topk(sims, min(TOPK, feats.shape[0])).indices
        mean = F.normalize(feats[top].mean(dim=0), dim=0)
        adjusted[best] = F.normalize((1 - mvw) * t[0] + mvw * mean, dim=0)
    logits = feats @ adjusted.T
    return logits * (1 - gsw) + g[None] * gsw


def crop_logits(visual, crop, dims, text, clusters, gsw, mvw, cls=None, enhance_threshold=BETA):
    """forward_feature: (1, Q, h, w) logits upsampled to the crop."""
    feats, own_cls, (gh, gw) = encode(visual, crop, dims, enhance_threshold)
    logits = cass_logits(feats, own_cls if cls is None else cls, text, clusters, gsw, mvw)
    logits = logits.T.reshape(1, -1, gh, gw)
    return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def release_probs(visual, image, out_size, dims, text, query_class, num_classes, *, slide_crop=0, slide_stride=112,
                  gsw=0.1, mvw=0.03, h_threshold=0.10, cls_source="image", enhance_threshold=BETA, logit_scale=40.0):
    """predict + postprocess_result for one preprocessed image (3, H, W): class probabilities (C, H0, W0)."""
    img = image[None]
    clusters = text_clusters(text, h_threshold)
    if slide_crop <= 0:
        logits = crop_logits(visual, img, dims, text, clusters, gsw, mvw, enhance_threshold=enhance_threshold)
    else:
        H, W = img.shape[-2:]
        whole_cls = None
        if cls_source == "image":
            whole_cls = encode(visual, img, dims, cls_only=True)[1]
        preds = img.new_zeros((1, text.shape[0], H, W))
        count = img.new_zeros((1, 1, H, W))
        h_grids = max(H - slide_crop + slide_stride - 1, 0) // slide_stride + 1
        w_grids = max(W - slide_crop + slide_stride - 1, 0) // slide_stride + 1
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2, x2 = min(hi * slide_stride + slide_crop, H), min(wi * slide_stride + slide_crop, W)
                y1, x1 = max(y2 - slide_crop, 0), max(x2 - slide_crop, 0)
                crop = img[:, :, y1:y2, x1:x2]
                lg = crop_logits(visual, crop, dims, text, clusters, gsw, mvw, cls=whole_cls,
                                 enhance_threshold=enhance_threshold)
                preds += F.pad(lg, (x1, W - x2, y1, H - y2))
                count[:, :, y1:y2, x1:x2] += 1
        logits = preds / count
    logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(logit_scale * logits, dim=0)  # (Q, H0, W0)
    one_hot = F.one_hot(query_class, num_classes).T.float().view(num_classes, -1, 1, 1)  # (C, Q, 1, 1)
    return (probs[None] * one_hot).max(dim=1).values
