"""Deployments with replicas sharing a PostgreSQL store (docs/deployments.md, docs/
replicas.md): every replica places alike and drives the hosts it holds, whichever
deployments their cards serve; a replica killed, the other carries its hosts' cards
of every deployment. Real `modelip watch` processes against a live `modelip emulate`."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import psycopg

from orchestrator.crypto.mek import MEK, write_mek
from orchestrator.transport.client import HostClient
from tests.test_replicas import (
    HOSTS,
    MODELIP,
    Replica,
    duplicate_loads,
    fleet,
    owners,
    reloads,
    replicas,
    rows,
    wait_for,
)

__all__ = ["fleet", "replicas"]   # the fixtures, used by name


def _plan(plan: Path, *, only_a: bool = False, a_version: int = 1, a_more: str = ""
          ) -> Path:
    """The fleet's plan, as two deployments with MEK files of their own (or a alone;
    ``a_version`` of a's model, ``a_more``: more of a's keys)."""
    text = plan.read_text()
    for name in ("a", "b"):
        if not (plan.parent / f"{name}.bin").exists():
            write_mek(plan.parent / f"{name}.bin", MEK.generate())
    body = text.split("fleet:", 1)[1]
    path = plan.parent / ("only-a.yaml" if only_a else f"deployments-{a_version}.yaml")
    path.write_text("deployments:\n"
                    f"  - {{name: a, model: {{onnx: tiny.onnx, id: a, version: {a_version}}}, "
                    f"mek: {{file: a.bin}}, groups: 4{a_more}}}\n" + ("" if only_a else
                    "  - {name: b, model: {onnx: tiny.onnx, id: b}, mek: {file: b.bin}, "
                    "groups: 6}\n") + "fleet:" + body)
    return path


def _serving(url: str) -> dict[tuple[str, int], str]:
    try:
        return {(str(h), int(d)): str(p) for h, d, p in rows(
            url, "SELECT host, device, program_id FROM cards WHERE state = 'SERVING'")}
    except psycopg.errors.UndefinedTable:   # no replica has made the schema yet
        return {}


def _placed(url: str) -> dict[tuple[str, int], str]:
    return {(str(h), d): str(n) for h, devices, n in rows(
        url, "SELECT host, devices, deployment FROM placements") for d in json.loads(devices)}


async def _held(addresses: list[str]) -> dict[tuple[str, int], str]:
    """(address, device) -> the program the host says the card holds."""
    held = {}
    for address in addresses:
        async with HostClient(address) as client:
            for d in await client.list_devices():
                held[(address, d.device)] = d.program_id
    return held


def test_replicas_drive_every_deployment_on_the_hosts_they_hold(
        fleet: tuple[Path, list[str]], replicas: Callable[..., Replica], database: str
        ) -> None:
    plan, addresses = fleet
    deployments = _plan(plan)
    first = replicas("r1", plan=deployments)
    second = replicas("r2", plan=deployments)

    seen: dict[tuple[str, int], str] = {}

    def settled() -> bool:
        for replica in (first, second):
            assert replica.process.poll() is None, replica.err.read_text()
        # one reading (a loaded machine may move a lease, and re-key a host's cards,
        # between two): exactly the placed cards serve, no other
        seen.clear()
        seen.update(_serving(database))
        return len(seen) == 10 and set(seen) == set(_placed(database)) and owners(
            database) == {"r1": HOSTS // 2, "r2": HOSTS // 2}
    wait_for("both deployments serving, the hosts shared", settled)
    placed = _placed(database)
    assert Counter(placed.values()) == {"a": 4, "b": 6}
    serving = dict(seen)
    programs = {n: {serving[c] for c, m in placed.items() if m == n} for n in ("a", "b")}
    assert len(programs["a"]) == len(programs["b"]) == 1 and programs["a"] != programs["b"]
    held = anyio.run(_held, addresses)
    for card, name in placed.items():   # the hosts' own word: each card its deployment's
        assert held[card] == next(iter(programs[name])), card
    both = {e["deployment"] for r in (first, second) for e in r.events("card")}
    assert both == {"a", "b"}
    status = subprocess.run([*MODELIP, "status", str(deployments), "--store", database],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "deployment a (version 1): 4/4 groups serving, 4 wanted" in status, status
    assert "deployment b (version 1): 6/6 groups serving, 6 wanted" in status, status

    # one replica killed: the other takes its hosts and every card of both serves on
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    loads = {c: p for c, p in held.items() if p}
    wait_for("the survivor holds every host", lambda: owners(database) == {"r2": HOSTS})
    wait_for("every placed card serves again", lambda: set(_serving(database)) == set(placed))
    assert _placed(database) == placed       # nothing re-placed: the same groups
    assert {c: p for c, p in anyio.run(_held, addresses).items() if p} == loads
    assert duplicate_loads(database) == []


async def _listing(addresses: list[str]) -> dict[tuple[str, int], tuple[int, str]]:
    listed = {}
    for address in addresses:
        async with HostClient(address) as client:
            for d in await client.list_devices():
                listed[(address, d.device)] = (d.boot_counter, d.program_id)
    return listed


def test_a_replica_taking_a_host_gives_up_what_the_plan_no_longer_places(
        fleet: tuple[Path, list[str]], replicas: Callable[..., Replica], database: str
        ) -> None:
    """Deployments a and b run; the replicas stop; one starts with a plan of a alone
    (the fleet replaced on purpose): b's cards, on every host it takes, are unloaded
    and reset and leave the store; a's serve on untouched."""
    plan, addresses = fleet
    both = replicas("r1", plan=_plan(plan))
    wait_for("both deployments serving", lambda: len(_serving(database)) == 10)
    placed = _placed(database)
    before = anyio.run(_listing, addresses)
    both.stop()
    alone = replicas("r2", "--replace-fleet", plan=_plan(plan, only_a=True))
    wait_for("b's cards gone from the store, a's serving", lambda: set(
        _serving(database)) == {c for c, n in placed.items() if n == "a"} and len(rows(
            database, "SELECT 1 FROM cards")) == 4, 90)
    assert alone.process.poll() is None, alone.err.read_text()
    b_cards = [c for c, n in placed.items() if n == "b"]

    def rebooted() -> bool:   # a reset is answered before the card's reboot ends
        after = anyio.run(_listing, addresses)
        return all(after[c][0] > before[c][0] and after[c][1] == "" for c in b_cards)
    wait_for("b's cards reset, nothing loaded, by the hosts' listing", rebooted, 30)
    after = anyio.run(_listing, addresses)
    for card, name in placed.items():
        if name == "a":    # untouched: same boot, same program
            assert after[card] == before[card], card
    given_up = rows(database, "SELECT count(*) FROM transitions WHERE reason LIKE "
                              "'given up when this replica took the host%%'")
    assert given_up == [(6,)]


