"""The dense CLIP ViT forward, written once, with a small per-layer hook interface.

Every segmentation method in rfclip (vanilla CLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP, RF-CLIP, FSA, ProxyCLIP)
is a set of hooks that this forward calls; no method copies it. The forward runs over the weights of an
open_clip ``VisionTransformer`` and returns one L2-normalised feature per patch, projected into the text space.

Per residual layer ``l`` (0-based) the forward does::

    x = hooks.layer_input(ctx, l, x)          # read / change the residual stream entering the layer
    q, k, v = qkv(ln_1(x))                     # (B, H, T, dh) each, T = 1 + N tokens (CLS first)
    A = hooks.attention(ctx, l, q, k, v)       # (B, H, T, T) weights, or None for plain softmax attention
    x = x + ls_1(out_proj(A @ v))              # standard pre-LN block
    x = x + ls_2(mlp(ln_2(x)))

In the last layer a method either returns the final tokens itself (``hooks.final_tokens``: patch tokens in the
residual width and the [CLS] token, for last layers that are not one attention, such as the released RF-CLIP
code's two decodings) or, by default, ``hooks.final_attention`` decides the attention, the values (possibly on
another token grid, as ProxyCLIP does) and whether the residual and FFN are kept. The final tokens then go through
``ln_post`` and ``proj`` (only ``proj`` for tokens a method already put through ``ln_post``: CorrCLIP sums three
branches after it). Methods that use region masks read each crop's region map from ``ctx.regions``. When an attention hook returns ``None`` the forward uses ``scaled_dot_product_attention``
so that methods that do not need the attention matrix get flash/SDPA kernels on GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import RfclipError


@dataclass
class FinalAttention:
    """What the last layer attends with.

    ``weights`` may be ``None`` (plain softmax attention through SDPA). ``values`` defaults to the layer's own
    ``v``. A method that moves to another token grid (ProxyCLIP: the VFM grid, no CLS token) sets ``values``,
    ``grid`` and ``has_cls=False``; the residual/FFN can only be kept on the CLIP token grid.
    """

    weights: Tensor | None  # (B, H or 1, T', T') row-stochastic (SCLIP: rows sum to 2)
    values: Tensor | None = None  # (B, H, T', dh)
    keep_residual: bool = False  # True: y = x + O(A), y = y + FFN(y); False: y = O(A) (ClearCLIP's "reduced" block)
    grid: tuple[int, int] | None = None  # patch grid of the output tokens when it differs from the CLIP grid
    has_cls: bool = True  # whether token 0 of the output is the CLS token


class FinalTokens(NamedTuple):
    """The last layer's output tokens in the residual width, before ``ln_post`` and ``proj``."""

    patches: Tensor | None  # (B, N', C) patch tokens in raster order over ``grid``; None: [CLS] only (ctx.cls_only)
    cls: Tensor | None = None  # (B, C) the [CLS] token, None when the output grid has none
    grid: tuple[int, int] | None = None  # patch grid of ``patches`` when it differs from the CLIP grid
    after_ln_post: bool = False  # True: ``patches`` already went through ``ln_post`` (CorrCLIP sums three branches
    #                              after it); the forward then only applies ``proj``


class DenseOutput(NamedTuple):
    """What :meth:`DenseCLIP.forward` returns."""

    features: Tensor | None  # (B, h*w, D) L2-normalised patch embeddings in the text space, fp32; None with cls_only
    grid: tuple[int, int]  # (h, w) grid of ``features`` (the CLIP grid, or the method's own, e.g. ProxyCLIP's)
    cls: Tensor | None  # (B, D) L2-normalised [CLS] embedding of the final tokens, fp32; None without a [CLS] token


