"""The dashboard renders a snapshot: tested with a capture console and fixed values."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from orchestrator.engine.context import EngineStats
from orchestrator.engine.events import CardChanged, Deployed, HostChanged, Rekeyed
from orchestrator.engine.snapshot import CardView, HostView, Snapshot
from orchestrator.views.dashboard import Filter, LiveDashboard, render, sparkline
from orchestrator.views.metrics import render_metrics

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


def capture(renderable: object, width: int = 220, height: int = 50) -> str:
    console = Console(record=True, width=width, height=height, color_system=None)
    console.print(renderable)
    return console.export_text()


def screen(snap: Snapshot, width: int, height: int, **options: Any) -> list[str]:
    """The lines the live view puts on a width x height terminal."""
    text = capture(render(snap, width=width, height=height, **options), width, height)
    return text.rstrip("\n").splitlines()


def fleet(hosts: int, per_host: int, problems: dict[tuple[int, int], str] | None = None,
          down: int | None = None) -> Snapshot:
    """A snapshot of ``hosts`` x ``per_host`` cards, all serving but ``problems``."""
    problems = problems or {}
    cards = []
    for h in range(hosts):
        for d in range(per_host):
            state = problems.get((h, d), "DISCONNECTED" if h == down else "SERVING")
            cards.append(CardView(f"host{h:04d}", d, f"h{h}-card{d}", h, d, state, "", 1, 1, "",
                                  f"why {h}/{d}" if state != "SERVING" else "", 42.0))
    views = tuple(HostView(f"host{h:04d}", f"10.0.{h // 250}.{h % 250}:62473",
                           "UNREACHABLE" if h == down else "UP",
                           "connection refused" if h == down else "", per_host, per_host, 0,
                           100.0) for h in range(hosts))
    events = tuple(CardChanged(ts=FIXED_TS + i, host="host0000", device=i % per_host,
                               card_id="", group=0, partition=0, previous="LOADING",
                               state="SERVING", reason=f"event {i}", boot_counter=1,
                               session="", attempts=1) for i in range(12))
    groups = hosts * per_host
    return Snapshot(tuple(cards), views, dict(Counter(c.state for c in cards)),
                    groups - len(problems), groups, events, 7, 0.04, 0.09, 1, 95.0, None,
                    rekey_ages=(1.0, 2.0, 31.0))


SIZES = [(80, 24), (160, 50)]
PROBLEMS = {(3, 1): "QUARANTINED", (5, 0): "FAILED", (7, 2): "RETRY_WAIT"}


@pytest.mark.parametrize(("hosts", "per_host"), [(2, 4), (16, 16), (256, 16)])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_the_view_fits_the_screen_and_keeps_what_matters(
        hosts: int, per_host: int, width: int, height: int) -> None:
    problems = {k: v for k, v in PROBLEMS.items() if k[0] < hosts}
    lines = screen(fleet(hosts, per_host, problems), width, height)
    text = "\n".join(lines)
    assert len(lines) < height                       # fits, with the cursor's line spare
    assert all(len(line.rstrip()) <= width for line in lines)
    serving = hosts * per_host - len(problems)
    assert re.search(rf"● (serving )?{serving} ", lines[1])  # totals by state, on top
    assert "% settled" in lines[1]                   # a progress bar while deploying
    assert f"groups serving {serving}/{hosts * per_host}" in text
    assert "re-keys 7 (p50 40 ms, p99 90 ms)" in text
    for (h, d), state in problems.items():           # every problem on screen, with its reason
        line = next(x for x in lines if f"host{h:04d}/{d} {state}" in x)
        assert f"why {h}/{d}" in line
    assert "last events" in text and "08:00:11 host0000/" in text  # the newest, with time
    shown = {name for line in lines for name in re.findall(r"host\d{4}(?= )", line)}
    folded = re.search(r"\+(\d+) more hosts serving \((\d+) serving\)", text)
    if folded:                                       # summarised, never silently dropped
        assert len(shown) + int(folded.group(1)) == hosts
        assert int(folded.group(2)) == int(folded.group(1)) * per_host
        assert {f"host{h:04d}" for h, _ in problems} <= shown   # the loud ones stay
    else:
        assert shown == {f"host{h:04d}" for h in range(hosts)}


def test_sixty_four_hosts_of_sixteen_cards_fit_one_160x50_screen() -> None:
    lines = screen(fleet(64, 16, {(40, 3): "QUARANTINED"}), 160, 50)
    cells = [m for line in lines for m in re.findall(r"host\d{4} ([●✖]{16})", line)]
    assert len(cells) == 64 and "more hosts" not in "\n".join(lines)
    assert sum(cell.count("✖") for cell in cells) == 1


def test_a_down_host_is_one_line_not_one_per_card() -> None:
    lines = screen(fleet(16, 16, down=9), 160, 50)
    said = [line for line in lines if "host0009" in line and "UNREACHABLE" in line]
    assert len(said) == 1 and "connection refused (16 cards)" in said[0]
    assert not [line for line in lines if "host0009/" in line]


def test_more_problems_than_room_are_counted() -> None:
    problems = {(h, 0): "FAILED" for h in range(200)}
    text = "\n".join(screen(fleet(256, 16, problems), 80, 24))
    listed = len(re.findall(r"host\d{4}/0 FAILED", text))
    assert listed >= 1 and f"+{200 - listed} more: {200 - listed} failed or host down" in text


def test_filters_narrow_the_view() -> None:
    snap = fleet(16, 16, PROBLEMS)
    text = "\n".join(screen(snap, 160, 50, view=Filter(state="FAILED")))
    assert "filter: state=FAILED" in text
    assert "host0005/0 FAILED" in text and "QUARANTINED" not in text.split("needs")[1]
    assert re.findall(r"host\d{4}(?= )", text.split("needs")[0]) == ["host0005"]
    text = "\n".join(screen(snap, 160, 50, view=Filter(host="host0003"), paused=True))
    assert "PAUSED" in text and "host0003/1 QUARANTINED" in text
    assert "host0005" not in text


def test_sparkline_counts_the_last_minute() -> None:
    assert sparkline(()) == "▁" * 20
    line = sparkline((0.5, 1.0, 2.0, 59.0))
    assert line[-1] == "█" and line[0] != "▁" and set(line[1:-1]) == {"▁"}


def test_render_is_a_pure_function_of_the_snapshot() -> None:
    assert capture(render(snapshot())) == capture(render(snapshot()))
    assert capture(render(snapshot(elapsed=5.0))) != capture(render(snapshot()))


def test_live_driver_refreshes_on_events_with_a_capture_console() -> None:
    console = Console(record=True, width=220, color_system=None, force_terminal=True)
    current = [snapshot(rekeys=0)]
    with LiveDashboard(lambda: current[0], console=console, fps=1000) as live:
        current[0] = snapshot(rekeys=5)
        live.on_event(Deployed(seconds=1.0, serving=5, disconnected=0, quarantined=0,
                               failed=0, groups_serving=5, groups=5))
    assert "re-keys 5" in console.export_text()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, read by the official parser: (name, labels) ->
    value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_text() -> None:
    stats = EngineStats(rekeys=1, attestations=9, outages=[0.007])
    stats.verification_failures["AttestationError"] += 2
    stats.protocol_violations["host1"] += 3
    samples = _samples(render_metrics(snapshot(), stats))
    assert samples[("modelip_cards", (("state", "SERVING"),))] == 1
    assert samples[("modelip_cards", (("state", "QUARANTINED"),))] == 1
    assert samples[("modelip_rekeys_total", ())] == 1
    assert samples[("modelip_verification_failures_total", (("kind", "AttestationError"),))] == 2
    assert samples[("modelip_outage_seconds", (("quantile", "0.99"),))] == 0.012
    assert samples[("modelip_host_state", (("host", "host1"), ("state", "UNREACHABLE")))] == 1
    assert samples[("modelip_host_state", (("host", "host1"), ("state", "UP")))] == 0
    assert samples[("modelip_protocol_violations_total", (("host", "host1"),))] == 3


def test_metric_labels_are_escaped_by_the_library() -> None:
    """A host name with a quote, a backslash and a newline (a store writer's, or a
    plan's) cannot break the page: prometheus_client escapes label values."""
    odd = 'h"1\\x\nnext'
    hosts = (HostView(odd, "a:1", "UP", "", 1, 1, 0, 1.0),)
    cards = (CardView(odd, 0, "c", 0, 0, "SERVING", "", 1, 1, "", "", 1.0),)
    stats = EngineStats()
    stats.protocol_violations[odd] += 1
    stats.verification_failures[odd] += 1
    samples = _samples(render_metrics(snapshot(hosts=hosts, cards=cards), stats))
    assert samples[("modelip_host_state", (("host", odd), ("state", "UP")))] == 1
    assert samples[("modelip_protocol_violations_total", (("host", odd),))] == 1
    assert samples[("modelip_verification_failures_total", (("kind", odd),))] == 1


def test_metrics_parse_with_the_official_parser() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stats = EngineStats(rekeys=3, outages=[0.007, 0.04, 3.0])
    families = {f.name: f for f in text_string_to_metric_families(
        render_metrics(snapshot(), stats))}
    latency = families["modelip_rekey_seconds"]
    assert latency.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert buckets["0.01"] == 1 and buckets["0.05"] == 2 and buckets["2.5"] == 2
    assert buckets["5"] == 3 and buckets["+Inf"] == 3
    per_host = {(s.labels["host"], s.labels["state"]): s.value
                for s in families["modelip_host_cards"].samples}
    assert per_host[("host0", "QUARANTINED")] == 1 and per_host[("host1", "RETRY_WAIT")] == 1
    assert per_host[("host1", "SERVING")] == 0


def test_json_lines_when_asked_with_json(tmp_path: Path) -> None:
    from tests.models import tiny_mlp

    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "plan.yaml").write_text("model:\n  onnx: tiny.onnx\nmek:\n  generate: true\n"
                                        "fleet:\n  emulated: {hosts: 1, devices_per_host: 2}\n"
                                        "state_dir: state\n")
    result = subprocess.run([sys.executable, "-m", "orchestrator", "deploy",
                             str(tmp_path / "plan.yaml"), "--json"], capture_output=True,
                            text=True, timeout=120, check=False)
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


