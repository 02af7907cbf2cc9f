"""The job table of ``magi serve``: one SQLite file under the data folder.

The HTTP process and the worker process each open their own ``JobStore`` on the same file (WAL
journal, so readers never wait for the writer). Jobs run in ``seq`` order; a job left
``in_progress`` by a killed server is taken again first, and the worker resumes it from its saved
generation state. Steering edits are rows of their own, applied by the worker in ``id`` order.
Rows come back typed: ``Job`` and ``Edit`` (frozen dataclasses; ``job.status`` or ``job["status"]``).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
ENDED = ("completed", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    parent_id TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    first_chunk_at REAL,
    last_chunk_at REAL,
    finished_at REAL,
    chunks_done INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    steps_total INTEGER,
    frames_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    steer_from INTEGER
);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    from_chunk INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS edits_job ON edits (job_id, id);
"""

JOB_FIELDS = (
    "status",
    "started_at",
    "first_chunk_at",
    "last_chunk_at",
    "finished_at",
    "chunks_done",
    "chunks_total",
    "step",
    "steps_total",
    "frames_done",
    "error",
    "cancel_requested",
    "attempts",
    "steer_from",
)
ADDED_COLUMNS = {"steer_from": "INTEGER"}  # jobs columns newer than the first schema (added on open)


def new_id() -> str:
    """A fresh job id, as the OpenAI videos API spells them (``video_`` + hex)."""
    return "video_" + secrets.token_hex(12)


class QueueFull(Exception):
    """More jobs are waiting than the server admits (HTTP 429)."""


class _Fields:
    """Read access by column name too (``job["status"]``), for callers that treat rows as mappings."""

    def __getitem__(self, name: str) -> Any:
        if name not in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            raise KeyError(name)
        return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class Job(_Fields):
    """One row of the job table. ``params``: the validated request (mode, prompts, seed,
    num_frames, size [w, h], image / prefix_video file names), as the HTTP side wrote it."""

    seq: int
    id: str
    status: str
    params: dict[str, Any]
    parent_id: str | None
    created_at: float
    started_at: float | None
    first_chunk_at: float | None
    last_chunk_at: float | None
    finished_at: float | None
    chunks_done: int
    chunks_total: int | None
    step: int
    steps_total: int | None
    frames_done: int
    error: str | None
    cancel_requested: bool
    attempts: int
    steer_from: int | None = None  # first generated chunk a steering edit can still change (None: unknown)

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclasses.dataclass(frozen=True)
class Edit(_Fields):
    """A steering edit: from chunk ``from_chunk`` on, the job's prompt is ``prompt``."""

    id: int
    job_id: str
    from_chunk: int
    prompt: str
    created_at: float


