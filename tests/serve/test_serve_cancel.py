"""A running job is cancelled promptly also before its first step, with its worker alive: the
worker watches the job's cancel flag while the run is set up and prepared (the prompts encoded),
and the run's Control, stopped there, ends it before any denoising step. In-process: the real
``Worker`` over a SQLite store and the tiny CPU pipeline, its prompt encoding held up."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from magi.pipeline import MagiPipeline
from magi.serve.store import JobStore
from magi.serve.worker import Worker
from tests.helpers import CHUNK


@pytest.fixture
def held(pipe: MagiPipeline, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(entered, release): the pipeline's prompt encoding (part of preparing a run) waits for release."""
    entered, release = threading.Event(), threading.Event()
    encode = pipe.prompts.encode

    def slow(prompts: list[str]) -> object:
        entered.set()
        assert release.wait(120)
        return encode(prompts)

    monkeypatch.setattr(pipe.prompts, "encode", slow)
    return entered, release


def test_a_cancel_while_the_job_prepares_ends_it_before_its_first_step(
    pipe: MagiPipeline, held: tuple[threading.Event, threading.Event], tmp_path: Path
) -> None:
    entered, release = held
    store = JobStore(tmp_path / "magi.db")
    try:
        job = store.create({"mode": "t2v", "prompts": ["held up while preparing"], "num_frames": 2 * CHUNK, "seed": 5})
        worker = Worker(pipe, store, tmp_path, poll_s=0.05)
        run = threading.Thread(target=worker.run_job, args=(store.next_job(),))
        run.start()
        assert entered.wait(120), "the run never started preparing"
        assert store.request_cancel(job.id).status == "in_progress"  # running: flagged, ended by its worker
        threading.Event().wait(0.5)  # the worker sees the flag within its poll (0.05 s) and stops the Control
        release.set()  # preparing ends; the stopped Control ends the run before its first step
        run.join(120)
        assert not run.is_alive()
        row = store.get(job.id)
        assert row.status == "cancelled" and row.step == 0 and row.chunks_done == 0, row
    finally:
        release.set()
        store.close()


def test_a_cancel_before_the_job_prepares_skips_the_model_work(
    pipe: MagiPipeline, held: tuple[threading.Event, threading.Event], tmp_path: Path
) -> None:
    entered, _ = held
    store = JobStore(tmp_path / "magi.db")
    try:
        job = store.create({"mode": "t2v", "prompts": ["never prepared"], "num_frames": CHUNK, "seed": 5})
        claimed = store.next_job()  # the worker read the queue ...
        store.update(job.id, status="in_progress")
        store.request_cancel(job.id)  # ... and the cancel came before it set the run up
        Worker(pipe, store, tmp_path, poll_s=0.05).run_job(claimed)
        row = store.get(job.id)
        assert row.status == "cancelled" and row.step == 0 and not entered.is_set(), row
    finally:
        store.close()
