"""SIGINT / SIGTERM: stop every child process, remove temp run directories, exit.

Raising KeyboardInterrupt is not enough here: papermill's client waits for a cell's reply in a
blocking zmq poll inside its event loop, and its clean-up on the way out re-enters that loop,
so an interrupted `vtrlab run` would hang until the cell finished (seen: a 60 s cell kept the
runner, and its kernel, alive after SIGTERM). The handler therefore does the clean-up itself —
kill the kernels (each in a session of its own, so a signal to our process group misses them),
stop grid job processes (each runs this same handler), remove the `.tmp-*` run directories
this process created — prints one line and exits with 128 + the signal number. Completed runs
are untouched: they were renamed into place before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_TEMP_DIRS: set[Path] = set()  # temp run dirs of runs in progress in this process
_STOPPERS: list[Callable[[float], None]] = []  # what clean_up stops: kernels, grid job processes
_LOCK = threading.Lock()


def track_temp_dir(path: Path) -> None:
    with _LOCK:
        _TEMP_DIRS.add(Path(path))


def untrack_temp_dir(path: Path) -> None:
    with _LOCK:
        _TEMP_DIRS.discard(Path(path))


def on_clean_up(stop: Callable[[float], None]) -> Callable[[float], None]:
    """Register ``stop(grace_s)`` to run on clean-up (kernels, job processes register themselves when
    their module is imported, so this module needs to import none of them)."""
    with _LOCK:
        if stop not in _STOPPERS:
            _STOPPERS.append(stop)
    return stop


def off_clean_up(stop: Callable[[float], None]) -> None:
    """Unregister ``stop`` (a grid back-end whose jobs have all finished)."""
    with _LOCK:
        if stop in _STOPPERS:
            _STOPPERS.remove(stop)


def clean_up(grace_s: float = 20.0) -> None:
    """Kill kernels, stop job processes, remove temp run dirs of this process (idempotent)."""
    with _LOCK:
        stoppers = list(_STOPPERS)
    for stop in stoppers:
        stop(grace_s)
    with _LOCK:
        dirs = list(_TEMP_DIRS)
        _TEMP_DIRS.clear()
    for tmp in dirs:
        shutil.rmtree(tmp, ignore_errors=True)


def _exit_on_signal(message: Callable[[int], str] | None) -> Callable:
    def handler(signum, frame):
        # a second signal while cleaning up must not interrupt the clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            clean_up()
            if message is not None:
                sys.stderr.write(message(signum) + "\n")
                sys.stderr.flush()
        finally:
            os._exit(128 + signum)

    return handler


@contextlib.contextmanager
def exit_cleanly_on_signals(message: Callable[[int], str] | None = None) -> Iterator[None]:
    """While inside: SIGINT/SIGTERM clean up (see module doc), print `message(signum)`, exit 128+signum.

    Only in the main thread (elsewhere Python cannot install handlers; then this does nothing).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _exit_on_signal(message)
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def describe(signum: int) -> str:
    return (
        f"error: interrupted by {signal.Signals(signum).name}; child processes stopped, "
        "temp run directories removed, completed runs kept"
    )
