"""``magi serve`` as a Ray Serve application: one stateless HTTP ingress and N worker replicas.

- ``Ingress``: the FastAPI app of ``magi.serve.app.create_app`` (the same routes, built on the
  replica from the options, not copied), reserving no CPU or GPU. Any number of them may run.
- ``Workers``: N replicas (``replicas``; or autoscaled between ``replicas`` and ``max_replicas``
  by the job queue's length, ``queue_policy``). Each reserves one GPU group with a placement group
  of one bundle per rank of the config's cp x pp world (``{"GPU": 1, "CPU": 1}`` on CUDA,
  ``{"CPU": 1}`` on CPU), STRICT_PACK (one node), and runs the existing worker process
  (``python -m magi.serve.worker``) as its child, supervised (restarted after a crash); with a
  world W > 1 that is a worker group of W ranks under torchrun (``magi.serve.ranks``), with
  CUDA_VISIBLE_DEVICES set to the GPUs of the W bundles (``group_gpus``).

The replicas share the job store (a ``postgresql://`` URL; a SQLite file only on one node, where
one replica works and the others wait on its lock) and the data folder. A replica that dies
mid-job leaves the job's lease to run out; another replica claims the job and resumes it from
its saved state. A replica stopped by Serve (scale-down, redeploy, shutdown) SIGTERMs its worker,
which saves the running job's state and releases it at once.

``serve run magi.serve.ray_app:build config=CONFIG.json data_dir=/shared/magi db=postgresql://...
replicas=2`` runs it on a cluster Ray already runs; ``magi serve --ray`` calls ``run_on_ray``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import ray
    from ray import serve
except ImportError as err:  # one line for the CLI; the extra is optional
    raise ImportError(f"Ray Serve is not installed ({err}); pip install 'magi[ray]'") from None

from magi.config import check_paths, load_config
from magi.serve.protocol import MAX_FRAMES, MAX_PIXELS, MAX_QUEUED, MAX_UPLOAD_BYTES
from magi.serve.worker import KEEP_JOBS, LEASE_S

log = logging.getLogger("magi.serve")

APP_NAME = "magi"
QUEUE_METRIC = "magi_jobs_waiting"  # jobs queued or running, as every worker replica reports it
STOP_TIMEOUT_S = 60.0  # a stopped replica's worker gets this long to save its job's state
DOWNSCALE_DELAY_S = 60.0  # autoscaling: fewer jobs must last this long before replicas go


@dataclass(frozen=True)
class RayServeOptions:
    """What the application serves and how it is spread; see ``magi serve --help`` for each."""

    config: str
    data_dir: str
    db: str | None = None
    replicas: int = 1
    max_replicas: int | None = None  # set: autoscale replicas..max_replicas by the queue's length
    lease_s: float = LEASE_S
    device: str | None = None  # None: cuda when the cluster has GPUs, else cpu
    api_key: str | None = None
    max_frames: int = MAX_FRAMES
    max_pixels: int = MAX_PIXELS
    max_queued: int = MAX_QUEUED
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    keep_jobs: int = KEEP_JOBS
    keep_days: float | None = None
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)


def world_size(config: str | Path) -> int:
    """The config's cp x pp world: the ranks (GPUs) one replica needs; ConfigError (a ValueError) when
    the config is invalid or its checkpoint paths are missing (here: on the deploying machine)."""
    cfg = load_config(config)
    check_paths(cfg)
    return cfg.engine.cp_size * cfg.engine.pp_size


def placement(world: int, gpu: bool) -> dict[str, Any]:
    """The worker deployment's resources: one bundle per rank on one node; the replica sits in the first."""
    bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
    return {
        "placement_group_bundles": [dict(bundle) for _ in range(world)],
        "placement_group_strategy": "STRICT_PACK",
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if gpu else 0},
    }


def queue_policy(ctx: Any) -> tuple[int, dict]:
    """Serve autoscaling policy: one replica per job queued or running (a worker runs one at a time).

    Every worker replica reports the same store-wide count, so the largest report is taken. Serve
    applies ``min_replicas`` / ``max_replicas`` and the up / down delays to what this returns.
    """
    reports = (ctx.aggregated_metrics or {}).get(QUEUE_METRIC) or {}
    if not reports:  # nothing reported yet (replicas starting): stay as is
        return ctx.target_num_replicas, {}
    return math.ceil(max(reports.values())), {}


