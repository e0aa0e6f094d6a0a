"""Vision foundation models (VFMs) for ProxyCLIP's proxy attention, loaded through timm.

A VFM is named by a timm model name with its pretrained tag (``"vit_base_patch8_224.dino"``) or by a short alias
(``"dino"``, ``"dino_b16"``, ``"dinov2"``, ``"mae"``, ``"sam"``, ``"sam_l"``, ``"sam_h"``). Weights come, in this order,
from

1. ``checkpoint``: a local file (``.safetensors``, or a PyTorch state dict read with ``weights_only=True``), in
   timm's layout or in the original DINO / DINOv2 / MAE / SAM release layout (timm's own checkpoint filter converts
   it; SAM's ``sam_vit_b_01ec64.pth`` keeps the image encoder under ``image_encoder.*`` and its prompt encoder and
   mask decoder are dropped);
2. the local caches: the Hugging Face hub cache timm downloads into (``timm/<name>``) and torch.hub's checkpoint
   folder (where ``torch.hub.load("facebookresearch/dino", ...)`` and timm's URL fallback keep the original files);
3. a download from the Hugging Face hub, only when ``HF_HUB_OFFLINE`` is not set and the hub answers a quick probe.

Without any of these :class:`rfclip.errors.WeightsNotFoundError` names the model and the ``--vfm-checkpoint FILE``
option at once (no retries).

Features, as ProxyCLIP's / FSA's code takes them (spec fsa.md §6): the crop is un-normalised from CLIP's mean/std and
re-normalised with the VFM's (ImageNet's) mean/std. Then

* ViTs (DINO, DINOv2, MAE): the crop as is (sides that are not a multiple of the patch lose their remainder, as a
  stride-``p`` patch convolution does); the positional embedding is resampled to the crop's grid as the official
  model does it (:mod:`rfclip.models.pos_embed`: DINO's ``(h + 0.1) / h0`` scale factor, DINOv2-with-registers'
  antialiased resize, MAE's plain bicubic resize); the features are the final-norm patch tokens, CLS and register
  tokens dropped. ProxyCLIP resizes MAE's input to ``slide_crop`` x ``slide_crop`` (its MAE is built for that size);
  the standard configs' crops already have that size, and other crops are used as they are here.
* SAM: the crop resized bilinearly to the encoder's input size (1024 x 1024), the image encoder's neck output
  (256 channels) on its 64 x 64 grid, whatever the crop size.
"""

from __future__ import annotations

import codecs
import os
import urllib.parse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import RfclipError, WeightsNotFoundError
from .hub import _one_line, cached_hub_file, offline_requested, reachable
from .pos_embed import POSITION_RULES, PositionRule, resample_patch_pos_embed

DEFAULT_VFM = "vit_base_patch8_224.dino"  # ProxyCLIP's and FSA's default: DINO ViT-B/8

VFM_ALIASES = {
    "dino": "vit_base_patch8_224.dino",
    "dino_b8": "vit_base_patch8_224.dino",
    "dino_b16": "vit_base_patch16_224.dino",
    "dinov2": "vit_base_patch14_reg4_dinov2.lvd142m",  # ProxyCLIP loads dinov2_vitb14_reg
    "dinov2_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_noreg": "vit_base_patch14_dinov2.lvd142m",
    "mae": "vit_base_patch16_224.mae",
    "sam": "samvit_base_patch16.sa1b",  # ProxyCLIP's default SAM: sam_vit_b_01ec64.pth
    "sam_b": "samvit_base_patch16.sa1b",
    "sam_l": "samvit_large_patch16.sa1b",  # sam_vit_l_0b3195.pth
    "sam_h": "samvit_huge_patch16.sa1b",  # sam_vit_h_4b8939.pth
}

_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_ETAG_TIMEOUT_S = 10.0


def resolve_vfm_name(name: str) -> str:
    """An alias (``dino``, ``dinov2``, ``mae``, ``sam``, ...) -> its timm name; timm names pass through."""
    return VFM_ALIASES.get(str(name).strip().lower(), str(name).strip())


def vfm_kind(name: str) -> str:
    """``"mae"``, ``"dinov2"``, ``"dino"``, ``"sam"`` or ``"other"`` from a timm name (decides FSA's lambda and the
    positional-embedding rule)."""
    lowered = resolve_vfm_name(name).lower()
    for kind in ("mae", "dinov2", "dino", "sam"):
        if kind in lowered:
            return kind
    return "other"


