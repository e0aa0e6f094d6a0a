"""Where RF-CLIP's time goes: wall time of each of its steps inside the pipeline, next to plain dense CLIP.

Runs ``clip`` and ``rfclip`` on a random ViT-B/16 with distraction tokens planted in every layer
(:func:`rfclip.testing.plant_distraction_tokens`, 4 per 224 crop), VOC-sized images, and times RF-CLIP's steps by
wrapping the functions the method calls: distraction scores (eq. 6), the embedding filter (eq. 13), the explicit
attention maps (query-key and key-key softmax), the normalized cut (eq. 7-8, the solver alone and with the graph
built from the running key-key sum), the attention redistribution (eq. 9-12) and the running layer sums.
Interleaved rounds; the fastest round of each method is shown with its step times.

    python benchmarks/rfclip_steps.py                      # CPU: 6 images, default crops per forward
    python benchmarks/rfclip_steps.py --eig-solvers lanczos,power   # the cut solvers side by side
    python benchmarks/rfclip_steps.py --device cuda --images 32 --batch-size 64

On a GPU the steps are timed without synchronising (kernels run asynchronously), so only the totals count there.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

import rfclip.methods.rfclip as rf
from rfclip.devices import resolve_device, reuse_cpu_memory
from rfclip.segmenter import Segmenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (B16_DISTRACTION_DIMS, device_name, planted_model, random_model, random_text,  # noqa: E402
                        run_pipeline, voc_like_images)

STEPS = {  # name in the table -> (object, attribute) wrapped
    "distraction scores (eq. 6)": (rf, "distraction_scores"),
    "embedding filter (eq. 13)": (rf, "embed_redistribute"),
    "attention maps (q-k, k-k softmax)": (rf, "softmax_attention"),
    "normalized cut: solver (eq. 7-8)": (rf, "defocused_tokens"),
    "normalized cut: graph + solver": (rf.RFCLIP, "_targets"),
    "redistribution (eq. 9-12)": (rf, "redistribute_attention"),
    "running layer sums": (rf.LayerSum, "add"),
}


def wrap_steps(times: collections.Counter) -> None:
    for name, (owner, attr) in STEPS.items():
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                times[_name] += time.perf_counter() - t0

        setattr(owner, attr, timed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=None, help="crops per forward (default: rfclip's for the device)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--plant-tokens", type=int, default=4)
    p.add_argument("--eig-solvers", default="lanczos",
                   help="comma-separated eig_solver values, one rfclip run each (default: rfclip's default)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    reuse = device.type == "cpu" and reuse_cpu_memory(True)
    clip = random_model("ViT-B-16", 0)
    model = planted_model(clip, args.plant_tokens)
    model.model.to(device)
    text = random_text(21, model.model.visual.output_dim, 0)
    images = voc_like_images(args.images, 375, 500, seed=0)
    common = dict(device=device, text_cache=False, templates=["{}"], batch_size=args.batch_size)
    segs = {"clip": Segmenter(model, method="clip", **common)}
    for solver in args.eig_solvers.split(","):
        segs[f"rfclip (planted, {solver})"] = Segmenter(model, method="rfclip", distraction_dims=B16_DISTRACTION_DIMS,
                                                        eig_solver=solver, **common)
    times: collections.Counter = collections.Counter()
    wrap_steps(times)
    for seg in segs.values():
        run_pipeline(seg, images[:1], text, len(images))  # warm-up
    best: dict[str, tuple[float, dict]] = {}
    for _ in range(args.repeats):
        for name, seg in segs.items():
            times.clear()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run_pipeline(seg, images, text, len(images))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, dict(times))
    print(f"# {device_name(device)} | torch {torch.__version__} | random ViT-B/16, {args.plant_tokens} planted "
          f"distraction tokens per crop | {len(images)} images 375x500, 6 crops each | reuse_cpu_memory {reuse}")
    base = best["clip"][0]
    runs = [name for name in segs if name != "clip"]
    print(f"{'clip':<30} {base:7.2f} s  ({len(images) / base:.3f} img/s)")
    for name in runs:
        seconds = best[name][0]
        print(f"{name:<30} {seconds:7.2f} s  ({len(images) / seconds:.3f} img/s, {base / seconds:.2f}x clip)")
    print("\n| step | " + " | ".join(f"{name} s | %" for name in runs) + " |")
    print("|---|" + "---|---|" * len(runs))
    for step in STEPS:
        cells = []
        for name in runs:
            seconds, steps = best[name]
            cells.append(f"{steps.get(step, 0.0):.3f} | {100 * steps.get(step, 0.0) / seconds:.1f}")
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
