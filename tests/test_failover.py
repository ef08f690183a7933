"""Failover of deployments' groups (docs/deployments.md "Failover"): three hosts, each
a `modelip emulate` process of its own; a real `modelip watch`. The process of a host
holding a group is stopped (SIGSTOP): past `timeouts.failover` its group is placed on
a free card of another host and serves there (the hosts' own listing); SIGCONT: the
card it left, still holding the deployment's program, is unloaded and reset before
the host is driven again, and the group is not moved back."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from contextlib import ExitStack
from pathlib import Path

import anyio

from orchestrator.transport.client import HostClient
from tests.emulate import emulate, watching
from tests.models import tiny_mlp


def _journal(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite") as db:
        return list(db.execute(sql))


def _placed(tmp_path: Path) -> dict[tuple[str, int], str]:
    return {(str(h), d): str(n) for h, devices, n in _journal(
        tmp_path, "SELECT host, devices, deployment FROM placements")
        for d in json.loads(str(devices))}


async def _listing(addresses: list[str], skip: str = "") -> dict[tuple[str, int], tuple[int, str]]:
    listed = {}
    for address in addresses:
        if address != skip:
            async with HostClient(address) as client:
                for d in await client.list_devices():
                    listed[(address, d.device)] = (d.boot_counter, d.program_id)
    return listed


def _wait(what: str, condition: object, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {limit} s: {what}"
        time.sleep(0.2)


def test_a_host_down_past_failover_has_its_group_served_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(tiny_mlp(seed=3).SerializeToString())
    with ExitStack() as stack:
        pids: list[int] = []
        emulators = [stack.enter_context(emulate(tmp_path / name, hosts=1, devices=2,
                                                 pids=pids)) for name in ("x", "y", "z")]
        addresses = [a for found, _ in emulators for a in found]
        roots = ", ".join(str(root) for _, root in emulators)
        hosts = "".join(f"    - {{address: \"{a}\", devices: [0, 1]}}\n" for a in addresses)
        plan = tmp_path / "plan.yaml"
        plan.write_text(f"""deployments:
  - {{name: a, model: {{onnx: m.onnx, id: a}}, mek: {{generate: true}}, groups: 2}}
  - {{name: b, model: {{onnx: m.onnx, id: b}}, mek: {{generate: true}}, groups: 1}}
fleet:
  hosts:
{hosts}trust: {{roots: [{roots}]}}
retry: {{attempts: 3, backoff: 0.05}}
rekey: {{check_interval: 0.5, min_interval: 0.1, probe_timeout: 1}}
timeouts: {{rpc: 2, failover: 2}}
state_dir: state
""")
        watch = watching(plan, tmp_path)
        try:
            before = _placed(tmp_path)
            a_cards = sorted(c for c, n in before.items() if n == "a")
            assert len(a_cards) == 2 and len({h for h, _ in a_cards}) == 2   # spread
            listing = anyio.run(_listing, addresses)
            a_program = listing[a_cards[0]][1]
            gone = a_cards[0]
            pid = next(p for (found, _), p in zip(emulators, pids, strict=True)
                       if gone[0] in found)
            os.kill(pid, signal.SIGSTOP)
            try:
                _wait("a's group placed on another host and serving there", lambda: (
                    gone not in _placed(tmp_path) and
                    sum(n == "a" for n in _placed(tmp_path).values()) == 2 and
                    {str(s) for h, d, s in _journal(tmp_path, "SELECT host, device, state "
                                                    "FROM cards") if (str(h), d) in {
                        c for c, n in _placed(tmp_path).items() if n == "a"}} == {"SERVING"}))
                after = _placed(tmp_path)
                moved = next(c for c, n in after.items() if n == "a" and c not in before)
                assert moved[0] != gone[0]
                assert {c: n for c, n in after.items() if n == "b"} == \
                    {c: n for c, n in before.items() if n == "b"}     # b not touched
                held = anyio.run(_listing, addresses, gone[0])
                assert held[moved][1] == a_program    # by the host's own listing
                assert _journal(tmp_path, "SELECT count(*) FROM transitions WHERE reason "
                                          "LIKE '%lacks the program%'") == [(0,)]  # staged first
            finally:
                os.kill(pid, signal.SIGCONT)
            # back: the card it left is unloaded and reset, the group stays where it went
            def reset() -> bool:
                boot, program = anyio.run(_listing, addresses)[gone]
                return program == "" and boot > listing[gone][0]
            _wait("the card left behind reset and empty", reset)
            assert _placed(tmp_path) == after
            assert _journal(tmp_path, "SELECT count(*) FROM transitions WHERE reason LIKE "
                                      "'given up when its host answered again%'") == [(1,)]
            assert (gone[0], gone[1]) not in {(str(h), d) for h, d in _journal(
                tmp_path, "SELECT host, device FROM cards")}     # forgotten
        finally:
            watch.terminate()
            out, err = watch.communicate(timeout=60)
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        placements = [e for e in events if e["event"] == "placement"]
        assert placements and placements[0]["deployment"] == "a", err
        assert f"{moved[0]} [{moved[1]}]" in placements[0]["added"]
        assert "down longer than timeouts.failover (2 s)" in placements[0]["why"]
