"""example/*/run.sh after `python -m magi.download`: the scripts find downloads/special_tokens.npz.

The scripts run against a copy of the repository layout with a stand-in `python` on PATH that
records the environment and arguments it was started with, so no model is loaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as REPO

FAKE_PYTHON = """#!/usr/bin/env bash
echo "SPECIAL_TOKEN_PATH=${SPECIAL_TOKEN_PATH:-}"
echo "PAD_HQ=${PAD_HQ:-} PAD_DURATION=${PAD_DURATION:-}"
echo "CWD=$PWD"
echo "ARGS=$*"
"""


def _run(root: Path, script: str, env: dict[str, str], cwd: Path | str = "/") -> dict[str, str]:
    """Run a copy of example/<script> under root with the stand-in python; its report as a dict."""
    target = root / "example" / script
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "example" / script, target)
    shutil.copy(REPO / "example" / "launch.sh", root / "example" / "launch.sh")  # sourced by run.sh
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("SPECIAL_TOKEN_PATH", "GPUS_PER_NODE", "NNODES")}
    clean.update(env, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(target)], cwd=cwd, env=clean, capture_output=True, text=True, timeout=60)
    if done.returncode:
        return {"STATUS": str(done.returncode), "STDERR": done.stderr.strip()}
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("script", ["4.5B/run.sh", "24B/run.sh"])
def test_run_sh_uses_downloaded_special_tokens(tmp_path: Path, script: str) -> None:
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "special_tokens.npz").write_bytes(b"npz")
    report = _run(tmp_path, script, {"MODE": "t2v"})  # the 24B default, i2v, needs an image
    assert report["SPECIAL_TOKEN_PATH"] == str(tmp_path / "downloads" / "special_tokens.npz")
    assert report["CWD"] == str(tmp_path)  # config paths (./downloads/...) resolve at the root
    assert "--config_file example/" in report["ARGS"]


@pytest.mark.parametrize("script", ["4.5B/run.sh", "24B/run.sh"])
def test_run_sh_prefers_the_official_place_and_the_variable(tmp_path: Path, script: str) -> None:
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "special_tokens.npz").write_bytes(b"npz")
    (tmp_path / "example" / "assets").mkdir(parents=True)
    (tmp_path / "example" / "assets" / "special_tokens.npz").write_bytes(b"npz")
    assert _run(tmp_path, script, {"MODE": "t2v"})["SPECIAL_TOKEN_PATH"] == ""  # magi.infer finds example/assets/
    mine = str(tmp_path / "mine.npz")
    assert _run(tmp_path, script, {"MODE": "t2v", "SPECIAL_TOKEN_PATH": mine})["SPECIAL_TOKEN_PATH"] == mine


def test_tiny_run_sh_from_another_folder(tmp_path: Path) -> None:
    # the tiny demo resolves a relative OUTPUT_PATH against the caller's folder, not the repo's
    root = tmp_path / "repo"
    (root / "example" / "tiny" / "checkpoints").mkdir(parents=True)
    (root / "example" / "tiny" / "checkpoints" / "special_tokens.npz").write_bytes(b"npz")
    target = root / "example" / "tiny" / "run.sh"
    shutil.copy(REPO / "example" / "tiny" / "run.sh", target)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUTPUT_PATH="v.mp4")
    done = subprocess.run(
        ["bash", str(target)], cwd=caller, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    args = next(line for line in done.stdout.splitlines() if line.startswith("ARGS="))
    assert f"--output_path {caller / 'v.mp4'}" in args


@pytest.mark.parametrize("script", ["4.5B/run.sh", "24B/run.sh"])
def test_run_sh_paths_relative_to_the_caller(tmp_path: Path, script: str) -> None:
    caller = tmp_path / "work"
    caller.mkdir()
    (caller / "cat.jpg").write_bytes(b"jpg")
    (caller / "my_config.json").write_text("{}")
    env = {"MODE": "i2v", "IMAGE_PATH": "cat.jpg", "OUTPUT_PATH": "out/cat.mp4", "CONFIG": "my_config.json"}
    args = _run(tmp_path / "repo", script, env, cwd=caller)["ARGS"]
    assert f"--image_path {caller / 'cat.jpg'}" in args
    assert f"--output_path {caller / 'out' / 'cat.mp4'}" in args
    assert f"--config_file {caller / 'my_config.json'}" in args
    # a CONFIG that exists only in the repository keeps meaning the repository's file
    env = {"MODE": "t2v", "CONFIG": "example/4.5B/4.5B_distill_config.json"}
    args = _run(tmp_path / "repo", script, env, cwd=caller)["ARGS"]
    assert "--config_file example/4.5B/4.5B_distill_config.json" in args


@pytest.mark.parametrize("script", ["4.5B/run.sh", "24B/run.sh"])
@pytest.mark.parametrize(("mode", "variable"), [("i2v", "IMAGE_PATH"), ("v2v", "PREFIX_VIDEO_PATH")])
def test_run_sh_says_the_official_assets_are_not_shipped(tmp_path: Path, script: str, mode: str, variable: str) -> None:
    report = _run(tmp_path, script, {"MODE": mode})
    assert report["STATUS"] == "2"
    assert report["STDERR"].startswith(f"error: MODE={mode} needs {variable}=")
