"""Option parsing shared by the methods, the command line and the demo: ``KEY=VALUE`` items (``--option``, the
page's "Method options" field), layer lists, choices, on/off/auto switches, and string options coerced to the type
of their dataclass field."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np

from ..errors import RfclipError


_LAYER_ITEM = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")
_LAYER_HELP = "write 0-based layers and ranges like 0-5,9 (negative: from the end, -1 = last) or all"


def layer_spec(spec, name: str = "rf_layers") -> tuple[tuple[int, int], ...] | None:
    """The syntax of a layer list, checked without knowing the model: ``None`` for all layers, else inclusive
    ``(first, last)`` ranges (negative indices count from the end). Raises a one-line :class:`RfclipError`.

    ``None``/``"all"``/``""`` -> all; ``"0-5,9"``, ``"-3--1"``, ``7``, ``[0, 1, -1]``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if isinstance(spec, bool):
        raise RfclipError(f"{name}: cannot read {spec!r}; {_LAYER_HELP}")
    if isinstance(spec, int):
        return ((spec, spec),)
    if isinstance(spec, (list, tuple)) and not any(isinstance(i, bool) for i in spec):
        spec = ",".join(str(i) for i in spec)  # [0, 1, -1], or ["0-5", 9] from the command line's 0-5,9
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace(";", ",").split(",") if p.strip()]
        ranges = []
        for part in parts:
            m = _LAYER_ITEM.match(part.replace(" ", ""))
            if m is None:
                raise RfclipError(f"{name}: cannot read {part!r} in {spec!r}; {_LAYER_HELP}")
            a = int(m.group(1))
            b = a if m.group(2) is None else int(m.group(2))
            if (a >= 0) == (b >= 0) and a > b:
                raise RfclipError(f"{name}: the range {part} is empty (first > last); write {b}-{a}")
            ranges.append((a, b))
        return tuple(ranges)
    raise RfclipError(f"{name}: cannot read {spec!r}; {_LAYER_HELP}")


def parse_layers(spec, num_layers: int, name: str = "rf_layers") -> frozenset[int]:
    """The 0-based layer set of ``spec`` (see :func:`layer_spec`) on a ``num_layers``-layer model. A layer out of
    range or a range that is empty once negative indices are resolved is a one-line :class:`RfclipError`."""
    ranges = layer_spec(spec, name)
    if ranges is None:
        return frozenset(range(num_layers))
    out: set[int] = set()
    for a, b in ranges:
        for i in (a, b):
            if not -num_layers <= i < num_layers:
                raise RfclipError(f"{name}: layer {i} out of range for a {num_layers}-layer model "
                                  f"(0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
        first, last = a % num_layers, b % num_layers
        if first > last:
            raise RfclipError(f"{name}: the range {a}-{b} is empty on a {num_layers}-layer model (layers "
                              f"{first}..{last}); write the first layer first")
        out.update(range(first, last + 1))
    return frozenset(out)


# ---------------------------------------------------------------------------------------------- KEY=VALUE text
def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, ``"1,2,3"`` -> [1, 2, 3],
    ``"[1, 2]"``/JSON -> as JSON; anything else stays a string."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text[:1] in "[{\"":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["beta=0.4", "distraction_dims=4,162"]`` -> ``{"beta": 0.4, "distraction_dims": [4, 162]}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise RfclipError(f"bad --option '{item}'; write it as KEY=VALUE, e.g. --option gaussian_std=3")
        if key in options:
            raise RfclipError(f"--option {key} given twice; give it once")
        options[key] = parse_value(value)
    return options



def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def parse_switch(value, name: str = "attn_condition") -> bool | None:
    """``"auto"``/None -> None; booleans and on/off/true/false/1/0 strings -> bool."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s == "auto":
        return None
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be auto, on or off; got {value!r}")


_SCALARS = {"bool": bool, "int": int, "float": float}


def _field_type(f: dataclasses.Field) -> type | None:
    """The scalar type of an option field: from its default, or from an ``X | None`` annotation."""
    default = f.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    parts = [p.strip() for p in ann.split("|")]
    if len(parts) == 2 and "None" in parts:
        other = parts[0] if parts[1] == "None" else parts[1]
        return _SCALARS.get(other)
    return None


def coerce_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """Options given as strings (``--option beta=0.3``) become the scalar type of ``cls``'s field.

    Booleans accept true/false/on/off/yes/no/1/0; ``None`` stays ``None``; other fields pass through unchanged.
    Raises ``ValueError`` naming the option when a value cannot be converted.
    """
    if not dataclasses.is_dataclass(cls):
        return dict(options)
    types = {f.name: _field_type(f) for f in dataclasses.fields(cls)}
    out = {}
    for name, value in options.items():
        kind = types.get(name)
        if kind in (int, float) and isinstance(value, (bool, np.bool_)):  # beta=true is not 1.0
            raise ValueError(f"{name} must be a number, got {value!r}")
        if value is None or kind is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[name] = _finite(name, value)
            continue
        if kind is bool:
            flag = parse_switch(value, name)
            if flag is None:
                raise ValueError(f"{name} must be true or false, got {value!r}")
            out[name] = flag
            continue
        try:
            if kind is float:
                out[name] = float(value)
            elif isinstance(value, float) and value.is_integer():
                out[name] = int(value)
            else:
                out[name] = int(str(value).strip())
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
        out[name] = _finite(name, out[name])
    return out


def _finite(name: str, value):
    """A NaN or infinite number (also inside a list) is never a meaningful option value."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def coerce_fields(obj: Any) -> None:
    """:func:`coerce_options` applied in place to a method instance's own fields (direct construction)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in coerce_options(type(obj), values).items():
        if value is not values[name]:
            setattr(obj, name, value)
