"""Issue 20's "done when", end to end: 200 generated images segmented by 2 torchrun processes, interrupted (SIGTERM
to torchrun, as a scheduler stops a job), resumed, and read back in each format with its own library; then the same
for WebDataset tar shards in and out.

Small images (96 x 128) and a tiny random-weight CLIP saved as a checkpoint file, so that it runs in a few minutes
on a 2-core CPU. Prints what it checks and exits non-zero on the first failure.

    python benchmarks/segment_resume.py [--images 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TINY = dict(embed_dim=32, quick_gelu=True, vision_cfg=dict(image_size=224, layers=3, width=64, head_width=16,
                                                           patch_size=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))
CLASSES = "sky;grass;road;car;person"


def check(condition: bool, what: str) -> None:
    print(("ok    " if condition else "FAILED ") + what, flush=True)
    if not condition:
        raise SystemExit(1)


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rfclip",
            *args]


def interrupted_then_resumed(cmd: list[str], out: Path, done_files: str, stop_after: int, env: dict) -> dict:
    """Start ``cmd``, SIGTERM it once ``stop_after`` files match ``done_files`` in ``out``, rerun it to the end."""
    print("$ " + " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and len(list(out.glob(done_files))) < stop_after:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    before = len(list(out.glob(done_files)))
    print(f"  SIGTERM after {time.time() - t0:.1f} s: exit status {proc.returncode}, {before} x {done_files} done",
          flush=True)
    check(proc.returncode != 0 and "rfclip: interrupted" in err, "the interrupted run says so and fails")
    check(not [p for p in out.rglob(".*") if p.name != ".rfclip-parts"]
          and not list(out.rglob("*.rfclip-tmp")), "no temporary file, no lock left behind")
    check(not (out / "run.json").exists(), "no run.json for an unfinished run")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    print(f"  rerun: {time.time() - t0:.1f} s, exit status {proc.returncode}", flush=True)
    check(proc.returncode == 0, "the rerun finishes" + ("" if proc.returncode == 0 else f": {proc.stderr}"))
    return json.loads((out / "run.json").read_text())


def main(argv=None) -> None:
    from safetensors.torch import save_file

    from rfclip.models.loading import random_clip

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    args = p.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="rfclip-resume-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", RFCLIP_CACHE=str(root / "cache"))

    photos = root / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(photos / f"im{i:04d}.jpg")
    checkpoint = root / "tiny.safetensors"
    clip = random_clip(TINY, quick_gelu=True, seed=0)
    save_file({k: v.half().contiguous() for k, v in clip.model.state_dict().items()}, str(checkpoint))
    common = ["--classes", CLASSES, "--checkpoint", str(checkpoint), "--method", "clearclip", "--device", "cpu",
              "--short-side", "96", "--quiet", "--images-per-batch", "4"]

    # ---- a folder: png, overlay, json, coco
    out = root / "out"
    run = interrupted_then_resumed(
        torchrun(["segment", str(photos), "--out", str(out), "--format", "png,overlay,json,coco", *common]),
        out, "*.json", args.images // 3, env)
    n = run["counts"]
    print(f"  run.json: {n}, per rank images/s {[r['images_per_s'] for r in run['per_rank']]}")
    check(n["segmented"] + n["skipped_done_before"] == args.images and n["skipped_done_before"] > 0
          and n["failed"] == 0, "the rerun did only what was missing: every image once")
    masks = {p.name[:-len("_mask.png")]: np.asarray(Image.open(p)) for p in out.glob("*_mask.png")}
    check(len(masks) == args.images and len(list(out.glob("*_overlay.png"))) == args.images,
          f"{args.images} masks and overlays")
    records = [json.loads(p.read_text()) for p in out.glob("im*.json")]
    check(len({r["settings_id"] for r in records}) == 1 and len(records) == args.images, "one settings id in every JSON")
    for r in records:
        if r["fractions"] != {c: float((masks[r["name"]] == i).mean()) for i, c in enumerate(r["fractions"])}:
            check(False, f"fractions of {r['name']} match its mask")
    from pycocotools import mask as mask_utils

    lines = [json.loads(line) for line in (out / "coco.jsonl").read_text().splitlines()]
    check([r["name"] for r in lines] == sorted(masks), "coco.jsonl: one record per image, in input order")
    for r in lines:
        for ann in r["annotations"]:
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            if not np.array_equal(mask_utils.decode(rle), masks[r["name"]] == ann["class_index"]):
                check(False, f"pycocotools decodes {r['name']}'s {ann['label']} to its mask")
    check(True, "pycocotools decodes every RLE to the pixels of its class in the mask PNG")

    # ---- WebDataset shards in, result shards out
    import webdataset as wds

    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    names = sorted(photos.iterdir())
    per_shard = 40  # a multiple of --images-per-batch: the same batches as the folder run, so the same masks
    for s in range(0, len(names), per_shard):
        with wds.TarWriter(str(shards / f"{s // per_shard:06d}.tar")) as tar:
            for path in names[s:s + per_shard]:
                tar.write({"__key__": path.stem, "jpg": path.read_bytes()})
    last = (len(names) - 1) // per_shard
    wds_out = root / "wds_out"
    run = interrupted_then_resumed(
        torchrun(["segment", "--input", str(shards / f"{{000000..{last:06d}}}.tar"), "--out", str(wds_out),
                  "--format", "webdataset", *common]), wds_out, "*.tar", 1, env)
    n = run["counts"]
    print(f"  run.json: {n}")
    check(n["segmented"] + n["skipped_done_before"] == args.images and n["skipped_done_before"] > 0,
          "the rerun did only the shards that were missing")
    got = {}
    for sample in wds.WebDataset(str(wds_out / f"{{000000..{last:06d}}}.tar"), shardshuffle=False):
        got[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
    check(sorted(got) == sorted(masks), "webdataset reads every image's result from the result shards")
    check(all(np.array_equal(got[k], masks[k]) for k in got), "and the masks equal the folder run's")
    print(f"all checks passed ({root})")


if __name__ == "__main__":
    main()
