"""The orchestrator as a process against a live `modelip emulate`: kills, signals, bad plans."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from orchestrator.engine.store.sqlite import SQLiteStore
from tests.emulate import MODELIP, emulate
from tests.models import tiny_mlp


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A live `modelip emulate` (1 host, 4 cards); yields its address and trust root."""
    with emulate(tmp_path) as (addresses, root):
        yield addresses[0], root


def real_plan(tmp_path: Path, address: str, root: Path, *, extra: str = "",
              devices: int = 4, check_interval: float = 0.5) -> Path:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    path = tmp_path / "plan.yaml"
    path.write_text(f"""
model:
  onnx: tiny.onnx
mek:
  generate: true
fleet:
  hosts:
    - address: {address}
      devices: {list(range(devices))}
trust:
  roots: [{root}]
retry:
  attempts: 3
  backoff: 0.05
rekey:
  check_interval: {check_interval}
state_dir: state
{extra}
""")
    return path


def run_until(plan: Path, command: str, stop_when: str, count: int, sig: int
              ) -> tuple[int, list[dict[str, object]]]:
    """Start `modelip COMMAND plan --json`, send ``sig`` at the count-th event matching."""
    process = subprocess.Popen([*MODELIP, command, str(plan), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    seen = 0
    assert process.stdout is not None
    for line in process.stdout:
        event = json.loads(line)
        events.append(event)
        if stop_when in (event.get("event"), event.get("state")):
            seen += 1
            if seen == count:
                process.send_signal(sig)
                break
    rest, _ = process.communicate(timeout=60)
    events += [json.loads(line) for line in rest.splitlines() if line.strip()]
    return process.returncode, events


@pytest.mark.parametrize(("stop_when", "count"), [("staged", 1), ("KEYED", 2), ("LOADING", 3),
                                                  ("deployed", 1)])
def test_sigkill_then_restart_resumes_without_duplicate_loads(
        tmp_path: Path, emulator: tuple[str, Path], stop_when: str, count: int) -> None:
    address, root = emulator
    plan = real_plan(tmp_path, address, root)
    code, _ = run_until(plan, "watch", stop_when, count, signal.SIGKILL)
    assert code == -signal.SIGKILL
    result = subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    with SQLiteStore(tmp_path / "state" / "journal.sqlite") as journal:
        assert {c.state for c in anyio.run(journal.cards)} == {"SERVING"}
        ok_loads = [(r.host, r.device, r.session_id, r.program_id) for r in anyio.run(journal.loads)
                    if r.outcome == "ok"]
        assert len(ok_loads) == len(set(ok_loads))  # never the same load twice
        # a card whose session did not change was confirmed, not reloaded
        per_session: dict[tuple[str, int, str], int] = {}
        for h, d, s, _ in ok_loads:
            per_session[(h, d, s)] = per_session.get((h, d, s), 0) + 1
        assert all(n == 1 for n in per_session.values())
    events = [json.loads(line) for line in result.stdout.splitlines()]
    if stop_when == "deployed":  # everything was serving: nothing is loaded again
        assert not [e for e in events if e.get("state") == "LOADING"]
        assert sum("not reloaded" in str(e.get("reason")) for e in events) == 4


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_graceful_stop_leaves_a_consistent_journal(tmp_path: Path, emulator: tuple[str, Path],
                                                   sig: int, expected: int) -> None:
    address, root = emulator
    plan = real_plan(tmp_path, address, root)
    code, events = run_until(plan, "watch", "LOADING", 2, sig)
    assert code == expected
    with SQLiteStore(tmp_path / "state" / "journal.sqlite") as journal:
        states = {c.state for c in anyio.run(journal.cards)}
        assert states <= {"SERVING", "PENDING"}, states  # in-flight work finished or rolled back
        sent = [r for r in anyio.run(journal.loads) if r.outcome == "sent"]
        assert not sent or "PENDING" in states


def test_deploy_summary_and_exit_code_for_an_unreachable_host(tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_bytes(b"")
    from orchestrator.emulator.pki import VendorPKI

    VendorPKI.create().save(tmp_path / "pki")
    plan = real_plan(tmp_path, "127.0.0.1:1", tmp_path / "pki" / "root.pem",
                     extra="timeouts:\n  rpc: 1")
    result = subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 4
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["schema"] == 1
    assert [c["state"] for c in summary["not_serving"]] == ["DISCONNECTED"] * 4
    assert "unreachable" in summary["not_serving"][0]["reason"]
    assert "(attempt 3)" in summary["not_serving"][0]["reason"]  # the plan's 3 attempts


BAD_PLANS = {
    "syntax": ("model: [unclosed\n", "plan.yaml:2: not valid YAML: expected ',' or ']'"),
    "unknown key": ("model:\n  onnx: tiny.onnx\n  colour: red\nmek:\n  generate: true\n"
                    "fleet:\n  emulated: {hosts: 1}\n", "plan.yaml:3: model.colour: is not a "
                    "known key"),
    "wrong type": ("model:\n  onnx: tiny.onnx\n  partitions: two\nmek:\n  generate: true\n"
                   "fleet:\n  emulated: {hosts: 1}\n", "plan.yaml:3: model.partitions: must be "
                   "an integer, got str 'two'"),
    "missing file": ("model:\n  qpc: nowhere.qpc\nmek:\n  generate: true\nfleet:\n  emulated: "
                     "{hosts: 1}\n", "plan.yaml:2: model.qpc: nowhere.qpc: file not found"),
    "bad devices": ("model:\n  onnx: tiny.onnx\nmek:\n  generate: true\nfleet:\n  hosts:\n"
                    "    - address: 127.0.0.1:9\n      devices: all\ntrust:\n  roots: [r.pem]\n",
                    "plan.yaml:8: fleet.hosts[0].devices: must be a list of integers"),
    "model is a directory": ("model:\n  onnx: adir\nmek:\n  generate: true\nfleet:\n  emulated: "
                             "{hosts: 1}\n", "plan.yaml:2: model.onnx: adir: is a directory, "
                             "not a file"),
    "too many partitions": ("model:\n  onnx: tiny.onnx\n  partitions: 1000\nmek:\n  generate: "
                            "true\nfleet:\n  emulated: {hosts: 1}\n",
                            "plan.yaml:3: model.partitions: must be between 1 and 256"),
    "bad mek": ("model:\n  onnx: tiny.onnx\nmek:\n  file: short.mek\nfleet:\n  emulated: "
                "{hosts: 1}\n", "short.mek: MEK must be 16 raw bytes or 32 hex digits"),
    "groups": ("model:\n  onnx: tiny.onnx\n  partitions: 3\nmek:\n  generate: true\nfleet:\n"
               "  emulated: {hosts: 1, devices_per_host: 4}\n",
               "fleet.emulated.devices_per_host: 4 cards do not split into MDP groups of 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plans_fail_with_one_clear_line_and_start_nothing(tmp_path: Path, case: str
                                                              ) -> None:
    text, expected = BAD_PLANS[case]
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "short.mek").write_bytes(b"0123456789")
    (tmp_path / "r.pem").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "plan.yaml").write_text(text + "state_dir: state\n")
    result = subprocess.run([*MODELIP, "deploy", str(tmp_path / "plan.yaml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "journal.sqlite").exists()


def test_status_reads_the_journal_without_network(tmp_path: Path, emulator: tuple[str, Path]
                                                  ) -> None:
    address, root = emulator
    plan = real_plan(tmp_path, address, root)
    assert subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                          timeout=120, check=False).returncode == 0
    env = dict(os.environ)
    result = subprocess.run([*MODELIP, "status", str(plan), "--json"], capture_output=True,
                            text=True, timeout=60, check=False, env=env)
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert [c["state"] for c in document["cards"]] == ["SERVING"] * 4
    assert len(document["loads"]) == 4
    assert document["rollup"] == {"cards": 4, "by_state": {"SERVING": 4}, "hosts": 1,
                                  "hosts_up": 1, "groups": 4, "groups_serving": 4,
                                  "loads": 4}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00",
                        document["cards"][0]["updated"])  # ISO 8601 in JSON
    # piped: the same rollup as the live view, and --cards one line per card
    rollup = subprocess.run([*MODELIP, "status", str(plan)], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert "hosts serving 1/1   groups serving 4/4" in rollup
    revision = document["revision"]   # the journal's newest, as the control API names it
    assert revision >= 4 * 4 and f"4/4 serving (as last recorded, revision {revision})" \
        in rollup and f"{address} ●●●●" in rollup
    table = subprocess.run([*MODELIP, "status", str(plan), "--cards"], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    rows = [line for line in table.splitlines() if "SERVING" in line]
    assert len(rows) == 4 and all(address in row for row in rows)  # one line per card


def test_a_power_cut_resets_every_card_and_a_watch_brings_them_all_back(tmp_path: Path
                                                                        ) -> None:
    """SIGUSR1 to `modelip emulate` cuts the power (docs/performance.md "Reset storms"):
    every card of every host resets at once; a running watch re-keys each once, with
    one load per card."""
    from tests.emulate import watching

    pids: list[int] = []
    with emulate(tmp_path / "fleet", hosts=2, devices=4, pids=pids) as (addresses, root):
        plan = real_plan(tmp_path, addresses[0], root, check_interval=0)
        plan.write_text(plan.read_text().replace(
            "      devices: [0, 1, 2, 3]\n",
            f"      devices: [0, 1, 2, 3]\n    - address: {addresses[1]}\n"
            "      devices: [0, 1, 2, 3]\n"))

        async def boots() -> dict[tuple[str, int], tuple[int, int]]:
            from orchestrator.transport.client import HostClient

            seen = {}
            for address in addresses:
                async with HostClient(address) as host:
                    loads = (await host.stats())["load_count"]
                    for card in await host.list_devices():
                        seen[(address, card.device)] = (card.boot_counter, loads)
            return seen

        watch = watching(plan, tmp_path)
        assert watch.stdout is not None
        try:
            before = anyio.run(boots)
            os.kill(pids[0], signal.SIGUSR1)
            rekeyed = set()
            for line in watch.stdout:
                event = json.loads(line)
                if event["event"] == "rekeyed":
                    rekeyed.add((event["host"], event["device"]))
                    if len(rekeyed) == 8:
                        break
            after = anyio.run(boots)
        finally:
            watch.send_signal(signal.SIGTERM)
            watch.communicate(timeout=60)
        assert "power cut: 8 cards reset" in (tmp_path / "fleet" / "emulate.log").read_text()
    for card, (boot, loads) in after.items():
        assert boot == before[card][0] + 1, card     # reset once, by the power cut
        assert loads == before[card][1] + 4, card    # one load per card of its host