def group_gpus(world: int) -> list[str]:
    """The GPUs of this replica's placement group, bundle by bundle (call it in the replica).

    Ray sets CUDA_VISIBLE_DEVICES only to the replica's own GPU (bundle 0). The GPU of each other
    bundle is reserved for the replica but given to no process: a probe task scheduled into that
    bundle, asking for its one GPU, reads which one Ray assigns there (a bundle's GPU stays the
    same for the placement group's life) and ends, leaving it reserved for the worker group.
    """
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    own = _bundle_gpus()  # the replica sits in bundle 0
    group = get_current_placement_group()
    if world == 1 or group is None:
        return own
    probe = ray.remote(num_cpus=0, num_gpus=1)(_bundle_gpus)
    refs = [probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)).remote()
            for i in range(1, world)]  # fmt: skip
    return own + [gpu for ids in ray.get(refs, timeout=120) for gpu in ids]


def _bundle_gpus() -> list[str]:
    """The GPUs Ray assigned to the calling task or actor."""
    return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


class _WorkerProcess:
    """The worker replica's child process (a worker group of ``world`` ranks): the existing
    worker loop, supervised."""

    def __init__(
        self, options: RayServeOptions, device: str, world: int = 1, env: dict[str, str] | None = None
    ) -> None:
        from magi.serve.supervisor import Supervisor  # restarts a crashed worker, SIGTERMs it on stop

        self.options = options
        cmd = [sys.executable, "-m", "magi.serve.worker", "--config", options.config, "--data_dir", options.data_dir,
               "--device", device, "--lease_s", str(options.lease_s), "--keep_jobs", str(options.keep_jobs)]  # fmt: skip
        if options.db:
            cmd += ["--db", options.db]
        if options.keep_days:
            cmd += ["--keep_days", str(options.keep_days)]
        # Popen runs in the supervisor's own thread: the child's die-with-parent signal fires when
        # that thread ends, and it lives as long as the child, unlike the replica's calling thread
        self.supervisor = Supervisor(cmd, world=world, env=env)
        self.supervisor.start()
        self._store: Any = None
        self._store_lock = threading.Lock()

    def pid(self) -> int | None:
        return self.supervisor.pid()

    def alive(self) -> bool:
        return self.supervisor.alive()

    def jobs_waiting(self) -> int:
        """Jobs queued or running in the shared store."""
        from magi.serve.store_pg import open_store

        with self._store_lock:
            if self._store is None:
                self._store = open_store(self.options.db, self.options.data_dir)
            jobs = self._store.list(limit=self.options.max_queued + 1000, order="desc")
        return sum(job.status in ("queued", "in_progress") for job in jobs)

    def stop(self) -> None:
        self.supervisor.stop(timeout=STOP_TIMEOUT_S - 5)
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None


@serve.deployment(graceful_shutdown_timeout_s=STOP_TIMEOUT_S, health_check_period_s=5.0)
class Workers:
    """One worker replica: owns its placement group's devices and runs one worker process in them."""

    def __init__(self, options: dict) -> None:
        opts = RayServeOptions(**options)
        world = world_size(opts.config)
        gpu_ids = ray.get_gpu_ids()
        device = opts.device or ("cuda" if gpu_ids else "cpu")
        env = None
        if gpu_ids and device.startswith("cuda"):  # every rank's GPU, not only the replica's own
            env = {"CUDA_VISIBLE_DEVICES": ",".join(group_gpus(world))}
        self.worker = _WorkerProcess(opts, device, world, env)

    def worker_pid(self) -> int | None:
        """The worker process's pid (its name in the store's ``claimed_by`` is host:pid:random); for a
        worker group, the launcher's (``claimed_by`` names rank 0, the launcher's child)."""
        return self.worker.pid()

    def check_health(self) -> None:
        if not self.worker.alive():
            raise RuntimeError("the worker process exited (see the replica's log); Serve replaces this replica")

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {QUEUE_METRIC: float(self.worker.jobs_waiting())}

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            self.worker = None
            worker.stop()  # SIGTERM: the running job's state is saved and its lease released


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API: ``create_app``'s FastAPI app over the shared store; no model, no devices."""

    def __init__(self, options: dict, workers: Any) -> None:
        self.options = RayServeOptions(**options)
        self.workers = workers  # binding the worker deployment here makes it part of the application

    def __serve_build_asgi_app__(self) -> Any:
        from magi.serve.app import create_app

        o = self.options
        return create_app(o.config, o.data_dir, api_key=o.api_key, max_frames=o.max_frames, max_pixels=o.max_pixels,
                          max_queued=o.max_queued, max_upload_bytes=o.max_upload_bytes, db=o.db,
                          bound_host=o.bound_host, allowed_hosts=list(o.allowed_hosts))  # fmt: skip


