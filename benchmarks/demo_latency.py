"""Latency of the web demo: time to first page, and time per request of Segment, Compare and Look inside.

Starts ``rfclip demo`` as a subprocess on 127.0.0.1 with random ViT-B/16 weights (the full model, image and text
encoders; saved as an open_clip safetensors file, no download), with distraction tokens planted in every layer as
real CLIP has them (see tests/test_demo_browser.py), and calls the page's API endpoints through ``gradio_client``
(what the page's buttons call: upload, queue, inference, drawing, files), one request at a time.

    python benchmarks/demo_latency.py                       # CPU, examples/street.jpg (640 x 426)
    python benchmarks/demo_latency.py --repeats 5 --json demo.json --device cuda

Reported: seconds from the command's start to "serving" and to the first page (HTTP 200 with the page's
config), and per endpoint the first request (which embeds the class names: 80 prompts each through the text
encoder; later requests find them cached) and the median of ``--repeats`` more.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = (4, 162, 189, 326, 429, 474, 633, 713)  # RF-CLIP's OpenAI ViT-B/16 list (rfclip.constants)
PLANTED = [(2, 3), (2, 10), (7, 12), (11, 2), (12, 8), (5, 6)]


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random ViT-B/16 (open_clip layout, fp16 safetensors) with distraction tokens planted in every layer."""
    import torch
    from safetensors.torch import save_file

    from rfclip.models.loading import random_clip
    from rfclip.testing import plant_distraction_tokens

    clip = plant_distraction_tokens(random_clip("ViT-B-16", seed=seed), [r * 14 + c for r, c in PLANTED], DIMS)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.model.state_dict().items()}
    save_file(sd, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(ckpt: Path, args, workdir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "rfclip", "demo", "--checkpoint", str(ckpt), "--model", "ViT-B-16",
           "--device", args.device, "--port", str(port), "--option", "distraction_dims=" + ",".join(map(str, DIMS))]
    env = dict(os.environ, RFCLIP_CACHE=str(workdir / "cache"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    url, serving = None, None
    while url is None:
        if proc.poll() is not None:
            raise SystemExit(f"rfclip demo exited with {proc.returncode}:\n{''.join(log)}")
        for line in log:
            if (m := re.search(r"serving on (http\S+)", line)):
                url, serving = m.group(1), time.monotonic() - t0
        time.sleep(0.02)
    while True:  # the page and its config, as a browser loads them first
        try:
            with urllib.request.urlopen(url, timeout=30) as r1, urllib.request.urlopen(url + "config", timeout=30) as r2:
                if r1.status == 200 and r2.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    return proc, url, serving, time.monotonic() - t0, log


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image", default=str(ROOT / "examples" / "street.jpg"))
    ap.add_argument("--classes", default="road; car; tree; sky; building")
    ap.add_argument("--repeats", type=int, default=3, help="requests per endpoint after the first (median)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="rfclip-demo-bench-") as tmp:
        workdir = Path(tmp)
        ckpt = random_checkpoint(workdir / "vitb16.safetensors")
        proc, url, serving, first_page, log = start_demo(ckpt, args, workdir)
        try:
            client = Client(url, verbose=False)
            image = handle_file(args.image)
            knobs = dict(pamr_v=False, thd_v=0.0, short_v=336, crop_v=224, stride_v=112,
                         options_v="distraction_dims=" + ",".join(map(str, DIMS)))
            calls = {
                "segment (rfclip)": lambda: client.predict(image, args.classes, "rfclip", **knobs, api_name="/segment"),
                "compare (naclip vs rfclip)": lambda: client.predict(image, args.classes, "naclip", "rfclip", **knobs,
                                                                    api_name="/compare"),
                "look inside (rfclip, 12 layers)": lambda: client.predict(image, "rfclip", "all", **knobs,
                                                                         api_name="/look_inside"),
            }
            rows = {}
            for name, call in calls.items():
                first = timed(call)
                rest = [timed(call) for _ in range(args.repeats)]
                rows[name] = {"first_s": round(first, 2), "median_s": round(statistics.median(rest), 2),
                              "all_s": [round(t, 2) for t in rest]}
            status = calls["segment (rfclip)"]()[0]
            assert "classes found" in status, status
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"device": args.device, "image": os.path.basename(args.image), "threads": os.environ.get("OMP_NUM_THREADS"),
              "cpus": os.cpu_count(), "command_to_serving_s": round(serving, 2), "command_to_first_page_s":
              round(first_page, 2), "requests": rows}
    print(f"rfclip demo on {args.device}, random ViT-B/16, {result['image']}:")
    print(f"  command start -> serving: {serving:.1f} s; -> first page served: {first_page:.1f} s")
    for name, row in rows.items():
        print(f"  {name:34s} first {row['first_s']:6.2f} s   then median {row['median_s']:6.2f} s  {row['all_s']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
