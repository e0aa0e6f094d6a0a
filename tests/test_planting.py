"""rfclip.testing.plant_distraction_tokens: planted tokens are RF-CLIP distraction tokens in every layer, and
nothing else changes beyond the mechanism (random weights: mechanics only)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_clip
from rfclip.dense import DenseCLIP
from rfclip.errors import RfclipError
from rfclip.methods import build_method
from rfclip.models.loading import random_clip
from rfclip.testing import plant_distraction_tokens

TINY_DIMS = (5, 20, 41)
TOKENS = [3, 50, 100, 150]


def detected_per_layer(clip, dims, method="rfclip", size=224, **options):
    enc = DenseCLIP(clip.model.visual)
    rec: dict = {}
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        enc(images, build_method(method, distraction_dims=dims, **options), record=rec)
    return [rec[f"rf.L{layer}.dis"][0] for layer in range(enc.num_layers)], rec


@pytest.mark.parametrize("method", ["rfclip", "rfclip_code_embed"])
def test_planted_tokens_are_distraction_tokens_in_every_layer(tiny_clip, method):
    before, _ = detected_per_layer(tiny_clip, TINY_DIMS, method)
    assert not any(bool(d.any()) for d in before)  # a random model has none
    planted = plant_distraction_tokens(tiny_clip, TOKENS, TINY_DIMS)
    after, _ = detected_per_layer(planted, TINY_DIMS, method)
    for layer, dis in enumerate(after):  # (B, N): exactly the planted tokens, in every crop and layer
        expected = torch.zeros_like(dis)
        expected[:, TOKENS] = True
        assert torch.equal(dis, expected), f"layer {layer}"


def test_vitb16_geometry_every_layer_and_sinks():
    clip = random_clip("ViT-B-16")
    dims = (4, 162, 189, 326, 429, 474, 633, 713)
    planted = plant_distraction_tokens(clip, TOKENS, dims, sink_logit=4.0)
    per_layer, rec = detected_per_layer(planted, dims)
    assert all(bool(d[:, TOKENS].all()) and int(d.sum()) == 2 * len(TOKENS) for d in per_layer)
    attn = rec["rf.L6.attn"][0][:, 1:, 1:]  # (B, N, N) head-mean attention before redistribution
    received = attn.mean(1)  # mean attention each patch receives
    others = torch.ones(received.shape[-1], dtype=torch.bool)
    others[TOKENS] = False
    assert float(received[:, TOKENS].min()) > 10 * float(received[:, others].mean())


def test_original_unchanged_and_identity_marked(tiny_clip):
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    planted = plant_distraction_tokens(tiny_clip, [0], TINY_DIMS)
    assert all(torch.equal(v, tiny_clip.model.state_dict()[k]) for k, v in state.items())
    assert planted.identity != tiny_clip.identity and "planted" in planted.identity
    changed = [k for k, v in planted.model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed and all(k.startswith("visual.") for k in changed)


def test_bad_arguments(tiny_clip):
    with pytest.raises(RfclipError, match="out of range"):
        plant_distraction_tokens(tiny_clip, [1000], TINY_DIMS)
    with pytest.raises(RfclipError, match="out of range"):
        plant_distraction_tokens(tiny_clip, [1], [64])
    with pytest.raises(RfclipError, match="no built-in distraction dims"):
        plant_distraction_tokens(make_clip(), [1])
    with pytest.raises(RfclipError, match="marker_channel"):
        plant_distraction_tokens(tiny_clip, [1], TINY_DIMS, marker_channel=5)
