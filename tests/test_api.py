"""The control API (docs/api.md): revisions from the store, list, watch from a
revision with every change exactly once, history kept and its end, the CLI."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
from orchestrator.api.apart import serve_api_apart
from orchestrator.api.server import OLDEST_KEY, serve_api
from orchestrator.app import open_engine
from orchestrator.engine.engine import Engine
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import UsageError
from orchestrator.plan.api import ApiSpec, ApiTLS
from orchestrator.plan.model import Plan
from orchestrator.transport.client import HostClient
from tests.test_engine import wait_until, write_plan

C = control_pb2.Change
MODELIP = [sys.executable, "-m", "orchestrator"]


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[Engine, str]]:
    """An engine keeping 2 hosts x 2 cards serving, its API on a free loopback port."""
    plan = Plan.load(write_plan(tmp_path, hosts=2, devices=2))
    async with open_engine(plan) as engine, anyio.create_task_group() as tg:
        await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                      task_status=task_status))
        address = await tg.start(serve_api, ApiSpec(listen="127.0.0.1:0"), engine.store,
                                 engine.changed)
        with anyio.fail_after(60):
            await engine.deployed.wait()
        yield engine, address
        tg.cancel_scope.cancel()


async def _until_caught_up(stub: control_pb2_grpc.ControlStub,
                           request: control_pb2.WatchRequest) -> list[control_pb2.Change]:
    """What a watch sends up to its first bookmark (the backlog, caught up)."""
    got = []
    with anyio.fail_after(20):
        async for batch in stub.Watch(request):
            for change in batch.changes:
                got.append(change)
                if change.type == C.BOOKMARK:
                    return got
    raise AssertionError("the watch ended")


async def test_a_watcher_that_comes_back_gets_every_change_once(tmp_path: Path) -> None:
    async with serving(tmp_path) as (engine, address), \
            grpc.aio.insecure_channel(address) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        first = await _until_caught_up(stub, control_pb2.WatchRequest())
        snapshot_end = next(c for c in first if c.type == C.SNAPSHOT_END)
        listed = [c.card for c in first if c.type == C.CARD and
                  c.revision == snapshot_end.revision]
        assert len(listed) == 4 and {c.state for c in listed} == {"SERVING"}
        last = first[-1].revision            # then the watcher goes away ...
        rekeys = engine.stats.rekeys
        async with HostClient(engine.hosts[0].target.address) as host:   # ... cards reset
            await host.reset(0)
            await host.reset(1)
        await wait_until(engine, lambda: engine.stats.rekeys >= rekeys + 2 and all(
            c.state.value == "SERVING" for c in engine.cards))
        again = await _until_caught_up(stub, control_pb2.WatchRequest(since=last))
        changes = [c for c in again if c.type != C.BOOKMARK]
        journal = await engine.store.changes(last, 10_000)
        assert [c.revision for c in changes] == [c.revision for c in journal]   # all, once
        assert [c.revision for c in changes] == list(range(last + 1, last + 1 + len(journal)))
        moves = [(c.card.device, c.card.state) for c in changes if c.card.host == "host0"]
        for device in (0, 1):   # each reset card: re-keyed, serving again, in order
            mine = [state for d, state in moves if d == device]
            assert "REKEYING" in mine and mine[-1] == "SERVING"
        listing = await stub.List(control_pb2.ListRequest())
        assert listing.revision == again[-1].revision


async def test_a_revision_older_than_the_history_kept_is_out_of_range(tmp_path: Path) -> None:
    async with serving(tmp_path) as (engine, address), \
            grpc.aio.insecure_channel(address) as channel:
        await engine.store.trim_changes(1, 3600)   # keep the newest alone
        oldest, newest = await engine.store.revisions()
        assert oldest == newest > 1
        stub = control_pb2_grpc.ControlStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _until_caught_up(stub, control_pb2.WatchRequest(since=0))
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert dict(caught.value.trailing_metadata() or ())[OLDEST_KEY] == str(oldest)
        # the CLI: one line naming the oldest revision kept, exit 2; the future too
        for since, said in ((0, f"older than the history kept (the oldest is {oldest})"),
                            (newest + 5, f"is from the future: the newest is {newest}")):
            run = await anyio.run_process([*MODELIP, "events", "--api", address, "--since",
                                           str(since)], check=False)
            err = run.stderr.decode()
            assert run.returncode == 2 and said in err and len(err.splitlines()) == 1, err
        # from the oldest kept on, the watch answers
        assert (await _until_caught_up(stub, control_pb2.WatchRequest(since=oldest - 1)))


async def test_the_cli_lists_and_replays(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_, address):
        listed = (await anyio.run_process([*MODELIP, "fleet", "--api", address])).stdout
        head, *rows = listed.decode().splitlines()
        assert head.endswith("2 hosts, 4 cards, 4 serving") and len(rows) == 6
        replay = (await anyio.run_process([*MODELIP, "events", "--api", address, "--since",
                                           "0"])).stdout.decode().splitlines()
        assert "card host0/0 h0-card0 SERVING (was LOADING)" in "\n".join(replay)
        revisions = [int(line.split()[0]) for line in replay]
        assert revisions == sorted(revisions) == list(range(1, len(revisions) + 1))


async def test_the_api_listens_on_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="loopback only"):
        await serve_api(ApiSpec(listen="0.0.0.0:0"), None)  # type: ignore[arg-type]


# --- who may do what ------------------------------------------------------------------------


def _certificates(tmp_path: Path) -> tuple[ApiSpec, dict[str, Path]]:
    """Mutual TLS for the API: its CA, its certificate, and clients "dash" (a viewer),
    "ci-bot" (an operator), "bob" (an admin), "stranger" (named nowhere), "intruder"
    (another CA's). The spec on a free loopback port, and the PEM files."""
    from tests.test_tls import _cert, _cert_pem, _pem

    ca, other = _cert("ops ca", None, ca=True), _cert("other ca", None, ca=True)
    server = _cert("api", ca, ip="127.0.0.1")
    files = {"ca.pem": _cert_pem(ca[1]), "api.pem": _cert_pem(server[1]),
             "api.key": _pem(server[0])}
    for name, issuer in (("dash", ca), ("ci-bot", ca), ("bob", ca), ("stranger", ca),
                         ("intruder", other)):
        key, cert = _cert(name, issuer)
        files[f"{name}.pem"], files[f"{name}.key"] = _cert_pem(cert), _pem(key)
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    spec = ApiSpec("127.0.0.1:0", ApiTLS(paths["api.pem"], paths["api.key"], paths["ca.pem"]),
                   {"dash": "viewer", "ci-bot": "operator", "bob": "admin"})
    return spec, paths


@asynccontextmanager
async def secured(tmp_path: Path) -> AsyncIterator[tuple[str, SQLiteStore, dict[str, Path]]]:
    """The API over a journal with a rollout in progress, mutual TLS and roles
    (_certificates). Yields its address, the journal, the PEM files."""
    from orchestrator.engine.rollout.ledger import RolloutLedger

    spec, paths = _certificates(tmp_path)
    with SQLiteStore(tmp_path / "journal.sqlite") as journal:
        await RolloutLedger(journal).start("p1", "p2c", "p2", [1, 2], "started")
        async with anyio.create_task_group() as tg:
            address = await tg.start(serve_api, spec, journal, None)
            yield address, journal, paths
            tg.cancel_scope.cancel()


def _as(paths: dict[str, Path], name: str) -> list[str]:
    return ["--tls-ca", str(paths["ca.pem"]), "--tls-cert", str(paths[f"{name}.pem"]),
            "--tls-key", str(paths[f"{name}.key"])]


async def test_a_viewer_may_watch_but_not_command_and_is_journaled(tmp_path: Path) -> None:
    from orchestrator.engine.rollout.ledger import RolloutLedger

    async with secured(tmp_path) as (address, journal, paths):
        listed = await anyio.run_process([*MODELIP, "fleet", "--api", address,
                                          *_as(paths, "dash")], check=False)
        assert listed.returncode == 0, listed.stderr
        for viewer in ("dash", "stranger"):   # named a viewer, or named nowhere
            run = await anyio.run_process([*MODELIP, "rollout", "pause", "--api", address,
                                           *_as(paths, viewer)], check=False)
            err = run.stderr.decode()
            assert run.returncode == 3 and len(err.splitlines()) == 1, err
            assert f"{viewer} is viewer; rollout pause needs operator" in err
        assert not (await RolloutLedger(journal).active()).paused  # type: ignore[union-attr]
        refused = [c.body for c in await journal.changes(0) if c.kind == "command"]
        assert [(c["who"], c["outcome"]) for c in refused] == [
            ("dash", "refused: needs operator"), ("stranger", "refused: needs operator")]


async def test_an_operator_pauses_the_rollout_in_its_own_name(tmp_path: Path) -> None:
    from orchestrator.engine.rollout.ledger import RolloutLedger

    async with secured(tmp_path) as (address, journal, paths):
        run = await anyio.run_process([*MODELIP, "rollout", "pause", "--api", address,
                                       *_as(paths, "ci-bot")], check=False)
        assert run.returncode == 0 and b"pause requested" in run.stdout, run.stderr
        ledger = RolloutLedger(journal)
        record = await ledger.active()
        assert record is not None and record.paused
        history = [h.what for h in await ledger.history(record.id)]
        assert history[-1] == "pause requested by ci-bot (operator, control API)"
        again = await anyio.run_process([*MODELIP, "rollout", "pause", "--api", address,
                                         *_as(paths, "ci-bot")], check=False)
        assert b"already paused" in again.stdout
        done = [(c.body["who"], c.body["outcome"]) for c in await journal.changes(0)
                if c.kind == "command"]
        assert done == [("ci-bot", "done"), ("ci-bot", "already so")]


async def test_a_certificate_from_another_ca_is_refused_at_the_handshake(tmp_path: Path
                                                                        ) -> None:
    async with secured(tmp_path) as (address, _, paths):
        run = await anyio.run_process([*MODELIP, "fleet", "--api", address,
                                       *_as(paths, "intruder")], check=False)
        assert run.returncode == 4, run.stderr
        plain = await anyio.run_process([*MODELIP, "fleet", "--api", address], check=False)
        assert plain.returncode == 4   # no TLS at all: no answer either


@pytest.mark.parametrize(("api", "expected"), [
    ("api: {listen: 0.0.0.0:62480}", "api.listen: 0.0.0.0:62480 is not loopback: give api.tls"),
    ("api: {tls: {cert: bad.pem, key: bad.pem, client_ca: bad.pem}}",
     "api.tls.cert: bad.pem: not a PEM certificate"),
    ("api: {roles: {operator: [ci-bot]}}", "api.roles: roles name certificates: give api.tls"),
    ("api: {listen: nowhere}", "api.listen: must be ADDRESS:PORT"),
    ("api: {rols: {}}", "api.rols: is not a known key: did you mean 'roles'?"),
])
def test_a_bad_api_section_is_one_line(api: str, expected: str, tmp_path: Path) -> None:
    from orchestrator.errors import PlanError

    (tmp_path / "bad.pem").write_text("not a certificate\n")
    with pytest.raises(PlanError, match=re.escape(expected)):
        Plan.load(write_plan(tmp_path, extra=api))


def test_the_plans_api_section_is_served_by_watch(tmp_path: Path) -> None:
    """api: in the plan, --api's address over it; the bound address said on stderr."""
    import subprocess

    plan = write_plan(tmp_path, extra="api: {listen: 127.0.0.1:0}")
    with subprocess.Popen([*MODELIP, "watch", str(plan), "--json", "--duration", "30"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                          ) as watch:
        assert watch.stderr is not None
        said = watch.stderr.readline()
        address = said.split("control API on ", 1)[1].strip()
        listed = subprocess.run([*MODELIP, "events", "--api", address], capture_output=True,
                                text=True, timeout=60, check=True)
        assert "snapshot end" in listed.stdout
        watch.terminate()


async def test_the_example_reacts_to_resets_and_resumes_after_a_restart(tmp_path: Path
                                                                       ) -> None:
    """examples/react_to_resets.py: each reset card's re-key once, across a restart."""
    example = Path(__file__).parent.parent / "examples" / "react_to_resets.py"
    state = tmp_path / "resets.rev"

    async with serving(tmp_path) as (engine, address), \
            HostClient(engine.hosts[0].target.address) as host:

        async def reset_and_see(device: int) -> list[str]:
            """Run the example while card ``device`` resets and is re-keyed: its lines."""
            rekeys = engine.stats.rekeys
            async with await anyio.open_process(
                    [sys.executable, str(example), "--api", address, "--state", str(state)]
                    ) as process:
                assert process.stdout is not None
                with anyio.fail_after(30):
                    while not state.exists():  # noqa: ASYNC110 - another process's file
                        await anyio.sleep(0.05)
                    await host.reset(device)
                    await wait_until(engine, lambda: engine.stats.rekeys > rekeys and all(
                        c.state.value == "SERVING" for c in engine.cards))
                    said = b""
                    while f"host0/{device} ".encode() not in said:
                        said += await process.stdout.receive()
                process.terminate()
            return said.decode().splitlines()

        first = await reset_and_see(0)
        assert len(first) == 1 and first[0].startswith("host0/0 h0-card0 (boot 2) re-keyed")
        second = await reset_and_see(1)   # started again: from its last revision
        assert len(second) == 1 and second[0].startswith("host0/1 h0-card1 (boot 2) re-keyed")


async def test_the_first_bookmark_comes_after_everything_journaled_before_the_watch(
        tmp_path: Path) -> None:
    """The shared reader looks at the store every 0.25 s when no engine says it moved:
    changes journaled just before a watch are read from the store for it."""
    with SQLiteStore(tmp_path / "journal.sqlite") as journal:
        async with anyio.create_task_group() as tg:
            address = await tg.start(serve_api, ApiSpec("127.0.0.1:0"), journal, None)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = control_pb2_grpc.ControlStub(channel)
                await anyio.sleep(0.3)
                for n in range(5):
                    await journal.record_command("t", "operator", f"c{n}", "done")
                got = await _until_caught_up(stub, control_pb2.WatchRequest(since=0))
            tg.cancel_scope.cancel()
    assert [c.command.command for c in got if c.type == C.COMMAND] == [
        f"c{n}" for n in range(5)]


async def test_the_json_events_name_the_revisions_the_watch_names(tmp_path: Path) -> None:
    from orchestrator.engine.events import CardChanged

    async with serving(tmp_path) as (engine, _):
        moves: list[CardChanged] = []
        engine.subscribe(lambda e: moves.append(e) if isinstance(e, CardChanged) else None)
        rekeys = engine.stats.rekeys
        async with HostClient(engine.hosts[1].target.address) as host:
            await host.reset(1)
        await wait_until(engine, lambda: engine.stats.rekeys > rekeys and all(
            c.state.value == "SERVING" for c in engine.cards))
        journal = {c.revision: c for c in await engine.store.changes(0, 10_000)}
        assert len(moves) >= 3
        for move in moves:   # each event: the change the watch sends under that revision
            change = journal[move.revision]
            assert change.kind == "card" and (change.body["host"], change.body["device"],
                                              change.body["state"]) == (
                move.host, move.device, move.state)
        assert json.loads(moves[-1].to_json())["revision"] == moves[-1].revision


async def test_an_admin_releases_a_quarantined_card_and_it_serves_again(tmp_path: Path
                                                                       ) -> None:
    """A card quarantined for a body the host altered; the host is mended; an admin's
    release tries it again (an operator's is refused); a serving card is not released."""
    from orchestrator.app import grpc_host
    from orchestrator.emulator.adversary import Adversary
    from orchestrator.emulator.fleet import FleetConfig, run_fleet
    from orchestrator.engine.host import HostTarget
    from orchestrator.engine.prepare import obtain_mek, prepare_program

    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=2))
    mek = obtain_mek(plan)
    program = prepare_program(plan, mek)
    spec, paths = _certificates(tmp_path)
    with SQLiteStore(plan.journal_path) as journal:
        async with run_fleet(FleetConfig(hosts=1, devices_per_host=2)) as fleet, \
                HostClient(fleet.addresses[0]) as client, anyio.create_task_group() as tg:
            engine = Engine(plan, [HostTarget("host0", fleet.addresses[0], (0, 1))],
                            [fleet.pki.root], mek, program, journal, connect=grpc_host)
            tg.start_soon(lambda: engine.run(keep_serving=True))
            # the API in its own process, as `watch --api` runs it (mutual TLS there;
            # the release reaches the engine over the process's pipe)
            address = await tg.start(lambda task_status: serve_api_apart(
                spec, journal, release=engine.release, cordoned=engine.cordons_changed,
                task_status=task_status))
            with anyio.fail_after(30):
                await engine.deployed.wait()
            backend = fleet.hosts[0].backend
            backend.adversary, backend.adversary_devices = Adversary.TAMPER_BODY, frozenset({1})
            await client.reset(1)
            await wait_until(engine, lambda: engine.cards[1].state.value == "QUARANTINED")
            backend.adversary = Adversary.NONE   # the host mended

            async def release(who: str, device: int) -> tuple[int, str]:
                run = await anyio.run_process([*MODELIP, "release", "host0", str(device),
                                               "--api", address, *_as(paths, who)],
                                              check=False)
                return run.returncode, (run.stdout + run.stderr).decode()

            code, said = await release("ci-bot", 1)
            assert code == 3 and "ci-bot is operator; release host0/1 needs admin" in said
            code, said = await release("bob", 0)
            assert code == 2 and "host0/0 is SERVING, not quarantined" in said
            assert engine.cards[1].state.value == "QUARANTINED"
            code, said = await release("bob", 1)
            assert code == 0 and "released from quarantine" in said, said
            await wait_until(engine, lambda: engine.cards[1].state.value == "SERVING")
            moves = [t.reason for t in await journal.card_transitions("host0", 1)]
            assert "released from quarantine by bob (admin, control API)" in moves
            outcomes = [(c.body["who"], c.body["command"], c.body["outcome"])
                        for c in await journal.changes(0, 10_000) if c.kind == "command"]
            assert outcomes == [
                ("ci-bot", "release host0/1", "refused: needs admin"),
                ("bob", "release host0/0", "refused: card host0/0 is SERVING, not "
                                           "quarantined"),
                ("bob", "release host0/1", "done")]
            tg.cancel_scope.cancel()


