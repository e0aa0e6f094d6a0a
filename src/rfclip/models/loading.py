"""The one way rfclip gets a CLIP model: :func:`load_clip` (and :func:`random_clip` for tests).

Weights come either from open_clip's pretrained registry (``model`` name + ``pretrained`` tag, looked
up in the download caches first, see :mod:`rfclip.models.hub`) or from a local ``checkpoint``. The
format of a local checkpoint is recognised from its content, not its extension:

==============================  =============================================  =====================
content                         how it is read                                 QuickGELU
==============================  =============================================  =====================
TorchScript archive (OpenAI     read as data (models/torchscript.py)           yes (OpenAI origin);
``~/.cache/clip/*.pt``)         (its ``state_dict()``; nothing is executed)    geometry inferred
torch pickle (``.pt/.pth/.bin``) ``torch.load(weights_only=True)``              see "origin" below
safetensors                     ``safetensors.torch.load_file``                see "origin" below
Hugging Face CLIP folder        ``config.json`` + ``model.safetensors`` or     ``hidden_act ==
                                ``pytorch_model.bin`` (sharded too); keys      "quick_gelu"``
                                renamed by :mod:`rfclip.models.hf`
open_clip folder                ``open_clip_config.json`` + open_clip weights  config's quick_gelu
==============================  =============================================  =====================

OpenAI's and open_clip's ``CLIP`` use the *same* key names for ViT models, so the origin of a plain
state dict (pickle or safetensors) is decided from fingerprints of OpenAI's released files: the
``input_resolution``/``context_length``/``vocab_size`` entries of their TorchScript state dicts, or
float16 weights (OpenAI released fp16 weights only; open_clip checkpoints are fp32). Such a state
dict is OpenAI-origin: QuickGELU, geometry inferred from the tensor shapes. Anything else
(``{"state_dict": ...}`` training checkpoints, ``module.`` prefixes, bare fp32 state dicts) is an
open_clip checkpoint: the ``model`` name gives the config and QuickGELU follows the name
(``-quickgelu`` suffix). ``quick_gelu=`` overrides the decision in every case.

Nothing is ever unpickled beyond tensors and plain containers (``weights_only=True``), and nothing in a
checkpoint is ever run: TorchScript archives are not loaded by TorchScript (which would run a scripted
``__setstate__``) but read as data, parameters and buffers only.

Every problem a user can cause raises :class:`~rfclip.errors.RfclipError` with a one-line message.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import rfclip.models.hf as _hf
import rfclip.models.hub as _hub
from rfclip.devices import parse_device
from rfclip.errors import RfclipError
from rfclip.models.hub import _one_line
from rfclip.models.torchscript import TorchScriptFormatError, read_torchscript_state_dict

log = logging.getLogger(__name__)

__all__ = ["ClipModel", "load_clip", "random_clip"]

_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_FIX_REDOWNLOAD = "download or copy the file again"
_FIX_FORMAT = ("pass an OpenAI CLIP .pt, an open_clip checkpoint, a .safetensors file "
               "or a Hugging Face CLIP folder (config.json + weights)")
_SUGGEST = "use a ViT CLIP model such as ViT-B-16 or ViT-L-14"


@dataclass
class ClipModel:
    """A loaded CLIP model and what is needed to use and identify it."""

    model: Any  # open_clip.CLIP: eval(), fp32, requires_grad False, on the requested device
    tokenizer: Callable  # open_clip SimpleTokenizer for this model (context length 77 for CLIP)
    name: str  # open_clip model name ("ViT-B-16"); "custom" when no built-in config matches
    pretrained: str | None  # open_clip pretrained tag, or None when the weights came from a file
    source: str  # "open_clip:<tag>", "openai-torchscript:<path>", "openai-state-dict:<path>",
    #              "open_clip-checkpoint:<path>", "hf:<dir>" or "random"
    quick_gelu: bool
    weights_id: str = field(default="", repr=False, compare=False)

    @property
    def identity(self) -> str:
        """Stable string naming these exact weights (and activation), e.g. for text-embedding caches.

        ``name|tag|act`` for open_clip tags; ``name|act|kind|path:size:mtime_ns...`` for files;
        ``random|...|seed=N`` for random models.
        """
        return self.weights_id or f"{self.name}|{self.source}|{'quickgelu' if self.quick_gelu else 'gelu'}"

    def describe(self) -> dict[str, Any]:
        """Name, tag, source and activation, for result files."""
        return {"name": self.name, "pretrained": self.pretrained, "source": self.source, "quick_gelu": self.quick_gelu}


# --------------------------------------------------------------------------------------------
# small helpers


def _act(quick_gelu: bool) -> str:
    return "quickgelu" if quick_gelu else "gelu"


def _stamp(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


# --------------------------------------------------------------------------------------------
# configs: validation, inference from shapes, matching against open_clip's built-ins


def _vit_problem(cfg: dict) -> tuple[str, str] | None:
    """(kind, reason) when this open_clip config is not a plain ViT CLIP rfclip can use."""
    v = cfg.get("vision_cfg") or {}
    t = cfg.get("text_cfg") or {}
    if v.get("timm_model_name"):
        return "image", f"a timm image encoder ({v['timm_model_name']})"
    if isinstance(v.get("layers"), (list, tuple)):
        return "image", "a ResNet image encoder"
    if "multimodal_cfg" in cfg:
        return "image", "a CoCa captioning head"
    custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
              if v.get(k)]
    if custom or v.get("block_type") not in (None, "default"):
        return "image", "a ViT with custom attention blocks (" + ", ".join(custom or [str(v.get("block_type"))]) + ")"
    if v.get("attentional_pool"):
        return "image", "a ViT with attentional pooling"
    if t.get("hf_model_name") or cfg.get("custom_text"):
        return "text", "a text encoder other than CLIP's text transformer"
    if t.get("hf_tokenizer_name") or t.get("tokenizer_mode"):
        return "text", f"a tokenizer other than CLIP's ({t.get('hf_tokenizer_name') or t.get('tokenizer_mode')})"
    return None


def _require_vit(cfg: dict, what: str) -> None:
    problem = _vit_problem(cfg)
    if problem is None:
        return
    kind, reason = problem
    if kind == "image":
        raise RfclipError(f"rfclip needs a ViT image encoder, but {what} has {reason}; {_SUGGEST}")
    raise RfclipError(f"rfclip needs CLIP's standard text encoder and tokenizer, but {what} has {reason}; {_SUGGEST}")


def _shape_key(cfg: dict) -> tuple:
    """Everything about a config that the weights' shapes determine (heads are not among them)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.utils import to_2tuple

    v = CLIPVisionCfg(**cfg["vision_cfg"])
    t = CLIPTextCfg(**cfg["text_cfg"])
    return (
        int(cfg["embed_dim"]),
        v.layers, v.width, round(v.width * v.mlp_ratio), tuple(to_2tuple(v.patch_size)),
        tuple(to_2tuple(v.image_size)), v.ls_init_value is not None,
        t.context_length, t.vocab_size, t.width, t.layers, round(t.width * t.mlp_ratio), t.ls_init_value is not None,
    )


