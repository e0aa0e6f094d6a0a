"""Options shared by the subcommands: model, method, inference settings, and helpers to turn them into a
:class:`rfclip.segmenter.Segmenter`.

Every inference option defaults to ``None`` here, meaning "the library default" (:class:`InferenceConfig`), so the
CLI never duplicates a default; :func:`inference_options` returns only the options the user gave.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import RfclipError
from ..methods.options import parse_options, parse_value  # noqa: F401  (the CLI's --option syntax)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"

# CLI flag dest -> InferenceConfig field
INFERENCE_FLAGS = {
    "short_side": "short_side",
    "slide_crop": "slide_crop",
    "slide_stride": "slide_stride",
    "prob_thd": "prob_thd",
    "logit_scale": "logit_scale",
    "pamr": "pamr",
    "batch_size": "batch_size",
    "precision": "precision",
    "pad_crops_to": "pad_crops_to",
    "compile": "compile",
}


# ---------------------------------------------------------------------------------------------- parsers
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _crop_padding(text: str) -> int | str:
    """``--pad-crops-to``: pixels (0 = off) or ``patch``."""
    if text.strip().lower() == "patch":
        return "patch"
    try:
        return _non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'patch', got '{text}'") from None


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _unit_float(text: str) -> float:
    """A number in 0..1 (NaN is not one)."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got '{text}'")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got '{text}'")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                       help=f"open_clip model name (default: {DEFAULT_MODEL}; also ViT-L-14, ViT-L-14-336, ViT-B-32, ...)")
    group.add_argument("--pretrained", default=DEFAULT_PRETRAINED, metavar="TAG",
                       help=f"open_clip pretrained tag, downloaded on first use (default: {DEFAULT_PRETRAINED})")
    group.add_argument("--checkpoint", metavar="FILE",
                       help="load weights from a local file or folder instead of downloading (OpenAI .pt, open_clip "
                            ".pt/.bin, .safetensors, Hugging Face folder); --model must name its architecture")
    group.add_argument("--quick-gelu", dest="quick_gelu", action=argparse.BooleanOptionalAction, default=None,
                       help="force QuickGELU (OpenAI weights re-saved as plain fp32 state dicts), or GELU with "
                            "--no-quick-gelu (default: decided from the checkpoint's origin)")
    group.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def add_method_options(parser: argparse.ArgumentParser, default_method: str | None = None,
                       from_preset: bool = False) -> None:
    """``from_preset``: ``--method`` defaults to None, to be resolved from ``--preset`` (:func:`resolve_method`)."""
    if default_method is None:
        from ..segmenter import DEFAULT_METHOD

        default_method = DEFAULT_METHOD
    group = parser.add_argument_group("method")
    default_text = (f"the preset's method (rfclip_release for --preset rfclip_release), else {default_method}"
                    if from_preset else default_method)
    group.add_argument("--method", default=None if from_preset else default_method, metavar="NAME",
                       help=f"segmentation method (default: {default_text}); one of {method_list()}; "
                            "add a plugin with '+', e.g. naclip+fsa")
    group.add_argument("--plugin", action="append", default=[], metavar="NAME",
                       help="add a plugin to the method (repeatable), e.g. --plugin fsa")
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a method or inference option (repeatable), e.g. --option gaussian_std=3 or "
                            "--option distraction_dims=4,162,474; values are read as int, float, true/false, "
                            "none or comma-separated lists")
    group.add_argument("--vfm", metavar="NAME", help="vision foundation model of proxyclip (timm name or dino, "
                       "dino_b16, dinov2, dinov2_noreg, mae, sam, sam_l, sam_h; default: DINO ViT-B/8)")
    group.add_argument("--vfm-checkpoint", metavar="FILE", help="local weights for --vfm (safetensors or PyTorch file, "
                       "also the original DINO / DINOv2 / MAE / SAM releases, e.g. sam_vit_b_01ec64.pth)")


def resolve_method(args: argparse.Namespace) -> str:
    """``--method``, else the method of ``--preset`` (``rfclip_release``), else the default method."""
    if getattr(args, "method", None):
        return args.method
    from ..data.settings import preset_method
    from ..segmenter import DEFAULT_METHOD

    return preset_method(args.preset) or DEFAULT_METHOD


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference (defaults: the papers' protocol)")
    group.add_argument("--short-side", type=_non_negative_int, metavar="PX",
                       help="resize so the short side is PX before the sliding window (default: 336; 0 keeps the size)")
    group.add_argument("--slide-crop", type=_non_negative_int, metavar="PX",
                       help="sliding-window crop size (default: 224; 0 = whole image in one forward)")
    group.add_argument("--slide-stride", type=_positive_int, metavar="PX", help="sliding-window stride (default: 112)")
    group.add_argument("--prob-thd", type=_unit_float, metavar="P",
                       help="pixels whose best class probability is below P get class 0 (default: 0 = off)")
    group.add_argument("--logit-scale", type=_positive_float, metavar="S", help="softmax temperature over classes (default: 40)")
    group.add_argument("--pamr", action="store_true", default=None,
                       help="refine the masks with PAMR (pixel-adaptive mask refinement)")
    group.add_argument("--pad-crops-to", type=_crop_padding, metavar="PX",
                       help="zero-pad each crop so its sides are multiples of PX, as ClearCLIP ('patch': the patch "
                            "size) and ProxyCLIP (56) do (default: 0 = off; the eval presets set it); the image "
                            "normalisation is --option pixel_mean=R,G,B / pixel_std=R,G,B (0-255 scale)")
    group.add_argument("--batch-size", type=_positive_int, metavar="N",
                       help="crops per forward pass; lower it if memory runs out (default: 64 on a GPU, 8 on CPU)")
    group.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                       help="compute precision (default: auto = bf16/fp16 on CUDA, fp32 on CPU; fp32 for "
                            "rfclip_release)")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the image encoder (pays off on a GPU over many images; the first "
                            "batches are slow while it compiles)")


