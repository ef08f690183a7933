"""The supervision tree: one host's faults stay with that host; the truth over hints.

Faults are staged for real: hosts that answer garbage or hostile certificate
chains (emulated hosts over gRPC), hosts frozen with SIGSTOP or killed with
SIGKILL and started again empty (separate `modelip emulate` processes), every
event lost, and state directories that are read-only, full, deleted or held
by another orchestrator.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.app import open_engine
from orchestrator.crypto.evidence import TrustPolicy, verify_evidence
from orchestrator.emulator.adversary import malformed_chain
from orchestrator.emulator.pki import VendorPKI
from orchestrator.engine.engine import Engine
from orchestrator.engine.events import ProtocolViolation
from orchestrator.engine.rollout.ledger import PHASE_MOVES, Phase, RolloutLedger
from orchestrator.engine.state import (
    CARD_MOVES,
    HOST_MOVES,
    CardMachine,
    CardState,
    CardTransition,
    HostMachine,
    HostState,
)
from orchestrator.engine.store.protocol import LoadRecord, LoadSent
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import AttestationError, InvalidTransition
from orchestrator.plan.model import Plan
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import DeviceState
from tests.models import tiny_mlp
from tests.test_engine import running, wait_until, write_plan

MODELIP = [sys.executable, "-m", "orchestrator"]


# --- the pure machines ------------------------------------------------------------------


@pytest.mark.parametrize("source", list(CardState))
def test_every_card_move_is_allowed_or_raises(source: CardState) -> None:
    for target in CardState:
        machine = CardMachine("h", 0, 0, 0, "p", state=source)
        if target in CARD_MOVES[source]:
            transition = machine.propose(target, "why")
            assert machine.state is source  # proposing changes nothing
            machine.apply(transition)
            assert (machine.state, machine.reason) == (target, "why")
            with pytest.raises(InvalidTransition):
                machine.apply(transition)  # stale: written for another state
        else:
            with pytest.raises(InvalidTransition):
                machine.propose(target)
            assert machine.state is source


@pytest.mark.parametrize("source", list(Phase))
async def test_every_rollout_phase_move_is_allowed_or_raises(tmp_path: Path,
                                                              source: Phase) -> None:
    """The rollout's phases have a move table like cards and hosts: the ledger takes an
    allowed move (journaled, with its line of history) and refuses any other, writing
    nothing."""
    with SQLiteStore(tmp_path / "journal.sqlite") as journal:
        ledger = RolloutLedger(journal)
        for target in Phase:
            record = await ledger.start("old", "cand", "new", [1, 2], "started")
            if source is not Phase.SWITCHING:  # put it in ``source`` behind the ledger
                journal.execute("UPDATE rollouts SET phase = ? WHERE id = ?",
                                (source.value, record.id))
                record = await ledger.get(record.id)
            if target in PHASE_MOVES[source]:
                moved = await ledger.advance(record, target, "why")
                assert moved.phase is target
                assert (await ledger.history(record.id))[-1].what == "why"
                assert (moved.phase.ended) == (target in (Phase.COMMITTED,
                                                          Phase.ROLLED_BACK))
            else:
                before = await ledger.history(record.id)
                with pytest.raises(InvalidTransition, match=f"rollout {record.id}: cannot "
                                   f"move from {source.value} to {target.value}"):
                    await ledger.advance(record, target, "why")
                assert (await ledger.get(record.id)).phase is source
                assert await ledger.history(record.id) == before


@pytest.mark.parametrize("source", list(HostState))
def test_every_host_move_is_allowed_or_raises(source: HostState) -> None:
    for target in HostState:
        machine = HostMachine("h", "a", state=source)
        if target in HOST_MOVES[source]:
            machine.apply(machine.propose(target, "why"))
            assert machine.state is target
        else:
            with pytest.raises(InvalidTransition):
                machine.propose(target)


def test_known_good_is_kept_until_a_new_session_is_seen() -> None:
    from orchestrator.engine.state import KnownGood

    good = KnownGood("c", "aa", "p", 0)
    machine = CardMachine("h", 0, 0, 0, "p", state=CardState.PENDING, known_good=good)
    machine.apply(machine.propose(CardState.ATTESTING))  # a resumed card's first move
    assert machine.known_good == good
    machine.apply(machine.propose(CardState.KEYED, known_good=None))  # new session
    assert machine.known_good is None


async def test_moves_of_one_instant_share_a_commit_carry_their_loads_and_outlive_a_cancel(
        tmp_path: Path) -> None:
    S = CardState

    def move(device: int, previous: CardState, state: CardState) -> CardTransition:
        return CardTransition("h", device, "c", previous, state, "", 1, "ab" * 16, "p", 1, None)

    with SQLiteStore(tmp_path / "journal.sqlite") as store:
        await store.ensure_cards("h", [(0, 0, 0), (1, 0, 1)])
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        ids: dict[object, int] = {}

        async def send(device: int) -> None:
            ids[device] = (await store.record_card(move(device, S.KEYED, S.LOADING),
                                                   load=LoadSent("p", device))).load_id

        async def send_cancelled() -> None:
            with anyio.CancelScope() as scope:
                scope.cancel()  # already cancelled: the write goes through all the same
                await send(1)
                ids["after"] = 1
                await anyio.sleep(5)   # ... and the cancellation lands at the next wait

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_cancelled)   # first: it leads the commit, being cancelled
            tg.start_soon(send, 0)
        assert statements.count("COMMIT") == 1    # both moves and both loads: one commit
        assert ids[0] != ids[1] and ids["after"] == 1
        await store.record_card(move(0, S.LOADING, S.SERVING), concludes=(ids[0], "ok"))
        await store.finish_load(ids[1], "failed")
        assert sorted(await store.loads(), key=lambda r: r.device) == [
            LoadRecord("h", 0, "ab" * 16, "p", 0, "ok"),
            LoadRecord("h", 1, "ab" * 16, "p", 1, "failed")]
        assert [(c.device, c.state) for c in await store.cards()] == [(0, "SERVING"),
                                                                       (1, "LOADING")]
        # each move of a shared commit names its own change (the control API's revision)
        revisions: dict[int, int] = {}

        async def again(device: int, previous: CardState, state: CardState) -> None:
            revisions[device] = (await store.record_card(move(device, previous, state))
                                 ).revision

        commits = statements.count("COMMIT")
        async with anyio.create_task_group() as tg:
            tg.start_soon(again, 0, S.SERVING, S.REKEYING)
            tg.start_soon(again, 1, S.LOADING, S.RETRY_WAIT)
        assert statements.count("COMMIT") == commits + 1
        for device, revision in revisions.items():
            [change] = await store.changes(revision - 1, 1)
            assert (change.revision, change.body["device"]) == (revision, device)


# --- hostile hosts: their cards, never anyone else's ----------------------------------------


def test_a_malformed_certificate_extension_is_an_attestation_failure(pki: VendorPKI) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf, ca = malformed_chain(key, "card-0")
    with pytest.raises(ValueError):  # what cryptography does when the extension is read
        _ = x509.load_der_x509_certificate(ca).extensions
    card = pki.issue_card("card-0")
    from orchestrator.emulator.adversary import Adversary
    from orchestrator.emulator.card import CardConfig, EmulatedCard

    evidence = EmulatedCard(card, CardConfig()).attest(b"r" * 32)
    from orchestrator._proto.modelip.v1 import evidence_pb2

    parsed = evidence_pb2.AttestationEvidence.FromString(evidence)
    del parsed.certificate_chain[:]
    parsed.certificate_chain.extend([leaf, ca])
    with pytest.raises(AttestationError, match="does not lead to a trusted vendor root"):
        verify_evidence(parsed.SerializeToString(), roots=[pki.root], policy=TrustPolicy(),
                        request=b"r" * 32)
    assert Adversary.MALFORMED_CHAIN.value == "malformed-chain"


def test_wrap_mek_refuses_a_malformed_chain_with_one_line(tmp_path: Path, pki: VendorPKI
                                                          ) -> None:
    from orchestrator._proto.modelip.v1 import evidence_pb2
    from orchestrator.emulator.card import CardConfig, EmulatedCard

    pki.save(tmp_path / "pki")
    parsed = evidence_pb2.AttestationEvidence.FromString(
        EmulatedCard(pki.issue_card("card-0"), CardConfig()).attest(os.urandom(32)))
    del parsed.certificate_chain[:]
    parsed.certificate_chain.extend(malformed_chain(ec.generate_private_key(ec.SECP256R1()),
                                                    "card-0"))
    (tmp_path / "pub0.dat").write_bytes(parsed.SerializeToString())
    (tmp_path / "elf").write_bytes(os.urandom(1000))
    for step in (["generate-mek", "-o", "MEK.dat"],
                 ["pack", "-o", "m.qpc", "--segment", "network.elf=elf"],
                 ["encrypt-model", "--qpc", "m.qpc", "--mek", "MEK.dat", "--output-dir", "enc"]):
        subprocess.run([*MODELIP, *step], check=True, cwd=tmp_path, capture_output=True)
    result = subprocess.run([*MODELIP, "wrap-mek", "--mek", str(tmp_path / "MEK.dat"),
                             "--encrypted-qpc", str(tmp_path / "enc"),
                             "--pub-keys", str(tmp_path / "pub0.dat"), "--trust-root",
                             str(tmp_path / "pki" / "root.pem"), "--output-dir",
                             str(tmp_path / "wrapped")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "wrapped").exists()


async def test_a_host_with_a_malformed_chain_quarantines_only_its_own_cards(tmp_path: Path
                                                                            ) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=2, devices=2, extra_fleet=(
        "    adversary: malformed-chain\n    adversary_hosts: [1]")))
    async with running(plan) as (engine, _):
        states = {c.name: c.state.value for c in engine.cards}
        assert states == {"host0/0": "SERVING", "host0/1": "SERVING",
                          "host1/0": "QUARANTINED", "host1/1": "QUARANTINED"}
        assert all("trusted vendor root" in c.reason for c in engine.cards if c.host == "host1")
        assert engine.stats.internal_errors == 0
        assert engine.outcome()[0] == 3


async def test_a_host_that_answers_garbage_is_counted_never_raised(tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=2, devices=2, extra_fleet=(
        "    adversary: garbage\n    adversary_hosts: [1]")))
    async with running(plan) as (engine, _):
        violations: list[ProtocolViolation] = []
        engine.subscribe(lambda e: violations.append(e) if isinstance(e, ProtocolViolation)
                         else None)
        await wait_until(engine, lambda: len(engine.hosts[1].violations) >= 3)
        # cards it lists beyond the plan's are not ours, never a violation (ListDevices
        # lists every card of a host)
        assert set(engine.hosts[1].violations) >= {
            "undefined device state", "absurd boot counter", "undefined event kind"}
        assert not engine.hosts[0].violations
        assert all(c.state.value == "SERVING" for c in engine.cards)  # the garbage is ignored
        assert engine.stats.internal_errors == 0
        assert {h.machine.state for h in engine.hosts} == {HostState.UP}


async def test_a_host_that_answers_but_refuses_is_refusing_not_unreachable(tmp_path: Path
                                                                          ) -> None:
    """Staging refused (RESOURCE_EXHAUSTED: the host's disk is full): the host answers,
    so it is REFUSING with the host's reason, and how long it has not been up is not
    restarted by its retries."""
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2,
                                extra_fleet="    stage_capacity: 100"))
    async with running(plan) as (engine, _):
        host = engine.hosts[0]
        seen: list[str] = []
        engine.subscribe(lambda e: seen.append(e.state) if getattr(e, "KIND", "") == "host"
                         else None)
        await wait_until(engine, lambda: seen.count("REFUSING") >= 2)  # retried, refused
        assert "UNREACHABLE" not in seen
        await wait_until(engine, lambda: host.machine.state is HostState.REFUSING)
        assert "RESOURCE_EXHAUSTED" in host.machine.reason
        assert "no room to stage" in host.machine.reason
        assert {c.state.value for c in engine.cards} == {"DISCONNECTED"}
        assert all("refusing" in c.reason for c in engine.cards)
        view = engine.snapshot().hosts[0]
        assert view.state == "REFUSING" and view.not_up_for > view.in_state


def test_a_plan_naming_half_of_a_hosts_cards_sees_no_violation(tmp_path: Path) -> None:
    """ListDevices and WatchEvents cover every card of a host: the cards a plan does not
    name are someone else's, listed and reset without a word from us."""
    host = Emulator(tmp_path, "half")
    try:
        (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
        path = tmp_path / "plan.yaml"
        path.write_text(f"""
model: {{onnx: tiny.onnx}}
mek: {{generate: true}}
fleet: {{hosts: [{{address: "{host.address}", devices: [0, 1]}}]}}
trust: {{roots: [pki/root.pem]}}
rekey: {{min_interval: 0.05, check_interval: 0.5, resync_interval: 0.1}}
state_dir: state
""")

        async def scenario() -> None:
            async with running(Plan.load(path)) as (engine, clients):
                for device in (2, 3):      # events for the cards the plan does not name
                    await clients[0].reset(device)
                await anyio.sleep(1.0)     # some ten resyncs, each listing all four cards
                assert engine.stats.protocol_violations == {}
                assert not engine.hosts[0].violations
                assert {c.state.value for c in engine.cards} == {"SERVING"}
                assert len(engine.cards) == 2

        anyio.run(scenario)
    finally:
        host.stop()


# --- the truth over hints -----------------------------------------------------------------------


async def test_every_event_lost_costs_latency_not_truth(tmp_path: Path) -> None:
    """No event reaches the engine and periodic attestation is off: the host resync
    (ListDevices) finds the reset, and what the engine calls SERVING is loaded."""
    path = write_plan(tmp_path, hosts=1, devices=4, extra_fleet="    drop_events: 1.0")
    path.write_text(path.read_text().replace("check_interval: 0.3", "check_interval: 0\n"
                                             "  resync_interval: 0.2"))
    plan = Plan.load(path)
    async with running(plan) as (engine, hosts):
        for device in (0, 2):
            await hosts[0].reset(device)
        await wait_until(engine, lambda: engine.stats.rekeys == 2
                         and all(c.state.value == "SERVING" for c in engine.cards))
        assert all(c.boot_counter == 2 for c in engine.cards if c.device in (0, 2))
        listed = await hosts[0].list_devices()
        engine_serving = {c.device for c in engine.cards if c.state.value == "SERVING"}
        assert engine_serving == {d.device for d in listed if d.state is DeviceState.LOADED}
        assert len(engine.stats.outages) == 2 and min(engine.stats.outages) > 0


# --- real processes: a frozen host, a dead host, a host back empty ----------------------------


class Emulator:
    """A `modelip emulate` process of one host (kill, freeze, restart on its port)."""

    def __init__(self, work: Path, name: str, *, port: int = 0) -> None:
        self.work, self.name = work, name
        self.log = work / f"{name}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [*MODELIP, "emulate", "--hosts", "1", "--devices-per-host", "4",
                 "--base-port", str(port), "--pki-dir", str(work / "pki"),
                 "--reboot-time", "0.05"], stdout=out, stderr=subprocess.STDOUT)
        for _ in range(400):
            if "READY" in self.log.read_text() or self.process.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log.read_text()
        assert "READY" in text, text
        self.address = text.split("listening on ", 1)[1].split()[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=20)


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[list[Emulator]]:
    hosts = [Emulator(tmp_path, "a")]
    hosts.append(Emulator(tmp_path, "b"))
    try:
        yield hosts
    finally:
        for host in hosts:
            host.stop()


