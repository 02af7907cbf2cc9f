"""The live stream plays: segments are one CMAF stream (one init, continuous fragments), the
/stream bytes saved to a file are one mp4 of every frame with increasing timestamps, the HLS
playlist plays in ffmpeg while the job runs, a resumed run's timestamps go on where they
stopped, and the final mp4 is the same fragments remuxed."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests use httpx: pip install -e '.[test]'")

import imageio_ffmpeg  # noqa: E402

from magi.media.mp4 import join_mp4, split_fmp4  # noqa: E402
from magi.results import VideoChunk  # noqa: E402
from magi.serve.store import JobFiles, JobStore  # noqa: E402
from magi.sinks import SegmentSink  # noqa: E402
from tests.serve.live import running_server  # noqa: E402

LENGTHS = (8, 8, 5)  # frames of the three chunks


def _chunk(i: int, frames: int) -> VideoChunk:
    return VideoChunk(i, torch.full((frames, 3, 64, 64), 40 + 60 * i, dtype=torch.uint8), torch.zeros(1))


def _decoded(source: str | Path) -> tuple[list[int], list[int]]:
    """(pts in frames, mean grey level) of every decoded frame of ``source``, a file or a URL."""
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-v",
        "error",
        "-i",
        str(source),
        "-map",
        "0:v",
        "-vf",
        "format=gray",
        "-f",
        "framecrc",
        "-",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    pts = [int(line.split(",")[2]) for line in done.stdout.splitlines() if line and not line.startswith("#")]
    raw = subprocess.run([*cmd[:-3], "-f", "rawvideo", "-"], capture_output=True, timeout=60, check=True).stdout
    grey = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(len(pts), -1).float().mean(1)
    return pts, [round(float(g)) for g in grey]


def _stream(paths: list[Path]) -> bytes:
    return paths[0].read_bytes() + b"".join(b"".join(split_fmp4(p.read_bytes())[1]) for p in paths[1:])


def _expected_grey() -> list[int]:
    return [40 + 60 * i for i, n in enumerate(LENGTHS) for _ in range(n)]


def test_segments_are_one_cmaf_stream_and_resume_goes_on(tmp_path: Path) -> None:
    sink = SegmentSink(tmp_path / "seg", 24)
    for i, n in enumerate(LENGTHS[:2]):
        sink.add(_chunk(i, n))
    resumed = SegmentSink(tmp_path / "seg", 24, keep=2)  # a worker restart after two chunks
    assert (resumed.frames_done, resumed.next) == (16, 2)
    resumed.add(_chunk(2, LENGTHS[2]))
    paths = resumed.paths()
    inits = {split_fmp4(p.read_bytes())[0] for p in paths}
    assert len(inits) == 1  # one init segment serves every fragment
    (tmp_path / "stream.mp4").write_bytes(_stream(paths))
    pts, grey = _decoded(tmp_path / "stream.mp4")
    assert pts == list(range(sum(LENGTHS)))  # every frame, timestamps going on across segments
    assert all(abs(g - e) <= 2 for g, e in zip(grey, _expected_grey(), strict=True)), grey
    join_mp4(paths, tmp_path / "video.mp4")
    assert _decoded(tmp_path / "video.mp4") == (pts, grey)  # the final mp4: the same frames, remuxed
    plain = SegmentSink(tmp_path / "other", 24)
    plain.add(_chunk(0, 3))
    assert _decoded(plain.path(0))[0] == [0, 1, 2]


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("stream"), tiny_checkpoint) as (url, data, _):
        store = JobStore(data / "magi.db")
        yield url, data, store
        store.close()


def test_stream_and_hls_play_while_made(served, tmp_path: Path) -> None:
    url, data, store = served
    job = httpx.post(url + "/v1/videos", json={"prompt": "a fox", "num_frames": 24}, timeout=20).json()
    store.update(job["id"], status="in_progress", started_at=time.time())
    files = JobFiles(data, job["id"])
    files.dir.mkdir(parents=True)
    sink = SegmentSink(files.chunks, 24)
    for i, n in enumerate(LENGTHS[:2]):
        sink.add(_chunk(i, n))
    playlist = httpx.get(f"{url}/v1/videos/{job['id']}/stream.m3u8", timeout=20)
    assert playlist.status_code == 200 and playlist.headers["content-type"].startswith("application/vnd.apple.mpegurl")
    assert "#EXT-X-ENDLIST" not in playlist.text and playlist.text.count("#EXTINF:0.333333,") == 2
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # ffmpeg watches the live playlist while it grows
        watching = pool.submit(_decoded, f"{url}/v1/videos/{job['id']}/stream.m3u8")
        time.sleep(1.0)
        sink.add(_chunk(2, LENGTHS[2]))
        store.update(job["id"], status="completed", finished_at=time.time())
        watched = watching.result(90)
    first = watched[0][0]  # ffmpeg's live HLS reader may start its clock at a later origin
    assert watched[0] == list(range(first, first + sum(LENGTHS))), watched  # every frame, in order, seen live
    assert all(abs(g - e) <= 2 for g, e in zip(watched[1], _expected_grey(), strict=True)), watched
    assert "#EXT-X-ENDLIST" in httpx.get(f"{url}/v1/videos/{job['id']}/stream.m3u8", timeout=20).text
    live = httpx.get(f"{url}/v1/videos/{job['id']}/stream", timeout=20).content
    assert live == _stream(sink.paths())
    (tmp_path / "saved.mp4").write_bytes(live)
    pts, grey = _decoded(tmp_path / "saved.mp4")
    assert pts == list(range(sum(LENGTHS))) and all(
        abs(g - e) <= 2 for g, e in zip(grey, _expected_grey(), strict=True)
    )
    init = httpx.get(f"{url}/v1/videos/{job['id']}/stream/init.mp4", timeout=20).content
    pieces = [httpx.get(f"{url}/v1/videos/{job['id']}/stream/{k}.m4s", timeout=20) for k in range(3)]
    assert all(p.status_code == 200 for p in pieces) and init + b"".join(p.content for p in pieces) == live
    assert httpx.get(f"{url}/v1/videos/{job['id']}/stream/3.m4s", timeout=20).status_code == 404
    played = _decoded(f"{url}/v1/videos/{job['id']}/stream.m3u8")
    assert played[1] == grey and played[0] == [played[0][0] + t for t in pts]  # the ended playlist: the same frames
