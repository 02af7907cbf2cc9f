"""magi serve as a Ray Serve application (``magi.serve.ray_app``) on a local Ray cluster the module
starts once (4 logical CPUs standing in for GPUs, no dashboard), over a real PostgreSQL and one
shared data folder, with 2 worker replicas on the tiny checkpoint and a 2 s lease:

- two jobs submitted through the HTTP ingress run at once on the two replicas (``claimed_by``
  differs), each replica in its own STRICT_PACK placement group;
- the replica running a long job is SIGKILLed mid-job: the other replica claims the job once the
  lease ran out, resumes it, and the video equals an uninterrupted run of the same request;
- a history of every job's ``claimed_by`` / attempts, polled all along, shows one claimant per
  attempt and no claim before the previous claimant's lease ran out;
- deleting the application (Serve stops the replicas) saves the running job and releases it;
- a cp_size=2 config deploys one replica whose placement group has 2 bundles and whose worker is
  a group of 2 ranks under torchrun (gloo): its job gives the frames of the 1-process replicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray Serve tests need ray: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need ray[serve]: pip install -e '.[ray]'")
psycopg = pytest.importorskip("psycopg", reason="the shared job store needs psycopg 3: pip install -e '.[postgres]'")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="decoding the videos needs imageio-ffmpeg")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")

from magi.serve.ray_app import APP_NAME, QUEUE_METRIC, RayServeOptions, application, check, placement, queue_policy  # noqa: E402
from magi.serve.store_pg import PgJobStore  # noqa: E402
from tests.helpers import CHUNK, decode_mp4, free_port, write_tiny_config  # noqa: E402
from tests.serve.pg import pg_bin, postgres_server  # noqa: E402

pytestmark = pytest.mark.ray

TIMEOUT = 300.0  # s for one step of the scenario on a loaded 2-core machine
LEASE_S = 2.0
LONG = 16  # chunks of the job that is killed mid-way
STOPPED = 48  # chunks of the job the application is deleted under (1152 frames: still running by then)


def _until(check: Callable[[], object], what: str) -> object:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    if pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint: Path) -> Iterator[int]:
    """A local Ray cluster with Serve's HTTP proxy on a free port (yielded); stopped at the end."""
    saved = os.environ.get("SPECIAL_TOKEN_PATH")
    os.environ["SPECIAL_TOKEN_PATH"] = str(tiny_checkpoint / "special_tokens.npz")  # inherited by the replicas
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("SPECIAL_TOKEN_PATH", None)
            else:
                os.environ["SPECIAL_TOKEN_PATH"] = saved


