"""TorchScript archives read as data: the same state dict as ``torch.jit.load(...).state_dict()``, and nothing in
the archive runs (a scripted ``__setstate__`` with a side effect, a pickle that names a Python callable)."""

from __future__ import annotations

import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

from rfclip.errors import RfclipError
from rfclip.models.loading import load_clip
from rfclip.models.torchscript import TorchScriptFormatError, read_torchscript_state_dict


class Block(nn.Module):
    """Parameters, a buffer, a plain tensor attribute (not state), a submodule list, an nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.layers = nn.ModuleList([nn.LayerNorm(8), nn.Linear(8, 8)])
        self.scale = nn.Parameter(torch.randn(3, 8).half())
        self.register_buffer("vocab_size", torch.tensor(49408))
        self.mask = torch.ones(2, 2)  # a plain attribute: not in state_dict()

    def forward(self, x):
        y = self.attn(self.layers[0](x), x, x, need_weights=False)[0]
        return self.layers[1](y) + self.scale[:1].float().sum() + self.mask.sum()


class SideEffect(nn.Module):
    """``__setstate__`` scripted into the archive: TorchScript's own loader runs it (it scales the buffer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.ones(4))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.weight = state[0] * 7
        self.training = state[1]


def _save(module: nn.Module, path, how: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "trace":
            torch.jit.trace(module.eval(), torch.randn(4, 1, 8)).save(str(path))
        else:
            torch.jit.script(module.eval()).save(str(path))


def _jit_state_dict(path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(torch.jit.load(str(path)).state_dict())


@pytest.mark.parametrize("how", ["trace", "script"])
def test_same_state_dict_as_torch_jit(tmp_path, how):
    path = tmp_path / f"{how}.pt"
    _save(Block(), path, how)
    ours, ref = read_torchscript_state_dict(path), _jit_state_dict(path)
    assert list(ours) == list(ref)  # same keys, same order; the plain `mask` attribute is left out
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert "mask" not in ours


def test_scripted_setstate_is_not_run(tmp_path):
    path = tmp_path / "side_effect.pt"
    _save(SideEffect(), path, "script")
    assert torch.equal(_jit_state_dict(path)["weight"], torch.full((4,), 7.0))  # TorchScript runs __setstate__
    with pytest.raises(TorchScriptFormatError, match="custom pickled state"):  # refused, not interpreted
        read_torchscript_state_dict(path)


def _tamper(path, out, payload: bytes):
    """A copy of archive ``path`` whose data.pkl is ``payload``."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = payload if item.filename.endswith("/data.pkl") else src.read(item.filename)
            dst.writestr(item, data)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_python_globals_are_refused(tmp_path):
    path = tmp_path / "ok.pt"
    _save(Block(), path, "trace")
    bad = tmp_path / "evil.pt"
    _tamper(path, bad, pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(TorchScriptFormatError, match="posix.system|os.system|nt.system"):
        read_torchscript_state_dict(bad)
    with pytest.raises(RfclipError) as err:
        load_clip("ViT-B-16", checkpoint=bad)
    assert "\n" not in str(err.value) and "TorchScript" in str(err.value)


def test_views_are_bounds_checked(tmp_path):
    """A tensor reference larger than its storage is an error, not an out-of-bounds read."""
    path = tmp_path / "ok.pt"
    _save(Block(), path, "trace")
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        data = zf.read(name)
    # the `scale` parameter is (3, 8) fp16 = 24 elements; claim (300, 8) instead
    needle = b"(K\x03K\x08t"  # MARK, BININT1 3, BININT1 8, TUPLE: the size (3, 8) as TorchScript pickles it
    assert data.count(needle) == 1
    bad = tmp_path / "oob.pt"
    _tamper(path, bad, data.replace(needle, b"(M\x2c\x01K\x08t"))  # BININT2 300
    with pytest.raises(TorchScriptFormatError, match="past the end of its storage"):
        read_torchscript_state_dict(bad)


def test_truncated_archive_is_an_error(tmp_path):
    path = tmp_path / "ok.pt"
    _save(Block(), path, "trace")
    raw = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((zipfile.BadZipFile, TorchScriptFormatError, EOFError, OSError, KeyError)):
        read_torchscript_state_dict(cut)
