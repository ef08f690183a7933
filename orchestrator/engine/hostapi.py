"""The port a host supervisor (and its card drivers) talk to a host through.

``HostAPI`` is what the engine needs of a host: attest a card, list its cards,
stream its events, stage a body, load, unload, execute. The gRPC client
(transport/client.py ``HostClient``) is one implementation; app.py builds it
(``connect``); a test's fake host, or a future agent's in-process backend, is
another. The engine reasons in these types only (docs/engine.md).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.transport.types import (
    Deadlines,
    DeviceEvent,
    DeviceStatus,
    LoadResult,
    TLSClientConfig,
)

if TYPE_CHECKING:
    from orchestrator.crypto.wrap import KeySlot


@dataclass(frozen=True, slots=True)
class HostTarget:
    """A host of the fleet, as the plan names it: what ``connect`` connects to."""

    name: str                 # how the store and the dashboard name the host
    address: str
    devices: tuple[int, ...]
    tls: TLSClientConfig | None = None


class HostAPI(Protocol):
    """One host, as the engine calls it. Every method raises our exceptions only
    (errors.py: TransportError and its family, VerificationError, ...)."""

    async def attest(self, device: int, request: bytes) -> bytes:
        """The card's evidence for ``request`` (bytes, verified by the caller)."""
        ...

    async def list_devices(self, *, deadline: float | None = None) -> list[DeviceStatus]:
        """The host's claim about each of its cards."""
        ...

    def watch_events(self) -> AsyncIterator[DeviceEvent]:
        """Hints about the cards until the host or the caller ends the stream."""
        ...

    async def stage(self, path: str | os.PathLike[str], *, program_id: str | None = None
                    ) -> tuple[str, bool]:
        """(program id, already staged) for the encrypted body at ``path``."""
        ...

    async def load(self, device: int, program_id: str, *, partition: int = 0,
                   key_slots: Sequence[KeySlot] | None = None) -> LoadResult:
        """Load a staged program with these key slots; the card's signed receipt."""
        ...

    async def unload(self, device: int) -> None: ...

    async def reset(self, device: int) -> None:
        """Reset the card: its session (and every slot wrapped to it) is gone."""
        ...

    async def execute(self, devices: Sequence[int], inputs: dict[str, Any]
                      ) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HostLease:
    """This replica's lease on a host (shared stores): its holder and epoch, sent to
    the host with every call (fencing: the host refuses a change to a card under an
    older epoch than one it has seen, docs/protocol.md), and ``remaining``, asked
    before every call: the seconds this replica may still act (raises LeaseLost when
    it may not)."""

    holder: str
    epoch: int
    remaining: Callable[[], float]


# How app.py hands the engine its hosts: a HostAPI for a target, with the deadlines
# of its calls and the replica's lease on it (None: the embedded store, no lease).
Connect = Callable[[HostTarget, Deadlines, HostLease | None], HostAPI]

__all__ = ["Connect", "HostAPI", "HostLease", "HostTarget"]
