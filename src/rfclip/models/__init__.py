"""Model loading: open_clip names and tags, OpenAI / open_clip / safetensors / Hugging Face checkpoints."""

from .loading import ClipModel, load_clip, random_clip

__all__ = ["ClipModel", "load_clip", "random_clip"]
