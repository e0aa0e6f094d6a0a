"""Options shared by the subcommands: model, method, inference settings, and helpers to turn them into a
:class:`rfclip.segmenter.Segmenter`.

Every inference option defaults to ``None`` here, meaning "the library default" (:class:`InferenceConfig`), so the
CLI never duplicates a default; :func:`inference_options` returns only the options the user gave.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..errors import RfclipError

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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                       help=f"open_clip model name (default: {DEFAULT_MODEL}; also ViT-L-14, ViT-L-14-336, ViT-B-32, ...)")
    group.add_argument("--pretrained", default=DEFAULT_PRETRAINED, metavar="TAG",
                       help=f"open_clip pretrained tag, downloaded on first use (default: {DEFAULT_PRETRAINED})")
    group.add_argument("--checkpoint", metavar="FILE",
                       help="load weights from a local file or folder instead of downloading (OpenAI .pt, open_clip "
                            ".pt/.bin, .safetensors, Hugging Face folder); --model must name its architecture")
    group.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=None,
                       help="force QuickGELU (OpenAI weights re-saved as plain fp32 state dicts; default: decided "
                            "from the checkpoint's origin)")
    group.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def add_method_options(parser: argparse.ArgumentParser, default_method: str | None = None) -> None:
    if default_method is None:
        from ..segmenter import DEFAULT_METHOD

        default_method = DEFAULT_METHOD
    group = parser.add_argument_group("method")
    group.add_argument("--method", default=default_method, metavar="NAME",
                       help=f"segmentation method (default: {default_method}); one of {method_list()}; "
                            "add a plugin with '+', e.g. naclip+fsa")
    group.add_argument("--plugin", action="append", default=[], metavar="NAME",
                       help="add a plugin to the method (repeatable), e.g. --plugin fsa")
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a method or inference option (repeatable), e.g. --option gaussian_std=3 or "
                            "--option distraction_dims=4,162,474; values are read as int, float, true/false, "
                            "none or comma-separated lists")
    group.add_argument("--vfm", metavar="NAME", help="vision foundation model of proxyclip (timm name or dino, "
                       "dino_b16, dinov2, mae; default: DINO ViT-B/8)")
    group.add_argument("--vfm-checkpoint", metavar="FILE", help="local weights for --vfm (safetensors or PyTorch file)")


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference (defaults: the papers' protocol)")
    group.add_argument("--short-side", type=_non_negative_int, metavar="PX",
                       help="resize so the short side is PX before the sliding window (default: 336; 0 keeps the size)")
    group.add_argument("--slide-crop", type=_non_negative_int, metavar="PX",
                       help="sliding-window crop size (default: 224; 0 = whole image in one forward)")
    group.add_argument("--slide-stride", type=_positive_int, metavar="PX", help="sliding-window stride (default: 112)")
    group.add_argument("--prob-thd", type=_float, metavar="P",
                       help="pixels whose best class probability is below P get class 0 (default: 0 = off)")
    group.add_argument("--logit-scale", type=_float, metavar="S", help="softmax temperature over classes (default: 40)")
    group.add_argument("--pamr", action="store_true", default=None,
                       help="refine the masks with PAMR (pixel-adaptive mask refinement)")
    group.add_argument("--batch-size", type=_positive_int, metavar="N",
                       help="crops per forward pass; lower it if memory runs out (default: 64)")
    group.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                       help="compute precision (default: auto = bf16/fp16 on CUDA, fp32 on CPU)")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the image encoder (pays off on a GPU over many images; the first "
                            "batches are slow while it compiles)")


def add_images_per_batch_option(group) -> None:
    """``--images-per-batch``: how many images' crops are batched together (segment, eval)."""
    group.add_argument("--images-per-batch", type=_positive_int, default=4, metavar="N",
                       help="images whose crops share forward passes (default: 4)")


def method_list() -> str:
    from ..methods import METHODS, PLUGINS

    names = ", ".join(sorted(METHODS))
    return names + (f" (plugins: {', '.join('+' + p for p in sorted(PLUGINS))})" if PLUGINS else "")


# ---------------------------------------------------------------------------------------------- values
def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, ``"1,2,3"`` -> [1, 2, 3],
    ``"[1, 2]"``/JSON -> as JSON; anything else stays a string."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text[:1] in "[{\"":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["beta=0.4", "distraction_dims=4,162"]`` -> ``{"beta": 0.4, "distraction_dims": [4, 162]}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise RfclipError(f"bad --option '{item}'; write it as KEY=VALUE, e.g. --option gaussian_std=3")
        if key in options:
            raise RfclipError(f"--option {key} given twice; give it once")
        options[key] = parse_value(value)
    return options


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
    if not os.path.exists(path):
        raise RfclipError(f"checkpoint not found: {path}; check the path given to --checkpoint")


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is, or can be created as, a writable folder; create nothing yet."""
    out = Path(path)
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


def build_segmenter(args: argparse.Namespace, **overrides):
    """A Segmenter from the shared options (model, method, plugins, device, inference settings, --option)."""
    from ..segmenter import Segmenter

    check_checkpoint_path(args.checkpoint)
    options = segmenter_options(args)
    options.update(overrides)
    return Segmenter(args.model, args.pretrained, method=args.method, plugins=tuple(args.plugin or ()),
                     checkpoint=args.checkpoint, device=args.device, quick_gelu=getattr(args, "quick_gelu", None),
                     **options)


def describe_model(segmenter, args: argparse.Namespace) -> dict[str, Any]:
    clip = segmenter.clip
    return {
        "name": getattr(clip, "name", args.model),
        "pretrained": getattr(clip, "pretrained", None),
        "source": getattr(clip, "source", None),
        "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
    }