def two_host_plan(tmp_path: Path, hosts: list[Emulator]) -> Plan:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    path = tmp_path / "plan.yaml"
    path.write_text(f"""
model: {{onnx: tiny.onnx}}
mek: {{generate: true}}
fleet:
  hosts:
    - {{address: "{hosts[0].address}", devices: [0, 1, 2, 3]}}
    - {{address: "{hosts[1].address}", devices: [0, 1, 2, 3]}}
trust: {{roots: [pki/root.pem]}}
concurrency: 2
retry: {{attempts: 3, backoff: 0.05, max_backoff: 0.5}}
rekey: {{min_interval: 0.05, check_interval: 0.5, resync_interval: 0.2, probe_timeout: 0.5}}
timeouts: {{rpc: 30}}
state_dir: state
""")
    return Plan.load(path)


def cards_of(engine: Engine, address: str) -> list[CardMachine]:
    return [d.machine for h in engine.hosts if h.target.address == address
            for d in h.drivers.values()]


async def test_a_frozen_host_holds_only_its_own_share(tmp_path: Path,
                                                      two_hosts: list[Emulator]) -> None:
    frozen, healthy = two_hosts
    plan = two_host_plan(tmp_path, two_hosts)
    async with open_engine(plan) as engine, HostClient(healthy.address) as client, \
            HostClient(frozen.address) as frozen_client, anyio.create_task_group() as tg:
        await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                      task_status=task_status))
        with anyio.fail_after(60):
            await engine.deployed.wait()
        loads_before = (await frozen_client.stats())["load_count"]
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            # The frozen host's periodic attestations now hang for up to 30 s (the RPC
            # deadline) holding its share of the concurrency; the healthy host's cards
            # re-key one after another all the same.
            for device in range(4):
                done = engine.stats.rekeys
                await client.reset(device)
                with anyio.fail_after(15):  # far below the 30 s a shared slot would cost
                    await wait_until(engine, lambda d=done: engine.stats.rekeys > d, limit=15)
            # Within a few probe intervals the frozen host is UNREACHABLE and its cards
            # are not reported serving.
            await wait_until(engine, lambda: all(
                c.state is CardState.DISCONNECTED for c in cards_of(engine, frozen.address)))
            assert engine.hosts[0].machine.state is HostState.UNREACHABLE
            assert frozen.process.poll() is None  # still frozen, not dead
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        await wait_until(engine, lambda: all(c.state is CardState.SERVING
                                             for c in engine.cards), limit=30)
        # same sessions: confirmed by a fresh attestation, not loaded again
        assert (await frozen_client.stats())["load_count"] == loads_before
        assert all("not reloaded" in c.reason for c in cards_of(engine, frozen.address))
        tg.cancel_scope.cancel()


