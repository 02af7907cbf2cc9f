"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temporary cluster on a free
loopback port, trust auth, stopped (and deleted) at teardown. As root it runs as the ``postgres``
user (postgres refuses root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from tests.helpers import free_port


def pg_bin() -> str | None:
    """The folder of Debian's initdb / pg_ctl (newest version), None when not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError: no postgres user to run as
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yields its URL (database ``postgres``, user ``magi``)."""
    bindir = pg_bin()
    assert bindir is not None
    root = tempfile.mkdtemp(prefix="magi-pg-")
    wrap = _as_user()
    if wrap:
        shutil.chown(root, "postgres", "postgres")
    data, port = os.path.join(root, "data"), free_port()
    run = dict(check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=root)
    subprocess.run([*wrap, f"{bindir}/initdb", "-D", data, "-U", "magi", "-A", "trust", "--no-sync"], **run)
    opts = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off"
    subprocess.run(
        [*wrap, f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "start"], **run
    )
    try:
        yield f"postgresql://magi@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*wrap, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(root, ignore_errors=True)
