"""Multi-process evaluation: ``torchrun --nproc_per_node 2 -m rfclip eval`` on CPU (gloo) gives exactly the numbers of
a single-process run; only rank 0 prints and writes. Same generated VOC21 dataset and tiny checkpoint folder as
``test_evaluate.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from rfclip.cli import main
from rfclip.data import build_dataset
from rfclip.evaluate import distributed_session, evaluate
from rfclip.models.loading import load_clip
from rfclip.segmenter import Segmenter
from test_evaluate import EVAL_CFG, make_voc2012, save_open_clip_folder

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("dist")
    voc = base / "VOCdevkit" / "VOC2012"
    make_voc2012(voc, num_images=5, seed=3)  # 5 images in batches of 2: rank 0 gets 3 images, rank 1 gets 2
    ckpt = save_open_clip_folder(base / "ckpt", EVAL_CFG, seed=1)
    return {"base": base, "voc": voc, "ckpt": ckpt, "cache": base / "cache"}


def _eval_args(data, out) -> list[str]:
    return ["eval", "--dataset", "voc21", "--root", str(data["voc"]), "--method", "naclip", "--checkpoint",
            str(data["ckpt"]), "--device", "cpu", "--short-side", "64", "--images-per-batch", "2",
            "--num-workers", "1", "--out", str(out), "--quiet"]


def test_torchrun_two_processes_equal_one(data, tmp_path, monkeypatch):
    env = dict(os.environ, RFCLIP_CACHE=str(data["cache"]), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out2 = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rfclip", *_eval_args(data, out2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # only rank 0 printed its summary and wrote the files
    assert proc.stdout.count("VOC21: mIoU") == 1 and proc.stdout.count("wrote ") == 1, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.csv", "two.json"]

    monkeypatch.setenv("RFCLIP_CACHE", str(data["cache"]))
    out1 = tmp_path / "one.json"
    assert main(_eval_args(data, out1)) == 0
    two, one = json.loads(out2.read_text()), json.loads(out1.read_text())
    assert two["meta"]["world_size"] == 2 and one["meta"]["world_size"] == 1
    assert two["result"]["num_images"] == one["result"]["num_images"] == 5  # no padding, no duplicates
    assert two["result"]["counts"] == one["result"]["counts"]  # integer sums: exactly equal
    for key in ("miou", "aacc", "macc", "iou", "acc"):
        assert two["result"][key] == one["result"][key], key
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_session_in_process(data, monkeypatch):
    """A one-process torchrun environment: gloo is initialised for the run and destroyed after it."""
    monkeypatch.setenv("RFCLIP_CACHE", str(data["cache"]))
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    seg = Segmenter(load_clip("tiny", checkpoint=data["ckpt"]), method="naclip", device="cpu")
    ds = build_dataset("voc21", data["voc"])
    with distributed_session("cpu") as info:
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert (info.rank, info.world_size, str(info.device)) == (0, 1, "cpu") and info.is_main
        inside = evaluate(seg, ds, limit=3, num_workers=0, progress=False, overrides={"short_side": 64})
    assert not dist.is_initialized()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    with distributed_session("cpu") as info:  # outside torchrun: nothing is initialised
        assert not dist.is_initialized() and info.world_size == 1
    outside = evaluate(seg, ds, limit=3, num_workers=0, progress=False, overrides={"short_side": 64})
    assert inside["counts"] == outside["counts"]