class History:
    """Polls every job's (claimed_by, attempts, lease_until) with the database's clock, in a thread."""

    def __init__(self, url: str) -> None:
        self.rows: dict[str, list[tuple[float, str | None, int, float | None]]] = {}
        self._stop = threading.Event()
        self._db = psycopg.connect(url, autocommit=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = self._db.execute("SELECT extract(epoch from clock_timestamp())").fetchone()[0]
            for job_id, who, attempts, until in self._db.execute(
                "SELECT id, claimed_by, attempts, lease_until FROM jobs"
            ).fetchall():
                seen = self.rows.setdefault(job_id, [])
                if not seen or seen[-1][1:3] != (who, attempts) or seen[-1][3] != until:
                    seen.append((float(now), who, attempts, until))

    def claims(self, job_id: str) -> list[tuple[float, str, int, float | None]]:
        """The job's claims in order: (first seen at, claimant, attempts then, its last lease end)."""
        out: list = []
        for at, who, attempts, until in self.rows.get(job_id, []):
            if who is None:
                continue
            if out and out[-1][1] == who:
                out[-1] = (out[-1][0], who, attempts, until)
            else:
                out.append((at, who, attempts, until))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._db.close()


@pytest.fixture(scope="module")
def deployed(pg_url: str, cluster: int, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("ray")
    config = write_tiny_config(root / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    data = root / "shared"
    opts = RayServeOptions(config=str(config), data_dir=str(data), db=pg_url, replicas=2, lease_s=LEASE_S, device="cpu")
    serve.run(application(opts), name=APP_NAME, route_prefix="/")
    store, history = PgJobStore(pg_url), History(pg_url)
    client = httpx.Client(base_url=f"http://127.0.0.1:{cluster}", timeout=60)
    try:
        yield SimpleNamespace(data=data, store=store, history=history, client=client, jobs={})
    finally:
        client.close()
        history.close()
        store.close()
        serve.delete(APP_NAME)


def _submit(client: httpx.Client, **body: object) -> str:
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_two_jobs_at_once_run_on_the_two_replicas(deployed: SimpleNamespace) -> None:
    d = deployed
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert len(groups) == 2 and all(g["strategy"] == "STRICT_PACK" for g in groups), groups
    assert all(list(g["bundles"].values()) == [{"CPU": 1.0}] for g in groups), groups
    long = _submit(d.client, prompt="a long walk", num_frames=LONG * CHUNK, seed=21)
    _until(lambda: d.store.get(long).chunks_done >= 1, "the long job's first chunk")
    short = _submit(d.client, prompt="a short hop", num_frames=2 * CHUNK, seed=3)
    _until(lambda: d.store.get(short).status == "completed", "the short job")
    assert d.store.get(long).status == "in_progress", "the long job ended before the short one: lengthen it"
    first, second = d.store.lease(long)[0], d.store.lease(short)[0]
    assert first.split(":")[1] != second.split(":")[1], (first, second)  # two worker processes ...
    assert _ppid(int(first.split(":")[1])) != _ppid(int(second.split(":")[1]))  # ... of two replicas
    d.jobs.update(long=long, first=first, second=second, short=short)


def test_a_killed_replica_s_job_resumes_on_the_other_to_the_same_frames(deployed: SimpleNamespace) -> None:
    d = deployed
    if "long" not in d.jobs:
        pytest.skip("needs the jobs of test_two_jobs_at_once_run_on_the_two_replicas")
    long, first, second = d.jobs["long"], d.jobs["first"], d.jobs["second"]
    assert d.store.get(long).status == "in_progress", "the long job ended before its replica could be killed"
    os.kill(_ppid(int(first.split(":")[1])), signal.SIGKILL)  # the replica actor; its worker dies with it
    _until(lambda: d.store.lease(long)[0] != first, "another worker to claim the job")
    assert d.store.lease(long)[0] == second, "the job was not resumed by the surviving replica's worker"
    done = _until(lambda: (j := d.store.get(long)).ended and j, "the resumed job to finish")
    assert done.status == "completed" and done.attempts == 2, done
    again = _submit(d.client, prompt="a long walk", num_frames=LONG * CHUNK, seed=21)  # uninterrupted
    assert _until(lambda: (j := d.store.get(again)).ended and j, "the same request again").status == "completed"
    resumed = decode_mp4(d.data / "jobs" / long / "video.mp4")
    assert len(resumed) == LONG * CHUNK
    assert torch.equal(resumed, decode_mp4(d.data / "jobs" / again / "video.mp4"))


def test_no_job_ever_had_two_claimants_at_once(deployed: SimpleNamespace) -> None:
    d = deployed
    if "long" not in d.jobs:
        pytest.skip("needs the jobs of the tests above")
    time.sleep(0.2)  # one more poll of the history
    for job_id in d.history.rows:
        claims = d.history.claims(job_id)
        assert [attempts for _, _, attempts, _ in claims] == list(range(1, len(claims) + 1)), claims
        for before, after in zip(claims, claims[1:]):
            assert after[0] >= before[3], f"{job_id} claimed by {after[1]} before {before[1]}'s lease ran out"
    claims = d.history.claims(d.jobs["long"])
    assert [who for _, who, _, _ in claims] == [d.jobs["first"], d.jobs["second"]], claims


def test_deleting_the_application_saves_and_releases_the_running_job(deployed: SimpleNamespace) -> None:
    d = deployed
    job = _submit(d.client, prompt="interrupted", num_frames=STOPPED * CHUNK, seed=5)
    _until(lambda: d.store.get(job).chunks_done >= 1, "the job's first chunk")
    serve.delete(APP_NAME)  # Serve stops every replica; each SIGTERMs its worker
    row = d.store.get(job)
    assert row.status == "in_progress" and row.chunks_done < STOPPED, row
    assert d.store.lease(job) == (None, None)  # released: claimable at once, no lease to wait for
    assert (d.data / "jobs" / job / "state.safetensors").is_file()


def test_queue_policy_asks_one_replica_per_waiting_job() -> None:
    ctx = SimpleNamespace(aggregated_metrics={QUEUE_METRIC: {"r1": 3.0, "r2": 2.0}}, target_num_replicas=1)
    assert queue_policy(ctx) == (3, {})
    assert queue_policy(SimpleNamespace(aggregated_metrics={}, target_num_replicas=2)) == (2, {})


def test_placement_and_the_world_size_check(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gpu = placement(2, gpu=True)
    assert gpu["placement_group_bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert gpu["placement_group_strategy"] == "STRICT_PACK" and gpu["ray_actor_options"]["num_gpus"] == 1
    config = write_tiny_config(tmp_path / "c.json", tiny_checkpoint)
    assert check(RayServeOptions(config=str(config), data_dir=str(tmp_path))) == 1
    with pytest.raises(ValueError, match="no DiT weights"):
        raw = json.loads(config.read_text())
        raw["runtime_config"]["load"] = str(tmp_path / "nowhere")
        (tmp_path / "gone.json").write_text(json.dumps(raw))
        check(RayServeOptions(config=str(tmp_path / "gone.json"), data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="replicas"):
        check(RayServeOptions(config=str(config), data_dir=str(tmp_path), replicas=2, max_replicas=1))
    cp2 = _cp2_config(config, tmp_path / "cp2.json")
    assert check(RayServeOptions(config=str(cp2), data_dir=str(tmp_path))) == 2  # one bundle per rank
    assert placement(2, gpu=False)["placement_group_bundles"] == [{"CPU": 1}] * 2
    with pytest.raises(ValueError, match="one GPU per rank"):
        check(RayServeOptions(config=str(cp2), data_dir=str(tmp_path), device="cuda:1"))


def _cp2_config(config: Path, path: Path) -> Path:
    raw = json.loads(config.read_text())
    raw["engine_config"].update(cp_size=2, cp_strategy="cp_ulysses", distributed_backend="gloo")
    path.write_text(json.dumps(raw))
    return path


def test_magi_serve_ray_joins_the_cluster_resumes_the_saved_job_and_stops_on_sigint(
    cluster: int, deployed: SimpleNamespace, pg_url: str, tmp_path: Path
) -> None:
    d = deployed
    saved = [j for j in d.history.rows if d.store.get(j).status == "in_progress"]
    assert len(saved) == 1, "needs the job test_deleting_the_application_saves_... left"
    config = d.data.parent / "config.json"
    cmd = [sys.executable, "-m", "magi.serve", "--ray", "auto", "--replicas", "1", "--config", str(config),
           "--data_dir", str(d.data), "--db", pg_url, "--lease_s", str(LEASE_S), "--device", "cpu",
           "--port", str(cluster)]  # fmt: skip
    log = tmp_path / "cli.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        done = _until(lambda: (j := d.store.get(saved[0])).ended and j, "the saved job to be resumed")
        assert done.status == "completed" and done.chunks_done == STOPPED, done
        new = _submit(d.client, prompt="through the CLI", num_frames=CHUNK, seed=8)
        assert _until(lambda: (j := d.store.get(new)).ended and j, "a new job").status == "completed"
        # the CLI logs its ready line once serve.run returned, which may come after the replicas
        # (already up) have finished both jobs
        _until(lambda: "on Ray (auto), 1 worker replica(s)" in log.read_text(), "the CLI's ready line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:  # a failed step above: still stop it as a user would, then for good
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if APP_NAME in serve.status().applications and sys.exc_info()[0] is not None:
            serve.delete(APP_NAME)  # so that the next test does not fail for this one's reason
    assert APP_NAME not in serve.status().applications  # deleted on the way out; the cluster stays


def test_autoscaling_adds_a_replica_for_a_second_waiting_job(deployed: SimpleNamespace, pg_url: str) -> None:
    d = deployed
    assert APP_NAME not in serve.status().applications, "needs the application of the tests above deleted"
    for job in d.store.list(limit=100):  # the earlier tests' jobs out of the count
        if not job.ended:
            d.store.update(job.id, status="cancelled")
    config = d.data.parent / "config.json"
    opts = RayServeOptions(config=str(config), data_dir=str(d.data), db=pg_url, replicas=1, max_replicas=2,
                           lease_s=LEASE_S, device="cpu")  # fmt: skip
    serve.run(application(opts), name=APP_NAME, route_prefix="/")
    assert serve.status().applications[APP_NAME].deployments["Workers"].replica_states == {"RUNNING": 1}
    jobs = [_submit(d.client, prompt="busy", num_frames=3 * LONG * CHUNK, seed=i) for i in range(2)]
    # the one replica runs one job; the other waits until the queue's length brings a second replica
    _until(lambda: all(d.store.lease(j)[0] for j in jobs), "both jobs claimed")
    first, second = (d.store.lease(j)[0] for j in jobs)
    assert _ppid(int(first.split(":")[1])) != _ppid(int(second.split(":")[1])), (first, second)
    assert serve.status().applications[APP_NAME].deployments["Workers"].replica_states == {"RUNNING": 2}
    serve.delete(APP_NAME)


def test_a_cp2_replica_runs_its_worker_group_in_its_two_bundles(deployed: SimpleNamespace, pg_url: str) -> None:
    d = deployed
    if "short" not in d.jobs:
        pytest.skip("needs the short job of test_two_jobs_at_once_run_on_the_two_replicas")
    assert APP_NAME not in serve.status().applications, "needs the application of the tests above deleted"
    config = _cp2_config(d.data.parent / "config.json", d.data.parent / "cp2.json")
    opts = RayServeOptions(config=str(config), data_dir=str(d.data), db=pg_url, replicas=1, lease_s=LEASE_S,
                           device="cpu")  # fmt: skip
    serve.run(application(opts), name=APP_NAME, route_prefix="/")
    try:
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 1 and list(groups[0]["bundles"].values()) == [{"CPU": 1.0}] * 2, groups
        job = _submit(d.client, prompt="a short hop", num_frames=2 * CHUNK, seed=3)  # the short job again
        done = _until(lambda: (j := d.store.get(job)).ended and j, "the job on the two ranks")
        assert done.status == "completed", done
        rank0 = int(d.store.lease(job)[0].split(":")[1])  # the claimant: rank 0, under torchrun's launcher
        launcher = _ppid(rank0)
        assert b"magi.serve.ranks" in Path(f"/proc/{launcher}/cmdline").read_bytes()
        # the Ray replicas' workers run one intra-op thread (Ray sets OMP_NUM_THREADS to the actor's
        # 1 CPU), as each rank does: the two ranks compute the same frames, bit for bit
        short = d.data / "jobs" / d.jobs["short"] / "video.mp4"
        assert torch.equal(decode_mp4(d.data / "jobs" / job / "video.mp4"), decode_mp4(short))
    finally:
        serve.delete(APP_NAME)
