"""``rfclip demo``: a local web page to segment your own images, compare methods and look inside CLIP.

Needs the ``demo`` extra (``pip install "rfclip[demo]"``: Gradio). :mod:`rfclip.demo.engine` serves the three views
on one loaded model (no web framework needed); :mod:`rfclip.demo.app` is the page. From Python::

    from rfclip import Segmenter
    from rfclip.demo import DemoEngine, ModelInfo, build_app, serve
    engine = DemoEngine(Segmenter(checkpoint="ViT-B-16.pt"), ModelInfo("ViT-B-16", None, "ViT-B-16.pt"))
    url = serve(build_app(engine))  # http://127.0.0.1:7860, in the background
"""

from .engine import MAX_MEGAPIXELS, VOCABULARIES, DemoEngine, ModelInfo, Settings


def build_app(*args, **kwargs):
    """The Gradio page over a :class:`DemoEngine` (see :func:`rfclip.demo.app.build_app`)."""
    from .app import build_app as _build_app

    return _build_app(*args, **kwargs)


def serve(*args, **kwargs) -> str:
    """Start the page's server in the background; returns its URL (see :func:`rfclip.demo.app.serve`)."""
    from .app import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["MAX_MEGAPIXELS", "VOCABULARIES", "DemoEngine", "ModelInfo", "Settings", "build_app", "serve"]
