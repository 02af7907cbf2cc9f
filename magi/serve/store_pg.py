"""The job table of ``magi serve`` in PostgreSQL (psycopg 3): one database many workers share.

Same interface and rows as the SQLite ``JobStore`` (``magi.serve.store``), plus leases: a worker
takes a job with ``claim`` (``SELECT ... FOR UPDATE SKIP LOCKED``, so two workers never take the
same row), renews its lease while it runs (``renew``) and gives it up when it stops (``release``).
A job whose lease ran out (its worker or node died) is claimable again; the next worker resumes
it from the state saved in the job's folder, which every node mounts. Lease times are the
database server's clock, so the workers' clocks need not agree.

Install: ``pip install 'magi[postgres]'``; select it with ``magi serve --db postgresql://...``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

from magi.serve.store import ADDED_COLUMNS, JOB_FIELDS, STATUSES, Edit, Job, JobStore, QueueFull, new_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    parent_id TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    first_chunk_at DOUBLE PRECISION,
    last_chunk_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    chunks_done INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    steps_total INTEGER,
    frames_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    steer_from INTEGER
);
CREATE TABLE IF NOT EXISTS edits (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    from_chunk INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS edits_job ON edits (job_id, id);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (status, seq);
"""

_NOW = "extract(epoch from clock_timestamp())"  # the database's clock, in s (leases only)
_JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(Job))

# The oldest claimable job, locked for this transaction; rows another worker is claiming right now
# are skipped, not waited for. In-progress jobs with a lapsed lease (a dead worker) come first.
_CLAIM = f"""
UPDATE jobs SET status = 'in_progress', claimed_by = %(worker)s, lease_until = {_NOW} + %(lease)s
WHERE seq = (
    SELECT seq FROM jobs
    WHERE status = 'queued' OR (status = 'in_progress' AND (lease_until IS NULL OR lease_until < {_NOW}))
    ORDER BY status = 'queued', seq
    LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING *
"""


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ImportError("--db postgresql://... needs psycopg 3: pip install 'magi[postgres]'") from None
    return psycopg


