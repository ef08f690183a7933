"""What every level of the supervision tree shares: settings, the store, the
program and MEK, counters, and the two ways up the tree (announce an event;
escalate a failure of the state directory, which no host can contain)."""

from __future__ import annotations

import os
import random
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from orchestrator.crypto.chain import ChainCache
from orchestrator.crypto.evidence import TrustPolicy
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.wrap import Kem
from orchestrator.engine.decide import backoff_delay
from orchestrator.engine.events import Event, InternalError
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.engine.store.protocol import Store
from orchestrator.errors import StateDirError
from orchestrator.plan.model import Plan
from orchestrator.plan.specs import PolicySpec

_jitter = random.Random()  # noqa: S311 - retry timing, not security


@dataclass(slots=True)
class EngineStats:
    started: float = field(default_factory=time.monotonic)
    deployed_after: float | None = None
    attestations: int = 0
    loads: int = 0
    rekeys: int = 0
    outages: list[float] = field(default_factory=list)   # first sign -> SERVING, seconds
    rekeyed_at: deque[float] = field(default_factory=lambda: deque(maxlen=4096))  # monotonic
    disproved_hints: int = 0
    stale_hints: int = 0      # dropped unread: about a boot older than the verified one
    found_rebooting: int = 0  # attestations the host answered "the card is rebooting"
    verification_failures: Counter[str] = field(default_factory=Counter)
    protocol_violations: Counter[str] = field(default_factory=Counter)  # by host
    internal_errors: int = 0
    lease_changes: Counter[str] = field(default_factory=Counter)  # by action (replicas)
    # the end of a run: cards whose work was in flight, how many of them it finished
    # (serving), and how long letting it finish took
    wound_down: tuple[int, int, float] | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def policy_of(spec: PolicySpec) -> TrustPolicy:
    return TrustPolicy(
        allowed_firmware=frozenset(spec.firmware),
        min_firmware=spec.min_firmware,
        allowed_measurements={name: frozenset(bytes.fromhex(v) for v in values)
                              for name, values in spec.measurements.items()},
        card_allowlist=frozenset(spec.cards),
        allowed_kems=frozenset(Kem.parse(k) for k in spec.kems),
        max_age=spec.max_age,
    )


def deployment_policies(plan: Plan) -> dict[str, TrustPolicy]:
    """The deployments with a trust policy of their own (the fleet's, tightened)."""
    return {d.name: policy_of(d.policy) for d in plan.deployments if d.policy is not None}


@dataclass
class EngineContext:
    plan: Plan
    store: Store
    program: PreparedProgram
    mek: MEK
    roots: list[x509.Certificate]
    emit: Callable[[Event], None]
    escalate: Callable[[StateDirError], None]
    retry_quarantined: bool = False
    stats: EngineStats = field(default_factory=EngineStats)
    chains: ChainCache = field(default_factory=ChainCache)   # each card's chain verified once
    policy: TrustPolicy = field(init=False)
    policies: dict[str, TrustPolicy] = field(init=False)   # by deployment, if its own
    # Every program a card may be told to run (by id; hosts stage them all): the
    # plan's, and during a rollout the version it replaces (docs/rollouts.md).
    programs: dict[str, PreparedProgram] = field(init=False)
    digests: frozenset[bytes] = field(init=False)   # their encryption info digests
    # With deployments (docs/deployments.md): each deployment's program and its own MEK;
    # a card's key slot is wrapped with the MEK of the program it is to run, only.
    keys: dict[str, MEK] = field(default_factory=dict)
    # Groups whose cards go first when a host's cards wait for places (a storm during
    # a rollout): each running rollout's wave being switched or judged, by deployment.
    urgent: dict[str, frozenset[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policy = policy_of(self.plan.policy)
        self.policies = deployment_policies(self.plan)
        self.programs = {}
        self.offer(self.program)

    def is_urgent(self, group: int) -> bool:
        return any(group in groups for groups in self.urgent.values())

    def policy_for(self, deployment: str) -> TrustPolicy:
        """What a card of ``deployment`` must satisfy: its own policy, else the fleet's."""
        return self.policies.get(deployment, self.policy)

    def key_for(self, program_id: str) -> MEK:
        """The MEK ``program_id`` is sealed under: its deployment's, else the plan's."""
        return self.keys.get(program_id, self.mek)

    def offer(self, *programs: PreparedProgram) -> None:
        """Make ``programs`` known (staged on every host, loadable by every driver)."""
        self.programs.update((p.program_id, p) for p in programs)
        self.digests = frozenset(p.info_digest for p in self.programs.values())

    @property
    def log_path(self) -> Path:
        return self.plan.state_dir / "engine.log"

    def backoff(self, attempt: int) -> float:
        """Exponential, capped, jittered so hosts are not hit in step (decide.py)."""
        retry = self.plan.retry
        return backoff_delay(attempt, retry.backoff, retry.max_backoff, _jitter.random())

    def jittered(self, seconds: float) -> float:
        return seconds * (0.75 + 0.5 * _jitter.random())

    def internal_error(self, where: str, exc: BaseException) -> str:
        """A bug reached a supervisor: log its traceback, announce it, return one line."""
        self.stats.internal_errors += 1
        line = f"{type(exc).__name__}: {exc}"[:300]
        text = "".join(traceback.format_exception(exc))
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} internal error in "
                          f"{where}\n{text}\n")
        except OSError:
            pass  # the state directory is failing too; the event still says it
        self.emit(InternalError(where=where, error=line))
        return f"{line} (traceback in {self.log_path})"
