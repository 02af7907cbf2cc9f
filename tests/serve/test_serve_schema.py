"""Strict, typed requests: unknown and mistyped fields are 400 naming the field, out-of-range
integers are 400 (never 500), errors keep OpenAI's shape, /openapi.json documents the request
models, and schemathesis fuzzing the running server finds no 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests use httpx: pip install -e '.[test]'")

from tests.serve.live import FakeWorker, running_server  # noqa: E402

KEY = "schema-key-7"


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("schema")
    with running_server(root, tiny_checkpoint, "--api_key", KEY, "--max_queued", "3") as (url, data, _):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        yield url, client, data
        client.close()


def _error(r: httpx.Response, param: str | None, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param and err["type"] == "invalid_request_error" and "\n" not in err["message"]
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "a fox", "frames": 48}, "frames"),
        ({"prompt": "a fox", "num_frames": 24, "negative_prompt": "x"}, "negative_prompt"),
        ({"prompt": "a fox", "num_frames": [24]}, "num_frames"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a fox", "seconds": {"s": 1}}, "seconds"),
        ({"prompt": "a fox", "num_frames": 2**63}, "num_frames"),
        ({"prompt": "a fox", "size": 64}, "size"),
    ],
)
def test_create_refuses_unknown_and_mistyped_fields(served, body: dict, param: str) -> None:
    _, client, _ = served
    err = _error(client.post("/v1/videos", json=body), param)
    if param in ("frames", "negative_prompt"):
        assert f"unknown field {param!r}" in err["message"] and "num_frames" in err["message"]


def test_unknown_form_field_is_refused(served) -> None:
    _, client, _ = served
    r = client.post("/v1/videos", data={"prompt": "a fox", "frames": "48"}, files={"unused": ("", b"")})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("frames", "unused"), r.text


@pytest.mark.parametrize(
    "body, param",
    [
        ({"from_chunk": 2**63, "prompt": "x"}, "from_chunk"),
        ({"from_chunk": -1, "prompt": "x"}, "from_chunk"),
        ({"from_chunk": 1.5, "prompt": "x"}, "from_chunk"),
        ({"from_chunk": "one", "prompt": "x"}, "from_chunk"),
        ({"from_chunk": 5, "prompt": "x"}, "from_chunk"),  # the queued 24-frame job has 1 chunk
        ({"from_chunk": 0, "prompt": "x", "chunk": 0}, "chunk"),
        ({"from_chunk": 0}, "prompt"),
    ],
)
def test_prompt_edit_ranges_are_400(served, body: dict, param: str) -> None:
    _, client, _ = served
    job = client.post("/v1/videos", json={"prompt": "a fox", "num_frames": 24}).json()
    _error(client.post(f"/v1/videos/{job['id']}/prompt", json=body), param)
    assert client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 0, "prompt": "x"}).status_code == 200
    client.post(f"/v1/videos/{job['id']}/cancel")


def test_errors_have_the_openai_type(served) -> None:
    url, client, _ = served
    r = httpx.get(url + "/v1/videos")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.get("/v1/videos/video_nope")
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "no video with id 'video_nope'",
        "type": "not_found_error",
        "param": "id",
        "code": "not_found",
    }


def test_openapi_documents_the_request_models(served) -> None:
    _, client, _ = served
    spec = client.get("/openapi.json").json()
    create = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    body = create["application/json"]["schema"]
    assert body["additionalProperties"] is False and {"prompt", "num_frames", "size", "seed"} <= set(body["properties"])
    assert "input_reference" in create["multipart/form-data"]["schema"]["properties"]
    edit = spec["paths"]["/v1/videos/{job_id}/prompt"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert edit["required"] == ["from_chunk", "prompt"] and edit["additionalProperties"] is False
    assert "delete" in spec["paths"]["/v1/videos/{job_id}"] and "/v1/videos/{job_id}/remix" in spec["paths"]


def test_schemathesis_finds_no_server_error(served, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis: pip install -e '.[test]'")
    url, client, data = served
    worker = FakeWorker(data)  # jobs complete, so content / extend / remix / delete answer too
    try:
        job = client.post("/v1/videos", json={"prompt": "a fox", "num_frames": 24}).json()
        config = tmp_path / "schemathesis.toml"  # the path operations are fuzzed on a real, completed job
        config.write_text(f'[parameters]\n"path.job_id" = "{job["id"]}"\n')
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--exclude-path-regex",
            "/(stream|events)",
            "--request-timeout",
            "20",
            "--no-color",
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, check=False, cwd=tmp_path)
    finally:
        worker.close()
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Tested: 10" in done.stdout, done.stdout[-3000:]  # every route but the two live streams
