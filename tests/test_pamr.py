"""PAMR against slow, straightforward references (protocol §7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfclip.constants import PAMR_DILATIONS, PAMR_STEPS
from rfclip.pamr import pamr, pamr_weights


def _clamp(v: int, n: int) -> int:
    return min(max(v, 0), n - 1)


def _loop_reference(image: np.ndarray, mask: np.ndarray, num_iter: int, dilations) -> np.ndarray:
    """PAMR with explicit loops over pixels and neighbours, float64. image (K,H,W), mask (Q,H,W) same size."""
    k, h, w = image.shape
    neigh = []
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    neigh.append((dy, dx))
    weights = np.zeros((h, w, len(neigh)))
    for y in range(h):
        for x in range(w):
            aff = np.zeros(len(neigh))
            for c in range(k):
                vals = []
                for d in dilations:
                    for dy in (-d, 0, d):
                        for dx in (-d, 0, d):
                            vals.append(image[c, _clamp(y + dy, h), _clamp(x + dx, w)])
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                for j, (dy, dx) in enumerate(neigh):
                    diff = abs(image[c, y, x] - image[c, _clamp(y + dy, h), _clamp(x + dx, w)])
                    aff[j] += -diff / (1e-8 + 0.1 * std) / k
            e = np.exp(aff - aff.max())
            weights[y, x] = e / e.sum()
    m = mask.astype(np.float64).copy()
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for j, (dy, dx) in enumerate(neigh):
                    new[:, y, x] += weights[y, x, j] * m[:, _clamp(y + dy, h), _clamp(x + dx, w)]
        m = new
    return m


def _module_reference(x: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations) -> torch.Tensor:
    """The 1-stage-wseg PAMR module, re-typed: conv2d stencils, std over dim 2, mean over channels."""

    def stencil(t, kernel):
        b, k, h, w = t.shape
        t = t.reshape(b * k, 1, h, w)
        outs = [F.conv2d(F.pad(t, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).view(b, k, -1, h, w)

    diff_k = torch.zeros(8, 1, 3, 3, dtype=x.dtype)
    copy_k = torch.zeros(8, 1, 3, 3, dtype=x.dtype)
    std_k = torch.zeros(9, 1, 3, 3, dtype=x.dtype)
    idx = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]
    for i, (r, c) in enumerate(idx):
        diff_k[i, 0, 1, 1] = 1
        diff_k[i, 0, r, c] = -1
        copy_k[i, 0, r, c] = 1
    for i in range(9):
        std_k[i, 0, i // 3, i % 3] = 1
    mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=True)
    x_std = stencil(x, std_k).std(2, keepdim=True)
    a = -stencil(x, diff_k).abs() / (1e-8 + 0.1 * x_std)
    a = F.softmax(a.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        mask = (stencil(mask, copy_k) * a).sum(2)
    return mask


def test_constants():
    assert PAMR_STEPS == 10
    assert tuple(PAMR_DILATIONS) == (8, 16)


def test_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 2, 12, 13, generator=g, dtype=torch.float64)
    logits = torch.randn(1, 3, 12, 13, generator=g, dtype=torch.float64)
    got = pamr(image, logits, num_iter=3, dilations=(1, 2))
    assert got.dtype == torch.float64 and got.shape == (1, 3, 12, 13)
    ref = _loop_reference(image[0].numpy(), logits[0].numpy(), 3, (1, 2))
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-5, rtol=0)


def test_matches_loop_reference_fp32_larger_dilation():
    # Dilation larger than the image: replicate padding clamps every neighbour to the border.
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 9, 7, generator=g)
    logits = torch.randn(1, 2, 9, 7, generator=g)
    got = pamr(image, logits, num_iter=2, dilations=(3, 8))
    ref = _loop_reference(image[0].double().numpy(), logits[0].double().numpy(), 2, (3, 8))
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-5, rtol=0)


def test_matches_module_reference_with_resize():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 40, 33, generator=g)
    logits = torch.randn(2, 5, 10, 9, generator=g)
    got = pamr(image, logits)  # defaults: 10 steps, dilations (8, 16)
    ref = _module_reference(image, logits, PAMR_STEPS, PAMR_DILATIONS)
    assert got.shape == (2, 5, 40, 33)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_weights_are_a_distribution():
    g = torch.Generator().manual_seed(3)
    w = pamr_weights(torch.randn(3, 20, 17, generator=g), (2, 4))
    assert w.shape == (16, 20, 17)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones(20, 17))


def test_constant_logits_stay_constant():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 15, 16, generator=g)
    logits = torch.full((1, 4, 15, 16), 0.0)
    logits += torch.tensor([0.3, -1.0, 2.5, 0.0]).view(1, 4, 1, 1)
    out = pamr(image, logits, num_iter=5, dilations=(1, 3))
    torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)


def test_uniform_image_gives_uniform_weights():
    image = torch.full((1, 3, 10, 11), 0.7)
    w = pamr_weights(image[0], (1, 2))
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / 16))
    # Then PAMR is a pure smoothing: one step is the mean of the 16 (replicate-padded) neighbours.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, 10, 11, generator=g)
    out = pamr(image, logits, num_iter=1, dilations=(1, 2))
    p = F.pad(logits, [2] * 4, mode="replicate")
    expect = torch.zeros_like(logits)
    for d in (1, 2):
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    expect += p[..., 2 + dy : 2 + dy + 10, 2 + dx : 2 + dx + 11] / 16
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunking_is_exact(chunk):
    g = torch.Generator().manual_seed(6)
    image = torch.randn(1, 3, 24, 21, generator=g)
    logits = torch.randn(1, 7, 12, 11, generator=g)
    full = pamr(image, logits, num_iter=4, dilations=(2, 4), channel_chunk=64)
    chunked = pamr(image, logits, num_iter=4, dilations=(2, 4), channel_chunk=chunk)
    assert torch.equal(full, chunked)


def test_batch_equals_per_image():
    g = torch.Generator().manual_seed(7)
    image = torch.randn(3, 3, 18, 14, generator=g)
    logits = torch.randn(3, 4, 18, 14, generator=g)
    out = pamr(image, logits, num_iter=3, dilations=(1, 2))
    for i in range(3):
        one = pamr(image[i : i + 1], logits[i : i + 1], num_iter=3, dilations=(1, 2))
        assert torch.equal(out[i : i + 1], one)
    # Different guidance images give different results.
    assert not torch.allclose(out[0], pamr(image[1:2], logits[0:1], num_iter=3, dilations=(1, 2))[0])


def test_dtype_preserved_bf16():
    g = torch.Generator().manual_seed(8)
    image = torch.randn(1, 3, 32, 30, generator=g).bfloat16()
    logits = torch.randn(1, 3, 8, 8, generator=g).bfloat16()
    out = pamr(image, logits)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 32, 30)
    assert torch.isfinite(out.float()).all()
    ref = pamr(image.float(), logits.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_fp16_logits_fp32_image():
    g = torch.Generator().manual_seed(9)
    image = torch.randn(1, 3, 16, 16, generator=g)
    logits = torch.randn(1, 2, 16, 16, generator=g).half()
    out = pamr(image, logits, num_iter=2, dilations=(1, 2))
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()


def test_zero_iterations_is_resize_only():
    g = torch.Generator().manual_seed(10)
    image = torch.randn(1, 3, 20, 20, generator=g)
    logits = torch.randn(1, 2, 5, 5, generator=g)
    out = pamr(image, logits, num_iter=0)
    expect = F.interpolate(logits, size=(20, 20), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expect)


def test_bad_shapes():
    with pytest.raises(ValueError):
        pamr(torch.zeros(3, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError):
        pamr(torch.zeros(2, 3, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8), channel_chunk=0)
    with pytest.raises(ValueError, match="dilations"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8), dilations=())
