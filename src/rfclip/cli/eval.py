"""``rfclip eval`` (one benchmark), ``rfclip eval-all`` (the 8 benchmarks) and ``rfclip convert-coco-object``.

Both evaluation commands run on several GPUs / nodes when launched with torchrun (``torchrun --nproc_per_node 8
-m rfclip eval ...``): the images are shared out, the counts summed, and rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..errors import RfclipError
from . import common

EVAL_EXAMPLES = """\
examples:
  rfclip eval --dataset voc21 --root data/VOCdevkit/VOC2012 --method rfclip
  rfclip eval --dataset ade20k --root data/ADEChallengeData2016 --method naclip --pamr --out results/ade.json
  rfclip eval --dataset voc21 --root data/VOCdevkit/VOC2012 --method naclip+fsa --preset fsa --limit 100
  rfclip eval --dataset voc21 --root data/VOCdevkit/VOC2012 --preset rfclip_release   (the released RF-CLIP code)
  torchrun --nproc_per_node 4 -m rfclip eval --dataset coco_stuff --root data/coco_stuff164k --method rfclip

--root is the dataset's mmsegmentation data_root:
  voc21, voc20          .../VOCdevkit/VOC2012
  context60, context59  .../VOCdevkit/VOC2010
  coco_stuff            .../coco_stuff164k
  coco_object           .../coco_stuff164k after `rfclip convert-coco-object` (or its -o folder)
  ade20k                .../ADEChallengeData2016
  cityscapes            .../cityscapes

"""

EVAL_ALL_EXAMPLES = """\
--root-dir holds the datasets under mmsegmentation's default folder names:
  VOCdevkit/VOC2012, VOCdevkit/VOC2010, coco_stuff164k (with COCO-Object labels from convert-coco-object, or a
  coco_object folder), ADEChallengeData2016, cityscapes. Missing datasets are reported and skipped.

examples:
  rfclip eval-all --root-dir data --method rfclip --out-dir results/rfclip
  rfclip eval-all --root-dir data --method naclip --pamr --datasets voc21 context60 --out-dir results/naclip
  rfclip eval-all --root-dir data --preset rfclip_release --out-dir results/rfclip_release
  torchrun --nproc_per_node 8 -m rfclip eval-all --root-dir data --method rfclip --out-dir results/rfclip
"""


def presets_help(info) -> str:
    """The epilog's list of settings presets, from their one-line descriptions (data.settings.PRESET_INFO)."""
    import textwrap

    width = max(len(name) for name in info)
    lines = ["presets (each paper's configs: per-dataset resize, sliding window, logit scale, thresholds, crop",
             "padding; every preset normalises with the mmseg-rounded CLIP mean/std its code uses; the README lists",
             "the tables and their sources):"]
    for name, preset in info.items():
        body = textwrap.wrap(preset.description, 112 - width - 4)
        lines.append(f"  {name:<{width}}  {body[0]}")
        lines += [" " * (width + 4) + more for more in body[1:]]
    return "\n".join(lines) + "\n"


