"""Replicas sharing one fleet through a real PostgreSQL server (docs/replicas.md).

The server is the distribution's, started per test session in a temporary
directory (unix socket only); each test gets a fresh database. Replicas are
real `modelip watch` processes against a real `modelip emulate`; kills, stops
and the database's restart are done for real.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from orchestrator.crypto.container import SealedContainer
from orchestrator.crypto.mek import MEK, write_mek
from orchestrator.engine.prepare import prepare_program, sealing_source
from orchestrator.engine.state import CardState, CardTransition
from orchestrator.engine.store.postgres import PostgresStore
from orchestrator.engine.store.protocol import LoadSent
from orchestrator.engine.store.schema import POSTGRES_MIGRATIONS
from orchestrator.errors import LeaseLost, PlanError, StoreUnavailable, UsageError
from orchestrator.plan.model import Plan
from orchestrator.qpc.container import open_container
from orchestrator.transport.client import HostClient
from tests.models import tiny_mlp
from tests.pg import PostgresServer

MODELIP = [sys.executable, "-m", "orchestrator"]
TTL = 2.0
HOSTS = 6


def rows(url: str, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql.encode(), args).fetchall()


def wait_for(what: str, condition: Callable[[], bool], limit: float = 60.0) -> float:
    """Poll until ``condition``; returns the seconds it took (fails after ``limit``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


# --- the store on its own ------------------------------------------------------------------


def transition(host: str) -> CardTransition:
    return CardTransition(host, 0, "card", CardState.PENDING, CardState.ATTESTING, "test", 1,
                          "ab", "prog", 1, None)


async def test_a_replica_frozen_inside_a_write_does_not_keep_its_host(database: str) -> None:
    """A replica stopped (SIGSTOP, a paused VM) in the middle of a fenced write holds its
    host's lease row locked. The server must end that session after a lease TTL, or no
    other replica can ever take the host over (claims skip locked rows)."""
    a = PostgresStore(database, "a", lease_ttl=1.0)
    b = PostgresStore(database, "b", lease_ttl=1.0)
    await a.open()
    await b.open()
    try:
        await a.heartbeat(["h"])
        assert [c.host for c in await a.claim(["h"], 1)] == ["h"]
        # a's own connection, as a fenced write leaves it when the process freezes
        async with a._pool.connection() as conn:  # noqa: SLF001 - staging the freeze
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
                async with conn.transaction():
                    await conn.execute("SELECT owner FROM leases WHERE host = 'h' FOR SHARE")
                    taken: list[Any] = []
                    with anyio.fail_after(15):
                        while not taken:
                            await b.heartbeat(["h"])
                            taken = await b.claim(["h"], 1)
                            await anyio.sleep(0.2)
                    assert (taken[0].host, taken[0].previous_owner) == ("h", "a")
                    await conn.execute("SELECT 1")   # thawed: the session is gone
    finally:
        await a.close()
        await b.close()


async def test_revisions_of_two_replicas_writing_at_once_are_one_order(database: str
                                                                        ) -> None:
    """Every journaled move of every replica gets the next revision of the store (the
    control API's, docs/api.md), with the card as it is then; read after a revision,
    nothing is missed or repeated."""
    a = PostgresStore(database, "a", lease_ttl=5.0)
    b = PostgresStore(database, "b", lease_ttl=5.0)
    await a.open()
    await b.open()
    try:
        for store, host in ((a, "ha"), (b, "hb")):
            await store.heartbeat(["ha", "hb"])
            assert [c.host for c in await store.claim([host], 1)] == [host]
            await store.ensure_cards(host, [(0, 0, 0)])

        async def moves(store: PostgresStore, host: str) -> None:
            for _ in range(20):
                await store.record_card(transition(host))

        async with anyio.create_task_group() as tg:
            tg.start_soon(moves, a, "ha")
            tg.start_soon(moves, b, "hb")
        changes = await b.changes(0)
        cards = [c for c in changes if c.kind == "card"]
        assert len(cards) == 40 and {c.body["host"] for c in cards} == {"ha", "hb"}
        revisions = [c.revision for c in changes]
        assert revisions == sorted(set(revisions))
        assert cards[0].body["program_id"] == "prog" and cards[0].body["state"] == "ATTESTING"
        assert await a.revisions() == (revisions[0], revisions[-1])
        middle = revisions[len(revisions) // 2]
        assert [c.revision for c in await a.changes(middle)] == [
            r for r in revisions if r > middle]
        recorded = await a.record_card(transition("ha"))   # a move names its revision
        [change] = await b.changes(recorded.revision - 1, 1)
        assert (change.revision, change.body["host"]) == (recorded.revision, "ha")
    finally:
        await a.close()
        await b.close()


async def test_the_database_refuses_a_write_under_a_stale_epoch(database: str) -> None:
    a = PostgresStore(database, "a", lease_ttl=1.0)
    b = PostgresStore(database, "b", lease_ttl=1.0)
    await a.open()
    await b.open()
    try:
        await a.heartbeat(["h"])
        await b.heartbeat(["h"])
        [claimed] = await a.claim(["h"], 1)
        assert (claimed.host, claimed.epoch) == ("h", 1)
        assert await b.claim(["h"], 1) == []          # held: not free for b
        await a.ensure_cards("h", [(0, 0, 0)])
        await a.record_card(transition("h"))          # under its lease: written
        await anyio.sleep(1.2)                         # a stalls past its TTL ...
        [taken] = await b.claim(["h"], 1)
        assert (taken.epoch, taken.previous_owner) == (2, "a")
        # ... and still believes it holds the lease: the database alone must refuse
        a.fences["h"].valid_until = time.monotonic() + 60
        with pytest.raises(LeaseLost, match="held by b"):
            await a.record_card(transition("h"))
        with pytest.raises(LeaseLost):
            await a.record_card(transition("h"), load=LoadSent("p", 0))
        assert "h" not in a.fences
        written = rows(database, "SELECT replica, epoch FROM transitions")
        assert written == [("a", 1)]                  # nothing of the stale write
        assert rows(database, "SELECT count(*) FROM loads") == [(0,)]
        await b.record_card(transition("h"))
        assert rows(database, "SELECT replica, epoch FROM transitions ORDER BY id")[-1] \
            == ("b", 2)
    finally:
        await a.close()
        await b.close()


async def test_a_replica_name_in_use_is_refused(database: str) -> None:
    first = PostgresStore(database, "same", lease_ttl=5.0)
    second = PostgresStore(database, "same", lease_ttl=5.0)
    await first.open()
    await second.open()
    try:
        assert await first.heartbeat([]) == 1
        with pytest.raises(StoreUnavailable, match="in use by another running replica"):
            await second.heartbeat([])
    finally:
        await first.close()
        await second.close()


async def test_migrations_run_once_when_replicas_start_together(database: str) -> None:
    stores = [PostgresStore(database, f"r{i}", lease_ttl=5.0) for i in range(4)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.open)
    for store in stores:
        await store.close()
    assert rows(database, "SELECT version FROM modelip_schema ORDER BY version") == \
        [(n,) for n in range(1, len(POSTGRES_MIGRATIONS) + 1)]


async def test_an_unreachable_store_is_one_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://postgres:secret@/nothing?host={tmp_path}"
    store = PostgresStore(url, "r", lease_ttl=1.0)
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    assert "secret" not in str(caught.value) and "cannot connect" in str(caught.value)


def _tiny_plans(tmp_path: Path, *specs: tuple[str, int]) -> list[Plan]:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    plans = []
    for name, version in specs:
        plan_file = tmp_path / f"{name}.yaml"
        plan_file.write_text(f"model: {{onnx: tiny.onnx, version: {version}}}\n"
                             "mek: {generate: true}\nfleet: {emulated: {hosts: 1}}\n"
                             f"state_dir: state-{name}\n")
        plans.append(Plan.load(plan_file))
    return plans


def test_replicas_seal_the_same_body_with_a_salt_no_one_chooses(tmp_path: Path) -> None:
    """The salt is derived from the MEK and the source key: every state directory seals
    the same source, MEK and settings to the same body; any change gives another salt."""
    mek = MEK.generate()
    a_plan, b_plan, v2_plan = _tiny_plans(tmp_path, ("a", 1), ("b", 1), ("v2", 2))
    a, b, v2 = (prepare_program(plan, mek) for plan in (a_plan, b_plan, v2_plan))
    assert a.body.read_bytes() == b.body.read_bytes() and a.program_id == b.program_id
    assert sealing_source(a_plan, mek)[2] == sealing_source(b_plan, mek)[2]
    assert v2.salt != a.salt and v2.program_id != a.program_id   # another version
    other = prepare_program(_tiny_plans(tmp_path, ("c", 1))[0], MEK.generate())
    assert other.salt != a.salt                                  # another MEK


async def test_a_store_writer_cannot_choose_the_salt(tmp_path: Path, database: str) -> None:
    """The security review's attack: the `seals` row of version 2 names version 1's salt
    (with one MEK, one salt over two plaintexts repeats every (key, nonce) pair). The
    replica never seals with a salt read from the store: it refuses the record, and its
    own body has a salt of its own."""
    from orchestrator.app import _prepare

    mek = MEK.generate()
    v1_plan, v2_plan = _tiny_plans(tmp_path, ("v1", 1), ("v2", 2))
    v1 = prepare_program(v1_plan, mek)
    store = PostgresStore(database, "a", lease_ttl=5.0)
    await store.open()
    try:
        v2_key = sealing_source(v2_plan, mek)[2]
        await store.offer_seal(v2_key, v1.salt, v1.program_id)    # the writer's record
        with pytest.raises(UsageError, match="not the one recorded in the store"):
            await _prepare(v2_plan, mek, store)
    finally:
        await store.close()
    bodies = list((tmp_path / "state-v2" / "cache").glob("encrypted-*.qpc"))
    assert bodies
    for body in bodies:
        with open_container(body) as container:
            assert SealedContainer(container).info.salt != v1.salt


# --- replicas as processes against `modelip emulate` ----------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A live `modelip emulate` (6 hosts x 2 cards) and a plan for it with a MEK file."""
    log = tmp_path / "emulate.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*MODELIP, "emulate", "--hosts", str(HOSTS),
                                    "--devices-per-host", "2", "--base-port", "0", "--pki-dir",
                                    str(tmp_path / "pki"), "--reboot-time", "0.05"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("the emulator", lambda: "READY" in log.read_text(), 30)
        addresses = re.findall(r"listening on (\S+)", log.read_text())
        (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
        write_mek(tmp_path / "mek.bin", MEK.generate())
        hosts = "\n".join(f"    - address: {a}\n      devices: [0, 1]" for a in addresses)
        plan = tmp_path / "plan.yaml"
        plan.write_text(f"""
model: {{onnx: tiny.onnx}}
mek: {{file: mek.bin}}
fleet:
  hosts:
{hosts}
trust: {{roots: [pki/root.pem]}}
retry: {{attempts: 3, backoff: 0.05}}
rekey: {{check_interval: 0.5}}
replicas: {{lease_ttl: {TTL}}}
state_dir: state
""")
        yield plan, addresses
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Replica:
    def __init__(self, plan: Path, url: str, name: str, *extra: str) -> None:
        self.name = name
        self.log = plan.parent / f"replica-{name}.jsonl"
        self.err = plan.parent / f"replica-{name}.err"
        self.metrics_port = free_port()
        with open(self.log, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [*MODELIP, "watch", str(plan), "--json", "--store", url, "--replica", name,
                 "--metrics-port", str(self.metrics_port), *extra], stdout=out, stderr=err)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as answer:
            return str(answer.read().decode())

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in events if kind is None or e["event"] == kind]

    def held(self) -> set[str]:
        hosts: set[str] = set()
        for event in self.events("lease"):
            if event["action"] in ("claimed", "took over"):
                hosts.add(event["host"])
            else:
                hosts.discard(event["host"])
        return hosts

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.process.returncode is None:
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


@pytest.fixture
def replicas(fleet: tuple[Path, list[str]], database: str
             ) -> Iterator[Callable[..., Replica]]:
    started: list[Replica] = []

    def start(name: str, *extra: str, plan: Path | None = None) -> Replica:
        replica = Replica(plan or fleet[0], database, name, *extra)
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        for replica in started:
            replica.stop()


def serving(url: str) -> int:
    """Cards SERVING in the store (0 until the first replica made the schema)."""
    try:
        return int(rows(url, "SELECT count(*) FROM cards WHERE state = 'SERVING'")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0


def owners(url: str) -> Counter[str]:
    try:
        return Counter(owner for (owner,) in rows(
            url, "SELECT owner FROM leases WHERE expires > now() AND owner <> ''"))
    except psycopg.errors.UndefinedTable:
        return Counter()


def settle(url: str, *started: Replica) -> None:
    """Until every card serves and each replica holds its share (and has said so)."""
    share = HOSTS // len(started)

    def settled() -> bool:
        for replica in started:   # one that ended will never settle: say why, now
            if replica.process.poll() is not None:
                raise AssertionError(f"replica {replica.name} ended with "
                                     f"{replica.process.returncode}: {replica.err.read_text()}")
        return serving(url) == 12 and owners(url) == {r.name: share for r in started} and all(
            len(r.held()) == share for r in started)
    wait_for("settled", settled)


def reloads(url: str) -> list[tuple[str, int, str]]:
    """Any card loaded with the program it already held in that session (by anyone)."""
    found, last = [], {}
    for host, device, session, program in rows(
            url, "SELECT host, device, session_id, program_id FROM loads WHERE outcome "
            "IN ('ok', 'sent') ORDER BY id"):
        if last.get((host, device, session)) == program:
            found.append((host, device, program))
        last[(host, device, session)] = program
    return found


def duplicate_loads(url: str) -> list[tuple[Any, ...]]:
    """Any card loaded twice for the same session (by anyone)."""
    return rows(url, "SELECT host, device, session_id, string_agg(replica, ',') FROM loads "
                "WHERE outcome IN ('ok', 'sent') GROUP BY 1, 2, 3 HAVING count(*) > 1")


async def host_loads(addresses: list[str]) -> int:
    total = 0
    for address in addresses:
        async with HostClient(address) as client:
            total += (await client.stats())["load_count"]
    return total


@pytest.mark.parametrize("count", [2, 3])
def test_replicas_share_the_fleet_fairly(replicas: Callable[[str], Replica], database: str,
                                         fleet: tuple[Path, list[str]], count: int) -> None:
    started = [replicas(f"r{i}") for i in range(count)]
    wait_for("every card serving, every replica its share", lambda: serving(database) == 12
             and sorted(owners(database).values()) == [HOSTS // count] * count
             and all(len(r.held()) == HOSTS // count for r in started))
    assert owners(database) == {r.name: len(r.held()) for r in started}
    def said(replica: Replica) -> bool:  # its own metrics (refreshed at its lease renewals)
        text = replica.metrics()
        me = f'replica="{replica.name}"'
        return all(line in text for line in (
            f"modelip_replica_hosts_held{{{me}}} {HOSTS // count}.0\n",
            f"modelip_replicas_alive{{{me}}} {count}.0\n",
            f"modelip_store_reachable{{{me}}} 1.0\n"))
    wait_for("each replica's metrics saying so", lambda: all(map(said, started)))
    assert not duplicate_loads(database)
    assert anyio.run(host_loads, fleet[1]) == rows(database, "SELECT count(*) FROM loads")[0][0]
    # status, from the store alone: every host with its owner, every card, every load
    status = subprocess.run([*MODELIP, "status", str(fleet[0]), "--store", database, "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    view = json.loads(status.stdout)
    assert {h["owner"] for h in view["hosts"]} == {f"r{i}" for i in range(count)}
    assert all(h["lease_expires"] for h in view["hosts"])
    assert [c["state"] for c in view["cards"]] == ["SERVING"] * 12
    assert {r["replica"] for r in view["loads"]} <= {f"r{i}" for i in range(count)}
    assert [r["name"] for r in view["replicas"] if r["alive"]] == [f"r{i}" for i in range(count)]


def test_a_killed_replicas_hosts_are_taken_over_and_confirmed(
        replicas: Callable[[str], Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    a, b = replicas("a"), replicas("b")
    settle(database, a, b)
    victims = a.held()
    loads_before = rows(database, "SELECT count(*) FROM loads")[0][0]
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(timeout=10)
    took = wait_for("b took over a's hosts", lambda: victims <= {
        e["host"] for e in b.events("lease") if e["action"] == "took over"})
    print(f"takeover after SIGKILL: {took:.2f} s (lease TTL {TTL} s)")
    since = min(e["ts"] for e in b.events("lease") if e["action"] == "took over")

    def taken() -> list[dict[str, Any]]:
        return [e for e in b.events("card") if e["host"] in victims
                and e["state"] == "SERVING" and e["ts"] >= since]
    wait_for("b serves every card it took over", lambda: len(taken()) == 6)
    assert owners(database) == {"b": 6} and serving(database) == 12
    assert all("confirmed by a fresh attestation" in e["reason"] for e in taken())
    assert rows(database, "SELECT count(*) FROM loads")[0][0] == loads_before  # no reload
    # a card of a taken-over host resets: b re-keys it
    victim = sorted(victims)[0]

    async def reset() -> None:
        async with HostClient(victim) as client:
            await client.reset(0)
    anyio.run(reset)
    wait_for("b re-keyed the reset card", lambda: any(
        e["host"] == victim and e["device"] == 0 for e in b.events("rekeyed")))
    assert not duplicate_loads(database)


def test_a_stalled_replica_is_fenced_sends_nothing_and_rejoins(
        replicas: Callable[[str], Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    a, b = replicas("a"), replicas("b")
    settle(database, a, b)
    frozen = a.held()
    os.kill(a.process.pid, signal.SIGSTOP)
    stopped_at = time.time()
    # while a is frozen, every card of its hosts resets: whoever drives them must re-key
    addresses = sorted(frozen)

    async def reset_all() -> None:
        for address in addresses:
            async with HostClient(address) as client:
                for device in (0, 1):
                    await client.reset(device)
    anyio.run(reset_all)
    wait_for("b took over and re-keyed a's cards", lambda: frozen <= {
        e["host"] for e in b.events("lease") if e["action"] == "took over"} and serving(
        database) == 12, 60)
    time.sleep(TTL)
    os.kill(a.process.pid, signal.SIGCONT)
    woke_at = time.time()
    wait_for("a noticed it lost its hosts", lambda: frozen <= {
        e["host"] for e in a.events("lease") if e["action"] == "lost"})
    wait_for("a rejoined with its fair share", lambda: owners(database) == {"a": 3, "b": 3}
             and serving(database) == 12, 60)
    # a said nothing about those hosts' cards between waking up and dropping them
    lost_at = max(e["ts"] for e in a.events("lease") if e["action"] == "lost")
    said = [e for e in a.events("card") if e["host"] in frozen and woke_at - 0.5 <= e["ts"]
            <= lost_at]
    assert said == [], said
    assert not [e for e in a.events("card") if stopped_at < e["ts"] < woke_at - 0.5]
    assert not duplicate_loads(database)
    # every load a host received is journaled: no call went out behind the store's back
    assert anyio.run(host_loads, fleet[1]) == rows(database, "SELECT count(*) FROM loads")[0][0]


def test_replicas_wait_out_a_database_restart(
        replicas: Callable[[str], Replica], database: str, postgres: PostgresServer,
        fleet: tuple[Path, list[str]]) -> None:
    a, b = replicas("a"), replicas("b")
    settle(database, a, b)
    before = rows(database, "SELECT count(*) FROM transitions")[0][0]
    postgres.stop()
    try:
        wait_for("both replicas saw the store go", lambda: all(
            any(not e["reachable"] for e in r.events("store")) for r in (a, b)), 30)
        time.sleep(2 * TTL)  # longer than a lease: every replica must stop acting
    finally:
        postgres.start()
    restarted = time.time()
    for r in (a, b):  # their leases lapsed here first: each dropped its hosts
        assert {e["action"] for e in r.events("lease") if e["action"] == "lost"} == {"lost"}

    def confirmed_since_restart() -> int:  # the store's rows predate the restart: events
        return len({(e["host"], e["device"]) for r in (a, b) for e in r.events("card")
                    if e["state"] == "SERVING" and e["ts"] > restarted})
    wait_for("both replicas back with their share, every card confirmed", lambda: all(
        any(e["reachable"] for e in r.events("store")) for r in (a, b))
        and sorted(owners(database).values()) == [3, 3] and confirmed_since_restart() == 12,
        60)
    assert a.process.poll() is None and b.process.poll() is None  # waited, did not die
    assert rows(database, "SELECT count(*) FROM transitions")[0][0] >= before  # nothing lost
    # the first back did not take everyone's hosts to hand them back a moment later
    assert not [e for r in (a, b) for e in r.events("lease") if e["ts"] > restarted
                and e["action"] == "handed back"], "a handover after the restart"
    address = fleet[1][0]

    def sessions_serving(since: float) -> set[str]:
        return {e["session_id"] for r in (a, b) for e in r.events("card")
                if e["host"] == address and e["device"] == 1 and e["state"] == "SERVING"
                and e["ts"] > since}

    async def reset() -> None:
        async with HostClient(address) as client:
            await client.reset(1)
    before_reset = sessions_serving(restarted)
    reset_at = time.time()
    anyio.run(reset)
    # The truth, not one path to it: the host may be changing hands at this moment
    # (the replicas rebalance after the restart), and a replica that has just taken
    # it over brings the card up from its first look rather than re-keying it.
    wait_for("the reset card serves again, under a new session", lambda: bool(
        sessions_serving(reset_at) - before_reset))
    assert not duplicate_loads(database)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "problem"), [
    ("store: mysql://db/fleet", r":\d+: store: must be postgresql://"),
    ("store: postgresql:///x\nreplicas: {lease_ttl: 0}",
     r":\d+: replicas.lease_ttl: must be between 1 and 3600"),
    ("replicas: {lease: 5}", r":\d+: replicas.lease: is not a known key"),
    # across the network, the database server must be verified, or not on purpose
    ("store: postgresql://db.example/fleet",
     r":\d+: store: reaches a database across the network: give sslmode=verify-full"),
])
def test_bad_store_settings_name_the_line_and_field(tmp_path: Path, extra: str,
                                                    problem: str) -> None:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                    "fleet: {hosts: [{address: '127.0.0.1:1', devices: [0]}]}\n"
                    f"trust: {{roots: [root.pem]}}\n{extra}\n")
    (tmp_path / "root.pem").write_text("x")
    with pytest.raises(PlanError, match=problem):
        Plan.load(plan)


@pytest.mark.parametrize(("args", "code", "problem"), [
    (["watch", "{plan}", "--store", "redis://x"], 2, "--store redis://x: must be postgresql"),
    (["watch", "{plan}", "--store", "postgresql:///x?host={tmp}", "--replica", "a/b"], 2,
     "--replica 'a/b': must be 1-64 letters"),
    (["deploy", "{emulated}", "--store", "postgresql:///x?host={tmp}"], 2,
     "replicas share real hosts"),
    (["status", "{plan}", "--store", "postgresql://u:hunter2@/x?host={tmp}"], 5,
     "cannot connect"),
    (["status", "{plan}", "--store", "postgresql:///x?host={tmp}&password=hunter2"], 5,
     "postgresql:///x?host="),
    (["watch", "{plan}", "--store", "mysql://u@h/x?password=hunter2"], 2,
     "--store mysql://u@h/x?password=***: must be postgresql"),
])
def test_bad_store_flags_are_one_line_with_the_documented_code(
        tmp_path: Path, fleet: tuple[Path, list[str]], args: list[str], code: int,
        problem: str) -> None:
    emulated = tmp_path / "emulated.yaml"
    emulated.write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                        "fleet: {emulated: {hosts: 1}}\n")
    filled = [a.format(plan=fleet[0], emulated=emulated, tmp=tmp_path) for a in args]
    result = subprocess.run([*MODELIP, *filled], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_a_second_process_with_a_live_replicas_name_is_refused(
        replicas: Callable[[str], Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    first = replicas("dup")
    wait_for("the first holds hosts", lambda: len(first.held()) == HOSTS)
    other = fleet[0].with_name("elsewhere.yaml")  # another machine: its own state dir
    other.write_text(fleet[0].read_text().replace("state_dir: state", "state_dir: state2"))
    result = subprocess.run([*MODELIP, "watch", str(other), "--json", "--store", database,
                             "--replica", "dup", "--duration", "5"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "replica name 'dup' is in use by another running replica" in lines[0]
    assert first.process.poll() is None and owners(database) == {"dup": HOSTS}


@pytest.mark.parametrize(("url", "warned"), [
    ("postgresql://db.example/fleet?sslmode=verify-full&sslrootcert=ca.pem", False),
    ("postgresql://db.example/fleet?sslmode=require", True),   # encrypted, not verified
    ("postgresql://db.example/fleet?sslmode=disable", True),   # plaintext, on purpose
    ("postgresql:///fleet?host=/run/postgresql", False),       # a unix socket
    ("postgresql://localhost/fleet", False),                  # loopback
])
def test_a_store_across_the_network_is_verified_or_warned(tmp_path: Path, url: str,
                                                          warned: bool) -> None:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "root.pem").write_text("x")
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                    "fleet: {hosts: [{address: '127.0.0.1:1', devices: [0]}]}\n"
                    f"trust: {{roots: [root.pem]}}\nstore: '{url}'\n")
    said = [w for w in Plan.load(plan).warnings() if "database server is not verified" in w]
    assert bool(said) is warned


def test_a_lease_given_to_a_replica_that_does_not_exist_is_taken(
        replicas: Callable[[str], Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    """The security review's attack: a store writer gives every lease to 'ghost' for a
    year and marks every card SERVING. A lease is only as good as its holder's
    heartbeat: the next replica claims every host and attests each card itself."""
    a = replicas("a")
    settle(database, a)
    a.stop()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(b"UPDATE leases SET owner = 'ghost', expires = now() + interval '1 year'")
        conn.execute(b"UPDATE cards SET state = 'SERVING'")
    b = replicas("b")
    wait_for("b holds every host", lambda: len(b.held()) == HOSTS)
    taken = [e for e in b.events("lease") if e["action"] in ("claimed", "took over")]
    assert {e["previous_owner"] for e in taken} == {"ghost"}
    wait_for("every card confirmed by b itself", lambda: len({
        (e["host"], e["device"]) for e in b.events("card") if e["state"] == "SERVING"}) == 12)
    assert owners(database) == {"b": HOSTS}


def test_a_replicas_exit_code_counts_what_it_verified(
        replicas: Callable[[str], Replica], database: str,
        fleet: tuple[Path, list[str]]) -> None:
    """Two live replicas, three hosts each: each one's summary counts its own six cards;
    the other six are the other's word, read from the store, said apart."""
    a, b = replicas("a"), replicas("b")
    settle(database, a, b)
    time.sleep(TTL)   # three of a's periods: its view of b's hosts is from after b took them
    a.stop()
    summary = a.events("summary")[-1]
    assert summary["store_word"] == 6, summary
    assert summary["cards"] == 6 and summary["serving"] == 6


def test_one_fleet_per_store(replicas: Callable[..., Replica], database: str,
                             fleet: tuple[Path, list[str]]) -> None:
    """A replica started with another plan (another model here) on a store whose fleet
    runs one is refused with one line, before it touches a host; with --replace-fleet
    it makes its plan the fleet's on purpose: the replica of the old plan stops, saying
    why, and the new one takes the whole fleet to its plan."""
    a = replicas("a")
    settle(database, a)
    other = fleet[0].parent / "other.yaml"
    (fleet[0].parent / "other.onnx").write_bytes(tiny_mlp(seed=7).SerializeToString())
    other.write_text(fleet[0].read_text().replace("tiny.onnx", "other.onnx"))
    refused = subprocess.run([*MODELIP, "deploy", str(other), "--store", database,
                              "--replica", "c"], capture_output=True, text=True, timeout=120,
                             check=False)
    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "the store's fleet runs another plan" in line and "--replace-fleet" in line
    assert rows(database, "SELECT count(*) FROM loads WHERE replica = 'c'") == [(0,)]
    assert rows(database, "SELECT count(*) FROM transitions WHERE replica = 'c'") == [(0,)]
    c = replicas("c", "--replace-fleet", plan=other)
    wait_for("a stopped: the fleet's plan is no longer its own",
             lambda: a.process.poll() is not None)
    assert a.process.returncode == 2
    assert "the fleet's plan was replaced by replica c" in a.err.read_text()
    settle(database, c)

    def programs(sql: str) -> set[str]:
        return {program for (program,) in rows(database, sql)}
    wait_for("every card serves the new plan's program", lambda: serving(database) == 12
             and programs("SELECT good_program FROM cards WHERE state = 'SERVING'")
             == programs("SELECT program_id FROM loads WHERE replica = 'c'"))
    assert not programs("SELECT program_id FROM loads WHERE replica = 'a'") & programs(
        "SELECT program_id FROM loads WHERE replica = 'c'")


def test_every_replica_serves_the_same_revisions(replicas: Callable[..., Replica],
                                                 database: str) -> None:
    """The control API of each replica reads the shared store: the same changes under
    the same revisions, whichever replica journaled them."""
    started = [replicas(name, "--api", "127.0.0.1:0") for name in ("r0", "r1")]
    settle(database, *started)
    addresses = []
    for replica in started:
        said = replica.err.read_text()
        addresses.append(re.search(r"control API on (\S+)", said).group(1))  # type: ignore[union-attr]

    def replay(address: str) -> list[str]:
        run = subprocess.run([*MODELIP, "events", "--api", address, "--since", "0", "--json"],
                             capture_output=True, text=True, timeout=60, check=True)
        return [line for line in run.stdout.splitlines() if '"BOOKMARK"' not in line]

    first = replay(addresses[0])
    cards = [json.loads(line) for line in first if '"CARD"' in line]
    # both replicas journaled moves of their own hosts, and each serves all of them
    hosts_moved = {c["card"]["host"] for c in cards if c["card"]["state"] == "SERVING"}
    assert len(hosts_moved) == HOSTS
    second = replay(addresses[1])
    common = min(len(first), len(second))
    assert common >= 2 * 12 and first[:common] == second[:common]
