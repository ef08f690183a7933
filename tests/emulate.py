"""A live `modelip emulate` process for tests that drive the orchestrator as a user does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

MODELIP = [sys.executable, "-m", "orchestrator"]


@contextmanager
def emulate(directory: Path, *, hosts: int = 1, devices: int = 4,
            pids: list[int] | None = None, extra: Sequence[str] = ()
            ) -> Iterator[tuple[list[str], Path]]:
    """`modelip emulate` on free loopback ports: yields its hosts' addresses and the
    vendor root to trust (``pids``: its pid appended, to stage faults; ``extra``: more
    of its flags); stopped with SIGINT at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "emulate.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*MODELIP, "emulate", "--hosts", str(hosts),
                                    "--devices-per-host", str(devices), "--base-port", "0",
                                    "--pki-dir", str(directory / "pki"), "--reboot-time", "0.05",
                                    *extra],
                                   stdout=out, stderr=subprocess.STDOUT)
    if pids is not None:
        pids.append(process.pid)
    try:
        for _ in range(200):
            if "READY" in log.read_text():
                break
            time.sleep(0.05)
        text = log.read_text()
        assert "READY" in text, text
        addresses = [line.split("listening on ", 1)[1].split()[0]
                     for line in text.splitlines() if "listening on" in line]
        yield addresses, directory / "pki" / "root.pem"
    finally:
        process.send_signal(signal.SIGCONT)   # a test may have stopped it
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def watching(plan: Path, cwd: Path) -> subprocess.Popen[str]:
    """`modelip watch PLAN --json` in ``cwd``, returned once every card has settled (its
    `deployed` event read; the rest of its output is the caller's)."""
    watch = subprocess.Popen([*MODELIP, "watch", str(plan), "--json"], cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert watch.stdout is not None
    for line in watch.stdout:
        if json.loads(line)["event"] == "deployed":
            return watch
    watch.wait(timeout=30)
    said = watch.stderr.read() if watch.stderr else ""
    raise AssertionError(f"the watch ended before settling: {said}")