@functools.lru_cache(maxsize=1)
def _builtin_shapes() -> tuple[tuple[str, tuple], ...]:
    import open_clip

    out = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if not cfg or _vit_problem(cfg) is not None:
            continue
        try:
            out.append((name, _shape_key(cfg)))
        except Exception:  # configs with fields this open_clip version does not know
            continue
    return tuple(out)


def _matching_builtins(cfg: dict) -> list[str]:
    try:
        key = _shape_key(cfg)
    except Exception:
        return []
    return [n for n, k in _builtin_shapes() if k == key]


def _pick_name(cfg: dict, requested: str) -> tuple[str, dict]:
    """Name (and built-in config, which knows the head count) for a config inferred from weights."""
    import open_clip

    matches = _matching_builtins(cfg)
    if not matches:
        return "custom", cfg
    if requested in matches:
        name = requested
    else:
        plain = [m for m in matches if not m.endswith("-quickgelu")] or matches
        name = min(plain, key=len)
        if requested:
            log.info("checkpoint geometry matches %s, not the requested model %s; using %s", name, requested, name)
    return name, open_clip.get_model_config(name)


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _looks_like_weights_file(text: str) -> bool:
    return text.lower().endswith(_WEIGHT_SUFFIXES) or os.path.exists(os.path.expanduser(text))


