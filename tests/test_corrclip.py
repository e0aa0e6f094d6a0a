"""corrclip: the official CorrCLIP v1 code reproduced, and its region-map steps.

* End to end against an independent restatement of the official code (``corrclip_reference.py``: one window at a
  time, the whole [MCT, CLS, patches] sequence with a boolean attention mask, region loops, a DBSCAN loop, fp64) on
  random weights: a ViT-B/16-geometry CLIP (patch 16, native 224, 12 layers; narrow) saved in OpenAI's layout and a
  DINO-B/8-geometry ViT (patch 8, native 224) saved in DINO's release layout, with the same integer region maps.
* Each step against its definition; batched equals one crop at a time.

Random weights test mechanics, not accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import corrclip_reference as ref
from conftest import make_clip
from rfclip.errors import RfclipError
from rfclip.inference import dense_logits, preprocess
from rfclip.methods import build_method
from rfclip.methods.regions import (connected_components, merge_regions, region_mode, resize_nearest,
                                    scope_attention)
from rfclip.models.loading import load_clip
from rfclip.models.vfm import VisionFoundationModel, load_state_into, read_state_dict
from rfclip.segmenter import Segmenter
from rfclip.text import TextQueries

VITB16 = dict(embed_dim=64, quick_gelu=True,
              vision_cfg=dict(image_size=224, layers=12, width=64, head_width=32, patch_size=16),
              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
FAST = dict(device="cpu", text_cache=False, templates=["a photo of a {}."])
DINO_NAME = "vit_base_patch8_224.dino"


def tiny_dino(seed):
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=224, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True).eval()
    with torch.no_grad():
        net.pos_embed.normal_(0, 0.05)  # positions that matter, not so much that no regions merge
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(CLIP loaded from an OpenAI-layout file, DINO loaded from a release-layout file, the source modules)."""
    base = tmp_path_factory.mktemp("corrclip")
    clip_src = make_clip(VITB16, seed=0)
    extras = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}  # OpenAI's release file (fp16 plus these entries)
    torch.save({**{k: v.half() for k, v in clip_src.model.state_dict().items()}, **extras}, base / "openai_vitb16.pt")
    clip = load_clip(checkpoint=base / "openai_vitb16.pt", device="cpu", quick_gelu=True)
    dino_src = tiny_dino(1)
    torch.save(dino_src.state_dict(), base / "dino_vitbase8_pretrain.pth")  # DINO's release keys, no wrapper
    net = tiny_dino(2)  # other weights: the file must replace them
    load_state_into(net, read_state_dict(base / "dino_vitbase8_pretrain.pth"), DINO_NAME, "dino")
    vfm = VisionFoundationModel(net, name=DINO_NAME)
    return clip, vfm, dino_src


