"""Prompts per second of the text side: open_clip's full-length ``encode_text`` (77 positions) against rfclip's
length-sorted, truncated encoding (``rfclip.text.encode_text_truncated``), side by side in one run.

    python benchmarks/text_encoder.py                      # random ViT-B/16 text tower, VOC21 + ADE20K names
    python benchmarks/text_encoder.py --device cuda --batch-size 400

Random weights (speed does not depend on the values); both paths are checked to give the same embeddings.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch
import torch.nn.functional as F

from rfclip.models.loading import random_clip
from rfclip.text import TextClassifier, imagenet_templates


def class_names(dataset: str) -> list[str]:
    text = resources.files("rfclip").joinpath(f"assets/classnames/{dataset}.txt").read_text(encoding="utf-8")
    return [line.split(",")[0].strip() for line in text.splitlines() if line.strip()]


def full_length(clip, queries: list[str], templates: list[str], batch_size: int, device) -> torch.Tensor:
    """The pre-truncation path: every prompt through all 77 positions, in template order."""
    sentences = [t.format(q) for q in queries for t in templates]
    out = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            tokens = clip.tokenizer(sentences[start:start + batch_size]).to(device)
            out.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1).cpu())
    e = torch.cat(out).reshape(len(queries), len(templates), -1)
    return F.normalize(e.mean(1), dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--datasets", default="voc21,ade20k", help="class-name files to embed (assets/classnames)")
    p.add_argument("--max-classes", type=int, default=12, help="classes per dataset (all 80 templates each)")
    p.add_argument("--batch-size", type=int, default=400)
    p.add_argument("--whole", action="store_true",
                   help="also time the truncated encoding of each whole vocabulary (every class, 80 templates) and "
                        "give the full-length time at the rate measured above")
    args = p.parse_args()
    clip = random_clip(args.model, device=args.device)
    templates = imagenet_templates()
    print(f"{args.model} text tower, random weights, {torch.get_num_threads()} threads, device {args.device}")
    print(f"{'vocabulary':<10} {'prompts':>8} {'full-length p/s':>16} {'truncated p/s':>14} {'speed-up':>9} {'max |diff|':>11}")
    for dataset in args.datasets.split(","):
        names = class_names(dataset)[: args.max_classes]
        n = len(names) * len(templates)
        t0 = time.perf_counter()
        want = full_length(clip, names, templates, args.batch_size, args.device)
        t1 = time.perf_counter()
        got = TextClassifier(clip, device=args.device, batch_size=args.batch_size, cache_dir=False).encode(
            [[x] for x in names]).features.cpu()
        t2 = time.perf_counter()
        full_rate, trunc_rate = n / (t1 - t0), n / (t2 - t1)
        print(f"{dataset:<10} {n:>8} {full_rate:>16.1f} {trunc_rate:>14.1f} {trunc_rate / full_rate:>8.2f}x "
              f"{float((got - want).abs().max()):>11.2e}")
        if args.whole:
            every = class_names(dataset)
            t3 = time.perf_counter()
            TextClassifier(clip, device=args.device, batch_size=args.batch_size, cache_dir=False).encode(
                [[x] for x in every])
            t4 = time.perf_counter()
            n_all = len(every) * len(templates)
            print(f"{dataset:<10} whole vocabulary: {len(every)} classes, {n_all} prompts: truncated {t4 - t3:.1f} s "
                  f"({n_all / (t4 - t3):.1f} p/s); full-length at {full_rate:.1f} p/s would take {n_all / full_rate:.0f} s")


if __name__ == "__main__":
    main()