def _builtin_cfg(name: str) -> dict | None:
    import open_clip

    return open_clip.get_model_config(name)


def _named_cfg(name: str) -> dict:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        raise RfclipError(f"model name {name!r} uses an open_clip schema rfclip does not load; download the model "
                          f"folder and pass it with --checkpoint DIR")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise RfclipError(f"unknown open_clip model {name!r}; use a name from open_clip.list_models(), "
                          f"e.g. ViT-B-16 or ViT-L-14")
    _require_vit(cfg, f"model {name}")
    return cfg


def _count_blocks(sd: dict, prefix: str) -> int:
    idx = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len([i for i in idx if i.isdigit()])


def _infer_cfg(sd: dict, where: str) -> dict:
    """open_clip config of an OpenAI-layout ViT state dict, from tensor shapes (heads: width / 64)."""
    try:
        conv = sd["visual.conv1.weight"]
        vw, patch = conv.shape[0], conv.shape[-1]
        n_pos = sd["visual.positional_embedding"].shape[0]
        grid = round((n_pos - 1) ** 0.5)
        if grid * grid + 1 != n_pos:
            raise RfclipError(f"{where}: the image position embedding has {n_pos} rows, not a square grid + 1; "
                              f"rfclip cannot infer the image size, {_FIX_FORMAT}")
        vlayers = _count_blocks(sd, "visual.transformer.resblocks.")
        vmlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        tw = sd["ln_final.weight"].shape[0]
        tlayers = _count_blocks(sd, "transformer.resblocks.")
        tmlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = sd["text_projection"].shape[-1]
        vheads, theads = max(1, vw // 64), max(1, tw // 64)
        vision_cfg = dict(layers=vlayers, width=vw, head_width=vw // vheads, mlp_ratio=vmlp / vw,
                          patch_size=patch, image_size=patch * grid)
        text_cfg = dict(context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                        width=tw, heads=theads, layers=tlayers, mlp_ratio=tmlp / tw)
    except KeyError as e:
        raise RfclipError(f"{where}: the CLIP checkpoint lacks {e.args[0]}; the file is incomplete, "
                          f"{_FIX_REDOWNLOAD}") from None
    if "visual.transformer.resblocks.0.ls_1.gamma" in sd:
        vision_cfg["ls_init_value"] = 1e-5
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        text_cfg["ls_init_value"] = 1e-5
    return dict(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


def _build(cfg: dict, quick_gelu: bool, what: str, empty: bool = False):
    """An open_clip CLIP for ``cfg``, checked to be a plain ViT CLIP.

    Randomly initialised on the current default device, or with ``empty=True`` on the meta device
    (no memory, no init cost: random init of ViT-B/16 takes seconds on a CPU), to be filled by
    :func:`_load_into`.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    from rfclip.dense import attention_problem

    cfg = copy.deepcopy(cfg)
    _require_vit(cfg, what)
    cfg.pop("quick_gelu", None)
    cfg.pop("custom_text", None)
    try:
        if empty:
            with torch.device("meta"):
                model = CLIP(**cfg, quick_gelu=quick_gelu)
        else:
            model = CLIP(**cfg, quick_gelu=quick_gelu)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise RfclipError(f"cannot build {what} from its config ({_one_line(e)}); {_SUGGEST}") from None
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise RfclipError(f"rfclip needs a ViT image encoder, but {what} built a {type(visual).__name__}; {_SUGGEST}")
    problem = attention_problem(visual)  # by the attributes the dense forward uses, not by class
    if problem:
        raise RfclipError(f"rfclip cannot run the image encoder of {what} ({problem}); {_SUGGEST}")
    return model


def _set_preprocess(model, overlay: dict | None = None) -> None:
    from dataclasses import asdict

    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), overlay or {})
    cfg["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, cfg)


def _finish(model, device: torch.device):
    model = model.float().to(device).eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# reading files


def _sniff(path: Path) -> str:
    """'torchscript', 'torch' (zip torch.save), 'torch-legacy' or 'safetensors', from the bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise RfclipError(f"cannot read checkpoint {path} ({e.strerror or _one_line(e)}); "
                          f"check the path and its permissions") from None
    if size == 0:
        raise RfclipError(f"checkpoint {path} is empty; {_FIX_REDOWNLOAD}")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise RfclipError(f"checkpoint {path} is truncated or corrupt (broken zip archive: {_one_line(e)}); "
                              f"{_FIX_REDOWNLOAD}") from None
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        raise RfclipError(f"{path} is a zip archive but not a PyTorch checkpoint; {_FIX_FORMAT}")
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            if 8 + n > size:
                raise RfclipError(f"checkpoint {path} is truncated (safetensors header says {n} bytes, "
                                  f"file has {size}); {_FIX_REDOWNLOAD}")
            return "safetensors"
    raise RfclipError(f"{path} is not a model checkpoint (unrecognised content); {_FIX_FORMAT}")


def _read(path: Path, kind: str) -> Any:
    if kind == "torchscript":
        try:
            return read_torchscript_state_dict(path)
        except TorchScriptFormatError as e:
            raise RfclipError(f"checkpoint {path} is a TorchScript archive rfclip cannot read as plain weights "
                              f"({_one_line(e)}); {_FIX_FORMAT}") from None
        except Exception as e:
            raise RfclipError(f"checkpoint {path} is a TorchScript archive that cannot be read "
                              f"({_one_line(e)}); {_FIX_REDOWNLOAD}") from None
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise RfclipError(f"checkpoint {path} is a safetensors file that cannot be read "
                              f"({_one_line(e)}); {_FIX_REDOWNLOAD}") from None
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles would come before rfclip's one-line verdict
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise RfclipError(f"checkpoint {path} contains pickled Python objects besides tensors, which rfclip "
                              f"does not unpickle; re-save it as a plain state dict "
                              f"(torch.save(model.state_dict(), ...)) or as .safetensors") from None
        raise RfclipError(f"checkpoint {path} is truncated or corrupt ({_one_line(e)}); {_FIX_REDOWNLOAD}") from None
    except Exception as e:
        raise RfclipError(f"checkpoint {path} is truncated or corrupt ({_one_line(e)}); {_FIX_REDOWNLOAD}") from None


def _unwrap(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensor state dict, came wrapped as a training checkpoint or with a ``module.`` prefix)."""
    wrapped = False
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj, wrapped = inner, True
                break
    if not isinstance(obj, dict):
        raise RfclipError(f"{where} holds a {type(obj).__name__}, not a state dict; {_FIX_FORMAT}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise RfclipError(f"{where} holds no weight tensors; {_FIX_FORMAT}")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            wrapped = True
    return sd, wrapped


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool, str]:
    """(tensor state dict, came wrapped (see :func:`_unwrap`), format from :func:`_sniff`) of a checkpoint file.

    A TorchScript archive's ``state_dict()`` is taken as it is (never wrapped).
    """
    kind = _sniff(path)
    obj = _read(path, kind)
    if kind == "torchscript":
        return obj, False, kind
    sd, wrapped = _unwrap(obj, str(path))
    return sd, wrapped, kind


def _clip_layout(sd: dict, where: str) -> dict:
    """Check for a ViT CLIP state dict in OpenAI/open_clip naming; undo CustomTextCLIP's ``text.``."""
    if any(k.startswith("visual.trunk.") for k in sd):
        raise RfclipError(f"rfclip needs a ViT image encoder, but {where} has a timm image encoder; {_SUGGEST}")
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise RfclipError(f"rfclip needs a ViT image encoder, but {where} has a ResNet image encoder; {_SUGGEST}")
    if "token_embedding.weight" not in sd and "text.token_embedding.weight" in sd:
        sd = {(k[5:] if k.startswith("text.") and k[5:].startswith(_CLIP_TEXT_PREFIXES) else k): v
              for k, v in sd.items()}
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        example = ", ".join(sorted(sd)[:3])
        raise RfclipError(f"{where} is not a CLIP checkpoint (no visual.conv1.weight / token_embedding.weight; "
                          f"keys start {example}); {_FIX_FORMAT}")
    return sd


def _load_into(model, sd: dict, where: str, what: str, fix: str) -> None:
    """Strictly load ``sd`` into ``model``; one-line RfclipError naming the first problems otherwise."""
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS and k != "attn_mask"}
    expected = model.state_dict()
    ls = sd.get("logit_scale")
    if ls is not None and ls.shape != expected["logit_scale"].shape and ls.numel() == 1:
        sd["logit_scale"] = ls.reshape(expected["logit_scale"].shape)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(f"{k} has shape {tuple(sd[k].shape)} in the file but {tuple(expected[k].shape)} in the model"
                        + (f" ({len(wrong)} shape mismatches)" if len(wrong) > 1 else ""))
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    if problems:
        raise RfclipError(f"{where} does not fit {what}: {'; '.join(problems)}; {fix}")
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise RfclipError(f"{where} stores {bad[0]} as {sd[bad[0]].dtype}, not floating point; {_FIX_FORMAT}")
    nonfinite = next((k for k, v in sd.items() if not bool(torch.isfinite(v).all())), None)
    if nonfinite is not None:  # every pixel would silently become class 0
        raise RfclipError(f"{where} holds NaN or infinite weights (first in {nonfinite}); these weights cannot be "
                          f"used (a diverged training run or a damaged file), {_FIX_REDOWNLOAD} or use another one")
    # The model is built on the meta device (_build(empty=True)): take the file's tensors as they are,
    # cast to fp32, then rebuild the non-persistent buffers (open_clip's CLIP has one: the text
    # tower's causal attention mask).
    model.load_state_dict(sd, strict=True, assign=True)
    model.float()
    for module in model.modules():
        for bname, buf in module._buffers.items():
            if buf is None or not buf.is_meta:
                continue
            if bname == "attn_mask" and buf.dim() == 2 and buf.shape[0] == buf.shape[1]:
                module._buffers[bname] = torch.full(tuple(buf.shape), float("-inf")).triu_(1)
            else:  # pragma: no cover - a future open_clip buffer we do not know how to rebuild
                raise RuntimeError(f"internal error: cannot materialise buffer {bname} of {type(module).__name__}")
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover
        raise RuntimeError(f"internal error: {leftover[0]} was not loaded")


# --------------------------------------------------------------------------------------------
# the loaders


@dataclass
class _Loaded:
    model: Any
    name: str
    source: str
    quick_gelu: bool
    weights_id: str
    why: str = ""  # why this activation (logged on load)


def _forced(quick_gelu: bool | None) -> str | None:
    return None if quick_gelu is None else f"quick_gelu={quick_gelu} was given"


def _load_state_dict_file(path: Path, requested: str, quick_gelu: bool | None) -> _Loaded:
    sd, wrapped, kind = _read_state_dict(path)
    if _hf.is_hf_clip_state_dict(sd):
        if (path.parent / "config.json").is_file():
            return _load_hf_dir(path.parent, requested, quick_gelu, weights=[path], preread=sd)
        raise RfclipError(f"{path} holds Hugging Face transformers CLIP weights but there is no config.json next "
                          f"to it; pass the folder that holds config.json and the weights")
    sd = _clip_layout(sd, str(path))
    openai = (kind == "torchscript" or any(k in sd for k in _OPENAI_EXTRAS)
              or (not wrapped and sd["visual.conv1.weight"].dtype == torch.float16))
    if openai:
        name, cfg = _pick_name(_infer_cfg(sd, str(path)), requested)
        qg = True if quick_gelu is None else quick_gelu
        source = ("openai-torchscript:" if kind == "torchscript" else "openai-state-dict:") + str(path)
        what = f"the {name if name != 'custom' else 'inferred'} CLIP geometry"
        fix = f"the OpenAI-style checkpoint is inconsistent, {_FIX_REDOWNLOAD}"
    else:
        name = requested
        cfg = _named_cfg(requested)
        qg = (requested.endswith("-quickgelu") or bool(cfg.get("quick_gelu"))) if quick_gelu is None else quick_gelu
        source = "open_clip-checkpoint:" + str(path)
        what = f"model {requested}"
        fix = "pass the --model the checkpoint was trained with"
        try:
            guess = _matching_builtins(_infer_cfg(sd, str(path)))
        except RfclipError:
            guess = []
        if guess and requested not in guess:
            fix += f" (its shapes match {', '.join(guess[:4])})"
    model = _build(cfg, qg, f"model {name}", empty=True)
    _load_into(model, sd, str(path), what, fix)
    _set_preprocess(model)
    if not openai and quick_gelu is None and not wrapped:
        # A bare fp32 state dict in this key layout may be open_clip's or OpenAI weights re-saved: the file
        # cannot tell, and OpenAI weights run with GELU differ from the reference by ~5e-3 per pixel.
        if qg:
            log.warning("%s is a plain fp32 state dict, which does not say which activation its model was "
                        "trained with: using QuickGELU, as the model name %s says; if it was trained with GELU, "
                        "pass --no-quick-gelu (quick_gelu=False in Python)", path, requested)
        else:
            log.warning("%s is a plain fp32 state dict, which does not say which activation its model was "
                        "trained with: using GELU, as open_clip's %s config says; if these are OpenAI weights "
                        "(which need QuickGELU) re-saved, pass --quick-gelu (quick_gelu=True in Python); "
                        "--no-quick-gelu (quick_gelu=False) confirms GELU and silences this note", path, requested)
    why = _forced(quick_gelu) or ("OpenAI weights use QuickGELU" if openai else f"open_clip's {name} config")
    return _Loaded(model, name, source, qg, f"{name}|{_act(qg)}|{source.split(':', 1)[0]}|{_stamp([path])}", why)


def _snapshot(path: Path) -> Path:
    """A ``models--org--name`` hub cache folder -> its ``snapshots/<rev>`` folder (refs/main first)."""
    snaps = path / "snapshots"
    if not snaps.is_dir() or (path / "config.json").exists() or (path / "open_clip_config.json").exists():
        return path
    ref = path / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        if (snaps / rev).is_dir():
            return snaps / rev
    revs = sorted(p for p in snaps.iterdir() if p.is_dir())
    if len(revs) == 1:
        return revs[0]
    raise RfclipError(f"{path} is a Hugging Face cache folder with {len(revs)} snapshots and no refs/main; "
                      f"pass one of its snapshots/<revision> folders")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise RfclipError(f"{path} cannot be read as JSON ({_one_line(e)}); {_FIX_REDOWNLOAD}") from None
    if not isinstance(data, dict):
        raise RfclipError(f"{path} is not a JSON object; {_FIX_REDOWNLOAD}")
    return data


def _sharded(index: Path) -> list[Path]:
    data = _read_json(index)
    files = sorted(set((data.get("weight_map") or {}).values()))
    if not files:
        raise RfclipError(f"{index} lists no weight files; {_FIX_REDOWNLOAD}")
    paths = [index.parent / f for f in files]
    for p in paths:
        if not p.is_file():
            raise RfclipError(f"{p} (listed in {index.name}) is missing; {_FIX_REDOWNLOAD}")
    return paths


def _read_tensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        sd.update(_read_state_dict(p)[0])
    return sd


def _load_hf_dir(folder: Path, requested: str, quick_gelu: bool | None,
                 weights: list[Path] | None = None, preread: dict | None = None) -> _Loaded:
    config_path = folder / "config.json"
    cfg, qg_cfg = _hf.open_clip_cfg_from_hf_config(_read_json(config_path), str(folder))
    if weights is None:
        for fname in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"):
            if (folder / fname).is_file():
                weights = _sharded(folder / fname) if fname.endswith(".json") else [folder / fname]
                break
        else:
            raise RfclipError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin; "
                              f"download the weights into the folder")
    sd = preread if preread is not None else _read_tensors(weights)
    where = str(weights[0]) if len(weights) == 1 else f"{folder} (sharded weights)"
    if not _hf.is_hf_clip_state_dict(sd):
        raise RfclipError(f"{where} does not use Hugging Face CLIP names (text_model.*, vision_model.*); "
                          f"pass the weights file itself with --checkpoint FILE")
    sd = _hf.hf_to_open_clip(sd)
    if "visual.proj" in sd:  # projection_dim may be absent or stale in old configs; the weights know
        cfg["embed_dim"] = int(sd["visual.proj"].shape[1])
    qg = qg_cfg if quick_gelu is None else quick_gelu
    name, _ = _pick_name(cfg, requested)  # keep the heads config.json gives
    model = _build(cfg, qg, f"the model in {folder}", empty=True)
    _load_into(model, sd, where, f"the model described by {config_path}",
               "config.json does not describe these weights; download the folder again")
    _set_preprocess(model)
    return _Loaded(model, name, f"hf:{folder}", qg, f"{name}|{_act(qg)}|hf|{_stamp([config_path, *weights])}",
                   _forced(quick_gelu) or "hidden_act in config.json")


