"""The pure state machines: a card's and a host's. State, a table of allowed
moves, and nothing else: no I/O, no clock reads but the one stamped on a move.

A driver asks its machine for a ``Transition`` (``propose``: raises
InvalidTransition if the table forbids it), writes it to the store, and only
then ``apply``s it: write-ahead, so a kill at any instant leaves the store
saying at least as much as the process knew.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from orchestrator.errors import InvalidTransition


class CardState(enum.Enum):
    PENDING = "PENDING"
    ATTESTING = "ATTESTING"
    KEYED = "KEYED"
    LOADING = "LOADING"
    SERVING = "SERVING"
    REKEYING = "REKEYING"
    RETRY_WAIT = "RETRY_WAIT"
    DISCONNECTED = "DISCONNECTED"  # its host does not answer: not serving, as far as we know
    CORDONED = "CORDONED"          # needs a key, its host is cordoned: none until uncordoned
    QUARANTINED = "QUARANTINED"    # a security verdict: never retried automatically
    FAILED = "FAILED"              # gave up (attempts exhausted, non-retryable, internal error)

    def __repr__(self) -> str:
        return self.value


S = CardState
CARD_MOVES: dict[CardState, frozenset[CardState]] = {
    S.PENDING: frozenset({S.ATTESTING, S.DISCONNECTED, S.QUARANTINED, S.FAILED}),
    S.ATTESTING: frozenset({S.KEYED, S.SERVING, S.RETRY_WAIT, S.DISCONNECTED, S.QUARANTINED,
                            S.FAILED, S.PENDING, S.CORDONED}),
    S.KEYED: frozenset({S.LOADING, S.RETRY_WAIT, S.DISCONNECTED, S.QUARANTINED, S.FAILED,
                        S.PENDING}),
    S.LOADING: frozenset({S.SERVING, S.RETRY_WAIT, S.DISCONNECTED, S.QUARANTINED, S.FAILED,
                          S.PENDING}),
    S.SERVING: frozenset({S.REKEYING, S.DISCONNECTED, S.QUARANTINED, S.PENDING}),
    S.REKEYING: frozenset({S.KEYED, S.SERVING, S.RETRY_WAIT, S.DISCONNECTED, S.QUARANTINED,
                           S.FAILED, S.PENDING, S.CORDONED}),
    S.CORDONED: frozenset({S.ATTESTING, S.REKEYING, S.DISCONNECTED, S.QUARANTINED, S.FAILED,
                           S.PENDING}),   # uncordoned: tried again
    S.RETRY_WAIT: frozenset({S.ATTESTING, S.REKEYING, S.DISCONNECTED, S.QUARANTINED, S.FAILED,
                             S.PENDING}),
    S.DISCONNECTED: frozenset({S.ATTESTING, S.FAILED, S.PENDING}),
    S.QUARANTINED: frozenset({S.PENDING}),   # an operator's release only (docs/api.md)
    S.FAILED: frozenset(),
}
FINAL = frozenset({S.QUARANTINED, S.FAILED})
# Settled: nothing more will happen without an outside change (a reset, the host
# coming back). A deployment is over when every card has settled.
SETTLED = frozenset({S.SERVING, S.DISCONNECTED, S.CORDONED, *FINAL})
# In flight: a driver is working on the card (interrupted, it is rolled back to PENDING).
IN_FLIGHT = frozenset(S) - SETTLED - {S.PENDING}


class HostState(enum.Enum):
    CONNECTING = "CONNECTING"    # listing its cards, staging the body
    UP = "UP"                    # staged, its event stream open, answering probes
    UNREACHABLE = "UNREACHABLE"  # probes fail: its cards are DISCONNECTED; retried with backoff
    REFUSING = "REFUSING"        # answers, but refuses what it must do (staging: out of
                                 # space, say): its cards are DISCONNECTED; retried
    FAILED = "FAILED"            # an internal error in its supervisor (a bug): given up

    def __repr__(self) -> str:
        return self.value


H = HostState
HOST_MOVES: dict[HostState, frozenset[HostState]] = {
    H.CONNECTING: frozenset({H.UP, H.UNREACHABLE, H.REFUSING, H.FAILED}),
    H.UP: frozenset({H.CONNECTING, H.UNREACHABLE, H.REFUSING, H.FAILED}),
    H.UNREACHABLE: frozenset({H.CONNECTING, H.FAILED}),
    H.REFUSING: frozenset({H.CONNECTING, H.FAILED}),
    H.FAILED: frozenset(),
}


class Trigger(enum.Enum):
    """Why a card driver looks at its card again. Hints come from the host and
    are never facts; the driver attests and acts on what it observes."""

    START = "start"
    RESET_HINT = "reset hint"            # the host's event stream said RESET
    OFFLINE_HINT = "offline hint"        # ... OFFLINE
    ONLINE_HINT = "online hint"          # ... ONLINE (a rebooting card is back)
    RESYNC = "host resync"               # the host's device list disagrees with what we know
    PERIODIC = "periodic attestation"    # rekey.check_interval passed
    REFUSED = "call refused"             # a load or execute said the session is gone
    HOST_BACK = "host back"              # the host answers again after being unreachable
    SWITCH = "rollout"                   # the card's group is to run another version

    @property
    def is_hint(self) -> bool:
        """A claim that something changed (rate limited; a disproof is counted)."""
        return self in (Trigger.RESET_HINT, Trigger.OFFLINE_HINT, Trigger.ONLINE_HINT,
                        Trigger.RESYNC, Trigger.REFUSED)


@dataclass(frozen=True, slots=True)
class KnownGood:
    """What a card was last verified to serve: kept across restarts until a fresh
    attestation confirms or disproves it (so resuming never reloads needlessly)."""

    card_id: str
    session_id: str    # hex
    program_id: str
    partition: int


@dataclass(frozen=True, slots=True)
class CardTransition:
    """One move of one card, as written to the store before it takes effect."""

    host: str
    device: int
    card_id: str
    previous: CardState
    state: CardState
    reason: str
    boot_counter: int
    session_id: str        # hex; "" before the first attestation
    program_id: str
    attempts: int
    known_good: KnownGood | None
    at: float = field(default_factory=time.time)


@dataclass(slots=True)
class CardMachine:
    """One card's state and the verified facts about it. Pure: no I/O."""

    host: str
    device: int
    group: int
    partition: int
    program_id: str
    state: CardState = CardState.PENDING
    card_id: str = ""
    boot_counter: int = 0
    session_id: bytes = b""
    session_fingerprint: str = ""
    attempts: int = 0
    reason: str = ""
    known_good: KnownGood | None = None
    since: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        return f"CardMachine({self.host}/{self.device}, {self.state.value})"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.device}"

    def propose(self, target: CardState, reason: str = "", *,
                known_good: KnownGood | None | bool = True) -> CardTransition:
        """The move to ``target``; InvalidTransition if the table forbids it.

        ``known_good``: True keeps what was known good, None forgets it (a new
        session was seen), a KnownGood records it (verified serving).
        """
        if target not in CARD_MOVES[self.state]:
            raise InvalidTransition(f"card {self.name}", self.state.value, target.value)
        good = self.known_good if known_good is True else known_good
        return CardTransition(self.host, self.device, self.card_id, self.state, target, reason,
                              self.boot_counter, self.session_id.hex(), self.program_id,
                              self.attempts, good if isinstance(good, KnownGood) else None)

    def apply(self, transition: CardTransition) -> None:
        if transition.previous is not self.state:
            raise InvalidTransition(f"card {self.name}", self.state.value,
                                    transition.state.value)
        self.state = transition.state
        self.reason = transition.reason
        self.known_good = transition.known_good
        self.since = time.monotonic()