@dataclass
class ForwardContext:
    """Per-forward state shared between the dense forward and a method's hooks."""

    encoder: "DenseCLIP"
    images: Tensor  # (B, 3, H, W) CLIP-normalised crops
    grid: tuple[int, int]  # (h, w) patch grid of the CLIP tokens
    text_features: Tensor | None = None  # (Q, D) L2-normalised query embeddings (FSA needs them inside the forward)
    store: dict[str, Any] = field(default_factory=dict)  # scratch space for the method (e.g. key-key maps)
    record: dict[str, Any] | None = None  # diagnostics requested by `rfclip explain`; None = record nothing
    cls_only: bool = False  # only the [CLS] output is needed: a method may skip work done for the patch features
    regions: Tensor | None = None  # (B, H, W) int64 region map of each crop (mask-tier methods), padding included

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def num_heads(self) -> int:
        return self.encoder.num_heads

    @property
    def width(self) -> int:
        return self.encoder.width

    @property
    def scale(self) -> float:
        """Attention scale 1/sqrt(head dim)."""
        return self.encoder.head_dim ** -0.5

    def attention_output(self, weights: Tensor, values: Tensor) -> Tensor:
        """``out_proj(concat_h(A_h V_h))`` of the last block, bias included. Returns (B, T', C)."""
        return self.encoder.attention_output(self.encoder.blocks[-1], weights, values)

    def to_text_space(self, y: Tensor) -> Tensor:
        """``normalize(ln_post(y) @ proj)`` for tokens ``y`` (…, C) -> (…, D)."""
        return F.normalize(self.encoder.to_text_space(y), dim=-1)

    def log(self, key: str, value: Tensor) -> None:
        """Record a diagnostic tensor (detached, on CPU, fp32) when recording is switched on."""
        if self.record is not None:
            self.record.setdefault(key, []).append(value.detach().float().cpu())


class Hooks:
    """The per-layer hook interface of :meth:`DenseCLIP.forward`. The defaults are vanilla CLIP.

    Methods (:class:`rfclip.methods.Method`) subclass this; the forward only ever calls these hooks, so it never
    needs to know which method runs.
    """

    reduced_last_block: bool = False  # drop the last block's residual and FFN (ClearCLIP's finding)

    def begin(self, ctx: "ForwardContext") -> None:
        """Called at the start of every forward."""

    def layer_input(self, ctx: "ForwardContext", layer: int, x: Tensor) -> Tensor:
        """The residual stream entering ``layer``: x (B, 1+N, C), pre-LN. Return it (changed or not)."""
        return x

    def attention(self, ctx: "ForwardContext", layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """Attention weights (B, H, T, T) of ``layer``, or None for CLIP's own softmax(q k^T / sqrt(dh))."""
        return None

    def final_tokens(self, ctx: "ForwardContext", x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> FinalTokens | None:
        """The last layer's output computed by the method itself, from its input x (B, 1+N, C) and the last block's
        q, k, v of x; or None (default) for the last block with :meth:`final_attention`."""
        return None

    def final_attention(self, ctx: "ForwardContext", q: Tensor, k: Tensor, v: Tensor) -> FinalAttention:
        """How the last block attends. Default: this method's ``attention`` on the last layer."""
        weights = self.attention(ctx, ctx.num_layers - 1, q, k, v)
        return FinalAttention(weights=weights, keep_residual=not self.reduced_last_block)

    @property
    def needs_text_in_forward(self) -> bool:
        """True when the forward needs the text embeddings (FSA's feedback)."""
        return False


def no_autocast(device: torch.device):
    """A context in which matmuls run in their inputs' own dtype (fp32 here) even inside ``torch.autocast``.

    Casting inputs with ``.float()`` is not enough under autocast: autocast re-casts each matmul's inputs to the
    autocast dtype, so the product would be rounded to bf16/fp16 anyway.
    """
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def softmax_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """``softmax(scale * q k^T + bias)`` over the last axis from fp32 logits, also under autocast. Returns
    (B, H, T, T) fp32 (the forward casts it to the values' dtype for ``A @ V``).

    Every explicit attention map of every method comes from here: under bf16 autocast the logits would otherwise be
    rounded to 8 mantissa bits before the softmax (attention weights off by up to 0.05 absolute on random ViT-B/16
    maps), which would change the key-key averages, RF-CLIP's graph cut and its redistributed attention.
    """
    with no_autocast(q.device):
        logits = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))  # scaling q: one (T, d) pass, not (T, T)
        if bias is not None:
            logits = logits + bias.float()
        if logits.device.type == "cpu" and not logits.requires_grad and not torch.compiler.is_compiling():
            return torch.softmax(logits, dim=-1, out=logits)  # in place, the same values: no second (B, H, T, T) buffer
        return logits.softmax(dim=-1)


# What the forward uses of each block's attention module. Checked by ability, not class: open_clip's own
# ``Attention`` (its development branch uses it instead of ``nn.MultiheadAttention``) has these but no ``embed_dim``.
ATTENTION_ATTRIBUTES = ("in_proj_weight", "in_proj_bias", "out_proj", "num_heads")


def vit_width(visual: nn.Module) -> int:
    """Residual width of a ViT image encoder: ``visual.transformer.width``, else the in-projection's input size."""
    width = getattr(visual.transformer, "width", None)
    if width is None:
        width = visual.transformer.resblocks[0].attn.in_proj_weight.shape[1]
    return int(width)


