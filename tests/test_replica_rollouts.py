"""Rollouts with replicas sharing a fleet through a real PostgreSQL server
(docs/replicas.md "Rollouts"): one replica leads under the rollout's lease, the
others follow the groups' targets from the store; a leader stopped past its lease,
killed during a gate, or undone while paused is replaced and the rollout goes on
from the store's phase and wave. Real `modelip watch` processes, a real `modelip
emulate`, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from orchestrator.transport.client import HostClient
from tests.models import tiny_mlp
from tests.test_replicas import (
    MODELIP,
    TTL,
    Replica,
    fleet,
    owners,
    reloads,
    replicas,
    rows,
    serving,
    wait_for,
)

__all__ = ["fleet", "replicas"]   # fixtures, used by name
ROLLOUT = """
rollout:
  canary: 1
  steps: ["50%", "100%"]
  max_unavailable: 2
  soak: 3
  smoke: {check: finite}
"""


def version_2(plan: Path, database: str) -> Path:
    """Version 1 deployed on the store by a replica of its own (it ends when every card
    serves); the plan of version 2 with ROLLOUT."""
    first = subprocess.run([*MODELIP, "deploy", str(plan), "--json", "--store", database,
                            "--replica", "v1"], capture_output=True, text=True, timeout=180,
                           check=False)
    assert first.returncode == 0, first.stderr
    (plan.parent / "v2.onnx").write_bytes(tiny_mlp(seed=2).SerializeToString())
    v2 = plan.parent / "v2.yaml"
    v2.write_text(plan.read_text().replace("model: {onnx: tiny.onnx}",
                                           "model: {onnx: v2.onnx, version: 2}") + ROLLOUT)
    return v2


def start_two(replicas: Callable[..., Replica], v2: Path, database: str
              ) -> tuple[Replica, Replica]:
    """a makes version 2's plan the fleet's (and so leads: it is first), then b joins."""
    a = replicas("a", "--replace-fleet", plan=v2)
    wait_for("a holds hosts", lambda: owners(database).get("a", 0) > 0)
    wait_for("a leads the rollout", lambda: leads(a))
    return a, replicas("b", plan=v2)


def leads(replica: Replica) -> bool:
    """Its last word on the rollout's lease: it holds it."""
    said = [e["action"] for e in replica.events("lease") if e["host"] == ":rollout"]
    return bool(said) and said[-1] in ("claimed", "took over")


def history(database: str) -> list[tuple[Any, ...]]:
    """(wave, phase, what, replica, ts) of the rollout, in order."""
    return rows(database, "SELECT wave, phase, what, replica, ts FROM rollout_history "
                "ORDER BY id")


def reached(database: str, wave: int, phase: str) -> bool:
    return any(w == wave and p == phase for w, p, *_ in history(database))


def ended(database: str) -> str:
    found = rows(database, "SELECT phase FROM rollouts WHERE ended IS NOT NULL")
    return str(found[0][0]) if found else ""


def programs(database: str) -> tuple[str, str]:
    """(from, to) programs of the rollout."""
    found = rows(database, "SELECT from_program, to_program FROM rollouts")
    return str(found[0][0]), str(found[0][1])


def serving_program(database: str) -> Counter[str]:
    return Counter(p for (p,) in rows(database, "SELECT good_program FROM cards WHERE "
                                                "state = 'SERVING'"))


async def host_counts(addresses: list[str]) -> tuple[int, int]:
    """(loads, fenced refusals) the hosts themselves counted."""
    loads = refused = 0
    for address in addresses:
        async with HostClient(address) as client:
            stats = await client.stats()
            loads += stats["load_count"]
            refused += stats["fenced_refusals"]
    return loads, refused