def vocabulary(dim=64, seed=0):
    """5 queries, 4 classes: the background has two synonyms first (the official code's assumption)."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(5, dim, generator=g), dim=-1)
    synonyms = [["bg", "bg2"], ["a"], ["b"], ["c"]]
    return TextQueries(feats, torch.tensor([0, 0, 1, 2, 3]), [s[0] for s in synonyms], synonyms)


def image(size, seed=0, flat_left=True):
    img = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    if flat_left:  # a flat half gives regions with near-identical DINO features (they merge)
        img[:, : size[1] // 2] = (120, 130, 110)
    return img


def blocks_map(size, step, start=1, zero_rows=0):
    m = np.zeros(size, dtype=np.int32)
    k = start
    for i in range(0, size[0], step):
        for j in range(0, size[1], step):
            m[i:i + step, j:j + step] = k
            k += 1
    m[:zero_rows] = 0
    return m


CASES = {  # name: (image size, crop, stride, region map, expect merging)
    "window224": ((224, 224), 224, 112, lambda s: blocks_map(s, 56, zero_rows=20), True),
    "input336": ((336, 336), 336, 112, lambda s: blocks_map(s, 84, zero_rows=30), True),
    "slide-padded": ((200, 260), 150, 100, lambda s: blocks_map(s, 64, zero_rows=16), True),
    "no-zero": ((224, 224), 224, 112, lambda s: blocks_map(s, 56, start=3), True),
    "few-regions": ((224, 224), 224, 112, lambda s: np.where(blocks_map(s, 112) > 2, 5, 0).astype(np.int32), False),
    "non-square": ((150, 260), 224, 112, lambda s: blocks_map(s, 50, zero_rows=10), None),  # 168 x 224 padded crops
}


def seg_for(models, crop, stride, **options):
    clip, vfm, _ = models
    return Segmenter(clip, method="corrclip", vfm=vfm, short_side=None, slide_crop=crop, slide_stride=stride,
                     **options, **FAST)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_official_code(models, case):
    size, crop, stride, make_map, merges = CASES[case]
    clip, vfm, dino_src = models
    img, regions = image(size), make_map(size)
    text = vocabulary()
    seg = seg_for(models, crop, stride)
    (mask, probs), = seg.predict([img], text, regions=[regions])
    visual = clip.model.visual
    with torch.no_grad():
        want_probs, want_mask = ref.corrclip_predict(
            _double(visual), _double(dino_src), preprocess(img, None).double(), torch.from_numpy(regions).long(),
            text.features.double(), text.num_classes, crop=crop, stride=stride)
    diff = (probs.double() - want_probs).abs().max().item()
    print(f"\n{case}: max |p - p_official| = {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(mask, want_mask)
    # the case exercises what it names
    x = preprocess(img, None)[None, :, :crop, :crop]
    feats, grid = vfm.last_query_key(x)
    vmap = resize_nearest(torch.from_numpy(regions).long()[:crop, :crop], grid).reshape(-1)
    merged = merge_regions(vmap, feats[0])
    assert merges is None or (torch.unique(merged).numel() < torch.unique(vmap).numel()) == merges
    assert not torch.equal(mask, want_probs.argmax(0)) or case == "few-regions"  # map correction changed labels


def test_vitl14_geometry_and_the_real_dino_b8(tmp_path):
    """ViT-L/14 geometry (patch 14, 24 layers: NUM_SPATIAL 12) with the full DINO ViT-B/8 architecture, loaded by
    name from a file in DINO's release layout: a 112 window (CLIP grid 8, DINO grid 14: both positions interpolated)
    against the official code."""
    import timm

    from rfclip.methods.corrclip import num_spatial
    from rfclip.models.vfm import load_vfm

    assert (num_spatial(12), num_spatial(24), num_spatial(32), num_spatial(6)) == (5, 12, 28, 2)
    cfg = dict(embed_dim=64, quick_gelu=True,
               vision_cfg=dict(image_size=224, layers=24, width=64, head_width=32, patch_size=14),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
    clip = make_clip(cfg, seed=1)
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "dino_vitbase8_pretrain.pth"
    torch.save(src.state_dict(), path)
    vfm = load_vfm("dino", checkpoint=path)
    img, regions = image((112, 112)), blocks_map((112, 112), 28, zero_rows=10)
    text = vocabulary()
    seg = Segmenter(clip, method="corrclip", vfm=vfm, short_side=None, slide_crop=112, slide_stride=112, **FAST)
    (mask, probs), = seg.predict([img], text, regions=[regions])
    with torch.no_grad():
        want_probs, want_mask = ref.corrclip_predict(
            _double(clip.model.visual), _double(src), preprocess(img, None).double(),
            torch.from_numpy(regions).long(), text.features.double(), text.num_classes, crop=112, stride=112)
    diff = (probs.double() - want_probs).abs().max().item()
    print(f"\nViT-L/14 geometry + DINO B/8: max |p - p_official| = {diff:.2e}")
    assert diff < 1e-4
    assert torch.equal(mask, want_mask)


def _double(module):
    import copy

    return copy.deepcopy(module).double()


def test_map_correction_off_and_weights(models):
    size, crop, stride, make_map, _ = CASES["window224"]
    img, regions = image(size), make_map(size)
    text = vocabulary()
    (mask, probs), = seg_for(models, crop, stride, map_correction=False).predict([img], text, regions=[regions])
    assert torch.equal(mask, probs.argmax(0))
    (_, p2), = seg_for(models, crop, stride, semantic_weight=0.0, spatial_weight=0.0).predict(
        [img], text, regions=[regions])
    assert (p2 - probs).abs().max() > 1e-3


# ============================================================================================ batching
def test_batched_equals_one_crop_at_a_time(models):
    clip, vfm, _ = models
    text = vocabulary()
    images = [image((200, 260), 0), image((150, 170), 1, flat_left=False)]
    regions = [blocks_map((200, 260), 64, zero_rows=16), blocks_map((150, 170), 40, start=2)]
    seg = seg_for(models, 150, 100)
    x = [preprocess(im, None) for im in images]
    r = [torch.from_numpy(m).long() for m in regions]
    batched = dense_logits(seg.encoder, seg.method, x, text, 150, 100, batch_size=8, pad_to=56, regions=r)
    single = dense_logits(seg.encoder, seg.method, x, text, 150, 100, batch_size=1, pad_to=56, regions=r)
    for a, b in zip(batched, single):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    out = seg.segment_batch(images, "a;b;c", masks=regions)
    assert [o.mask.shape for o in out] == [(200, 260), (150, 170)]


# ============================================================================================ steps
def test_connected_components_is_dbscan_with_one_sample():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 25, (1,), generator=g))
        pts = torch.randn(n, 3, generator=g, dtype=torch.float64)
        feats = F.normalize(pts, dim=-1)
        sim = feats @ feats.T
        dist = sim.max() - sim
        eps = 0.2 + 0.3 * float(torch.rand(1, generator=g))
        got = connected_components(dist <= eps)
        want = ref.dbscan_min1(dist, eps)
        assert torch.equal(got, want), trial
        try:
            from sklearn.cluster import DBSCAN
        except ImportError:  # pragma: no cover
            continue
        sk = DBSCAN(metric="precomputed", eps=eps, min_samples=1).fit_predict(dist.numpy())
        assert torch.equal(got, torch.from_numpy(sk).long()), trial


def test_scope_attention_against_the_region_loop():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2, 30, 8, generator=g), dim=-1)
    maps = torch.randint(0, 4, (2, 30), generator=g) * 3 + torch.tensor([[0], [5]])  # the second has no 0
    got = scope_attention(feats, maps)[:, 0]
    for b in range(2):
        sim = feats[b] @ feats[b].T
        regions = [maps[b] == v for v in torch.unique(maps[b])]
        allowed = torch.zeros_like(sim, dtype=torch.bool)
        for r in regions[1:]:
            allowed |= torch.outer(r, r)
        allowed |= (regions[0][None] | regions[0][:, None]) & (sim > sim.mean())
        want = (sim.masked_fill(~allowed, float("-inf")) * 4).softmax(-1)
        torch.testing.assert_close(got[b], want)


def test_region_mode_against_torch_mode():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40, 50), generator=g)
    for start in (0, 4):
        regions = torch.randint(start, start + 6, (40, 50), generator=g)
        want = labels.clone()
        for v in torch.unique(regions)[1:]:
            want[regions == v] = torch.mode(labels[regions == v])[0]
        assert torch.equal(region_mode(labels, regions), want)
    corrected = region_mode(labels, regions, rule="zero")  # no 0: every region corrected
    assert all(torch.unique(corrected[regions == v]).numel() == 1 for v in torch.unique(regions))


def test_resize_nearest_is_interpolate_nearest():
    m = torch.randint(0, 50, (1, 37, 53))
    for size in ((10, 13), (74, 106), (37, 53), (50, 20)):
        want = F.interpolate(m[None].float(), size=size, mode="nearest")[0].long()
        assert torch.equal(resize_nearest(m, size), want)
    big = torch.full((4, 4), 2**30 + 1)  # ids a float round trip would change
    assert torch.equal(resize_nearest(big, (8, 8)), torch.full((8, 8), 2**30 + 1))


def test_needs_masks_one_line_error(models):
    seg = seg_for(models, 224, 112)
    with pytest.raises(RfclipError) as err:
        seg.segment(image((64, 64)), "a;b")
    assert "\n" not in str(err.value) and "--masks" in str(err.value) and "masks=" in str(err.value)
    with pytest.raises(RfclipError, match="image is 64x64"):
        seg.segment(image((64, 64)), "a;b", masks=np.zeros((32, 64), np.int32))
    with pytest.raises(RfclipError, match="dtype"):
        seg.segment(image((64, 64)), "a;b", masks=np.zeros((64, 64), np.float32))
    with pytest.raises(RfclipError, match="unsegmented"):
        build_method("corrclip", unsegmented="none")


# ============================================================================================ preset and command line
def test_preset_table():
    from rfclip.data import load_classnames
    from rfclip.data.settings import get_settings, preset_method, preset_model

    assert preset_method("corrclip") == "corrclip"
    assert preset_model("corrclip") == ("ViT-B-16-quickgelu", "metaclip_fullcc")
    want = {"voc21": (336, 336, 0.2), "context60": (336, 336, 0.15), "coco_object": (336, 336, 0.25),
            "voc20": (336, 336, 0.0), "context59": (336, 336, 0.0), "coco_stuff": (336, 336, 0.0),
            "ade20k": (448, 336, 0.0), "cityscapes": (448, 224, 0.0)}
    for name, (short, crop, thd) in want.items():
        s = get_settings(name, "corrclip")
        assert (s.short_side, s.slide_crop, s.slide_stride, s.logit_scale, s.prob_thd) == (short, crop, 112, 40.0, thd)
        assert s.pad_crops_to == 56 and s.classnames == "corrclip"
    voc21 = load_classnames("voc21", "corrclip")
    assert len(voc21) == 21 and len(voc21[0]) == 26 and voc21[15] == ["people"]
    assert all(len(c) == 1 for c in voc21[1:])  # synonyms on the background only (the code's merge assumes it)


def test_eval_all_table_has_the_corrclip_rows():
    from rfclip.constants import PAPER_COLUMNS, PAPER_CORRCLIP_MIOU
    from rfclip.evaluate import summary_markdown
    from test_evaluate import _fake_result

    results = {}
    for i, name in enumerate(PAPER_COLUMNS):
        r = _fake_result(name, 40.0 + i, "ViT-B-16-quickgelu", False)
        r.update(method="corrclip", preset="corrclip")
        results[name] = r
    rows = [line for line in summary_markdown(results).splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| ours (corrclip, corrclip preset) |")
    for line, masks in zip(rows[2:4], ("SAM2_32", "EntitySeg")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"paper (CorrCLIP, {masks} masks)"
        assert cells[1:9] == [f"{v:.1f}" for v in PAPER_CORRCLIP_MIOU[("ViT-B", masks)]]
    assert cells[9] == "52.4"  # the README's EntitySeg average
    assert "paper (RF-CLIP)" not in "\n".join(rows)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    import timm

    from test_evaluate import EVAL_CFG, make_voc2012, save_open_clip_folder

    base = tmp_path_factory.mktemp("corrclip_eval")
    root = base / "data" / "VOCdevkit" / "VOC2012"
    names = make_voc2012(root, num_images=2)
    masks = base / "masks"
    masks.mkdir()
    for i, name in enumerate(names):
        m = blocks_map((48, 64), 16, zero_rows=8 * i)
        np.savez_compressed(masks / f"{name}.npz", instance_mask=m)
    torch.manual_seed(0)
    dino = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    torch.save(dino.state_dict(), base / "dino_deitsmall8_pretrain.pth")  # DINO's release layout
    return {"root": root, "ckpt": save_open_clip_folder(base / "ckpt", EVAL_CFG), "masks": masks,
            "dino": base / "dino_deitsmall8_pretrain.pth", "cache": base / "cache", "names": names}


def test_cli_eval_preset_and_segment_with_saved_masks(voc, tmp_path, capsys, monkeypatch):
    import json

    from rfclip.cli import main

    monkeypatch.setenv("RFCLIP_CACHE", str(voc["cache"]))
    common = ["--checkpoint", str(voc["ckpt"]), "--device", "cpu", "--vfm", "vit_small_patch8_224.dino",
              "--vfm-checkpoint", str(voc["dino"])]
    out = tmp_path / "voc21.json"
    code = main(["eval", "--dataset", "voc21", "--root", str(voc["root"]), "--preset", "corrclip", "--masks",
                 f"npz:{voc['masks']}", "--out", str(out), "-q", "--num-workers", "0", "--short-side", "64", *common])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    doc = json.loads(out.read_text())
    assert doc["meta"]["method"] == "corrclip" and doc["meta"]["settings"]["prob_thd"] == 0.2
    # without masks: one line, exit status 2, nothing written
    code = main(["eval", "--dataset", "voc21", "--root", str(voc["root"]), "--preset", "corrclip", "--out",
                 str(tmp_path / "none.json"), "-q", "--num-workers", "0", *common])
    err = capsys.readouterr().err
    assert code == 2 and "--masks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.json").exists()
    image = voc["root"] / "JPEGImages" / f"{voc['names'][1]}.jpg"
    code = main(["segment", str(image), "--classes", "road;car;sky", "--method", "corrclip", "--masks",
                 f"npz:{voc['masks']}", "--out", str(tmp_path / "seg"), "--short-side", "64", "-q", *common])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    record = json.loads((tmp_path / "seg" / f"{image.stem}.json").read_text())
    assert record["method"] == "corrclip"


def test_bf16_autocast_agrees_with_fp32(models):
    size, crop, stride, make_map, _ = CASES["slide-padded"]
    img, regions = image(size), make_map(size)
    text = vocabulary()
    (m32, p32), = seg_for(models, crop, stride).predict([img], text, regions=[regions])
    (m16, p16), = seg_for(models, crop, stride, precision="bf16").predict([img], text, regions=[regions])
    assert torch.isfinite(p16).all() and (p16 - p32).abs().max() < 0.2
    assert (m16 == m32).float().mean() > 0.9


def test_merge_padding_option():
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    feats = F.normalize(base + 0.01 * torch.randn(40, 8, generator=g), dim=-1)  # everything similar: one cluster
    m = torch.tensor([0] * 10 + [3] * 10 + [5] * 10 + [10000] * 10)
    code = merge_regions(m, feats)
    assert torch.equal(torch.unique(code), torch.tensor([0, 10000]))  # padding merged with the regions
    kept = merge_regions(m, feats, merge_padding=False)
    assert torch.equal(kept[30:], torch.full((10,), 10000)) and torch.equal(torch.unique(kept[10:30]), torch.tensor([10001]))
    assert torch.equal(kept[:10], m[:10])
