"""The magi serve page in headless Chromium against the real server (uvicorn + worker, tiny model).

The page fills a prompt from ``?prompt=..`` (a load never submits it, even with ``autostart=1``;
the test clicks Submit), plays the chunks through MediaSource as the worker writes them (the video's currentTime advances before the job is done), and steers a running
job. Skips with a reason where Debian's chromium or playwright's Python driver is absent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the browser tests use httpx: pip install -e '.[test]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need playwright (pip install playwright; the driver only)"
)

from magi.serve.store import JobStore  # noqa: E402
from tests.helpers import REPO_ROOT as REPO, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
KEY = "browser-test-key"
# 20 chunks of 24 frames at 64x64: a few seconds of work on CPU, long enough that the first
# chunks play while the later ones are generated
NUM_FRAMES = 480
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real ``python -m magi.serve`` with its worker on the tiny model; yields (url, data_dir)."""
    root = tmp_path_factory.mktemp("serve_browser")
    ck = tiny_checkpoint
    write_tiny_config(root / "config.json", ck, num_steps=8, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(ck / "special_tokens.npz")}
    srv = LiveServer(root / "config.json", root / "data", "--device", "cpu", "--api_key", KEY, env=env, cwd=REPO,
                     key=KEY, log=root / "server.log", timeout=60)  # fmt: skip
    try:
        yield srv.url, srv.data
    finally:
        srv.stop(40)


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.add_init_script(f"localStorage.setItem('magi.apiKey', {KEY!r})")
        yield page
        browser.close()


def _open(page, url: str, prompt: str) -> str:
    page.goto(f"{url}/?prompt={quote(prompt)}&num_frames={NUM_FRAMES}&autostart=1")
    page.wait_for_timeout(1000)
    assert page.text_content("#job-id") == ""  # a page load never submits, even with autostart=1
    page.click("#submit")
    page.wait_for_function("document.getElementById('job-id').textContent.length > 0", timeout=20_000)
    return page.text_content("#job-id")


def _job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/videos/{job_id}", headers=_auth(), timeout=5).json()


def _wait_ended(page, url: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while (job := _job(url, job_id))["status"] not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, f"job not done in {timeout} s: {job}"
        time.sleep(0.2)
    page.wait_for_function(f"document.getElementById('status').textContent === {job['status']!r}", timeout=10_000)
    return job


def test_page_plays_chunks_while_generating(server, page, tmp_path: Path) -> None:
    url, _ = server
    job_id = _open(page, url, "a red fox runs through the snow")
    played_while_running = None
    deadline = time.time() + 90
    while played_while_running is None:
        current = page.evaluate("document.getElementById('player').currentTime")
        status = _job(url, job_id)["status"]  # read after currentTime: still running at that moment
        if current > 0:
            played_while_running = (current, status)
        elif status in ("completed", "failed", "cancelled"):
            played_while_running = (current, status)
        assert time.time() < deadline, "the video never started"
        time.sleep(0.05)
    assert played_while_running[0] > 0 and played_while_running[1] in ("queued", "in_progress"), played_while_running
    job = _wait_ended(page, url, job_id)
    assert job["status"] == "completed", job
    assert job["segments"] == job["chunks_total"] == NUM_FRAMES // 24
    page.wait_for_selector("#download:not([hidden])", timeout=10_000)
    assert page.text_content("#status") == "completed"
    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.is_file() and shot.stat().st_size > 0


def test_page_steers_a_running_job(server, page) -> None:
    url, data = server
    job_id = _open(page, url, "a red fox runs through the snow")
    page.wait_for_function("!document.getElementById('steer').disabled", timeout=20_000)
    page.fill("#steer-prompt", "a blue bird flies over the sea")
    page.fill("#steer-from", str(NUM_FRAMES // 24 - 1))  # the last chunk: not yet in the window
    page.click("#steer")
    page.wait_for_function("document.getElementById('steer-result').textContent.includes('accepted')", timeout=10_000)
    assert "a blue bird flies over the sea" in page.text_content("#steer-result")
    job = _wait_ended(page, url, job_id)
    assert job["status"] == "completed", job
    store = JobStore(data / "magi.db")
    try:
        edits = store.edits(job_id)
    finally:
        store.close()
    assert [(e["from_chunk"], e["prompt"]) for e in edits] == [(NUM_FRAMES // 24 - 1, "a blue bird flies over the sea")]
