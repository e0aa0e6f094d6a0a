"""Memory stays bounded on large images: a 4000 x 3000 photo with 21 classes segments in a few GB of RSS.

Crops are run ``batch_size`` at a time, crop logits are upsampled a few crops at a time, and the resize to the
original size + softmax go a few query channels at a time (no full-resolution (Q, H, W) logits), so the peak is
about the (C, H, W) probabilities that are returned plus one channel chunk. The large runs happen in a child
process so that ``getrusage`` measures their peak alone (a bound, not a timing assertion).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import rfclip.inference as inference
from rfclip.inference import InferenceConfig, postprocess
from rfclip.text import TextQueries

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK_RSS_LIMIT_MIB = 8 * 1024

CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import make_clip
    from rfclip.segmenter import Segmenter

    opts = json.loads(sys.argv[1])
    return_probs = opts.pop("return_probs", True)
    seg = Segmenter(make_clip(), method="naclip", device="cpu", text_cache=False, templates=["a photo of a {{}}."],
                    **opts)
    text = seg.encode_classes(";".join(f"class {{i}}" for i in range(21)))
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8), np.ones((100, 100, 1), np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = seg.segment(image, text, return_probs=return_probs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({{"peak_rss_mib": peak / 1024, "before_mib": before / 1024, "mask": list(out.mask.shape),
                      "mask_max": int(out.mask.max()), "classes": len(out.classes),
                      "probs": None if out.probs is None else list(out.probs.shape),
                      "probs_sum_err": None if out.probs is None else float(np.abs(out.probs[:, ::97, ::89].sum(0) - 1).max())}}))
""").format(tests=HERE)


def run_child(**options) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("options", [
    {},  # the protocol: resized to short side 336, probabilities returned at 3000 x 4000
    {"return_probs": False},  # masks only
    {"short_side": None, "return_probs": False},  # full-resolution sliding window: ~900 crops, 64 per forward
], ids=["protocol", "mask-only", "full-res"])
def test_4000x3000_image_stays_within_memory(options):
    out = run_child(**options)
    assert out["mask"] == [3000, 4000] and out["classes"] == 21 and 0 <= out["mask_max"] < 21
    if options.get("return_probs", True):
        assert out["probs"] == [21, 3000, 4000] and out["probs_sum_err"] < 1e-4
    else:
        assert out["probs"] is None
    assert out["peak_rss_mib"] < PEAK_RSS_LIMIT_MIB, out


# ------------------------------------------------------------------------------------ chunked post-processing
def _reference_postprocess(logits, text, cfg, size):
    """The unchunked post-processing: full resize, softmax over queries, max over synonyms, argmax, threshold."""
    full = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    p = (full * cfg.logit_scale).softmax(dim=0)
    C = text.num_classes
    probs = torch.zeros(C, *size).scatter_reduce(0, text.query_class.view(-1, 1, 1).expand_as(p), p, reduce="amax",
                                                 include_self=False)
    best, mask = probs.max(dim=0)
    if cfg.prob_thd > 0:
        mask[best < cfg.prob_thd] = cfg.background_class
    return mask, probs


def _queries(query_class: list[int]) -> TextQueries:
    C = max(query_class) + 1
    names = [f"c{i}" for i in range(C)]
    return TextQueries(torch.zeros(len(query_class), 8), torch.tensor(query_class), names, [[n] for n in names])


@pytest.mark.parametrize("query_class", [list(range(6)), [0, 0, 1, 2, 2, 2, 3]], ids=["plain", "synonyms"])
@pytest.mark.parametrize("budget", [1 << 25, 97 * 131 * 2], ids=["one-chunk", "two-channels-per-chunk"])
@pytest.mark.parametrize("prob_thd", [0.0, 0.3])
def test_chunked_postprocess_equals_unchunked(monkeypatch, query_class, budget, prob_thd):
    monkeypatch.setattr(inference, "_RESIZE_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(query_class), 23, 31, generator=g) * 0.05
    text = _queries(query_class)
    cfg = InferenceConfig(prob_thd=prob_thd)
    size = (97, 131)
    ref_mask, ref_probs = _reference_postprocess(logits, text, cfg, size)
    mask, probs = postprocess(logits, text, cfg, size, return_probs=True)
    torch.testing.assert_close(probs, ref_probs, atol=2e-6, rtol=1e-5)
    assert torch.equal(mask, ref_mask)
    mask_only, none = postprocess(logits, text, cfg, size, return_probs=False)
    assert none is None and torch.equal(mask_only, ref_mask)
    if prob_thd > 0:
        assert (ref_mask == 0).any()  # the threshold is exercised


def test_same_size_postprocess_needs_no_resize():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, 50, generator=g)
    text = _queries(list(range(5)))
    mask, probs = postprocess(logits, text, InferenceConfig(), (40, 50))
    torch.testing.assert_close(probs, (logits * InferenceConfig().logit_scale).softmax(0), atol=1e-6, rtol=1e-5)
    assert torch.equal(mask, logits.argmax(0))


def test_area_threshold_zeroes_small_classes():
    probs = torch.zeros(4, 10, 10)
    probs[0] = 0.5
    probs[1, :, :6] = 1.0  # 60 pixels
    probs[2, :, 6:] = 1.0  # 39 pixels
    probs[3, 9, 9] = 2.0  # 1 pixel
    out = inference.suppress_small_areas(probs.clone(), area_thd=0.1)
    assert out[3].abs().sum() == 0 and torch.equal(out[1], probs[1]) and torch.equal(out[2], probs[2])
    assert torch.equal(out[0], probs[0])  # the background class is never suppressed