def _load_open_clip_dir(folder: Path, requested: str, quick_gelu: bool | None) -> _Loaded | None:
    config_path = folder / "open_clip_config.json"
    weights = next((folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                                         "open_clip_pytorch_model.pth") if (folder / f).is_file()), None)
    if weights is None:
        return None
    data = _read_json(config_path)
    cfg = data.get("model_cfg", data)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise RfclipError(f"{config_path} has no model_cfg with vision_cfg and text_cfg; {_FIX_REDOWNLOAD}")
    _require_vit(cfg, f"the model in {folder}")
    qg = bool(cfg.get("quick_gelu")) if quick_gelu is None else quick_gelu
    sd = _clip_layout(_read_state_dict(weights)[0], str(weights))
    name, _ = _pick_name(cfg, requested)
    model = _build(cfg, qg, f"the model in {folder}", empty=True)
    _load_into(model, sd, str(weights), f"the model described by {config_path}",
               "open_clip_config.json does not describe these weights; download the folder again")
    _set_preprocess(model, data.get("preprocess_cfg"))
    source = f"open_clip-checkpoint:{folder}"
    return _Loaded(model, name, source, qg, f"{name}|{_act(qg)}|open_clip|{_stamp([config_path, weights])}",
                   _forced(quick_gelu) or "quick_gelu in open_clip_config.json")


