"""Hugging Face ``transformers`` CLIP checkpoints <-> open_clip ``CLIP`` layout, without transformers.

A ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, e.g. a
cached ``openai/clip-vit-base-patch16`` snapshot) stores the same weights as OpenAI's CLIP under
other names, with separate q/k/v projections and the two output projections as ``nn.Linear``
weights (transposed). This module maps the keys both ways and turns ``config.json`` into an
open_clip model config.

Mapping (``L`` = ``text_model.encoder.layers.i`` / ``vision_model.encoder.layers.i``, ``R`` = the
matching ``transformer.resblocks.i`` / ``visual.transformer.resblocks.i``)::

    text_model.embeddings.token_embedding.weight     token_embedding.weight
    text_model.embeddings.position_embedding.weight  positional_embedding
    text_model.final_layer_norm.*                    ln_final.*
    text_projection.weight                           text_projection (transposed)
    vision_model.embeddings.class_embedding          visual.class_embedding
    vision_model.embeddings.patch_embedding.weight   visual.conv1.weight
    vision_model.embeddings.position_embedding.weight visual.positional_embedding
    vision_model.pre_layrnorm.*                      visual.ln_pre.*   (sic, "layrnorm")
    vision_model.post_layernorm.*                    visual.ln_post.*
    visual_projection.weight                         visual.proj (transposed)
    L.self_attn.{q,k,v}_proj.{weight,bias}           R.attn.in_proj_{weight,bias} (concatenated q, k, v)
    L.self_attn.out_proj.*                           R.attn.out_proj.*
    L.layer_norm1.* / L.layer_norm2.*                R.ln_1.* / R.ln_2.*
    L.mlp.fc1.* / L.mlp.fc2.*                        R.mlp.c_fc.* / R.mlp.c_proj.*
    logit_scale                                      logit_scale
    *.embeddings.position_ids                        (dropped)
"""

from __future__ import annotations

import re

import torch

from rfclip.errors import RfclipError

# Defaults of transformers' CLIPTextConfig / CLIPVisionConfig, used for fields a config.json omits.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5)

_LAYER_RENAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_PLAIN_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_DROPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
           "vision_model.encoder.layers.": "visual.transformer.resblocks."}
_LAYER_RE = re.compile(r"^(text_model\.encoder\.layers\.|vision_model\.encoder\.layers\.)(\d+)\.(.+)$")


