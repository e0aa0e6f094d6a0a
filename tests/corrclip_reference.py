"""An independent restatement of what the official CorrCLIP v1 code computes (zdk258/CorrCLIP at 103bc18,
``CorrCLIPv1/corrclip_segmentor.py`` and ``CorrCLIPv1/open_clip/transformer.py``), for tests.

One window at a time with batch 1, in the order the code runs, over the raw weights of an open_clip model and a timm
DINO ViT (both given in float64): the whole sequence [MCTs, CLS, patches] through every block with a boolean
attention mask (not rfclip's query-only stream), region loops as the code writes them, a plain DBSCAN written from
its definition (no rfclip code), the official post-processing (background merge of the first queries, ``prob_thd``,
map correction with ``torch.mode`` per region). Nothing here imports rfclip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ALPHA, BETA, TAU, EPS = 1.0, 0.5, 4.0, 0.2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dbscan_min1(dist, eps):
    """DBSCAN(metric='precomputed', eps, min_samples=1) by its definition: every point is a core point; visit the
    points in order, each unlabelled one starts a cluster that takes everything density-reachable from it."""
    n = dist.shape[0]
    labels = [-1] * n
    cluster = 0
    for i in range(n):
        if labels[i] != -1:
            continue
        labels[i] = cluster
        queue = [i]
        while queue:
            p = queue.pop()
            for j in range(n):
                if labels[j] == -1 and dist[p, j] <= eps:
                    labels[j] = cluster
                    queue.append(j)
        cluster += 1
    return torch.tensor(labels)


def num_spatial(layers):
    return {12: 5, 24: 12, 32: 28}.get(layers, max(1, layers - 4))


def interpolate_pos(pos, gh, gw, cls=True):
    """(1+N, C) or (1, 1+N, C) positions at a gh x gw grid: bicubic with scale_factor (g + 0.1) / sqrt(N)."""
    squeeze = pos.dim() == 2
    pos = pos[None] if squeeze else pos
    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    if (gh, gw) == (side, side):
        return pos[0] if squeeze else pos
    patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
    assert patch.shape[-2:] == (gh, gw)
    out = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
    return out[0] if squeeze else out


def dino_qk(dino, crop):
    """DINO's get_intermediate_layers with the qkv hook: q + k of the last block, CLS dropped, normalised."""
    def const(values):
        return torch.tensor(values, dtype=crop.dtype, device=crop.device).view(1, 3, 1, 1)

    x = (crop * const(CLIP_STD) + const(CLIP_MEAN) - const(IMAGENET_MEAN)) / const(IMAGENET_STD)
    p = dino.patch_embed.proj.kernel_size[0]
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    t = dino.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([dino.cls_token, t], dim=1) + interpolate_pos(dino.pos_embed, gh, gw)
    for blk in dino.blocks[:-1]:
        t = blk(t)
    qkv = dino.blocks[-1].attn.qkv(dino.blocks[-1].norm1(t))  # the hooked output
    qkv = qkv.reshape(1, t.shape[1], 3, -1).permute(2, 0, 1, 3)
    feats = (qkv[0] + qkv[1])[:, 1:]
    return F.normalize(feats, dim=-1), (gh, gw)