def _load_path(path: Path, requested: str, quick_gelu: bool | None) -> _Loaded:
    from .._io import file_problem

    problem = file_problem(path)
    if problem == "not found":
        raise RfclipError(f"checkpoint {path} does not exist; check the path given to --checkpoint")
    if problem is not None and not path.is_dir():  # a FIFO or device would block or stream forever
        raise RfclipError(f"checkpoint {path} {problem}; give a checkpoint file or folder to --checkpoint")
    if path.is_dir():
        folder = _snapshot(path)
        if (folder / "open_clip_config.json").is_file():
            loaded = _load_open_clip_dir(folder, requested, quick_gelu)
            if loaded is not None:
                return loaded
        if (folder / "config.json").is_file():
            return _load_hf_dir(folder, requested, quick_gelu)
        raise RfclipError(f"{path} is a folder without config.json (Hugging Face CLIP) or open_clip_config.json "
                          f"(open_clip); pass such a folder or the checkpoint file itself")
    return _load_state_dict_file(path, requested, quick_gelu)


def _load_tag(name: str, tag: str, cache_dir, quick_gelu: bool | None) -> _Loaded:
    import open_clip

    cfg = _named_cfg(name)
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it"
        raise RfclipError(f"model {name} has no pretrained tag {tag!r} ({known}); pick one, "
                          f"or pass --checkpoint FILE")
    path = Path(_hub.resolve_pretrained(name, tag, pcfg, cache_dir))
    qg = bool(pcfg.get("quick_gelu") or cfg.get("quick_gelu")) if quick_gelu is None else quick_gelu
    sd = _clip_layout(_read_state_dict(path)[0], str(path))
    model = _build(cfg, qg, f"model {name}", empty=True)
    _load_into(model, sd, str(path), f"model {name}",
               "the cached download does not match its tag; delete it so it is downloaded again")
    _set_preprocess(model, pcfg)
    return _Loaded(model, name, f"open_clip:{tag}", qg, f"{name}|{tag}|{_act(qg)}",
                   _forced(quick_gelu) or f"open_clip's pretrained config for {name} {tag}")


