"""Time per image of each mask generator on its own (rfclip.masks), random weights in the real configurations.

Each generator is built from its package's constructor with the geometry of the weights CorrCLIP uses (no download;
speed does not depend on the values), saved in its release layout and loaded through ``rfclip.masks.mask_source``,
as ``rfclip masks`` does. One warm-up image, then the median of ``--repeats`` runs on the same VOC-sized image
(500 x 375, a smooth synthetic picture with a few shapes). ``masks`` is how many regions the map holds: random
weights keep far fewer (or more) masks than real ones after the IoU / stability filters, so the post-processing
share of real weights differs; the encoder and the per-point decoder passes, which dominate, do not.

    python benchmarks/mask_generators.py                                   # CPU, all generators
    python benchmarks/mask_generators.py --generators sam2_l_8,m2f_swin_l --repeats 3 --device cuda

Generators (``--generators``, comma-separated):
  sam2_l_8     SAM2 hiera-large, 8 points per side, thresholds 0.4, one mask per point (CorrCLIP v1's generator)
  sam2_l_32    the same with 32 points per side (CorrCLIP's SAM2_32 row)
  sam2_t_8     SAM2 hiera-tiny, CorrCLIP's settings
  sam_b_32     SAM ViT-B, 32 points per side, thresholds 0.7 (CorrCLIPv2's SAM settings; ViT-H is --generators sam_h_32)
  sam_h_32     SAM ViT-H, as above (the size CorrCLIPv2 uses)
  m2f_swin_l   Mask2Former Swin-L COCO panoptic geometry, the image processor's defaults (short side 800)
  eomt_l_640   EoMT-L 640 (transformers EomtForUniversalSegmentation defaults), 640 x 640 input
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GENERATORS = ["sam2_l_8", "sam2_l_32", "sam2_t_8", "sam_b_32", "sam_h_32", "m2f_swin_l", "eomt_l_640"]
DEFAULT = ["sam2_t_8", "sam2_l_8", "sam2_l_32", "sam_b_32", "m2f_swin_l", "eomt_l_640"]


def test_image(h: int = 375, w: int = 500) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1).astype(np.uint8)
    img[60:200, 80:220] = (200, 40, 40)
    img[220:340, 300:470] = (30, 160, 60)
    rr = (yy - 120) ** 2 + (xx - 380) ** 2 < 60 ** 2
    img[rr] = (240, 230, 50)
    return img


def _save_sam2(folder: Path, config: str) -> str:
    from sam2.build_sam import build_sam2

    model = build_sam2(f"configs/sam2.1/{config}.yaml", None, device="cpu", apply_postprocessing=False)
    path = folder / f"{config}.pt"
    torch.save({"model": model.state_dict()}, path)  # SAM2's release layout
    return f"sam2:{path}"


def _save_sam(folder: Path, size: str) -> str:
    from segment_anything import sam_model_registry

    path = folder / f"sam_{size}.pth"
    torch.save(sam_model_registry[size](checkpoint=None).state_dict(), path)  # SAM's release layout: bare dict
    return f"sam:{path}"


def _save_m2f(folder: Path) -> str:
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    backbone = SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
                          image_size=384, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=133, num_queries=200)  # swin-large-coco-panoptic
    out = folder / "m2f"
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(out)
    Mask2FormerImageProcessor().save_pretrained(out)
    return f"hf:{out}"


def _save_eomt(folder: Path) -> str:
    from transformers import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

    out = folder / "eomt"
    EomtForUniversalSegmentation(EomtConfig(num_labels=133)).save_pretrained(out)
    EomtImageProcessor(size={"shortest_edge": 640, "longest_edge": 640}, do_pad=True).save_pretrained(out)
    return f"hf:{out}"


def spec_for(name: str, folder: Path) -> str:
    if name.startswith("sam2_"):
        size = {"l": "sam2.1_hiera_l", "t": "sam2.1_hiera_t"}[name.split("_")[1]]
        points = name.split("_")[2]
        return f"{_save_sam2(folder, size)}?points_per_side={points}"
    if name.startswith("sam_"):
        return f"{_save_sam(folder, 'vit_' + name.split('_')[1])}?points_per_side={name.split('_')[2]}"
    if name == "m2f_swin_l":
        return _save_m2f(folder)
    if name == "eomt_l_640":
        return _save_eomt(folder)
    raise SystemExit(f"unknown generator {name}; choose from {', '.join(GENERATORS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", default=",".join(DEFAULT))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    from rfclip.masks import mask_source

    torch.manual_seed(0)
    image = test_image()
    results = {"device": args.device, "threads": torch.get_num_threads(), "cpu": platform.processor() or "",
               "torch": torch.__version__, "image": list(image.shape[:2]), "generators": {}}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    print(f"device {args.device}, {torch.get_num_threads()} threads, image {image.shape[1]}x{image.shape[0]}")
    for name in args.generators.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            spec = spec_for(name, Path(tmp))
            t0 = time.perf_counter()
            source = mask_source(spec, device=args.device)
            load_s = time.perf_counter() - t0
            region_map = source(image)  # warm-up
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                region_map = source(image)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in (getattr(source, "model", None) or source.generator.predictor.model)
                     .parameters())
        row = {"seconds_per_image": statistics.median(times), "runs": times, "load_s": load_s,
               "params_m": params / 1e6, "masks": int(len(np.unique(region_map)) - (region_map == 0).any())}
        results["generators"][name] = row
        print(f"{name:12s} {row['seconds_per_image']:8.2f} s/image  ({row['params_m']:.0f}M params, "
              f"{row['masks']} regions, load {load_s:.1f} s)", flush=True)
        del source
    base = results["generators"].get("sam2_l_8")
    if base:
        for name, row in results["generators"].items():
            print(f"  {name:12s} x{row['seconds_per_image'] / base['seconds_per_image']:.2f} the time of sam2_l_8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
