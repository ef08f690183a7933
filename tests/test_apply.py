"""Applying a changed plan to a running watch (docs/deployments.md "Applying"): a real
`modelip watch` of two deployments against a live `modelip emulate`; `modelip apply`
removes one, shrinks the other and adds a third. Checked from the hosts' side: the
cards that changed deployment were reset and hold the new deployment's program, the
ones no deployment holds any more were unloaded and reset, the ones that stayed were
not touched."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio

from orchestrator.transport.client import HostClient
from tests.emulate import emulate, watching
from tests.models import tiny_mlp

MODELIP = [sys.executable, "-m", "orchestrator"]


def _plan(tmp_path: Path, name: str, addresses: list[str], root: Path,
          deployments: str) -> Path:
    hosts = "".join(f"    - {{address: \"{a}\", devices: [0, 1, 2, 3]}}\n" for a in addresses)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""deployments:
{deployments}fleet:
  hosts:
{hosts}trust: {{roots: [{root}]}}
retry: {{attempts: 3, backoff: 0.05}}
rekey: {{check_interval: 1, min_interval: 0.1}}
state_dir: state
""")
    return path


def _deployment(name: str, groups: int, version: int = 1, more: str = "",
                mek: str = "generate: true") -> str:
    return (f"  - {{name: {name}, model: {{onnx: m.onnx, id: {name}, version: {version}}}, "
            f"mek: {{{mek}}}, groups: {groups}{more}}}\n")


async def _cards(addresses: list[str]) -> dict[tuple[int, int], tuple[int, str]]:
    """(host index, device) -> (boot counter, program), as the hosts list them."""
    listed = {}
    for index, address in enumerate(addresses):
        async with HostClient(address) as client:
            for d in await client.list_devices():
                listed[(index, d.device)] = (d.boot_counter, d.program_id)
    return listed


def _journal(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite") as db:
        return list(db.execute(sql))


def _apply(plan: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MODELIP, "apply", str(plan), *extra], capture_output=True,
                          text=True, timeout=180, check=False)


