"""CPU speed settings: the device-dependent crops per forward and the allocator setting of the command line."""

import sys

import numpy as np
import pytest
import torch

from rfclip.devices import reuse_cpu_memory, reuse_cpu_memory_from_env
from rfclip.errors import RfclipError
from rfclip.inference import DEFAULT_CROPS_PER_FORWARD, InferenceConfig, crops_per_forward
from rfclip.segmenter import Segmenter


def test_crops_per_forward_default_depends_on_device():
    assert InferenceConfig().batch_size is None
    assert crops_per_forward(None, torch.device("cpu")) == DEFAULT_CROPS_PER_FORWARD["cpu"] == 8
    assert crops_per_forward(None, torch.device("cuda")) == DEFAULT_CROPS_PER_FORWARD["cuda"] == 64
    assert crops_per_forward(3, torch.device("cuda")) == 3
    assert InferenceConfig(batch_size=5.0).batch_size == 5
    with pytest.raises(RfclipError, match="batch_size"):
        InferenceConfig(batch_size=0)


def test_default_batch_gives_the_same_masks_as_one_crop_per_forward(tiny_clip, rng):
    """The CPU default (8 crops per forward) is only a chunking of the crops: the result equals batch_size=1."""
    image = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)  # 15 crops: two forwards of 8 and 7
    seg = Segmenter(tiny_clip, method="clip", device="cpu", text_cache=False, templates=["{}"], short_side=64,
                    slide_crop=32, slide_stride=16)
    text = seg.encode_classes("a;b;c")
    (mask, probs), = seg.predict([image], text)
    (mask1, probs1), = seg.with_config(batch_size=1).predict([image], text)
    assert torch.equal(mask, mask1)
    torch.testing.assert_close(probs, probs1, atol=1e-5, rtol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_cpu_memory_applies_and_env_switches_it_off(monkeypatch):
    monkeypatch.setenv("RFCLIP_REUSE_CPU_MEMORY", "0")
    assert reuse_cpu_memory_from_env(torch.device("cpu")) is False
    monkeypatch.setenv("RFCLIP_REUSE_CPU_MEMORY", "1")
    assert reuse_cpu_memory_from_env(torch.device("cuda")) is False  # only CPU runs change the allocator
    assert reuse_cpu_memory_from_env(torch.device("cpu")) is True
    # tensors allocated and freed afterwards work as before (the setting only changes where memory comes from)
    for _ in range(3):
        x = torch.ones(64, 1024, 1024)  # 256 MiB, above glibc's default mmap threshold
        assert float(x.sum()) == 64 * 1024 * 1024
        del x
    assert reuse_cpu_memory(False) is True  # back to fixed 128 KiB thresholds
    assert np.isfinite(float(torch.randn(1000).sum()))
