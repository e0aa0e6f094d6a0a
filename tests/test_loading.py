"""load_clip / random_clip: every checkpoint format round-trips exactly, QuickGELU follows the origin,
bad inputs give one-line RfclipErrors, and missing pretrained weights fail fast offline."""

from __future__ import annotations

import copy
import json
import os
import time
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import save_file
from torch import nn

from rfclip.errors import RfclipError, WeightsNotFoundError
from rfclip.models import hf as hfmap
from rfclip.models import hub
from rfclip.models import loading
from rfclip.models.loading import ClipModel, load_clip, random_clip

# Tiny ViT CLIP: widths of 128 give two 64-wide heads, as OpenAI's width/64 rule infers; a
# 1000-token vocabulary keeps it small (the test texts are token ids, not tokenizer output).
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 128, "heads": 2, "layers": 2},
}
OPENAI_EXTRAS = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
                 "vocab_size": torch.tensor(1000)}


def _fp16_exact(model: nn.Module) -> nn.Module:
    """Round the weights to fp16-representable values so fp16 files round-trip bit-exactly."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def ref():
    """Reference models (QuickGELU and GELU, same weights) and their outputs on fixed inputs."""
    qg = random_clip(TINY, quick_gelu=True, seed=0)
    ge = random_clip(TINY, quick_gelu=False, seed=0)
    _fp16_exact(qg.model)
    _fp16_exact(ge.model)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    text = torch.zeros(2, 77, dtype=torch.long)  # "sot ... eot" with eot = the largest id (argmax pooling)
    text[0, :6] = torch.tensor([998, 5, 17, 300, 42, 999])
    text[1, :9] = torch.tensor([998, 7, 8, 9, 10, 11, 12, 13, 999])
    with torch.no_grad():
        out = {True: (qg.model.encode_image(images), qg.model.encode_text(text)),
               False: (ge.model.encode_image(images), ge.model.encode_text(text))}
    sd = {k: v.clone() for k, v in qg.model.state_dict().items()}
    return {"sd": sd, "images": images, "text": text, "out": out}


@pytest.fixture
def tiny_names(monkeypatch):
    """Register the tiny config as open_clip built-ins 'rfclip-tiny' and 'rfclip-tiny-quickgelu'."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "rfclip-tiny", copy.deepcopy(TINY))
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "rfclip-tiny-quickgelu", dict(copy.deepcopy(TINY), quick_gelu=True))
    loading._builtin_shapes.cache_clear()
    yield
    loading._builtin_shapes.cache_clear()


def _assert_same_outputs(clip: ClipModel, ref, quick_gelu: bool):
    assert clip.quick_gelu is quick_gelu
    acts = {type(m) for m in clip.model.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    assert acts == {QuickGELU if quick_gelu else nn.GELU}
    with torch.no_grad():
        img = clip.model.encode_image(ref["images"])
        txt = clip.model.encode_text(ref["text"])
    want_img, want_txt = ref["out"][quick_gelu]
    assert torch.equal(img, want_img)
    assert torch.equal(txt, want_txt)


def _assert_usable(clip: ClipModel):
    m = clip.model
    assert isinstance(m, open_clip.CLIP) and not m.training
    assert isinstance(m.visual, VisionTransformer)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in m.parameters())
    v = m.visual
    for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj", "patch_size"):
        assert hasattr(v, attr)
    blk = v.transformer.resblocks[0]
    assert isinstance(blk.attn, nn.MultiheadAttention)
    for attr in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"):
        assert hasattr(blk, attr)
    assert clip.tokenizer(["x"]).shape == (1, 77)


# ---------------------------------------------------------------------------------------------
# writers for every supported format


class _Node(nn.Module):
    pass


class _Root(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1


def _save_torchscript(sd: dict, path):
    """A TorchScript archive whose state_dict() is ``sd`` (as in OpenAI's ~/.cache/clip/*.pt)."""
    root = _Root()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, _Node())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(root, torch.ones(1)).save(str(path))


