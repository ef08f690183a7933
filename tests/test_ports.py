"""The engine's ports: a fake host (a HostAPI of a few dozen lines, cards in this
process, no gRPC) drives a HostSupervisor and its CardDrivers through a deployment,
a reset and a re-key, built through the composition root as the CLI builds it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from orchestrator.app import open_engine
from orchestrator.crypto.wrap import KeySlot
from orchestrator.emulator.card import CardConfig, EmulatedCard
from orchestrator.emulator.pki import VendorPKI
from orchestrator.engine.hostapi import HostAPI
from orchestrator.engine.state import CardState
from orchestrator.plan.model import Plan
from orchestrator.qpc.container import Container, MemorySource
from orchestrator.transport.types import (
    DeviceEvent,
    DeviceState,
    DeviceStatus,
    EventKind,
    LoadResult,
)
from tests.models import tiny_mlp


class FakeHost:
    """Cards in this process behind the HostAPI: what a host must do, nothing more."""

    def __init__(self, pki: VendorPKI, devices: int) -> None:
        self.cards = [EmulatedCard(pki.issue_card(f"fake-{i}"), CardConfig())
                      for i in range(devices)]
        self.bodies: dict[str, bytes] = {}
        self.loads = 0
        self.attestations = 0
        self._watchers: list[MemoryObjectSendStream[DeviceEvent]] = []

    async def attest(self, device: int, request: bytes) -> bytes:
        self.attestations += 1
        return self.cards[device].attest(request)

    async def list_devices(self, *, deadline: float | None = None) -> list[DeviceStatus]:
        return [DeviceStatus(i, c.card_id, DeviceState.LOADED if c.program else
                             DeviceState.ONLINE, c.boot_counter, c.session_fingerprint.hex(),
                             c.program.program_id if c.program else "",
                             c.program.partition if c.program else 0)
                for i, c in enumerate(self.cards)]

    async def watch_events(self) -> AsyncIterator[DeviceEvent]:
        send, receive = anyio.create_memory_object_stream[DeviceEvent](16)
        self._watchers.append(send)
        async with receive:
            async for event in receive:
                yield event

    async def stage(self, path: str | os.PathLike[str], *, program_id: str | None = None
                    ) -> tuple[str, bool]:
        body = await anyio.Path(path).read_bytes()
        program_id = program_id or hashlib.sha256(body).hexdigest()
        already = program_id in self.bodies
        self.bodies[program_id] = body
        return program_id, already

    async def load(self, device: int, program_id: str, *, partition: int = 0,
                   key_slots: Sequence[KeySlot] | None = None) -> LoadResult:
        card = self.cards[device]
        names = card.load(Container(MemorySource(self.bodies[program_id])),
                          program_id=program_id, partition=partition,
                          key_slots=list(key_slots) if key_slots is not None else None)
        self.loads += 1
        return LoadResult(names, *card.load_receipt())

    async def unload(self, device: int) -> None:
        self.cards[device].unload()

    async def execute(self, devices: Sequence[int], inputs: dict[str, Any]) -> dict[str, Any]:
        return self.cards[devices[0]].execute(inputs)

    async def close(self) -> None:
        for watcher in self._watchers:
            await watcher.aclose()

    async def reset(self, device: int) -> None:
        card = self.cards[device]
        card.reset()
        await self.announce(device, EventKind.RESET, card.boot_counter)

    async def announce(self, device: int, kind: EventKind, boot_counter: int) -> None:
        for watcher in self._watchers:
            await watcher.send(DeviceEvent(device, kind, boot_counter, 0))


async def polled(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (what it reads moves without an event to wait on)."""
    with anyio.fail_after(30):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


async def test_a_fake_host_drives_the_engine_through_a_reset_and_a_rekey(
        tmp_path: Path, pki: VendorPKI) -> None:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "root.pem").write_bytes(pki.root_pem)
    path = tmp_path / "plan.yaml"
    path.write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                    "fleet: {hosts: [{address: '127.0.0.1:1', devices: [0, 1]}]}\n"
                    "trust: {roots: [root.pem]}\n"
                    "rekey: {min_interval: 0.01, check_interval: 0, resync_interval: 0.2}\n"
                    "state_dir: state\n")
    host = FakeHost(pki, 2)
    connected: list[str] = []

    def connect(target: Any, deadlines: Any, gate: Any) -> HostAPI:
        connected.append(target.address)
        return host

    async with open_engine(Plan.load(path), connect=connect) as engine, \
            anyio.create_task_group() as tg:
        await tg.start(lambda task_status: engine.run(keep_serving=True,
                                                      task_status=task_status))
        with anyio.fail_after(30):
            await engine.deployed.wait()
        assert connected == ["127.0.0.1:1"]
        assert [c.state for c in engine.cards] == [CardState.SERVING] * 2
        assert host.loads == 2
        before = engine.cards[1].session_id
        await host.reset(1)          # an event: a hint that wakes the card's driver
        with anyio.fail_after(30):
            while not (engine.stats.rekeys == 1 and engine.cards[1].state is CardState.SERVING):
                await engine.changed()
        assert engine.cards[1].session_id == host.cards[1].session_id != before
        assert host.loads == 3       # a re-key is one load, never a re-stage
        assert host.cards[0].program is not None and host.cards[1].program is not None
        # News that arrives late (a reset and an offline that ended the boot before
        # the one just verified, an online of that one): dropped, no attestation spent
        attested, boot = host.attestations, host.cards[1].boot_counter
        await host.announce(1, EventKind.RESET, boot - 1)
        await host.announce(1, EventKind.OFFLINE, boot - 1)
        await host.announce(1, EventKind.ONLINE, boot)
        await polled(lambda: engine.stats.stale_hints >= 3)
        await anyio.sleep(0.2)       # 20 x min_interval: time enough to have looked
        assert host.attestations == attested and engine.stats.disproved_hints == 0
        # ... while news of this boot's end is acted on: the card is looked at again
        await host.announce(1, EventKind.RESET, boot)
        await polled(lambda: host.attestations > attested)
        assert engine.stats.stale_hints == 3
        tg.cancel_scope.cancel()
