"""How a run ends: --duration counts from the start, the work in flight at the end
finishes before the fleet is judged, and a pipe gets plain lines, not JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.models import tiny_mlp

MODELIP = [sys.executable, "-m", "orchestrator"]


def _plan(tmp_path: Path, emulated: str) -> Path:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                    f"fleet: {{emulated: {{{emulated}}}}}\nstate_dir: state\n")
    return plan


def test_work_in_flight_at_the_end_finishes_before_the_fleet_is_judged(tmp_path: Path
                                                                        ) -> None:
    # every attestation takes 4 s: 2.5 s from the start (the start-up takes about one),
    # every card is mid-work
    plan = _plan(tmp_path, "hosts: 1, devices_per_host: 3, attest_latency: 4")
    result = subprocess.run([*MODELIP, "watch", str(plan), "--duration", "2.5", "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary"
    # judged after the re-keys finished: every card serves, exit 0 (was 4: "failed")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert summary["serving"] == 3 and summary["not_serving"] == []
    # ... and the clock counted from the start: the time was up while all three worked
    assert summary["in_flight_at_end"] == 3 and summary["finished_at_end"] == 3
    assert summary["wind_down_seconds"] > 0
    # no card started new work after the end: one load each, none twice
    loads = [e for e in events if e.get("event") == "card" and e.get("state") == "LOADING"]
    assert len(loads) == 3


def test_plain_lines_in_a_pipe_and_the_wind_down_said(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "hosts: 1, devices_per_host: 2, attest_latency: 4")
    result = subprocess.run([*MODELIP, "watch", str(plan), "--duration", "2.5"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    lines = result.stdout.splitlines()
    assert lines and not any(line.startswith("{") for line in lines)   # not JSON lines
    assert any("LOADING -> SERVING" in line for line in lines)           # one per event
    assert lines[-2] == "2/2 cards serving, 1/1 hosts up, 0 re-keys"     # the summary last
    assert lines[-1].startswith("at the end: finished 2 re-keys in ")


def test_probes_of_the_metrics_port_never_reach_the_engine(tmp_path: Path) -> None:
    """A port scanner, TCP health probes, garbage and a stalled client against
    --metrics-port: each ends with its connection; the run ends as it would have."""
    import socket
    import urllib.request

    plan = _plan(tmp_path, "hosts: 1, devices_per_host: 2")
    process = subprocess.Popen([*MODELIP, "watch", str(plan), "--json", "--duration", "6",
                                "--metrics-port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None and process.stdout is not None
    said = process.stderr.readline()
    assert said.startswith("modelip: metrics on http://127.0.0.1:"), said  # 0: which port
    port = int(said.rsplit(":", 1)[1].split("/")[0])
    stalled = []
    for attempt in range(60):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
            if attempt % 3 == 1:
                probe.sendall(b"\x16\x03\x01 garbage, not HTTP\r\n\r\n")
            elif attempt % 3 == 2:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    for _ in range(20):  # more than it serves at once, and they say nothing
        stalled.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    for held in stalled[:18]:
        held.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:  # noqa: S310 - loopback
        assert b"modelip_cards" in reply.read()
    out, err = process.communicate(timeout=120)
    for held in stalled:
        held.close()
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "EndOfStream" not in err
    assert json.loads(out.splitlines()[-1])["event"] == "summary"
