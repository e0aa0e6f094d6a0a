"""Text classifier: class names -> prompt-ensembled CLIP text embeddings, with synonyms and a cache.

A *class* is a list of synonyms; each synonym is one *query*. A query's embedding is the mean over the 80
ImageNet templates of the L2-normalised text embeddings, L2-normalised again (protocol §3). A class scores as
the max over its synonyms of the per-query softmax probability (done in :mod:`rfclip.inference`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

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

    A string is split into classes on ``;`` and on new lines, and each class into synonyms on ``,``
    ("cat,kitty;dog;grass" and "cat,kitty\ndog\ngrass" are three classes). A string with neither is a plain
    comma-separated class list ("road, car, tree, sky"): one class with synonyms only would make every pixel that
    class, so that reading is never what a user means. A sequence holds one entry per class, each a name, a
    comma-separated synonym string, or a list of synonyms; every name must be a string, and an entry without a name
    is an error (dropping it would shift the mask indices against the caller's list).
    Each class's display name (its first synonym) must be unique, ignoring case and spaces (CLIP's tokenizer
    lowercases and collapses white space, so ``cat`` and ``Cat`` are the same query): masks, fractions and outputs
    are keyed by it.
    """
    if isinstance(classes, str):
        text = classes.replace("\r\n", "\n").replace("\r", "\n")
        if ";" in text or "\n" in text.strip():
            entries: list[ClassSpec] = text.replace("\n", ";").split(";")
        else:
            entries = [[name] for name in text.split(",")]
        parsed = [names for names in (_synonyms(entry) for entry in entries) if names]
    elif isinstance(classes, (bytes, bytearray)) or not isinstance(classes, Iterable):
        raise RfclipError(f"classes must be a string or a list of class names, got {type(classes).__name__}; "
                          'e.g. "road;car;sky" or ["road", "car", "sky"]')
    else:
        parsed = []
        for index, entry in enumerate(classes):
            names = _synonyms(entry, index)
            if not names:
                raise RfclipError(f"class {index} ({entry!r}) has no name; give each class at least one name "
                                  "(or remove the entry)")
            parsed.append(names)
    if not parsed:
        raise RfclipError('empty class list; give class names, e.g. --classes "road;car;tree;sky"')
    seen: dict[str, str] = {}
    for names in parsed:
        key = " ".join(names[0].split()).casefold()
        if key in seen:
            same = "" if seen[key] == names[0] else f" (as '{seen[key]}': CLIP reads names without case)"
            raise RfclipError(f"class '{names[0]}' is listed twice{same}; list each class once "
                              "(join synonyms with ',', e.g. \"cat,kitty;dog\")")
        seen[key] = names[0]
    return parsed


def _synonyms(entry, index: int | None = None) -> list[str]:
    """One class entry (a name, ``"a,b"`` or a list of names) -> its stripped, non-empty names."""
    if isinstance(entry, str):
        names = entry.split(",")
    elif isinstance(entry, Sequence) and not isinstance(entry, (bytes, bytearray)):
        names = list(entry)
    else:
        raise RfclipError(f"class {index} is a {type(entry).__name__} ({entry!r}), not a name; give class names as "
                          "strings (or a list of strings for synonyms)")
    for name in names:
        if not isinstance(name, str):
            raise RfclipError(f"class {index} holds {name!r} ({type(name).__name__}), not a name; give class names "
                              "as strings")
    return [n.strip() for n in names if n.strip()]


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
    ``RFCLIP_CACHE`` overrides, ``cache_dir=True`` means the default, ``cache_dir=False`` disables) keeps one small safetensors file per vocabulary so
    that evaluation re-runs skip the 80-template text pass.
    """

    def __init__(self, clip, templates: Sequence[str] | None = None, device=None, batch_size: int = 400,
                 cache_dir: str | os.PathLike | bool | None = None):
        self.clip = clip
        self.templates = list(templates) if templates is not None else imagenet_templates()
        self.device = torch.device(device) if device is not None else next(clip.model.parameters()).device
        self.batch_size = batch_size
        if cache_dir is False:
            self.cache_dir = None
        elif cache_dir is None or cache_dir is True:  # True: "yes, cache", in the default folder
            self.cache_dir = default_cache_dir()
        elif isinstance(cache_dir, (str, os.PathLike)) and os.fspath(cache_dir):
            self.cache_dir = Path(cache_dir)
        else:
            raise RfclipError(f"text_cache must be a folder, True (the default cache) or False (no cache), got "
                              f"{cache_dir!r}")
        self._memory: dict[str, Tensor] = {}
        self._model_json = json.dumps({"model": clip.identity, "templates": self.templates})
        self._model_key = hashlib.sha256(self._model_json.encode()).hexdigest()[:16]

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
        # JSON of the list: ["a\nb", "c"] and ["a", "b\nc"] are different keys (joined by new lines they were not)
        vocab = hashlib.sha256(self._vocabulary_json(queries).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self._model_key}-{vocab}.safetensors"

    def _vocabulary_json(self, queries: list[str]) -> str:
        """What a cache file holds embeddings of: the model's identity, the templates and the queries."""
        return json.dumps({"setup": self._model_json, "queries": queries})

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
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:  # a file of another vocabulary is never used
                    same = (f.metadata() or {}).get("vocabulary") == self._vocabulary_json(queries)
                stored = load_file(str(path))["features"]
                if same and stored.shape[0] == len(queries):
                    self._memory.update(zip(queries, stored))
                    return
            except Exception:  # a damaged cache file is rebuilt, never trusted
                pass
        self._memory.update(zip(missing, self._embed_queries(missing)))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file({"features": torch.stack([self._memory[q] for q in queries]).contiguous()}, str(tmp),
                          metadata={"vocabulary": self._vocabulary_json(queries)})
                os.replace(tmp, path)
            except OSError:  # a read-only cache folder must not stop segmentation
                pass
