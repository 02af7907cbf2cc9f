"""magi serve is safe by default, against the real server (uvicorn, no worker): without a key a
cross-site POST (text/plain or a form, as any web page can send) is refused, and so is a Host
name that is not the server's (DNS rebinding) unless --allowed_hosts names it; with a key the API
docs need it too, the key comes from a file, a key on argv is warned about; the data folder and
its database are private (0700 / 0600); slow clients are closed (a request's headers have
--header_timeout seconds) and request headers over 64 KB are refused."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="magi serve needs its extra: pip install -e '.[serve]'")

from tests.helpers import free_port, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

KEY = "s3cret-key-from-a-file"


def _start(root: Path, name: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """(process, url) of a server without a worker and without a key from the environment."""
    srv = LiveServer(root / "config.json", root / name, "--no_worker", *extra, env={**os.environ, "MAGI_API_KEY": ""},
                     wait_for="http", log=root / f"{name}.log", timeout=60)  # fmt: skip
    srv.client.close()
    return srv.proc, srv.url


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("security")
    write_tiny_config(root / "config.json", tiny_checkpoint)
    (root / "key.txt").write_text(KEY + "\n")
    open_srv = _start(root, "open", "--allowed_hosts", "gpu-box.lan")
    keyed = _start(root, "keyed", "--api_key_file", str(root / "key.txt"))
    yield {"root": root, "open": open_srv[1], "keyed": keyed[1]}
    for proc, _ in (open_srv, keyed):
        proc.terminate()
        proc.wait(30)


def test_cross_site_posts_are_refused_without_a_key(servers: dict) -> None:
    url = servers["open"]
    body = '{"prompt": "a cat", "num_frames": 24}'
    for headers in (
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},
        {"Origin": "null", "Content-Type": "application/x-www-form-urlencoded"},
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
    ):
        r = httpx.post(url + "/v1/videos", content=body, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", r.text
    assert httpx.get(url + "/v1/videos", headers={"Origin": "https://evil.example"}).status_code == 200  # reads: CORS
    same = httpx.post(url + "/v1/videos", content=body, headers={"Origin": url, "Content-Type": "application/json"})
    assert same.status_code == 200, same.text  # the server's own page
    assert httpx.post(url + "/v1/videos", content=body).status_code == 200  # curl, the SDKs: no Origin


def test_foreign_host_names_are_refused(servers: dict) -> None:
    url = servers["open"]
    r = httpx.get(url + "/v1/videos", headers={"Host": "attacker.example"})
    assert r.status_code == 421 and "--allowed_hosts" in r.json()["error"]["message"], r.text
    for host in ("gpu-box.lan", "localhost", "127.0.0.1"):
        assert httpx.get(url + "/v1/videos", headers={"Host": host}).status_code == 200, host


def test_with_a_key_from_a_file_the_docs_need_it_too(servers: dict) -> None:
    url = servers["keyed"]
    for path in ("/docs", "/openapi.json", "/v1/videos"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
    evil = {"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/v1/videos", json={"prompt": "a", "num_frames": 24}, headers=evil).status_code == 200


def test_the_data_folder_and_database_are_private(servers: dict) -> None:
    data = servers["root"] / "open"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "magi.db").stat().st_mode) == 0o600


def test_a_key_on_the_command_line_is_warned_about(servers: dict) -> None:
    root = servers["root"]
    (root / "corrupt").mkdir()
    (root / "corrupt" / "magi.db").write_bytes(b"junk" * 100)  # the server stops right after the warning
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi.serve",
            "--config",
            str(root / "config.json"),
            "--data_dir",
            str(root / "corrupt"),
            "--port",
            str(free_port()),
            "--api_key",
            "k",
            "--no_worker",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "warning: --api_key on the command line is visible" in out.stderr, out.stderr


def test_slow_clients_cannot_pile_up_connections(servers: dict) -> None:
    proc, url = _start(servers["root"], "few", "--max_connections", "3")
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        for s in idle:
            s.sendall(b"GET /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a header, never finished
        time.sleep(0.5)
        r = httpx.get(url + "/v1/videos", timeout=10)
        assert r.status_code == 503, r.text  # refused at once, not queued behind the slow ones
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(30)


def _closed_after(conn: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``conn`` (reading what it sends); fails after ``limit``."""
    start = time.monotonic()
    conn.settimeout(limit)
    while conn.recv(4096):
        pass
    return time.monotonic() - start


def test_a_request_whose_headers_never_end_is_closed_after_the_header_timeout(servers: dict) -> None:
    proc, url = _start(servers["root"], "slowloris", "--header_timeout", "1.5")
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as half:
            half.sendall(b"GET /v1/videos HTTP/1.1\r\nHost: 127.0")  # half a header line, then nothing
            assert 1.0 < _closed_after(half, 30) < 15
        with socket.create_connection(("127.0.0.1", port)) as drip:  # a byte now and then does not help
            start = time.monotonic()
            drip.settimeout(0.3)
            with pytest.raises(OSError):  # reset or closed (recv answers b"")
                for byte in b"GET /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                    drip.sendall(bytes([byte]))
                    try:
                        if drip.recv(4096) == b"":
                            raise ConnectionResetError("closed")
                    except TimeoutError:
                        pass
            assert time.monotonic() - start < 15
        with socket.create_connection(("127.0.0.1", port)) as idle:  # a connection that sends nothing
            assert 1.0 < _closed_after(idle, 30) < 15
        with httpx.Client(base_url=url, timeout=10) as client:  # normal requests, kept alive, still work
            assert client.get("/v1/videos").status_code == 200
            time.sleep(0.5)
            assert client.get("/v1/videos").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_request_headers_over_64_kb_are_refused_and_the_server_stays_up(servers: dict) -> None:
    url = servers["open"]
    port = int(url.rsplit(":", 1)[1])
    headers = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(70))  # ~70 KB
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        try:
            conn.sendall(f"GET /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        except ConnectionResetError:  # closed while sending: refused as well
            answer = b""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0] == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
    assert json.loads(body)["error"]["code"] == "headers_too_large"  # then the server closed it
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:  # the same, sent in pieces
        for i in range(66):  # just over 64 KB, so the server has read all of it when it answers
            conn.sendall(
                ("GET /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i == 0 else "").encode()
                + f"X-Pad-{i}: {'p' * 1000}\r\n".encode()
            )
            time.sleep(0.005)
        assert b" 431 " in conn.recv(4096)
    small = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(20))  # ~20 KB is fine
    r = httpx.get(url + "/v1/videos", headers=dict(line.split(": ") for line in small.splitlines()), timeout=10)
    assert r.status_code == 200, r.text


def _handshake(url: str, host: str, origin: str | None) -> bytes:
    """The status line of a raw WebSocket handshake to the realtime route with these headers."""
    port = int(url.rsplit(":", 1)[1])
    lines = [
        "GET /v1/realtime/video HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return conn.recv(4096).split(b"\r\n", 1)[0]


def test_cross_site_websockets_and_foreign_hosts_are_refused(servers: dict) -> None:
    pytest.importorskip("websockets", reason="uvicorn needs websockets for the realtime route")
    url = servers["open"]
    own = url.removeprefix("http://")
    assert b" 403 " in _handshake(url, own, "https://evil.example") + b" "
    assert b" 403 " in _handshake(url, "attacker.example", None) + b" "
    assert b" 101 " in _handshake(url, own, url) + b" "  # the server's own page
    assert b" 101 " in _handshake(url, own, None) + b" "  # a client that sends no Origin
