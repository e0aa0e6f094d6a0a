"""The hook interface of the dense forward: every method's output is bit-identical to the forward as it was before
the last-layer hook (``Hooks.final_tokens``), the logits hook and the [CLS] output were added (main at 02dffef).

The reference below is that forward's body, frozen, over the encoder's unchanged pieces (``embed``, ``qkv``,
``attention_output``, ``to_text_space``); the comparison is ``torch.equal`` (same machine, same operations).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_clip
from rfclip.dense import DenseCLIP, DenseOutput, ForwardContext, Hooks
from rfclip.methods import build_method

TINY_DIMS = (5, 20, 41)


def forward_before(encoder: DenseCLIP, images, method, text_features=None):
    """DenseCLIP.forward at 02dffef (returns features, grid)."""
    x, grid = encoder.embed(images)
    ctx = ForwardContext(encoder=encoder, images=images, grid=grid, text_features=text_features)
    method.begin(ctx)
    last = encoder.num_layers - 1
    for layer, block in enumerate(encoder.blocks):
        x = method.layer_input(ctx, layer, x)
        q, k, v = encoder.qkv(block, x)
        if layer < last:
            weights = method.attention(ctx, layer, q, k, v)
            x = x + block.ls_1(encoder.attention_output(block, weights, v, q, k))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            continue
        final = method.final_attention(ctx, q, k, v)
        values = v if final.values is None else final.values
        y = block.ls_1(encoder.attention_output(block, final.weights, values, q, k))
        if final.keep_residual:
            y = x + y
            y = y + block.ls_2(block.mlp(block.ln_2(y)))
        x = y
        if final.grid is not None:
            grid = final.grid
        if final.has_cls:
            x = x[:, 1:]
    return F.normalize(encoder.to_text_space(x).float(), dim=-1), grid


@pytest.fixture(scope="module")
def planted_clip():
    """Tiny random CLIP whose patch tokens 17, 60, 61 over-activate distraction dim 20 (RF-CLIP's steps all run)."""
    clip = make_clip(seed=0)
    with torch.no_grad():
        clip.model.visual.positional_embedding[[18, 61, 62], 20] += 60.0
    return clip


METHODS = [
    ("clip", {}), ("maskclip", {}), ("maskclip", {"keep_residual": True}), ("sclip", {}), ("clearclip", {}),
    ("naclip", {}), ("kk", {}), ("kk", {"layer_average": True}),
    ("rfclip", {"distraction_dims": TINY_DIMS}), ("rfclip", {"distraction_dims": TINY_DIMS, "proxy_include_cls": True}),
    ("rfclip_nodefocus", {"distraction_dims": TINY_DIMS}), ("kk_proxy_baseline", {}),
    ("rfclip_code_embed", {"distraction_dims": TINY_DIMS}),
    ("naclip+fsa", {}), ("sclip+fsa", {}), ("rfclip+fsa", {"distraction_dims": TINY_DIMS}),
]


@pytest.mark.parametrize("spec,options", METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_every_method_is_bit_identical_to_the_forward_before(planted_clip, spec, options):
    encoder = DenseCLIP(planted_clip.model.visual)
    images = torch.randn(2, 3, 224, 160, generator=torch.Generator().manual_seed(1))
    text = F.normalize(torch.randn(4, planted_clip.model.visual.output_dim, generator=torch.Generator().manual_seed(2)),
                       dim=-1)
    method = build_method(spec, **options)
    with torch.no_grad():
        want, want_grid = forward_before(encoder, images, method, text_features=text)
        out = encoder(images, method, text_features=text)
    assert isinstance(out, DenseOutput)
    assert out.grid == want_grid
    assert torch.equal(out.features, want), spec
    # the default logits hook is the plain cosine product
    assert torch.equal(method.logits(out.features, out.cls, text), out.features @ text.T)
    assert not method.needs_image_cls


def test_proxyclip_is_bit_identical_to_the_forward_before(tiny_clip):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True).eval()
    encoder = DenseCLIP(tiny_clip.model.visual)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    method = build_method("proxyclip", vfm=vit)
    with torch.no_grad():
        want, want_grid = forward_before(encoder, images, method)
        out = encoder(images, method)
    assert out.grid == want_grid == (28, 28) and torch.equal(out.features, want)
    assert out.cls is None  # the VFM grid has no [CLS] token


def test_cls_output_is_the_final_cls_token(tiny_clip):
    """``DenseOutput.cls``: the last layer's [CLS] token through ln_post and proj, L2-normalised (vanilla CLIP:
    open_clip's own image embedding)."""
    visual = tiny_clip.model.visual
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = DenseCLIP(visual)(images, build_method("clip"))
        want = F.normalize(visual(images), dim=-1)
    torch.testing.assert_close(out.cls, want, atol=2e-5, rtol=1e-4)


class ReturnsTokens(Hooks):
    """A method whose last layer is its own: the patch tokens of the last block's input, and a [CLS] of zeros."""

    def final_tokens(self, ctx, x, q, k, v):
        from rfclip.dense import FinalTokens

        return FinalTokens(patches=x[:, 1:], cls=torch.zeros_like(x[:, 0]))


def test_final_tokens_hook_replaces_the_last_layer(tiny_clip):
    encoder = DenseCLIP(tiny_clip.model.visual)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = encoder(images, ReturnsTokens())
        x, _ = encoder.embed(images)
        for block in encoder.blocks[:-1]:
            x = encoder.residual_block(block, x, *encoder.qkv(block, x))
        want = F.normalize(encoder.to_text_space(x[:, 1:]).float(), dim=-1)
    assert torch.equal(out.features, want)
    assert out.grid == (14, 14)
    # ln_post of a zero token is its bias: the [CLS] output goes through the same text-space projection
    torch.testing.assert_close(out.cls, F.normalize(encoder.to_text_space(torch.zeros(1, encoder.width)), dim=-1))
