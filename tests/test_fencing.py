"""Fencing that reaches the hosts (docs/protocol.md "Fencing"): every call carries the
caller's lease epoch on the host; the host refuses a change to a card under an epoch
older than one it has seen, and the engine takes that refusal as its lease lost.
Against a real emulated host over gRPC."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.app import grpc_host, open_engine
from orchestrator.emulator.fleet import FleetConfig, run_fleet
from orchestrator.emulator.pki import VendorPKI
from orchestrator.engine.hostapi import HostAPI, HostLease, HostTarget
from orchestrator.engine.state import CardState
from orchestrator.errors import FormatError, LeaseLost
from orchestrator.plan.model import Plan
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import Deadlines
from tests.models import tiny_mlp


async def test_the_host_refuses_a_change_under_an_older_epoch(pki: VendorPKI) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=2), pki=pki) as fleet:
        [address] = fleet.addresses
        async with HostClient(address, fence=(1, "a")) as old, \
                HostClient(address, fence=(2, "b")) as new, \
                HostClient(address, fence=(2, "intruder")) as same_epoch, \
                HostClient(address) as unfenced:
            await old.reset(0)                      # epoch 1: the highest seen so far
            assert await new.list_devices()         # reading raises it to 2
            with pytest.raises(LeaseLost, match="refused our fencing epoch"):
                await old.reset(1)
            with pytest.raises(LeaseLost):
                await old.unload(0)
            with pytest.raises(LeaseLost):          # the same epoch from another holder
                await same_epoch.reset(1)
            assert await old.attest(1, os.urandom(32))   # reading is not refused
            await new.reset(1)                      # the holder of epoch 2 may
            await unfenced.reset(0)                 # an operator's tool carries no fence
            stats = await unfenced.stats()
            assert stats["fenced_refusals"] == 3
            assert fleet.hosts[0].fences.epoch == 2


@pytest.mark.parametrize("token", ["", "x:a", "1", "1:", "-1:a", "99999999999999999999:a",
                                   "1:" + "a" * 256, "1:a b"])
async def test_a_malformed_fencing_token_is_refused_as_malformed(pki: VendorPKI,
                                                                 token: str) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1), pki=pki) as fleet:
        client = HostClient(fleet.addresses[0])
        client._metadata = (("modelip-fence", token),)  # noqa: SLF001 - a hostile caller
        async with client:
            with pytest.raises(FormatError, match="modelip-fence"):
                await client.reset(0)
        assert fleet.hosts[0].fences.epoch == 0


async def fenced(engine: Any) -> None:
    """Until the engine has fenced its host (fencing moves nothing: no event to wait on)."""
    with anyio.fail_after(30):
        while True:
            if engine.hosts[0].fenced:
                return
            await anyio.sleep(0.02)


async def test_a_replica_whose_gate_misjudges_is_stopped_by_the_host(tmp_path: Path) -> None:
    """An engine holding the host under epoch 1 whose own gate says it may act (a
    paused VM, a clock jump): once a newer holder (epoch 2) has called the host, the
    host refuses the engine's load after a reset, and the engine fences the host at
    once: no load reaches a card, nothing more is written about the host."""
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "plan.yaml").write_text(
        "model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
        "fleet: {emulated: {hosts: 1, devices_per_host: 2, reboot_time: 0.05}}\n"
        "retry: {attempts: 3, backoff: 0.05}\n"
        "rekey: {min_interval: 0.05, check_interval: 0.3}\nstate_dir: state\n")

    def misjudged(target: HostTarget, deadlines: Deadlines, lease: HostLease | None
                  ) -> HostAPI:
        return grpc_host(target, deadlines, HostLease("a", 1, lambda: 60.0))

    async with open_engine(Plan.load(tmp_path / "plan.yaml"), connect=misjudged) as engine, \
            anyio.create_task_group() as tg:
        await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                      task_status=task_status))
        with anyio.fail_after(60):
            await engine.deployed.wait()
        assert [c.state for c in engine.cards] == [CardState.SERVING] * 2
        address = engine.hosts[0].target.address
        async with HostClient(address, fence=(2, "b")) as newer, \
                HostClient(address) as operator:
            await newer.list_devices()             # the newer holder has called the host
            loads: Any = (await operator.stats())["load_count"]
            await operator.reset(0)                 # the engine's driver will want to reload
            await fenced(engine)
            stats = await operator.stats()
        assert stats["fenced_refusals"] >= 1
        assert stats["load_count"] == loads          # no load reached a card
        assert "refused our fencing epoch" in str(engine.hosts[0].lease_lost)
        moved = len(await engine.store.card_transitions(address, 0, 100))
        await anyio.sleep(0.5)
        assert len(await engine.store.card_transitions(address, 0, 100)) == moved
        tg.cancel_scope.cancel()
