"""Text classifier: class names -> prompt-ensembled CLIP text embeddings, with synonyms and a cache.

A *class* is a list of synonyms; each synonym is one *query*. A query's embedding is the mean over the 80
ImageNet templates of the L2-normalised text embeddings, L2-normalised again (protocol §3). A class scores as
the max over its synonyms of the per-query softmax probability (done in :mod:`rfclip.inference`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import RfclipError

ClassSpec = str | Sequence[str]


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, in the reference order, with ``{}`` as the placeholder."""
    text = resources.files("rfclip").joinpath("assets/imagenet_templates.txt").read_text(encoding="utf-8")
    return [line.replace("{c}", "{}") for line in text.splitlines() if line.strip()]


def parse_classes(classes: str | Sequence[ClassSpec]) -> list[list[str]]:
    """Normalise a class list to ``[[synonym, ...], ...]``.

    A string is split into classes on ``;`` and each class into synonyms on ``,`` ("cat,kitty;dog;grass" is three
    classes). A string without ``;`` is a plain comma-separated class list ("road, car, tree, sky"): one class
    with synonyms only would make every pixel that class, so that reading is never what a user means.
    A sequence holds one entry per class, each a name, a comma-separated synonym string, or a list of synonyms.
    """
    if isinstance(classes, str):
        if ";" in classes:
            entries: list[ClassSpec] = classes.split(";")
        else:
            entries = [[name] for name in classes.split(",")]
    else:
        entries = list(classes)
    parsed: list[list[str]] = []
    for entry in entries:
        names = entry.split(",") if isinstance(entry, str) else list(entry)
        names = [str(n).strip() for n in names if str(n).strip()]
        if names:
            parsed.append(names)
    if not parsed:
        raise RfclipError('empty class list; give class names, e.g. --classes "road;car;tree;sky"')
    return parsed


@dataclass
class TextQueries:
    """Embedded vocabulary: one row per query, and which class each query belongs to."""

    features: Tensor  # (Q, D) L2-normalised
    query_class: Tensor  # (Q,) long, class index of each query
    class_names: list[str]  # display name of each class (its first synonym)
    synonyms: list[list[str]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device) -> "TextQueries":
        return TextQueries(self.features.to(device), self.query_class.to(device), self.class_names, self.synonyms)


def prompt_lengths(tokens: Tensor) -> Tensor:
    """Tokens up to and including the end-of-text token of each prompt (S, context) -> (S,) long. CLIP's
    tokenizer gives the end-of-text token the largest id and pads with zeros after it."""
    return tokens.argmax(dim=-1) + 1


def _text_dim(model) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    if proj is not None:
        return proj.shape[1]
    return model.ln_final.weight.shape[0]


def _can_truncate(model) -> bool:
    """Truncation is exact for open_clip's CLIP text tower: causal mask and the feature read at the end-of-text
    token (``argmax`` pooling), so positions after it never influence the result."""
    mask = getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) != "argmax" or mask is None or mask.dim() != 2:
        return False
    if not (hasattr(model, "token_embedding") and hasattr(model, "transformer")):
        return False
    future = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isinf(mask[future]).all()) and not bool(torch.isinf(mask[~future]).any())


def encode_text_truncated(model, tokens: Tensor) -> Tensor:
    """``model.encode_text(tokens)`` run on the first ``max length`` positions only. (S, context) -> (S, D).

    CLIP's text transformer is causal and pools at the end-of-text token, so the positions after the longest
    prompt of the batch change nothing: VOC's prompts need 11 of the 77 positions, about 7x less work. Models whose
    text tower is not of that kind fall back to the full-length ``encode_text``.
    """
    if not _can_truncate(model):
        return model.encode_text(tokens)
    length = int(prompt_lengths(tokens).max())
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (S, L, W)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # the end-of-text token's feature
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def default_cache_dir() -> Path:
    base = os.environ.get("RFCLIP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "rfclip")
    return Path(base) / "text"


class TextClassifier:
    """Embeds class vocabularies with a CLIP text encoder; caches per (model, templates, vocabulary).

    The in-memory cache holds every query embedded so far; ``cache_dir`` (default ``~/.cache/rfclip/text``,
    ``RFCLIP_CACHE`` overrides, ``cache_dir=False`` disables) keeps one small safetensors file per vocabulary so
    that evaluation re-runs skip the 80-template text pass.
    """

    def __init__(self, clip, templates: Sequence[str] | None = None, device=None, batch_size: int = 400,
                 cache_dir: str | os.PathLike | bool | None = None):
        self.clip = clip
        self.templates = list(templates) if templates is not None else imagenet_templates()
        self.device = torch.device(device) if device is not None else next(clip.model.parameters()).device
        self.batch_size = batch_size
        self.cache_dir = None if cache_dir is False else Path(cache_dir) if cache_dir else default_cache_dir()
        self._memory: dict[str, Tensor] = {}
        key = f"{clip.identity}\n" + "\n".join(self.templates)
        self._model_key = hashlib.sha256(key.encode()).hexdigest()[:16]

    @torch.inference_mode()
    def _embed_queries(self, queries: list[str]) -> Tensor:
        """Template-ensembled embeddings of ``queries``. Returns (len(queries), D) fp32, L2-normalised.

        Prompts are tokenised once, sorted by length and encoded in batches truncated to their longest prompt
        (:func:`encode_text_truncated`), then put back in order.
        """
        model, tokenizer = self.clip.model, self.clip.tokenizer
        sentences = [t.format(q) for q in queries for t in self.templates]
        tokens = tokenizer(sentences)  # (S, 77) on the CPU
        order = prompt_lengths(tokens).argsort(stable=True)
        out = torch.empty(len(sentences), _text_dim(model), dtype=torch.float32)
        for start in range(0, len(sentences), self.batch_size):
            idx = order[start:start + self.batch_size]
            out[idx] = F.normalize(encode_text_truncated(model, tokens[idx].to(self.device)).float(), dim=-1).cpu()
        per_sentence = out.reshape(len(queries), len(self.templates), -1)  # (Q, T, D)
        return F.normalize(per_sentence.mean(dim=1), dim=-1)

    def _disk_path(self, queries: list[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        vocab = hashlib.sha256("\n".join(queries).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self._model_key}-{vocab}.safetensors"

    def encode(self, classes: str | Sequence[ClassSpec]) -> TextQueries:
        """Embed a vocabulary (see :func:`parse_classes`). Returns :class:`TextQueries` on ``self.device``."""
        synonyms = parse_classes(classes)
        queries = [name for names in synonyms for name in names]
        query_class = torch.tensor([c for c, names in enumerate(synonyms) for _ in names], dtype=torch.long)
        missing = [q for q in dict.fromkeys(queries) if q not in self._memory]
        if missing:
            self._load_or_embed(queries, missing)
        features = torch.stack([self._memory[q] for q in queries])
        return TextQueries(features, query_class, [names[0] for names in synonyms], synonyms).to(self.device)

    def _load_or_embed(self, queries: list[str], missing: list[str]) -> None:
        from safetensors.torch import load_file, save_file

        path = self._disk_path(queries)
        if path is not None and path.is_file():
            try:
                stored = load_file(str(path))["features"]
                if stored.shape[0] == len(queries):
                    self._memory.update(zip(queries, stored))
                    return
            except Exception:  # a damaged cache file is rebuilt, never trusted
                pass
        self._memory.update(zip(missing, self._embed_queries(missing)))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file({"features": torch.stack([self._memory[q] for q in queries]).contiguous()}, str(tmp))
                os.replace(tmp, path)
            except OSError:  # a read-only cache folder must not stop segmentation
                pass
