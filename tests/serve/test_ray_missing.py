"""``magi serve --ray`` without Ray installed: one error line naming the extra, exit status 2
(runs whether or not Ray is installed: the child process hides it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import write_tiny_config

HIDE_RAY = "import sys; sys.modules['ray'] = None; from magi.serve.__main__ import main; sys.exit(main(sys.argv[1:]))"


def test_serve_ray_without_ray_is_one_error_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint)
    cmd = [sys.executable, "-c", HIDE_RAY, "--ray", "--config", str(config), "--data_dir", str(tmp_path / "d")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip()
    assert "\n" not in line and line.startswith("error: Ray Serve is not installed"), line
    assert line.endswith("pip install 'magi[ray]'") and len(line) <= 200, line


def test_connection_limits_with_ray_are_one_error_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Serve's proxy takes the connections on Ray: magi serve's own limits would silently not apply."""
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint)
    for flag, value in (("--max_connections", "50"), ("--header_timeout", "3")):
        cmd = [sys.executable, "-c", HIDE_RAY, "--ray", "--config", str(config), "--data_dir", str(tmp_path / "d"),
               flag, value]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        line = run.stderr.strip()
        assert "\n" not in line and line.startswith("error: --max_connections / --header_timeout"), line
        assert "reverse proxy" in line and len(line) <= 200, line
