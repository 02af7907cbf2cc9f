"""The worker process's keeper: ``magi serve`` and each Ray Serve worker replica run the worker
(``python -m magi.serve.worker``) under a :class:`Supervisor`, which restarts it after a crash and
stops it with SIGTERM (the worker then saves its running job's state) when asked."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 30.0

log = logging.getLogger("magi.serve")


class Supervisor:
    """Runs the worker process, restarting it after a crash (non-zero exit) until ``stop()``."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="magi-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                self._proc = subprocess.Popen(self.cmd)
            status = self._proc.wait()
            if status == 0 or self._stopping.is_set():
                return
            log.warning("the worker exited with status %d; restarting it in %g s", status, RESTART_DELAY_S)
            self._stopping.wait(RESTART_DELAY_S)

    def pid(self) -> int | None:
        """The running worker's pid (None between restarts)."""
        proc = self._proc
        return None if proc is None or proc.poll() is not None else proc.pid

    def alive(self) -> bool:
        """Whether it still runs or restarts the worker (False once it exited 0 or was stopped)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the worker (it saves its job's state) and wait up to ``timeout`` s, then kill it."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not exit within %g s; killing it", timeout)
                proc.kill()
                proc.wait()
        self._thread.join(timeout=5)