@dataclass(frozen=True, slots=True)
class HostTransition:
    host: str
    previous: HostState
    state: HostState
    reason: str
    at: float = field(default_factory=time.time)


@dataclass(slots=True)
class HostMachine:
    """One host's lifecycle. Pure: no I/O."""

    name: str
    address: str
    state: HostState = HostState.CONNECTING
    reason: str = ""
    since: float = field(default_factory=time.monotonic)
    # since when the host has not been UP (its start, or its last move away from UP):
    # retries cycle through CONNECTING, this clock does not restart with them
    not_up_since: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        return f"HostMachine({self.name}, {self.state.value})"

    def propose(self, target: HostState, reason: str = "") -> HostTransition:
        if target not in HOST_MOVES[self.state]:
            raise InvalidTransition(f"host {self.name}", self.state.value, target.value)
        return HostTransition(self.name, self.state, target, reason)

    def show(self, state: HostState, reason: str) -> None:
        """What another replica, which drives this host, last journaled: shown, not
        moved (no transition of ours; the store already holds it)."""
        if state is not self.state:
            self.since = time.monotonic()
        self.state = state
        self.reason = reason

    def apply(self, transition: HostTransition) -> None:
        if transition.previous is not self.state:
            raise InvalidTransition(f"host {self.name}", self.state.value,
                                    transition.state.value)
        now = time.monotonic()
        if self.state is HostState.UP and transition.state is not HostState.UP:
            self.not_up_since = now
        self.state = transition.state
        self.reason = transition.reason
        self.since = now
