"""Explicit attention maps are computed from fp32 logits whatever the autocast state.

Under ``torch.autocast`` a matmul re-casts its inputs to the autocast dtype, so ``q.float() @ k.float().T`` alone
still rounds the logits to bf16/fp16. Every hook that returns or keeps an explicit map (every method's last block,
the key-key sums of ``kk`` and RF-CLIP, RF-CLIP's redistributed attention in every layer, the FSA ensemble,
ProxyCLIP's proxy attention) is run here twice on the same q, k, v: once in fp32 without autocast and once under
CPU bf16 / fp16 autocast. The maps must agree to 1e-5.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import make_clip
from rfclip.dense import DenseCLIP, ForwardContext, softmax_attention
from rfclip.methods import build_method
from rfclip.methods.proxyclip import proxy_attention

DTYPES = [torch.bfloat16, torch.float16]
TINY_DIMS = (5, 20, 41)
GRID = (4, 5)


def amp(dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_attention_is_fp32_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    q, k = 3 * torch.randn(2, 4, 21, 16, generator=g), 3 * torch.randn(2, 4, 21, 16, generator=g)
    bias = torch.randn(21, 21, generator=g)
    ref = torch.softmax(0.25 * q.double() @ k.double().transpose(-1, -2) + bias.double(), dim=-1)
    with amp(dtype):
        got = softmax_attention(q, k, 0.25, bias=bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    # half-precision inputs (what autocast's linear layers produce): the map of exactly those values, in fp32
    qh, kh = q.to(dtype), k.to(dtype)
    ref_h = torch.softmax(0.25 * qh.double() @ kh.double().transpose(-1, -2), dim=-1)
    with amp(dtype):
        got_h = softmax_attention(qh, kh, 0.25)
    torch.testing.assert_close(got_h.double(), ref_h, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_proxy_attention_is_fp32_under_autocast(dtype):
    feats = torch.randn(2, 30, 24, generator=torch.Generator().manual_seed(1))
    ref = proxy_attention(feats)
    with amp(dtype):
        got = proxy_attention(feats)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def hook_maps(method, enc: DenseCLIP, qkv, x_in, dtype, text=None):
    """Run a method's hooks over given per-layer (q, k, v) and inputs; return every explicit map they produce."""
    B = x_in.shape[0]
    images = torch.zeros(B, 3, GRID[0] * 16, GRID[1] * 16)
    ctx = ForwardContext(encoder=enc, images=images, grid=GRID, text_features=text)
    maps = []
    with amp(dtype):
        method.begin(ctx)
        for layer, (q, k, v) in enumerate(qkv):
            method.layer_input(ctx, layer, x_in)
            if layer < len(qkv) - 1:
                A = method.attention(ctx, layer, q, k, v)
                if A is not None:
                    maps.append(A)
            else:
                maps.append(method.final_attention(ctx, q, k, v).weights)
    return maps


@pytest.fixture(scope="module")
def tiny_encoder():
    return DenseCLIP(make_clip().model.visual)


def random_qkv(enc: DenseCLIP, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = 1 + GRID[0] * GRID[1]
    shape = (B, enc.num_heads, T, enc.head_dim)
    return [tuple(2 * torch.randn(shape, generator=g) for _ in range(3)) for _ in range(enc.num_layers)]


def planted_input(enc: DenseCLIP, B: int, tokens=(3, 11), seed: int = 0) -> torch.Tensor:
    """A residual stream whose ``tokens`` over-activate a distraction dim (detected in every layer)."""
    x = torch.randn(B, 1 + GRID[0] * GRID[1], enc.width, generator=torch.Generator().manual_seed(seed))
    x[:, [1 + t for t in tokens], TINY_DIMS[1]] += 60.0
    return x


METHOD_CASES = [
    ("naclip", {}),
    ("kk", {"layer_average": True}),
    ("sclip", {}),
    ("clearclip", {}),
    ("rfclip", {"distraction_dims": TINY_DIMS}),
    ("rfclip", {"distraction_dims": TINY_DIMS, "redistribute_proxy": True, "defocus_sim": "qk_avg"}),
    ("rfclip", {"distraction_dims": TINY_DIMS, "fg_rule": "less_attended", "defocus_sim_heads": "per_head",
                "proxy_attn": "qq_plus_kk_last"}),
    ("rfclip", {"distraction_dims": TINY_DIMS, "suppress_mode": "mask", "attn_redistribution": False}),
    ("naclip+fsa", {}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec,options", METHOD_CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(METHOD_CASES)])
def test_every_methods_explicit_maps_are_fp32_under_autocast(tiny_encoder, spec, options, dtype):
    enc = tiny_encoder
    B = 2
    qkv = random_qkv(enc, B)
    x_in = planted_input(enc, B)
    text = F.normalize(torch.randn(5, enc.visual.output_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    ref = hook_maps(build_method(spec, **options), enc, qkv, x_in, None, text)
    got = hook_maps(build_method(spec, **options), enc, qkv, x_in, dtype, text)
    assert len(ref) == len(got) >= 1
    if spec == "rfclip":  # the distraction tokens are found in every layer: one redistributed map per layer
        assert len(ref) == enc.num_layers
    for a, b in zip(ref, got):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
