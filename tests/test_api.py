"""The control API (docs/api.md): revisions from the store, list, watch from a
revision with every change exactly once, history kept and its end, the CLI."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import grpc
import pytest

from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc
from orchestrator.api.server import OLDEST_KEY, serve_api
from orchestrator.app import open_engine
from orchestrator.engine.engine import Engine
from orchestrator.errors import UsageError
from orchestrator.plan.api import ApiSpec
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
        async for change in stub.Watch(request):
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