async def test_a_dead_host_comes_back_empty_and_is_restaged(tmp_path: Path,
                                                            two_hosts: list[Emulator]) -> None:
    dead, alive = two_hosts
    plan = two_host_plan(tmp_path, two_hosts)
    async with open_engine(plan) as engine, anyio.create_task_group() as tg:
        await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                      task_status=task_status))
        with anyio.fail_after(60):
            await engine.deployed.wait()
        dead.process.kill()
        dead.process.wait(timeout=20)
        await wait_until(engine, lambda: all(
            c.state is CardState.DISCONNECTED for c in cards_of(engine, dead.address)))
        assert all(c.state is CardState.SERVING for c in cards_of(engine, alive.address))
        hosts = {h.host: h.state for h in await engine.store.hosts()}
        assert hosts[dead.address] == "UNREACHABLE"  # journaled, so `status` shows it
        port = int(dead.address.rsplit(":", 1)[1])
        reborn = Emulator(tmp_path, "a2", port=port)  # new cards, nothing staged
        two_hosts.append(reborn)
        await wait_until(engine, lambda: all(c.state is CardState.SERVING
                                             for c in engine.cards), limit=40)
        async with HostClient(reborn.address) as client:
            assert (await client.stats())["stage_count"] == 1  # staged again by itself
            listed = await client.list_devices()
        assert {d.state for d in listed} == {DeviceState.LOADED}
        assert {h.host: h.state for h in await engine.store.hosts()}[dead.address] == "UP"
        tg.cancel_scope.cancel()


