#!/usr/bin/env python
"""Measure the PostgreSQL job store (``magi serve --db postgresql://...``): job claim latency and
the failover time of a job whose worker stopped renewing its lease.

- claim: ``--jobs`` queued jobs drained by ``--workers`` stores (one connection each, one thread
  each) at once; prints the median / p95 / max of one ``claim`` call and checks that no job was
  claimed twice.
- failover: worker A claims a job with a lease of ``--lease_s`` and dies (stops renewing); worker B
  polls ``claim`` every ``--poll_s`` s, as the serve worker does; prints the time from A's claim to
  B's (lease + up to one poll), and from the lease's end to B's claim.

The database must exist and be empty of magi tables or hold only throwaway jobs (the script adds
jobs). Usage:
    python scripts/bench_pg_store.py --db postgresql://user@127.0.0.1:5432/magi_bench
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from magi.serve.store_pg import PgJobStore


def bench_claim(url: str, jobs: int, workers: int) -> None:
    stores = [PgJobStore(url) for _ in range(workers)]
    for i in range(jobs):
        stores[0].create({"bench": i})
    times: list[float] = []
    taken: list[str] = []
    lock, barrier = threading.Lock(), threading.Barrier(workers)

    def drain(i: int) -> None:
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            job = stores[i].claim(f"bench{i}", 60)
            dt = time.perf_counter() - t0
            if job is None:
                return
            stores[i].update(job.id, status="completed", finished_at=time.time())
            with lock:
                times.append(dt)
                taken.append(job.id)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.sort()
    dup = len(taken) - len(set(taken))
    print(
        f"claim: {len(taken)} jobs, {workers} workers: median {1e3 * statistics.median(times):.2f} ms, "
        f"p95 {1e3 * times[int(0.95 * (len(times) - 1))]:.2f} ms, max {1e3 * times[-1]:.2f} ms; "
        f"claimed twice: {dup}"
    )
    for s in stores:
        s.close()


def bench_failover(url: str, lease_s: float, poll_s: float) -> None:
    a, b = PgJobStore(url), PgJobStore(url)
    while b.claim("drain", 60) is not None:  # leftovers from other runs out of the way
        pass
    job = a.create({"bench": "failover"})
    t0 = time.perf_counter()
    assert a.claim("A", lease_s).id == job.id  # ... and A dies here: no renew
    while (got := b.claim("B", lease_s)) is None:
        time.sleep(poll_s)
    dt = time.perf_counter() - t0
    assert got.id == job.id, f"B claimed {got.id} ({got.params}), not the failover job"
    print(
        f"failover: lease {lease_s:g} s, poll {poll_s:g} s: B claimed the job {dt:.3f} s after A's claim "
        f"({dt - lease_s:.3f} s after the lease ran out)"
    )
    b.update(job.id, status="completed", finished_at=time.time())  # not claimable by a later run
    a.close()
    b.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, help="postgresql://... (a throwaway database)")
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lease_s", type=float, default=2.0)
    p.add_argument("--poll_s", type=float, default=0.2, help="the worker's idle poll (magi.serve.worker: 0.2)")
    args = p.parse_args()
    bench_claim(args.db, args.jobs, 1)
    bench_claim(args.db, args.jobs, args.workers)
    bench_failover(args.db, args.lease_s, args.poll_s)


if __name__ == "__main__":
    main()
