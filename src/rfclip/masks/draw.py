"""A region map drawn over its image: one colour per region, region boundaries in white, 0 (not segmented) left as
the image is."""

from __future__ import annotations

import numpy as np
from PIL import Image


def region_colours(n: int, seed: int = 0) -> np.ndarray:
    """(n + 1, 3) uint8 colours: index 0 unused (not segmented), then bright colours in a fixed random order."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 256, size=(n + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def region_boundaries(region_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour is in another region."""
    edge = np.zeros(region_map.shape, dtype=bool)
    edge[:, :-1] |= region_map[:, :-1] != region_map[:, 1:]
    edge[:-1, :] |= region_map[:-1, :] != region_map[1:, :]
    return edge


def draw_regions(image: np.ndarray, region_map: np.ndarray, alpha: float = 0.5, boundaries: bool = True) -> Image.Image:
    """``image`` (H, W, 3) uint8 with each region k > 0 tinted in its colour and, with ``boundaries``, the borders
    between regions in white."""
    ids, dense = np.unique(region_map, return_inverse=True)  # colours by rank: any ids, few colours
    dense = dense.reshape(region_map.shape)
    colours = region_colours(len(ids))[dense + 1]
    out = image.astype(np.float32)
    segmented = region_map > 0
    out[segmented] = (1 - alpha) * out[segmented] + alpha * colours[segmented]
    if boundaries:
        out[region_boundaries(region_map)] = 255
    return Image.fromarray(out.round().astype(np.uint8))
