"""``rfclip demo``: start the local web page (Segment, Compare, Look inside) on one loaded model."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import RfclipError, WeightsNotFoundError
from . import common

DESCRIPTION = """\
Start a local web page to segment your own images with the classes you type (or a
benchmark's vocabulary), compare two methods side by side, and look inside CLIP:
click a point to see its attention in every layer before and after RF-CLIP's
redistribution, and the distraction tokens. The model loads once; requests queue.
Needs the demo extra: pip install "rfclip[demo]" (Gradio)."""

EXAMPLES = """\
examples:
  rfclip demo                                      ViT-B-16 openai (downloaded on first use)
  rfclip demo --checkpoint ViT-B-16.pt             local weights (offline)
  rfclip demo --model ViT-L-14 --pretrained openai --device cuda --port 8080
  rfclip demo --checkpoint clip.safetensors --option distraction_dims=4,162,189
  rfclip demo --checkpoint clip.safetensors --masks npz:masks/   region masks: offers corrclip and METHOD+masks,
                                                 and shows an image's regions (make them with `rfclip masks`)

The page opens at http://127.0.0.1:7860 (this machine only; --host 0.0.0.0 serves
the network). Method options given here (--option KEY=VALUE) fill the page's
"Method options" field; inference flags set the page's starting settings.
"""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {value}")
    return value


def _megapixels(text: str) -> float:
    value = common._float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    return value


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD, e.g. --auth ana:s3cret")
    return user, password


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers) -> None:
    from ..demo.engine import MAX_MEGAPIXELS, Limits

    p = subparsers.add_parser("demo", help="start a local web page: segment, compare methods, look inside CLIP",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    server.add_argument("--port", type=_port, default=7860, metavar="N", help="port (default: 7860)")
    server.add_argument("--max-megapixels", type=_megapixels, default=MAX_MEGAPIXELS, metavar="MP",
                        help=f"largest image the page accepts, in megapixels (default: {MAX_MEGAPIXELS:g})")
    server.add_argument("--auth", type=_auth, metavar="USER:PASSWORD",
                        help="ask for this user name and password (Gradio's login); needed when --host serves "
                             "other machines")
    limits = p.add_argument_group("limits per request (a request over one is refused, naming it)")
    defaults = Limits()
    for flag, dest, what in (("--max-crops", "max_crops", "crops of the model's input size"),
                             ("--max-short-side", "max_short_side", "resized short side, px"),
                             ("--max-pamr-steps", "max_pamr_steps", "PAMR steps"),
                             ("--max-classes", "max_classes", "classes"),
                             ("--max-prompts", "max_prompts", "class names with their synonyms")):
        limits.add_argument(flag, dest=dest, type=common._positive_int, default=getattr(defaults, dest), metavar="N",
                            help=f"{what} (default: {getattr(defaults, dest)})")
    limits.add_argument("--request-timeout", dest="request_seconds", type=common._positive_float,
                        default=defaults.request_seconds, metavar="S",
                        help=f"seconds of computing per request (default: {defaults.request_seconds:g})")
    common.add_model_options(p)
    common.add_method_options(p)
    common.add_masks_option(p)
    common.add_inference_options(p)


def _require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise RfclipError("the web demo needs Gradio, which is not installed; install it with "
                          "pip install \"rfclip[demo]\"") from None


def check_address(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be served (unknown host, port in use)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise RfclipError(f"cannot serve on {host}: unknown address ({getattr(err, 'strerror', None) or err}); "
                          "give an address of this machine with --host, e.g. 127.0.0.1") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind(address)
        except OSError as err:
            raise RfclipError(f"cannot serve on {host}:{port}: {err.strerror or err}; choose another --port "
                              "(or stop the program that uses it)") from None


def _option_text(options: dict) -> str:
    def fmt(value):
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)

    return " ".join(f"{key}={fmt(value)}" for key, value in options.items())


def run(args) -> int:
    """Everything the demo writes (request folders, Gradio's upload cache) lives in one folder it owns and removes
    on exit, Ctrl+C or SIGTERM."""
    out_root = Path(tempfile.mkdtemp(prefix="rfclip-demo-"))
    upload_dir = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(out_root / "uploads")  # before Gradio is imported: it reads it then
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None  # docker, systemd, timeout
    try:
        return _run(args, out_root)
    except KeyboardInterrupt:
        print("rfclip demo: stopped", file=sys.stderr)
        return 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if upload_dir is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = upload_dir
        shutil.rmtree(out_root, ignore_errors=True)


def _run(args, out_root: Path) -> int:
    _require_gradio()
    from ..demo.app import build_app, serve
    from ..demo.engine import DemoEngine, Limits, ModelInfo, Settings, all_method_options
    from ..devices import reuse_cpu_memory_from_env
    from ..inference import InferenceConfig
    from ..methods import method_option_names
    from ..segmenter import Segmenter

    # Everything typed is checked before the model loads.
    spec = "+".join([args.method, *args.plugin])
    method_option_names(spec)  # an unknown method or plug-in is an error now, not in the page
    options = common.segmenter_options(args)
    config_names = InferenceConfig.field_names()
    config = {k: v for k, v in options.items() if k in config_names}
    method_options = {k: v for k, v in options.items() if k not in config_names}
    unknown = sorted(set(method_options) - all_method_options())
    if unknown:
        raise RfclipError(f"unknown option(s) {', '.join(unknown)}; the methods take: "
                          f"{', '.join(sorted(all_method_options()))}; inference takes: {', '.join(sorted(config_names))}")
    common.check_checkpoint_path(args.checkpoint)
    check_address(args.host, args.port)
    if args.host not in LOCAL_HOSTS and args.auth is None:
        print(f"rfclip demo: warning: the page on {args.host} has no authentication: anyone who can reach this "
              "machine can use it (and its compute); add --auth USER:PASSWORD", file=sys.stderr, flush=True)
    masks = common.masks_from_args(args)  # --masks: a bad spec or a missing extra fails before CLIP loads

    src = args.checkpoint or f"{args.model} ({args.pretrained})"
    print(f"rfclip demo: loading {src} ...", file=sys.stderr, flush=True)
    unavailable = None
    try:
        base = Segmenter(args.model, args.pretrained, method="clip", checkpoint=args.checkpoint, device=args.device,
                         quick_gelu=args.quick_gelu, **config)
        reuse_cpu_memory_from_env(base.device)  # the demo owns its process: keep large CPU buffers for reuse
    except WeightsNotFoundError as err:  # offline without weights: the page explains how to start with --checkpoint
        base, unavailable = None, " ".join(str(err).split())
        print(f"rfclip demo: no model loaded: {unavailable}", file=sys.stderr, flush=True)
    info = ModelInfo(model=getattr(getattr(base, "clip", None), "name", None) or args.model,
                     pretrained=args.pretrained if not args.checkpoint else None, checkpoint=args.checkpoint,
                     device=str(base.device) if base is not None else "")
    limits = Limits(**{name: getattr(args, name) for name in ("max_crops", "max_short_side", "max_pamr_steps",
                                                              "max_classes", "max_prompts", "request_seconds")})
    engine = DemoEngine(base, info, unavailable=unavailable, max_megapixels=args.max_megapixels, limits=limits,
                        out_root=out_root, masks=masks)
    app = None
    try:
        app = build_app(engine, method=spec, settings=Settings(options=_option_text(method_options)))
        url = serve(app, args.host, args.port, allowed_paths=[str(engine.out_root)], auth=args.auth)
        print(f"rfclip demo: serving on {url} (Ctrl+C stops it)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        if app is not None:
            app.close()


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl+C: the request folders and uploads are removed
