"""What the engine remembers, behind one interface (``Store``), and the records it
reads back; the engine knows no SQL (docs/engine.md describes the tables).

Every card transition is committed before it takes effect, and every
LoadProgram before it is sent, so an orchestrator killed at any instant and
started again knows what it was doing. What a card was last *verified* to
serve (``KnownGood``) is kept apart from its current state: it survives the
moves of a resumed card until a fresh attestation confirms or disproves it.
No MEK, key or plaintext is ever stored.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from orchestrator.engine.placement import Group
from orchestrator.engine.state import CardTransition, HostTransition, KnownGood
from orchestrator.terminal import terminal_safe


@dataclass(frozen=True, slots=True)
class CardRecord:
    host: str
    device: int
    card_id: str
    group: int
    partition: int
    state: str
    boot_counter: int
    session_id: str
    program_id: str
    attempts: int
    reason: str
    updated: float
    known_good: KnownGood | None

    def __post_init__(self) -> None:
        _inert(self, "host", "card_id", "state", "reason")


@dataclass(frozen=True, slots=True)
class HostRecord:
    host: str
    address: str
    state: str
    reason: str
    updated: float
    owner: str = ""                    # the replica holding its lease (shared stores)
    lease_expires: float | None = None  # unix seconds, by the database's clock

    def __post_init__(self) -> None:
        _inert(self, "host", "address", "state", "reason", "owner")


@dataclass(frozen=True, slots=True)
class LoadSent:
    """The load a move to LOADING announces: which program, as which partition
    (journaled in the move's own commit, before the load is sent)."""

    program_id: str
    partition: int


@dataclass(frozen=True, slots=True)
class LoadRecord:
    host: str
    device: int
    session_id: str
    program_id: str
    partition: int
    outcome: str          # sent, ok, refused receipt, failed, interrupted
    replica: str = ""     # who sent it (shared stores)


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    ts: float
    host: str
    device: int
    previous: str
    state: str
    reason: str

    def __post_init__(self) -> None:
        _inert(self, "host", "previous", "state", "reason")


class Recorded(NamedTuple):
    """What a card's move was journaled as: the load it announced (0: none) and the
    revision of the change (docs/api.md)."""

    load_id: int
    revision: int


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One journaled change (docs/api.md): its revision, and the state of its object
    (a card, a host, a rollout step) at that revision."""

    revision: int
    ts: float
    kind: str                   # "card", "host" or "rollout"
    body: dict[str, Any]

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> ChangeRecord:
        revision, ts, kind, body = row
        values = json.loads(body)
        return cls(int(revision), float(ts), str(kind), {
            key: terminal_safe(value, 1000) if isinstance(value, str) else value
            for key, value in values.items()})


def _inert(record: object, *names: str) -> None:
    """A shared store has other writers: what a record shows cannot drive a terminal
    (terminal.py). Applied as a record is built, so every view reads it so."""
    for name in names:
        value = getattr(record, name)
        if isinstance(value, str):
            object.__setattr__(record, name, terminal_safe(value, 1000))


# The lease of a rollout's leader with replicas (docs/replicas.md "Rollouts"): a row
# of the shared store's ``leases`` like a host's, claimed, renewed and fenced the same
# way. No host has this name (hosts are named by their addresses, which never start
# with a colon). With deployments, each deployment's rollout has its own:
# ":rollout:NAME".
ROLLOUT_LEASE = ":rollout"


def rollout_lease(deployment: str = "") -> str:
    """The lease of the rollout of ``deployment`` ("": the fleet's one model)."""
    return f"{ROLLOUT_LEASE}:{deployment}" if deployment else ROLLOUT_LEASE


def is_rollout_lease(name: str) -> bool:
    return name == ROLLOUT_LEASE or name.startswith(ROLLOUT_LEASE + ":")


class Store(Protocol):
    """The engine's memory. Implementations raise StateDirError when they cannot
    keep a promise (write-ahead: a failed write means the move did not happen)."""

    async def ensure_cards(self, host: str, cards: Sequence[tuple[int, int, int]]
                           ) -> list[CardRecord]: ...
    async def card(self, host: str, device: int) -> CardRecord | None: ...
    async def cards(self) -> list[CardRecord]: ...
    async def record_card(self, transition: CardTransition, *, load: LoadSent | None = None,
                          concludes: tuple[int, str] | None = None) -> Recorded:
        """Written ahead, shielded: once handed in, the move is committed (or this
        raises) even if the caller is being cancelled, so that it can be applied.
        ``load``: the load the move announces, recorded with it; its id is returned
        (0 without). ``concludes``: (load id, outcome) of the load the move ends.
        Also returned: the move's revision (docs/api.md)."""
    async def record_host(self, transition: HostTransition, address: str) -> int:
        """The host's move, journaled; its revision."""
    async def hosts(self) -> list[HostRecord]: ...
    async def finish_load(self, load_id: int, outcome: str) -> None: ...
    async def loads(self) -> list[LoadRecord]: ...
    async def record_stage(self, host: str, program_id: str) -> None: ...
    async def record_unseal(self, replica: str, token: str, kek: str, blob: str) -> None: ...
    async def unseals(self) -> list[tuple[float, str, str, str, str]]: ...
    async def transitions(self, limit: int = 50) -> list[TransitionRecord]: ...
    async def card_transitions(self, host: str, device: int, limit: int = 50
                               ) -> list[TransitionRecord]: ...
    async def record_command(self, who: str, role: str, command: str, outcome: str
                             ) -> None:
        """A command through the control API, done or refused, with who asked."""
    async def cordons(self) -> dict[str, str]:
        """The hosts an operator cordoned (docs/api.md "Cordon"), and who did."""
    async def placements(self) -> dict[str, list[Group]]:
        """Where each deployment's groups were placed (docs/deployments.md)."""
        ...

    async def record_placements(self, placed: Mapping[str, Sequence[Group]]) -> None: ...

    async def forget_card(self, host: str, device: int) -> None:
        """The card is no longer driven (no deployment holds it): its row goes; its
        history stays."""
        ...

    async def fleet_identity(self) -> str:
        """The fleet's identity (made at the first call, then kept): hosts hold claims
        by it (docs/protocol.md "Claims"); "" if a read-only journal has none yet."""
        ...

    async def set_cordon(self, host: str, who: str | None) -> bool:
        """Cordon ``host`` in ``who``'s name (None: uncordon it); False if it was so
        already (nothing written)."""
    async def changes(self, after: int, limit: int = 1000) -> list[ChangeRecord]:
        """The changes with revisions above ``after``, oldest first (at most ``limit``)."""
    async def revisions(self) -> tuple[int, int]:
        """(the oldest revision kept, the newest given); (0, 0) before the first."""
    async def trim_changes(self, keep: int, seconds: float) -> None:
        """Forget the changes beyond the newest ``keep`` or older than ``seconds``
        (never the newest one)."""


def card_record(row: tuple[Any, ...]) -> CardRecord:
    """A CardRecord from a row of the cards table (columns as CARD_COLUMNS)."""
    g_card, g_session, g_program, g_partition = row[12:]
    good = KnownGood(g_card, g_session, g_program, g_partition) if g_session else None
    host, device, card_id, group, partition, state, boot, session, program, attempts, \
        reason, updated = row[:12]
    return CardRecord(host, device, card_id, group, partition, state, boot, session, program,
                      attempts, reason, updated, good)


def new_identity() -> str:
    """A fleet identity (docs/protocol.md "Claims"): unique, short enough to read in
    `modelip device list`."""
    return f"fleet-{secrets.token_hex(6)}"