def attention_problem(visual: nn.Module) -> str | None:
    """Why the blocks of ``visual.transformer`` cannot run in :class:`DenseCLIP`, or None when they can: every
    block needs ``ln_1``, ``ln_2``, ``mlp``, ``ls_1``, ``ls_2`` and an ``attn`` with a packed q/k/v in-projection
    (``in_proj_weight`` (3C, C), ``in_proj_bias`` or None), an ``out_proj`` and ``num_heads`` dividing the width."""
    blocks = list(getattr(getattr(visual, "transformer", None), "resblocks", None) or [])
    if not blocks:
        return "no transformer.resblocks"
    missing = [name for name in ("attn", "ln_1", "ln_2", "mlp", "ls_1", "ls_2") if not hasattr(blocks[0], name)]
    if missing:
        return f"block {type(blocks[0]).__name__} lacks {', '.join(missing)}"
    for i, block in enumerate(blocks):
        attn = block.attn
        missing = [name for name in ATTENTION_ATTRIBUTES  # a q/k/v bias may be None (no bias), but must exist
                   if not hasattr(attn, name) or (name != "in_proj_bias" and getattr(attn, name) is None)]
        if missing:
            return f"attention module {type(attn).__name__} of block {i} lacks {', '.join(missing)}"
    width, heads = vit_width(visual), int(blocks[0].attn.num_heads)
    if tuple(blocks[0].attn.in_proj_weight.shape) != (3 * width, width) or heads < 1 or width % heads:
        return (f"attention of shape {tuple(blocks[0].attn.in_proj_weight.shape)} with {heads} heads does not fit "
                f"width {width} (a packed q/k/v projection is needed)")
    return None