def check(options: RayServeOptions) -> int:
    """ValueError (one line) for what the application cannot serve; the world size otherwise (the
    ranks of each replica's worker group, one bundle each)."""
    world = world_size(options.config)
    if world > 1 and options.device is not None and ":" in options.device:
        raise ValueError(f"device {options.device}: the config's cp_size x pp_size is {world}, one GPU per rank; use "
                         "device cuda (Ray assigns each replica's GPUs)")  # fmt: skip
    if options.replicas < 1 or (options.max_replicas is not None and options.max_replicas < options.replicas):
        raise ValueError(f"replicas must be >= 1 and max_replicas >= replicas, got {options.replicas} and "
                         f"{options.max_replicas}")  # fmt: skip
    return world


def application(options: RayServeOptions, *, gpu: bool | None = None) -> Any:
    """The bound Ray Serve application (pass it to ``serve.run``).

    Args:
        options: what to serve; ``config`` and ``data_dir`` must be reachable on every node.
        gpu: reserve GPUs for the workers (default: when ``options.device`` is not cpu and, if
            Ray is running, the cluster has GPUs).
    """
    world = check(options)
    if gpu is None:
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        gpu = (options.device or "cuda").startswith("cuda") and has_gpus
    scale: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        scale = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": options.replicas, "max_replicas": options.max_replicas,
            "initial_replicas": options.replicas, "upscale_delay_s": 0.0, "downscale_delay_s": DOWNSCALE_DELAY_S,
            # jobs queue for seconds, not milliseconds; metrics_interval_s is deprecated in Ray 2.60 (a
            # warning; env variables are to replace it) but still honoured, and it is per deployment
            "metrics_interval_s": 2.0, "look_back_period_s": 4.0,
            "policy": {"policy_function": f"{__name__}:queue_policy"}}}  # fmt: skip
    opts = asdict(options)
    workers = Workers.options(**placement(world, gpu), **scale).bind(opts)
    return Ingress.bind(opts, workers)


def build(args: Mapping[str, str]) -> Any:
    """``serve run magi.serve.ray_app:build config=... data_dir=... [db=... replicas=N max_replicas=M
    lease_s=S device=cpu]``; the API key comes from the environment's MAGI_API_KEY."""
    known = {"config", "data_dir", "db", "replicas", "max_replicas", "lease_s", "device", "keep_jobs", "keep_days"}
    unknown = sorted(set(args) - known)
    if unknown or "config" not in args or "data_dir" not in args:
        raise ValueError(f"serve run magi.serve.ray_app:build takes config=... data_dir=... and optionally "
                         f"{', '.join(sorted(known - {'config', 'data_dir'}))}; got {sorted(args)}")  # fmt: skip
    types = {"replicas": int, "max_replicas": int, "lease_s": float, "keep_jobs": int, "keep_days": float}
    values = {k: types.get(k, str)(v) for k, v in args.items()}
    return application(RayServeOptions(**values, api_key=os.environ.get("MAGI_API_KEY") or None))


def run_on_ray(
    options: RayServeOptions,
    address: str | None,
    host: str,
    port: int,
    stop: threading.Event,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Deploy the application on Ray (started here when ``address`` is None) with Serve's HTTP proxy
    on ``host:port``, until ``stop`` is set (``on_ready`` runs once it is deployed: the CLI installs
    its SIGINT / SIGTERM handlers there, after Ray's own); then delete it (each worker
    saves its running job) and shut down what was started here.

    Raises:
        ValueError: ``check`` refused the options. ConnectionError: the job store is unreachable.
    """
    from magi.serve.store_pg import open_store

    check(options)
    open_store(options.db, options.data_dir).close()  # an unreachable --db fails before Ray starts
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready()
        log.info("http://%s:%d/ on Ray (%s), %d worker replica(s)%s (data %s)", host, port, address or "local",
                 options.replicas, f" up to {options.max_replicas}" if options.max_replicas else "", options.data_dir)  # fmt: skip
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.delete(APP_NAME)  # the worker replicas SIGTERM their workers: states saved, leases released
        finally:
            if address is None:
                serve.shutdown()
            ray.shutdown()
