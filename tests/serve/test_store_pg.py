"""The PostgreSQL job store against a real PostgreSQL server the tests start (Debian's binaries):
the same behaviour as the SQLite store, claims that never hand one job to two workers, and leases
that, once run out, let another worker take the job."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg 3: pip install -e '.[postgres]'")

from magi.serve.store import JobStore, QueueFull  # noqa: E402
from magi.serve.store_pg import PgJobStore, open_store  # noqa: E402
from tests.serve.pg import pg_bin, postgres_server  # noqa: E402

needs_pg = pytest.mark.skipif(pg_bin() is None, reason="no PostgreSQL server binaries (apt-get install postgresql)")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    if pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the test server."""
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return pg_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    s = open_store(url, tmp_path)
    assert isinstance(s, PgJobStore if url else JobStore)
    yield s
    s.close()


def test_create_get_list_update(store: object) -> None:
    jobs = [store.create({"mode": "t2v", "n": i}) for i in range(5)]
    assert [j.status for j in jobs] == ["queued"] * 5 and jobs[2].params == {"mode": "t2v", "n": 2}
    assert store.get(jobs[3].id) == jobs[3] and store.get("video_nope") is None
    assert [j.id for j in store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list(2, after=jobs[3].id)] == [jobs[2].id, jobs[1].id]
    assert [j.id for j in store.list(2, after=jobs[1].id, order="asc")] == [jobs[2].id, jobs[3].id]
    store.update(jobs[0].id, status="in_progress", step=3, steps_total=8, chunks_done=1, frames_done=24)
    got = store.get(jobs[0].id)
    assert (got.status, got.step, got.steps_total, got.chunks_done, got.frames_done) == ("in_progress", 3, 8, 1, 24)
    with pytest.raises(ValueError, match="unknown job fields"):
        store.update(jobs[0].id, nope=1)
    with pytest.raises(ValueError, match="unknown status"):
        store.update(jobs[0].id, status="done")
    assert store.queue_position(jobs[1].id) == 1 and store.queue_position(jobs[0].id) is None
    assert store.next_job().id == jobs[0].id  # the one left in progress comes first


def test_queue_limit_cancel_and_edits(store: object) -> None:
    a, b = store.create({"n": 0}), store.create({"n": 1}, parent_id="video_p")
    assert b.parent_id == "video_p"
    with pytest.raises(QueueFull, match="2 jobs are queued"):
        store.create({"n": 2}, max_queued=2)
    store.update(a.id, status="in_progress")
    assert store.request_cancel(b.id).status == "cancelled"
    running = store.request_cancel(a.id)
    assert running.status == "in_progress" and running.cancel_requested is True
    first = store.add_edit(a.id, 2, "a storm")
    second = store.add_edit(a.id, 4, "calm")
    assert [(e.from_chunk, e.prompt) for e in store.edits(a.id)] == [(2, "a storm"), (4, "calm")]
    assert [e.id for e in store.edits(a.id, after=first)] == [second] and store.edits(b.id) == []


@needs_pg
def test_two_stores_claiming_at_once_never_share_a_job(pg_url: str) -> None:
    stores = [PgJobStore(pg_url) for _ in range(3)]
    ids = {stores[0].create({"n": i}).id for i in range(40)}
    taken: list[list[str]] = [[] for _ in stores]
    start = threading.Barrier(len(stores))

    def drain(i: int) -> None:
        start.wait()
        while (job := stores[i].claim(f"w{i}", 60)) is not None:
            taken[i].append(job.id)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [j for got in taken for j in got]
    assert len(every) == len(set(every)) == 40 and set(every) == ids
    assert sum(1 for got in taken if got) >= 2, f"one store took every job: {[len(g) for g in taken]}"
    for i, got in enumerate(taken):
        assert all(stores[0].lease(j)[0] == f"w{i}" for j in got)
    for s in stores:
        s.close()


@needs_pg
def test_a_lapsed_lease_lets_another_worker_claim_the_job(pg_url: str) -> None:
    a, b = PgJobStore(pg_url), PgJobStore(pg_url)
    job = a.create({"n": 0})
    assert a.claim("wa", 1.0).id == job.id
    assert b.claim("wb", 1.0) is None  # leased: not claimable
    time.sleep(0.6)
    assert a.renew(job.id, "wa", 1.0)  # renewed: still a's after the first lease would have lapsed
    time.sleep(0.6)
    assert b.claim("wb", 1.0) is None
    time.sleep(1.0)
    again = b.claim("wb", 30.0)
    assert again.id == job.id and again.status == "in_progress" and b.lease(job.id)[0] == "wb"
    assert not a.renew(job.id, "wa", 1.0)  # a lost it: its renew says so
    b.release(job.id, "wb")  # a clean stop hands it back at once
    assert a.claim("wa", 5.0).id == job.id
    a.close()
    b.close()


def test_a_bad_url_is_one_line() -> None:
    with pytest.raises(ConnectionError, match="cannot connect to the job database") as err:
        PgJobStore("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert "\n" not in str(err.value) and len(str(err.value)) <= 200
