"""The host agent: one host's side of runtime.proto over a card backend.

Everything a host does that is not "being a card" (docs/host-agent.md): the staging
store, the fan-out of card events to every watcher, fencing (agent/fencing.py), which
fleet holds each card (agent/claims.py), the
counts HostStats reports, and the first sanity checks on what a backend answers. The
backend is trusted with nothing that matters (the orchestrator verifies the cards'
signatures), but a backend that answers with another card's evidence is named here,
per card, before anyone else spends work on it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from google.protobuf.message import DecodeError

from orchestrator._proto.modelip.v1 import evidence_pb2, runtime_pb2
from orchestrator.agent.aborts import HostAbort
from orchestrator.agent.backend import CardBackend
from orchestrator.agent.claims import ClaimKeeper
from orchestrator.agent.fencing import FenceKeeper
from orchestrator.agent.staging import Staging

R = runtime_pb2
B = TypeVar("B", bound=CardBackend)
WATCH_BUFFER = 1024  # events held for one slow watcher; beyond, it loses hints
_log = logging.getLogger("modelip.agent")


@dataclass(slots=True)
class HostStats:
    stage_count: int = 0
    load_count: int = 0


class HostAgent(Generic[B]):
    """One host: its backend's cards behind staging, events, fencing and statuses."""

    def __init__(self, name: str, backend: B, staging: Staging | None = None
                 ) -> None:
        self.name = name
        self.backend = backend
        self.staging = staging if staging is not None else Staging()
        self.stats = HostStats()
        self.fences = FenceKeeper(name)
        self.claims = ClaimKeeper(name)
        self.address = ""
        self._card_ids: dict[int, str] = {}   # as the backend last listed them
        self._watchers: set[MemoryObjectSendStream[runtime_pb2.DeviceEvent]] = set()
        self._watcher_added = anyio.Event()  # set (and renewed) each time a stream opens

    def __repr__(self) -> str:
        return f"HostAgent({self.name!r}, {self.address or 'idle'})"

    async def live(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                   ) -> None:
        """The backend's life (its events come to ``emit``) while the agent serves."""
        await self.backend.live(self.emit, task_status=task_status)

    # --- events -----------------------------------------------------------------------

    def emit(self, event: runtime_pb2.DeviceEvent) -> None:
        """Hand one backend event to every watcher; a slow or gone watcher loses hints,
        never blocks the host."""
        for stream in list(self._watchers):
            try:
                stream.send_nowait(event)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async def events(self, most: int = 1) -> AsyncIterator[list[runtime_pb2.DeviceEvent]]:
        """The events of a watcher, in order: each time, what is queued (at most
        ``most``; at least one)."""
        send, receive = anyio.create_memory_object_stream[runtime_pb2.DeviceEvent](
            WATCH_BUFFER)
        self._watchers.add(send)
        self._watcher_added.set()
        self._watcher_added = anyio.Event()
        try:
            async with receive:
                async for event in receive:
                    queued = [event]
                    while len(queued) < most:
                        try:
                            queued.append(receive.receive_nowait())
                        except anyio.WouldBlock:
                            break
                    yield queued
        finally:
            self._watchers.discard(send)
            send.close()

    async def watched(self) -> None:
        """Return once an event stream is open (so a reset that follows is seen)."""
        while not self._watchers:
            await self._watcher_added.wait()

    # --- cards --------------------------------------------------------------------------

    async def devices(self) -> Sequence[runtime_pb2.DeviceInfo]:
        listed = await self.backend.devices()
        self._card_ids = {info.device: info.card_id for info in listed}
        for info in listed:
            info.claimed_by = self.claims.holder(info.device)
        return listed

    async def attest(self, device: int, request: bytes) -> evidence_pb2.AttestationEvidence:
        evidence = await self.backend.attest(device, request)
        expected = self._card_ids.get(device)
        if expected:
            try:
                named = evidence_pb2.ReportBody.FromString(evidence.body).card_id
            except DecodeError:
                named = None  # not a report at all: the orchestrator says so, by card
            if named is not None and named != expected:
                raise HostAbort.of(R.ERROR_REASON_INTERNAL,
                                   f"host {self.name}: the card backend answered device "
                                   f"{device} ({expected}) with evidence of card "
                                   f"{named[:64]!r}", device)
        return evidence

    async def stage(self, chunks: AsyncIterator[runtime_pb2.StageChunk]
                    ) -> runtime_pb2.StageProgramResponse:
        program_id, stored = await self.staging.receive(chunks)
        self.stats.stage_count += stored
        return runtime_pb2.StageProgramResponse(program_id=program_id,
                                                already_staged=not stored)

    async def load(self, device: int, program_id: str, partition: int,
                   key_slots: evidence_pb2.KeySlotTable | None
                   ) -> runtime_pb2.LoadProgramResponse:
        staged = self.staging.get(program_id)
        if staged is None:
            raise HostAbort.of(R.ERROR_REASON_UNKNOWN_PROGRAM,
                               f"host {self.name}: program {program_id[:16]} is not staged",
                               device)
        try:
            return await self.backend.load(device, staged, partition, key_slots)
        finally:
            self.stats.load_count += 1  # once answered (a backend may hold a load)

    async def execute(self, devices: Sequence[int], inputs: Mapping[str, Any]
                      ) -> dict[str, Any]:
        if not devices:
            raise HostAbort.of(R.ERROR_REASON_FORMAT, "no device named")
        return await self.backend.execute(devices, inputs)

    async def unload(self, device: int) -> None:
        await self.backend.unload(device)

    async def reset(self, device: int) -> None:
        await self.backend.reset(device)
