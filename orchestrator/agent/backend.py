"""The card backend port (docs/host-agent.md): what a host agent asks of its cards.

A backend is "being a card": it lists the cards, attests, loads a staged program with
its key slots, executes, unloads, resets, and reports card events. It speaks the
protocol's own messages (runtime.proto, evidence.proto), so nothing is translated
twice. Everything else a host does (staging, the event fan-out, fencing, error
statuses) is the agent's (agent/host.py). A backend fails a call by raising
``HostAbort`` (agent/aborts.py) or one of modelip's errors (mapped by kind).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from anyio.abc import TaskStatus

from orchestrator._proto.modelip.v1 import evidence_pb2, runtime_pb2
from orchestrator.agent.staging import Staged

Emit = Callable[[runtime_pb2.DeviceEvent], None]


class CardBackend(Protocol):
    async def live(self, emit: Emit, *, task_status: TaskStatus[None]) -> None:
        """The backend's own life while the agent serves (a watch, polling, timers):
        every card event goes to ``emit``; started, then runs until cancelled."""

    async def devices(self) -> Sequence[runtime_pb2.DeviceInfo]:
        """Every card of the host, as ListDevices answers it."""

    async def attest(self, device: int, request: bytes) -> evidence_pb2.AttestationEvidence:
        """The card's evidence for the 32-byte ``request``."""

    async def load(self, device: int, program: Staged, partition: int,
                   key_slots: evidence_pb2.KeySlotTable | None
                   ) -> runtime_pb2.LoadProgramResponse:
        """Load a staged program into the card (its segments, the card's signed receipt)."""

    async def execute(self, devices: Sequence[int], inputs: Mapping[str, Any]
                      ) -> dict[str, Any]:
        """Run one card, or an MDP group in partition order; named tensors out."""

    async def unload(self, device: int) -> None: ...

    async def reset(self, device: int) -> None:
        """Reset the card: its memory and session end; it comes back by itself."""