def _openai_sd(ref) -> dict:
    """OpenAI's release layout: same key names, fp16, plus the TorchScript extras."""
    return {**{k: v.half() for k, v in ref["sd"].items()}, **OPENAI_EXTRAS}


def _write_hf(ref, folder, quick_gelu: bool, weights: str = "model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hfmap.hf_config_from_open_clip(TINY, quick_gelu)))
    sd = hfmap.open_clip_to_hf(ref["sd"])
    if weights.endswith(".safetensors"):
        save_file(sd, str(folder / weights))
    else:
        torch.save(sd, folder / weights)
    return folder


# ---------------------------------------------------------------------------------------------
# round trips


def test_torchscript_openai_archive(ref, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    _save_torchscript(_openai_sd(ref), path)
    clip = load_clip(checkpoint=path)  # default model name ViT-B-16: geometry comes from the file
    _assert_usable(clip)
    _assert_same_outputs(clip, ref, quick_gelu=True)
    assert clip.source == f"openai-torchscript:{path}"
    assert clip.pretrained is None and clip.name == "custom"
    assert clip.model.visual.transformer.resblocks[0].attn.num_heads == 2


def test_plain_openai_state_dict_fp16(ref, tmp_path):
    path = tmp_path / "openai.pth"
    torch.save({k: v.half() for k, v in ref["sd"].items()}, path)
    clip = load_clip(checkpoint=path)
    _assert_same_outputs(clip, ref, quick_gelu=True)
    assert clip.source.startswith("openai-state-dict:")


def test_plain_openai_state_dict_with_jit_extras_fp32(ref, tmp_path):
    path = tmp_path / "openai_fp32.bin"  # extension says nothing; content decides
    torch.save({**ref["sd"], **OPENAI_EXTRAS}, path)
    clip = load_clip(checkpoint=path)
    _assert_same_outputs(clip, ref, quick_gelu=True)
    assert clip.source.startswith("openai-state-dict:")


def test_inferred_geometry_takes_the_builtin_name(ref, tmp_path, tiny_names):
    path = tmp_path / "openai.pt"
    _save_torchscript(_openai_sd(ref), path)
    assert load_clip(checkpoint=path).name == "rfclip-tiny"
    assert load_clip("rfclip-tiny-quickgelu", checkpoint=path).name == "rfclip-tiny-quickgelu"


def test_open_clip_training_checkpoint_module_prefix(ref, tmp_path, tiny_names):
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in ref["sd"].items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
    clip = load_clip("rfclip-tiny-quickgelu", checkpoint=path)
    _assert_same_outputs(clip, ref, quick_gelu=True)
    assert clip.source == f"open_clip-checkpoint:{path}" and clip.name == "rfclip-tiny-quickgelu"
    clip = load_clip("rfclip-tiny", checkpoint=path)  # QuickGELU follows the name
    _assert_same_outputs(clip, ref, quick_gelu=False)


def test_bare_fp32_state_dict_follows_the_name_and_override(ref, tmp_path, tiny_names):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref["sd"], path)
    _assert_same_outputs(load_clip("rfclip-tiny", checkpoint=path), ref, quick_gelu=False)
    _assert_same_outputs(load_clip("rfclip-tiny-quickgelu", checkpoint=path), ref, quick_gelu=True)
    _assert_same_outputs(load_clip("rfclip-tiny", checkpoint=path, quick_gelu=True), ref, quick_gelu=True)


def test_safetensors_both_layouts(ref, tmp_path, tiny_names):
    oa = tmp_path / "openai.safetensors"
    save_file({k: v.half().contiguous() for k, v in ref["sd"].items()}, str(oa))
    clip = load_clip(checkpoint=oa)
    _assert_same_outputs(clip, ref, quick_gelu=True)
    assert clip.source.startswith("openai-state-dict:")
    oc = tmp_path / "weights.ckpt"  # open_clip layout, fp32, odd extension
    save_file({k: v.contiguous() for k, v in ref["sd"].items()}, str(oc))
    clip = load_clip("rfclip-tiny", checkpoint=oc)
    _assert_same_outputs(clip, ref, quick_gelu=False)
    assert clip.source.startswith("open_clip-checkpoint:")


def test_custom_text_layout_is_accepted(ref, tmp_path, tiny_names):
    text_keys = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    sd = {("text." + k if k.startswith(text_keys) else k): v for k, v in ref["sd"].items()}
    path = tmp_path / "custom_text.pt"
    torch.save({"state_dict": sd}, path)
    _assert_same_outputs(load_clip("rfclip-tiny-quickgelu", checkpoint=path), ref, quick_gelu=True)


@pytest.mark.parametrize("quick_gelu, weights", [(True, "model.safetensors"), (False, "pytorch_model.bin")])
def test_hf_folder(ref, tmp_path, quick_gelu, weights):
    folder = _write_hf(ref, tmp_path / "clip-tiny", quick_gelu, weights)
    clip = load_clip(checkpoint=folder)
    _assert_usable(clip)
    _assert_same_outputs(clip, ref, quick_gelu=quick_gelu)
    assert clip.source == f"hf:{folder}"


def test_hf_hub_cache_folder_and_weights_file(ref, tmp_path):
    repo = tmp_path / "models--openai--clip-tiny"
    snap = _write_hf(ref, repo / "snapshots" / "abc123", quick_gelu=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    _assert_same_outputs(load_clip(checkpoint=repo), ref, quick_gelu=True)
    # the weights file itself works too: config.json is found next to it
    _assert_same_outputs(load_clip(checkpoint=snap / "model.safetensors"), ref, quick_gelu=True)


def test_hf_sharded_folder(ref, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hfmap.hf_config_from_open_clip(TINY, False)))
    sd = hfmap.open_clip_to_hf(ref["sd"])
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / fname))
        weight_map.update({k: fname for k in ks})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_outputs(load_clip(checkpoint=folder), ref, quick_gelu=False)