def check_the_end(database: str, addresses: list[str], phase: str) -> None:
    """Ended once as ``phase``, every card serving the program it says, and every load
    a host received journaled (no call behind the store's back)."""
    wait_for(f"the rollout {phase}", lambda: ended(database) == phase, 180)
    old, new = programs(database)
    want = new if phase == "committed" else old
    wait_for("every card serves its program", lambda: serving_program(database) == {want: 12},
             90)
    said = [p for _, p, *_ in history(database)]
    assert said.count(phase) == 1, said
    waves = [(w, p) for w, p, what, *_ in history(database) if p in ("switching", "gating")
             and " requested by " not in what]   # an operator's request names the phase too
    assert len(waves) == len(set(waves)), waves    # no wave switched or gated twice
    assert reloads(database) == []   # no card loaded with what it held
    loads, refused = anyio.run(host_counts, addresses)
    assert loads == rows(database, "SELECT count(*) FROM loads")[0][0]
    print(f"host-side fenced refusals: {refused}")


def test_a_rollout_across_two_replicas_survives_its_leader_stopped_past_its_lease(
        replicas: Callable[..., Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    v2 = version_2(fleet[0], database)
    a, b = start_two(replicas, v2, database)
    wait_for("b holds its share", lambda: owners(database).get("b", 0) == 3, 60)
    wait_for("wave 2 is gated", lambda: reached(database, 1, "gating"), 120)
    os.kill(a.process.pid, signal.SIGSTOP)
    stopped = time.time()
    wait_for("b leads", lambda: leads(b), 30)
    time.sleep(TTL)
    os.kill(a.process.pid, signal.SIGCONT)
    woke = time.time()
    check_the_end(database, fleet[1], "committed")
    # a wrote no target and no step after it was stopped; b took over the rest
    late = rows(database, "SELECT grp, ts FROM group_targets WHERE replica = 'a' AND "
                "ts > %s", (stopped,))
    assert late == [], late
    assert not [h for h in history(database) if h[3] == "a" and h[4] > stopped]
    assert {h[3] for h in history(database) if h[4] > woke} <= {"b"}
    assert any(e["action"] == "lost" for e in a.events("lease") if e["host"] == ":rollout")


def test_a_killed_leader_is_replaced_at_the_wave_it_was_gating(
        replicas: Callable[..., Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    v2 = version_2(fleet[0], database)
    a, b = start_two(replicas, v2, database)
    wait_for("wave 2 is gated", lambda: reached(database, 1, "gating"), 120)
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(timeout=10)
    killed = time.time()
    took = wait_for("b leads", lambda: leads(b), 30)
    print(f"the rollout's leader replaced {took:.2f} s after SIGKILL (lease TTL {TTL} s)")
    said = subprocess.run([*MODELIP, "rollout", "status", str(v2), "--store", database],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "led by replica b" in said or ended(database), said
    check_the_end(database, fleet[1], "committed")
    after = [(w, p) for w, p, _, who, ts in history(database) if ts > killed]
    assert after and after[0] == (2, "switching"), after   # went on from wave 2's gate


def test_an_undo_while_the_leader_is_stopped_is_carried_out_by_the_next(
        replicas: Callable[..., Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    v2 = version_2(fleet[0], database)
    a, b = start_two(replicas, v2, database)
    wait_for("the canary is gated", lambda: reached(database, 0, "gating"), 120)
    os.kill(a.process.pid, signal.SIGSTOP)
    try:
        undo = subprocess.run([*MODELIP, "rollout", "undo", str(v2), "--store", database],
                              capture_output=True, text=True, timeout=60, check=False)
        assert undo.returncode == 0 and "undo requested" in undo.stdout, undo.stderr
        check_the_end(database, fleet[1], "rolled back")
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    verdict = rows(database, "SELECT verdict FROM rollouts")[0][0]
    assert verdict == "undone by the operator (modelip rollout undo)"
    status = subprocess.run([*MODELIP, "rollout", "status", str(v2), "--store", database],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "rolled back" in status and "undo requested by modelip rollout undo" in status
    # the stopped replica's cards are switched back by whoever holds their hosts now
    # (after its lease lapsed): a moment after the verdict, on a loaded machine
    wait_for("every card serving the old version", lambda: serving(database) == 12, 60)


async def test_a_leader_whose_lease_lapsed_writes_nothing(database: str) -> None:
    """The store's side of the fence: a leader's step and target are written only under
    the rollout's lease; once another replica holds it (the first paused past its TTL),
    the first's writes are refused (LeaseLost), even if its phase is right."""
    import pytest

    from orchestrator.engine.rollout.ledger import Phase
    from orchestrator.engine.rollout.shared import SharedLedger
    from orchestrator.engine.store.postgres import PostgresStore
    from orchestrator.engine.store.protocol import ROLLOUT_LEASE
    from orchestrator.errors import LeaseLost

    a = PostgresStore(database, "a", lease_ttl=1.0)
    b = PostgresStore(database, "b", lease_ttl=1.0)
    await a.open()
    await b.open()
    try:
        first, second = SharedLedger(a), SharedLedger(b)
        record = await first.start("p1", "p2c", "p2", [1, 2], "started")
        assert (await second.start("p1", "p2c", "p2", [1, 2], "again")).id == record.id
        with pytest.raises(LeaseLost):     # nobody leads yet: nobody writes a step
            await first.set_target(record.id, 0, "p2c")
        await a.heartbeat([ROLLOUT_LEASE])
        assert [c.host for c in await a.claim([ROLLOUT_LEASE], 1)] == [ROLLOUT_LEASE]
        await first.set_target(record.id, 0, "p2c")
        record = await first.advance(record, Phase.GATING, "wave 1 switched")
        with pytest.raises(LeaseLost):
            await second.advance(record, Phase.SWITCHING, "b is no leader", wave=1)
        taken: list[Any] = []
        with anyio.fail_after(10):      # a "pauses": its lease lapses, b claims it
            while not taken:
                await anyio.sleep(0.3)
                await b.heartbeat([ROLLOUT_LEASE])
                taken = await b.claim([ROLLOUT_LEASE], 1)
        a.fences[ROLLOUT_LEASE].valid_until = time.monotonic() + 60   # a's clock misjudges
        for late in (first.set_target(record.id, 1, "p2c"),
                     first.advance(record, Phase.SWITCHING, "late", wave=1),
                     first.set_fleet_program("p2")):
            with pytest.raises(LeaseLost):
                await late
        record = await second.advance(record, Phase.SWITCHING, "wave 2", wave=1)
        assert await second.targets(record.id) == {0: "p2c"}
        said = rows(database, "SELECT what, replica FROM rollout_history ORDER BY id")
        assert said == [("started", "a"), ("wave 1 switched", "a"), ("wave 2", "b")]
        assert await first.fleet_program() is None
    finally:
        await a.close()
        await b.close()


def test_a_rollout_waits_out_a_database_restart(
        replicas: Callable[..., Replica], database: str, postgres: Any,
        fleet: tuple[Path, list[str]]) -> None:
    """The database goes away while the canary is gated, longer than a lease: the
    leader's leases lapse, it stops leading without ending (the replicas wait the store
    out, as they do for their hosts), and when the store is back a replica leads the
    rollout on to its end, once."""
    v2 = version_2(fleet[0], database)
    a, b = start_two(replicas, v2, database)
    wait_for("b holds its share", lambda: owners(database).get("b", 0) == 3, 60)
    wait_for("the canary is gated", lambda: reached(database, 0, "gating"), 120)
    assert not ended(database)   # the store goes away while the rollout is led
    postgres.stop()
    try:
        wait_for("both replicas saw the store go", lambda: all(
            any(not e["reachable"] for e in r.events("store")) for r in (a, b)), 30)
        time.sleep(2 * TTL)
    finally:
        postgres.start()
    check_the_end(database, fleet[1], "committed")
    assert a.process.poll() is None and b.process.poll() is None   # waited, did not end
    assert any(e["action"] == "lost" for e in a.events("lease") if e["host"] == ":rollout")
