"""Shared fixtures: small random-weight CLIP models (no downloads; random weights test mechanics, not accuracy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open_clip
import pytest
import torch

TINY_CFG = dict(
    embed_dim=32,
    quick_gelu=True,
    vision_cfg=dict(image_size=224, layers=3, width=64, head_width=16, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)


@dataclass
class _TestClip:
    model: object
    tokenizer: object
    name: str = "tiny-test"
    pretrained: str | None = None
    source: str = "random"
    quick_gelu: bool = True

    @property
    def identity(self) -> str:
        return f"{self.name}-{id(self.model)}"


def make_clip(cfg: dict = TINY_CFG, seed: int = 0):
    """A random CLIP (tiny by default) wrapped like rfclip.models.ClipModel."""
    try:
        from rfclip.models.loading import random_clip
    except ImportError:  # model loading not available: build it here
        random_clip = None
    if random_clip is not None:
        return random_clip(cfg, quick_gelu=cfg.get("quick_gelu", True), seed=seed)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return _TestClip(model, open_clip.get_tokenizer("ViT-B-16"))


@pytest.fixture(scope="session")
def tiny_clip():
    return make_clip()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def random_image(rng):
    return rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