def test_open_clip_folder(ref, tmp_path):
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(TINY, quick_gelu=True),
                                                              "preprocess_cfg": {"interpolation": "bilinear"}}))
    save_file(ref["sd"], str(folder / "open_clip_model.safetensors"))
    clip = load_clip(checkpoint=folder)
    _assert_same_outputs(clip, ref, quick_gelu=True)
    assert clip.model.visual.preprocess_cfg["interpolation"] == "bilinear"


def test_hf_key_mapping_is_a_bijection(ref):
    hf_sd = hfmap.open_clip_to_hf(ref["sd"])
    assert "vision_model.pre_layrnorm.weight" in hf_sd and "text_model.encoder.layers.1.self_attn.v_proj.bias" in hf_sd
    assert hf_sd["visual_projection.weight"].shape == (32, 128)
    back = hfmap.hf_to_open_clip(hf_sd)
    assert back.keys() == ref["sd"].keys()
    assert all(torch.equal(back[k], ref["sd"][k]) for k in back)


# ---------------------------------------------------------------------------------------------
# pretrained tags: cache hits and offline failure


@pytest.fixture
def tiny_tags(monkeypatch, tiny_names):
    import open_clip.pretrained as ocp

    monkeypatch.setitem(ocp._PRETRAINED, "rfclip-tiny", {
        "hubtag": {"hf_hub": "rfclip-test/tiny/", "quick_gelu": True},
        "urltag": {"url": "https://rfclip.invalid/weights/tiny-openai.pt"},
    })


def test_pretrained_tag_from_hub_cache(ref, tmp_path, tiny_tags, monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("cache hit must not touch the network"))
    repo = tmp_path / "models--rfclip-test--tiny"
    (repo / "snapshots" / "r1").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("r1")
    save_file(ref["sd"], str(repo / "snapshots" / "r1" / "open_clip_model.safetensors"))
    clip = load_clip("rfclip-tiny", "hubtag", cache_dir=str(tmp_path))
    _assert_same_outputs(clip, ref, quick_gelu=True)  # the tag's quick_gelu wins over the plain name
    assert (clip.source, clip.pretrained, clip.identity) == ("open_clip:hubtag", "hubtag", "rfclip-tiny|hubtag|quickgelu")