class PgJobStore:
    """Jobs and steering edits in the PostgreSQL database at ``url`` (tables created if missing).

    Safe to share between the threads of one process (one connection, one lock); open one per process.
    """

    def __init__(self, url: str) -> None:
        psycopg = _import_psycopg()
        from psycopg.rows import dict_row

        self.url = url
        try:
            self._db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        except psycopg.OperationalError as err:
            first = " ".join(str(err).split())[:120]
            raise ConnectionError(f"cannot connect to the job database: {first}; check --db") from None
        self._lock = threading.Lock()
        with self._lock, self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(7461)")  # two first starts never race on CREATE
            self._db.execute(_SCHEMA)
            for name, kind in ADDED_COLUMNS.items():  # a database made by an earlier magi
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self, sql: str, args: Any = ()) -> list[dict]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _one(self, sql: str, args: Any = ()) -> dict | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    # ---- jobs -------------------------------------------------------------------------------
    def create(
        self, params: dict, *, max_queued: int | None = None, parent_id: str | None = None, job_id: str | None = None
    ) -> Job:
        """Queue a job; ``QueueFull`` when ``max_queued`` jobs are already waiting."""
        job_id = job_id or new_id()
        with self._lock, self._db.transaction():
            if max_queued is not None:
                self._db.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")  # the count stays true
                waiting = self._db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'").fetchone()["n"]
                if waiting >= max_queued:
                    raise QueueFull(f"{waiting} jobs are queued already (the limit is {max_queued}); retry later")
            row = self._db.execute(
                "INSERT INTO jobs (id, status, params, parent_id, created_at) "
                "VALUES (%s, 'queued', %s, %s, %s) RETURNING *",
                (job_id, json.dumps(params), parent_id, time.time()),
            ).fetchone()
        return _job(row)

    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return None if row is None else _job(row)

    def list(self, limit: int = 100, after: str | None = None, order: str = "desc") -> list[Job]:
        """Jobs newest first (``order="asc"``: oldest first), ``after`` a job id to page from."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        sql, args = "SELECT * FROM jobs", []
        if after is not None:
            sql += f" WHERE seq {op} (SELECT seq FROM jobs WHERE id = %s)"
            args.append(after)
        sql += f" ORDER BY seq {direction} LIMIT %s"
        args.append(limit)
        return [_job(r) for r in self._all(sql, args)]

    def next_job(self) -> Job | None:
        """The job a worker would claim next (read only; workers call ``claim``)."""
        row = self._one(
            f"SELECT * FROM jobs WHERE status = 'queued' OR (status = 'in_progress' AND "
            f"(lease_until IS NULL OR lease_until < {_NOW})) ORDER BY status = 'queued', seq LIMIT 1"
        )
        return None if row is None else _job(row)

    def update(self, job_id: str, **fields: object) -> None:
        bad = set(fields) - set(JOB_FIELDS)
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}")
        if "cancel_requested" in fields:
            fields["cancel_requested"] = bool(fields["cancel_requested"])
        if not fields:
            return
        cols = ", ".join(f"{k} = %s" for k in fields)
        self._all(f"UPDATE jobs SET {cols} WHERE id = %s RETURNING seq", (*fields.values(), job_id))

    def request_cancel(self, job_id: str) -> Job | None:
        """Mark a job to be cancelled: a queued one ends now, a running one at its next step."""
        with self._lock, self._db.transaction():
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', cancel_requested = TRUE, finished_at = %s "
                "WHERE id = %s AND status = 'queued'",
                (time.time(), job_id),
            )
            self._db.execute(
                "UPDATE jobs SET cancel_requested = TRUE WHERE id = %s AND status = 'in_progress'", (job_id,)
            )
        return self.get(job_id)

    def start(self, job_id: str, **fields: object) -> bool:
        """Mark a job ``in_progress`` with ``fields``; False when it has ended meanwhile (cancelled)."""
        bad = set(fields) - set(JOB_FIELDS)
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        cols = "".join(f", {k} = %s" for k in fields)
        row = self._one(
            f"UPDATE jobs SET status = 'in_progress'{cols} WHERE id = %s AND status IN "
            "('queued', 'in_progress') RETURNING seq",
            (*fields.values(), job_id),
        )
        return row is not None

    def cancel_now(self, job_id: str) -> None:
        """End a job left ``in_progress`` with no worker to stop it as ``cancelled``."""
        self._all(
            "UPDATE jobs SET status = 'cancelled', cancel_requested = TRUE, finished_at = %s "
            "WHERE id = %s AND status = 'in_progress' RETURNING seq",
            (time.time(), job_id),
        )

    def expired(self, keep: int, max_age_s: float | None = None) -> list[str]:
        """Ended jobs beyond the newest ``keep`` ended ones, or that ended over ``max_age_s`` ago;
        never the parent of a job still waiting or running."""
        rows = self._all(
            "SELECT id, finished_at FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') "
            "AND id NOT IN (SELECT parent_id FROM jobs WHERE parent_id IS NOT NULL AND status IN "
            "('queued', 'in_progress')) ORDER BY seq DESC"
        )
        now = time.time()
        return [
            r["id"]
            for i, r in enumerate(rows)
            if i >= keep or (max_age_s is not None and now - (r["finished_at"] or now) > max_age_s)
        ]

    def forget(self, job_id: str) -> None:
        """Remove a job's row and its steering edits (its files are the caller's)."""
        with self._lock, self._db.transaction():
            self._db.execute("DELETE FROM edits WHERE job_id = %s", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = %s", (job_id,))

    def queue_position(self, job_id: str) -> int | None:
        """Jobs ahead of a queued one (0: it runs next), None when it is not queued."""
        row = self._one("SELECT seq, status FROM jobs WHERE id = %s", (job_id,))
        if row is None or row["status"] != "queued":
            return None
        ahead = self._one(
            "SELECT COUNT(*) AS n FROM jobs WHERE seq < %s AND status IN ('queued', 'in_progress')", (row["seq"],)
        )
        return int(ahead["n"]) if ahead else 0

    # ---- leases -----------------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the next job for ``worker`` with a lease of ``lease_s`` s; None when none is free."""
        row = self._one(_CLAIM, {"worker": worker, "lease": float(lease_s)})
        return None if row is None else _job(row)

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend ``worker``'s lease on a job; False when the job is no longer its own (run out and taken)."""
        row = self._one(
            f"UPDATE jobs SET lease_until = {_NOW} + %s WHERE id = %s AND claimed_by = %s "
            "AND status = 'in_progress' RETURNING seq",
            (float(lease_s), job_id, worker),
        )
        return row is not None

    def release(self, job_id: str, worker: str) -> None:
        """Give a running job back at once (a worker stopping cleanly): the next claim resumes it."""
        self._all(
            "UPDATE jobs SET lease_until = NULL, claimed_by = NULL WHERE id = %s AND claimed_by = %s RETURNING seq",
            (job_id, worker),
        )

    def lease(self, job_id: str) -> tuple[str | None, float | None]:
        """(claimed_by, lease_until) of a job, lease_until on the database's clock."""
        row = self._one("SELECT claimed_by, lease_until FROM jobs WHERE id = %s", (job_id,))
        return (None, None) if row is None else (row["claimed_by"], row["lease_until"])

    # ---- steering ---------------------------------------------------------------------------
    def add_edit(self, job_id: str, from_chunk: int, prompt: str) -> int:
        row = self._one(
            "INSERT INTO edits (job_id, from_chunk, prompt, created_at) VALUES (%s, %s, %s, %s) RETURNING id",
            (job_id, int(from_chunk), prompt, time.time()),
        )
        assert row is not None
        return int(row["id"])

    def edits(self, job_id: str, after: int = 0) -> list[Edit]:
        """Steering edits of a job with id > ``after``, oldest first."""
        rows = self._all("SELECT * FROM edits WHERE job_id = %s AND id > %s ORDER BY id", (job_id, after))
        return [Edit(**r) for r in rows]

    def move_edit(self, edit_id: int, from_chunk: int) -> None:
        """The worker applied an edit later than it was accepted for (the window moved on meanwhile)."""
        self._all("UPDATE edits SET from_chunk = %s WHERE id = %s RETURNING id", (int(from_chunk), edit_id))


def _job(row: dict) -> Job:
    fields = {k: row[k] for k in _JOB_COLUMNS}
    fields["params"] = json.loads(fields["params"])
    fields["cancel_requested"] = bool(fields["cancel_requested"])
    return Job(**fields)


def open_store(db: str | Path | None, data_dir: str | Path) -> Any:
    """The job store ``db`` names: a ``postgresql://`` URL (``PgJobStore``, shared by many workers)
    or a SQLite file; None: the SQLite file ``{data_dir}/magi.db``."""
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        return PgJobStore(db)
    return JobStore(Path(db) if db else Path(data_dir) / "magi.db")
