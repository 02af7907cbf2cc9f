"""magi serve's resource bounds: a prompt is at most MAX_PROMPT_CHARS characters (create and
steer), the same rule as the CLI's (``magi.request.check_text``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")

from fastapi.testclient import TestClient  # noqa: E402

from magi.request import MAX_PROMPT_CHARS, RequestError, check_text  # noqa: E402
from magi.serve.app import create_app  # noqa: E402
from tests.helpers import write_tiny_config  # noqa: E402


@pytest.fixture
def client(tiny_checkpoint: Path, tmp_path: Path) -> TestClient:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint)
    app = create_app(config, tmp_path / "data")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client
    app.state.store.close()


def test_a_prompt_over_the_cap_is_refused_naming_the_limit(client: TestClient) -> None:
    assert check_text("x" * MAX_PROMPT_CHARS, "prompt")
    with pytest.raises(RequestError, match=f"the most is {MAX_PROMPT_CHARS}"):
        check_text("x" * (MAX_PROMPT_CHARS + 1), "prompt")
    r = client.post("/v1/videos", json={"prompt": "x" * (MAX_PROMPT_CHARS + 1), "num_frames": 24})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert str(MAX_PROMPT_CHARS) in r.json()["error"]["message"]
    job = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 24}).json()["id"]
    r = client.post(f"/v1/videos/{job}/prompt", json={"prompt": "y" * (MAX_PROMPT_CHARS + 1), "from_chunk": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
