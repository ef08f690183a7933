"""Everything the engine announces, as frozen dataclasses with one JSON encoding.

The JSON-lines stream (`--json`) is a contract with automation: each line is
one event, ``{"schema": 1, "event": KIND, "ts": unix seconds, ...fields}``,
the fields being the dataclass's, in order. docs/events.md documents every
kind; a new field is a compatible change, a renamed or removed one bumps
SCHEMA_VERSION.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    KIND: ClassVar[str] = ""
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in _field_names(type(self))}
        return {"schema": SCHEMA_VERSION, "event": self.KIND, "ts": round(self.ts, 6),
                "time": iso_time(self.ts), **fields}

    def to_json(self) -> str:
        # several lines per card: the encoder is made once, the field names looked
        # up once per kind (10-12 us an event -> 8 us)
        return _ENCODER.encode(self.to_dict())


_FIELDS: dict[type[Event], tuple[str, ...]] = {}


def _field_names(kind: type[Event]) -> tuple[str, ...]:
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(kind)
                                      if f.name != "ts")
    return names


def iso_time(ts: float) -> str:
    """Unix seconds as ISO 8601, UTC, milliseconds: how every JSON output says a time."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


_ENCODER = json.JSONEncoder(default=_plain)   # what json.dumps(..., default=_plain) makes


@dataclass(frozen=True, slots=True, kw_only=True)
class CardChanged(Event):
    """A card moved from ``previous`` to ``state`` (journaled before it took effect)."""

    KIND: ClassVar[str] = "card"
    host: str
    device: int
    card_id: str
    group: int
    partition: int
    previous: str
    state: str
    reason: str
    boot_counter: int
    session: str          # the session KEY's fingerprint (16 hex digits), "" if none yet
    attempts: int
    session_id: str = ""  # the session id's first 16 hex digits (as status and inspect show)
    revision: int = 0     # the move's revision in the store (docs/api.md); 0: not journaled
    deployment: str = ""  # the card's deployment (docs/deployments.md); "": the plan's model


@dataclass(frozen=True, slots=True, kw_only=True)
class HostChanged(Event):
    """A host moved from ``previous`` to ``state`` (CONNECTING, UP, UNREACHABLE, FAILED)."""

    KIND: ClassVar[str] = "host"
    host: str
    address: str
    previous: str
    state: str
    reason: str
    revision: int = 0     # the move's revision in the store (docs/api.md)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseChanged(Event):
    """A replica (shared store) took a host's lease, handed it back or lost it.
    ``action``: claimed, took over (from ``previous_owner``, whose lease had
    expired), handed back (fair share or a clean stop), lost (fenced: expired
    here or taken over; the replica stopped acting on the host at once)."""

    KIND: ClassVar[str] = "lease"
    host: str
    replica: str
    action: str
    epoch: int
    previous_owner: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStatus(Event):
    """The shared store stopped answering (``reachable`` false) or answers again."""

    KIND: ClassVar[str] = "store"
    replica: str
    reachable: bool
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Staged(Event):
    """The encrypted body is on the host (``already_staged``: it had it)."""

    KIND: ClassVar[str] = "staged"
    host: str
    program_id: str       # first 16 hex digits of the content address
    already_staged: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class HintDisproved(Event):
    """A hint said a card changed; a fresh attestation showed the same session."""

    KIND: ClassVar[str] = "hint_disproved"
    host: str
    device: int
    trigger: str
    boot_counter: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Rekeyed(Event):
    """A card serves again after losing its session. ``outage_ms``: from the first
    sign that something was wrong (a hint, a resync, a failed check) to SERVING."""

    KIND: ClassVar[str] = "rekeyed"
    host: str
    device: int
    group: int
    outage_ms: float
    group_serving: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolViolation(Event):
    """A host sent something the protocol does not allow; ``count`` so far of this kind."""

    KIND: ClassVar[str] = "protocol_violation"
    host: str
    what: str
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class InternalError(Event):
    """A bug: the traceback is in STATE/engine.log; only ``where`` is affected."""

    KIND: ClassVar[str] = "internal_error"
    where: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Placed(Event):
    """A deployment's groups placed again while the fleet runs (docs/deployments.md
    "Failover"): a host down longer than ``timeouts.failover`` had its groups placed
    on other cards, or cards came back for a deployment short of groups."""

    KIND: ClassVar[str] = "placement"
    deployment: str
    added: tuple[str, ...]      # "host [devices]" of each group placed now
    removed: tuple[str, ...]    # of each group it no longer runs
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutChanged(Event):
    """A rollout moved (docs/rollouts.md): a wave began, passed or failed, a group was
    switched, an operator's request was carried out, the verdict."""

    KIND: ClassVar[str] = "rollout"
    rollout: int          # its number in the journal
    phase: str            # switching, gating, rolling back, committing, committed, rolled back
    wave: int             # 1-based
    waves: int
    from_version: int
    to_version: int
    groups_new: int       # groups that are to run the new version
    groups: int
    serving: int          # groups serving now (capacity)
    floor: int            # capacity the rollout never goes below: groups - max_unavailable
    paused: bool
    what: str             # what happened, in words
    verdict: str = ""
    deployment: str = ""  # whose version it replaces ("": the fleet's one model)


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployed(Event):
    """Every card has settled (serving, disconnected, quarantined or failed)."""

    KIND: ClassVar[str] = "deployed"
    seconds: float
    serving: int
    disconnected: int
    quarantined: int
    failed: int
    groups_serving: int
    groups: int


@dataclass(frozen=True, slots=True)
class CardOutcome:
    card: str             # host/device
    card_id: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeploymentOutcome:
    name: str
    version: int
    groups_serving: int
    groups_placed: int
    groups_wanted: int
    short: str = ""
    # PENDING: it gets fewer groups than it asks until cards come back (the reason in
    # ``short``); not pending but short: it cannot run at all (its key custody failed)
    pending: bool = False

    def line(self) -> str:
        short = f" ({'PENDING' if self.pending else 'short'}: {self.short})" \
            if self.short else ""
        return (f"deployment {self.name} (version {self.version}): {self.groups_serving}/"
                f"{self.groups_placed} groups serving, {self.groups_wanted} wanted{short}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary(Event):
    """The last line of a run: what the exit code says, card by card where it is not 0."""

    KIND: ClassVar[str] = "summary"
    exit_code: int
    serving: int
    cards: int
    rekeys: int
    hosts_up: int
    hosts: int
    not_serving: tuple[CardOutcome, ...]
    error: str = ""       # why the engine stopped early (state directory), if it did
    rollout: str = ""     # how the rollout ended (or where it stands), if there was one
    # the end of the run: cards whose work was in flight when it ended, how many of
    # them that work brought to serving, and how long it was given
    in_flight_at_end: int = 0
    finished_at_end: int = 0
    wind_down_seconds: float = 0.0
    # replicas: cards other live replicas hold, known here only by the store's word and
    # not counted in ``serving``/``cards`` nor the exit code (unless --store-word)
    store_word: int = 0
    # with deployments (docs/deployments.md): each one's groups serving, placed, wanted,
    # and why it is short of them
    deployments: tuple[DeploymentOutcome, ...] = ()

    def wind_down(self) -> str:
        """``finished 2 re-keys in 0.4 s`` (and what did not finish), or ""."""
        if not self.in_flight_at_end:
            return ""
        left = self.in_flight_at_end - self.finished_at_end
        plural = "" if self.finished_at_end == 1 else "s"
        return (f"finished {self.finished_at_end} re-key{plural} in "
                f"{self.wind_down_seconds:.1f} s" + (f", {left} did not serve" if left
                                                      else ""))
