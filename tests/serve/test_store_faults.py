"""The store operations the worker's fault handling uses, on both stores (SQLite; PostgreSQL
where its server binaries are installed): ``start`` refuses a job cancelled meanwhile,
``cancel_now`` ends a job no worker will reach, ``expired`` / ``forget`` apply the retention rule
(never to the parent of a waiting extension)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from magi.serve.store_pg import open_store
from tests.serve.pg import pg_bin, postgres_server

needs_pg = pytest.mark.skipif(pg_bin() is None, reason="no PostgreSQL server binaries (apt-get install postgresql)")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg 3: pip install -e '.[postgres]'")
    if pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    url = None
    if request.param == "postgres":
        import psycopg

        server = request.getfixturevalue("pg_server")
        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        url = server.rsplit("/", 1)[0] + "/" + name
    s = open_store(url, tmp_path)
    yield s
    s.close()


def test_start_refuses_a_job_cancelled_meanwhile(store: object) -> None:
    job = store.create({"mode": "t2v"}).id
    store.request_cancel(job)
    assert store.start(job, attempts=1) is False
    got = store.get(job)
    assert got.status == "cancelled" and got.cancel_requested and got.attempts == 0
    other = store.create({"mode": "t2v"}).id
    assert store.start(other, attempts=1, started_at=5.0) is True
    assert (store.get(other).status, store.get(other).attempts) == ("in_progress", 1)
    store.cancel_now(other)
    assert store.get(other).status == "cancelled" and store.get(other).finished_at is not None


def test_expired_and_forget_apply_the_retention_rule(store: object) -> None:
    ids = [store.create({"mode": "t2v"}).id for _ in range(4)]
    for job_id in ids:
        store.update(job_id, status="completed", finished_at=time.time())
    store.update(ids[3], finished_at=time.time() - 10)
    child = store.create({"mode": "extend"}, parent_id=ids[0]).id
    store.add_edit(ids[1], 0, "a dog")
    assert store.expired(2) == [ids[1]]  # newest two ended: 3, 2; 0 is a waiting extension's parent
    assert store.expired(10, max_age_s=5) == [ids[3]]
    store.forget(ids[1])
    assert store.get(ids[1]) is None and store.edits(ids[1]) == [] and store.get(child) is not None


def test_steer_from_and_moved_edits(store: object) -> None:
    job = store.create({"mode": "t2v"}).id
    assert store.get(job).steer_from is None
    store.update(job, steer_from=3)
    edit = store.add_edit(job, 1, "a storm")
    store.move_edit(edit, 3)
    assert store.get(job).steer_from == 3 and [(e.from_chunk, e.prompt) for e in store.edits(job)] == [(3, "a storm")]
    assert store.start(job, attempts=1, steer_from=None) and store.get(job).steer_from is None  # a new attempt


def test_a_data_folder_of_an_earlier_magi_gets_the_new_column(store: object, tmp_path: Path) -> None:
    """Databases made before ``steer_from`` existed open, keep their jobs, and gain the column."""
    drop = "ALTER TABLE jobs DROP COLUMN steer_from"
    job = store.create({"mode": "t2v"}).id
    store._db.execute(drop)  # as an earlier magi left it
    url = getattr(store, "url", None)
    again = open_store(url, tmp_path)
    try:
        assert again.get(job).steer_from is None and again.get(job).status == "queued"
        again.update(job, steer_from=2)
        assert again.get(job).steer_from == 2
    finally:
        again.close()