def test_json_events_carry_iso_time_beside_unix_seconds() -> None:
    line = json.loads(Rekeyed(ts=FIXED_TS, host="h", device=0, group=0, outage_ms=1.0,
                              group_serving=True).to_json())
    assert line["ts"] == FIXED_TS and line["time"] == "2027-01-15T08:00:00.000+00:00"
    assert list(line)[:4] == ["schema", "event", "ts", "time"]


def test_a_rollout_is_one_line_with_versions_capacity_and_verdict() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.engine.snapshot import RolloutView

    running = RolloutView(1, "gating", 2, 3, 7, 8, 4, 16, 15, 15, False, "", "soak: 4 s left")
    for width, height in SIZES:
        lines = screen(dataclasses.replace(fleet(16, 1), rollouts=(running,)), width, height)
        assert len(lines) <= height and all(len(line) <= width for line in lines)
        line = next(line for line in lines if line.startswith("rollout "))
        assert "7 -> 8: wave 2/3 gating  capacity 15/16 (floor 15)  v8 4 | v7 12" in line
    wide = screen(snapshot(rollouts=(running,)), 220, 50)
    assert any(line.endswith("soak: 4 s left") for line in wide)
    failed = RolloutView(1, "rolled back", 1, 3, 7, 8, 0, 16, 16, 15, False,
                         "smoke on group 0: output 'y' differs", "")
    assert "rolled back" in capture(render(snapshot(rollouts=(failed,))))
    assert "output 'y' differs" in capture(render(snapshot(rollouts=(failed,))))
    assert "rollout" not in capture(render(snapshot()))
    families = {f.name: f for f in text_string_to_metric_families(
        render_metrics(snapshot(rollouts=(running,)), EngineStats()))}
    assert families["modelip_rollout_wave"].samples[0].value == 2
    groups = {s.labels["side"]: (s.labels["version"], s.value)
              for s in families["modelip_rollout_groups"].samples}
    assert groups == {"new": ("8", 4), "old": ("7", 12)}
    phase = {s.labels["phase"]: s.value for s in families["modelip_rollout_phase"].samples}
    assert phase["gating"] == 1 and sum(phase.values()) == 1
    # with deployments: a line and a labelled series per deployment's rollout
    vision = dataclasses.replace(running, deployment="vision", phase="switching")
    both = screen(snapshot(rollouts=(failed, vision)), 220, 50)
    assert any("rollout vision version 7 -> 8: wave 2/3 switching" in line for line in both)
    assert sum(line.startswith("rollout ") for line in both) == 2
    families = {f.name: f for f in text_string_to_metric_families(
        render_metrics(snapshot(rollouts=(failed, vision)), EngineStats()))}
    phases = {(s.labels["deployment"], s.labels["phase"]): s.value
              for s in families["modelip_rollout_phase"].samples if s.value}
    assert phases == {("", "rolled back"): 1, ("vision", "switching"): 1}


