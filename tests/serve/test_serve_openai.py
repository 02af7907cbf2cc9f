"""The official ``openai`` SDK end to end against ``magi serve`` (fake worker, no model):
create, create_and_poll, retrieve, list with auto-paging, download_content (video and thumbnail),
remix, delete; HEAD on GET routes, 429 with Retry-After, errors in OpenAI's shape."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the SDK tests need openai: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="the API tests use httpx: pip install -e '.[test]'")

from tests.helpers import mp4_frames  # noqa: E402
from tests.serve.live import FRAMES, FakeWorker, running_server, value_of  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
KEY = "sdk-key-42"
MAX_QUEUED = 4


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sdk")
    with running_server(root, tiny_checkpoint, "--api_key", KEY, "--max_queued", str(MAX_QUEUED)) as (url, data, _):
        worker = FakeWorker(data)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        yield url, client, worker
        worker.close()


def test_create_poll_retrieve_download_thumbnail(served, tmp_path: Path) -> None:
    url, client, _ = served
    video = client.videos.create_and_poll(
        prompt="a red fox in the snow", seconds="1", size="64x64", poll_interval_ms=50
    )
    assert video.status == "completed" and video.id.startswith("video_") and video.progress == 100
    assert (video.size, video.seconds, video.object) == ("64x64", "1", "video")
    again = client.videos.retrieve(video.id)
    assert again.id == video.id and again.completed_at is not None
    out = tmp_path / "v.mp4"
    client.videos.download_content(video.id).write_to_file(out)
    assert mp4_frames(out) == FRAMES
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumb[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    image = Image.open(io.BytesIO(thumb))
    assert image.size == (64, 64) and abs(sum(image.convert("L").getdata()) / 64**2 - value_of(video.id)) < 3
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.download_content(video.id, variant="spritesheet")
    assert err.value.body["type"] == "invalid_request_error"


def test_list_auto_paging_sees_every_job(served) -> None:
    _, client, _ = served
    made = [client.videos.create_and_poll(prompt=f"job {i}", seconds="1", poll_interval_ms=50).id for i in range(5)]
    page = client.videos.list(limit=2)
    assert len(page.data) == 2 and page.has_more and page.last_id == page.data[-1].id
    seen = [v.id for v in client.videos.list(limit=2)]  # auto-paging follows last_id
    assert seen[:5] == made[::-1] and len(seen) == len(set(seen))
    oldest_first = [v.id for v in client.videos.list(limit=3, order="asc")]
    assert oldest_first == seen[::-1]


def test_remix_continues_the_video_as_a_new_job(served) -> None:
    _, client, _ = served
    parent = client.videos.create_and_poll(prompt="a fox", seconds="1", poll_interval_ms=50)
    remixed = client.videos.remix(parent.id, prompt="the fox jumps")
    assert remixed.id != parent.id and remixed.remixed_from_video_id == parent.id
    assert remixed.prompt == "the fox jumps" and remixed.status in ("queued", "completed")
    raw = remixed.model_dump()
    assert (
        raw["mode"] == "extend"
        and raw["parent_id"] == parent.id
        and raw["num_frames"] == parent.model_dump()["num_frames"]
    )
    with pytest.raises(openai.NotFoundError):
        client.videos.remix("video_nope", prompt="x")


def test_delete_removes_the_job_and_its_files(served) -> None:
    url, client, worker = served
    video = client.videos.create_and_poll(prompt="to delete", seconds="1", poll_interval_ms=50)
    folder = worker.data_dir / "jobs" / video.id
    assert folder.is_dir()
    gone = client.videos.delete(video.id)
    assert (gone.id, gone.deleted, gone.object) == (video.id, True, "video.deleted")
    assert not folder.exists()
    with pytest.raises(openai.NotFoundError) as err:
        client.videos.retrieve(video.id)
    assert err.value.body["type"] == "not_found_error" and err.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)
    worker.paused = True
    try:
        queued = client.videos.create(prompt="still waiting", seconds="1")
        with pytest.raises(openai.ConflictError):
            client.videos.delete(queued.id)
        client.post(f"/videos/{queued.id}/cancel", cast_to=object)
        assert client.videos.delete(queued.id).deleted
    finally:
        worker.paused = False


def test_head_and_429(served) -> None:
    url, client, worker = served
    auth = {"Authorization": f"Bearer {KEY}"}
    video = client.videos.create_and_poll(prompt="head", seconds="1", poll_interval_ms=50)
    for path in (
        "/health",
        "/v1/videos",
        f"/v1/videos/{video.id}",
        f"/v1/videos/{video.id}/content",
        f"/v1/videos/{video.id}/events",
    ):
        get = httpx.get(url + path, headers=auth, timeout=20) if not path.endswith("events") else None
        head = httpx.head(url + path, headers=auth, timeout=20)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)
        if get is not None:
            assert head.headers["content-type"] == get.headers["content-type"], path
            assert head.headers["content-length"] == str(len(get.content)), path
    worker.paused = True
    try:
        for _ in range(MAX_QUEUED):
            client.videos.create(prompt="fill", seconds="1")
        r = httpx.post(url + "/v1/videos", headers=auth, json={"prompt": "one too many", "num_frames": 24})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.videos.create(prompt="one too many", seconds="1")
    finally:
        worker.paused = False
    deadline = time.monotonic() + 20
    while any(v.status == "queued" for v in client.videos.list(limit=20)) and time.monotonic() < deadline:
        time.sleep(0.1)