def position_rule(kind: str, model: nn.Module) -> PositionRule:
    """How the official model of a VFM ``kind`` resamples its positions (:mod:`rfclip.models.pos_embed`)."""
    if kind == "dino":
        return POSITION_RULES["dino"]
    if kind == "dinov2":  # hub *_reg models: offset 0, antialias; plain dinov2_vit*14: offset 0.1, no antialias
        has_registers = getattr(model, "reg_token", None) is not None
        return POSITION_RULES["size_antialias" if has_registers else "dino"]
    if kind == "mae":
        return POSITION_RULES["size"]
    return POSITION_RULES["size_antialias"]  # timm's own resampling


def _patch_size(patch) -> tuple[int, int]:
    return (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch),) * 2


class VisionFoundationModel(nn.Module):
    """A timm ViT giving dense patch features of CLIP-normalised crops.

    ``features(images)`` -> ``(G, grid)``: G (B, H*W, c) final-norm patch tokens (prefix tokens dropped), in raster
    order over ``grid`` = (H, W), in the autocast dtype if one is active. ``positions``: the rule that resamples the
    positional embedding to the crop's grid (default: the official model's, from ``name``; see
    :func:`position_rule`).
    """

    _VIT_PARTS = ("patch_embed", "pos_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm")

    def __init__(self, model: nn.Module, name: str = "custom", source: str = "module",
                 positions: str | PositionRule | None = None):
        super().__init__()
        self._check(model)
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.source = source
        self.patch_size = _patch_size(model.patch_embed.patch_size)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        if isinstance(positions, str):
            if positions not in POSITION_RULES:
                raise RfclipError(f"unknown positions rule '{positions}'; choose one of: {', '.join(POSITION_RULES)}")
            positions = POSITION_RULES[positions]
        self.positions = positions if positions is not None else position_rule(self.kind, model)
        # Positions are added here (not by timm's forward) where the model has the standard timm ViT parts.
        self._own_positions = (all(hasattr(model, part) for part in self._VIT_PARTS) and hasattr(model, "_pos_embed")
                               and model.pos_embed is not None)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
        std = tuple(cfg.get("std") or IMAGENET_STD)
        # CLIP-normalised -> VFM-normalised in one affine map: x_vfm = (x_clip * s_clip + m_clip - m) / s
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("_scale", (clip_std / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((clip_mean - mean_t) / std_t).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _check(model: nn.Module) -> None:
        if not hasattr(model, "forward_features") or not hasattr(model, "patch_embed"):
            raise RfclipError(f"the VFM must be a timm vision transformer (with patch_embed and forward_features), "
                              f"got {type(model).__name__}")
        if not getattr(model, "dynamic_img_size", False):
            raise RfclipError("the VFM must accept any crop size: create the timm model with dynamic_img_size=True")

    @property
    def kind(self) -> str:
        return vfm_kind(self.name)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The VFM patch grid for a crop of ``height`` x ``width`` pixels."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def _embed(self, x: Tensor) -> Tensor:
        """timm's patch embedding and prefix tokens, with the positions resampled by :attr:`positions`."""
        m = self.model
        x = m.patch_embed(x)  # (B, h, w, C): timm's dynamic_img_size patch embedding is NHWC
        B, h, w, C = x.shape
        x = x.reshape(B, h * w, C)
        prefix = [t.expand(B, -1, -1) for t in (getattr(m, "cls_token", None), getattr(m, "reg_token", None))
                  if t is not None]
        pos_prefix = 0 if getattr(m, "no_embed_class", False) else self.num_prefix_tokens
        patch_pos = resample_patch_pos_embed(m.pos_embed[:, pos_prefix:], (h, w), m.patch_embed.grid_size,
                                             self.positions)  # (1, h*w, C)
        if pos_prefix == 0:  # the positions do not cover the prefix tokens (DINOv2 with registers in timm)
            x = torch.cat(prefix + [x + patch_pos], dim=1)
        else:  # DINO, MAE: [CLS, patches] + [pos_CLS, patch positions]
            x = torch.cat(prefix + [x], dim=1) + torch.cat([m.pos_embed[:, :pos_prefix], patch_pos], dim=1)
        return m.pos_drop(x)

    def _encode(self, x: Tensor) -> Tensor:
        """VFM-normalised crops (B, 3, H, W) -> patch tokens (B, H*W, c)."""
        if self._own_positions:
            m = self.model
            tokens = m.norm(m.blocks(m.norm_pre(m.patch_drop(self._embed(x)))))  # timm's forward_features
        else:
            tokens = self.model.forward_features(x)  # (B, prefix + H*W, c), final norm applied
        if tokens.ndim == 4:  # NHWC output (some timm models)
            return tokens.flatten(1, 2)
        return tokens[:, self.num_prefix_tokens:]

    def _renormalise(self, images: Tensor) -> Tensor:
        return images.float() * self._scale + self._shift

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch features of CLIP-normalised crops ``images`` (B, 3, H, W)."""
        grid = self.grid(images.shape[-2], images.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise RfclipError(f"crop of {images.shape[-2]}x{images.shape[-1]} px is smaller than the VFM patch "
                              f"{self.patch_size[0]}x{self.patch_size[1]}; use larger images or --slide-crop")
        x = self._renormalise(images[..., : grid[0] * self.patch_size[0], : grid[1] * self.patch_size[1]])
        tokens = self._encode(x)
        if tokens.shape[1] != grid[0] * grid[1]:
            raise RfclipError(f"VFM {self.name} gave {tokens.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid")
        return tokens, grid

    @torch.no_grad()
    def last_query_key(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """CorrCLIP's VFM features of CLIP-normalised crops (B, 3, H, W): the last block's raw ``q + k`` (all heads
        concatenated, the output of its ``qkv`` projection before any scaling), prefix tokens dropped, L2-normalised.
        Returns ``(F (B, H*W, c) fp32, grid)``. The blocks before the last run as in :meth:`features`; the last
        block's attention and MLP are not needed and not run."""
        if not self._own_positions or not hasattr(self.model.blocks[-1], "attn") \
                or not hasattr(self.model.blocks[-1].attn, "qkv"):
            raise RfclipError(f"VFM {self.name} has no last-block q/k projection (blocks[-1].attn.qkv); CorrCLIP needs "
                              "a timm ViT such as DINO (--vfm dino)")
        grid = self.grid(images.shape[-2], images.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise RfclipError(f"crop of {images.shape[-2]}x{images.shape[-1]} px is smaller than the VFM patch "
                              f"{self.patch_size[0]}x{self.patch_size[1]}; use larger images or --slide-crop")
        m = self.model
        x = self._renormalise(images[..., : grid[0] * self.patch_size[0], : grid[1] * self.patch_size[1]])
        x = m.norm_pre(m.patch_drop(self._embed(x)))
        for block in m.blocks[:-1]:
            x = block(x)
        last = m.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))  # (B, T, 3c): [q | k | v]
        q, k, _ = qkv.unflatten(-1, (3, -1)).unbind(dim=2)  # (B, T, c) each
        qk = (q + k)[:, self.num_prefix_tokens:].float()
        return F.normalize(qk, dim=-1), grid


class SamImageEncoder(VisionFoundationModel):
    """SAM's image encoder (timm ``samvit_*``) as a VFM, as ProxyCLIP's code uses it: the ImageNet-normalised crop
    resized bilinearly to the encoder's input size (1024 x 1024 for the released models), the neck's output
    (B, 256, 64, 64) flattened to (B, 4096, 256) tokens on the 64 x 64 grid, whatever the crop size."""

    @staticmethod
    def _check(model: nn.Module) -> None:
        if not all(hasattr(model, part) for part in ("patch_embed", "forward_features", "neck")):
            raise RfclipError(f"a SAM VFM must be a timm VisionTransformerSAM (patch_embed, neck, forward_features), "
                              f"got {type(model).__name__}")

    @property
    def kind(self) -> str:
        return "sam"

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.model.patch_embed.img_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size),) * 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self._renormalise(images)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        maps = self.model.forward_features(x)  # (B, 256, 64, 64): the neck output
        grid = (int(maps.shape[-2]), int(maps.shape[-1]))
        return maps.flatten(2).transpose(1, 2), grid


