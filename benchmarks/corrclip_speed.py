"""corrclip's speed beside proxyclip and beside a one-window-at-a-time loop, on the same images and masks.

Random weights with the real geometry (CLIP ViT-B/16, DINO ViT-B/8; speed does not depend on the values), VOC-like
images in memory (375 x 500 by default), region maps of random rectangles painted SAM-style (smaller ones first,
so larger ones overwrite them; ``--regions`` of them, some area left unsegmented). Timed per image: resize, every
window through DINO and CLIP, logits, overlap averaging, post-processing (map correction for corrclip).

* ``corrclip``: ``Segmenter.predict`` on ``--images-per-call`` images, all their windows batched
  (``--batch-size`` crops per forward), the region loops as tensor operations.
* ``proxyclip``: the same protocol (ProxyCLIP: DINO output tokens, no masks), its own last block.
* ``corrclip, 1 window/forward``: the same code with one crop per forward and one image per call.
* ``official loop``: the official code's forward restated (``tests/corrclip_reference.py``, run here in fp32):
  one window at a time, the whole [MCT, CLS, patches] sequence with a boolean mask in every layer, Python loops over
  regions (merging, scope, map correction), sklearn-free DBSCAN.

    PYTHONPATH=src python benchmarks/corrclip_speed.py --images 4 --short-side 224 --crop 224   # the CPU run
    PYTHONPATH=src python benchmarks/corrclip_speed.py --device cuda --images 32 --images-per-call 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from rfclip.inference import preprocess  # noqa: E402
from rfclip.models.loading import random_clip  # noqa: E402
from rfclip.models.vfm import VisionFoundationModel  # noqa: E402
from rfclip.segmenter import Segmenter  # noqa: E402
from rfclip.text import TextQueries  # noqa: E402

VITB16 = dict(embed_dim=512, quick_gelu=True, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))


def painted_regions(h: int, w: int, count: int, rng) -> np.ndarray:
    """``count`` random rectangles painted in ascending area (ids 1..count), as CorrCLIP paints SAM masks."""
    boxes = []
    for _ in range(count):
        bh, bw = rng.integers(h // 10, h // 2), rng.integers(w // 10, w // 2)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        boxes.append((bh * bw, y, x, bh, bw))
    out = np.zeros((h, w), np.int32)
    for k, (_, y, x, bh, bw) in enumerate(sorted(boxes), start=1):
        out[y:y + bh, x:x + bw] = k
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--images-per-call", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    p.add_argument("--short-side", type=int, default=336)
    p.add_argument("--crop", type=int, default=336)
    p.add_argument("--stride", type=int, default=112)
    p.add_argument("--regions", type=int, default=30)
    p.add_argument("--loop-images", type=int, default=1, help="images for the official loop (slow)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    regions = [painted_regions(*args.size, args.regions, rng) for _ in range(args.images)]
    clip = random_clip(VITB16, quick_gelu=True, seed=0)
    torch.manual_seed(0)
    dino_net = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    dino = VisionFoundationModel(dino_net, name="vit_base_patch8_224.dino").to(device)
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(21, 512, generator=g), dim=-1)
    text = TextQueries(feats, torch.arange(21), [f"c{i}" for i in range(21)], [[f"c{i}"] for i in range(21)])
    common = dict(short_side=args.short_side, slide_crop=args.crop, slide_stride=args.stride, pad_crops_to=56,
                  prob_thd=0.2, device=device, text_cache=False, templates=["a photo of a {}."],
                  batch_size=args.batch_size)
    corr = Segmenter(clip, method="corrclip", vfm=dino, **common)
    proxy = Segmenter(clip, method="proxyclip", vfm=dino, **common)
    single = corr.with_config(batch_size=1)
    per = args.images_per_call

    def run(seg, step, uses_masks=True):
        out = []
        for s in range(0, len(images), step):
            out += seg.predict(images[s:s + step], text, return_probs=False,
                               regions=regions[s:s + step] if uses_masks else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    rows = {}
    run(corr, per)  # warm-up
    rows["corrclip"], masks_batched = timed(lambda: run(corr, per), args.repeats)
    rows["proxyclip"], _ = timed(lambda: run(proxy, per, uses_masks=False), args.repeats)
    rows["corrclip, 1 window/forward"], masks_single = timed(lambda: run(single, 1), args.repeats)
    same = all(torch.equal(a[0], b[0]) for a, b in zip(masks_batched, masks_single))

    import copy

    import corrclip_reference as ref

    visual = copy.deepcopy(clip.model.visual).to(device)
    loop_n = max(1, min(args.loop_images, args.images))

    def official_loop():
        out = []
        for img, reg in zip(images[:loop_n], regions[:loop_n]):
            x = preprocess(img, args.short_side, device)
            out.append(ref.corrclip_predict(visual, dino_net.to(device), x, torch.from_numpy(reg).to(device),
                                            text.features.to(device), 21, crop=args.crop, stride=args.stride,
                                            prob_thd=0.2, dtype=torch.float32)[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    loop_s, loop_masks = timed(official_loop, 1)
    agree = float(np.mean([(a[0].cpu() == b.cpu()).float().mean().item() for a, b in zip(masks_batched, loop_masks)]))
    per_image = {k: v / args.images for k, v in rows.items()}
    per_image["official loop (fp32)"] = loop_s / loop_n
    cpu = platform.processor() or platform.machine()
    print(f"device {device} ({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{args.images} images {args.size[0]}x{args.size[1]}, short side {args.short_side}, windows "
          f"{args.crop}/{args.stride}, {args.regions} painted regions per image")
    print(f"{'pipeline':32s} {'s/image':>9s} {'images/s':>9s} {'vs corrclip':>12s}")
    for name, sec in per_image.items():
        print(f"{name:32s} {sec:9.3f} {1 / sec:9.3f} {sec / per_image['corrclip']:11.2f}x")
    print(f"corrclip batched masks == 1 window/forward masks: {same}; pixels equal to the official loop's labels: "
          f"{100 * agree:.2f}% (fp32 both)")


if __name__ == "__main__":
    main()
