"""Segmentation methods, registered by name. Each is a short set of hooks on :mod:`rfclip.dense`."""

from .base import (METHODS, PLUGINS, Method, build_method, method_option_names, method_specs, parse_method_spec,
                   register_method, register_plugin)
from . import clip, clearclip, naclip, sclip  # noqa: F401  (registration)
from . import proxyclip  # noqa: F401  (registration)
from . import fsa  # noqa: F401  (registration of the +fsa plug-in)
from . import rfclip  # noqa: F401  (registration of rfclip and its presets)
from . import rfclip_release  # noqa: F401  (registration of rfclip_release)
from . import corrclip  # noqa: F401  (registration of corrclip)
from . import region_masks  # noqa: F401  (registration of the +masks plug-in)

__all__ = ["METHODS", "PLUGINS", "Method", "build_method", "method_option_names", "method_specs", "parse_method_spec",
           "register_method", "register_plugin"]
