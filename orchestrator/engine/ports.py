"""The ports between the parts of the supervision tree (docs/engine.md).

Each part sees of its neighbours only what it needs, as a protocol: a card driver
its host (``CardHost``); the rollout controller the fleet's groups (``Fleet``,
``Member``); the engine its optional children (``RolloutPart``, ``ReplicaPart``),
built by app.py. No part imports the module of the part it talks to, so each can
be driven alone (tests/test_ports.py drives a card and a host through a fake host).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskStatus

from orchestrator.engine.state import CardMachine, CardTransition

if TYPE_CHECKING:
    from orchestrator.engine.context import EngineContext
    from orchestrator.engine.hostapi import HostAPI
    from orchestrator.engine.snapshot import RolloutView
    from orchestrator.errors import LeaseLost


class CardHost(Protocol):
    """What a card driver needs of its host's supervisor."""

    @property
    def name(self) -> str: ...

    @property
    def client(self) -> HostAPI: ...

    def admit(self, group: int, *, routine: bool = False
              ) -> AbstractAsyncContextManager[None]:
        """One of the host's places (its share of the fleet's concurrency), held for an
        attestation or a bring-up; by priority (engine/admission.py): a card whose
        group has fewer cards down first; ``routine`` work (a periodic check) last."""
        ...

    @property
    def up(self) -> bool: ...

    @property
    def down(self) -> bool: ...

    @property
    def fenced(self) -> bool:
        """This replica lost the host: not one more call or write about its cards."""
        ...

    @property
    def cordoned_by(self) -> str | None:
        """Who cordoned the host (docs/api.md "Cordon"): no card of it is keyed."""
        ...

    def describe(self) -> str: ...

    async def changed(self) -> None:
        """Until the host's state changes."""
        ...

    def suspect(self) -> None:
        """A call failed: probe the host now."""
        ...

    def fence(self, lost: LeaseLost) -> None: ...

    async def restage(self) -> None:
        """Send the program's body again (the host lost it)."""
        ...

    def card_moved(self, transition: CardTransition, revision: int) -> None: ...

    def card_checked(self) -> None: ...

    def group_serving(self, group: int) -> bool: ...


class Member(Protocol):
    """A card of an MDP group, as the rollout controller sees it."""

    deployment: str   # the deployment its group serves ("": the fleet's one model)

    @property
    def machine(self) -> CardMachine:
        """Read only: the driver alone moves it."""
        ...

    @property
    def serving(self) -> bool:
        """SERVING the version its group is to run."""
        ...

    @property
    def host_down(self) -> bool: ...

    def place(self, program_id: str) -> None:
        """Before the fleet runs: the version the card starts on."""
        ...

    def retarget(self, program_id: str) -> None:
        """From now on the card is to run ``program_id``."""
        ...


class Fleet(Protocol):
    """What the rollout controller may use of the fleet."""

    @property
    def ctx(self) -> EngineContext: ...

    @property
    def groups(self) -> Mapping[int, Sequence[Member]]: ...

    @property
    def deployed(self) -> anyio.Event:
        """Set once every card has been looked at."""
        ...

    def group_serving(self, group: int) -> bool: ...

    async def changed(self) -> None:
        """Until the next event, or a card was looked at again."""
        ...

    async def execute(self, inputs: dict[str, Any], *, group: int | None = None
                      ) -> dict[str, Any]: ...


class RolloutPart(Protocol):
    """A rollout running inside the engine (engine/rollout/)."""

    deployment: str   # whose version it replaces ("": the fleet's one model)

    @property
    def rolled_back(self) -> bool: ...

    async def place(self) -> None:
        """Before any card is driven: the version each group starts on."""
        ...

    async def run(self) -> None:
        """Until the rollout ends; then sets the ``done`` event it was given."""
        ...

    def view(self) -> RolloutView: ...

    def describe(self) -> str: ...

    @property
    def ended(self) -> bool: ...

    async def lead(self, replica: str) -> None:
        """Replicas: lead the rollout from the store's phase and wave until it ends;
        LeaseLost when the rollout's lease is lost."""
        ...

    async def follow(self) -> None:
        """Replicas: the groups' targets and the phase as the store says."""
        ...


class ReplicaPart(Protocol):
    """This replica's share of a fleet shared through PostgreSQL (engine/replicas.py):
    it runs the supervisors of the hosts it holds leases on."""

    @property
    def name(self) -> str: ...

    @property
    def alive(self) -> int: ...

    @property
    def reachable(self) -> bool: ...

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None: ...


# How app.py hands the engine a rollout: built from the fleet and the event it sets
# when it has ended.
MakeRollout = Callable[[Fleet, anyio.Event], RolloutPart]

__all__ = ["CardHost", "Fleet", "MakeRollout", "Member", "ReplicaPart", "RolloutPart"]
