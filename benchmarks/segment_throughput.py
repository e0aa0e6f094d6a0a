"""What does ``rfclip segment`` cost beyond the model? Images/s of ``rfclip segment DIR --format png`` (JPEG
decoding, PNG writing by the background writer, the resume check, run.json) against ``Segmenter.predict`` on the
same images already decoded in memory, in one run, on one model; then 2 torchrun processes of 1 thread each
against 1 process of 2 threads.

A folder of ``--images`` JPEGs of VOC's size (500 x 375; smooth random content) is written to a temporary folder,
and a random-weight model with the real ViT-B/16 image encoder (tiny text encoder: the text side is not what is
measured) is saved as a safetensors checkpoint, which ``rfclip segment`` loads as a user's would. Interleaved over
``--repeats`` rounds (fastest kept):

* ``in memory``: ``Segmenter.predict`` over the decoded images, ``--images-per-batch`` per call;
* ``segment --format png``: ``rfclip segment`` in this process (``--overwrite``: every image again); its loop time
  (first batch decoded to the last PNG on disk) comes from ``run.json``; model loading is not counted in either.

Each is also given per CPU-second of the process (``time.process_time``, all threads): on a machine shared with
other jobs wall-clock rates swing with their load, CPU time much less.

Then (``--torchrun``) two command-line runs in fresh processes: ``torchrun --nproc_per_node 2`` with
``OMP_NUM_THREADS=1``, and one process with ``OMP_NUM_THREADS=2``; job images/s = images / the slowest rank's loop.

    python benchmarks/segment_throughput.py --images 12 --torchrun --json segment_cpu.json
    python benchmarks/segment_throughput.py --device cuda --images 400 --num-workers 0,4   # a GPU: decoding workers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import device_name, voc_like_images  # noqa: E402

VIT_B16_TINY_TEXT = dict(embed_dim=512, quick_gelu=True, vision_cfg=dict(image_size=224, layers=12, width=768,
                                                                         patch_size=16),
                         text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
CLASSES = "aeroplane;bicycle;bird;boat;bottle;bus;car;cat;chair;cow;table;dog;horse;motorbike;person;plant;sheep;sofa;train;monitor"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--size", default="375x500", help="HxW of the JPEGs (default: VOC's 375x500)")
    p.add_argument("--method", default="clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images-per-batch", type=int, default=4)
    p.add_argument("--num-workers", default="0", help="comma-separated DataLoader worker counts for segment")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torchrun", action="store_true", help="also 2 processes x 1 thread vs 1 process x 2 threads")
    p.add_argument("--json", metavar="FILE")
    return p.parse_args(argv)


def write_inputs(root: Path, n: int, size: tuple[int, int]) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from rfclip.models.loading import random_clip

    folder = root / "jpegs"
    folder.mkdir()
    for i, img in enumerate(voc_like_images(n, size[0], size[1], seed=0)):
        Image.fromarray(img).save(folder / f"2007_{i:06d}.jpg", quality=90)
    clip = random_clip(VIT_B16_TINY_TEXT, quick_gelu=True, seed=0)
    checkpoint = root / "vitb16.safetensors"
    save_file({k: v.half().contiguous() for k, v in clip.model.state_dict().items()}, str(checkpoint))
    return folder, checkpoint


def segment_argv(folder: Path, out: Path, checkpoint: Path, args, workers: int) -> list[str]:
    return ["segment", str(folder), "--classes", CLASSES, "--out", str(out), "--format", "png", "--overwrite",
            "--quiet", "--checkpoint", str(checkpoint), "--method", args.method, "--device", args.device,
            "--images-per-batch", str(args.images_per_batch), "--num-workers", str(workers)]


def loop_rate(out: Path) -> tuple[float, dict]:
    run = json.loads((out / "run.json").read_text())
    seconds = max(r["seconds"] for r in run["per_rank"])
    return run["counts"]["segmented"] / seconds, run


def cpu_rate(run: dict) -> float:
    """Images per CPU-second of the loop (all processes): robust where other jobs share the cores."""
    return run["counts"]["segmented"] / sum(r["cpu_seconds"] for r in run["per_rank"])


def main(argv=None) -> dict:
    from rfclip.cli import main as cli
    from rfclip.devices import reuse_cpu_memory_from_env
    from rfclip.inference import read_image
    from rfclip.segmenter import Segmenter

    args = parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    workers = [int(w) for w in args.num_workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="rfclip-segbench-"))
    os.environ.setdefault("RFCLIP_CACHE", str(root / "cache"))
    folder, checkpoint = write_inputs(root, args.images, size)
    paths = sorted(folder.iterdir())

    seg = Segmenter("ViT-B-16", checkpoint=checkpoint, method=args.method, device=args.device)
    reuse_cpu_memory_from_env(seg.device)  # as the command line does (a process-wide setting: both sides get it)
    text = seg.encode_classes(CLASSES)
    images = [read_image(p)[0] for p in paths]
    ipb = args.images_per_batch
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}  # images per CPU-second
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, len(images), ipb):
            for mask, _ in seg.predict(images[s:s + ipb], text, return_probs=False):
                mask.cpu()
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        best["in memory"] = max(best.get("in memory", 0), len(images) / (time.perf_counter() - t0))
        best_cpu["in memory"] = max(best_cpu.get("in memory", 0), len(images) / (time.process_time() - c0))
        for w in workers:
            out = root / f"out_w{w}"
            assert cli(segment_argv(folder, out, checkpoint, args, w)) == 0
            key = f"segment --format png (workers {w})"
            rate, run = loop_rate(out)
            best[key] = max(best.get(key, 0), rate)
            best_cpu[key] = max(best_cpu.get(key, 0), cpu_rate(run))

    result = {"device": device_name(seg.device), "images": args.images, "size": args.size, "method": args.method,
              "images_per_batch": ipb, "images_per_s": best,
              "ratio_segment_vs_memory": {k: v / best["in memory"] for k, v in best.items() if k != "in memory"}}
    print(f"{result['device']}; {args.images} JPEGs {size[1]}x{size[0]}, method {args.method}, random ViT-B/16, "
          f"{ipb} images per batch, best of {args.repeats}")
    for k, v in best.items():
        ratio = "" if k == "in memory" else f"  ({v / best['in memory']:.3f}x in memory)"
        cpu = best_cpu[k]
        cpu_ratio = "" if k == "in memory" else f" ({cpu / best_cpu['in memory']:.3f}x)"
        print(f"  {k:34s} {v:6.3f} images/s{ratio}; {cpu:6.3f} images per CPU-second{cpu_ratio}")

    if args.torchrun:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        runs = {}
        for label, threads, launcher in (
                ("1 process x 2 threads", "2", [sys.executable, "-m", "rfclip"]),
                ("2 torchrun processes x 1 thread", "1", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node", "2", "-m", "rfclip"])):
            out = root / f"out_{threads}"
            t0 = time.perf_counter()
            proc = subprocess.run([*launcher, *segment_argv(folder, out, checkpoint, args, 0)],
                                  env=dict(env, OMP_NUM_THREADS=threads), capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            rate, run = loop_rate(out)
            runs[label] = {"images_per_s": rate, "wall_s": wall, "images_per_cpu_s": cpu_rate(run),
                           "per_rank_images_per_s": [r["images_per_s"] for r in run["per_rank"]]}
        base = runs["1 process x 2 threads"]["images_per_s"]
        for label, r in runs.items():
            print(f"  {label:34s} {r['images_per_s']:6.3f} images/s ({r['images_per_s'] / base:.3f}x), "
                  f"{r['images_per_cpu_s']:.3f} images per CPU-second, {r['wall_s']:.1f} s wall with model loading")
        result["torchrun"] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