def test_pretrained_tag_from_url_cache_torchscript(ref, tmp_path, tiny_tags, monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("cache hit must not touch the network"))
    _save_torchscript(_openai_sd(ref), tmp_path / "tiny-openai.pt")
    clip = load_clip("rfclip-tiny", "urltag", cache_dir=str(tmp_path), quick_gelu=True)
    _assert_same_outputs(clip, ref, quick_gelu=True)


def _check_not_found(err: WeightsNotFoundError, cache_dir):
    msg = str(err)
    assert "\n" not in msg
    for part in ("ViT-B-16", "'openai'", str(cache_dir), "--checkpoint FILE"):
        assert part in msg, (part, msg)


def _forbid_downloads(monkeypatch):
    import huggingface_hub
    import open_clip.pretrained as ocp

    def refuse(*a, **k):
        raise OSError("download disabled in tests")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)
    monkeypatch.setattr(ocp, "download_pretrained_from_url", refuse)


def test_offline_unreachable_host_fails_at_once(tmp_path, monkeypatch):
    _forbid_downloads(monkeypatch)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    _check_not_found(info.value, tmp_path)
    assert "unreachable" in str(info.value)


def test_offline_env_var(tmp_path, monkeypatch):
    _forbid_downloads(monkeypatch)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("HF_HUB_OFFLINE must skip the probe"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    _check_not_found(info.value, tmp_path)
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_offline_real_probe(tmp_path, monkeypatch):
    """The real reachability probe (bounded to a few seconds); downloads are disabled either way."""
    _forbid_downloads(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "offline_requested", lambda: False)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 2.0)
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B-16", "laion2b_s34b_b88k", cache_dir=str(tmp_path))
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert "\n" not in msg and "laion2b_s34b_b88k" in msg and str(tmp_path) in msg and "--checkpoint" in msg
    print(f"offline failure after {elapsed:.2f} s: {msg}")


# ---------------------------------------------------------------------------------------------
# bad inputs: one-line RfclipError naming the file


