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
