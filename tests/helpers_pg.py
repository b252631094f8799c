"""A throwaway PostgreSQL server for tests (real server, no mock): ``initdb`` + ``pg_ctl`` in a temp directory.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the ``postgres`` system user
(Debian's packages create it), through ``runuser``. The server listens on 127.0.0.1 on a free port with trust
authentication, fsync off, and is removed afterwards. Tests that need it are skipped (with the reason) on a
machine without the server binaries.

Import the fixture into a test module: ``from tests.helpers_pg import postgres_url  # noqa: F401``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

USER = "tuneforge"  # the database superuser initdb creates
RUN_AS = "postgres"  # the system user the server runs as when the tests run as root


def pg_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's /usr/lib/postgresql/*/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _runner() -> list[str] | None:
    """The command prefix that runs the server binaries as a non-root user (None: not possible here)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        return None
    runuser = shutil.which("runuser")
    return [runuser, "-u", RUN_AS, "--"] if runuser else None


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def start_server() -> tuple[str, Callable[[], None]]:
    """Start a server; returns ``(url, stop)``. Skips the calling test when it cannot run here."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    prefix = _runner()
    if prefix is None:
        pytest.skip(f"running as root and no '{RUN_AS}' user (or runuser) to run PostgreSQL as")
    # Not under pytest's tmp_path: its parents are private to root, and the server user must reach its directory.
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
    data = folder / "data"
    if prefix:
        info = pwd.getpwnam(RUN_AS)
        os.chown(folder, info.pw_uid, info.pw_gid)
    port = _free_port()
    _run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    _run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"),
          "-w", "-t", "60", "start"])

    def stop() -> None:
        try:
            _run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return f"postgresql://{USER}@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a throwaway PostgreSQL server shared by the session's tests (each test uses its own study name)."""
    url, stop = start_server()
    try:
        yield url
    finally:
        stop()
