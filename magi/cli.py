"""What every entry point (``magi.infer``, the serve worker, a user's script) does around a run
and the library does not: turn stop signals into ``Control.stop`` and show the library's log.

- ``stop_on_signals(control)``: the first SIGINT / SIGTERM / SIGHUP stops the run after the
  current step, keeping the chunks done (as docker stop, timeout and Slurm expect); a second one
  aborts at once (``KeyboardInterrupt``). The run's ``GenerationResult.exit_status`` is then
  128 + the signal's number.
- ``show_log()``: the ``magi`` loggers' warnings (and, with ``verbose``, their info lines) on
  stderr, one line each, as ``warning: ...``.
- ``return_freed_memory()``: glibc's malloc gives large freed blocks back to the OS at once
  instead of keeping them in its heap (a process-wide setting, so the process's owner decides).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from magi.generation import STOP_SIGNALS, Control

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 128 * 2**10  # glibc's own starting value, held fixed (return_freed_memory)
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@contextmanager
def stop_on_signals(control: Control, announce: bool = True) -> Iterator[Control]:
    """Within the block, the first stop signal calls ``control.stop(signum)``; a second one
    raises ``KeyboardInterrupt``. Only the main thread can own signals: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield control
        return

    def handler(signum: int, frame: object) -> None:
        if control.stopping:
            raise KeyboardInterrupt
        control.stop(signum)
        if announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(
                f"\n{name}: stopping after the current step and keeping the chunks done so far "
                "(send it again to abort)",
                file=sys.stderr,
                flush=True,
            )

    signums = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield control
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class _Lines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def show_log(verbose: bool = False) -> None:
    """Show the library's log lines on stderr (warnings; info too when ``verbose``), once."""
    log = logging.getLogger("magi")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_Lines())
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def return_freed_memory() -> bool:
    """Hold glibc's mmap threshold at its default 128 KiB: freed tensors go back to the OS.

    glibc serves a block of at least the threshold with its own mmap and unmaps it when freed,
    but each free of such a block (up to 32 MiB) raises the threshold to that block's size and
    the heap's trim threshold to twice it. After the first large tensors of a run are freed,
    nearly every tensor comes from the heap, which keeps what is freed (fragmented, up to the
    trim threshold at its top): the resident set of a long generation then wanders by 100 MB and
    more with the heap's layout (docs/PERFORMANCE.md §4.3). Setting the threshold explicitly
    turns that adaptation off (mallopt(3)). The cost: a page fault per 4 KiB of a large tensor
    when it is made, since its memory comes fresh from the OS.

    Returns whether it was set: not with another C library, nor when the user chose the
    threshold already (``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.mmap_threshold`` in
    ``GLIBC_TUNABLES``).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        logger.debug("the mmap threshold is the user's (environment): left as it is")
        return False
    done = ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    logger.debug("glibc mmap threshold held at %d bytes: %s", MMAP_THRESHOLD, done)
    return done