def test_a_running_watch_applies_a_changed_plan(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(tiny_mlp(seed=1).SerializeToString())
    with emulate(tmp_path, hosts=2, devices=4) as (addresses, root):
        v1 = _plan(tmp_path, "v1", addresses, root, _deployment("a", 3) + _deployment("b", 2))
        watch = watching(v1, tmp_path)
        try:
            before = anyio.run(_cards, addresses)
            placed_before = {(str(h), tuple(json.loads(str(d)))): str(n) for h, d, n in
                             _journal(tmp_path, "SELECT host, devices, deployment FROM "
                                                "placements")}
            assert sorted(placed_before.values()) == ["a", "a", "a", "b", "b"]

            v2 = _plan(tmp_path, "v2", addresses, root, _deployment("a", 2) + _deployment("c", 3))
            dry = _apply(v2, "--dry-run")
            assert dry.returncode == 0, dry.stderr
            lines = dry.stdout.splitlines()
            assert any(line.startswith("- b: removed; 2 group(s) given up") for line in lines)
            assert any(line.startswith("~ a: 3 -> 2 groups; given up: ") for line in lines)
            assert any(line.startswith("+ c: new, 0 -> 3 groups; placed on ") for line in lines)
            assert lines[-1] == "dry run: nothing applied"
            assert _journal(tmp_path, "SELECT count(*) FROM applies") == [(0,)]
            assert anyio.run(_cards, addresses) == before        # nothing touched

            done = _apply(v2)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "applied (the cards come up now" in done.stdout
            placed = {(str(h), tuple(json.loads(str(d)))): str(n) for h, d, n in
                      _journal(tmp_path, "SELECT host, devices, deployment FROM placements")}
            assert sorted(placed.values()) == ["a", "a", "c", "c", "c"]
            kept = {g for g, n in placed.items() if n == "a"}
            assert kept <= {g for g, n in placed_before.items() if n == "a"}  # a stayed put

            programs = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rows = _journal(tmp_path, "SELECT host, device, state, program_id FROM cards")
                programs = {(str(h), int(d)): (str(s), str(p)) for h, d, s, p in rows}
                if len(programs) == 5 and {s for s, _ in programs.values()} == {"SERVING"}:
                    break
                time.sleep(0.2)
            assert len(programs) == 5 and {s for s, _ in programs.values()} == {"SERVING"}, \
                programs
            after = anyio.run(_cards, addresses)
            index = {address: i for i, address in enumerate(addresses)}
            card_of = {(index[h], d): n for (h, devices), n in placed.items() for d in devices}
            card_before = {(index[h], d): n for (h, devices), n in placed_before.items()
                           for d in devices}
            c_program = {p for (h, d), (_, p) in programs.items()
                         if card_of[(index[h], d)] == "c"}
            assert len(c_program) == 1
            for card, (boot, program) in after.items():
                was, now = card_before.get(card), card_of.get(card)
                if was is not None and was == now:       # stayed: not touched
                    assert (boot, program) == before[card], card
                elif was is not None and now is not None:   # handed over: reset, then c's
                    assert boot > before[card][0] and program in c_program, card
                elif was is not None:                    # given up: unloaded and reset
                    assert boot > before[card][0] and program == "", card
                elif now is not None:                    # new: c's program
                    assert program in c_program, card
            assert {c for c, n in card_before.items() if n != card_of.get(c)}, \
                "the test moved no card"

            # a's new version goes through a's rollout; c is not touched
            v3 = _plan(tmp_path, "v3", addresses, root, _deployment(
                "a", 2, version=2, more=", rollout: {canary: 1}") + _deployment("c", 3))
            dry = _apply(v3, "--dry-run")
            assert "~ a: 2 groups; model version 1 -> 2 through its rollout" in \
                dry.stdout.splitlines(), dry.stdout
            done = _apply(v3)
            assert done.returncode == 0, done.stdout + done.stderr
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _journal(
                    tmp_path, "SELECT deployment, phase FROM rollouts") != [("a", "committed")]:
                time.sleep(0.2)
            assert _journal(tmp_path, "SELECT deployment, phase, waves FROM rollouts") == [
                ("a", "committed", "[1, 2]")]
            a_cards = {c for c, n in card_of.items() if n == "a"}
            rolled = anyio.run(_cards, addresses)
            for card, (boot, program) in rolled.items():
                if card in a_cards:   # the same key domain: switched, not reset
                    assert boot == after[card][0] and program not in ("", after[card][1])
                else:
                    assert (boot, program) == after[card], card
            assert len({rolled[c][1] for c in a_cards}) == 1
            assert _journal(tmp_path, "SELECT count(*) FROM transitions WHERE reason LIKE "
                                      "'%lacks the program%'") == [(0,)]   # staged first

            # a's own trust policy added: said by the diff
            v6 = _plan(tmp_path, "v6", addresses, root, _deployment(
                "a", 2, version=2, more=", rollout: {canary: 1}, trust: {policy: "
                "{max_age: 60}}") + _deployment("c", 3))
            dry = _apply(v6, "--dry-run")
            assert "~ a: 2 groups; its trust policy changed (asked at each card's next " \
                "attestation)" in dry.stdout.splitlines(), dry.stdout
            # what a running fleet does not take: one line, exit 2, nothing changed
            (tmp_path / "other.mek").write_bytes(bytes(range(16)))
            v5 = _plan(tmp_path, "v5", addresses, root, _deployment(
                "a", 2, version=2, mek="file: other.mek") + _deployment("c", 3))
            refused = _apply(v5)
            assert refused.returncode == 2 and "deployment a: its MEK changed" in \
                refused.stderr, refused.stderr
            assert anyio.run(_cards, addresses) == rolled
        finally:
            watch.terminate()
            watch.communicate(timeout=60)
        v4 = _plan(tmp_path, "v4", addresses, root, _deployment("a", 1, version=2))
        idle = _apply(v4)
        assert idle.returncode == 2 and "no `modelip watch` runs on" in idle.stderr, \
            idle.stderr
        # deploy applies it from the start: what it no longer places is given up there
        before = anyio.run(_cards, addresses)
        deployed = subprocess.run([*MODELIP, "deploy", str(v4)], capture_output=True,
                                  text=True, timeout=180, check=False)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        rows = _journal(tmp_path, "SELECT host, device, state FROM cards")
        assert len(rows) == 1 and rows[0][2] == "SERVING", rows
        kept = (index[str(rows[0][0])], int(rows[0][1]))
        after = anyio.run(_cards, addresses)
        for card, (boot, program) in after.items():
            if card == kept:
                assert (boot, program) == before[card]
            elif before[card][1]:           # it held a program: unloaded and reset
                assert boot > before[card][0] and program == "", card
        history = _journal(tmp_path, "SELECT count(*) FROM transitions WHERE reason LIKE "
                                     "'given up at the start%'")
        assert history == [(4,)]   # c's three cards and one of a's two
