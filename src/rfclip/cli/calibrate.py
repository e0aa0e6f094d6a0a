"""``rfclip calibrate``: find a backbone's distraction dimensions (RF-CLIP needs them) from a folder of images."""

from __future__ import annotations

import argparse
import sys

from ..constants import LONG_SIDE_CAP, RF_CALIBRATE_TOPK
from ..errors import RfclipError
from . import common

DESCRIPTION = """\
Find the distraction dimensions of a CLIP backbone the way the RF-CLIP paper does: the peaks of the
per-dimension mean normalised embedding weight over a set of images (its Figure 3). The result is saved where
`rfclip segment --method rfclip` looks for it, so calibrate once per backbone. OpenAI ViT-B-16 and ViT-L-14
have built-in dimensions and need no calibration."""

EXAMPLES = """\
examples:
  rfclip calibrate --model ViT-B-16 --pretrained laion2b_s34b_b88k photos/
  rfclip calibrate --model ViT-B-16 --checkpoint my_clip.safetensors photos/ --max-images 500
  rfclip calibrate --model ViT-L-14 --pretrained datacomp_xl_s13b_b90k photos/ --out dims.json
      (then: rfclip segment IMG --classes ... --option dims_file=dims.json)
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="find a backbone's distraction dimensions for RF-CLIP",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", metavar="IMAGES", help="a folder of natural images (searched recursively) or one image")
    p.add_argument("--topk", type=common._positive_int, default=RF_CALIBRATE_TOPK, metavar="K",
                   help=f"number of dimensions to keep (default: {RF_CALIBRATE_TOPK}, as for the paper's backbones)")
    p.add_argument("--out", metavar="FILE", help="JSON file to write (default: the cache file RF-CLIP reads)")
    p.add_argument("--max-images", type=common._positive_int, metavar="N", help="use at most N images")
    p.add_argument("--image-size", type=common._positive_int, metavar="PX",
                   help="square crop side (default: the model's native input size)")
    p.add_argument("--batch-size", type=common._positive_int, default=16, metavar="N",
                   help="images per forward pass; lower it if memory runs out (default: 16)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="compute precision (default: auto = bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors and the result")
    common.add_model_options(p)


def run(args) -> int:
    from ..calibrate import calibrate

    from ..calibrate import list_images

    list_images(args.images)  # a missing path, a FIFO or a folder without images: said before the model loads
    common.check_checkpoint_path(args.checkpoint)
    if args.out is not None:  # before the model loads and the images are read
        from .._io import check_writable_file

        check_writable_file(args.out, "choose another --out")
    if args.image_size is not None and args.image_size > LONG_SIDE_CAP:
        raise RfclipError(f"--image-size {args.image_size} is larger than {LONG_SIDE_CAP} px; give a crop side up to "
                          f"{LONG_SIDE_CAP} (default: the model's native input size)")

    def progress(done: int, total: int) -> None:
        if not args.quiet and sys.stderr.isatty():
            print(f"\rcalibrating: {done}/{total} images", end="" if done < total else "\n", file=sys.stderr)

    from ..models.loading import load_clip
    from ..devices import resolve_device, reuse_cpu_memory_from_env

    device = resolve_device(args.device)
    reuse_cpu_memory_from_env(device)
    clip = load_clip(args.model, args.pretrained, checkpoint=args.checkpoint, device=device, quick_gelu=args.quick_gelu)
    result = calibrate(clip, args.images, topk=args.topk, device=device, image_size=args.image_size, batch_size=args.batch_size,
                       max_images=args.max_images, out_file=args.out, precision=args.precision, progress=progress,
                       on_skip=lambda message: print(f"rfclip: {message}", file=sys.stderr, flush=True))
    print(result.summary())
    if result.warning():
        print(f"rfclip: warning: {result.warning()}", file=sys.stderr)
    print("distraction_dims=" + ",".join(str(d) for d in result.dims))
    if result.skipped:  # as `rfclip segment`: the others were used, and the run says so in its status
        raise RfclipError(f"{len(result.skipped)} of {result.num_images + len(result.skipped)} images could not be "
                          "read and were skipped (see above); fix or remove them and calibrate again")
    return 0
