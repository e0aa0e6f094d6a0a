"""Structure: the import graph of rfclip has no cycles (arrows only point down), option coercion, the registry."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import rfclip
from rfclip.methods import METHODS, build_method, method_option_names
from rfclip.methods.base import Method, register_method
from rfclip.methods.options import coerce_options

SRC = Path(rfclip.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> rfclip modules it imports (top level or inside functions; package __init__ files excluded as
    targets when a submodule is named, since importing a submodule always runs its package first)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in files]
                targets = subs or [name]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def test_import_graph_has_no_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_dense_forward_knows_no_method():
    assert not any(m.startswith("rfclip.methods") for m in import_graph()["rfclip.dense"])


def test_string_options_are_coerced_to_their_field_types():
    got = coerce_options(METHODS["rfclip"], {"tau_mult": "4", "embed_kernel": "5", "attn_redistribution": "off",
                                             "tau": "0.01", "fg_rule": "max_abs", "distraction_dims": "1,2"})
    assert got == {"tau_mult": 4.0, "embed_kernel": 5, "attn_redistribution": False, "tau": 0.01,
                   "fg_rule": "max_abs", "distraction_dims": "1,2"}
    assert isinstance(got["tau_mult"], float) and isinstance(got["embed_kernel"], int)
    assert coerce_options(METHODS["naclip"], {"gaussian_std": "3"}) == {"gaussian_std": 3.0}
    with pytest.raises(ValueError, match="embed_kernel"):
        coerce_options(METHODS["rfclip"], {"embed_kernel": "three"})
    with pytest.raises(ValueError, match="attn_redistribution"):
        coerce_options(METHODS["rfclip"], {"attn_redistribution": "maybe"})
    # every method gets the coercion through build_method
    assert build_method("naclip", gaussian_std="2.5").gaussian_std == 2.5


def test_every_listed_method_spec_builds():
    from rfclip.methods import method_specs

    specs = method_specs()
    assert "naclip+fsa" in specs and "rfclip_release+fsa" not in specs
    for spec in specs:
        options = {"distraction_dims": [1, 2]} if "distraction_dims" in method_option_names(spec) else {}
        build_method(spec, **options)


def test_registering_a_taken_name_warns():
    original = METHODS["clip"]

    @dataclasses.dataclass
    class Other(Method):
        name = "clip"

    try:
        with pytest.warns(UserWarning, match="registered again"):
            register_method(Other)
    finally:
        METHODS["clip"] = original
