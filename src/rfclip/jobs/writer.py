"""A background writer: the model's thread hands each image's writes to one thread and goes on with the next batch.

The queue is bounded (the model never runs far ahead of the disk); the first error stops the writer, drops what is
queued, and is raised in the model's thread at its next :meth:`submit` or at :meth:`close`. :meth:`abort` (on
Ctrl-C / SIGTERM) drops the queue and waits for the write in progress, which completes or removes its temporary
files, so an interrupted run leaves only whole files.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


class BackgroundWriter:
    def __init__(self, depth: int = 8, threaded: bool = True):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._dropping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rfclip-writer", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
            if self._dropping.is_set():
                continue
            fn, args = task
            try:
                fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the model's thread
                self._error = err
                self._dropping.set()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` in the writer thread (in this thread when not threaded); raises an earlier write's error."""
        self._raise()
        if self._thread is None:
            fn(*args)
            return
        while True:
            try:
                self._queue.put((fn, args), timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait for every queued write; raise the first error."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Drop the queued writes and wait for the one in progress (no error raised)."""
        self._dropping.set()
        if self._thread is not None and self._thread.is_alive():
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(_STOP)
            self._thread.join()
        self._error = None
