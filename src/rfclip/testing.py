"""Helpers for tests, benchmarks and demos with random weights: planting RF-CLIP's distraction tokens.

A random CLIP has no over-activated channels, so RF-CLIP's distractor localization (eq. 6) never fires and none of
its code paths run. Real OpenAI weights have such tokens in almost every image, in every layer: a few MLPs write
massive activations into the same few channels (the distraction dims) of low-information patches, and those tokens
soak up attention. :func:`plant_distraction_tokens` builds that mechanism into a copy of a random model's weights,
so that it survives saving to any checkpoint format and runs through every code path exactly like real weights:

* a **marker**: the chosen patch positions get a large value in one *marker channel* of the positional embedding
  (a channel outside the distraction dims, so RF-CLIP's paper filter never touches it), and a smaller one in the
  distraction dims, so that layer 0's input has distraction tokens too;
* in **every block**, two hidden units of the MLP form a saturating ramp on the marker channel of ``ln_2(x)``:
  tokens whose normalised marker exceeds ``threshold`` get ``strength`` added to every distraction dim and
  ``marker_gain`` to the marker channel (which keeps the marker dominant after LayerNorm). Because the ramp
  saturates, each block adds a fixed amount whatever the token's history: after RF-CLIP's embedding filter has
  smoothed a token's distraction dims, the next block over-activates them again, as real weights do;
* optionally (``sink_logit``), every query attends more to marked tokens (a rank-1 change of the query bias and
  the key weights in every block), so the tokens are also attention sinks (ViT-L/14's attention condition).

Other tokens are untouched up to the two repurposed hidden units per block (a random network's units, so the
rest of the model stays a random model). The marker sits at fixed grid positions of the *native* grid; at other
input sizes the positional embedding is interpolated and the marker spreads over the neighbouring positions.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import RfclipError

__all__ = ["plant_distraction_tokens", "planted_token_mask"]


def _marker_channel(width: int, dims: Sequence[int]) -> int:
    """The highest channel index that is not a distraction dim."""
    taken = set(int(d) for d in dims)
    for c in range(width - 1, -1, -1):
        if c not in taken:
            return c
    raise RfclipError("every channel is a distraction dim; leave at least one channel out")


@torch.no_grad()
def _plant_block(block: nn.Module, dims: Tensor, marker: int, strength: float, marker_gain: float,
                 threshold: float, ramp: float, sink_logit: float, num_heads: int) -> None:
    mlp = block.mlp
    fc, proj = mlp.c_fc, mlp.c_proj
    hidden = fc.weight.shape[0]
    u1, u2 = hidden - 1, hidden - 2  # two repurposed hidden units form the ramp act(p) - act(p - g * ramp)
    gamma = float(block.ln_2.weight[marker]) if block.ln_2.weight is not None else 1.0
    beta = float(block.ln_2.bias[marker]) if block.ln_2.bias is not None else 0.0
    if abs(gamma) < 1e-6:
        raise RfclipError("ln_2 of a block has a zero weight on the marker channel; choose another marker_channel")
    gain = 40.0 / ramp  # steep: act(p) is in its linear range once the ramp is entered
    for unit, shift in ((u1, 0.0), (u2, gain * ramp)):
        fc.weight[unit].zero_()
        fc.weight[unit, marker] = gain / gamma  # reads the normalised marker z = (ln_2(x)[m] - beta) / gamma
        fc.bias[unit] = -gain * beta / gamma - gain * threshold - shift
    top = gain * ramp  # the ramp's saturated output
    proj.weight[:, u1].zero_()
    proj.weight[:, u2].zero_()
    proj.weight[dims, u1] = strength / top
    proj.weight[dims, u2] = -strength / top
    proj.weight[marker, u1] = marker_gain / top
    proj.weight[marker, u2] = -marker_gain / top
    if sink_logit:
        # Every query gets a unit component along a per-head direction; marked tokens' keys get a large one along
        # it (their normalised marker is >= threshold), so q.k grows by about sink_logit for marked keys.
        attn = block.attn
        width = attn.in_proj_weight.shape[1]
        gamma1 = float(block.ln_1.weight[marker]) if block.ln_1.weight is not None else 1.0
        head_dim = width // num_heads
        direction = torch.zeros(width)
        direction[0::head_dim] = 1.0  # the first channel of every head's subspace
        direction = direction.to(attn.in_proj_weight)
        q_bias = attn.in_proj_bias[:width]
        k_weight = attn.in_proj_weight[width:2 * width]
        scale = math.sqrt(head_dim)  # undo the 1/sqrt(dh) of the attention
        q_bias += direction * math.sqrt(sink_logit * scale)
        k_weight[:, marker] += direction * math.sqrt(sink_logit * scale) / (gamma1 * max(threshold, 1.0))



def plant_distraction_tokens(clip, tokens: Iterable[int], dims: Sequence[int] | None = None, *,
                             strength: float | None = None, marker_gain: float | None = None,
                             marker_channel: int | None = None, threshold: float | None = None,
                             sink_logit: float = 0.0, layers: Iterable[int] | None = None):
    """A copy of ``clip`` (:class:`rfclip.models.ClipModel`) whose patch tokens ``tokens`` are distraction tokens
    in every layer (see the module docstring for the mechanism).

    Args:
        clip: a loaded model (normally :func:`rfclip.models.random_clip`); it is not changed.
        tokens: patch indices (0-based, raster order) on the model's native grid (14 x 14 for ViT-B/16 at 224).
        dims: the distraction dims to over-activate; default the model's built-in RF-CLIP dims when it has them.
        strength: value added to each distraction dim by every block; default ``2 * sqrt(width)`` (the token's
            distraction-dim weight is then several times ``tau = 5 / width``).
        marker_gain: value added to the marker channel by every block; default ``strength``.
        marker_channel: the marker channel; default the highest channel that is not a distraction dim.
        threshold: normalised-marker level above which a block fires; default ``min(4, sqrt(width) / 2)`` (an
            unmarked token's normalised channel is about N(0, 1)).
        sink_logit: extra attention logit every query gives marked tokens, in every block (0: off).
        layers: blocks that re-create the over-activation (0-based); default all.

    Returns:
        A new :class:`rfclip.models.ClipModel` (same name and tokenizer; ``weights_id`` marks the planting, so
        caches keyed by the model identity never mix it up with the original).
    """
    visual = clip.model.visual
    blocks = list(visual.transformer.resblocks)
    width = int(visual.positional_embedding.shape[1])
    if dims is None:
        from .distraction_dims import builtin_dims

        dims = builtin_dims(clip)
        if dims is None:
            raise RfclipError("no built-in distraction dims for this model; pass dims=[...] to plant_distraction_tokens")
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 0 or dims[-1] >= width:
        raise RfclipError(f"distraction dims {dims} out of range for width {width}")
    tokens = sorted({int(t) for t in tokens})
    num_patches = visual.positional_embedding.shape[0] - 1
    if not tokens or tokens[0] < 0 or tokens[-1] >= num_patches:
        raise RfclipError(f"token indices {tokens} out of range for {num_patches} patches on the native grid")
    marker = _marker_channel(width, dims) if marker_channel is None else int(marker_channel)
    if marker in dims or not 0 <= marker < width:
        raise RfclipError(f"marker_channel {marker} must be a channel outside the distraction dims")
    strength = 2.0 * math.sqrt(width) if strength is None else float(strength)
    marker_gain = strength if marker_gain is None else float(marker_gain)
    threshold = min(4.0, math.sqrt(width) / 2.0) if threshold is None else float(threshold)
    chosen = range(len(blocks)) if layers is None else sorted({int(i) % len(blocks) for i in layers})
    num_heads = int(getattr(blocks[0].attn, "num_heads"))

    planted = copy.deepcopy(clip)
    pv = planted.model.visual
    with torch.no_grad():
        pos = pv.positional_embedding
        rows = [1 + t for t in tokens]
        big = 100.0 * float(pos.abs().max()) + 100.0  # dominates ln_pre's input, so layer 0 sees the marker too
        pos[rows, marker] += big
        for d in dims:  # and layer 0's input its distraction dims (the blocks re-create them from layer 1 on)
            pos[rows, d] += big / (2.0 * math.sqrt(len(dims)))
        dims_t = torch.tensor(dims, dtype=torch.long)
        for i in chosen:
            _plant_block(pv.transformer.resblocks[i], dims_t, marker, strength, marker_gain, threshold,
                         0.25 * threshold, float(sink_logit), num_heads)
    planted.weights_id = (f"{clip.identity}|planted:tokens={','.join(map(str, tokens))};dims="
                          f"{','.join(map(str, dims))};s={strength:g};m={marker};sink={sink_logit:g}")
    return planted


def planted_token_mask(grid: tuple[int, int], tokens: Iterable[int], native: tuple[int, int] | None = None):
    """(h*w,) bool mask of the planted tokens on ``grid`` (only meaningful when ``grid`` is the native grid)."""
    if native is not None and tuple(native) != tuple(grid):
        raise RfclipError("planted token indices refer to the native grid; run the model at its native input size")
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    mask[list(tokens)] = True
    return mask
