"""``magi.cli.return_freed_memory``: with glibc's mmap threshold held fixed, a freed large tensor
leaves the resident set at once, even after larger tensors were freed before it (which, left to
glibc's adaptation, move the next ones into the heap, where freed memory is kept)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from magi.cli import return_freed_memory

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20

# In a fresh process (the setting is process-wide): free a 24 MiB tensor (glibc then raises its
# threshold to 24 MiB), make a 16 MiB one, free it, and print how much the resident set fell.
PROBE = """
import json, os, sys
import torch
from magi.cli import return_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

applied = return_freed_memory() if sys.argv[1] == "on" else False
big = torch.ones(24 * 2**20 // 4)
del big
block = torch.ones(16 * 2**20 // 4)
before = rss()
del block
print(json.dumps({"applied": applied, "released": before - rss()}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc (Linux) only"
)


def _released(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_freed_tensor_leaves_the_resident_set() -> None:
    on = _released("on")
    assert on["applied"]
    assert on["released"] >= 15 * MIB, f"only {on['released'] / MIB:.1f} MiB of a freed 16 MiB tensor returned"


@glibc_only
def test_without_it_glibc_keeps_the_freed_tensor() -> None:
    """The cause the setting removes: glibc's adapted threshold keeps the freed 16 MiB in its heap."""
    off = _released("off")
    assert off["released"] < 1 * MIB, f"{off['released'] / MIB:.1f} MiB returned without the setting"


def test_the_users_choice_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert return_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    assert return_freed_memory() is False