def block_forward(blk, x, attn_mask):
    """A pre-LN block on x (L, C) with a bool attn_mask (L, L), True = not allowed."""
    L, C = x.shape
    H = blk.attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(L, H, C // H).transpose(0, 1) for t in (q, k, v))
    logits = (q / math.sqrt(C // H)) @ k.transpose(1, 2)
    logits = logits.masked_fill(attn_mask[None], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(L, C)
    x = x + blk.attn.out_proj(out)
    return x + blk.mlp(blk.ln_2(x))


def clip_forward(visual, crop, dino_feats, feat_shape, masks):
    """VisionTransformer.forward of CorrCLIPv1 for one crop (1, 3, H, W) and its masks (1, 1, H, W)."""
    ps = visual.conv1.kernel_size[0]
    token_size = (crop.shape[-2] // ps, crop.shape[-1] // ps)
    x = visual.conv1(crop).reshape(visual.conv1.out_channels, -1).T
    x = torch.cat([visual.class_embedding[None], x], dim=0)
    x = visual.ln_pre(x + interpolate_pos(visual.positional_embedding, *token_size))  # (1+N, C)
    blocks = list(visual.transformer.resblocks)
    L = len(blocks)
    ns = num_spatial(L)

    similarity = dino_feats[0] @ dino_feats[0].T  # (N', N')
    # mask merging
    m = F.interpolate(masks.double(), size=feat_shape, mode="nearest").long()[0, 0]
    values = torch.unique(m)
    if len(values) > 2:
        region_masks = [m == val for val in values]
        feats = dino_feats[0].reshape(*feat_shape, -1)
        inst = torch.stack([feats[r].mean(dim=0) for r in region_masks])
        inst = F.normalize(inst, dim=1)[1:]
        sim = inst @ inst.T
        cluster = dbscan_min1(sim.max() - sim, EPS)
        for idx, c in enumerate(cluster, start=1):
            if c != -1:
                m[region_masks[idx]] = int(c) + 10000
    # scope reconstruction
    flat = m.reshape(-1)
    region_masks = [flat == val for val in torch.unique(flat)]
    allowed = torch.zeros_like(similarity, dtype=torch.bool)
    for r in region_masks[1:]:
        allowed |= torch.outer(r, r)
    r0 = region_masks[0]
    allowed |= (r0[None, :] | r0[:, None]) & (similarity > similarity.mean())
    attn = (similarity.masked_fill(~allowed, float("-inf")) * TAU).softmax(dim=-1)

    # mask class tokens
    tm = F.interpolate(m[None, None].double(), size=token_size, mode="nearest").long()[0, 0]
    region_masks = torch.stack([tm == val for val in torch.unique(tm)])  # (R, h, w)
    R = region_masks.shape[0]
    seq = torch.cat([x[:1].repeat(R, 1), x], dim=0)
    allow = torch.zeros(seq.shape[0], seq.shape[0], dtype=torch.bool, device=seq.device)
    allow[R:, R:] = True
    allow[:R, R] = True
    allow[:R, R + 1:] = region_masks.reshape(R, -1)
    attn_mask = ~allow

    spatial = []
    for idx, blk in enumerate(blocks[:-1]):
        seq = block_forward(blk, seq, attn_mask)
        if L - 2 - ns <= idx <= L - 3:
            spatial.append(seq[R:])
    blk = blocks[-1]
    C = seq.shape[1]
    outs = []
    for stream in (seq[R:], torch.stack(spatial).mean(0)):
        v = F.linear(blk.ln_1(stream), blk.attn.in_proj_weight[2 * C:], blk.attn.in_proj_bias[2 * C:])[1:]
        v = v.T.reshape(1, C, *token_size)
        v = F.interpolate(v, size=feat_shape, mode="bilinear", align_corners=False).reshape(C, -1).T
        outs.append(blk.attn.out_proj(attn @ v))
    mct = block_forward(blk, seq, attn_mask)[:R]
    expand = F.interpolate(region_masks[:, None].double(), size=feat_shape, mode="nearest").reshape(R, -1)
    outs.append(expand.T.to(mct.dtype) @ mct)
    main, spat, sem = (visual.ln_post(o) for o in outs)
    return (main + spat * ALPHA + sem * BETA) @ visual.proj  # (N', D)


def compute_padsize(H, W, p=56):
    l = r = t = b = 0
    if W % p:
        lr = p - W % p
        l, r = lr // 2, lr - lr // 2
    if H % p:
        tb = p - H % p
        t, b = tb // 2, tb - tb // 2
    return l, r, t, b


def forward_slide(visual, dino, img, masks, text, crop, stride):
    """img (1, 3, H, W) CLIP-normalised, masks (1, 1, H, W) at that size -> averaged logits (1, Q, H, W)."""
    _, _, H, W = img.shape
    if crop <= 0:
        crop = max(H, W)
    hg = max(H - crop + stride - 1, 0) // stride + 1
    wg = max(W - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros(1, text.shape[0], H, W)
    count = img.new_zeros(1, 1, H, W)
    for hi in range(hg):
        for wi in range(wg):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            c, cm = img[:, :, y1:y2, x1:x2], masks[:, :, y1:y2, x1:x2]
            h, w = c.shape[2:]
            pad = compute_padsize(h, w)
            if any(pad):
                c = F.pad(c, pad)
                cm = F.pad(cm, pad, value=10000)
            feats, feat_shape = dino_qk(dino, c)
            f = F.normalize(clip_forward(visual, c, feats, feat_shape, cm), dim=-1)
            logits = (f @ text.T).T.reshape(1, -1, *feat_shape)
            logits = F.interpolate(logits, size=c.shape[-2:], mode="bilinear")
            if any(pad):
                logits = logits[:, :, pad[2]:pad[2] + h, pad[0]:pad[0] + w]
            preds += F.pad(logits, (x1, W - x2, y1, H - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def corrclip_predict(visual, dino, img, instance_mask, text, num_classes, crop=336, stride=112, prob_thd=0.0,
                     logit_scale=40.0, out_size=None, dtype=torch.float64):
    """The official predict + postprocess_result for one image. ``img`` (3, H, W) CLIP-normalised (already
    resized), ``instance_mask`` (H0, W0) int at the original size, ``text`` (Q, D) normalised, queries ordered with
    the background's synonyms first. Returns (probs (C, H0, W0), seg_pred (H0, W0)) in ``dtype`` (the modules must
    be in it too: float64 for the tests)."""
    out_size = tuple(out_size or instance_mask.shape)
    masks = F.interpolate(instance_mask[None, None].double(), size=img.shape[-2:], mode="nearest").long()
    logits = forward_slide(visual, dino, img[None].to(dtype), masks, text.to(dtype), crop, stride)
    logits = F.interpolate(logits, size=out_size, mode="bilinear")[0]
    prob = (logits * logit_scale).softmax(0)
    Q = prob.shape[0]
    if Q != num_classes:
        bg = prob[:Q - num_classes + 1].max(0, keepdim=True)[0]
        prob = torch.cat([bg, prob[Q - num_classes + 1:]])
    pred = prob.argmax(0, keepdim=True)
    pred[prob.max(0, keepdim=True)[0] < prob_thd] = 0
    inst = instance_mask.long()
    for val in torch.unique(inst)[1:]:
        region = (inst == val)[None]
        pred[region] = torch.mode(pred[region])[0]
    return prob, pred[0]
