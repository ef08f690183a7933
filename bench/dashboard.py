"""What the live view costs: `modelip deploy` of 1,024 cards with each view, side by side.

    python bench/dashboard.py [--hosts 64] [--devices-per-host 16] [--runs 2]

The embedded emulated fleet (64 hosts x 16 cards by default), the same plan and
a warm cache for every run (only the journal is removed between runs). Timed:
the whole `modelip deploy` process, with
  --json              events to a pipe (the reference),
  --plain             the rich live view in a 160x50 pseudo-terminal,
  interactive         the Textual view in the same pseudo-terminal,
and the bytes each wrote. Target (the dashboard issue): the live view at most
1.2x the time of --json. Best of --runs for each, runs interleaved.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.models import tiny_mlp  # noqa: E402

MODELIP = [sys.executable, "-m", "orchestrator"]


def in_terminal(args: list[str], cols: int = 160, rows: int = 50) -> tuple[float, int, int]:
    """(seconds, bytes written to the terminal, exit code) of modelip in a pty."""
    started = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.environ.update(TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        os.execv(sys.executable, [*MODELIP, *args])  # noqa: S606
    written = 0
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            written += len(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return time.perf_counter() - started, written, os.waitstatus_to_exitcode(status)


def piped(args: list[str]) -> tuple[float, int, int]:
    started = time.perf_counter()
    result = subprocess.run([*MODELIP, *args], capture_output=True, check=False)
    return time.perf_counter() - started, len(result.stdout), result.returncode


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
        plan = work / "plan.yaml"
        plan.write_text(f"""
model: {{onnx: tiny.onnx}}
mek: {{generate: true}}
fleet: {{emulated: {{hosts: {ARGS.hosts}, devices_per_host: {ARGS.devices_per_host}}}}}
state_dir: state
""")
        journal = work / "state" / "journal.sqlite"
        piped(["deploy", str(plan), "--json"])  # warm the cache
        views = {"--json (piped)": lambda: piped(["deploy", str(plan), "--json"]),
                 "--plain (rich, 160x50)": lambda: in_terminal(["deploy", str(plan),
                                                                "--plain"]),
                 "interactive (Textual, 160x50)": lambda: in_terminal(["deploy", str(plan)])}
        best: dict[str, tuple[float, int]] = {}
        for _ in range(ARGS.runs):
            for name, run in views.items():
                for path in journal.parent.glob("journal.sqlite*"):
                    path.unlink()
                seconds, written, code = run()
                assert code == 0, (name, code)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, written)
    cards = ARGS.hosts * ARGS.devices_per_host
    reference = best["--json (piped)"][0]
    print(f"modelip deploy of {cards} cards ({ARGS.hosts} hosts x {ARGS.devices_per_host}), "
          f"embedded emulated fleet, best of {ARGS.runs}")
    print(f"{'view':<32}{'seconds':>9}{'vs --json':>11}{'written':>12}")
    for name, (seconds, written) in best.items():
        print(f"{name:<32}{seconds:>9.2f}{seconds / reference:>10.2f}x{written / 1e3:>9.0f} KB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=64)
    parser.add_argument("--devices-per-host", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2)
    ARGS = parser.parse_args()
    main()