def add_images_per_batch_option(group) -> None:
    """``--images-per-batch``: how many images' crops are batched together (segment, eval)."""
    group.add_argument("--images-per-batch", type=_positive_int, default=4, metavar="N",
                       help="images whose crops share forward passes (default: 4)")


def add_masks_option(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--masks SPEC``: where the region masks come from (the mask tier; see :func:`rfclip.masks.mask_source`)."""
    from ..masks import MASK_SPEC_FORMS

    parser.add_argument("--masks", required=required, metavar="SPEC",
                        help="region masks for the methods that use them (corrclip, METHOD+masks): "
                             + "; ".join(MASK_SPEC_FORMS.values()) + " (generators need the masks extra)")


def masks_from_args(args: argparse.Namespace):
    """The mask source of ``--masks`` (None without it); a bad spec is a one-line error."""
    spec = getattr(args, "masks", None)
    if not spec:
        return None
    from ..masks import mask_source

    return mask_source(spec, device=getattr(args, "device", None))


def method_list() -> str:
    from ..methods import METHODS, PLUGINS

    names = ", ".join(sorted(METHODS))
    return names + (f" (plugins: {', '.join('+' + p for p in sorted(PLUGINS))})" if PLUGINS else "")


# ---------------------------------------------------------------------------------------------- values
def inference_options(args: argparse.Namespace) -> dict[str, Any]:
    """The inference settings the user gave (flags), as InferenceConfig keyword arguments."""
    return {field: getattr(args, dest) for dest, field in INFERENCE_FLAGS.items()
            if getattr(args, dest, None) is not None}


def segmenter_options(args: argparse.Namespace) -> dict[str, Any]:
    """Flags plus ``--option`` items, checked for clashes."""
    options = inference_options(args)
    for flag in ("vfm", "vfm_checkpoint"):  # method options with their own flags
        if getattr(args, flag, None) is not None:
            options[flag] = getattr(args, flag)
    extra = parse_options(getattr(args, "option", []) or [])
    for key in extra:
        if key in options:
            flag = "--" + key.replace("_", "-")
            raise RfclipError(f"'{key}' given both as {flag} and as --option; give it once")
    options.update(extra)
    return options


# ---------------------------------------------------------------------------------------------- checks
def check_checkpoint_path(path: str | None) -> None:
    """Fail early (before anything loads) on a checkpoint path that does not exist."""
    if path is None:
        return
    from .._io import file_problem

    problem = file_problem(path)
    if problem == "not found":
        raise RfclipError(f"checkpoint not found: {path}; check the path given to --checkpoint")
    if problem is not None and problem != "is a folder, not a file":  # a folder: a Hugging Face checkpoint
        raise RfclipError(f"checkpoint {path} {problem}; give a checkpoint file or folder to --checkpoint")


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is, or can be created as, a writable folder; create nothing yet."""
    out = Path(path)
    try:
        return _check_output_dir(out)
    except OSError as err:  # e.g. a name too long for the file system
        raise RfclipError(f"cannot use output folder {out}: {err.strerror or err}; choose another --out") from None


def _check_output_dir(out: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise RfclipError(f"output path {out} exists and is not a folder; choose another --out")
        if not os.access(out, os.W_OK | os.X_OK):
            raise RfclipError(f"output folder {out} is not writable; choose another --out")
        return out
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RfclipError(f"cannot create output folder {out}: {parent} is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RfclipError(f"cannot create output folder {out}: {parent} is not writable; choose another --out")
    return out


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create the output folder now, before the model loads (an ``--out`` that passes :func:`check_output_dir`
    but cannot be created, e.g. a name too long, fails at once), and remove the folders made here again when the
    command leaves them empty (an error, or nothing written). A folder that existed before is never removed."""
    out = check_output_dir(path)
    missing = []
    probe = out.absolute()
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as err:
        _remove_empty(created)
        raise RfclipError(f"cannot create output folder {out}: {err.strerror or err}; choose another --out") from None
    try:
        yield out
    finally:
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):  # deepest first; stop at the first that holds something
        try:
            folder.rmdir()
        except OSError:
            return


def build_segmenter(args: argparse.Namespace, **overrides):
    """A Segmenter from the shared options (model, method, plugins, device, inference settings, --option)."""
    from ..devices import reuse_cpu_memory_from_env
    from ..segmenter import Segmenter

    check_checkpoint_path(args.checkpoint)
    options = segmenter_options(args)
    if "masks" not in overrides:  # --masks: loaded before the CLIP model (a bad spec fails first)
        options["masks"] = masks_from_args(args)
    options.update(overrides)
    seg = Segmenter(args.model, args.pretrained, method=args.method, plugins=tuple(args.plugin or ()),
                    checkpoint=args.checkpoint, device=args.device, quick_gelu=getattr(args, "quick_gelu", None),
                    **options)
    reuse_cpu_memory_from_env(seg.device)  # the command line owns its process: keep large CPU buffers for reuse
    return seg
