"""Cards claimed by a fleet (docs/protocol.md "Claims"): two fleets (two state
directories, so two journals and two identities) whose plans both name card 3 of
one host, each a real `modelip deploy` against a live `modelip emulate`. The host
refuses the second fleet's load, names the holder, and counts it; `--take-over`
takes the card on purpose, journaled on both sides; the first fleet then loads
nothing over it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from orchestrator.agent.aborts import HostAbort
from orchestrator.agent.claims import ClaimKeeper
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import CLAIM_KEY, TAKE_OVER_KEY
from tests.emulate import emulate
from tests.models import tiny_mlp

MODELIP = [sys.executable, "-m", "orchestrator"]


def _plan(tmp_path: Path, name: str, address: str, root: Path, devices: list[int]) -> Path:
    (tmp_path / "m.onnx").write_bytes(tiny_mlp(seed=1).SerializeToString())
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
model: {{onnx: m.onnx, id: {name}, version: 1}}
mek: {{generate: true}}
fleet:
  hosts:
    - {{address: "{address}", devices: {devices}}}
trust: {{roots: [{root}]}}
retry: {{attempts: 2, backoff: 0.05}}
state_dir: state-{name}
""")
    return path


def _deploy(plan: Path, *extra: str) -> tuple[int, dict[int, dict[str, object]], str]:
    """(exit code, each card's last event by device, stderr)."""
    run = subprocess.run([*MODELIP, "deploy", str(plan), "--json", *extra],
                         capture_output=True, text=True, timeout=180, check=False)
    cards: dict[int, dict[str, object]] = {}
    for line in run.stdout.splitlines():
        event = json.loads(line)
        if event["event"] == "card":
            cards[int(event["device"])] = event
    return run.returncode, cards, run.stderr


def _identity(tmp_path: Path, name: str) -> str:
    with sqlite3.connect(tmp_path / f"state-{name}" / "journal.sqlite") as db:
        return str(db.execute("SELECT fleet FROM identity").fetchone()[0])


def _history(tmp_path: Path, name: str, device: int) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / f"state-{name}" / "journal.sqlite") as db:
        return [(str(s), str(r)) for s, r in db.execute(
            "SELECT to_state, reason FROM transitions WHERE device = ? ORDER BY id", (device,))]


async def _host(address: str) -> tuple[dict[str, int], dict[int, tuple[str, str]]]:
    """The host's counts and, per card, (program, holder) as it lists them."""
    async with HostClient(address) as client:
        return await client.stats(), {d.device: (d.program_id, d.claimed_by)
                                      for d in await client.list_devices()}


def test_a_card_another_fleet_holds_is_refused_then_taken_over_on_purpose(tmp_path: Path
                                                                          ) -> None:
    with emulate(tmp_path, hosts=1, devices=4) as (addresses, root):
        address = addresses[0]
        first = _plan(tmp_path, "first", address, root, [0, 1, 2, 3])
        second = _plan(tmp_path, "second", address, root, [3])
        code, cards, _ = _deploy(first)
        assert code == 0 and {c["state"] for c in cards.values()} == {"SERVING"}
        a = _identity(tmp_path, "first")
        stats, listed = anyio.run(_host, address)
        assert {holder for _, holder in listed.values()} == {a}
        loads, program_a = stats["load_count"], listed[3][0]
        ip, port = address.rsplit(":", 1)
        said = subprocess.run([*MODELIP, "device", "list", "--ip", ip, "--port", port],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        assert said.count(f"held by {a}") == 4, said

        # the second fleet: refused, the holder named, nothing loaded; exit 4 (short)
        code, cards, _ = _deploy(second)
        b = _identity(tmp_path, "second")
        assert a != b and code == 4
        assert cards[3]["state"] == "FAILED", cards[3]
        assert f"held by fleet {a}, not {b}" in str(cards[3]["reason"])
        assert "--take-over" in str(cards[3]["reason"])
        stats, listed = anyio.run(_host, address)
        assert stats["load_count"] == loads and stats["claimed_refusals"] == 1
        assert listed[3] == (program_a, a)     # still the first fleet's program

        # on purpose: taken over, the host counts it and names the fleet it was taken from
        code, cards, _ = _deploy(second, "--take-over")
        assert code == 0 and cards[3]["state"] == "SERVING", cards[3]
        assert f"taken over from fleet {a} (--take-over)" in str(cards[3]["reason"])
        stats, listed = anyio.run(_host, address)
        assert stats["takeovers"] == 1 and stats["load_count"] == loads + 1
        assert listed[3][1] == b and listed[3][0] != program_a
        assert any(f"taken over from fleet {a}" in reason
                   for _, reason in _history(tmp_path, "second", 3))

        # the first fleet again, without --take-over: it loads nothing over card 3
        code, cards, _ = _deploy(first)
        assert code == 4 and cards[3]["state"] == "FAILED"
        assert f"held by fleet {b}, not {a}" in str(cards[3]["reason"])
        assert {cards[d]["state"] for d in (0, 1, 2) if d in cards} <= {"SERVING"}
        stats, listed = anyio.run(_host, address)
        assert stats["load_count"] == loads + 1 and stats["claimed_refusals"] == 2
        assert listed[3][1] == b


def _metadata(fleet: str | None, take_over: bool = False) -> list[tuple[str, str]]:
    said = [] if fleet is None else [(CLAIM_KEY, fleet)]
    return said + ([(TAKE_OVER_KEY, "1")] if take_over else [])


def test_the_claim_rules() -> None:
    """A load claims; another fleet is refused until it takes over; the holder's
    unload frees the card; a call naming no fleet is not checked; a reset does not
    claim; a bad identity is a format error."""
    keeper = ClaimKeeper("h")
    keeper.settle(keeper.admit(_metadata("a"), 0), "LoadProgram")
    assert keeper.holder(0) == "a"
    with pytest.raises(HostAbort, match="card 0 is held by fleet a, not b"):
        keeper.admit(_metadata("b"), 0)
    assert keeper.admit(_metadata(None), 0) is None    # the reference tool's calls
    keeper.settle(keeper.admit(_metadata("b"), 1), "ResetDevice")
    assert keeper.holder(1) == ""                      # a reset claims nothing
    taken = keeper.settle(keeper.admit(_metadata("b", take_over=True), 0), "ResetDevice")
    assert taken == "a" and keeper.holder(0) == "b" and keeper.takeovers == 1
    keeper.settle(keeper.admit(_metadata("b"), 0), "Unload")
    assert keeper.holder(0) == ""                      # drained: free
    keeper.settle(keeper.admit(_metadata("a"), 0), "LoadProgram")
    assert keeper.holder(0) == "a" and keeper.refusals == 1
    with pytest.raises(HostAbort, match="printable"):
        keeper.admit(_metadata("two words"), 0)
