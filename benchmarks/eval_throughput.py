"""Does ``rfclip eval`` keep the model busy? Images/s of :func:`rfclip.evaluate.evaluate` (JPEG decoding and label
reading in DataLoader workers overlapping the forward, or in the main process) against :meth:`Segmenter.predict`
on the same images already decoded in memory, in one run, on one model.

A VOC2012-layout dataset of ``--images`` JPEGs of VOC's size (500 x 375 by default; smooth random content and
palette label PNGs) is written to a temporary folder (or ``--root``), a random-weight ViT-B/16 is built (no
download), and the class names are embedded once before timing (the text encoder is not timed: ``evaluate`` times
its prediction loop only, and both runs use the same embedded vocabulary). Then, interleaved over ``--repeats``
rounds (fastest kept):

* ``eval``: ``evaluate(segmenter, dataset, num_workers=W)`` for each W of ``--workers`` (0 = decode in the main
  process, between forwards; ``auto``: evaluate's default for the device, 0 on CPU, 4 on a GPU);
* ``in memory``: the same images, decoded before timing, through ``Segmenter.predict`` in groups of
  ``--images-per-batch`` (what ``evaluate`` calls per batch), masks copied to the host.

    python benchmarks/eval_throughput.py                        # 200 images, clip, CPU or the default GPU
    python benchmarks/eval_throughput.py --images 48 --method rfclip --workers auto,0,2 --json eval.json

``eval / in memory`` near 1.00 means the loader hides decoding; below 1, the forward waits for images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rfclip.data import build_dataset
from rfclip.devices import resolve_device, reuse_cpu_memory_from_env
from rfclip.evaluate import configure, evaluate
from rfclip.models.loading import random_clip
from rfclip.segmenter import Segmenter
from rfclip.viz import palette as palette_colours

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import B16_DISTRACTION_DIMS, device_name, voc_like_images  # noqa: E402


def write_voc(root: Path, n: int, height: int, width: int, seed: int) -> Path:
    """``root/VOCdevkit/VOC2012`` with ``n`` JPEG images, palette label PNGs and ``ImageSets/Segmentation/val.txt``."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = palette_colours(256).reshape(-1).tolist()  # label PNGs are palette images, as VOC's are
    names = []
    for i, img in enumerate(voc_like_images(n, height, width, seed)):
        name = f"2007_{i:06d}"
        Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        label = np.zeros((height, width), dtype=np.uint8)  # background, an object box, a void border
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        label[y:y + height // 3, x:x + width // 3] = rng.integers(1, 21)
        label[:2] = 255
        im = Image.frombytes("P", (width, height), label.tobytes())
        im.putpalette(palette)
        im.save(voc / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return voc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="images in the generated dataset (default 200)")
    p.add_argument("--image-size", default="375x500", help="HxW of the images (default 375x500, VOC's size)")
    p.add_argument("--method", default="clip", help="method spec (default clip)")
    p.add_argument("--workers", default="auto,2",
                   help="comma-separated DataLoader worker counts for eval; auto = evaluate()'s default for the "
                        "device (default auto,2)")
    p.add_argument("--images-per-batch", type=int, default=4, help="images per predict call (eval's default 4)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the fastest of each is kept")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--root", default=None, help="write the dataset here instead of a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    workers = [None if w.strip() == "auto" else int(w) for w in args.workers.split(",") if w.strip()]
    device = resolve_device(args.device)
    reuse = reuse_cpu_memory_from_env(device)  # as `rfclip eval` does (RFCLIP_REUSE_CPU_MEMORY=0: off)
    base, _, plugins = args.method.partition("+")
    options = {"distraction_dims": B16_DISTRACTION_DIMS} if base.startswith("rfclip") else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        t0 = time.perf_counter()
        voc = write_voc(root, args.images, height, width, args.seed)
        print(f"# wrote {args.images} images {height}x{width} (VOC2012 layout) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        dataset = build_dataset("voc21", voc)
        seg = Segmenter(random_clip("ViT-B-16", seed=args.seed), method=base,
                        plugins=[p for p in plugins.split("+") if p], device=device, text_cache=Path(tmp) / "text",
                        precision=args.precision, **options)
        text = seg.encode_classes(dataset.classes)  # cached on disk: evaluate() finds it there, untimed
        images = [dataset[i]["image"] for i in range(len(dataset))]  # decoded before timing
        # one warm-up batch (allocator, kernels) before anything is timed
        configure(seg, dataset).predict(images[: args.images_per_batch], text, return_probs=False)
        print(f"# {device_name(device)} | torch {torch.__version__} | random ViT-B/16 | {args.method} | "
              f"{args.images} images, {args.images_per_batch} per batch | reuse_cpu_memory {reuse}", flush=True)

        rows: dict[str, dict] = {}
        for rnd in range(args.repeats):
            for w in workers:
                result = evaluate(seg, dataset, num_workers=w, images_per_batch=args.images_per_batch,
                                  progress=False)
                key = f"eval, {result['num_workers']} workers" + (" (auto)" if w is None else "")
                if key not in rows or result["images_per_s"] > rows[key]["images_per_s"]:
                    rows[key] = {"images_per_s": result["images_per_s"], "seconds": result["seconds"],
                                 "miou": result["miou"]}
                print(f"[round {rnd + 1}] {key}: {result['images_per_s']:.3f} img/s", flush=True)
            cfg_seg = configure(seg, dataset)  # the dataset's settings, as evaluate() applies them
            start = time.perf_counter()
            for i in range(0, len(images), args.images_per_batch):
                for mask, _ in cfg_seg.predict(images[i:i + args.images_per_batch], text, return_probs=False):
                    mask.cpu()
            seconds = time.perf_counter() - start
            ips = len(images) / seconds
            if "in memory" not in rows or ips > rows["in memory"]["images_per_s"]:
                rows["in memory"] = {"images_per_s": ips, "seconds": seconds}
            print(f"[round {rnd + 1}] in memory: {ips:.3f} img/s", flush=True)

    mem = rows["in memory"]["images_per_s"]
    print("\n| run | img/s | vs in memory |\n|---|---|---|")
    for key, row in rows.items():
        row["vs_in_memory"] = row["images_per_s"] / mem
        print(f"| {key} | {row['images_per_s']:.3f} | {row['vs_in_memory']:.2f}x |")
    result = {"info": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "device": device_name(device), "torch": torch.__version__, "method": args.method,
                       "images": args.images, "image_size": [height, width],
                       "images_per_batch": args.images_per_batch, "repeats": args.repeats, "reuse_cpu_memory": reuse,
                       "command": "python benchmarks/eval_throughput.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv)},
              "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