class DenseCLIP(nn.Module):
    """Dense forward over an open_clip ``VisionTransformer`` (weights shared, not copied)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        required = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
        missing = [name for name in required if not hasattr(visual, name)]
        if missing or not hasattr(visual.transformer, "resblocks"):
            raise RfclipError(
                f"rfclip needs a CLIP ViT image encoder, got {type(visual).__name__} (missing {', '.join(missing) or 'resblocks'}); "
                "choose a ViT model such as ViT-B-16"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise RfclipError("CLIP models with an attentional pooler (CoCa) are not supported; choose a plain CLIP ViT")
        problem = attention_problem(visual)
        if problem:
            raise RfclipError(f"unsupported image encoder: {problem}; choose an OpenAI/LAION CLIP ViT")
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        attn = self.blocks[0].attn
        self.num_layers = len(self.blocks)
        self.num_heads = int(attn.num_heads)
        self.width = vit_width(visual)
        self.head_dim = self.width // self.num_heads
        patch = visual.conv1.kernel_size
        self.patch_size = (int(patch[0]), int(patch[1]))
        n_pos = visual.positional_embedding.shape[0] - 1
        side = int(round(n_pos**0.5))
        self.native_grid = tuple(getattr(visual, "grid_size", (side, side)))
        self._pos_cache: dict[tuple[int, int, torch.device], Tensor] = {}

    # ------------------------------------------------------------------ pieces of the forward
    def positional_embedding(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """Positional embedding for a patch grid; bicubic interpolation for non-native grids. Returns (1+N, C).

        Interpolation uses ``scale_factor=(h + 0.1) / h0`` rather than ``size`` because the SCLIP/NACLIP reference
        code does (the sampling coordinates differ slightly); it runs in fp32 and is cached per grid.
        """
        key = (grid[0], grid[1], device)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.visual.positional_embedding.float()
        if tuple(grid) == tuple(self.native_grid):
            out = pos
        else:
            h0, w0 = self.native_grid
            cls_pos, patch_pos = pos[:1], pos[1:]
            patch_pos = patch_pos.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)  # (1, C, h0, w0)
            patch_pos = F.interpolate(
                patch_pos,
                scale_factor=((grid[0] + 0.1) / h0, (grid[1] + 0.1) / w0),
                mode="bicubic",
                align_corners=False,
                recompute_scale_factor=False,
            )
            if patch_pos.shape[-2:] != tuple(grid):  # guard against rounding of the scale factor
                patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            out = torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)[0]], dim=0)
        out = out.to(device)
        if len(self._pos_cache) > 32:
            self._pos_cache.clear()
        self._pos_cache[key] = out
        return out

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding + CLS + positional embedding + ln_pre. Returns x (B, 1+N, C) and the grid (h, w)."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, C, h, w); the remainder of sides not divisible is dropped
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid, x.device).to(x.dtype)
        return v.ln_pre(x), grid

    def qkv(self, block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of a block from its pre-LN input x (B, T, C). Each (B, H, T, dh)."""
        attn = block.attn
        z = block.ln_1(x)
        qkv = F.linear(z, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3C)
        B, T, _ = qkv.shape
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_output(self, block: nn.Module, weights: Tensor | None, values: Tensor, q: Tensor | None = None,
                         k: Tensor | None = None) -> Tensor:
        """``out_proj(concat_h(A_h V_h))``; with ``weights=None`` plain softmax(q k^T) attention via SDPA."""
        if weights is None:
            out = F.scaled_dot_product_attention(q, k, values)  # (B, H, T, dh)
        else:
            out = torch.matmul(weights.to(values.dtype), values)  # (B, H, T', dh); weights may be shared by heads
        B, H, T, dh = out.shape
        out = out.transpose(1, 2).reshape(B, T, H * dh)
        return block.attn.out_proj(out)

    def residual_block(self, block: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       weights: Tensor | None = None) -> Tensor:
        """The standard pre-LN block on x (B, T, C) given its q, k, v: ``x + ls_1(attn)``, then ``+ ls_2(FFN)``.
        ``weights=None``: CLIP's own softmax attention (SDPA)."""
        x = x + block.ls_1(self.attention_output(block, weights, v, q, k))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def final_block(self, block: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor, final: FinalAttention,
                    grid: tuple[int, int]) -> FinalTokens:
        """The last block as :class:`FinalAttention` describes it: its attention (and values), then the residual
        and FFN or not. Returns the tokens split into patches and [CLS]."""
        values = v if final.values is None else final.values
        if final.keep_residual:
            if final.values is not None and final.values.shape[2] != x.shape[1]:
                raise ValueError("the residual can only be kept on the CLIP token grid")
            y = self.residual_block(block, x, q, k, values, final.weights)
        else:
            y = block.ls_1(self.attention_output(block, final.weights, values, q, k))
        grid = final.grid if final.grid is not None else grid
        if final.has_cls:
            return FinalTokens(patches=y[:, 1:], cls=y[:, 0], grid=grid)
        return FinalTokens(patches=y, cls=None, grid=grid)

    def to_text_space(self, y: Tensor, ln_post: bool = True) -> Tensor:
        """``ln_post(y) @ proj`` (not normalised): tokens (…, C) -> (…, D); ``ln_post=False``: ``y @ proj``."""
        if ln_post:
            y = self.visual.ln_post(y)
        proj = self.visual.proj
        return y @ proj.to(y.dtype) if proj is not None else y

    # ------------------------------------------------------------------ the forward
    def forward(self, images: Tensor, method: Hooks, text_features: Tensor | None = None,
                record: dict[str, Any] | None = None, cls_only: bool = False,
                regions: Tensor | None = None) -> DenseOutput:
        """Dense features of crops ``images`` (B, 3, H, W).

        Returns :class:`DenseOutput` ``(features, grid, cls)``: features (B, h*w, D) L2-normalised patch embeddings
        in the text space, in raster order over ``grid`` = (h, w) (the CLIP grid, or the method's own grid, e.g.
        ProxyCLIP's VFM grid), and the final [CLS] token in the text space (B, D) (None when the method's output
        has none). ``cls_only=True`` tells the method that only the [CLS] is needed (``features`` may be None).
        ``regions`` (B, H, W) int64: each crop's region map, for methods that use region masks (``ctx.regions``).
        """
        x, grid = self.embed(images)
        ctx = ForwardContext(encoder=self, images=images, grid=grid, text_features=text_features, record=record,
                             cls_only=cls_only, regions=regions)
        method.begin(ctx)
        last = self.num_layers - 1
        for layer, block in enumerate(self.blocks):
            x = method.layer_input(ctx, layer, x)
            q, k, v = self.qkv(block, x)
            if layer < last:
                x = self.residual_block(block, x, q, k, v, method.attention(ctx, layer, q, k, v))
        final = method.final_tokens(ctx, x, q, k, v)
        if final is None:
            final = self.final_block(self.blocks[-1], x, q, k, v, method.final_attention(ctx, q, k, v), grid)
        features = cls = None
        if final.patches is not None:
            features = F.normalize(self.to_text_space(final.patches, not final.after_ln_post).float(), dim=-1)
        if final.cls is not None:
            cls = F.normalize(self.to_text_space(final.cls).float(), dim=-1)  # (B, D)
        return DenseOutput(features, final.grid if final.grid is not None else grid, cls)
