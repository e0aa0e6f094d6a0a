"""Shared fixtures: small random-weight CLIP models (no downloads; random weights test mechanics, not accuracy)."""

from __future__ import annotations

import numpy as np
import pytest

from rfclip.models.loading import random_clip

TINY_CFG = dict(
    embed_dim=32,
    quick_gelu=True,
    vision_cfg=dict(image_size=224, layers=3, width=64, head_width=16, patch_size=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)


def make_clip(cfg: dict = TINY_CFG, seed: int = 0):
    """A random CLIP (tiny by default) as an rfclip ``ClipModel``."""
    return random_clip(cfg, quick_gelu=cfg.get("quick_gelu", True), seed=seed)


def voc_palette() -> list[int]:
    """The VOC colour map: index i is not grey, so a palette -> RGB conversion would change the values."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


@pytest.fixture(scope="session")
def tiny_clip():
    return make_clip()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def random_image(rng):
    return rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