# --- resuming ---------------------------------------------------------------------------------


def _watch_until(plan: Path, predicate: object, sig: int = signal.SIGKILL) -> int:
    process = subprocess.Popen([*MODELIP, "watch", str(plan), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if predicate(json.loads(line)):  # type: ignore[operator]
            process.send_signal(sig)
            break
    process.communicate(timeout=60)
    return process.returncode


def test_kills_while_resuming_never_reload_an_unchanged_session(
        tmp_path: Path, two_hosts: list[Emulator]) -> None:
    plan = two_host_plan(tmp_path, two_hosts).source
    assert subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                          timeout=120, check=False).returncode == 0
    # Killed twice right after resumed cards start attesting (the window in which the
    # journal used to forget "serving on session X"), then once at random.
    for _ in range(2):
        assert _watch_until(plan, lambda e: e.get("state") == "ATTESTING") == -signal.SIGKILL
    assert _watch_until(plan, lambda e: e.get("event") == "card" and e.get("device") == 2
                        ) == -signal.SIGKILL
    result = subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert not [e for e in events if e.get("state") == "LOADING"]
    with SQLiteStore(tmp_path / "state" / "journal.sqlite", read_only=True) as store:
        loads = anyio.run(store.loads)
    assert len(loads) == 8  # the first deployment's, and not one more
    assert len({(r.host, r.device, r.session_id) for r in loads}) == 8


# --- the state directory -----------------------------------------------------------------------


def watch_deployed(plan: Path) -> subprocess.Popen[str]:
    """`modelip watch PLAN --json` as a process, returned once its fleet is deployed."""
    process = subprocess.Popen([*MODELIP, "watch", str(plan), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["event"] == "deployed":
            return process
    raise AssertionError(f"watch ended before deploying: {process.communicate()}")


def _one_line_exit_5(result: subprocess.CompletedProcess[str], expected: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 5, result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_orchestrator_on_the_same_state_dir_refuses(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, hosts=1, devices=2)
    first = watch_deployed(plan)
    try:
        second = subprocess.run([*MODELIP, "deploy", str(plan), "--json"],
                                capture_output=True, text=True, timeout=60, check=False)
        _one_line_exit_5(second, f"in use by pid {first.pid}")
        assert second.stdout == ""  # it did not start anything
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0


def test_the_journal_deleted_under_watch_stops_it_with_a_summary(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, hosts=1, devices=2, extra_fleet="    reset_rate: 2")
    process = watch_deployed(plan)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "state" / f"journal.sqlite{suffix}").unlink(missing_ok=True)
    out, err = process.communicate(timeout=60)
    _one_line_exit_5(subprocess.CompletedProcess([], process.returncode, out, err),
                     "journal was deleted or replaced")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["exit_code"] == 5
    assert "deleted" in summary["error"]


def _fill(directory: Path) -> None:
    """Fill the filesystem (the journal may have filled it already: fine too)."""
    try:
        with open(directory / "ballast", "wb") as ballast:
            while True:
                ballast.write(b"\0" * 65536)
                ballast.flush()
    except OSError:
        pass


def _plan_on(tmp_path: Path, state_dir: Path, extra_fleet: str = "") -> Path:
    plan = write_plan(tmp_path, hosts=1, devices=2, extra_fleet=extra_fleet)
    plan.write_text(plan.read_text().replace("state_dir: state", f"state_dir: {state_dir}"))
    return plan


def test_a_full_state_dir_at_start_is_one_line_and_exit_5(tmp_path: Path, small_fs: Path
                                                           ) -> None:
    _fill(small_fs)
    plan = _plan_on(tmp_path, small_fs / "state")
    result = subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                            text=True, timeout=60, check=False)
    _one_line_exit_5(result, "No space left on device")


def test_a_state_dir_that_fills_up_under_watch_stops_it_with_a_summary(
        tmp_path: Path, small_fs: Path) -> None:
    plan = _plan_on(tmp_path, small_fs / "state", extra_fleet="    reset_rate: 2")
    process = watch_deployed(plan)
    _fill(small_fs)
    out, err = process.communicate(timeout=90)
    _one_line_exit_5(subprocess.CompletedProcess([], process.returncode, out, err),
                     "cannot write the journal")
    assert json.loads(out.strip().splitlines()[-1])["exit_code"] == 5


def test_read_only_state_dir_refuses_and_status_still_reads(tmp_path: Path, small_fs: Path
                                                            ) -> None:
    plan = _plan_on(tmp_path, small_fs / "state")
    assert subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                          timeout=120, check=False).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    result = subprocess.run([*MODELIP, "deploy", str(plan), "--json"], capture_output=True,
                            text=True, timeout=60, check=False)
    _one_line_exit_5(result, "Read-only file system")
    status = subprocess.run([*MODELIP, "status", str(plan), "--json"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert [c["state"] for c in document["cards"]] == ["SERVING", "SERVING"]
    assert [h["state"] for h in document["hosts"]] == ["UP"]


async def test_a_replayed_load_receipt_is_caught_not_taken_for_a_load(tmp_path: Path) -> None:
    """The host answers a load with the receipt of an earlier load of the same session,
    without asking the card (which holds nothing after an unload): the receipt binds
    the key slot of the load it answers, so the card is QUARANTINED, never SERVING."""
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2, extra_fleet=(
        "    adversary: replay-receipt\n    adversary_devices: [0]")))
    async with running(plan) as (engine, clients):
        assert {c.state.value for c in engine.cards} == {"SERVING"}  # first loads are real
        served: list[str] = []
        engine.subscribe(lambda e: served.append(e.state) if getattr(e, "device", None) == 0
                         and getattr(e, "KIND", "") == "card" else None)
        await clients[0].unload(0)          # same session, the card now holds nothing
        card = engine.cards[0]
        await wait_until(engine, lambda: card.state is CardState.QUARANTINED)
        assert "replayed by the host" in card.reason
        assert "SERVING" not in served
        listed = {d.device: d.state for d in await clients[0].list_devices()}
        assert listed[0] is DeviceState.ONLINE                  # it really holds nothing
        assert engine.cards[1].state is CardState.SERVING       # the honest card is untouched
