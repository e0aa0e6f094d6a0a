"""Throughput and peak memory of rfclip's batched inference, per method, against the GEMM-bound limit of the machine
and against the per-crop reference loop.

Random ViT-B/16 weights (the real geometry; no download), random unit text embeddings for 21 classes (VOC21; the
text encoder is not timed), VOC-like images (375 x 500, resized to short side 336 -> 336 x 448, 6 crops of 224 at
stride 112). Decoding is excluded: images are uint8 arrays in memory. Everything else is timed: resize +
normalise, all crops through the ViT, logits, overlap averaging, resize to the original size, optional PAMR,
softmax, argmax, and the masks copied to the host.

    python benchmarks/throughput.py                                   # all methods, CPU or GPU, default precision
    python benchmarks/throughput.py --reference-loop --repeats 3 --json out.json   # + the per-crop fp32 loop
    python benchmarks/throughput.py --device cuda --precision bf16 --batch-size 192 --images 256 --compile

Reported per method: images/s, ms/image, the share of the GEMM-bound limit (the ViT's FLOPs per image over the
rate this machine reaches, in the same run, on the ViT's own linear-layer shapes at the run's crops per forward),
peak memory (CUDA: max allocated; CPU: peak RSS of the process during the run), analytical ViT TFLOP/s and, with a
known peak (``--peak-tflops`` or the table below), the fraction of the device's dense bf16 peak; the ratio to plain
dense ``clip`` measured in the same run; and with ``--reference-loop`` the speed-up over the reference code's
per-crop loop, which runs in a child process with glibc's default allocator (this process switches on
:func:`rfclip.devices.reuse_cpu_memory` on CPU, as the ``rfclip`` command does; ``--reuse-cpu-memory off``).

Method names are registered rfclip methods with optional plugins (``naclip+fsa``); ``+pamr`` switches on PAMR
(an inference setting, not a plugin), ``+compile`` compiles the encoder (as ``--compile`` does for every method);
``+plant`` runs the method on a copy of the model with distraction tokens
planted in every layer (:func:`rfclip.testing.plant_distraction_tokens`, ``--plant-tokens`` per crop), as real
CLIP weights have them. Unknown methods/plugins are skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rfclip.constants import DISTRACTION_DIMS
from rfclip.dense import DenseCLIP
from rfclip.devices import reuse_cpu_memory
from rfclip.errors import RfclipError
from rfclip.inference import (InferenceConfig, autocast_dtype, crops_per_forward, preprocess, rescale_size,
                              sliding_windows)
from rfclip.methods import METHODS, PLUGINS, method_option_names, parse_method_spec
from rfclip.models.loading import random_clip
from rfclip.segmenter import Segmenter
from rfclip.testing import plant_distraction_tokens
from rfclip.text import TextQueries

DEFAULT_METHODS = "clip,naclip,rfclip,rfclip+plant,rfclip+pamr,naclip+fsa"
B16_DISTRACTION_DIMS = DISTRACTION_DIMS[("ViT-B-16", "openai")]  # RF-CLIP's ViT-B/16 list
NUM_CLASSES = 21

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),  # fp16/bf16 with fp32 accumulate
    ("RTX 3090", 71.0),  # fp16/bf16 with fp32 accumulate
    ("V100", 125.0),  # fp16 (no bf16 tensor cores)
    ("T4", 65.0),  # fp16 (no bf16 tensor cores)
)


# ---------------------------------------------------------------------------------------------- setup
def random_model(name: str, seed: int):
    """A random-weight CLIP with the real geometry of ``name`` (QuickGELU, as OpenAI's weights)."""
    return random_clip(name, seed=seed)


def random_text(num_classes: int, dim: int, seed: int) -> TextQueries:
    """Random unit query embeddings (the text encoder is not part of what is timed)."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    names = [f"class{i}" for i in range(num_classes)]
    return TextQueries(features, torch.arange(num_classes), names, [[n] for n in names])


def voc_like_images(n: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """Smooth random images (blurred noise, a few blobs) as uint8 H x W x 3 arrays."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        low = rng.random((3, max(2, height // 32), max(2, width // 32)), dtype=np.float32)
        up = F.interpolate(torch.from_numpy(low)[None], size=(height, width), mode="bicubic", align_corners=False)[0]
        noise = torch.from_numpy(rng.normal(0, 0.05, size=(3, height, width)).astype(np.float32))
        img = ((up + noise).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        images.append(img)
    return images


def parse_size(text: str) -> tuple[int, int]:
    """"375x500" -> (375, 500) as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be HxW, e.g. 375x500, got {text!r}") from None
    return h, w


MODIFIERS = ("pamr", "plant", "compile")  # benchmark modifiers of a method spec, not plugins


def split_spec(spec: str) -> tuple[str, list[str], bool, bool]:
    """``"rfclip+pamr"`` -> ("rfclip", [], True, False); ``"naclip+fsa"`` -> ("naclip", ["fsa"], False, False);
    ``"rfclip+plant"`` -> ("rfclip", [], False, True). ``pamr``, ``plant`` and ``compile`` are benchmark modifiers
    (``compile``: see :func:`compiled`)."""
    base, extra = parse_method_spec(spec)
    return base, [p for p in extra if p not in MODIFIERS], "pamr" in extra, "plant" in extra


def compiled(spec: str) -> bool:
    """Whether ``spec`` asks for ``torch.compile`` (``clip+compile``), so that one run compares both."""
    return "compile" in parse_method_spec(spec)[1]


def unavailable(spec: str) -> str | None:
    """Why ``spec`` cannot run here (unregistered method or plugin), or None."""
    base, plugins, _, _ = split_spec(spec)
    if base not in METHODS:
        return f"method '{base}' is not registered (have: {', '.join(sorted(METHODS))})"
    missing = [p for p in plugins if p not in PLUGINS]
    if missing:
        return f"plugin(s) {', '.join(missing)} not registered (have: {', '.join(sorted(PLUGINS)) or 'none'})"
    return None


def method_options(spec: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Options for ``spec``: RF-CLIP's distraction dims for a random model, plus those given that it accepts."""
    base, plugins, _, _ = split_spec(spec)
    names = method_option_names(base, plugins)
    opts = {}
    if "distraction_dims" in names:
        opts["distraction_dims"] = B16_DISTRACTION_DIMS
    opts.update({k: v for k, v in extra.items() if k in names})
    return opts


# ---------------------------------------------------------------------------------------------- measuring
class Timer:
    """Wall time of a block, synchronising CUDA on both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # process CPU time (all threads): robust to other load on a shared CPU

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over a block. CUDA: ``max_memory_allocated``. CPU: the process's peak RSS (``VmHWM``, reset
    through ``/proc/self/clear_refs`` where allowed; otherwise ``getrusage`` ru_maxrss, a lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = float("nan")
        self.growth_mib = float("nan")
        self.kind = "cuda max allocated" if device.type == "cuda" else "peak RSS"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self._resettable = True
        except OSError:
            self._resettable = False
            self.kind = "lifetime peak RSS (getrusage)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mib = peak / 2**20
            self.growth_mib = (peak - self._base) / 2**20
            return
        hwm = _rss_kib("VmHWM") if self._resettable else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_mib = hwm / 1024
        if self._base is not None:
            self.growth_mib = (hwm - self._base) / 1024


def vit_flops_per_crop(encoder, crop_hw: tuple[int, int], embed_dim: int | None = None) -> float:
    """Analytical FLOPs (multiply-add = 2 FLOPs) of one ViT forward on a crop: patch embedding, every block's
    qkv / attention (QK^T and AV) / out-proj / MLP, and the output projection. Method extras (key-key attention,
    RF-CLIP's redistribution) are not counted, so this is the model's FLOP count, the usual basis of MFU.

    ViT-B/16 at 224: ~35.1 GFLOPs (~17.6 GMACs; tables that say "17.6 GFLOPs" count multiply-adds).
    """
    ph, pw = encoder.patch_size
    n = (crop_hw[0] // ph) * (crop_hw[1] // pw)
    t = n + 1
    c = encoder.width
    mlp = encoder.blocks[0].mlp
    hidden = next(m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    per_layer = 2 * t * c * 3 * c + 2 * 2 * t * t * c + 2 * t * c * c + 2 * 2 * t * c * hidden
    patch = 2 * n * c * 3 * ph * pw
    proj = 2 * n * c * (embed_dim or c)
    return float(patch + encoder.num_layers * per_layer + proj)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"table ({key})"
    return None, f"unknown device '{name}' (give --peak-tflops)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------- the two pipelines
def run_pipeline(seg: Segmenter, images: list[np.ndarray], text: TextQueries, images_per_call: int) -> list[np.ndarray]:
    """rfclip's pipeline: ``Segmenter.predict`` on groups of images (their crops share forwards)."""
    masks = []
    for start in range(0, len(images), images_per_call):
        for mask, _ in seg.predict(images[start:start + images_per_call], text, return_probs=False):
            masks.append(mask.cpu().numpy())
    return masks


@torch.inference_mode()
def reference_segment(seg: Segmenter, image: np.ndarray, text: TextQueries) -> np.ndarray:
    """The reference code's inference (SCLIP / NACLIP / RF-CLIP ``slide_inference`` + ``postprocess_result``),
    restated: one crop at a time through the ViT (batch size 1; fp32, or the segmenter's precision), each crop's logits upsampled to the crop,
    zero-padded to the full image and accumulated, a count map, then resize, optional PAMR, softmax, max over
    synonyms (through a one-hot class-by-query product), argmax. Same encoder and method hooks as the pipeline,
    so both compute the same numbers; only the execution differs."""
    cfg = seg.config
    device = seg.device
    query_features = text.features.to(device=device, dtype=torch.float32)
    needs_text = getattr(seg.method, "needs_text_in_forward", False)
    amp_dtype = autocast_dtype(device, cfg.precision)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    img = preprocess(image, cfg.short_side, device, cfg.pixel_mean, cfg.pixel_std)[None]  # (1, 3, H, W)
    batch_size, _, h_img, w_img = img.shape
    h_crop = w_crop = cfg.slide_crop
    h_stride = w_stride = cfg.slide_stride
    num_queries = query_features.shape[0]
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_queries, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    image_cls = None  # rfclip_release: a second pass over the whole image for its [CLS] (once per crop there)
    if h_crop > 0 and getattr(seg.method, "needs_image_cls", False):
        with amp:
            image_cls = seg.encoder(img, seg.method, cls_only=True).cls
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            # forward_feature: image features -> cosine logits -> (1, Q, h, w) -> bilinear to the crop size
            with amp:  # fp32 by default; --reference-precision fp16 is the reference code's fp16 loop
                features, (gh, gw), cls = seg.encoder(crop_img, seg.method,
                                                      text_features=query_features if needs_text else None)
            logits = seg.method.logits(features, cls if image_cls is None else image_cls, query_features)
            logits = logits.permute(0, 2, 1).reshape(-1, num_queries, gh, gw)
            crop_seg_logit = F.interpolate(logits, size=crop_img.shape[-2:], mode="bilinear")
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    seg_logits = preds / count_mat
    size = image.shape[:2]
    seg_logits = F.interpolate(seg_logits, size=size, mode="bilinear")
    if cfg.pamr:
        from rfclip.pamr import pamr

        guide = F.interpolate(img, size=size, mode="bilinear")
        seg_logits = pamr(guide, seg_logits, num_iter=cfg.pamr_steps, dilations=tuple(cfg.pamr_dilations))
    # postprocess_result
    seg_logits = seg_logits[0] * cfg.logit_scale
    seg_logits = seg_logits.softmax(0)  # n_queries * w * h
    num_cls = text.num_classes
    if num_cls != num_queries:
        seg_logits = seg_logits.unsqueeze(0)
        cls_index = F.one_hot(text.query_class.to(device))
        cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits * cls_index).max(1)[0]
    seg_pred = seg_logits.argmax(0, keepdim=True)
    if cfg.prob_thd > 0:
        seg_pred[seg_logits.max(0, keepdim=True)[0] < cfg.prob_thd] = cfg.background_class
    return seg_pred[0].cpu().numpy()


def run_reference(seg: Segmenter, images: list[np.ndarray], text: TextQueries) -> list[np.ndarray]:
    return [reference_segment(seg, img, text) for img in images]


# ---------------------------------------------------------------------------------------------- RF-CLIP's work
def method_diagnostics(seg: Segmenter, image: np.ndarray, text: TextQueries) -> dict[str, Any] | None:
    """RF-CLIP's distraction tokens found per layer on one image's crops (mean per crop), from the forward's
    diagnostics (``record``); None for methods that record no ``rf.L*.dis``."""
    cfg = seg.config
    x = preprocess(image, cfg.short_side, seg.device)
    wins = sliding_windows(x.shape[-2], x.shape[-1], cfg.slide_crop, cfg.slide_stride)
    crops = torch.stack([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in wins])
    record: dict[str, list] = {}
    tf = text.features.to(seg.device, torch.float32)
    with torch.inference_mode():
        seg.encoder(crops, seg.method, text_features=tf if seg.method.needs_text_in_forward else None, record=record)
    per_layer = {}
    for key, values in record.items():
        if key.startswith("rf.L") and key.endswith(".dis"):
            per_layer[int(key[4:-4])] = float(torch.cat(values).float().sum(-1).mean())
    if not per_layer:
        return None
    counts = [round(per_layer.get(layer, 0.0), 2) for layer in range(seg.encoder.num_layers)]
    return {"distraction_tokens_per_crop_by_layer": counts, "layers_with_distraction": sum(c > 0 for c in counts),
            "crops": len(wins), "patches_per_crop": int(crops.shape[-2] // seg.encoder.patch_size[0]
                                                          * (crops.shape[-1] // seg.encoder.patch_size[1]))}


# ---------------------------------------------------------------------------------------------- the GEMM limit
def gemm_rate(encoder, rows: int, device: torch.device, amp: torch.dtype | None, repeats: int = 5) -> float:
    """FLOP/s of this machine on the ViT's own linear layers (q/k/v in-projection, out-projection, MLP in and out,
    with the first block's weights) for ``rows`` tokens at once, in the run's precision: the best of ``repeats``
    timed passes over the four shapes. The ViT's FLOPs over this rate is the time a forward would take if it were
    nothing but these GEMMs at this speed (the "GEMM-bound limit")."""
    block = encoder.blocks[0]
    fc = [m for m in block.mlp.modules() if isinstance(m, torch.nn.Linear)]
    layers = [(block.attn.in_proj_weight, block.attn.in_proj_bias), (block.attn.out_proj.weight, block.attn.out_proj.bias),
              (fc[0].weight, fc[0].bias), (fc[-1].weight, fc[-1].bias)]
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(rows, w.shape[1], generator=g).to(device) for w, _ in layers]
    flops = sum(2.0 * rows * w.shape[0] * w.shape[1] for w, _ in layers)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    best = float("inf")
    with torch.inference_mode(), ctx:
        for i in range(repeats + 1):
            with Timer(device) as t:
                for x, (w, b) in zip(inputs, layers):
                    F.linear(x, w, b)
            if i > 0:  # the first pass warms up
                best = min(best, t.seconds)
    return flops / best


# ---------------------------------------------------------------------------------------------- reference in a child
def _reference_worker(conn, settings: dict) -> None:
    """Child process of the reference loop: the same random model(s), images and text from the same seeds, and
    glibc's default allocator (the parent may have called ``reuse_cpu_memory``; the reference code would not)."""
    torch.set_num_threads(settings["threads"])
    args = argparse.Namespace(**settings["args"])
    device = torch.device(settings["device"])
    clip = random_model(args.model, args.seed)
    clip.model.to(device)
    models = {False: clip}
    text = random_text(NUM_CLASSES, clip.model.visual.output_dim, args.seed)
    images = voc_like_images(settings["n_images"], *args.image_size, seed=args.seed)
    segs: dict[str, Segmenter] = {}
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        spec, n = msg
        if spec not in segs:
            plant = split_spec(spec)[3]
            if plant not in models:
                models[plant] = planted_model(clip, args.plant_tokens)
            segs[spec] = build_segmenter(models[plant], spec, args, device).with_config(
                precision=args.reference_precision, compile=False)
            run_reference(segs[spec], images[:1], text)  # warm-up
        t, mem, masks = measure(lambda: run_reference(segs[spec], images[:n], text), device)
        conn.send((t.seconds, t.cpu_seconds, mem.peak_mib, masks))


class ReferenceLoop:
    """The reference loop, run in a spawned child process (see :func:`_reference_worker`)."""

    def __init__(self, args, device: torch.device, n_images: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        settings = {"args": vars(args), "device": str(device), "n_images": n_images,
                    "threads": torch.get_num_threads()}
        self.proc = ctx.Process(target=_reference_worker, args=(child, settings), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the reference worker did not start")

    def run(self, spec: str, n: int):
        self.conn.send((spec, n))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)


# ---------------------------------------------------------------------------------------------- main
def planted_model(clip, tokens: int):
    """``clip`` with ``tokens`` patch tokens per 224 crop (spread over the 14 x 14 grid) made distraction tokens in
    every layer by :func:`rfclip.testing.plant_distraction_tokens` (over-activated distraction dims, re-created by
    every block), as real CLIP weights have them."""
    grid = clip.model.visual.positional_embedding.shape[0] - 1
    positions = torch.linspace(0, grid - 1, tokens + 2)[1:-1].round().long().tolist()
    return plant_distraction_tokens(clip, positions, B16_DISTRACTION_DIMS)


def build_segmenter(clip, spec: str, args, device: torch.device) -> Segmenter:
    base, plugins, use_pamr, _ = split_spec(spec)
    opts = method_options(spec, args.method_option)
    return Segmenter(clip, method=base, plugins=plugins, device=device, text_cache=False, templates=["{}"],
                     batch_size=args.batch_size, precision=args.precision, pamr=use_pamr,
                     compile=args.compile or compiled(spec), **opts)


def measure(fn, device: torch.device) -> tuple[Timer, PeakMemory, Any]:
    with PeakMemory(device) as mem:
        with Timer(device) as t:
            result = fn()
    return t, mem, result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated method specs; '+pamr' turns PAMR on, '+plant' runs the method on a model "
                        "with planted distraction tokens, '+compile' compiles the encoder (default: "
                        f"{DEFAULT_METHODS})")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name for the random-weight model")
    p.add_argument("--images", type=int, default=16, help="number of timed images per method")
    p.add_argument("--image-size", type=parse_size, default=(375, 500), help="HxW of the images (default 375x500)")
    p.add_argument("--images-per-call", type=int, default=8,
                   help="images per Segmenter.predict call; their crops share forwards (default 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="crops per forward (default: rfclip's device default, 64 on a GPU, 8 on CPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder forward")
    p.add_argument("--reuse-cpu-memory", choices=["on", "off"], default="on",
                   help="CPU: rfclip.devices.reuse_cpu_memory() for the pipeline, as the rfclip command line does "
                        "(default on; the reference loop always runs with glibc's defaults in its own process)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per method before timing (default 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed rounds over all methods (interleaved); the fastest round per method counts")
    p.add_argument("--reference-loop", action="store_true",
                   help="also time the reference code's per-crop fp32 loop (batch 1) for every method, in a child "
                        "process")
    p.add_argument("--reference-precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the reference loop (default fp32: the masks = ref column is then the "
                        "pipeline's agreement with fp32; fp16: the reference code's fp16 loop, for the speed-up)")
    p.add_argument("--reference-images", type=int, default=None,
                   help="images for the reference loop (default: --images)")
    p.add_argument("--plant-tokens", type=int, default=4, help="distraction tokens planted per crop by '+plant'")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense bf16) TFLOP/s for the %% column")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method-option", action="append", default=[], metavar="NAME=VALUE",
                   help="extra method option (Python literal), given to every method that accepts it")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    import ast

    opts = {}
    for item in args.method_option:
        name, _, value = item.partition("=")
        try:
            opts[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[name] = value
    args.method_option = opts
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = autocast_dtype(device, args.precision)
    precision_used = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    clip = random_model(args.model, args.seed)
    clip.model.to(device)
    text = random_text(NUM_CLASSES, clip.model.visual.output_dim, args.seed)
    images = voc_like_images(args.images, *args.image_size, seed=args.seed)
    n_ref = min(args.reference_images or args.images, args.images)
    cfg = InferenceConfig()
    resized = rescale_size(*args.image_size, cfg.short_side)
    crops_per_image = len(sliding_windows(*resized, cfg.slide_crop, cfg.slide_stride))
    batch = crops_per_forward(args.batch_size, device)
    crops_per_batch = min(batch, crops_per_image * args.images_per_call)
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    # the reference child starts before this process changes its allocator, so it inherits nothing of it
    reference = ReferenceLoop(args, device, n_ref) if args.reference_loop else None
    reuse = device.type == "cpu" and args.reuse_cpu_memory == "on" and reuse_cpu_memory(True)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv if argv is None else ["benchmarks/throughput.py", *argv]),
        "model": f"{args.model} (random weights, seed {args.seed})",
        "precision": precision_used,
        "batch_size": batch,
        "images": args.images,
        "reference_images": n_ref if args.reference_loop else 0,
        "reference_precision": args.reference_precision if args.reference_loop else None,
        "images_per_call": args.images_per_call,
        "image_size": list(args.image_size),
        "resized": list(resized),
        "crops_per_image": crops_per_image,
        "compile": args.compile,
        "repeats": args.repeats,
        "reuse_cpu_memory": bool(reuse),
        "peak_tflops": peak,
        "peak_source": peak_src,
        "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    encoder = DenseCLIP(clip.model.visual).to(device)
    rate = gemm_rate(encoder, crops_per_batch * (encoder_tokens(encoder, cfg.slide_crop)), device, amp)
    rate_one = gemm_rate(encoder, encoder_tokens(encoder, cfg.slide_crop), device, amp)
    flops_per_image = crops_per_image * vit_flops_per_crop(encoder, (cfg.slide_crop, cfg.slide_crop),
                                                           clip.model.visual.output_dim)
    info.update(gemm_gflops=rate / 1e9, gemm_gflops_one_crop=rate_one / 1e9, gemm_rows=crops_per_batch *
                encoder_tokens(encoder, cfg.slide_crop), gflops_per_image=flops_per_image / 1e9,
                gemm_limit_images_per_s=rate / flops_per_image)
    print(f"# {info['device']} | torch {torch.__version__} | {info['model']} | {precision_used} | "
          f"{batch} crops per forward | {args.images} images {args.image_size[0]}x{args.image_size[1]} -> "
          f"{resized[0]}x{resized[1]}, {crops_per_image} crops each | reuse_cpu_memory {bool(reuse)}", flush=True)
    print(f"# GEMM rate on the ViT's linear shapes: {rate / 1e9:.1f} GFLOP/s at {info['gemm_rows']} rows "
          f"({rate_one / 1e9:.1f} at one crop's {encoder_tokens(encoder, cfg.slide_crop)}); "
          f"{flops_per_image / 1e9:.1f} GFLOP per image -> GEMM-bound limit {info['gemm_limit_images_per_s']:.3f} img/s",
          flush=True)

    specs, skipped = [], []
    for spec in [s.strip() for s in args.methods.split(",") if s.strip()]:
        why = unavailable(spec)
        if why:
            print(f"# skipping {spec}: {why}", flush=True)
            skipped.append({"method": spec, "reason": why})
        else:
            specs.append(spec)

    models = {False: clip}
    segs, rows = {}, {}
    for spec in specs:
        plant = split_spec(spec)[3]
        if plant not in models:
            models[plant] = planted_model(clip, args.plant_tokens)
        seg = segs[spec] = build_segmenter(models[plant], spec, args, device)
        flops = vit_flops_per_crop(seg.encoder, (cfg.slide_crop, cfg.slide_crop), clip.model.visual.output_dim)
        rows[spec] = {"method": spec, "gflops_per_crop": flops / 1e9, "_flops": flops}
        for _ in range(args.warmup):
            run_pipeline(seg, images[: args.images_per_call], text, args.images_per_call)
        diag = method_diagnostics(seg, images[0], text)
        if diag is not None:
            rows[spec]["diagnostics"] = diag
            print(f"# {spec}: distraction tokens per crop by layer {diag['distraction_tokens_per_crop_by_layer']}",
                  flush=True)

    gemm_rows = info["gemm_rows"]
    try:
        for rnd in range(args.repeats):
            # the GEMM rate drifts with the machine as the methods do: measured every round, the best one counts
            rate = max(rate, gemm_rate(encoder, gemm_rows, device, amp))
            info.update(gemm_gflops=rate / 1e9, gemm_limit_images_per_s=rate / flops_per_image)
            for spec in specs:
                seg, row = segs[spec], rows[spec]
                t, mem, masks = measure(lambda: run_pipeline(seg, images, text, args.images_per_call), device)
                if "seconds" not in row or t.seconds < row["seconds"]:
                    row.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds)
                row["peak_mib"] = max(row.get("peak_mib", 0.0), mem.peak_mib)
                row["peak_growth_mib"] = max(row.get("peak_growth_mib", 0.0), mem.growth_mib)
                row["memory_kind"] = mem.kind
                if reference is not None:
                    ref_s, ref_cpu, ref_peak, ref_masks = reference.run(spec, n_ref)
                    if "ref_seconds" not in row or ref_s < row["ref_seconds"]:
                        row.update(ref_seconds=ref_s, ref_cpu_seconds=ref_cpu)
                    row["reference_peak_mib"] = max(row.get("reference_peak_mib", 0.0), ref_peak)
                    row["mask_agreement_vs_reference"] = float(np.mean([(a == b).mean()
                                                                        for a, b in zip(masks, ref_masks)]))
                finish_row(row, args, crops_per_image, peak, n_ref, info["gemm_limit_images_per_s"])
                print(f"[round {rnd + 1}/{args.repeats}] " + format_row(row, reference is not None), flush=True)
    finally:
        if reference is not None:
            reference.close()

    rows = [rows[s] for s in specs]
    base = next((r for r in rows if r["method"] == "clip"), None)
    for r in rows:
        r.pop("_flops", None)
        r["vs_clip"] = r["images_per_s"] / base["images_per_s"] if base else None
        r["vs_clip_cpu_time"] = base["cpu_s_per_image"] / r["cpu_s_per_image"] if base else None
    info["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for r in rows:  # shares of the best GEMM rate of the whole run
        r["pct_gemm_limit"] = 100 * r["images_per_s"] / info["gemm_limit_images_per_s"]
    print(f"# GEMM rate, best of the run: {info['gemm_gflops']:.1f} GFLOP/s -> GEMM-bound limit "
          f"{info['gemm_limit_images_per_s']:.3f} img/s")
    print()
    print(format_table(rows, reference is not None))
    for s in skipped:
        print(f"skipped {s['method']}: {s['reason']}")
    result = {"info": info, "results": rows, "skipped": skipped}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return result


def encoder_tokens(encoder, crop: int) -> int:
    """Tokens of one square crop: patches plus the [CLS] token."""
    return (crop // encoder.patch_size[0]) * (crop // encoder.patch_size[1]) + 1


def finish_row(row: dict, args, crops_per_image: int, peak: float | None, n_ref: int, limit: float) -> None:
    ips = args.images / row["seconds"]
    row.update(images_per_s=ips, ms_per_image=1000 * row["seconds"] / args.images,
               cpu_s_per_image=row["cpu_seconds"] / args.images, crops_per_s=ips * crops_per_image,
               tflops=ips * crops_per_image * row["_flops"] / 1e12, pct_gemm_limit=100 * ips / limit)
    row["pct_peak"] = 100 * row["tflops"] / peak if peak else None
    if "ref_seconds" in row:
        ref_ips = n_ref / row["ref_seconds"]
        row.update(reference_images_per_s=ref_ips, reference_cpu_s_per_image=row["ref_cpu_seconds"] / n_ref,
                   speedup_vs_reference=ips / ref_ips,
                   speedup_vs_reference_cpu_time=(row["ref_cpu_seconds"] / n_ref) / row["cpu_s_per_image"])


def format_row(r: dict, with_ref: bool) -> str:
    s = (f"{r['method']:<14} {r['images_per_s']:8.3f} img/s  {r['ms_per_image']:8.1f} ms/img  "
         f"{r['pct_gemm_limit']:5.1f}% of GEMM limit  cpu {r['cpu_s_per_image']:6.2f} s/img  "
         f"peak {r['peak_mib']:7.0f} MiB  {r['tflops']:7.3f} TFLOP/s")
    if with_ref:
        s += (f"  | ref {r['reference_images_per_s']:.3f} img/s  x{r['speedup_vs_reference']:.2f} "
              f"(cpu time x{r['speedup_vs_reference_cpu_time']:.2f})  masks agree "
              f"{100 * r['mask_agreement_vs_reference']:.2f}%")
    return s


def format_table(rows: list[dict], with_ref: bool) -> str:
    head = ["method", "img/s", "ms/img", "% GEMM limit", "TFLOP/s", "% peak", "peak MiB", "vs clip",
            "vs clip (CPU time)"]
    if with_ref:
        head += ["ref img/s", "ref peak MiB", "x ref", "x ref (CPU time)", "masks = ref %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["method"], f"{r['images_per_s']:.3f}", f"{r['ms_per_image']:.1f}", f"{r['pct_gemm_limit']:.1f}",
                 f"{r['tflops']:.3f}", f"{r['pct_peak']:.1f}" if r.get("pct_peak") is not None else "-",
                 f"{r['peak_mib']:.0f}",
                 f"{r['vs_clip']:.2f}x" if r.get("vs_clip") is not None else "-",
                 f"{r['vs_clip_cpu_time']:.2f}x" if r.get("vs_clip_cpu_time") is not None else "-"]
        if with_ref:
            cells += [f"{r['reference_images_per_s']:.3f}", f"{r['reference_peak_mib']:.0f}",
                      f"{r['speedup_vs_reference']:.2f}x", f"{r['speedup_vs_reference_cpu_time']:.2f}x",
                      f"{100 * r['mask_agreement_vs_reference']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except RfclipError as err:
        sys.exit(f"error: {err}")
