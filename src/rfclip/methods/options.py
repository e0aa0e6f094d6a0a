"""Option parsing shared by the methods: layer lists, choices, on/off/auto switches, and string options from the
command line coerced to the type of their dataclass field."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import RfclipError


def parse_layers(spec, num_layers: int) -> frozenset[int]:
    """``None``/``"all"`` -> every layer; ``"0-5,9"``, ``[0, 1, -1]`` (0-based; negatives count from the end)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return frozenset(range(num_layers))
    if isinstance(spec, str):
        items: list = []
        for part in spec.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-", 1)[0],
                                                                             part[1:].split("-", 1)[1])
                items.extend(range(int(a) % num_layers, int(b) % num_layers + 1))
            else:
                items.append(int(part))
    elif isinstance(spec, int):
        items = [spec]
    else:
        items = [int(i) for i in spec]
    out = set()
    for i in items:
        if not -num_layers <= i < num_layers:
            raise RfclipError(f"rf_layers: layer {i} out of range for a {num_layers}-layer model (0-based)")
        out.add(i % num_layers)
    return frozenset(out)


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
    """Options given as strings (``--option alpha=0.3``) become the scalar type of ``cls``'s field.

    Booleans accept true/false/on/off/yes/no/1/0; ``None`` stays ``None``; other fields pass through unchanged.
    Raises ``ValueError`` naming the option when a value cannot be converted.
    """
    if not dataclasses.is_dataclass(cls):
        return dict(options)
    types = {f.name: _field_type(f) for f in dataclasses.fields(cls)}
    out = {}
    for name, value in options.items():
        kind = types.get(name)
        if value is None or kind is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[name] = value
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
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
    return out


def coerce_fields(obj: Any) -> None:
    """:func:`coerce_options` applied in place to a method instance's own fields (direct construction)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in coerce_options(type(obj), values).items():
        if value is not values[name]:
            setattr(obj, name, value)
