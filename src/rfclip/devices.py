"""Device names given by users -> ``torch.device``: the one parser every room uses."""

from __future__ import annotations

import torch

from .errors import RfclipError


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """A device name -> ``torch.device`` (``None`` stays ``None``); a bad name is a one-line user error."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise RfclipError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a CUDA device asked for where there is none is a user error."""
    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RfclipError(f"device '{device}' asked for but CUDA is not available here; use --device cpu")
    return dev


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_REUSE_BYTES = 1 << 30


def reuse_cpu_memory(enable: bool = True) -> bool:
    """Let the process keep and reuse large freed CPU buffers instead of returning them to the OS (glibc only).

    A batched forward on CPU allocates and frees tensors of tens to hundreds of MB per layer (activations, the
    N x N attention maps of RF-CLIP). glibc serves blocks above its mmap threshold (at most 32 MB by default) with
    fresh ``mmap`` pages, which the kernel zero-fills page by page on first touch; with ``enable`` the mmap and trim
    thresholds are raised to 1 GiB, so such blocks come from the heap and are reused. Measured on a 2-core CPU
    (``benchmarks/throughput.py``): dense CLIP ViT-B/16 at 36 crops per forward from 0.50 to 0.74 images/s.

    It is a process-wide setting: the process keeps up to 1 GiB of freed memory for reuse (its resident size
    stays near its peak). rfclip's command line switches it on for CPU runs (``RFCLIP_REUSE_CPU_MEMORY=0``
    leaves it off); from Python call ``rfclip.reuse_cpu_memory()`` once yourself. ``enable=False`` sets glibc's
    default values back (128 KiB thresholds; its dynamic mmap threshold stays off). Returns whether the setting
    was applied (False on systems without glibc).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    value = _REUSE_BYTES if enable else 128 * 1024
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))


def reuse_cpu_memory_from_env(device: torch.device) -> bool:
    """The command line's default: :func:`reuse_cpu_memory` for a CPU device unless ``RFCLIP_REUSE_CPU_MEMORY=0``."""
    import os

    if device.type != "cpu" or os.environ.get("RFCLIP_REUSE_CPU_MEMORY", "1").strip().lower() in ("0", "false", "no",
                                                                                                     "off"):
        return False
    return reuse_cpu_memory(True)
