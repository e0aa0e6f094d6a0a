"""The weights of a TorchScript archive (OpenAI's ``~/.cache/clip/*.pt``), read without TorchScript.

``torch.jit.load`` runs any scripted ``__setstate__`` stored in an archive, so a TorchScript file would be as
trusted as a program. rfclip reads the archive as data instead:

- ``data.pkl`` (the module tree) goes through an unpickler that resolves only tensor rebuilding, ``OrderedDict``
  and TorchScript's list helpers; every scripted class becomes an inert record of its pickled attributes, and
  any other global is refused;
- the tensors' bytes come from ``data/<key>`` in the zip, shared between tensors that view one storage;
- which attributes are parameters and buffers comes from the class headers in ``code/``
  (``__parameters__ = [...]``, ``__buffers__ = [...]``), so plain tensor attributes of scripted modules are left
  out exactly as ``state_dict()`` leaves them out.

The result equals ``torch.jit.load(path).state_dict()`` (tested on traced and scripted archives).
"""

from __future__ import annotations

import ast
import collections
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch
from torch import Tensor

_STORAGE_DTYPES = {  # the storage class names a pickled tensor reference may carry
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
# class headers in code/: `class Name(Module):` then the parameter and buffer name lists
_CLASS_HEADER = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = (\[.*?\])\n  __buffers__ = (\[.*?\])",
                           re.MULTILINE)


class TorchScriptFormatError(ValueError):
    """The archive is not a TorchScript module archive rfclip can read as data."""


class _ScriptObject:
    """An inert stand-in for an instance of a scripted class: its pickled state and nothing else."""

    qualname = ""

    def __new__(cls, *args):
        return object.__new__(cls)

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    """Stands in for ``torch.<X>Storage`` in a storage reference: just its dtype (cannot be called)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> Tensor:
    """``torch._utils._rebuild_tensor_v2`` on the (untyped storage, dtype) pairs of :meth:`_Reader.persistent_load`,
    after checking that the view lies inside the storage."""
    if not isinstance(storage, tuple) or len(storage) != 2:
        raise TorchScriptFormatError("a tensor without a storage reference")
    untyped, dtype = storage
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or min((offset, *size, *stride), default=0) < 0:
        raise TorchScriptFormatError(f"a tensor with invalid geometry (size {size}, stride {stride})")
    capacity = untyped.nbytes() // dtype.itemsize
    if all(size) and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= capacity:
        raise TorchScriptFormatError(f"a tensor of size {size} reaches past the end of its storage")
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


def _as_list(values) -> list:
    return list(values)


def _restore_type_tag(value, type_str):
    return value


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _Reader(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, torch.UntypedStorage] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            cls = self.classes.get(qualname)
            if cls is None:
                cls = self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return cls
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        found = _SAFE_GLOBALS.get((module, name))
        if found is None:
            raise TorchScriptFormatError(f"the archive refers to {module}.{name}, which rfclip does not load")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise TorchScriptFormatError(f"unexpected persistent reference {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        storage = self.storages.get(key)
        if storage is None:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise TorchScriptFormatError(f"tensor data {key} is missing from the archive") from None
            storage = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage() if raw else \
                torch.UntypedStorage(0)
            self.storages[key] = storage
        if storage.nbytes() < int(numel) * storage_type.dtype.itemsize:
            raise TorchScriptFormatError(f"tensor data {key} is shorter than its {numel} elements")
        return storage, storage_type.dtype


def _state_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """Qualified class name -> its parameter and buffer names, from the class headers in ``code/``."""
    names: dict[str, set[str]] = {}
    code = f"{prefix}code/"
    for entry in archive.namelist():
        if not (entry.startswith(code) and entry.endswith(".py")):
            continue
        module = entry[len(code):-3].replace("/", ".")  # code/__torch__/a/b.py -> __torch__.a.b
        text = archive.read(entry).decode("utf-8", errors="replace")
        for cls, params, buffers in _CLASS_HEADER.findall(text):
            names[f"{module}.{cls}"] = set(ast.literal_eval(params)) | set(ast.literal_eval(buffers))
    return names


def _collect(obj: _ScriptObject, prefix: str, state_names: dict[str, set[str]], out: dict[str, Tensor],
             depth: int = 0) -> None:
    if depth > 64:
        raise TorchScriptFormatError("the module tree is nested too deeply")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):  # a custom __getstate__: only TorchScript code could interpret it
        raise TorchScriptFormatError(f"{type(obj).qualname} has custom pickled state, not a plain module")
    keep = state_names.get(type(obj).qualname)  # None: no header found, keep every tensor attribute
    for key, value in state.items():
        if isinstance(value, Tensor):
            if keep is None or key in keep:
                out[prefix + str(key)] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{key}.", state_names, out, depth + 1)


def read_torchscript_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict()`` of the module saved in a TorchScript archive, read as data (nothing is executed).

    Raises :class:`TorchScriptFormatError` for archives that are not plain module archives, and the zip/pickle
    errors of a truncated file."""
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pkl) != 1:
            raise TorchScriptFormatError("no data.pkl at the top of the archive")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            order = archive.read(f"{prefix}byteorder").decode().strip()
        except KeyError:
            order = "little"
        if order != sys.byteorder:
            raise TorchScriptFormatError(f"the archive is {order}-endian, this machine is {sys.byteorder}-endian")
        with archive.open(pkl[0]) as fh:
            root = _Reader(fh, archive, prefix).load()
        if not isinstance(root, _ScriptObject):
            raise TorchScriptFormatError("the archive holds no scripted module")
        out: dict[str, Tensor] = {}
        _collect(root, "", _state_names(archive, prefix), out)
    return out
