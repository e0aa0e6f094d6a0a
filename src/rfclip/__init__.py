"""rfclip: training-free open-vocabulary semantic segmentation with CLIP.

>>> import rfclip
>>> seg = rfclip.Segmenter("ViT-B-16", "openai", method="rfclip")
>>> out = seg.segment("street.jpg", "road;car;tree;sky")   # out.mask (H, W), out.probs (C, H, W), out.classes
"""

from .devices import reuse_cpu_memory
from . import masks  # noqa: F401  (rfclip.masks.NpzMasks, ... without a separate import)
from .errors import RfclipError
from .methods import METHODS, PLUGINS, build_method
from .models import ClipModel, load_clip
from .segmenter import Segmentation, Segmenter

__version__ = "0.1.0"


def list_methods() -> dict[str, str]:
    """Registered method names with a one-line description; plugins are listed as ``+name``."""
    out = {name: cls.description for name, cls in sorted(METHODS.items())}
    out.update({f"+{name}": (getattr(p, "description", "") or "") for name, p in sorted(PLUGINS.items())})
    return out


__all__ = ["Segmenter", "Segmentation", "load_clip", "ClipModel", "RfclipError", "build_method", "list_methods",
           "reuse_cpu_memory", "__version__"]
