"""The dense forward and each method's last layer against independent few-line computations.

The reference for layers 1..L-1 is open_clip's own ResidualAttentionBlock (so the hook-based forward is
checked against the library it reads its weights from); the last layer is recomputed from the method's
formula with the block's raw weights.
"""

import pytest
import torch
import torch.nn.functional as F

from rfclip.dense import DenseCLIP
from rfclip.methods import build_method


def last_block_input(visual, images):
    """Input of the last block computed by open_clip's own modules."""
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


def qkv_heads(block, x, heads):
    z = block.ln_1(x)
    q, k, v = F.linear(z, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    B, T, C = q.shape
    split = lambda t: t.reshape(B, T, heads, C // heads).transpose(1, 2)  # noqa: E731
    return split(q), split(k), split(v)


def attend(block, A, v):
    B, H, T, dh = v.shape
    return block.attn.out_proj((A @ v).transpose(1, 2).reshape(B, T, H * dh))


def features(visual, y):
    return F.normalize(visual.ln_post(y[:, 1:]) @ visual.proj, dim=-1)


def expected(method, visual, images):
    block = visual.transformer.resblocks[-1]
    heads = block.attn.num_heads
    x = last_block_input(visual, images)
    q, k, v = qkv_heads(block, x, heads)
    s = (q.shape[-1]) ** -0.5
    sm = lambda a, b: torch.softmax(s * a @ b.transpose(-1, -2), dim=-1)  # noqa: E731
    T = x.shape[1]
    if method == "clip":
        return features(visual, block(x))
    if method == "maskclip":  # identity attention: each token keeps its value
        return features(visual, block.attn.out_proj(F.linear(block.ln_1(x), *[w.chunk(3)[2] for w in (block.attn.in_proj_weight, block.attn.in_proj_bias)])))
    if method == "sclip":
        y = x + attend(block, sm(q, q) + sm(k, k), v)
        return features(visual, y + block.mlp(block.ln_2(y)))
    if method == "clearclip":
        return features(visual, attend(block, sm(q, q), v))
    if method in ("naclip", "kk"):
        w = int((T - 1) ** 0.5)  # square grid
        bias = torch.zeros(T, T)
        if method == "naclip":
            for a in range(T - 1):
                for b in range(T - 1):
                    d2 = (a // w - b // w) ** 2 + (a % w - b % w) ** 2
                    bias[a + 1, b + 1] = torch.exp(torch.tensor(-d2 / (2 * 5.0**2)))
        A = torch.softmax(s * k @ k.transpose(-1, -2) + bias, dim=-1)
        return features(visual, attend(block, A, v))
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["clip", "maskclip", "sclip", "clearclip", "naclip", "kk"])
def test_last_layer_matches_formula(tiny_clip, method):
    visual = tiny_clip.model.visual
    images = torch.randn(2, 3, 224, 224)
    got, grid, _ = DenseCLIP(visual)(images, build_method(method))
    want = expected(method, visual, images)
    assert grid == (14, 14)
    assert got.shape == want.shape == (2, 196, tiny_clip.model.visual.output_dim)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_layer_averaged_kk_matches_formula(tiny_clip):
    """kk(layer_average=True): the last block attends with the mean over all layers of softmax(s k k^T)."""
    visual = tiny_clip.model.visual
    images = torch.randn(1, 3, 224, 224)
    blocks = visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    x = visual._embeds(images)
    maps = []
    for i, block in enumerate(blocks):
        q, k, v = qkv_heads(block, x, heads)
        maps.append(torch.softmax(k @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1))
        if i < len(blocks) - 1:
            x = block(x)
    want = features(visual, attend(blocks[-1], torch.stack(maps).mean(0), v))
    got, _, _ = DenseCLIP(visual)(images, build_method("kk", layer_average=True))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_non_native_grid_interpolates_positions(tiny_clip):
    """Any input size works: the grid follows the input and the native grid reuses the stored embedding."""
    dense = DenseCLIP(tiny_clip.model.visual)
    feats, grid, _ = dense(torch.randn(1, 3, 160, 240), build_method("naclip"))
    assert grid == (10, 15) and feats.shape == (1, 150, 32)
    assert torch.isfinite(feats).all()
    native = dense.positional_embedding((14, 14), torch.device("cpu"))
    assert torch.equal(native, tiny_clip.model.visual.positional_embedding.float())
    # interpolating to the native size with the +0.1 scale-factor trick is (nearly) the identity
    pos = dense.positional_embedding((15, 15), torch.device("cpu"))
    assert pos.shape == (226, 64)


def test_rejects_non_vit_towers():
    from rfclip.errors import RfclipError

    with pytest.raises(RfclipError, match="ViT"):
        DenseCLIP(torch.nn.Linear(2, 2))