def test_a_down_host_shows_how_long_it_has_been_down_and_keeps_its_verdicts() -> None:
    """The host line counts from when it was last up (its retries do not restart it);
    a quarantined card of that host keeps its own line and reason."""
    cards = (CardView("host1", 0, "h1-card0", 1, 0, "DISCONNECTED", "", 1, 1, "",
                      "host host1 unreachable", 0.4),
             CardView("host1", 1, "h1-card1", 1, 1, "QUARANTINED", "", 1, 1, "",
                      "report signature does not verify", 50.0))
    hosts = (HostView("host1", "127.0.0.1:9", "REFUSING", "staging: RESOURCE_EXHAUSTED", 2,
                      0, 0, 0.4, not_up_for=366.0),)
    text = capture(render(snapshot(cards=cards, hosts=hosts, counts={}), width=160,
                          height=30), 160, 30)
    assert "host host1 REFUSING for 6m06s: staging: RESOURCE_EXHAUSTED (2 cards)" in text
    assert "host1/1 QUARANTINED for 50.0s: report signature does not verify" in text
    assert "host1/0 DISCONNECTED" not in text   # folded into the host's line


def test_every_state_of_the_engine_has_its_look() -> None:
    """The dashboard reads the states and their groupings from the engine: a new state
    without a glyph or a style fails here, not as '?' on an operator's screen."""
    from orchestrator.engine.state import SETTLED as ENGINE_SETTLED
    from orchestrator.engine.state import CardState, HostState
    from orchestrator.views.dashboard import GLYPHS, HOST_STYLES, ORDER, SETTLED

    assert set(GLYPHS) == {s.value for s in CardState} == set(ORDER)
    assert set(HOST_STYLES) == {s.value for s in HostState}
    assert SETTLED == {s.value for s in ENGINE_SETTLED}


