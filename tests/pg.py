"""A throwaway PostgreSQL server for tests: the distribution's binaries, a cluster in a
temporary directory, a unix socket only (no TCP port), run as the `postgres` user
when the tests run as root (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg


def server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, *settings: str) -> None:
        """``settings``: more server settings, as ``-c NAME=VALUE`` takes them."""
        bindir = server_binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL server not installed (make test installs it)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="modelip-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self._user = "postgres" if os.geteuid() == 0 else None
        self._settings = "".join(f" -c {setting}" for setting in settings)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                  f"-c max_connections=200{self._settings}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"fleet_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.2)
