"""scripts/bench_memory.py --cli's sampler: the tree's RSS split into python and its children."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

MB = 10**6

# A parent holding 40 MB that starts a child holding 120 MB; both live ~1.5 s.
PARENT = """
import subprocess, sys, time
held = bytearray(40 * 10**6)
child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(120 * 10**6); time.sleep(1.5)"])
time.sleep(1.5)
child.wait()
"""


def _bench():
    spec = importlib.util.spec_from_file_location("magi_bench_memory", REPO_ROOT / "scripts" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_run_sampled_splits_python_from_its_children(tmp_path: Path) -> None:
    r = _bench().run_sampled([sys.executable, "-c", PARENT], {}, tmp_path / "log.txt")
    assert r["rc"] == 0
    assert 40 * MB <= r["peak_python"] < 100 * MB
    assert 120 * MB <= r["peak_children"] < 180 * MB
    assert r["peak_tree"] >= 160 * MB
    assert max(r["quarters"]) == r["peak_tree"] and len(r["quarters"]) == 4
