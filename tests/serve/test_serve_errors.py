"""Errors magi serve did not foresee still answer its JSON error shape: a full disk is 507 naming
the fix, anything else a 500 naming only the error's type (the traceback stays on the console)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")

from fastapi.testclient import TestClient  # noqa: E402

from magi.serve.app import create_app  # noqa: E402
from magi.serve.store import JobStore  # noqa: E402
from tests.helpers import write_tiny_config  # noqa: E402


@pytest.fixture
def client(tiny_checkpoint: Path, tmp_path: Path) -> TestClient:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint)
    app = create_app(config, tmp_path / "data")
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client
    app.state.store.close()


@pytest.mark.parametrize(
    "err, status, code",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 507, "insufficient_storage"),
        (RuntimeError("/srv/secret/place broke"), 500, "internal_error"),
    ],
)
def test_unforeseen_errors_answer_json(client: TestClient, monkeypatch, err: Exception, status: int, code: str) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise err

    monkeypatch.setattr(JobStore, "create", broken)
    r = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 24})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    assert "/srv/secret" not in r.text
