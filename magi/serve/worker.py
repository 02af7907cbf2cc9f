"""The worker of ``magi serve``: loads the pipeline once and runs the queued jobs one at a time.

``python -m magi.serve.worker --config CONFIG --data_dir DIR [--device D]``, started by the HTTP
process (``magi.serve.__main__``), which it never talks to directly: jobs, progress, steering
edits and cancel requests go through the SQLite store (``magi.serve.store``), videos through the
job folders (``JobFiles``). With ``--db postgresql://...`` (``magi.serve.store_pg``) many workers,
on many nodes sharing the data folder, take jobs from one table: each claims its job with a lease
that a heartbeat thread renews; a job whose worker died is claimed again once its lease runs out
and resumed from its saved state by another worker.

Each job runs with a generation state saved after every chunk and every chunk kept as its own
segment, so a server killed at any moment resumes the job from its last state at the next start,
to the same frames as an uninterrupted run (``MagiPipeline.resume``). SIGTERM stops the job after
the current step, saves its state and exits 0 (the job stays ``in_progress``). The worker ends
when its parent process does, or the server named by MAGI_SERVE_PID.

Under torchrun (a config with cp_size x pp_size > 1, started by ``magi.serve.ranks``) rank 0 runs
the ``Worker`` and every other rank a ``Follower``: rank 0 alone talks to the store and writes the
files, and hands each job and each step's steering edits to the others (``RankGroup``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from magi.serve.ranks import RankGroup, die_with_parent, pid_gone, server_pid

if TYPE_CHECKING:
    from magi.generation import Control
    from magi.serve.store import Edit, Job, JobFiles, JobStore
    from magi.state import GenerationState

MAX_ATTEMPTS = 3  # runs of one job the worker starts before it calls the job failed
LEASE_S = 30.0  # a shared (PostgreSQL) store: a dead worker's job is claimable again this long after
KEEP_JOBS = 1000  # ended jobs kept (rows and files) by default; older ones are removed
MAX_BACKOFF_S = 30.0  # the longest wait after a job hit an unwritable or full data folder
_ABSOLUTE_DIRS = re.compile(r"(?<![\w.~])/(?:[^\s/'\"]+/)+")  # /srv/data/jobs/ in /srv/data/jobs/x.mp4


class _Shutdown:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type's name when it has none)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def server_paths_hidden(message: str) -> str:
    """``message`` with the folders of absolute paths left out (a job's error is shown to clients)."""
    return _ABSOLUTE_DIRS.sub("", message)


def write_status(data_dir: Path, **status: object) -> None:
    """Replace ``{data_dir}/worker.json`` atomically."""
    path = data_dir / "worker.json"
    tmp = data_dir / f".worker.json.{os.getpid()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), **status}))
    os.replace(tmp, path)


class Worker:
    """Runs jobs from ``store`` with ``pipe``, one at a time, in queue order."""

    def __init__(self, pipe: object, store: JobStore, data_dir: Path, *, parent: int | None = None,
                 poll_s: float = 0.2, lease_s: float | None = None, model: str | None = None,
                 keep_jobs: int = KEEP_JOBS, keep_days: float | None = None, ranks: RankGroup | None = None) -> None:
        """``lease_s``: claim jobs with leases of that many s (a store with ``claim``: PostgreSQL).
        ``ranks``: rank 0 of a worker group (each job and its edits go to the other ranks)."""
        self.pipe, self.store, self.data_dir = pipe, store, Path(data_dir)
        self.parent, self.poll_s, self.lease_s = parent, poll_s, lease_s
        self.ranks, self.server = ranks, server_pid()
        self.task_sent = False  # (a worker group) this poll's job went to the other ranks
        self.shutdown = _Shutdown()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.lost = threading.Event()  # the running job's lease was lost: stop it, it is another's now
        self.model = model
        self.keep_jobs, self.keep_days = keep_jobs, keep_days
        self.fault: str | None = None  # a storage problem the last job hit (shown by /health)
        self.backoff_s = 0.0

    def _orphaned(self) -> bool:
        return orphaned(self.parent, self.server)

    def _stopping(self) -> bool:
        """SIGTERM / SIGINT here (or, in a worker group, on any rank: the group stops together)."""
        return self.shutdown.requested if self.ranks is None else self.ranks.any(self.shutdown.requested)

    def serve_forever(self) -> int:
        """Take jobs until SIGTERM / SIGINT or the parent's death; returns the exit status."""
        signal.signal(signal.SIGTERM, self.shutdown)
        signal.signal(signal.SIGINT, self.shutdown)
        self.prune()
        while not self._stopping():
            if self._orphaned():
                return 1
            job = self.store.claim(self.name, self.lease_s) if self.lease_s else self.store.next_job()
            self.task_sent = False
            if job is not None:
                self.run_job(job)
            if self.ranks is not None and not self.task_sent:
                self.ranks.share(None)  # no generation this time: the other ranks poll again
            if job is None:
                time.sleep(self.poll_s)
                continue
            with contextlib.suppress(OSError):
                self.prune()
        return 0

    def refuse_forever(self, message: str) -> int:
        """Without a model: fail every job queued (now or later) with ``message``, until stopped."""
        signal.signal(signal.SIGTERM, self.shutdown)
        signal.signal(signal.SIGINT, self.shutdown)
        while not self.shutdown.requested and not self._orphaned():
            job = self.store.next_job()
            if job is None:
                time.sleep(self.poll_s)
                continue
            self._fail(job.id, message)
        return 0

    # ---- one job --------------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        from magi.serve.store import JobFiles

        job_id = job.id
        files = JobFiles(self.data_dir, job_id)
        try:
            files.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # the data folder is unwritable or full: fail this job, back off, go on
            return self._storage_fault(job_id, f"cannot create the job's folder ({one_line(err)}); make --data_dir "
                                               "and its jobs folder writable by the server, with free space")
        if self.fault is not None:
            self.fault, self.backoff_s = None, 0.0
            write_status(self.data_dir, status="ready", error=None, model=self.model)
        attempts = job.attempts + 1
        if not self.store.start(job_id, attempts=attempts, started_at=job.started_at or time.time(), steer_from=None):
            return None  # cancelled between the queue read and now: it stays cancelled
        _event(f"job {job_id} started" + (f" (attempt {attempts})" if attempts > 1 else ""))
        if job.cancel_requested:
            return self._end(job, files, "cancelled")
        if attempts > MAX_ATTEMPTS:
            return self._fail(job_id, f"the worker stopped {MAX_ATTEMPTS} times while running this job "
                                      "(killed, or out of memory); not trying again")
        from magi.generation import Control

        control, why = Control(), []
        try:
            with self._heartbeat(job_id), self._cancel_watch(job_id, control, why):
                stopped = self._generate(job, files, control, why)
        except Exception as err:  # a bad request, a full disk, ...: this job fails, the server goes on
            if self.task_sent:  # the other ranks may wait in a collective: the group ends (and restarts)
                raise
            print(f"magi serve: job {job_id} failed: {one_line(err)}", file=sys.stderr, flush=True)
            return self._fail(job_id, one_line(err))
        if stopped == "lost":
            return None  # another worker claimed it (our lease ran out) and goes on from the saved state
        if stopped == "shutdown":  # stays in_progress, resumed at the next start; not a failed attempt
            self.store.update(job_id, attempts=job.attempts)
            if self.lease_s:
                self.store.release(job_id, self.name)  # another worker may resume it at once
            return None
        return self._end(job, files, "cancelled" if stopped == "cancel" else "completed")

    def _generate(self, job: Job, files: JobFiles, control: Control, why: list[str]) -> str | None:
        """Run (or resume) the job into its segments and state under ``control`` (``why``: the
        reasons it was stopped for); how it stopped, None if it finished."""
        from magi.state import GenerationState

        job_id = job.id
        state = GenerationState.load(files.state) if files.state.is_file() else None
        done = [0 if state is None else state.meta["chunks_done"]]
        frames = [0 if state is None else state.meta["frames_done"]]
        if state is not None and state.meta.get("finished"):
            return None  # killed after the last chunk, before the job was marked done
        last_write, edits_seen = [0.0], [0]
        steer_from: list[int | None] = [None]

        def new_edits() -> list[Edit]:
            edits = self.store.edits(job_id, after=edits_seen[0])
            edits_seen[0] = edits[-1].id if edits else edits_seen[0]
            return edits

        def callback(info: object) -> None:
            if self._orphaned():
                os._exit(1)  # the server is gone; the last saved state is what a restart resumes
            now = time.time()
            fields: dict = {"step": info.step + 1, "steps_total": info.total_steps}
            if control.plan is not None:
                fields["chunks_total"] = len(control.plan.generated_chunks)
            opened = control.open_from(info, generated=True)  # HTTP's answer to an edit uses it
            if opened != steer_from[0]:
                fields["steer_from"] = steer_from[0] = opened
            if now - last_write[0] > 0.1 or info.finished is not None or "steer_from" in fields:
                self.store.update(job_id, **fields)
                last_write[0] = now
            if self.shutdown.requested:
                why.append("shutdown")
                control.stop()
            if self.lost.is_set():
                why.append("lost")
                control.stop()
            edits = new_edits()
            pairs = [(edit.from_chunk, edit.prompt) for edit in edits]
            steer(control, pairs if self.ranks is None else self.ranks.share(pairs))  # every rank, this step
            for edit in edits:
                if opened is not None and edit.from_chunk < opened:  # the window moved on since it was accepted
                    self.store.move_edit(edit.id, opened)

        def on_chunk(chunk: object) -> None:
            done[0] += 1
            frames[0] += len(chunk.frames)
            now = time.time()
            first = self.store.get(job_id).first_chunk_at or now
            self.store.update(job_id, chunks_done=done[0], frames_done=frames[0], first_chunk_at=first,
                              last_chunk_at=now)
            _event(f"job {job_id} chunk {done[0] - 1} ({frames[0]} frames)")

        # Edits made while the job waited (or before a restart) apply from the first step;
        # re-applying those a saved state already holds changes nothing.
        waiting = [(edit.from_chunk, edit.prompt) for edit in new_edits()]
        steer(control, waiting)
        if control.stopping or getattr(self.store.get(job_id), "cancel_requested", False):
            return "cancel"  # cancelled while the job was set up: no model work at all
        if self.ranks is not None:
            self.ranks.share((job, waiting))  # the other ranks start the same run
            self.task_sent = True
        result = run_request(self.pipe, self.data_dir, job, state, control, callback, on_chunk)
        self.store.update(job_id, chunks_total=result.chunks_total)
        if result.interrupted:
            return why[0] if why else "shutdown"
        return None

    @contextlib.contextmanager
    def _heartbeat(self, job_id: str) -> Iterator[None]:
        """Renew the job's lease every third of ``lease_s`` while the block runs (no-op without leases)."""
        self.lost.clear()
        if not self.lease_s:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    if not self.store.renew(job_id, self.name, self.lease_s):
                        self.lost.set()
                        return
                except Exception as err:  # the database is away: keep trying until the lease is gone
                    print(f"magi serve: cannot renew the lease of {job_id}: {one_line(err)}", file=sys.stderr)

        thread = threading.Thread(target=beat, name="magi-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    @contextlib.contextmanager
    def _cancel_watch(self, job_id: str, control: Control, why: list[str]) -> Iterator[None]:
        """Stop ``control`` as soon as the job's cancel is requested, looking every ``poll_s`` while
        the block runs: also while the run prepares (a stopped Control ends it before its first
        step), not only at the step boundaries."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(self.poll_s):
                try:
                    row = self.store.get(job_id)
                except Exception as err:  # the database is away for a moment: look again
                    print(f"magi serve: cannot read job {job_id}: {one_line(err)}", file=sys.stderr)
                    continue
                if row is not None and row.cancel_requested:
                    why.append("cancel")
                    control.stop()
                    return

        thread = threading.Thread(target=watch, name="magi-cancel-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _end(self, job: Job, files: JobFiles, status: str) -> None:
        """Join the segments into video.mp4 (an extension: after its parent's video); mark ``status``."""
        from magi.serve.store import JobFiles
        from magi.sinks import join_mp4

        parts = files.segments()
        if job.params.get("mode") == "extend" and job.parent_id:
            parts = [JobFiles(self.data_dir, job.parent_id).video, *parts]
        try:
            if parts:
                join_mp4(parts, files.video)
        except Exception as err:
            return self._fail(job.id, one_line(err))
        row = self.store.get(job.id)
        if status == "completed" and row is not None and row.cancel_requested:
            status = "cancelled"  # the cancel came after the last step: it is kept, and so is the video
        self.store.update(job.id, status=status, finished_at=time.time())
        _event(f"job {job.id} ended: {status}")
        return None

    def prune(self) -> None:
        """Remove the ended jobs the retention rule (``keep_jobs``, ``keep_days``) lets go, files first."""
        import shutil

        from magi.serve.store import JobFiles

        max_age = None if self.keep_days is None else self.keep_days * 86400.0
        for job_id in self.store.expired(self.keep_jobs, max_age):
            shutil.rmtree(JobFiles(self.data_dir, job_id).dir, ignore_errors=True)
            self.store.forget(job_id)

    def _fail(self, job_id: str, message: str) -> None:
        self.store.update(job_id, status="failed", error=server_paths_hidden(message), finished_at=time.time())
        _event(f"job {job_id} ended: failed")

    def _storage_fault(self, job_id: str, message: str) -> None:
        """Fail the job, show the problem in worker.json (/health: 503) and wait before the next job."""
        self._fail(job_id, message)
        self.fault = server_paths_hidden(message)
        self.backoff_s = min(MAX_BACKOFF_S, max(1.0, 2 * self.backoff_s))
        print(f"magi serve: job {job_id} failed: {self.fault}; next job in {self.backoff_s:g} s", file=sys.stderr,
              flush=True)
        with contextlib.suppress(OSError):
            write_status(self.data_dir, status="error", error=self.fault, model=self.model)
        deadline = time.monotonic() + self.backoff_s
        while time.monotonic() < deadline and not self.shutdown.requested:
            time.sleep(min(self.poll_s, self.backoff_s))


def steer(control: Control, edits: list[tuple[int, str]]) -> None:
    """Queue steering edits (generated chunk from, prompt) on ``control``; a stale one is dropped
    (the HTTP layer checked them; the same on every rank, so the ranks stay in step)."""
    for from_chunk, prompt in edits:
        with contextlib.suppress(ValueError):
            control.set_prompt(from_chunk, prompt, generated=True)


def pipe_for(pipe: object, params: dict) -> object:
    """``pipe``, or one sharing its models at the request's size."""
    rt = pipe.config.runtime
    width, height = params.get("size") or (rt.video_size_w, rt.video_size_h)
    if (width, height) == (rt.video_size_w, rt.video_size_h):
        return pipe
    return pipe.resized(width, height)  # shares the models and the prompt encodings


def run_request(pipe: object, data_dir: Path, job: Job, state: GenerationState | None, control: Control,
                callback: Callable[[object], None], on_chunk: Callable[[object], None] | None = None) -> object:  # fmt: skip
    """The job's pipeline call: resume its (unfinished) saved ``state``, extend its parent, or
    generate, into the job's segments and state file (saved after every chunk; jobs report their
    own progress). Every rank of a worker group makes this same call."""
    from magi.serve.store import JobFiles

    params, files = job.params, JobFiles(data_dir, job.id)
    common = dict(callback=callback, save_state=files.state, save_every=1, segments=files.chunks, control=control,
                  on_chunk=on_chunk, progress=False)  # fmt: skip
    pipe = pipe_for(pipe, params)
    if state is not None:
        return pipe.resume(state, None, **common)
    if params["mode"] == "extend":
        parent = JobFiles(data_dir, job.parent_id)
        return pipe.extend(parent.state, params["prompts"], params["num_frames"], None, seed=params.get("seed"),
                           **common)  # fmt: skip
    inputs = {}
    if params.get("image"):
        inputs["image_path"] = files.dir / params["image"]
    if params.get("prefix_video"):
        inputs["prefix_video_path"] = files.dir / params["prefix_video"]
    return pipe.generate(params["mode"], params["prompts"], seed=params.get("seed"), num_frames=params["num_frames"],
                         **inputs, **common)  # fmt: skip


def orphaned(parent: int | None, server: int | None) -> bool:
    """The process that started this one (``parent``) or the server (``server``) is gone."""
    return (parent is not None and os.getppid() != parent) or pid_gone(server)


class Follower:
    """A rank > 0 of a worker group: runs the generations rank 0 hands it, with the edits it
    hands it each step; never touches the store nor writes a file."""

    def __init__(self, pipe: object, ranks: RankGroup, data_dir: Path, parent: int | None) -> None:
        self.pipe, self.ranks, self.data_dir = pipe, ranks, Path(data_dir)
        self.parent, self.server = parent, server_pid()
        self.shutdown = _Shutdown()

    def serve_forever(self) -> int:
        """Follow rank 0 until the group stops (SIGTERM / SIGINT on any rank); the exit status."""
        signal.signal(signal.SIGTERM, self.shutdown)
        signal.signal(signal.SIGINT, self.shutdown)
        while not self.ranks.any(self.shutdown.requested):
            if orphaned(self.parent, self.server):
                return 1
            task = self.ranks.share()
            if task is not None:
                self.run(*task)
        return 0

    def run(self, job: Job, edits: list[tuple[int, str]]) -> None:
        from magi.generation import Control
        from magi.serve.store import JobFiles
        from magi.state import GenerationState

        files = JobFiles(self.data_dir, job.id)
        state = GenerationState.load(files.state) if files.state.is_file() else None  # rank 0 read it too
        control = Control()
        steer(control, edits)

        def callback(info: object) -> None:
            if orphaned(self.parent, self.server):
                os._exit(1)
            if self.shutdown.requested:
                control.stop()  # (taken by every rank at the same step)
            steer(control, self.ranks.share())

        run_request(self.pipe, self.data_dir, job, state, control, callback)


def _event(line: str) -> None:
    """One line per job event on the server's console (the worker shares its stderr)."""
    print(f"magi serve: {line}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magi.serve.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the official-format JSON config")
    parser.add_argument("--data_dir", required=True, help="the server's data folder (magi.db, jobs/)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--db", help="the job store: a postgresql:// URL (shared by many workers) or a SQLite "
                                     "file (default DATA_DIR/magi.db)")
    parser.add_argument("--lease_s", type=float, default=LEASE_S,
                        help=f"with a postgresql:// --db: the job lease in s (default {LEASE_S:g})")
    parser.add_argument("--keep_jobs", type=int, default=KEEP_JOBS, help="ended jobs kept (default %(default)s)")
    parser.add_argument("--keep_days", type=float, help="remove ended jobs older than this many days")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    die_with_parent()
    from magi.cli import return_freed_memory

    return_freed_memory()  # a long-lived worker's resident set then follows its live tensors (cli.py)
    parent = os.getppid()
    if os.environ.get("RANK", "0") not in ("", "0"):  # a worker group's rank > 0: no store, no files
        return _follow(args, parent)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    shared = bool(args.db) and args.db.startswith(("postgresql://", "postgres://"))
    if not shared:
        # One worker per data folder: a new one waits here until an old one (being killed) is gone.
        lock = open(data_dir / "worker.lock", "w")  # noqa: SIM115 - held for the process's life
        fcntl.flock(lock, fcntl.LOCK_EX)
    from magi.serve.store_pg import open_store

    store = open_store(args.db, data_dir)
    write_status(data_dir, status="loading", error=None, model=Path(args.config).stem)
    try:
        from magi.pipeline import MagiPipeline

        pipe = MagiPipeline.from_config(args.config, device=args.device)
    except Exception as err:  # reported by /health; restarting cannot help
        message = server_paths_hidden(one_line(err))
        write_status(data_dir, status="failed", error=message, model=Path(args.config).stem)
        print(f"magi serve worker: cannot load the model: {one_line(err)}", file=sys.stderr, flush=True)
        try:
            if shared:  # other workers may take the jobs this one cannot run
                return 0
            return Worker(None, store, data_dir, parent=parent).refuse_forever(f"the worker cannot load the model: "
                                                                               f"{message}")
        finally:
            store.close()
    ranks = RankGroup(pipe.mesh) if pipe.mesh is not None and pipe.mesh.is_distributed else None
    write_status(data_dir, status="ready", error=None, model=Path(args.config).stem)
    try:
        worker = Worker(pipe, store, data_dir, parent=parent, lease_s=args.lease_s if shared else None,
                        model=Path(args.config).stem, keep_jobs=args.keep_jobs, keep_days=args.keep_days, ranks=ranks)
        return worker.serve_forever() if ranks is None else _in_group(worker.serve_forever)
    finally:
        store.close()


def _follow(args: argparse.Namespace, parent: int) -> int:
    """Rank > 0 of a worker group: load the same pipeline and follow rank 0."""
    from magi.pipeline import MagiPipeline

    pipe = MagiPipeline.from_config(args.config, device=args.device)  # an error ends the whole group
    return _in_group(Follower(pipe, RankGroup(pipe.mesh), Path(args.data_dir), parent).serve_forever)


def _in_group(serve: Callable[[], int]) -> int:
    """Run a rank's loop so that an error on any rank ends every rank (torchrun then exits non-zero
    and the Supervisor restarts the group); after a clean stop the ranks leave the group together."""
    from magi.distributed import fail_fast, shutdown

    with fail_fast(exit_on_error=True):
        status = serve()
    if status == 0:
        shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