def load_clip(model: str = "ViT-B-16", pretrained: str | None = "openai",
              checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              cache_dir: str | None = None, *, quick_gelu: bool | None = None) -> ClipModel:
    """Load a CLIP ViT for rfclip.

    Args:
        model: open_clip model name (``ViT-B-16``, ``ViT-L-14``, ...; ``ViT-B/16`` is accepted). For
            OpenAI-origin and Hugging Face checkpoints the geometry comes from the file and the name
            only breaks ties; for open_clip checkpoints it selects the config.
        pretrained: open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...). Ignored when
            ``checkpoint`` is given.
        checkpoint: local weights file or folder (format detected from content, see module docs).
        device: where the returned model lives.
        cache_dir: download cache to use instead of open_clip's defaults (hub cache and ~/.cache/clip).
        quick_gelu: force the activation (QuickGELU or GELU) instead of deciding it from the origin.

    Raises:
        WeightsNotFoundError: the tag's weights are not cached and cannot be downloaded (fast offline).
        RfclipError: any other problem with the inputs, in one line.
    """
    dev = parse_device(device) or torch.device("cpu")
    raw = os.fspath(model) if isinstance(model, os.PathLike) else str(model)
    name = raw.replace("/", "-")
    if _looks_like_weights_file(raw) and _builtin_cfg(name) is None:
        raise RfclipError(f"model {raw!r} is a weights file, not an open_clip model name; pass the file as "
                          f"checkpoint={raw!r} (--checkpoint on the command line) and its architecture as the model, "
                          f"e.g. Segmenter('ViT-B-16', checkpoint={raw!r})")
    if checkpoint is not None:
        loaded = _load_path(Path(os.fspath(checkpoint)).expanduser(), name, quick_gelu)
        tag = None
    elif pretrained:
        loaded = _load_tag(name, str(pretrained), cache_dir, quick_gelu)
        tag = str(pretrained)
    else:
        raise RfclipError("no weights given: pass a pretrained tag (e.g. openai) or --checkpoint FILE")
    model_ = _finish(loaded.model, dev)
    log.info("loaded %s (%s) with %s: %s", loaded.name, loaded.source, "QuickGELU" if loaded.quick_gelu else "GELU",
             loaded.why)
    return ClipModel(model=model_, tokenizer=_tokenizer(model_.context_length), name=loaded.name, pretrained=tag,
                     source=loaded.source, quick_gelu=loaded.quick_gelu, weights_id=loaded.weights_id)