def test_deployments_are_a_line_each_short_ones_first_and_the_rest_counted() -> None:
    from orchestrator.engine.events import DeploymentOutcome

    whole = [DeploymentOutcome(f"d{i:02d}", 1, 2, 2, 2) for i in range(8)]
    pending = DeploymentOutcome("zeta", 3, 1, 1, 3, "needs 3 groups of 4 cards; 1 free group "
                                "of 4 on hosts that match", pending=True)
    unserved = DeploymentOutcome("omega", 1, 0, 0, 2, "its key custody failed: wrong PIN")
    text = capture(render(snapshot(deployments=(*whole, pending, unserved)), height=50))
    lines = [line for line in text.splitlines() if line.startswith("deployment ")]
    assert lines[0].startswith("deployment omega v1  0/0 groups serving (2 wanted)  NOT "
                               "SERVED: its key custody failed")
    assert lines[1].startswith("deployment zeta v3  1/1 groups serving (3 wanted)  PENDING: "
                               "needs 3 groups of 4 cards")
    assert len(lines) == 6 and "+4 more deployments, every group serving" in text
    assert "deployment" not in capture(render(snapshot()))   # one model: no such line
    assert "(PENDING: needs 3 groups" in pending.line()
    assert "(short: its key custody failed" in unserved.line()
