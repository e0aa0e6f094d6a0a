"""The ``rfclip`` command line: a thin layer over the Python API.

Each subcommand lives in its own module under ``rfclip.cli`` exposing ``add_parser(subparsers)`` (which adds one
or more sub-parsers) and ``run(args) -> int``. Modules are listed in :data:`SUBCOMMAND_MODULES`; one that does not
exist (yet) is skipped, so adding ``rfclip/cli/<name>.py`` for a listed name needs no other edit. A module that adds
several commands either dispatches on ``args.command`` in its ``run`` or sets its own ``_run`` default per parser.

Errors: an :class:`rfclip.errors.RfclipError` (anything the user can fix) prints one line
``rfclip: error: <message>`` and exits with status 2; an unexpected error prints one line and exits with 1
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from .. import __version__
from ..errors import RfclipError

# Subcommand modules, in --help order. Missing modules are skipped (see the module docstring).
SUBCOMMAND_MODULES = ["segment", "eval", "calibrate", "explain", "demo", "masks"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors that point to ``--help`` (instead of the usage block)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _load_module(name: str):
    modname = f"{__name__}.{name}"
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as err:
        if err.name == modname:  # this subcommand is not written yet; any other missing module is a real error
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="rfclip",
        description="Training-free open-vocabulary semantic segmentation with CLIP (RF-CLIP, FSA and baselines).",
        epilog="Run 'rfclip COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"rfclip {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in SUBCOMMAND_MODULES:
        module = _load_module(name)
        if module is None:
            continue
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        for cmd in [c for c in subparsers.choices if c not in before]:
            sub = subparsers.choices[cmd]
            if sub.get_default("_run") is None:
                sub.set_defaults(_run=module.run)
            try:  # `rfclip segment ... --debug` works as well as `rfclip --debug segment ...`
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show the full traceback of an error")
            except argparse.ArgumentError:  # the module defines its own --debug
                pass
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (it may be replaced after set-up)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    """rfclip's notes and warnings (e.g. how an image or a checkpoint was read) as ``rfclip: <message>`` lines on
    stderr; ``--quiet`` keeps only errors."""
    logger = logging.getLogger("rfclip")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("rfclip: %(message)s"))
        logger.addHandler(handler)
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.setLevel(logging.WARNING)


def _error(message: str) -> None:
    message = " ".join(str(message).split())  # always one line
    print(f"rfclip: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rfclip`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("RFCLIP_DEBUG"))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = debug or getattr(args, "debug", False)
        _setup_logging(quiet=bool(getattr(args, "quiet", False)))
        run = getattr(args, "_run", None)
        if run is None:
            parser.print_help(sys.stderr)
            return 2
        return int(run(args) or 0)
    except SystemExit as exc:  # argparse (--help, --version, usage errors)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except RfclipError as err:
        if debug:
            raise
        _error(err)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; SIGTERM too where a command turns it into one (rfclip.jobs.Terminated)
        if debug:
            raise
        print("rfclip: interrupted", file=sys.stderr)
        return getattr(exc, "exit_status", 130)
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        if type(err).__name__ == "OutOfMemoryError":
            _error(f"out of GPU memory ({str(err).splitlines()[0] if str(err) else 'CUDA OOM'}); "
                   "use a smaller --batch-size (crops per forward pass) or --device cpu")
            return 2
        detail = str(err).splitlines()[0] if str(err) else ""
        _error(f"unexpected {type(err).__name__}{': ' + detail if detail else ''} "
               "(rerun with --debug for the traceback, and please report it)")
        return 1