class JobStore:
    """Jobs and steering edits in the SQLite file ``path`` (created with its tables if new).

    Safe to share between the threads of one process; open one per process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in have:  # a data folder made by an earlier magi
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- jobs -------------------------------------------------------------------------------
    def create(
        self, params: dict, *, max_queued: int | None = None, parent_id: str | None = None, job_id: str | None = None
    ) -> Job:
        """Queue a job; ``QueueFull`` when ``max_queued`` jobs are already waiting.

        ``job_id``: an id from ``new_id()`` whose folder the caller filled first (uploads), so the
        worker never sees the job without its input.
        """
        job_id = job_id or new_id()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if max_queued is not None:
                    (waiting,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
                    if waiting >= max_queued:
                        raise QueueFull(f"{waiting} jobs are queued already (the limit is {max_queued}); retry later")
                self._db.execute(
                    "INSERT INTO jobs (id, status, params, parent_id, created_at) VALUES (?, 'queued', ?, ?, ?)",
                    (job_id, json.dumps(params), parent_id, time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        job = self.get(job_id)
        assert job is not None  # just inserted
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, limit: int = 100, after: str | None = None, order: str = "desc") -> list[Job]:
        """Jobs newest first (``order="asc"``: oldest first), ``after`` a job id to page from."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        sql, args = "SELECT * FROM jobs", []
        if after is not None:
            sql += f" WHERE seq {op} (SELECT seq FROM jobs WHERE id = ?)"
            args.append(after)
        sql += f" ORDER BY seq {direction} LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_job(r) for r in rows]

    def delete(self, job_id: str) -> None:
        """Remove a job and its edits (its files are the caller's)."""
        with self._lock:
            self._db.execute("DELETE FROM edits WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def next_job(self) -> Job | None:
        """The job the worker runs next: one left in progress (a killed server), else the oldest queued."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE status IN ('in_progress', 'queued') ORDER BY status = 'queued', seq LIMIT 1"
            ).fetchone()
        return None if row is None else _job(row)

    def update(self, job_id: str, **fields: object) -> None:
        bad = set(fields) - set(JOB_FIELDS)
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}")
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def start(self, job_id: str, **fields: object) -> bool:
        """Mark a queued (or resumed) job ``in_progress`` with ``fields``; False when it has ended
        meanwhile (cancelled while the worker picked it), so the worker leaves it alone."""
        bad = set(fields) - set(JOB_FIELDS)
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        cols = "".join(f", {k} = ?" for k in fields)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET status = 'in_progress'{cols} WHERE id = ? AND status IN ('queued', 'in_progress')",
                (*fields.values(), job_id),
            )
        return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Mark a job to be cancelled: a queued one ends now, a running one at its next step."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (now, job_id),
            )
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'in_progress'", (job_id,))
        return self.get(job_id)

    def cancel_now(self, job_id: str) -> None:
        """End a job left ``in_progress`` with no worker to stop it as ``cancelled``."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? "
                "WHERE id = ? AND status = 'in_progress'",
                (time.time(), job_id),
            )

    def queue_position(self, job_id: str) -> int | None:
        """Jobs ahead of a queued one (0: it runs next), None when it is not queued."""
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return None
            (ahead,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE seq < ? AND status IN ('queued', 'in_progress')", (row["seq"],)
            ).fetchone()
        return ahead

    def expired(self, keep: int, max_age_s: float | None = None) -> list[str]:
        """Ended jobs beyond the newest ``keep`` ended ones, or that ended over ``max_age_s`` ago;
        never the parent of a job still waiting or running (it extends from its files)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, finished_at FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND id NOT IN "
                "(SELECT parent_id FROM jobs WHERE parent_id IS NOT NULL AND status IN ('queued', 'in_progress')) "
                "ORDER BY seq DESC"
            ).fetchall()
        now = time.time()
        return [
            r["id"]
            for i, r in enumerate(rows)
            if i >= keep or (max_age_s is not None and now - (r["finished_at"] or now) > max_age_s)
        ]

    def forget(self, job_id: str) -> None:
        """Remove a job's row and its steering edits (its files are the caller's)."""
        with self._lock:
            self._db.execute("DELETE FROM edits WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # ---- steering ---------------------------------------------------------------------------
    def add_edit(self, job_id: str, from_chunk: int, prompt: str) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO edits (job_id, from_chunk, prompt, created_at) VALUES (?, ?, ?, ?)",
                (job_id, int(from_chunk), prompt, time.time()),
            )
        return int(cur.lastrowid)

    def edits(self, job_id: str, after: int = 0) -> list[Edit]:
        """Steering edits of a job with id > ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM edits WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
            ).fetchall()
        return [Edit(**dict(r)) for r in rows]

    def move_edit(self, edit_id: int, from_chunk: int) -> None:
        """The worker applied an edit later than it was accepted for (the window moved on meanwhile)."""
        with self._lock:
            self._db.execute("UPDATE edits SET from_chunk = ? WHERE id = ?", (int(from_chunk), edit_id))


def _job(row: sqlite3.Row) -> Job:
    fields = dict(row)
    fields["params"] = json.loads(fields["params"])
    fields["cancel_requested"] = bool(fields["cancel_requested"])
    return Job(**fields)


class JobFiles:
    """Where a job's files live: ``{data_dir}/jobs/{id}/``.

    - ``input.<ext>``: the uploaded i2v image / v2v prefix video (name kept in params);
    - ``chunks/NNNNN.mp4``: segment k = the k-th generated chunk's frames, a fragmented mp4
      (MediaSource-ready), written atomically, numbered 0, 1, ... without gaps;
    - ``state.safetensors``: the generation state (resume after a kill, extend when finished);
    - ``video.mp4``: the whole video (an extend job: its parent's video + its own chunks), written
      when the job completes or is cancelled.
    """

    def __init__(self, data_dir: str | Path, job_id: str) -> None:
        self.dir = Path(data_dir) / "jobs" / job_id
        self.chunks = self.dir / "chunks"
        self.state = self.dir / "state.safetensors"
        self.video = self.dir / "video.mp4"

    def segment(self, k: int) -> Path:
        return self.chunks / f"{k:05d}.mp4"

    def segments(self) -> list[Path]:
        """The segments written so far, in order (stops at the first gap)."""
        found = []
        while self.segment(len(found)).is_file():
            found.append(self.segment(len(found)))
        return found