def test_a_deployments_rollout_is_led_by_one_replica_and_survives_its_leader(
        fleet: tuple[Path, list[str]], replicas: Callable[..., Replica], database: str
        ) -> None:
    """a and b serve on two replicas; both restart with a's version 2 and a rollout:
    one replica leads it under a's own rollout lease; SIGKILL of that leader while a
    wave is gated: the other leads on, the rollout commits once, every a card holds
    the new version by the hosts' word, b's cards are untouched."""
    plan, addresses = fleet
    v1 = _plan(plan)
    first, second = replicas("r1", plan=v1), replicas("r2", plan=v1)
    wait_for("both deployments serving", lambda: len(_serving(database)) == 10, 90)
    placed = _placed(database)
    before = anyio.run(_listing, addresses)
    first.stop()
    second.stop()
    v2 = _plan(plan, a_version=2, a_more=", rollout: {canary: 1, steps: [2], soak: 5}")
    first = replicas("r3", "--replace-fleet", plan=v2)
    # the second joins once the first has made version 2's plan the fleet's
    wait_for("r3 holds hosts", lambda: owners(database).get("r3", 0) > 0, 60)
    second = replicas("r4", plan=v2)

    def leader() -> str:
        held = rows(database, "SELECT owner FROM leases WHERE host = ':rollout:a' AND "
                              "expires > now()")
        return str(held[0][0]) if held else ""
    wait_for("both replicas hold hosts, a's rollout gating a wave, led by one", lambda: (
        owners(database).get("r4", 0) > 0 and bool(leader()) and bool(rows(
            database, "SELECT 1 FROM rollouts WHERE deployment = 'a' AND phase = 'gating'"))),
        90)
    assert second.process.poll() is None, second.err.read_text()
    assert rows(database, "SELECT count(*) FROM leases WHERE host = ':rollout'") == [(0,)]
    killed = {"r3": first, "r4": second}[leader()]
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(timeout=30)
    wait_for("a's rollout committed", lambda: rows(
        database, "SELECT deployment, phase FROM rollouts") == [("a", "committed")], 120)
    survivor = second if killed is first else first
    assert survivor.process.poll() is None, survivor.err.read_text()
    assert leader() in ("", survivor.name)
    commits = rows(database, "SELECT count(*) FROM rollout_history WHERE phase = 'committed'")
    assert commits == [(1,)]
    wait_for("every placed card serving", lambda: set(_serving(database)) == set(placed), 60)
    after = anyio.run(_listing, addresses)
    a_cards = [c for c, n in placed.items() if n == "a"]
    assert len({after[c][1] for c in a_cards}) == 1
    assert {after[c][1] for c in a_cards}.isdisjoint({before[c][1] for c in a_cards})
    for card, name in placed.items():
        if name == "b":    # untouched: same boot, same program
            assert after[card] == before[card], card
    assert reloads(database) == []   # no card loaded with what it held
    said = subprocess.run([*MODELIP, "rollout", "status", str(v2), "--store", database,
                           "--deployment", "a", "--json"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    view = json.loads(said)
    assert view["deployment"] == "a" and view["rollout"]["phase"] == "committed"
