"""Vision foundation models (VFMs) for ProxyCLIP's proxy attention, loaded through timm.

A VFM is named by a timm model name with its pretrained tag (``"vit_base_patch8_224.dino"``) or by a short alias
(``"dino"``, ``"dino_b16"``, ``"dinov2"``, ``"mae"``). Weights come, in this order, from

1. ``checkpoint``: a local file (``.safetensors``, or a PyTorch state dict read with ``weights_only=True``), in
   timm's layout or in the original DINO / DINOv2 / MAE release layout (timm's own checkpoint filter converts it);
2. the local caches: the Hugging Face hub cache timm downloads into (``timm/<name>``) and torch.hub's checkpoint
   folder (where ``torch.hub.load("facebookresearch/dino", ...)`` and timm's URL fallback keep the original files);
3. a download from the Hugging Face hub, only when ``HF_HUB_OFFLINE`` is not set and the hub answers a quick probe.

Without any of these :class:`rfclip.errors.WeightsNotFoundError` names the model and the ``--vfm-checkpoint FILE``
option at once (no retries).

Features (ProxyCLIP / FSA code, spec fsa.md §6): the crop is un-normalised from CLIP's mean/std and re-normalised with
the VFM's (ImageNet's) mean/std; the timm model runs with ``dynamic_img_size=True`` so any crop size works (sides
that are not a multiple of the patch lose their remainder, as a stride-``p`` patch convolution does); the features
are the final-norm patch tokens with the CLS and register tokens dropped.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import torch
from torch import Tensor, nn

from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import RfclipError, WeightsNotFoundError
from .hub import _one_line, cached_hub_file, offline_requested, reachable

DEFAULT_VFM = "vit_base_patch8_224.dino"  # ProxyCLIP's and FSA's default: DINO ViT-B/8

VFM_ALIASES = {
    "dino": "vit_base_patch8_224.dino",
    "dino_b8": "vit_base_patch8_224.dino",
    "dino_b16": "vit_base_patch16_224.dino",
    "dinov2": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "mae": "vit_base_patch16_224.mae",
}

_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_ETAG_TIMEOUT_S = 10.0


def resolve_vfm_name(name: str) -> str:
    """An alias (``dino``, ``dinov2``, ``mae``, ...) -> its timm name; timm names pass through."""
    return VFM_ALIASES.get(str(name).strip().lower(), str(name).strip())


def vfm_kind(name: str) -> str:
    """``"mae"``, ``"dinov2"``, ``"dino"``, ``"sam"`` or ``"other"`` from a timm name (decides FSA's lambda)."""
    lowered = resolve_vfm_name(name).lower()
    for kind in ("mae", "dinov2", "dino", "sam"):
        if kind in lowered:
            return kind
    return "other"


class VisionFoundationModel(nn.Module):
    """A timm ViT giving dense patch features of CLIP-normalised crops.

    ``features(images)`` -> ``(G, grid)``: G (B, H*W, c) final-norm patch tokens (prefix tokens dropped), in raster
    order over ``grid`` = (H, W), in the autocast dtype if one is active.
    """

    def __init__(self, model: nn.Module, name: str = "custom", source: str = "module"):
        super().__init__()
        if not hasattr(model, "forward_features") or not hasattr(model, "patch_embed"):
            raise RfclipError(f"the VFM must be a timm vision transformer (with patch_embed and forward_features), "
                              f"got {type(model).__name__}")
        if not getattr(model, "dynamic_img_size", False):
            raise RfclipError("the VFM must accept any crop size: create the timm model with dynamic_img_size=True")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.source = source
        patch = model.patch_embed.patch_size
        self.patch_size = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch),) * 2
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
        std = tuple(cfg.get("std") or IMAGENET_STD)
        # CLIP-normalised -> VFM-normalised in one affine map: x_vfm = (x_clip * s_clip + m_clip - m) / s
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("_scale", (clip_std / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((clip_mean - mean_t) / std_t).view(1, 3, 1, 1), persistent=False)

    @property
    def kind(self) -> str:
        return vfm_kind(self.name)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The VFM patch grid for a crop of ``height`` x ``width`` pixels."""
        return height // self.patch_size[0], width // self.patch_size[1]

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch features of CLIP-normalised crops ``images`` (B, 3, H, W)."""
        grid = self.grid(images.shape[-2], images.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise RfclipError(f"crop of {images.shape[-2]}x{images.shape[-1]} px is smaller than the VFM patch "
                              f"{self.patch_size[0]}x{self.patch_size[1]}; use larger images or --slide-crop")
        x = images[..., : grid[0] * self.patch_size[0], : grid[1] * self.patch_size[1]].float()
        x = x * self._scale + self._shift
        tokens = self.model.forward_features(x)  # (B, prefix + H*W, c), final norm applied
        if tokens.ndim == 4:  # NHWC output (some timm models)
            tokens = tokens.flatten(1, 2)
        else:
            tokens = tokens[:, self.num_prefix_tokens:]
        if tokens.shape[1] != grid[0] * grid[1]:
            raise RfclipError(f"VFM {self.name} gave {tokens.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid")
        return tokens, grid


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


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (``weights_only=True``); unwraps ``model`` /
    ``state_dict`` / ``teacher`` containers and strips ``module.`` / ``backbone.`` prefixes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RfclipError(f"VFM checkpoint not found: {path}; check the --vfm-checkpoint path")
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
        model = VisionFoundationModel(vfm, name=type(vfm).__name__, source="module")
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
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
        except Exception as err:
            raise RfclipError(f"timm cannot build VFM {name} ({_one_line(err)}); choose a timm vision "
                              f"transformer") from None
        load_state_into(net, state, name, path)
        model = VisionFoundationModel(net, name=name, source=path)
    if device is not None:
        model = model.to(device)
    return model

