"""The dashboard renders a snapshot: tested with a capture console and fixed values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from orchestrator.dashboard import LiveDashboard, render
from orchestrator.engine.context import EngineStats
from orchestrator.engine.engine import CardView, HostView, Snapshot
from orchestrator.engine.events import CardChanged, Deployed, HostChanged, Rekeyed
from orchestrator.engine.metrics import render_metrics

FIXED_TS = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def snapshot(**overrides: object) -> Snapshot:
    cards = (
        CardView("host0", 0, "h0-card0", 0, 0, "SERVING", "a1b2c3d4e5f60718", 2, 1, "ONLINE",
                 "", 12.5),
        CardView("host0", 1, "h0-card1", 0, 1, "QUARANTINED", "", 1, 1, "LOADED",
                 "host0/1: report signature does not verify", 3.0),
        CardView("host1", 0, "h1-card0", 1, 0, "RETRY_WAIT", "", 0, 2, "-",
                 "127.0.0.1:9: host unreachable", 0.4),
    )
    events = (CardChanged(ts=FIXED_TS, host="host0", device=1, card_id="h0-card1", group=0,
                          partition=1, previous="ATTESTING", state="QUARANTINED",
                          reason="signature", boot_counter=1, session="", attempts=1),
              Rekeyed(ts=FIXED_TS + 1, host="host0", device=0, group=0, outage_ms=7.25,
                      group_serving=False),
              HostChanged(ts=FIXED_TS + 2, host="host1", address="127.0.0.1:9",
                          previous="CONNECTING", state="UNREACHABLE", reason="refused"))
    hosts = (HostView("host0", "127.0.0.1:5000", "UP", "", 2, 1, 0, 80.0),
             HostView("host1", "127.0.0.1:9", "UNREACHABLE", "connection refused", 1, 0, 0,
                      65.0))
    values: dict[str, object] = dict(
        cards=cards, hosts=hosts, counts={"SERVING": 1, "QUARANTINED": 1, "RETRY_WAIT": 1},
        groups_serving=0, groups=2, events=events, rekeys=1, outage_p50=0.007,
        outage_p99=0.012, disproved_hints=3, elapsed=75.0, deployed_after=None)
    values.update(overrides)
    return Snapshot(**values)  # type: ignore[arg-type]


def capture(renderable: object) -> str:
    console = Console(record=True, width=220, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_shows_every_card_the_summary_and_events() -> None:
    text = capture(render(snapshot(), title="fleet"))
    assert "fleet" in text
    rows = [line for line in text.splitlines() if "h0-card" in line or "h1-card" in line]
    assert len(rows) == 3
    assert "SERVING" in rows[0] and "a1b2c3d4e5f60718" in rows[0] and "12.5s" in rows[0]
    assert "QUARANTINED" in rows[1] and "report signature does not verify" in rows[1]
    assert "RETRY_WAIT" in rows[2] and "unreachable" in rows[2]
    assert "serving 1   in progress 1   disconnected 0   quarantined 1   failed 0" in text
    assert "hosts up 1/2" in text and "groups serving 0/2" in text
    assert "re-keys 1 (outage p50 7 ms, p99 12 ms)" in text
    assert "elapsed 1m15s" in text and "hints disproved 3" in text
    assert "host host1 UNREACHABLE for 1m05s: connection refused" in text
    assert "host host0" not in text  # hosts that are up are not called out
    assert "08:00:00 host0/1 ATTESTING -> QUARANTINED (signature)" in text
    assert "08:00:01 host0/0 serving again after 7 ms" in text
    assert "08:00:02 host host1 CONNECTING -> UNREACHABLE (refused)" in text


def test_render_is_a_pure_function_of_the_snapshot() -> None:
    assert capture(render(snapshot())) == capture(render(snapshot()))
    assert capture(render(snapshot(elapsed=5.0))) != capture(render(snapshot()))


def test_large_fleets_are_cut_with_a_count() -> None:
    many = tuple(CardView("h", i, f"c{i}", i, 0, "SERVING", "", 1, 1, "", "", 1.0)
                 for i in range(100))
    text = capture(render(snapshot(cards=many, counts={"SERVING": 100})))
    assert "... and 52 more cards" in text


def test_live_driver_refreshes_on_events_with_a_capture_console() -> None:
    console = Console(record=True, width=220, color_system=None, force_terminal=True)
    current = [snapshot(rekeys=0)]
    with LiveDashboard(lambda: current[0], console=console, fps=1000) as live:
        current[0] = snapshot(rekeys=5)
        live.on_event(Deployed(seconds=1.0, serving=5, disconnected=0, quarantined=0,
                               failed=0, groups_serving=5, groups=5))
    assert "re-keys 5" in console.export_text()


def test_metrics_text() -> None:
    stats = EngineStats(rekeys=1, attestations=9, outages=[0.007])
    stats.verification_failures["AttestationError"] += 2
    stats.protocol_violations["host1"] += 3
    text = render_metrics(snapshot(), stats)
    assert 'modelip_cards{state="SERVING"} 1' in text
    assert 'modelip_cards{state="QUARANTINED"} 1' in text
    assert "modelip_rekeys_total 1" in text
    assert 'modelip_verification_failures_total{kind="AttestationError"} 2' in text
    assert 'modelip_outage_seconds{quantile="0.99"} 0.012000' in text
    assert 'modelip_host_state{host="host1",state="UNREACHABLE"} 1' in text
    assert 'modelip_host_state{host="host1",state="UP"} 0' in text
    assert 'modelip_protocol_violations_total{host="host1"} 3' in text


def test_json_lines_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    from tests.models import tiny_mlp

    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "plan.yaml").write_text("model:\n  onnx: tiny.onnx\nmek:\n  generate: true\n"
                                        "fleet:\n  emulated: {hosts: 1, devices_per_host: 2}\n"
                                        "state_dir: state\n")
    result = subprocess.run([sys.executable, "-m", "orchestrator", "deploy",
                             str(tmp_path / "plan.yaml")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "summary" and events[-1]["serving"] == 2
    assert {e["state"] for e in events if e["event"] == "card"} >= {"ATTESTING", "SERVING"}
    assert {e["state"] for e in events if e["event"] == "host"} == {"UP"}
    assert {e["schema"] for e in events} == {1}
    mek = tmp_path / "state" / "mek.dat"
    assert mek.stat().st_mode & 0o777 == 0o600
    assert mek.read_bytes().hex() not in result.stdout + result.stderr


def test_a_replica_says_what_it_holds_and_whether_the_store_answers() -> None:
    hosts = (HostView("host0", "a:1", "UP", "", 2, 2, 0, 1.0, owner="r1"),
             HostView("host1", "b:1", "UP", "", 1, 1, 0, 1.0, owner="r2"))
    text = capture(render(snapshot(hosts=hosts, replica="r1", replicas_alive=2)))
    assert "replica r1: holds 1/2 hosts, 2 replicas alive, store reachable" in text
    down = capture(render(snapshot(hosts=hosts, replica="r1", replicas_alive=2,
                                   store_reachable=False)))
    assert "store UNREACHABLE" in down
    assert "replica" not in capture(render(snapshot()))  # the embedded store: no line