def random_clip(model_cfg: str | dict, quick_gelu: bool = True, seed: int = 0,
                device: str | torch.device = "cpu") -> ClipModel:
    """A CLIP with random (seeded, reproducible) weights; no download. For tests and benchmarks.

    ``model_cfg`` is an open_clip model name or an open_clip config dict
    (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``). ``quick_gelu`` decides the
    activation (a ``quick_gelu`` entry in the config is ignored). The global RNG is left untouched.
    """
    dev = parse_device(device) or torch.device("cpu")
    if isinstance(model_cfg, str):
        name = model_cfg.replace("/", "-")
        cfg = _named_cfg(name)
    elif isinstance(model_cfg, dict):
        cfg = copy.deepcopy(model_cfg)
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise RfclipError("a model config dict needs embed_dim, vision_cfg and text_cfg; "
                              "see open_clip's model_configs/*.json")
        matches = _matching_builtins(cfg)
        name = min(matches, key=len) if matches else "custom"
    else:
        raise RfclipError(f"model_cfg must be an open_clip model name or config dict, not {type(model_cfg).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(cfg, quick_gelu, f"model {name}")
    _set_preprocess(model)
    model = _finish(model, dev)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ClipModel(model=model, tokenizer=_tokenizer(model.context_length), name=name, pretrained=None,
                     source="random", quick_gelu=quick_gelu,
                     weights_id=f"random|{name}|{digest}|{_act(quick_gelu)}|seed={seed}")
