"""Mask generators: SAM2 and SAM automatic masks, Hugging Face panoptic models (Mask2Former, EoMT).

Each reads its weights as data (safetensors, or ``torch.load(weights_only=True)`` of the release layouts: SAM2's
``.pt`` is ``{"model": state_dict}``, SAM's ``.pth`` the bare state dict), builds the model with its package's own
constructor and no checkpoint, then loads the weights strictly: a checkpoint that does not fit its configuration is
a one-line error naming the configuration that fits. The packages are imported here, lazily (the ``masks`` extra).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import RfclipError
from .base import check_region_map, paint_by_area

INSTALL_HINT = ('install the masks extra: pip install -e ".[masks]", then SAM2 (built from source, after torch): '
                'SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0')

# CorrCLIP v1 (corrclip_segmentor.py: set_mask_generator): SAM2 hiera-large, 8 points per side, both thresholds
# 0.4, one mask per point, no post-processing; its README also reports 32 points per side (SAM2_32).
SAM2_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4, multimask_output=False)
# CorrCLIPv2 (mask_generators/factory.py: SAMGenerator): SAM ViT-H, thresholds 0.7, the generator's other defaults.
SAM_SETTINGS = dict(points_per_side=32, pred_iou_thresh=0.7, stability_score_thresh=0.7)

# SAM2 package configs by (Hiera trunk width, number of trunk blocks), from the yaml files of sam2 1.1.0
SAM2_SIZES = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}
SAM2_CONFIGS = [f"{v}_{s}" for v in ("sam2", "sam2.1") for s in SAM2_SIZES.values()]
# segment-anything's registry: (width, depth, heads, global-attention blocks) of build_sam.py
SAM_SIZES = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
             "vit_h": (1280, 32, 16, (7, 15, 23, 31))}
SAM_IMAGE_TOKENS = 1024 // 16  # SAM's image encoder: 1024 px input, 16 px patches


PIP_NAMES = {"segment_anything": "segment-anything", "hydra": "hydra-core", "omegaconf": "hydra-core"}


def _require(module: str, what: str):
    """Import ``module``; missing (it or what it imports) is a one-line error naming the install steps."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = (err.name or module).split(".")[0]
        raise RfclipError(f"{what} need the package {PIP_NAMES.get(top, top)}, which is not installed; "
                          f"{INSTALL_HINT}") from None


