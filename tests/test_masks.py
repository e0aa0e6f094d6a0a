"""The mask tier's sources (rfclip.masks): painting, saved maps, SAM2 / SAM / Mask2Former generators built from their
packages' constructors with tiny random-weight configurations (saved in their release layouts), ``rfclip masks``
(CorrCLIP's .npz format, resume) and the bad inputs of issue 19 item 9."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip.cli import main
from rfclip.errors import RfclipError
from rfclip.masks import (HFPanopticMasks, NpzMasks, Sam2Masks, SamMasks, check_region_map, mask_source,
                          paint_by_area)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

FEW_POINTS = "points_per_side=2&pred_iou_thresh=0&stability_score_thresh=0"  # random weights: keep every mask


def _image(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(_image(i)).save(folder / f"img{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------- painting
def _record(mask: np.ndarray) -> dict:
    return {"segmentation": mask, "area": int(mask.sum())}


def _paint_by_definition(records, size):
    """Pixel by pixel: the largest mask covering the pixel wins (on equal areas the later one); its id is its
    1-based rank in ascending area (equal areas in the generator's order)."""
    order = sorted(range(len(records)), key=lambda i: (records[i]["area"], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    out = np.zeros(size, dtype=np.int32)
    for y in range(size[0]):
        for x in range(size[1]):
            covering = [i for i in range(len(records)) if records[i]["segmentation"][y, x]]
            if covering:
                out[y, x] = rank[max(covering, key=lambda i: (records[i]["area"], i))]
    return out


def test_paint_by_area_larger_masks_win():
    size = (6, 8)
    big = np.zeros(size, bool); big[:5, :7] = True                    # area 35
    small = np.zeros(size, bool); small[1:3, 1:3] = True              # area 4, inside big
    mid = np.zeros(size, bool); mid[3:6, 4:8] = True                  # area 12, overlaps big
    tie_a = np.zeros(size, bool); tie_a[0, 0:2] = True                # area 2
    tie_b = np.zeros(size, bool); tie_b[5, 0:2] = True                # area 2 (same), outside big
    records = [_record(m) for m in (big, small, mid, tie_a, tie_b)]
    painted = paint_by_area(records, size)
    assert painted.dtype == np.int32 and painted.shape == size
    np.testing.assert_array_equal(painted, _paint_by_definition(records, size))
    # by hand: ids in ascending area: tie_a 1, tie_b 2, small 3, mid 4, big 5
    assert painted[5, 0] == 2 and painted[0, 0] == 5 and painted[1, 1] == 5  # big covers small and tie_a
    assert painted[5, 7] == 4 and painted[4, 5] == 5 and painted[5, 2] == 0
    assert paint_by_area([], size).sum() == 0


def test_paint_by_area_random_against_definition():
    rng = np.random.default_rng(0)
    size = (9, 11)
    records = [_record(rng.random(size) < p) for p in rng.uniform(0.05, 0.6, size=12)]
    records.append(_record(records[3]["segmentation"].copy()))  # an equal area
    np.testing.assert_array_equal(paint_by_area(records, size), _paint_by_definition(records, size))


# ---------------------------------------------------------------------------------------------- region maps
@pytest.mark.parametrize("bad, words", [
    (np.zeros((4, 5), np.int32), "is 4x5"),
    (np.zeros((4, 6), np.float32), "dtype float32"),
    (np.zeros((4, 6), bool), "dtype bool"),
    (np.full((4, 6), -1, np.int64), "negative"),
    (np.zeros((4, 6, 1), np.int32), "shape"),
])
def test_check_region_map_refuses(bad, words):
    with pytest.raises(RfclipError, match=words) as info:
        check_region_map(bad, (4, 6))
    assert "\n" not in str(info.value)


def test_npz_masks_reads_corrclip_files_and_refuses_bad_ones(tmp_path):
    img = _image(0, 4, 6)
    region_map = np.arange(24, dtype=np.int64).reshape(4, 6)  # CorrCLIP saved int64 maps (np.zeros(..., int))
    np.savez_compressed(tmp_path / "a.npz", instance_mask=region_map)
    out = NpzMasks(tmp_path)(img, "somewhere/a.jpg")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, region_map)
    with pytest.raises(RfclipError, match="no region map"):
        NpzMasks(tmp_path)(img, "b.jpg")
    np.savez(tmp_path / "c.npz", other=region_map)
    with pytest.raises(RfclipError, match="no array 'instance_mask'"):
        NpzMasks(tmp_path)(img, "c.jpg")
    np.savez(tmp_path / "d.npz", instance_mask=np.array([{"x": 1}], dtype=object))
    with pytest.raises(RfclipError, match="cannot read"):
        NpzMasks(tmp_path)(img, "d.jpg")
    np.savez(tmp_path / "f.npz", instance_mask=region_map.astype(np.float32))
    with pytest.raises(RfclipError, match="dtype float32"):
        NpzMasks(tmp_path)(img, "f.jpg")
    np.savez(tmp_path / "g.npz", instance_mask=region_map - 5)
    with pytest.raises(RfclipError, match="negative ids"):
        NpzMasks(tmp_path)(img, "g.jpg")
    np.savez(tmp_path / "e.npz", instance_mask=region_map[:3])
    with pytest.raises(RfclipError, match="is 3x6"):
        NpzMasks(tmp_path)(img, "e.jpg")
    with pytest.raises(RfclipError, match="does not exist"):
        NpzMasks(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def sam2_files(tmp_path_factory):
    """A tiny SAM2 (the package's hiera_t yaml with a 5-block, 16-wide trunk) saved as the release .pt
    (``{"model": state_dict}``), and its yaml."""
    import sam2
    from omegaconf import OmegaConf

    folder = tmp_path_factory.mktemp("sam2")
    cfg = OmegaConf.load(os.path.join(os.path.dirname(sam2.__file__), "configs/sam2.1/sam2.1_hiera_t.yaml"))
    trunk = cfg.model.image_encoder.trunk
    trunk.embed_dim, trunk.num_heads, trunk.stages, trunk.global_att_blocks = 16, 1, [1, 1, 2, 1], [3]
    trunk.window_spec = [8, 4, 4, 4]
    cfg.model.image_encoder.neck.backbone_channel_list = [128, 64, 32, 16]
    cfg.model.memory_attention.num_layers = 1
    OmegaConf.save(cfg, folder / "tiny.yaml")
    from rfclip.masks.generators import _build_sam2_model

    torch.manual_seed(0)
    model = _build_sam2_model(str(folder / "tiny.yaml"))
    torch.save({"model": model.state_dict()}, folder / "sam2_tiny.pt")
    return folder / "sam2_tiny.pt", folder / "tiny.yaml"


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    """A tiny SAM (segment-anything's _build_sam: 2 blocks, width 32, block 1 global) saved as the bare state dict
    of the release .pth files."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    model = _build_sam(32, 2, 2, [1], checkpoint=None)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory):
    """A tiny Mask2Former (Swin backbone) saved by save_pretrained (safetensors) with its image processor."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, encoder_feedforward_dim=64,
                            dim_feedforward=64, num_queries=8, num_labels=5)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("m2f")
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    return folder


def _record_generator_output(source) -> list:
    """The package generator's own records for the next image, kept as the source paints them."""
    records, generate = [], source.generator.generate

    def recording(image):
        records.extend(generate(image))
        return records

    source.generator.generate = recording
    return records


def test_sam2_masks_painted_as_corrclip(sam2_files):
    ckpt, yaml = sam2_files
    source = mask_source(f"sam2:{ckpt}@{yaml}?{FEW_POINTS}", device="cpu")
    assert isinstance(source, Sam2Masks)
    assert source.settings["multimask_output"] is False and source.settings["points_per_side"] == 2
    img = _image(1)
    records = _record_generator_output(source)
    region_map = source(img)
    assert records, "thresholds 0 keep the random model's masks"
    assert region_map.shape == img.shape[:2] and region_map.dtype == np.int32
    np.testing.assert_array_equal(region_map, paint_by_area(records, img.shape[:2]))
    assert source.describe()["source"] == "sam2"


def test_sam2_defaults_are_corrclips(sam2_files):
    ckpt, yaml = sam2_files
    s = Sam2Masks(ckpt, str(yaml), device="cpu").settings
    assert (s["points_per_side"], s["pred_iou_thresh"], s["stability_score_thresh"], s["multimask_output"]) == \
        (8, 0.4, 0.4, False)


def test_sam2_config_picked_from_checkpoint_shapes(monkeypatch):
    from sam2.build_sam import build_sam2

    from rfclip.masks import generators
    from rfclip.masks.generators import sam2_config_for

    state = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
                       apply_postprocessing=False).state_dict()
    assert sam2_config_for(state) == "sam2.1_hiera_t"
    v1 = {k: v for k, v in state.items() if k not in ("no_obj_embed_spatial",)}
    assert sam2_config_for(v1) == "sam2_hiera_t"
    monkeypatch.setattr(generators, "_read_checkpoint", lambda path, what: state)  # as if read from a .pt
    with pytest.raises(RfclipError, match=r"fits sam2.1_hiera_t: use sam2:x.pt@sam2.1_hiera_t or leave out @CONFIG"):
        Sam2Masks("x.pt", "sam2_hiera_t")  # a SAM2.1 checkpoint named with the SAM2 (2.0) config


def test_sam2_checkpoint_not_matching_its_config(sam2_files, images, tmp_path, capsys):
    ckpt, _ = sam2_files
    out = tmp_path / "out"
    code = main(["masks", str(images), "--masks", f"sam2:{ckpt}@sam2.1_hiera_t", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not match its configuration" in err and "sam2:CHECKPOINT@CONFIG" in err
    assert not out.exists()
    with pytest.raises(RfclipError, match="no size the sam2 package ships"):
        Sam2Masks(ckpt)  # the tiny trunk fits no package config: the user must name it
    with pytest.raises(RfclipError, match="unknown SAM2 config 'hiera_x'"):
        Sam2Masks(ckpt, "hiera_x")


def test_sam_masks(sam_file, sam2_files):
    source = mask_source(f"sam:{sam_file}?{FEW_POINTS}", device="cpu")
    assert isinstance(source, SamMasks) and source.model_type == "custom"
    img = _image(2)
    records = _record_generator_output(source)
    region_map = source(img)
    assert region_map.shape == img.shape[:2] and region_map.dtype == np.int32
    np.testing.assert_array_equal(region_map, paint_by_area(records, img.shape[:2]))
    with pytest.raises(RfclipError, match="not a SAM checkpoint"):
        SamMasks(sam2_files[0])
    with pytest.raises(RfclipError, match="not a SAM2 checkpoint"):
        Sam2Masks(sam_file)


def test_sam_checkpoint_not_matching_its_model_type(sam_file):
    from rfclip.masks.generators import SAM_SIZES, sam_size_of

    with pytest.raises(RfclipError, match=r"does not match its configuration .*leave out @TYPE") as info:
        SamMasks(sam_file, "vit_b")
    assert "\n" not in str(info.value)
    shapes = {"image_encoder.patch_embed.proj.weight": torch.empty(768, 3, 16, 16)}
    for i in range(12):
        rows = 127 if i in (2, 5, 8, 11) else 27
        shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = torch.empty(rows, 64)
    assert sam_size_of(shapes) == SAM_SIZES["vit_b"]


def test_mask2former_panoptic_segmentation(m2f_dir):
    source = mask_source(f"hf:{m2f_dir}", device="cpu")
    assert isinstance(source, HFPanopticMasks) and source.model_type == "mask2former"
    img = _image(3)
    region_map = source(img)
    assert region_map.shape == img.shape[:2] and region_map.dtype == np.int32
    inputs = source.processor(Image.fromarray(img), return_tensors="pt")
    with torch.no_grad():
        result = source.processor.post_process_panoptic_segmentation(source.model(**inputs),
                                                                     target_sizes=[img.shape[:2]])[0]
    np.testing.assert_array_equal(region_map, np.maximum(result["segmentation"].numpy(), 0))


def test_eomt_panoptic_segmentation(tmp_path):
    from transformers import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor

    cfg = EomtConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                     num_blocks=1, num_queries=8, num_labels=5, num_register_tokens=1, num_upscale_blocks=1)
    torch.manual_seed(0)
    EomtForUniversalSegmentation(cfg).save_pretrained(tmp_path)
    EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True).save_pretrained(tmp_path)
    source = mask_source(f"hf:{tmp_path}", device="cpu")
    assert source.model_type == "eomt"
    img = _image(4)
    region_map = source(img)
    assert region_map.shape == img.shape[:2] and region_map.dtype == np.int32
    inputs = source.processor(Image.fromarray(img), return_tensors="pt")
    with torch.no_grad():
        result = source.processor.post_process_panoptic_segmentation(source.model(**inputs),
                                                                     target_sizes=[img.shape[:2]])[0]
    np.testing.assert_array_equal(region_map, np.maximum(result["segmentation"].numpy(), 0))


def test_mask2former_weights_not_matching_config(m2f_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "m2f"
    shutil.copytree(m2f_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_dim"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RfclipError, match="do not match its config.json"):
        HFPanopticMasks(folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(RfclipError, match="preprocessor_config.json"):
        HFPanopticMasks(folder)


# ---------------------------------------------------------------------------------------------- mask_source
def test_mask_source_unknown_scheme_lists_the_forms():
    for spec in ("sam3:x.pt", "masks/", "npz:"):
        with pytest.raises(RfclipError, match=r"npz:DIR; sam2:CHECKPOINT\[@CONFIG\]; sam:CHECKPOINT.*; hf:DIR"):
            mask_source(spec)
    with pytest.raises(RfclipError, match="unknown sam2 mask setting 'points'"):
        mask_source("sam2:x.pt?points=3")


def test_extra_missing_is_one_line_with_the_install_steps(monkeypatch, images, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sam2", None)  # import sam2 -> ImportError
    monkeypatch.setitem(sys.modules, "sam2.automatic_mask_generator", None)
    code = main(["masks", str(images), "--masks", "sam2:whatever.pt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "need the package sam2," in err and 'pip install -e ".[masks]"' in err
    assert "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- rfclip masks
class _StripeMasks:
    """A fast stand-in generator: region id = 1 + column // 8, counting its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, path=None):
        self.calls.append(Path(path).name)
        return (1 + np.arange(image.shape[1]) // 8)[None].repeat(image.shape[0], 0).astype(np.int32)

    def describe(self):
        return {"source": "stripes"}


def test_rfclip_masks_writes_corrclip_npz_and_resumes(images, tmp_path, monkeypatch, capsys):
    import rfclip.masks

    fake = _StripeMasks()
    monkeypatch.setattr(rfclip.masks, "mask_source", lambda spec, device=None: fake)
    out = tmp_path / "maps"
    assert main(["masks", str(images), "--masks", "sam2:x.pt", "--out", str(out)]) == 0
    assert sorted(fake.calls) == ["img0.png", "img1.png", "img2.png"]
    assert "wrote 3 region maps" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "img1.npz", "img2.npz", "run.json"]  # nothing else
    with np.load(out / "img1.npz", allow_pickle=False) as data:
        assert data.files == ["instance_mask"] and data["instance_mask"].dtype == np.int32
        np.testing.assert_array_equal(data["instance_mask"], fake(_image(1), "img1.png"))
    np.testing.assert_array_equal(NpzMasks(out)(_image(1), str(images / "img1.png")), fake(_image(1), "x/img1.png"))

    fake.calls.clear()
    (out / "img2.npz").unlink()
    before = (out / "img0.npz").stat().st_mtime_ns
    assert main(["masks", str(images), "--masks", "sam2:x.pt", "--out", str(out)]) == 0
    assert fake.calls == ["img2.png"] and (out / "img0.npz").stat().st_mtime_ns == before
    assert "wrote 1 region map to" in capsys.readouterr().out
    assert main(["masks", str(images), "--masks", "sam2:x.pt", "--out", str(out)]) == 0
    assert "already in" in capsys.readouterr().out and fake.calls == ["img2.png"]


def test_rfclip_masks_with_a_real_generator_round_trips(sam_file, images, tmp_path):
    out = tmp_path / "maps"
    spec = f"sam:{sam_file}?{FEW_POINTS}"
    assert main(["masks", str(images / "img0.png"), "--masks", spec, "--out", str(out), "--device", "cpu"]) == 0
    expected = SamMasks(sam_file, device="cpu", points_per_side=2, pred_iou_thresh=0,
                        stability_score_thresh=0)(_image(0))
    np.testing.assert_array_equal(NpzMasks(out)(_image(0), "img0.png"), expected)


def test_rfclip_masks_lists_failures_and_writes_no_partial_file(images, tmp_path, capsys):
    saved = tmp_path / "saved"
    saved.mkdir()
    np.savez_compressed(saved / "img0.npz", instance_mask=np.ones((40, 56), np.int32))
    np.savez_compressed(saved / "img1.npz", instance_mask=np.ones((40, 55), np.int32))  # wrong size
    out = tmp_path / "copy"
    code = main(["masks", str(images), "--masks", f"npz:{saved}", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert any("img1.png" in line and "is 40x55" in line for line in lines)
    assert any("img2.png" in line and "no region map" in line for line in lines)
    assert "2 of 3 images got no region map" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"inputs": 3, "written": 1, "skipped_done_before": 0, "failed": 2}
    assert [f["image"] for f in run["failed"]] == [str(images / "img1.png"), str(images / "img2.png")]
    assert "no region map" in run["failed"][1]["reason"]


def test_rfclip_masks_on_a_dataset(tmp_path, monkeypatch):
    import rfclip.masks

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for i, name in enumerate(["2007_000001", "2007_000002"]):
        Image.fromarray(_image(i, 20, 30)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n")
    fake = _StripeMasks()
    monkeypatch.setattr(rfclip.masks, "mask_source", lambda spec, device=None: fake)
    out = tmp_path / "maps"
    assert main(["masks", "--dataset", "voc21", "--root", str(voc), "--masks", "npz:x", "--out", str(out),
                 "--limit", "1", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["2007_000001.npz", "run.json"]
    assert main(["masks", str(tmp_path), "--dataset", "voc21", "--masks", "npz:x", "--out", str(out)]) == 2


def _maps(folder: Path) -> dict[str, np.ndarray]:
    found = {}
    for file in sorted(folder.glob("*.npz")):
        with np.load(file, allow_pickle=False) as data:
            found[file.name] = data["instance_mask"]
    return found


def test_rfclip_masks_on_torchrun_equals_one_process(tmp_path, capsys):
    """2 processes (gloo, CPU) with saved maps as the source (npz:DIR copies them: fast, and it runs in the
    subprocesses): the same maps as one process, rank 0's run.json with both ranks, a rerun skips everything."""
    import subprocess

    photos, saved = tmp_path / "photos", tmp_path / "saved"
    photos.mkdir()
    saved.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(_image(i, 24, 32)).save(photos / f"img{i}.png")
        np.savez_compressed(saved / f"img{i}.npz", instance_mask=rng.integers(0, 9, (24, 32)).astype(np.int32))
    (photos / ".img9.png.77.rfclip-tmp").write_bytes(b"a hidden temporary file is no input")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two"
    two.mkdir()
    (two / ".img3.npz.999.rfclip-tmp").write_bytes(b"left by a killed run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rfclip",
           "masks", str(photos), "--masks", f"npz:{saved}", "--out", str(two), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("wrote 5 region maps") == 1  # rank 0 reports the job
    one = tmp_path / "one"
    assert main(["masks", str(photos), "--masks", f"npz:{saved}", "--out", str(one), "-q"]) == 0
    m1, m2 = _maps(one), _maps(two)
    assert list(m1) == [f"img{i}.npz" for i in range(5)] and m1.keys() == m2.keys()
    for name in m1:
        np.testing.assert_array_equal(m1[name], m2[name])
        np.testing.assert_array_equal(m1[name], _maps(saved)[name])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no temporary, no lock
    run2, run1 = json.loads((two / "run.json").read_text()), json.loads((one / "run.json").read_text())
    counts = {"inputs": 5, "written": 5, "skipped_done_before": 0, "failed": 0}
    assert run2["counts"] == run1["counts"] == counts and run2["failed"] == []
    assert run2["world_size"] == 2 and [r["rank"] for r in run2["per_rank"]] == [0, 1]
    assert [r["written"] for r in run2["per_rank"]] == [3, 2]  # image i on rank i % 2
    assert all(r["images_per_s"] and r["seconds"] > 0 for r in run2["per_rank"])
    assert run2["settings"]["masks"] == f"npz:{saved}" and run2["wall_seconds"] > 0

    before = {p.name: p.stat().st_mtime_ns for p in two.glob("*.npz")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 5 region maps are already in" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in two.glob("*.npz")} == before
    run = json.loads((two / "run.json").read_text())
    assert run["counts"] == {"inputs": 5, "written": 0, "skipped_done_before": 5, "failed": 0}
    assert [r["done_before"] for r in run["per_rank"]] == [3, 2]


def test_rfclip_masks_sigterm_leaves_no_partial_file_and_the_rerun_finishes(images, tmp_path, monkeypatch, capsys):
    import signal

    import rfclip.masks

    fake = _StripeMasks()
    monkeypatch.setattr(rfclip.masks, "mask_source", lambda spec, device=None: fake)
    real_savez, saved = np.savez_compressed, []

    def savez_then_terminate(file, **arrays):  # the second map is half written when SIGTERM comes
        real_savez(file, **arrays)
        saved.append(1)
        if len(saved) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as timeout, docker, Slurm or torchrun stop a job

    monkeypatch.setattr(np, "savez_compressed", savez_then_terminate)
    out = tmp_path / "maps"
    assert main(["masks", str(images), "--masks", "sam2:x.pt", "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "rfclip: interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz"]  # no partial map, no lock, no run.json
    fake.calls.clear()
    assert main(["masks", str(images), "--masks", "sam2:x.pt", "--out", str(out)]) == 0
    assert fake.calls == ["img1.png", "img2.png"]
    assert json.loads((out / "run.json").read_text())["counts"]["skipped_done_before"] == 1


def test_masks_option_on_segment_eval_demo():
    from rfclip.cli import build_parser

    parser = build_parser()
    for argv in (["segment", "a.jpg", "--classes", "a;b", "--out", "o"], ["eval", "--dataset", "voc21", "--root", "r"],
                 ["demo"]):
        args = parser.parse_args([*argv, "--masks", "npz:dir"])
        assert args.masks == "npz:dir"
    assert "sam2:CHECKPOINT" in parser._subparsers._group_actions[0].choices["segment"].format_help()


# ---------------------------------------------------------------------------------------------- demo --masks
@pytest.fixture
def masks_engine(tiny_clip, tmp_path):
    from rfclip.demo.engine import DemoEngine, ModelInfo
    from rfclip.segmenter import Segmenter

    saved = tmp_path / "maps"
    saved.mkdir()
    region_map = np.zeros((40, 56), np.int32)
    region_map[:, 20:] = 3
    region_map[10:30, 30:50] = 7
    np.savez_compressed(saved / "photo.npz", instance_mask=region_map)
    Image.fromarray(_image(5)).save(tmp_path / "photo.png")
    base = Segmenter(tiny_clip, method="clip", device="cpu", text_cache=False, templates=["a photo of a {}."])
    (tmp_path / "out").mkdir()
    engine = DemoEngine(base, ModelInfo("tiny", None, "tiny.safetensors", "cpu"), out_root=tmp_path / "out",
                        masks=NpzMasks(saved))
    return engine, tmp_path / "photo.png", region_map


def test_demo_offers_mask_methods_only_with_a_mask_source(monkeypatch):
    from rfclip.demo.engine import method_choices
    from rfclip.methods import METHODS
    from rfclip.methods.base import spec_needs_masks as needs_masks

    monkeypatch.setitem(METHODS, "zz_regions", type("ZZRegions", (METHODS["clip"],), {"needs_masks": True}))
    assert needs_masks("zz_regions") and not needs_masks("clip")
    assert "zz_regions" not in method_choices() and "clip" in method_choices()
    assert "zz_regions" in method_choices(with_masks=True)


def test_demo_draws_the_regions_of_the_mask_source(masks_engine):
    from rfclip.demo.engine import DemoEngine, Settings
    from rfclip.masks.draw import region_boundaries

    engine, photo, region_map = masks_engine
    picture = np.asarray(engine.regions(str(photo)))
    assert picture.shape == (40, 56, 3)
    image = _image(5)
    untouched = (region_map == 0) & ~region_boundaries(region_map)
    np.testing.assert_array_equal(picture[untouched], image[untouched])
    assert (picture[region_boundaries(region_map)] == 255).all()
    inside_3, inside_7 = picture[5, 25].astype(int) - image[5, 25], picture[20, 40].astype(int) - image[20, 40]
    assert np.abs(inside_3).sum() > 0 and np.abs(inside_7).sum() > 0
    result = engine.segment(str(photo), "cat; dog", "clip", Settings(short_side=224), show_regions=True)
    np.testing.assert_array_equal(np.asarray(result.regions), picture)
    assert engine.segment(str(photo), "cat; dog", "clip", Settings(short_side=224)).regions is None
    plain = DemoEngine(engine.base, engine.info, out_root=engine.out_root)
    with pytest.raises(RfclipError, match="--masks SPEC"):
        plain.regions(str(photo))


def test_demo_page_with_masks_has_the_regions_view(masks_engine):
    from rfclip.demo.app import build_app

    engine, _, _ = masks_engine
    app = build_app(engine, method="clip")
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"regions-run", "regions-image"} <= ids


def test_base_install_imports_no_mask_package():
    import subprocess

    code = ("import sys, rfclip.masks, rfclip.cli.masks; from rfclip.cli import build_parser; build_parser(); "
            "print([m for m in ('sam2', 'segment_anything', 'transformers', 'hydra') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert out.stdout.strip() == "[]"
