"""What every entry point (``magi.infer``, the serve worker, a user's script) does around a run
and the library does not: turn stop signals into ``Control.stop`` and show the library's log.

- ``stop_on_signals(control)``: the first SIGINT / SIGTERM / SIGHUP stops the run after the
  current step, keeping the chunks done (as docker stop, timeout and Slurm expect); a second one
  aborts at once (``KeyboardInterrupt``). The run's ``GenerationResult.exit_status`` is then
  128 + the signal's number.
- ``show_log()``: the ``magi`` loggers' warnings (and, with ``verbose``, their info lines) on
  stderr, one line each, as ``warning: ...``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from magi.generation import STOP_SIGNALS, Control


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