def _read_checkpoint(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict read as data (safetensors or weights_only torch.load; ``{"model": ...}`` unwrapped)."""
    from ..models.loading import _read_state_dict

    path = Path(path)
    if not path.is_file():
        raise RfclipError(f"{what} checkpoint not found: {path}; check the path after '{what.lower()}:'")
    state, _, _ = _read_state_dict(path)
    return state


def _count_blocks(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def _load_strict(model: torch.nn.Module, state: dict, where: str, fix: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:160])
        raise RfclipError(f"{where} does not match its configuration ({first}); {fix}") from None
    if result.missing_keys or result.unexpected_keys:
        keys = result.missing_keys or result.unexpected_keys
        kind = "missing" if result.missing_keys else "unexpected"
        raise RfclipError(f"{where} does not match its configuration ({len(keys)} {kind} weights, e.g. {keys[0]}); "
                          f"{fix}")


def _device(device) -> torch.device:
    from ..devices import resolve_device

    return resolve_device(device)


class _Generator:
    """Shared by the generators: the image check, inference mode, and the region map check."""

    name = "generator"

    def __call__(self, image: np.ndarray, path: str | None = None) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RfclipError(f"the {self.name} mask generator takes an RGB uint8 image (H, W, 3), got "
                              f"{image.dtype} {image.shape}; read the image with rfclip.inference.read_image")
        with torch.inference_mode():
            region_map = self.generate(image)
        return check_region_map(region_map, image.shape[:2], name=f"{self.name} region map")

    def generate(self, image: np.ndarray) -> np.ndarray:  # pragma: no cover - each generator has its own
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- SAM2
def sam2_config_for(state: dict) -> str | None:
    """The sam2 package config that fits a SAM2 state dict (``sam2.1_hiera_l`` ...), from its shapes; None if none."""
    width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    size = SAM2_SIZES.get((width, _count_blocks(state, "image_encoder.trunk.blocks.")))
    if size is None:
        return None
    return f"{'sam2.1' if 'no_obj_embed_spatial' in state else 'sam2'}_{size}"


def _sam2_package_config(name: str) -> str | None:
    """``sam2.1_hiera_l``, ``sam2.1_hiera_l.yaml`` or ``configs/sam2.1/sam2.1_hiera_l.yaml`` -> the hydra name."""
    stem = Path(name).name.removesuffix(".yaml")
    if stem not in SAM2_CONFIGS:
        return None
    return f"configs/{stem.split('_hiera')[0]}/{stem}.yaml"


def _build_sam2_model(config: str):
    """The SAM2 model of ``config`` (a package config name, or a yaml file of SAM2's layout), random weights."""
    _require("sam2.build_sam", "SAM2 masks")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sam2.build_sam import build_sam2

    package_name = _sam2_package_config(config)
    if package_name is not None:
        return build_sam2(package_name, None, device="cpu", apply_postprocessing=False)
    if not (config.endswith((".yaml", ".yml")) and os.path.isfile(config)):
        raise RfclipError(f"unknown SAM2 config '{config}'; use one of {', '.join(SAM2_CONFIGS)} or a yaml file "
                          "in SAM2's config layout")
    try:
        cfg = OmegaConf.load(config)
        OmegaConf.resolve(cfg)
    except Exception as err:  # noqa: BLE001 - any yaml / interpolation error
        raise RfclipError(f"cannot read SAM2 config {config} ({str(err).splitlines()[0]}); give a SAM2 yaml config")
    targets = [str(v) for v in _values(OmegaConf.to_container(cfg), "_target_")]
    if "model" not in cfg or any(not t.startswith("sam2.") for t in targets):
        raise RfclipError(f"SAM2 config {config} has no 'model' or builds objects outside the sam2 package; "
                          "give a SAM2 yaml config (as in sam2/configs)")
    return instantiate(cfg.model, _recursive_=True)


def _values(tree, key: str):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            else:
                yield from _values(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _values(v, key)


class Sam2Masks(_Generator):
    """SAM2's automatic mask generator with CorrCLIP's settings, painted by ascending area (:func:`paint_by_area`).

    ``config``: the sam2 package config (``sam2.1_hiera_l`` ...; see :data:`SAM2_CONFIGS`) or a yaml file in SAM2's
    layout; None picks the package config from the checkpoint's shapes (trunk width and depth; ``sam2.1`` when it
    has the 2.1 weights). The model runs in fp32 (CorrCLIP ran it in fp16 on CUDA).
    """

    name = "SAM2"

    def __init__(self, checkpoint: str | os.PathLike, config: str | None = None, device=None,
                 points_per_side: int = SAM2_SETTINGS["points_per_side"],
                 pred_iou_thresh: float = SAM2_SETTINGS["pred_iou_thresh"],
                 stability_score_thresh: float = SAM2_SETTINGS["stability_score_thresh"],
                 multimask_output: bool = SAM2_SETTINGS["multimask_output"], points_per_batch: int = 64):
        _require("sam2.automatic_mask_generator", "SAM2 masks")
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        self.checkpoint = str(checkpoint)
        state = _read_checkpoint(checkpoint, "SAM2")
        if "image_encoder.trunk.patch_embed.proj.weight" not in state:
            raise RfclipError(f"{checkpoint} is not a SAM2 checkpoint (no Hiera image encoder); give a SAM2 .pt "
                              "(sam2.1_hiera_large.pt ...) or its state dict as .safetensors")
        fitting = sam2_config_for(state)
        if config is None and fitting is None:
            raise RfclipError(f"{checkpoint} is a SAM2 checkpoint of no size the sam2 package ships; name its "
                              "config: sam2:CHECKPOINT@CONFIG.yaml")
        self.config = config or fitting
        model = _build_sam2_model(self.config)
        fix = (f"the checkpoint fits {fitting}: use sam2:{checkpoint}@{fitting} or leave out @CONFIG" if fitting
               else "give the config it was trained with: sam2:CHECKPOINT@CONFIG")
        _load_strict(model, state, f"SAM2 checkpoint {checkpoint} with config {self.config}", fix)
        self.device = _device(device)
        model = model.to(self.device).eval()
        self.settings = dict(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                             stability_score_thresh=stability_score_thresh, multimask_output=multimask_output,
                             points_per_batch=points_per_batch)
        self.generator = SAM2AutomaticMaskGenerator(model=model, **self.settings)

    def generate(self, image: np.ndarray) -> np.ndarray:
        return paint_by_area(self.generator.generate(image), image.shape[:2])

    def describe(self) -> dict:
        return {"source": "sam2", "checkpoint": self.checkpoint, "config": self.config, **self.settings}


# ---------------------------------------------------------------------------------------------- SAM
def sam_size_of(state: dict) -> tuple[int, int, int, tuple[int, ...]]:
    """(width, depth, heads, global-attention blocks) of a SAM state dict's image encoder, from its shapes.

    Global blocks have relative positions over the whole 64x64 token grid (2*64-1 rows), windowed ones over a window.
    """
    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = _count_blocks(state, "image_encoder.blocks.")
    rel_pos = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    heads = width // rel_pos[0].shape[1]
    global_blocks = tuple(i for i, r in enumerate(rel_pos) if r.shape[0] == 2 * SAM_IMAGE_TOKENS - 1)
    return width, depth, heads, global_blocks


class SamMasks(_Generator):
    """SAM's automatic mask generator (``segment-anything``), painted by ascending area as SAM2's masks are.

    ``model_type``: ``vit_b``, ``vit_l`` or ``vit_h`` (segment-anything's registry), or None to build the encoder
    the checkpoint's shapes describe. Settings: CorrCLIPv2's SAM generator (thresholds 0.7, 32 points per side).
    """

    name = "SAM"

    def __init__(self, checkpoint: str | os.PathLike, model_type: str | None = None, device=None,
                 points_per_side: int = SAM_SETTINGS["points_per_side"],
                 pred_iou_thresh: float = SAM_SETTINGS["pred_iou_thresh"],
                 stability_score_thresh: float = SAM_SETTINGS["stability_score_thresh"], points_per_batch: int = 64):
        _require("segment_anything", "SAM masks")
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        from segment_anything.build_sam import _build_sam

        self.checkpoint = str(checkpoint)
        state = _read_checkpoint(checkpoint, "SAM")
        if "image_encoder.blocks.0.attn.rel_pos_h" not in state or "mask_decoder.iou_token.weight" not in state:
            raise RfclipError(f"{checkpoint} is not a SAM checkpoint (no SAM image encoder and mask decoder); give "
                              "a segment-anything .pth (sam_vit_b_01ec64.pth ...) or its state dict as .safetensors")
        size = sam_size_of(state)
        fitting = next((name for name, s in SAM_SIZES.items() if s == size), None)
        if model_type is not None:
            if model_type not in SAM_SIZES:
                raise RfclipError(f"unknown SAM model type '{model_type}'; use one of {', '.join(SAM_SIZES)}")
            model = sam_model_registry[model_type](checkpoint=None)
        else:
            width, depth, heads, global_blocks = size
            model = _build_sam(width, depth, heads, list(global_blocks), checkpoint=None)
        self.model_type = model_type or fitting or "custom"
        fix = (f"the checkpoint is {fitting}: use sam:{checkpoint}@{fitting} or leave out @TYPE" if fitting
               else "leave out @TYPE to build the encoder the checkpoint describes")
        _load_strict(model, state, f"SAM checkpoint {checkpoint} with model type {self.model_type}", fix)
        self.device = _device(device)
        model = model.to(self.device).eval()
        self.settings = dict(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                             stability_score_thresh=stability_score_thresh, points_per_batch=points_per_batch)
        self.generator = SamAutomaticMaskGenerator(model, **self.settings)

    def generate(self, image: np.ndarray) -> np.ndarray:
        return paint_by_area(self.generator.generate(image), image.shape[:2])

    def describe(self) -> dict:
        return {"source": "sam", "checkpoint": self.checkpoint, "model_type": self.model_type, **self.settings}


# ---------------------------------------------------------------------------------------------- transformers
HF_PANOPTIC = {"mask2former": "Mask2FormerForUniversalSegmentation", "eomt": "EomtForUniversalSegmentation"}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report, progress bars and notes off for a moment (errors still show)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class HFPanopticMasks(_Generator):
    """A panoptic model through ``transformers`` (Mask2Former; EoMT), from a local folder of safetensors weights.

    As CorrCLIP's ``mask2former`` generator: the folder's image processor, the model, then the processor's
    panoptic post-process (its default thresholds) at the image's size; the map is its ``segmentation`` with the
    post-process's -1 ("no segment found") as 0. The folder holds ``config.json``, ``model.safetensors`` and
    ``preprocessor_config.json`` (``model.save_pretrained(DIR)``, ``processor.save_pretrained(DIR)``).
    """

    name = "panoptic"

    def __init__(self, folder: str | os.PathLike, device=None):
        transformers = _require("transformers", "Hugging Face panoptic masks")
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise RfclipError(f"{self.folder} is not a Hugging Face model folder (no config.json); give the folder "
                              "saved by model.save_pretrained (Mask2Former or EoMT)")
        if not any(self.folder.glob("*.safetensors")):
            raise RfclipError(f"{self.folder} holds no .safetensors weights; re-save the model with "
                              "model.save_pretrained(DIR) (safetensors is its default)")
        if not (self.folder / "preprocessor_config.json").is_file():
            raise RfclipError(f"{self.folder} has no preprocessor_config.json; save the image processor beside the "
                              "model: processor.save_pretrained(DIR)")
        config = transformers.AutoConfig.from_pretrained(self.folder, local_files_only=True)
        self.model_type = config.model_type
        class_name = HF_PANOPTIC.get(self.model_type)
        model_class = getattr(transformers, class_name, None) if class_name else None
        if model_class is None:
            have = [k for k, v in HF_PANOPTIC.items() if hasattr(transformers, v)]
            raise RfclipError(f"{self.folder} holds a '{self.model_type}' model; panoptic masks take "
                              f"{' or '.join(have)} models (transformers {transformers.__version__})")
        fix = "save the model and its config.json together (model.save_pretrained(DIR))"
        with _quiet_transformers():
            try:
                model, info = model_class.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                                          output_loading_info=True)
            except RuntimeError as err:  # shapes that differ from config.json
                first = str(err).strip().splitlines()[0][:160]
                raise RfclipError(f"weights in {self.folder} do not match its config.json ({first}); {fix}") from None
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if bad:
                kind, keys = next(iter(bad.items()))
                raise RfclipError(f"weights in {self.folder} do not match its config.json ({len(keys)} "
                                  f"{kind.replace('_', ' ')}, e.g. {next(iter(keys))}); {fix}")
            self.processor = transformers.AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        self.device = _device(device)
        self.model = model.to(self.device).eval()

    def generate(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        inputs = self.processor(Image.fromarray(image), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        with _quiet_transformers():  # its per-image note that no label ids are fused
            result = self.processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
        segmentation = result["segmentation"].cpu().numpy()
        return np.maximum(segmentation, 0).astype(np.int32)  # -1: the post-process found no segment

    def describe(self) -> dict:
        return {"source": "hf", "folder": str(self.folder), "model_type": self.model_type}
