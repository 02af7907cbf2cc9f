"""Command line: ``python -m magi.serve --config CONFIG.json`` (also ``magi-serve``).

Checks the flags and the config (it loads and its checkpoint paths exist) before anything starts;
a problem is one ``error: ...`` line and exit status 2. Then it opens the store under
``--data_dir``, starts the one worker process (``python -m magi.serve.worker``, which loads the
model; a config with cp_size x pp_size > 1: a group of that many ranks under torchrun,
``magi.serve.ranks``) and supervises it (a non-zero exit restarts it after 1 s), and serves the
HTTP API with uvicorn. SIGINT / SIGTERM stop the server; the worker then gets SIGTERM (it saves
the running job's state; the job resumes at the next start) and up to 30 s to exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from magi.serve.guard import HEADER_TIMEOUT_S, http_protocol
from magi.serve.protocol import MAX_FRAMES, MAX_PIXELS, MAX_QUEUED, MAX_UPLOAD_BYTES
from magi.serve.supervisor import Supervisor
from magi.serve.worker import KEEP_JOBS, LEASE_S

MAX_CONNECTIONS = 200
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
MAX_HEADER_BYTES = 64 * 2**10  # request line + headers; larger is refused by h11


class UsageError(Exception):
    """A problem with the command line or the config; one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m magi.serve",
                description="Serve MAGI-1 over HTTP: a job queue, live chunk streaming, steering, a web page.",
                epilog="example: python -m magi.serve --config example/4.5B/4.5B_distill_config.json --port 8000")  # fmt: skip
    p.add_argument(
        "--config",
        "--config_file",
        dest="config",
        required=True,
        metavar="JSON",
        help="config in the official JSON format (the worker loads its model once)",
    )
    p.add_argument(
        "--data_dir",
        default="./magi-serve-data",
        metavar="DIR",
        help="the job database (magi.db) and the jobs' files (default ./magi-serve-data)",
    )
    p.add_argument("--db", default=None, metavar="URL",
                   help="the job store: postgresql://... (shared by workers on many nodes; pip install "
                        "'magi[postgres]') or a SQLite file (default DATA_DIR/magi.db)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api_key",
        default=os.environ.get("MAGI_API_KEY") or None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but the page (default env MAGI_API_KEY; "
        "on the command line it is visible in ps: prefer the env or --api_key_file)",
    )
    p.add_argument("--api_key_file", metavar="FILE", help="read the API key from the first line of FILE")
    p.add_argument(
        "--allowed_hosts",
        default="",
        metavar="NAMES",
        help="comma-separated host names the server answers besides localhost and its address "
        "(e.g. gpu-box.lan; '*': any). Other Host headers get 421 (DNS rebinding)",
    )
    p.add_argument(
        "--device", default=None, help="the worker's device: cpu, cuda or cuda:N (default cuda when available)"
    )
    p.add_argument("--max_frames", type=int, default=MAX_FRAMES, help=f"most frames per request (default {MAX_FRAMES})")
    p.add_argument(
        "--max_pixels", type=int, default=MAX_PIXELS, help=f"most width x height per request (default {MAX_PIXELS})"
    )
    p.add_argument(
        "--max_queued", type=int, default=MAX_QUEUED, help=f"most jobs waiting; more get 429 (default {MAX_QUEUED})"
    )
    p.add_argument(
        "--max_upload_mb",
        type=float,
        default=MAX_UPLOAD_BYTES / 2**20,
        help=f"largest image / prefix video upload in MB (default {MAX_UPLOAD_BYTES // 2**20})",
    )
    p.add_argument(
        "--keep_jobs",
        type=int,
        default=KEEP_JOBS,
        help=f"ended jobs kept with their videos; older ones are removed (default {KEEP_JOBS})",
    )
    p.add_argument(
        "--keep_days",
        type=float,
        default=None,
        metavar="DAYS",
        help="also remove ended jobs that ended more than DAYS ago (default: kept by --keep_jobs only)",
    )
    p.add_argument(
        "--max_connections",
        type=int,
        default=MAX_CONNECTIONS,
        help=f"most open connections; more get 503 at once, so slow clients cannot pile up (default {MAX_CONNECTIONS})",
    )
    p.add_argument("--header_timeout", type=float, default=HEADER_TIMEOUT_S, metavar="S",
                   help="close a connection whose request line and headers take longer than S seconds "
                        f"(slowloris; default {HEADER_TIMEOUT_S:g})")  # fmt: skip
    _add_scale_flags(p)
    p.add_argument("--no_worker", action="store_true", help=argparse.SUPPRESS)  # API tests: no model
    return p


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    """The flags of many workers: leases over a shared store, Ray Serve replicas."""
    p.add_argument("--lease_s", type=float, default=LEASE_S, metavar="S",
                   help=f"with a postgresql:// --db: a dead worker's job is claimable again after S s (default {LEASE_S:g})")  # fmt: skip
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run as a Ray Serve application: an HTTP ingress and --replicas worker replicas (pip install "
                        "'magi[ray]'); ADDRESS: 'auto', ray://host:port, or none to start a local Ray")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: worker replicas (default 1)")
    p.add_argument("--max_replicas", type=int, default=None, metavar="M",
                   help="with --ray: autoscale between --replicas and M replicas by the job queue's length")  # fmt: skip


def _check(args: argparse.Namespace) -> None:
    from magi.config import ConfigError, check_paths, load_config

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    for flag in ("max_frames", "max_pixels", "max_queued", "max_connections"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise UsageError(f"--replicas must be >= 1 and --max_replicas >= --replicas, got {args.replicas} and "
                         f"{args.max_replicas}")  # fmt: skip
    if not args.lease_s > 0:
        raise UsageError(f"--lease_s must be > 0, got {args.lease_s}")
    if args.ray is not None and (args.max_connections != MAX_CONNECTIONS or args.header_timeout != HEADER_TIMEOUT_S):
        raise UsageError("--max_connections / --header_timeout limit magi serve's own HTTP server; on --ray, Serve's "
                         "proxy takes the connections: set such limits in a reverse proxy (docs/SCALE.md)")  # fmt: skip
    if args.keep_jobs < 0:
        raise UsageError(f"--keep_jobs must be >= 0, got {args.keep_jobs}")
    if not args.header_timeout > 0:
        raise UsageError(f"--header_timeout must be > 0 seconds, got {args.header_timeout}")
    if args.keep_days is not None and not args.keep_days > 0:
        raise UsageError(f"--keep_days must be > 0, got {args.keep_days}")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max_upload_mb must be > 0, got {args.max_upload_mb}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    try:
        config = load_config(args.config)
        check_paths(config)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    args.world = config.engine.cp_size * config.engine.pp_size
    if args.world > 1 and args.device is not None and ":" in args.device:
        raise UsageError(f"--device {args.device}: the config's cp_size x pp_size is {args.world}, one GPU per rank; "
                         "use --device cuda (set CUDA_VISIBLE_DEVICES to choose the GPUs)")  # fmt: skip
    if args.ray in (None, "local"):  # joining a Ray cluster: its Serve proxy may already listen there
        _check_port(args.host, args.port)
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--api_key_file {args.api_key_file}: cannot read it ({err})") from None
        if not lines or not lines[0].strip():
            raise UsageError(f"--api_key_file {args.api_key_file}: its first line is empty; write the key there")
        args.api_key = lines[0].strip()
    data = Path(args.data_dir)
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--data_dir {data}: cannot create it ({err.strerror or type(err).__name__})") from None


def _check_port(host: str, port: int) -> None:
    """UsageError when ``host:port`` cannot be listened on (in use, or not this machine's address)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(infos[0][4])
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port} ({err.strerror or err}); is another server running "
                         "there? pick another --port") from None  # fmt: skip


def _app(args: argparse.Namespace) -> object:
    """The HTTP app over the store; a damaged database file is a UsageError naming it."""
    import sqlite3

    from magi.serve.app import create_app

    try:
        return create_app(args.config, args.data_dir, api_key=args.api_key, max_frames=args.max_frames,
                          max_pixels=args.max_pixels, max_queued=args.max_queued,
                          max_upload_bytes=int(args.max_upload_mb * 2**20), db=args.db, bound_host=args.host,
                          allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()])  # fmt: skip
    except (ConnectionError, ImportError) as err:  # --db: no server there, or no psycopg
        raise UsageError(str(err)) from None
    except sqlite3.DatabaseError as err:
        db = Path(args.data_dir) / "magi.db"
        raise UsageError(f"{db} is not a readable job database ({err}); move it away to start with an empty "
                         "queue, or restore it from a backup") from None  # fmt: skip


def _serve(app: object, args: argparse.Namespace) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
                print(f"magi serve: http://{args.host}:{port}/ (data {Path(args.data_dir).resolve()})", flush=True)

    # live routes (/stream, /events) never end on their own while a job runs: give them 2 s
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2,
                            limit_concurrency=args.max_connections, timeout_keep_alive=KEEP_ALIVE_S,
                            http=http_protocol(args.header_timeout),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)  # fmt: skip
    # uvicorn handles SIGINT / SIGTERM while it runs, then re-raises the signal to the handler it
    # found: make that a no-op, so the worker is still stopped cleanly (the default SIGTERM
    # handler would end this process at once and orphan the worker mid-save)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(config).run()  # returns once the server has stopped


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``--ray``: the same API as a Ray Serve application (``magi.serve.ray_app``) until SIGINT / SIGTERM."""
    try:
        from magi.serve import ray_app
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    options = ray_app.RayServeOptions(
        config=str(Path(args.config).resolve()), data_dir=str(Path(args.data_dir).resolve()), db=args.db,
        replicas=args.replicas, max_replicas=args.max_replicas, lease_s=args.lease_s, device=args.device,
        api_key=args.api_key, max_frames=args.max_frames, max_pixels=args.max_pixels, max_queued=args.max_queued,
        max_upload_bytes=int(args.max_upload_mb * 2**20), keep_jobs=args.keep_jobs, keep_days=args.keep_days,
        bound_host=args.host, allowed_hosts=hosts)  # fmt: skip
    try:
        stop = threading.Event()

        def on_ready() -> None:  # after ray.init and serve.run, which may install their own handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())

        ray_app.run_on_ray(options, None if args.ray == "local" else args.ray, args.host, args.port, stop, on_ready)
    except (ValueError, ConnectionError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _console_log() -> None:
    """One line per job event (queued, steered, ...) of the ``magi.serve`` logger on stderr."""
    log = logging.getLogger("magi.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("magi serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m magi.serve``; returns the exit status.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        os.umask(0o077)  # the data folder, the database and the videos: this user's only (0700 / 0600)
        _check(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _console_log()
    if any(a == "--api_key" or a.startswith("--api_key=") for a in argv):
        print("warning: --api_key on the command line is visible to every user in ps; use MAGI_API_KEY or "
              "--api_key_file", file=sys.stderr)  # fmt: skip
    if args.ray is not None:
        return _serve_on_ray(args)
    try:
        app = _app(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    supervisor = None
    if not args.no_worker:
        cmd = [sys.executable, "-m", "magi.serve.worker", "--config", args.config, "--data_dir", args.data_dir]
        if args.db:
            cmd += ["--db", args.db]
        if args.device:
            cmd += ["--device", args.device]
        cmd += ["--lease_s", str(args.lease_s), "--keep_jobs", str(args.keep_jobs)]
        cmd += ["--keep_days", str(args.keep_days)] if args.keep_days else []
        supervisor = Supervisor(cmd, world=args.world)  # world > 1: a torchrun worker group
        supervisor.start()
    try:
        _serve(app, args)
    finally:
        if supervisor is not None:
            supervisor.stop()
        app.state.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