def is_hf_clip_state_dict(sd: dict) -> bool:
    """Does this state dict use transformers' CLIPModel key names?"""
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def hf_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``CLIPModel`` state dict to open_clip's ``CLIP`` layout.

    Keys that have no counterpart are kept unchanged, so that loading reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer prefix, weight|bias) -> q/k/v
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        if key in _PLAIN_RENAMES:
            out[_PLAIN_RENAMES[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _LAYER_RE.match(key)
        if m:
            tower, idx, rest = m.group(1), m.group(2), m.group(3)
            prefix = f"{_TOWERS[tower]}{idx}."
            qm = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qm:
                qkv.setdefault((prefix, qm.group(2)), {})[qm.group(1)] = value
                continue
            if rest in _LAYER_RENAMES:
                out[prefix + _LAYER_RENAMES[rest]] = value
                continue
        out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise RfclipError(f"the Hugging Face checkpoint lacks some of {prefix} q/k/v projections "
                              f"({sorted(parts)} present); the file is incomplete, download it again")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_open_clip` (open_clip ``CLIP`` layout -> transformers ``CLIPModel``)."""
    plain = {v: k for k, v in _PLAIN_RENAMES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    layer = {v: k for k, v in _LAYER_RENAMES.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    layer_re = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in plain:
            out[plain[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif (m := layer_re.match(key)):
            prefix = f"{towers[m.group(1)]}{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                q, k, v = value.chunk(3, dim=0)
                for name, part in zip("qkv", (q, k, v)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif rest in layer:
                out[prefix + layer[rest]] = value
            else:
                raise ValueError(f"no Hugging Face name for {key}")
        elif key in ("attn_mask", "input_resolution", "context_length", "vocab_size"):
            continue
        else:
            raise ValueError(f"no Hugging Face name for {key}")
    out["text_model.embeddings.position_ids"] = torch.arange(sd["positional_embedding"].shape[0])[None]
    out["vision_model.embeddings.position_ids"] = torch.arange(sd["visual.positional_embedding"].shape[0])[None]
    return out


def _merged(config: dict, key: str, defaults: dict, where: str) -> dict:
    merged = dict(defaults)
    # Old transformers configs carry *_config_dict next to *_config; transformers lets it win.
    for section in (key, key + "_dict"):
        value = config.get(section) or {}
        if not isinstance(value, dict):
            raise RfclipError(f"{where}/config.json: {section} is a {type(value).__name__}, not an object; "
                              "the file is damaged, download the folder again")
        merged.update({k: v for k, v in value.items() if v is not None})
    return merged


def _whole(section: dict, key: str, name: str, where: str) -> int:
    """``section[key]`` as a positive int (JSON may hold 16.0); a one-line error naming the field otherwise."""
    value = section[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RfclipError(f"{where}/config.json: {name}.{key} is {value!r}, not a positive whole number; the file "
                          "is damaged or not a CLIP config, download the folder again")
    return value


def _positive(section: dict, key: str, name: str, where: str) -> float:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RfclipError(f"{where}/config.json: {name}.{key} is {value!r}, not a positive number; the file is "
                          "damaged or not a CLIP config, download the folder again")
    return float(value)


def open_clip_cfg_from_hf_config(config: dict, where: str) -> tuple[dict, bool]:
    """(open_clip model config dict, quick_gelu) for a transformers CLIP ``config.json``."""
    model_type = config.get("model_type", "clip")
    if model_type != "clip":
        raise RfclipError(f"{where} is a Hugging Face '{model_type}' model, not CLIP; rfclip loads "
                          f"transformers CLIPModel folders (model_type 'clip') only")
    text = _merged(config, "text_config", _TEXT_DEFAULTS, where)
    vision = _merged(config, "vision_config", _VISION_DEFAULTS, where)
    acts = {str(text["hidden_act"]), str(vision["hidden_act"])}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise RfclipError(f"{where} uses activations {sorted(acts)}; rfclip supports CLIP models with "
                          f"quick_gelu or gelu in both towers")
    quick_gelu = acts == {"quick_gelu"}
    v = {k: _whole(vision, k, "vision_config", where) for k in
         ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "patch_size", "image_size",
          "num_channels")}
    t = {k: _whole(text, k, "text_config", where) for k in
         ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
          "vocab_size")}
    if v["num_channels"] != 3:
        raise RfclipError(f"{where} has a {v['num_channels']}-channel image encoder; rfclip needs RGB (3)")
    vw, vh = v["hidden_size"], v["num_attention_heads"]
    tw, th = t["hidden_size"], t["num_attention_heads"]
    if vw % vh or tw % th:
        raise RfclipError(f"{where} has a hidden size not divisible by its number of heads; the config is invalid")
    vision_cfg = dict(layers=v["num_hidden_layers"], width=vw, head_width=vw // vh,
                      mlp_ratio=v["intermediate_size"] / vw, patch_size=v["patch_size"], image_size=v["image_size"])
    text_cfg = dict(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                    width=tw, heads=th, layers=t["num_hidden_layers"], mlp_ratio=t["intermediate_size"] / tw)
    vision_eps = _positive(vision, "layer_norm_eps", "vision_config", where)
    text_eps = _positive(text, "layer_norm_eps", "text_config", where)
    if vision_eps != 1e-5:
        vision_cfg["norm_kwargs"] = {"eps": vision_eps}
    if text_eps != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": text_eps}
    projection = {"projection_dim": config.get("projection_dim") or text.get("projection_dim") or 512}
    embed_dim = _whole(projection, "projection_dim", "config", where)
    return dict(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg), quick_gelu


def hf_config_from_open_clip(model_cfg: dict, quick_gelu: bool) -> dict:
    """A transformers-style ``config.json`` dict for an open_clip model config (inverse of the above)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v = CLIPVisionCfg(**model_cfg["vision_cfg"])
    t = CLIPTextCfg(**model_cfg["text_cfg"])
    act = "quick_gelu" if quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": model_cfg["embed_dim"],
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": model_cfg["embed_dim"], "model_type": "clip_text_model",
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
        "vision_config": {
            "hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
            "num_attention_heads": v.width // v.head_width, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": model_cfg["embed_dim"], "model_type": "clip_vision_model",
        },
    }
