"""The control API in a process of its own (docs/api.md "Where it runs"): started by
`watch`, started again on the same address when it dies, ended with the engine
however the engine ends, and refused in one line when it cannot listen."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.test_engine import write_plan

MODELIP = [sys.executable, "-m", "orchestrator"]


def _api_process(pid: int) -> int:
    """The control API's process: a child of ``pid`` running orchestrator.api."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                if b"orchestrator.api" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
            except FileNotFoundError:
                continue
        time.sleep(0.1)
    raise AssertionError(f"process {pid} runs no control API process")


def _gone(pid: int) -> bool:
    """Ended (reaped, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _listing(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELIP, "fleet", "--api", address], capture_output=True,
                          text=True, timeout=60, check=False)


def _started(watch: subprocess.Popen[str]) -> str:
    assert watch.stderr is not None
    said = watch.stderr.readline()
    assert "control API on " in said, said
    return said.split("control API on ", 1)[1].strip()


def test_a_killed_api_process_is_replaced_on_its_address_and_ends_with_the_engine(
        tmp_path: Path) -> None:
    plan = write_plan(tmp_path, hosts=1, devices=2, extra="api: {listen: 127.0.0.1:0}")
    with subprocess.Popen([*MODELIP, "watch", str(plan), "--json", "--duration", "120"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                          ) as watch:
        try:
            address = _started(watch)
            first = _api_process(watch.pid)
            assert _listing(address).returncode == 0
            os.kill(first, signal.SIGKILL)
            assert watch.stderr is not None
            said = watch.stderr.readline()
            assert "the control API's process ended (exit -9); starting another" in said, said
            deadline = time.monotonic() + 30
            while (listed := _listing(address)).returncode != 0:
                assert time.monotonic() < deadline, listed.stderr
                time.sleep(0.2)
            assert "host0" in listed.stdout and "SERVING" in listed.stdout, listed.stdout
            second = _api_process(watch.pid)
            assert second != first and watch.poll() is None   # the engine ran on
            # the engine killed: the API process sees its pipe end, and ends
            watch.send_signal(signal.SIGKILL)
            watch.wait(timeout=30)
            deadline = time.monotonic() + 15
            while not _gone(second):
                assert time.monotonic() < deadline, "the API process outlived its engine"
                time.sleep(0.1)
            with socket.socket() as probe:
                host, port = address.rsplit(":", 1)
                assert probe.connect_ex((host, int(port))) != 0   # nobody listens there
        finally:
            watch.kill()


def test_an_api_address_in_use_is_one_line_and_nothing_runs(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plan = write_plan(tmp_path, hosts=1, devices=1)
        run = subprocess.run([*MODELIP, "deploy", str(plan), "--json", "--api",
                              f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines == [f"modelip: error: api 127.0.0.1:{port}: cannot listen there (the port is in "
                     "use, or it is not an address of this machine)"], lines
    assert '"event": "card"' not in run.stdout   # refused before a card was touched
