"""The per-card state machine: one enum, one table of allowed moves, one place to move.

Every move is journaled before it takes effect (write-ahead) and announced as
an event; an impossible move raises InvalidTransition instead of being ignored.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from orchestrator.engine.journal import Journal
from orchestrator.errors import InvalidTransition


class CardState(enum.Enum):
    PENDING = "PENDING"
    ATTESTING = "ATTESTING"
    KEYED = "KEYED"
    LOADING = "LOADING"
    SERVING = "SERVING"
    REKEYING = "REKEYING"
    RETRY_WAIT = "RETRY_WAIT"
    QUARANTINED = "QUARANTINED"   # a security verdict: never retried automatically
    FAILED = "FAILED"             # gave up (attempts exhausted, or a non-retryable error)

    def __repr__(self) -> str:
        return self.value


S = CardState
ALLOWED: dict[CardState, frozenset[CardState]] = {
    S.PENDING: frozenset({S.ATTESTING, S.QUARANTINED, S.FAILED}),
    S.ATTESTING: frozenset({S.KEYED, S.SERVING, S.RETRY_WAIT, S.QUARANTINED, S.FAILED,
                            S.PENDING}),
    S.KEYED: frozenset({S.LOADING, S.RETRY_WAIT, S.QUARANTINED, S.FAILED, S.PENDING}),
    S.LOADING: frozenset({S.SERVING, S.RETRY_WAIT, S.QUARANTINED, S.FAILED, S.PENDING}),
    S.SERVING: frozenset({S.REKEYING, S.QUARANTINED, S.PENDING}),
    S.REKEYING: frozenset({S.KEYED, S.SERVING, S.RETRY_WAIT, S.QUARANTINED, S.FAILED,
                           S.PENDING}),
    S.RETRY_WAIT: frozenset({S.ATTESTING, S.REKEYING, S.FAILED, S.PENDING}),
    S.QUARANTINED: frozenset(),
    S.FAILED: frozenset(),
}
TERMINAL = frozenset({S.SERVING, S.QUARANTINED, S.FAILED})
IN_PROGRESS = frozenset(set(CardState) - TERMINAL)


@dataclass(slots=True)
class CardMachine:
    """One card's state and what is known about it (verified facts only)."""

    host: str
    device: int
    group: int
    partition: int
    journal: Journal
    emit: Callable[[dict[str, Any]], None]
    state: CardState = CardState.PENDING
    card_id: str = ""
    boot_counter: int = 0
    session_id: bytes = b""
    session_fingerprint: str = ""
    program_id: str = ""
    attempts: int = 0
    reason: str = ""
    last_event: str = ""
    since: float = 0.0
    rekeys: int = 0
    wake: anyio.Event | None = None
    trigger: str = ""
    triggered_at: float = 0.0
    online_at: float = 0.0
    checked_at: float = 0.0

    def __post_init__(self) -> None:
        self.since = time.monotonic()
        self.wake = anyio.Event()

    def __repr__(self) -> str:
        return f"CardMachine({self.host}/{self.device}, {self.state.value})"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.device}"

    def move(self, target: CardState, *, reason: str = "") -> None:
        """Journal, then change state, then announce. InvalidTransition if not allowed."""
        if target not in ALLOWED[self.state]:
            raise InvalidTransition(self.name, self.state.value, target.value)
        previous = self.state
        self.journal.record_transition(
            self.host, self.device, card_id=self.card_id, from_state=previous.value,
            to_state=target.value, boot_counter=self.boot_counter,
            session_id=self.session_id.hex(), program_id=self.program_id,
            attempts=self.attempts, reason=reason)
        self.state = target
        self.reason = reason
        self.since = time.monotonic()
        self.emit({"event": "transition", "host": self.host, "device": self.device,
                   "card_id": self.card_id, "group": self.group, "partition": self.partition,
                   "from": previous.value, "to": target.value, "reason": reason,
                   "boot_counter": self.boot_counter, "session": self.session_fingerprint,
                   "attempts": self.attempts})

    def poke(self, trigger: str) -> None:
        """Ask the card's task to re-check the card (a hint, not a fact)."""
        if not self.trigger:
            self.trigger = trigger
            self.triggered_at = time.monotonic()
        assert self.wake is not None  # noqa: S101 - set in __post_init__
        self.wake.set()