def add_parser(subparsers) -> None:
    from ..data import DATASET_NAMES, PRESETS
    from ..data.settings import PRESET_INFO

    p = subparsers.add_parser(
        "eval", help="evaluate mIoU on one benchmark",
        description="Evaluate mIoU on one of the 8 benchmarks (mmsegmentation folder layout). Prints the per-class "
                    "IoU table, mIoU and aAcc, and writes them as JSON and CSV.",
        epilog=EVAL_EXAMPLES + "\n" + presets_help(PRESET_INFO), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"one of: {', '.join(DATASET_NAMES)}")
    p.add_argument("--root", required=True, metavar="DIR", help="the dataset's data_root (see below)")
    p.add_argument("--split", metavar="NAME", help="split to evaluate (default: the benchmark's validation split)")
    p.add_argument("--out", "-o", metavar="FILE",
                   help="results JSON; the per-class CSV goes next to it (default: rfclip-results/DATASET-METHOD.json)")
    _add_eval_options(p, PRESETS)
    common.add_masks_option(p)
    p.set_defaults(_run=run_eval)

    p = subparsers.add_parser(
        "eval-all", help="evaluate the 8 benchmarks and write a results table",
        description="Evaluate mIoU on the 8 benchmarks found under --root-dir and write a markdown table in the "
                    "RF-CLIP paper's column order (with the paper's RF-CLIP row for ViT-B-16 / ViT-L-14), plus "
                    "JSON and CSV per dataset.",
        epilog=EVAL_ALL_EXAMPLES + "\n" + presets_help(PRESET_INFO),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root-dir", required=True, metavar="DIR", help="folder holding the datasets (see below)")
    p.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="evaluate only these (default: all 8, in the paper's order)")
    p.add_argument("--out-dir", default="rfclip-results", metavar="DIR",
                   help="where results.md, results.json and DATASET.json/.csv go (default: rfclip-results)")
    _add_eval_options(p, PRESETS)
    p.set_defaults(_run=run_eval_all)

    p = subparsers.add_parser(
        "convert-coco-object", help="make COCO-Object labels from raw COCO-Stuff164k annotations",
        description="Write COCO-Object labels (*_instanceTrainIds.png: background 0, the 80 COCO things 1..80) from "
                    "the raw COCO-Stuff164k annotations (stuffthingmaps_trainval2017.zip unpacked into annotations/).",
        epilog="example:\n  rfclip convert-coco-object data/coco_stuff164k -o data/coco_object\n"
               "  rfclip eval --dataset coco_object --root data/coco_object",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("coco_stuff_root", metavar="COCO_STUFF_ROOT",
                   help="the coco_stuff164k folder (images/<split>/*.jpg, annotations/<split>/*.png)")
    p.add_argument("--out", "-o", metavar="DIR",
                   help="output data_root (default: write next to the raw labels); images are copied there")
    p.add_argument("--split", action="append", dest="splits", metavar="NAME",
                   help="split to convert (repeatable; default: val2017)")
    p.add_argument("--check-count", action="store_true",
                   help="check that train2017 + val2017 hold all 123287 raw labels")
    p.add_argument("--num-workers", type=common._non_negative_int, default=8, metavar="N",
                   help="threads writing labels (default: 8)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(_run=run_convert)


def _add_eval_options(p: argparse.ArgumentParser, presets) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--preset", default="default", choices=list(presets),
                   help="per-dataset settings of a paper's protocol (default: default, the common SCLIP/NACLIP "
                        "protocol; see below); the inference flags below override it")
    g.add_argument("--limit", type=common._positive_int, metavar="N", help="evaluate only the first N images")
    g.add_argument("--num-workers", type=common._non_negative_int, default=None, metavar="N",
                   help="processes decoding images (default: 4 on a GPU, 0 = none on CPU, where the model already "
                        "uses every core)")
    common.add_images_per_batch_option(g)
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no table; print only the summary")
    common.add_model_options(p)
    common.add_method_options(p, from_preset=True)
    common.add_inference_options(p)


def run(args) -> int:
    """Dispatch on the subcommand (each parser also sets its own ``_run``)."""
    handlers = {"eval": run_eval, "eval-all": run_eval_all, "convert-coco-object": run_convert}
    return handlers[args.command](args)


# ---------------------------------------------------------------------------------------------- helpers
def _overrides(args) -> dict:
    """Inference settings the user gave (flags and --option items) that take precedence over the preset."""
    from ..inference import InferenceConfig

    names = InferenceConfig.field_names()
    return {k: v for k, v in common.segmenter_options(args).items() if k in names}


def _segmenter(args, dist_info):
    """The Segmenter on this process's device (cuda:LOCAL_RANK under torchrun)."""
    run_args = argparse.Namespace(**vars(args))
    if dist_info.device is not None:
        run_args.device = str(dist_info.device)
    return common.build_segmenter(run_args)


def _output_folder(path: Path, dist_info):
    """The output folder, created before the model loads and removed if left empty (by the main process only)."""
    return common.output_folder(path) if dist_info.is_main else contextlib.nullcontext(path)


def _progress(args) -> bool:
    """Progress bars only on a terminal (as ``segment``): redirected logs get no carriage-return noise."""
    return not args.quiet and sys.stderr.isatty()


def _say(dist_info, *lines: str, file=None) -> None:
    if dist_info.is_main:
        for line in lines:
            print(line, file=file or sys.stdout, flush=True)


def _check_out_file(path: Path) -> Path:
    from ..evaluate import result_paths

    json_path, _ = result_paths(path)
    common.check_output_dir(json_path.parent)
    return json_path


def _run_line(result: dict) -> str:
    n = result["num_images"]
    procs = result["world_size"]
    return (f"{result['num_images']} image{'s' if n != 1 else ''} in {result['seconds']:.1f} s: "
            f"{result['images_per_s']:.2f} images/s on {result['device']}"
            + (f" x {procs} processes" if procs > 1 else "") + f" ({result['precision']})")


def _header(result: dict, title: str) -> str:
    from ..evaluate import describe_settings

    model = result["model"]
    return (f"{title} ({result['split']}, {result['root']}) | method {result['method']} | model {model['name']} "
            f"({model['pretrained'] or model['source']}) | preset {result['preset']}: "
            f"{describe_settings(result['settings'])}")


def _check_preset_method(args, datasets) -> None:
    """Resolve ``args.method`` from the preset; say once when the preset's method options do not apply to it."""
    from ..methods import method_option_names

    args.method = common.resolve_method(args)
    taken = method_option_names(args.method, args.plugin or ())  # an unknown method fails here, before loading
    options = sorted({k for d in datasets for k in d.settings.method_options})
    left = [k for k in options if k not in taken]
    if left and not args.quiet and os.environ.get("RANK", "0") == "0":  # rank 0 only under torchrun
        print(f"rfclip: note: preset {args.preset} sets {', '.join(left)} for its own method; method {args.method} "
              "does not take them (the preset's inference settings still apply)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- eval
def run_eval(args) -> int:
    from ..data import build_dataset, canonical_dataset_name, format_table
    from ..evaluate import distributed_session, evaluate

    # Everything the user typed is checked before the model loads.
    name = canonical_dataset_name(args.dataset)
    dataset = build_dataset(name, args.root, preset=args.preset, split=args.split)
    _check_preset_method(args, [dataset])
    out = Path(args.out) if args.out else Path("rfclip-results") / f"{name}-{args.method}.json"
    out = _check_out_file(out)
    overrides = _overrides(args)
    common.check_checkpoint_path(args.checkpoint)

    with distributed_session(args.device) as dist_info, _output_folder(out.parent, dist_info):
        if not args.quiet and sys.stderr.isatty():
            _say(dist_info, f"rfclip: loading {args.checkpoint or f'{args.model} ({args.pretrained})'}, "
                            f"method {args.method} ...", file=sys.stderr)
        segmenter = _segmenter(args, dist_info)
        result = evaluate(segmenter, dataset, limit=args.limit, num_workers=args.num_workers,
                          images_per_batch=args.images_per_batch, progress=_progress(args), out=out,
                          overrides=overrides)
        title = dataset.spec.title
        if not args.quiet:
            _say(dist_info, _header(result, title), "", format_table(result, result["class_names"]), "")
        _say(dist_info, f"{title}: mIoU {result['miou']:.2f}  aAcc {result['aacc']:.2f}  ({_run_line(result)})")
        if result["outputs"]:
            _say(dist_info, f"wrote {result['outputs']['json']} and {result['outputs']['csv']}")
    return 0


# ---------------------------------------------------------------------------------------------- eval-all
def run_eval_all(args) -> int:
    from ..constants import PAPER_COLUMNS
    from ..data import DATASETS, atomic_write_text, build_dataset, canonical_dataset_name, find_dataset_root, write_json
    from ..evaluate import distributed_session, evaluate, summary_markdown

    names = [canonical_dataset_name(n) for n in (args.datasets or PAPER_COLUMNS)]
    names = list(dict.fromkeys(names))  # each once, in the order given
    root_dir = Path(args.root_dir).expanduser()
    if not root_dir.is_dir():
        raise RfclipError(f"--root-dir {root_dir} does not exist; point it at the folder holding the datasets")
    datasets, missing = {}, {}
    for name in names:
        try:
            root = find_dataset_root(name, root_dir)
            datasets[name] = build_dataset(name, root, preset=args.preset)
        except RfclipError as err:
            missing[name] = str(err)
    if not datasets:
        raise RfclipError(f"none of {', '.join(names)} was found under --root-dir {root_dir}; see "
                          "'rfclip eval-all --help' for the expected folder names")
    _check_preset_method(args, datasets.values())
    out_dir = common.check_output_dir(args.out_dir)
    overrides = _overrides(args)
    common.check_checkpoint_path(args.checkpoint)

    with distributed_session(args.device) as dist_info, _output_folder(out_dir, dist_info):
        for name, reason in missing.items():
            _say(dist_info, f"skipping {DATASETS[name].title}: {reason}", file=sys.stderr)
        segmenter = _segmenter(args, dist_info)
        results = {}
        for name, dataset in datasets.items():
            result = evaluate(segmenter, dataset, limit=args.limit, num_workers=args.num_workers,
                              images_per_batch=args.images_per_batch, progress=_progress(args),
                              out=out_dir / f"{name}.json", overrides=overrides)
            results[name] = result
            _say(dist_info, f"{dataset.spec.title}: mIoU {result['miou']:.2f}  aAcc {result['aacc']:.2f}  "
                            f"({_run_line(result)})")
        if dist_info.is_main:
            text = summary_markdown(results, missing)
            md_path = atomic_write_text(out_dir / "results.md", text)
            summary = {"miou": {n: r["miou"] for n, r in results.items()},
                       "aacc": {n: r["aacc"] for n, r in results.items()},
                       "average_miou": sum(r["miou"] for r in results.values()) / len(results),
                       "missing": missing}
            write_json(out_dir / "results.json", summary,
                       meta={"method": segmenter.method_name, "preset": args.preset, "limit": args.limit,
                             "model": next(iter(results.values()))["model"], "overrides": overrides,
                             "datasets": {n: str(d.root) for n, d in datasets.items()}})
            if not args.quiet:
                print("\n" + text)
            print(f"wrote {md_path}, {out_dir / 'results.json'} and DATASET.json/.csv for "
                  f"{len(results)} dataset(s) in {out_dir}" + (f"; skipped {len(missing)}: {', '.join(missing)}"
                                                                if missing else ""))
    return 0


# ---------------------------------------------------------------------------------------------- convert
def run_convert(args) -> int:
    from ..data import convert_coco_object

    splits = tuple(args.splits or ("val2017",))
    done = convert_coco_object(args.coco_stuff_root, args.out, splits=splits, check_count=args.check_count,
                               num_workers=args.num_workers, progress=_progress(args))
    out = Path(args.out if args.out is not None else args.coco_stuff_root)
    if not args.quiet:
        for split, n in done.items():
            print(f"wrote {n} COCO-Object labels to {out / 'annotations' / split} (*_instanceTrainIds.png)")
        print(f"evaluate with: rfclip eval --dataset coco_object --root {out}")
    return 0