def _bad(tmp_path, ref):
    files = {}
    files["missing"] = tmp_path / "nope.pt"
    (p := tmp_path / "notes.pt").write_text("these are not weights\n" * 10)
    files["text file"] = p
    (p := tmp_path / "empty.pt").write_bytes(b"")
    files["empty"] = p
    good = tmp_path / "good.pt"
    torch.save(ref["sd"], good)
    data = good.read_bytes()
    (p := tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    files["truncated zip"] = p
    st = tmp_path / "good.safetensors"
    save_file(ref["sd"], str(st))
    data = st.read_bytes()
    (p := tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    files["truncated safetensors"] = p
    ts = tmp_path / "ts.pt"
    _save_torchscript(_openai_sd(ref), ts)
    data = bytearray(ts.read_bytes())
    (p := tmp_path / "ts_truncated.pt").write_bytes(bytes(data[: len(data) - 200]))
    files["truncated torchscript"] = p
    (p := tmp_path / "random.bin").write_bytes(os.urandom(4096))
    files["random bytes"] = p
    torch.save({"state_dict": ref["sd"], "args": _Node()}, p := tmp_path / "pickled_object.pt")
    files["arbitrary object"] = p
    torch.save([1, 2, 3], p := tmp_path / "list.pt")
    files["list"] = p
    torch.save({"a.weight": torch.ones(3)}, p := tmp_path / "other_model.pt")
    files["not clip"] = p
    torch.save({"state_dict": {"module." + k: v for k, v in ref["sd"].items()}}, p := tmp_path / "tiny_as_b16.pt")
    files["shape mismatch"] = p
    resnet = {"visual.layer1.0.conv1.weight": torch.ones(1), "token_embedding.weight": torch.ones(1)}
    torch.save(resnet, p := tmp_path / "rn50.pt")
    files["resnet"] = p
    (p := tmp_path / "empty_dir").mkdir()
    files["folder without config"] = p
    (p := tmp_path / "hf_no_weights").mkdir()
    (p / "config.json").write_text(json.dumps(hfmap.hf_config_from_open_clip(TINY, True)))
    files["hf without weights"] = p
    (p := tmp_path / "hf_bad_json").mkdir()
    (p / "config.json").write_text("{not json")
    files["hf bad json"] = p
    return files


def test_bad_files_raise_one_line_errors(ref, tmp_path):
    for what, path in _bad(tmp_path, ref).items():
        with pytest.raises(RfclipError) as info:
            load_clip("ViT-B-16", checkpoint=path)
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 400, (what, msg)
        assert str(path) in msg, (what, msg)
        assert ";" in msg, (what, msg)  # "<what is wrong>; <the fix>"
        if what == "shape mismatch":
            assert "--model" in msg and "ViT-B-16" in msg
        if what == "resnet":
            assert "rfclip needs a ViT image encoder" in msg
        if what == "arbitrary object":
            assert "pickled Python objects" in msg


def test_non_vit_models_are_rejected():
    for call in (lambda: load_clip("RN50", "openai"), lambda: random_clip("RN50"),
                 lambda: random_clip("convnext_base"), lambda: load_clip("ViT-B-16-SigLIP", "webli")):
        with pytest.raises(RfclipError) as info:
            call()
        assert "\n" not in str(info.value)
        assert "rfclip needs a ViT image encoder" in str(info.value)


def test_argument_errors():
    for call in (lambda: load_clip("ViT-Q-99", "openai"), lambda: load_clip("ViT-B-16", "no_such_tag"),
                 lambda: load_clip("ViT-B-16", None), lambda: load_clip(device="tpu:7"),
                 lambda: random_clip({"embed_dim": 8})):
        with pytest.raises(RfclipError) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(RfclipError, match="laion2b_s34b_b88k"):
        load_clip("ViT-B-16", "no_such_tag")


# ---------------------------------------------------------------------------------------------
# identity, random models, real ViT-B/16 geometry


def test_identity(ref, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({k: v.half() for k, v in ref["sd"].items()}, path)
    a = load_clip(checkpoint=path).identity
    assert a == load_clip(checkpoint=path).identity and str(path) in a and "quickgelu" in a
    torch.save({k: v.half() for k, v in ref["sd"].items()}, path)
    os.utime(path, ns=(1, 1))
    assert load_clip(checkpoint=path).identity != a
    r0 = random_clip(TINY, seed=0)
    assert r0.identity == random_clip(TINY, seed=0).identity != random_clip(TINY, seed=1).identity
    assert r0.identity != random_clip(TINY, seed=0, quick_gelu=False).identity


def test_random_clip_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = random_clip(TINY, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = random_clip(TINY, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.source == "random" and a.pretrained is None and a.quick_gelu
    _assert_usable(a)


def _meta_state_dict(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        model = open_clip.CLIP(**cfg)
    return model.state_dict()


def test_real_vit_b16_geometry_from_openai_keys_and_hf_config():
    loading._builtin_shapes.cache_clear()
    sd = _meta_state_dict("ViT-B-16")
    name, cfg = loading._pick_name(loading._infer_cfg(sd, "meta"), "ViT-L-14")
    assert name == "ViT-B-16"
    assert cfg["vision_cfg"]["width"] // cfg["vision_cfg"].get("head_width", 64) == 12 and cfg["text_cfg"]["heads"] == 8
    # the config.json of openai/clip-vit-base-patch16 (the fields that matter)
    hf_config = {
        "model_type": "clip", "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                        "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                        "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                          "num_hidden_layers": 12, "image_size": 224, "patch_size": 16, "hidden_act": "quick_gelu"},
    }
    cfg, quick_gelu = hfmap.open_clip_cfg_from_hf_config(hf_config, "meta")
    assert quick_gelu and "ViT-B-16" in loading._matching_builtins(cfg)
    built = loading._build(cfg, quick_gelu, "meta", empty=True).state_dict()
    back = hfmap.hf_to_open_clip(hfmap.open_clip_to_hf(sd))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in built.items()}