def wrap_vfm(model: nn.Module, name: str | None = None, source: str = "module",
             positions: str | PositionRule | None = None) -> VisionFoundationModel:
    """A timm module as a VFM: SAM image encoders (they have a ``neck``) as :class:`SamImageEncoder`, ViTs as
    :class:`VisionFoundationModel`."""
    name = name or type(model).__name__
    if hasattr(model, "neck") and vfm_kind(name) in ("sam", "other"):
        return SamImageEncoder(model, name=name, source=source)
    return VisionFoundationModel(model, name=name, source=source, positions=positions)


# ---------------------------------------------------------------------------------------------- weights
def _hub_cache_dir() -> str:
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return env
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def cached_vfm_weights(name: str) -> str | None:
    """A local weights file for timm model ``name`` already in the HF hub cache or torch.hub's checkpoints."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        return None
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        repo = hf_id.split("@")[0]
        filenames = ([cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []) + list(_HF_FILES)
        hit = cached_hub_file([(repo, f) for f in filenames], _hub_cache_dir())
        if hit:
            return hit
    url = getattr(cfg, "url", None)
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlsplit(url).path))
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return path
    return None


def _download(name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    hf_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    hint = f"pass --vfm-checkpoint FILE (vfm_checkpoint=) with a local copy of the {name} weights"
    if not hf_id:
        raise WeightsNotFoundError(f"timm has no Hugging Face weights for VFM {name}; {hint}")
    if offline_requested():
        raise WeightsNotFoundError(f"weights of VFM {name} are not in the local cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        from huggingface_hub import constants, hf_hub_download

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        raise WeightsNotFoundError(f"weights of VFM {name} are not cached and huggingface_hub is missing; {hint}") from None
    if not reachable(endpoint):
        host = urllib.parse.urlsplit(endpoint).hostname
        raise WeightsNotFoundError(f"weights of VFM {name} are not in the local cache and {host} is unreachable; {hint}")
    repo = hf_id.split("@")[0]
    last: Exception | None = None
    for filename in _HF_FILES:
        try:
            return hf_hub_download(repo, filename, cache_dir=_hub_cache_dir(), etag_timeout=_ETAG_TIMEOUT_S)
        except Exception as err:  # missing safetensors alternative, network errors
            last = err
    reason = _one_line(last) if last else "unknown error"
    raise WeightsNotFoundError(f"download of VFM {name} from {repo} failed ({reason}); {hint}")


def _looks_like_weights(path: str) -> bool:
    """A zip ``torch.save`` file, a legacy pickle, or a safetensors header: from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5):
        return True
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _content(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at 4096 bytes is fine
        return "it holds text"
    except UnicodeDecodeError:
        return "unrecognised content"


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (``weights_only=True``); unwraps ``model`` /
    ``state_dict`` / ``teacher`` containers and strips ``module.`` / ``backbone.`` prefixes."""
    from .._io import file_problem

    path = os.fspath(path)
    problem = file_problem(path)
    if problem is not None:
        what = "not found: " + path if problem == "not found" else f"{path} {problem}"
        raise RfclipError(f"VFM checkpoint {what}; check the --vfm-checkpoint path")
    if not _looks_like_weights(path):
        raise RfclipError(f"VFM checkpoint {path} is not a checkpoint ({_content(path)}); give a .safetensors file "
                          "or a PyTorch state dict (.pth / .pt / .bin)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RfclipError(f"cannot read VFM checkpoint {path} ({_one_line(err)}); give a .safetensors file or a "
                          f"plain PyTorch state dict") from None
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RfclipError(f"VFM checkpoint {path} holds no state dict of tensors; give a .safetensors file or a "
                          f"plain PyTorch state dict")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_into(model: nn.Module, state: dict[str, Tensor], name: str, path: str) -> None:
    """Load a (possibly original-layout) state dict into a timm model, strictly except for classifier heads."""
    import sys

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)  # timm's converter
    if callable(filter_fn):
        try:
            state = filter_fn(state, model)
        except Exception as err:
            raise RfclipError(f"VFM checkpoint {path} does not fit timm model {name} ({_one_line(err)}); choose the "
                              f"matching --vfm name") from None
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))
             or k in model.state_dict()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise RfclipError(f"VFM checkpoint {path} does not fit timm model {name} ({_one_line(err, 200)}); choose the "
                          f"matching --vfm name") from None
    missing = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
    if missing:
        raise RfclipError(f"VFM checkpoint {path} does not fit timm model {name}: {len(missing)} missing weights "
                          f"(e.g. {', '.join(missing[:3])}); choose the matching --vfm name")


def load_vfm(vfm: str | nn.Module | VisionFoundationModel = DEFAULT_VFM, checkpoint: str | os.PathLike | None = None,
             device: torch.device | str | None = None) -> VisionFoundationModel:
    """Load a VFM by timm name / alias (weights from ``checkpoint``, the caches or the hub), or wrap a module."""
    if isinstance(vfm, VisionFoundationModel):
        model = vfm
    elif isinstance(vfm, nn.Module):
        model = wrap_vfm(vfm)
        if checkpoint is not None:
            load_state_into(vfm, read_state_dict(checkpoint), model.name, os.fspath(checkpoint))
    else:
        import timm

        name = resolve_vfm_name(vfm)
        if not timm.is_model(name):
            raise RfclipError(f"unknown VFM '{vfm}'; give a timm model name such as {DEFAULT_VFM} or one of: "
                              f"{', '.join(sorted(VFM_ALIASES))}")
        path = os.fspath(checkpoint) if checkpoint is not None else (cached_vfm_weights(name) or _download(name))
        state = read_state_dict(path)  # read before building the model: bad files fail fast
        # SAM's encoder runs at its fixed input size (crops are resized to it); ViTs take any crop size.
        kwargs = {} if name.startswith("samvit") else {"dynamic_img_size": True}
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except Exception as err:
            raise RfclipError(f"timm cannot build VFM {name} ({_one_line(err)}); choose a timm vision "
                              f"transformer") from None
        load_state_into(net, state, name, path)
        model = wrap_vfm(net, name=name, source=path)
    if device is not None:
        model = model.to(device)
    return model
