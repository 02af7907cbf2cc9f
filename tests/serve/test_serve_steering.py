"""Steering you can see: POST /prompt answers the accepted edit (the chunk it applies from, and
why when moved), the video object carries the prompt timeline, /events announces each edit, a
queued job shows its planned chunks, and the server logs queued / steered lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests use httpx: pip install -e '.[test]'")

from magi.serve.protocol import prompt_timeline  # noqa: E402
from magi.serve.store import Edit, JobStore  # noqa: E402
from tests.helpers import decode_mp4  # noqa: E402
from tests.serve.live import running_server  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("steer")
    with running_server(root, tiny_checkpoint) as (url, data, _):
        store = JobStore(data / "magi.db")
        client = httpx.Client(base_url=url, timeout=20)
        yield client, store, root / "server.log"
        client.close()
        store.close()


def _edit(i: int, first: int, text: str) -> Edit:
    return Edit(id=i, job_id="j", from_chunk=first, prompt=text, created_at=0.0)


def test_prompt_timeline_spans() -> None:
    spans = prompt_timeline(["a", "b"], [_edit(1, 3, "c"), _edit(2, 1, "d"), _edit(3, 2, "e")], 5)
    assert [(s.prompt, s.from_chunk, s.to_chunk, s.edit_id) for s in spans] == [
        ("a", 0, 0, None),
        ("d", 1, 1, 2),
        ("e", 2, 4, 3),
    ]
    assert [(s.prompt, s.to_chunk) for s in prompt_timeline(["a"], [], None)] == [("a", None)]


def test_steering_is_answered_shown_and_announced(served) -> None:
    client, store, log = served
    job = client.post("/v1/videos", json={"prompts": ["a fox", "a cat"], "num_frames": 96}).json()
    assert job["chunks_total"] == 4 and job["status"] == "queued"  # planned, not "?"
    assert [(s["prompt"], s["from_chunk"], s["to_chunk"]) for s in job["prompt_timeline"]] == [
        ("a fox", 0, 0),
        ("a cat", 1, 3),
    ]
    queued = client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 0, "prompt": "a wolf"}).json()
    assert (queued["applies_from"], queued["moved"], queued["from_chunk"]) == (0, None, 0)
    # as the worker records it after a step: chunks 0..2 have entered the window
    store.update(job["id"], status="in_progress", started_at=time.time(), step=3, chunks_done=0, chunks_total=8,
                 steer_from=3)  # fmt: skip
    late = client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 1, "prompt": "a bear"}).json()
    window = 3  # the first chunk still open, exactly (not chunks_done + window_size = 4)
    assert late["from_chunk"] == 1 and late["applies_from"] == window and "window" in late["moved"]
    kept = client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 7, "prompt": "a hare"}).json()
    assert (kept["applies_from"], kept["moved"]) == (7, None)
    store.update(job["id"], step=20, chunks_done=5, steer_from=8)  # every chunk has entered
    r = client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 7, "prompt": "a mole"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "too_late"
    shown = client.get(f"/v1/videos/{job['id']}").json()
    assert [(s["prompt"], s["from_chunk"], s["to_chunk"], s["edit_id"]) for s in shown["prompt_timeline"]] == [
        ("a wolf", 0, 2, queued["edit_id"]),
        ("a bear", 3, 6, late["edit_id"]),
        ("a hare", 7, 7, kept["edit_id"]),
    ]
    store.update(job["id"], status="completed", finished_at=time.time())
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as events:
        text = "".join(events.iter_text()).replace("\r\n", "\n")
    steers = [
        json.loads(line[5:])
        for block in text.split("\n\n")
        if "event: steer" in block
        for line in block.splitlines()
        if line.startswith("data:")
    ]
    assert [(s["edit_id"], s["applies_from"], s["prompt"]) for s in steers] == [
        (queued["edit_id"], 0, "a wolf"),
        (late["edit_id"], window, "a bear"),
        (kept["edit_id"], 7, "a hare"),
    ]
    lines = log.read_text()
    assert f"magi serve: job {job['id']} queued: t2v, 96 frames" in lines
    assert f"magi serve: job {job['id']} steered: edit {late['edit_id']} from chunk {window} (chunks 1..2" in lines


def test_the_console_has_a_line_per_job_event(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with running_server(tmp_path, tiny_checkpoint, worker=True, num_steps=4, window_size=4) as (url, _, _):
        job = httpx.post(url + "/v1/videos", json={"prompts": ["a fox", "a cat"], "num_frames": 48}, timeout=20).json()
        r = httpx.post(f"{url}/v1/videos/{job['id']}/prompt", json={"from_chunk": 1, "prompt": "a hare"}, timeout=20)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 240
        while httpx.get(f"{url}/v1/videos/{job['id']}", timeout=20).json()["status"] != "completed":
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        done = httpx.get(f"{url}/v1/videos/{job['id']}", timeout=20).json()
    lines = [line for line in (tmp_path / "server.log").read_text().splitlines() if job["id"] in line]
    events = [line.split(job["id"], 1)[1].split(":")[0].split("(")[0].strip() for line in lines]
    assert sorted(events) == ["chunk 0", "chunk 1", "ended", "queued", "started", "steered"], lines
    assert events[0] == "queued" and events[-1] == "ended" and events.index("chunk 0") < events.index("chunk 1")
    assert lines[-1].endswith("ended: completed")
    assert [(s["prompt"], s["from_chunk"], s["to_chunk"]) for s in done["prompt_timeline"]] == [
        ("a fox", 0, 0),
        ("a hare", 1, 1),
    ]


def test_a_late_edit_is_answered_from_the_worker_s_window_and_shown_where_it_applied(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The worker records the first chunk still open after each step; POST /prompt answers from it,
    and an edit the window overtook before the worker read it is moved on in the job's timeline:
    the steered video equals a job whose prompt list is that timeline."""
    with running_server(tmp_path, tiny_checkpoint, worker=True, num_steps=8, window_size=4) as (url, data, _):
        client = httpx.Client(base_url=url, timeout=20)
        store = JobStore(data / "magi.db")
        job = client.post("/v1/videos", json={"prompt": "a fox", "num_frames": 8 * 24, "seed": 5}).json()
        deadline = time.monotonic() + 240
        while (row := store.get(job["id"])).steer_from is None or row.steer_from < 2:
            assert time.monotonic() < deadline and not row.ended, row
            time.sleep(0.01)
        answer = client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 0, "prompt": "a hare"}).json()
        assert row.chunks_done <= row.steer_from <= answer["applies_from"] < 8, (row, answer)
        sneaked = store.add_edit(job["id"], 1, "a mole")  # as if accepted just before the window moved on
        while not (done := client.get(f"/v1/videos/{job['id']}").json())["status"] == "completed":
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert store.get(job["id"]).steer_from == 8  # every chunk entered
        spans = [(s["prompt"], s["from_chunk"], s["to_chunk"], s["edit_id"]) for s in done["prompt_timeline"]]
        assert spans[0][:2] == ("a fox", 0) and spans[-1][0] == "a mole" and spans[-1][3] == sneaked, spans
        assert spans[-1][1] >= answer["applies_from"] >= 2, spans  # moved on: chunk 1 had entered
        prompts = [p for p, first, last, _ in spans for _ in range(first, last + 1)]
        twin = client.post("/v1/videos", json={"prompts": prompts, "num_frames": 8 * 24, "seed": 5}).json()
        while client.get(f"/v1/videos/{twin['id']}").json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (tmp_path / "steered.mp4").write_bytes(client.get(f"/v1/videos/{job['id']}/content").content)
        (tmp_path / "timeline.mp4").write_bytes(client.get(f"/v1/videos/{twin['id']}/content").content)
        steered, timeline = decode_mp4(tmp_path / "steered.mp4"), decode_mp4(tmp_path / "timeline.mp4")
        assert torch.equal(steered, timeline)
        client.close()
        store.close()
