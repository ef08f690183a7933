"""What the engine shows of itself: a snapshot, a pure value that the views render
(dashboard, tui, metrics) without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.engine.events import DeploymentOutcome, Event


@dataclass(frozen=True, slots=True)
class CardView:
    host: str
    device: int
    card_id: str
    group: int
    partition: int
    state: str
    session: str
    boot_counter: int
    attempts: int
    last_event: str
    reason: str
    in_state: float
    deployment: str = ""   # docs/deployments.md; "": the plan's one model


@dataclass(frozen=True, slots=True)
class HostView:
    name: str
    address: str
    state: str
    reason: str
    cards: int
    serving: int
    violations: int
    in_state: float
    owner: str = ""       # the replica driving it (shared stores)
    not_up_for: float = 0.0   # seconds since it was last UP (not restarted by retries)


@dataclass(frozen=True, slots=True)
class RolloutView:
    """What the live view and the metrics show of a rollout."""

    id: int
    phase: str
    wave: int             # 1-based
    waves: int
    from_version: int
    to_version: int
    groups_new: int       # groups to run the new version
    groups: int
    serving: int
    floor: int
    paused: bool
    verdict: str
    note: str             # what it waits for now
    deployment: str = ""  # whose version it replaces ("": the fleet's one model)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the dashboard and metrics render: a pure value."""

    cards: tuple[CardView, ...]
    hosts: tuple[HostView, ...]
    counts: dict[str, int]
    groups_serving: int
    groups: int
    events: tuple[Event, ...]
    rekeys: int
    outage_p50: float | None
    outage_p99: float | None
    disproved_hints: int
    elapsed: float
    deployed_after: float | None
    replica: str = ""             # this replica's name (shared stores), "" otherwise
    replicas_alive: int = 0
    store_reachable: bool = True
    rekey_ages: tuple[float, ...] = ()   # seconds since each re-key of the last minute
    live: bool = True             # False: read back from a store (no engine, no counters)
    rollouts: tuple[RolloutView, ...] = ()   # the fleet's, or each deployment's
    deployments: tuple[DeploymentOutcome, ...] = ()   # docs/deployments.md


__all__ = ["CardView", "HostView", "RolloutView", "Snapshot"]