async def test_the_shared_reader_waits_out_a_store_that_fails(tmp_path: Path) -> None:
    """A store that cannot be read for a while (a database restart, for replicas): the
    API's reader says so in the log and reads again; the process does not end."""
    from orchestrator.api.feed import ChangeFeed
    from orchestrator.errors import StoreUnavailable

    class Away(SQLiteStore):   # a staged fault: the first reads fail
        failures = 2

        async def changes(self, after: int, limit: int = 1000) -> list[Any]:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("store", "the database does not answer")
            return await super().changes(after, limit)

    with Away(tmp_path / "journal.sqlite") as journal:
        feed = ChangeFeed(journal, None)
        async with anyio.create_task_group() as tg:
            await tg.start(feed.run)
            await journal.record_command("t", "operator", "c", "done")
            with anyio.fail_after(5):
                await feed.moved()
            tg.cancel_scope.cancel()
    assert journal.failures == 0 and feed.newest >= 1


async def test_a_store_that_fails_a_call_is_unavailable_said_in_one_line(tmp_path: Path
                                                                        ) -> None:
    from orchestrator.errors import StoreUnavailable

    class Away(SQLiteStore):   # a staged fault: the cards cannot be read
        async def cards(self) -> list[Any]:
            raise StoreUnavailable("postgresql://db/fleet", "the database does not answer")

    with Away(tmp_path / "journal.sqlite") as journal:
        async with anyio.create_task_group() as tg:
            address = await tg.start(serve_api, ApiSpec("127.0.0.1:0"), journal, None)
            for command in (["fleet"], ["events"]):
                run = await anyio.run_process([*MODELIP, *command, "--api", address],
                                              check=False)
                err = run.stderr.decode()
                assert run.returncode == 4 and len(err.splitlines()) == 1, err
                assert "control API: the store: " in err and "does not answer" in err
            tg.cancel_scope.cancel()
