#!/usr/bin/env python
"""Measure ``magi serve`` as a Ray Serve application (``magi.serve.ray_app``) on a local Ray cluster
started here, with ``--replicas`` CPU worker replicas over a PostgreSQL job store:

- replica start: two one-chunk jobs are queued, then the application is deployed; prints the time
  ``serve.run`` takes (Ray creates the placement groups and replicas) and, per replica, the time
  from the deploy call to its worker's first claim (its worker process started and loaded the model);
- claim latency through the app: ``--jobs`` one-chunk jobs posted one after another to the HTTP
  ingress with the workers idle; prints the POST round trip and ``started_at - created_at``
  (the job row's insert to a worker's claim, on this machine's clock);
- failover: the replica running a long job is SIGKILLed after two chunks; prints the time from
  the kill to another replica's claim (the lease, ``--lease_s``, plus up to one poll) and to the
  first resumed chunk (plus the worker's resume: loading the saved state, one chunk's compute).

Defaults to the tiny checkpoint (written to a temporary folder) with 4 steps per chunk. The
database must be a throwaway one (the script adds jobs). Usage:
    python scripts/bench_ray.py --db postgresql://user@127.0.0.1:5432/magi_bench
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import ray
from ray import serve

from magi.serve.ray_app import APP_NAME, RayServeOptions, application
from magi.serve.store_pg import PgJobStore
from magi.tiny import make_tiny_checkpoint, tiny_config_dict

ONE_CHUNK = 24  # frames of one chunk of the tiny config


def _until(check: Callable[[], object], what: str, timeout: float = 600.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def _tiny_config(folder: Path) -> Path:
    ck = make_tiny_checkpoint(folder / "checkpoints", seed=0)
    os.environ["SPECIAL_TOKEN_PATH"] = str(ck / "special_tokens.npz")  # inherited by Ray's workers
    data = tiny_config_dict(ck)
    data["runtime_config"].update(num_steps=4, window_size=4)
    (folder / "config.json").write_text(json.dumps(data))
    return folder / "config.json"


def _params(frames: int, seed: int) -> dict:
    return {"mode": "t2v", "prompts": ["bench"], "seed": seed, "num_frames": frames, "size": None, "image": None,
            "prefix_video": None}  # fmt: skip


def bench_start(store: PgJobStore, options: RayServeOptions) -> None:
    jobs = [store.create(_params(ONE_CHUNK, i)).id for i in range(2)]
    t0 = time.time()
    serve.run(application(options), name=APP_NAME, route_prefix="/")
    deployed = time.time() - t0

    def started() -> list | None:
        rows = [store.get(j) for j in jobs]
        return rows if all(r.started_at for r in rows) else None

    rows = _until(started, "both claims")
    firsts = sorted(r.started_at - t0 for r in rows)
    who = {store.lease(j)[0] for j in jobs}
    print(f"replica start: serve.run {deployed:.1f} s; first claim per replica {', '.join(f'{t:.1f}' for t in firsts)} s "
          f"after the deploy call ({len(who)} distinct workers)")  # fmt: skip
    _until(lambda: all(store.get(j).ended for j in jobs), "the start jobs")


def bench_claim(store: PgJobStore, client: httpx.Client, n: int) -> None:
    posts, claims = [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post("/v1/videos", json={"prompt": "claim", "num_frames": ONE_CHUNK, "seed": i})
        posts.append(time.perf_counter() - t0)
        r.raise_for_status()
        job_id = r.json()["id"]
        job = _until(lambda: (j := store.get(job_id)).ended and j, "a claim job")  # noqa: B023 - called at once
        claims.append(job.started_at - job.created_at)
    posts.sort()
    claims.sort()
    print(f"through the app, {n} jobs, workers idle: POST median {1e3 * statistics.median(posts):.0f} ms, "
          f"max {1e3 * posts[-1]:.0f} ms; queued -> claimed median {1e3 * statistics.median(claims):.0f} ms, "
          f"p95 {1e3 * claims[int(0.95 * (n - 1))]:.0f} ms, max {1e3 * claims[-1]:.0f} ms")  # fmt: skip


def bench_failover(store: PgJobStore, client: httpx.Client, chunks: int, lease_s: float) -> None:
    r = client.post("/v1/videos", json={"prompt": "failover", "num_frames": chunks * ONE_CHUNK, "seed": 7})
    r.raise_for_status()
    job_id = r.json()["id"]
    _until(lambda: store.get(job_id).chunks_done >= 2, "two chunks")
    owner = store.lease(job_id)[0]
    stat = Path(f"/proc/{owner.split(':')[1]}/stat").read_text()
    replica = int(stat.rsplit(")", 1)[1].split()[1])  # the worker's parent: the replica actor
    done_at_kill = store.get(job_id).chunks_done
    t_kill = time.time()
    os.kill(replica, signal.SIGKILL)
    _until(lambda: store.lease(job_id)[0] not in (owner, None), "another claim")
    t_claim = time.time()
    _until(lambda: store.get(job_id).chunks_done > done_at_kill, "the first resumed chunk")
    t_chunk = time.time()
    job = _until(lambda: (j := store.get(job_id)).ended and j, "the resumed job")
    per_chunk = (job.last_chunk_at - job.first_chunk_at) / max(1, job.chunks_done - 1)
    print(f"failover (lease {lease_s:g} s): kill -> claimed by another replica {t_claim - t_kill:.2f} s, -> first "
          f"resumed chunk {t_chunk - t_kill:.2f} s; job {job.status}, attempts {job.attempts}; "
          f"one chunk ~{per_chunk:.2f} s")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="a throwaway PostgreSQL database (postgresql://...)")
    parser.add_argument("--config", help="the served config (default: the tiny checkpoint, 4 steps per chunk)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--lease_s", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=10, help="one-chunk jobs for the claim latency")
    parser.add_argument("--chunks", type=int, default=12, help="chunks of the failover job")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="magi-bench-ray-"))
    config = Path(args.config) if args.config else _tiny_config(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    ray.init(num_cpus=args.replicas + 2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"local Ray + Serve started in {time.time() - t0:.1f} s")
    store = PgJobStore(args.db)
    options = RayServeOptions(config=str(config), data_dir=str(tmp / "data"), db=args.db, replicas=args.replicas,
                              lease_s=args.lease_s, device="cpu")  # fmt: skip
    try:
        bench_start(store, options)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            bench_claim(store, client, args.jobs)
            bench_failover(store, client, args.chunks, args.lease_s)
    finally:
        store.close()
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
