"""Steering a CLI run from a file: ``python -m magi.infer ... --steer FILE``.

FILE holds one JSON object a line, ``{"from_chunk": K, "prompt": "TEXT"}``, appended while the run
goes on (``echo '{"from_chunk": 5, "prompt": "it starts to rain"}' >> FILE``). A watcher thread
reads each new complete line and hands it to ``Control.set_prompt``, so the generated chunks >= K
(counted as --prompt_file counts them: 0 is the first chunk after a v2v prefix) that have not
entered the denoising window take TEXT (the rule: ``magi.generation.Control``). Lines already
in the file when the run starts apply from its first step; the file need not exist yet. A line
that is not such an object, or names a chunk outside the video, is reported on stderr as one line
and skipped: a typo never stops a long run (``check_file`` refuses one already there before the run
starts, naming its line). The last line needs no newline: it is read once it is a whole JSON
object (one still being written waits).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from magi.generation import Control
from magi.request import parse_steer_line

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25


def check_file(path: str | Path, chunks: int | None = None) -> None:
    """Check the complete lines a steer file holds already (before a run starts).

    chunks: the run's generated chunks, to refuse an edit beyond the video.

    Raises:
        ValueError: naming the file, the line and the problem.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    except OSError as err:
        raise ValueError(f"--steer {path}: cannot read it ({err.strerror or type(err).__name__})") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):  # the last line too, newline or not
        if not raw.strip():
            continue
        try:
            from_chunk, _ = parse_steer_line(raw)
        except ValueError as err:
            raise ValueError(f"--steer {path} line {number}: {err}") from None
        if chunks is not None and from_chunk >= chunks:
            raise ValueError(
                f"--steer {path} line {number}: from_chunk {from_chunk} is beyond the video "
                f"(generated chunks 0 .. {chunks - 1})"
            )


def _whole(raw: bytes) -> bool:
    """A line that is complete JSON (a line still being written is not, and waits)."""
    import json

    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


class SteerFile:
    """Watches ``path`` for new lines and steers ``control`` with them.

    Use as a context manager around the run (``start`` / ``close``); ``poll`` reads what is new
    once (the thread calls it every ``POLL_SECONDS``).
    """

    def __init__(self, path: str | Path, control: Control, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.control = control
        self.applied: list[tuple[int, str]] = []
        self._warn = warn or logger.warning
        self._offset = 0
        self._line = 0
        self._partial = b""
        self._took_partial = False  # the last line was taken before its newline came
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """Apply the complete lines added since the last poll."""
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self._offset:  # truncated or replaced: read it again from the start
                    self._warn(f"--steer {self.path}: the file got shorter; reading it again from the top")
                    self._offset, self._partial = 0, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as err:
            self._warn(f"--steer {self.path}: cannot read it ({err.strerror or err}); will retry")
            return
        self._offset += len(data)
        *lines, partial = (self._partial + data).split(b"\n")
        if self._took_partial and lines:  # that line has ended now: what followed it on the line
            rest = lines.pop(0)
            self._took_partial = False
            if rest.strip():
                self._take(rest)
        for raw in lines:
            self._line += 1
            self._take(raw)
        self._partial = partial
        if partial.strip() and _whole(partial):  # a last line without a newline
            self._line += 1
            self._take(partial)
            self._partial, self._took_partial = b"", True

    def _take(self, raw: bytes) -> None:
        if not raw.strip():
            return
        where = f"--steer {self.path} line {self._line}"
        try:
            from_chunk, text = parse_steer_line(raw)
            self.control.set_prompt(from_chunk, text, generated=True)
        except ValueError as err:
            self._warn(f"{where}: {err}; skipped")
            return
        self.applied.append((from_chunk, text))

    def start(self) -> SteerFile:
        self.poll()  # what is there before the run applies from its first step
        self._thread = threading.Thread(target=self._watch, name="magi-steer-file", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            self.poll()

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> SteerFile:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
