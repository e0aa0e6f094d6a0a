"""``rfclip explain``: draw RF-CLIP's diagnostics (the paper's explainability figures) for one image."""

from __future__ import annotations

import argparse

from ..errors import RfclipError
from . import common

DESCRIPTION = """\
Look inside CLIP the way the RF-CLIP paper does. For one image, writes PNGs of: the attention of a query point
in every layer before and after redistribution, the distraction tokens (red) and defocused tokens (green) per
layer, the distraction score per layer, the normalized-cut (Fiedler) vector of each layer that redistributes
(fiedler.png only when some layer finds distraction tokens), and the per-dimension mean embedding weight with the
distraction dimensions marked (Figure 3 style); plus summary.json."""

EXAMPLES = """\
examples:
  rfclip explain examples/street.jpg --classes "road;car;tree;sky" --out explain/
  rfclip explain photo.jpg --query 120,80 --layers 4-11 --out explain/
  rfclip explain photo.jpg --checkpoint ViT-B-16.pt --option beta=0.4 --out explain/
"""


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels, got '{text}'") from None
    return x, y


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="draw RF-CLIP's per-layer attention diagnostics for an image",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="the image to explain (JPEG, PNG, ...)")
    p.add_argument("--classes", metavar="LIST", help='optional classes, e.g. "road;car;sky": adds segmentation.png')
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--query", type=_point, metavar="X,Y", help="query point in image pixels (default: the centre)")
    p.add_argument("--layers", metavar="LIST", help='layers to draw, 0-based, e.g. "0-5,11" (default: all)')
    common.add_model_options(p)
    common.add_method_options(p, default_method="rfclip")
    common.add_inference_options(p)


def run(args) -> int:
    from ..explain import check_query_point, explain
    from ..inference import load_image
    from ..text import parse_classes

    # Everything the user typed is checked before the model loads.
    image = load_image(args.image)
    classes = parse_classes(args.classes) if args.classes is not None else None
    if args.query is not None:
        check_query_point(args.query, image.shape[:2])
    out = common.check_output_dir(args.out)
    common.check_checkpoint_path(args.checkpoint)
    with common.output_folder(out):  # created now; removed again if the run ends with nothing in it
        segmenter = common.build_segmenter(args)
        result = explain(segmenter, image, classes=classes, out_dir=out, query_point=args.query, layers=args.layers)
    if not result.files:
        raise RfclipError("explain wrote no files")
    for path in result.files.values():
        print(path)
    return 0
