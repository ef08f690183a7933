"""The fleet: the root of the supervision tree (docs/engine.md).

    Engine            composition, the settled watcher, snapshots, inference
      HostSupervisor  one per host (tg.start): client, staging, events, liveness
        CardDriver    one per card: the only driver of its CardMachine

The engine contains nothing a host can break: each HostSupervisor contains
its subtree. The one failure that goes to the top is the state directory's
(the store cannot keep its write-ahead promise): the engine stops every task
and ``run`` raises that StateDirError.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus
from cryptography import x509

from orchestrator.crypto.mek import MEK
from orchestrator.engine.card import CardDriver
from orchestrator.engine.context import (
    EngineContext,
    EngineStats,
    deployment_policies,
    percentile,
)
from orchestrator.engine.deployment import Deployment, PrepareDeployment
from orchestrator.engine.events import (
    CardOutcome,
    Deployed,
    DeploymentOutcome,
    Event,
    Summary,
)
from orchestrator.engine.host import HostSupervisor, HostTarget
from orchestrator.engine.hostapi import Connect
from orchestrator.engine.inference import Inference
from orchestrator.engine.ports import MakeRollout, ReplicaPart, RolloutPart
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.engine.snapshot import CardView, HostView, RolloutView, Snapshot
from orchestrator.engine.state import (
    IN_FLIGHT,
    SETTLED,
    CardMachine,
    CardState,
    CardTransition,
)
from orchestrator.engine.store.protocol import Store
from orchestrator.errors import (
    ROLLED_BACK_EXIT,
    ModelIPError,
    StateDirError,
    UsageError,
)
from orchestrator.plan.model import Plan

S = CardState
# How app.py hands the engine a replica (engine/replicas.py): built from the hosts'
# supervisors, the context, the engine's recount and its rollouts (a replica follows
# each, and leads one while it holds that rollout's lease).
MakeReplica = Callable[[Sequence[HostSupervisor], EngineContext, Callable[[], None],
                        Sequence[RolloutPart]], ReplicaPart]


def _spare_the_collector() -> None:
    """What exists when the run starts (the plan, the programs, the tree of drivers,
    every module) lives as long as the run: frozen out of the cycle collector's
    sight. What the run creates is freed by reference counting as it goes, but a
    serving card's driver is some 70 live objects (a stack of coroutines, its
    events and scopes), and with the default thresholds the collector walked all
    of them again and again: 1.1 s of 10 s of CPU at 4,096 cards. A young pass per
    50,000 allocations and an old pass rarely leave it 0.1 s (docs/performance.md).
    Garbage is collected first: frozen, it would never be."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


class Engine(Inference):
    """Deploys one prepared program to a fleet and keeps it serving."""

    def __init__(self, plan: Plan, hosts: Sequence[HostTarget],
                 roots: Sequence[x509.Certificate], mek: MEK, program: PreparedProgram,
                 store: Store, *, connect: Connect, retry_quarantined: bool = False,
                 replica: MakeReplica | None = None, rollouts: Sequence[MakeRollout] = (),
                 deployments: Sequence[Deployment] = (),
                 unserved: Mapping[str, str] | None = None,
                 prepare_deployment: PrepareDeployment | None = None) -> None:
        """``replica``: the store is shared by replicas: drive only the hosts this
        replica holds leases on (engine/replicas.py). ``rollouts``: the fleet (or each
        of these deployments) serves another version of the model; replace it
        (engine/rollout/). Both are built
        here, from the ports the engine offers them (engine/ports.py).
        ``deployments``: several models on the fleet, each driven on the groups placed
        for it with its own program and MEK (docs/deployments.md); ``unserved``: those
        that cannot run (their key custody failed), with why; ``prepare_deployment``:
        how a deployment added while running gets its MEK and program (app.py)."""
        self.plan = plan
        self.program = program
        self.store = store
        self.ctx = EngineContext(plan, store, program, mek, list(roots), self._emit,
                                 self._escalate, retry_quarantined=retry_quarantined)
        self.deployed = anyio.Event()
        self.finished = anyio.Event()   # deployed, and the rollouts (if any) have ended
        self.fatal: StateDirError | None = None
        self._listeners: list[Callable[[Event], None]] = []
        self._events: deque[Event] = deque(maxlen=12)
        self._waiters: list[anyio.Event] = []
        self._root: anyio.CancelScope | None = None
        self._tasks: TaskGroup | None = None   # the run's, while it runs
        self.placing = anyio.Lock()   # deployments placed again: one change at a time
        self.hosts: list[HostSupervisor] = []
        self.drivers: list[CardDriver] = []
        self.groups: dict[int, list[CardDriver]] = {}
        self.deployments = {d.name: d for d in deployments}
        self.unserved = dict(unserved or {})
        self.prepare_deployment = prepare_deployment
        for d in deployments:
            self.ctx.keys[d.program.program_id] = d.mek
            self.ctx.offer(d.program)
        # the MDP groups of each host: the plan's cards in groups of its model's partitions,
        # or (deployments) the groups placed there, each with its deployment's program
        layout: dict[str, list[tuple[tuple[int, ...], str, str]]] = {}
        if deployments:
            for d in deployments:
                for placed in d.groups:
                    layout.setdefault(placed.host, []).append(
                        (placed.devices, d.program.program_id, d.name))
        else:
            for target in hosts:
                devices = sorted(target.devices)
                layout[target.name] = [(tuple(devices[start:start + plan.group_size]),
                                        program.program_id, "")
                                       for start in range(0, len(devices), plan.group_size)]
        total = sum(len(target.devices) for target in hosts) or 1
        group = 0
        for target in hosts:
            share = max(1, round(plan.concurrency * len(target.devices) / total))
            host = HostSupervisor(target, self.ctx, share=share,
                                  on_card_moved=self._card_moved,
                                  on_card_checked=self._wake_waiters,
                                  group_serving=self.group_serving, connect=connect)
            self.hosts.append(host)
            for cards, program_id, deployment in sorted(layout.get(target.name, [])):
                for partition, device in enumerate(cards):
                    machine = CardMachine(target.name, device, group, partition, program_id)
                    driver = CardDriver(machine, host, self.ctx)
                    driver.deployment = deployment
                    host.drivers[device] = driver
                    self.drivers.append(driver)
                    self.groups.setdefault(group, []).append(driver)
                group += 1
        self._unsettled = len(self.drivers)
        self._rollouts_done = [anyio.Event() for _ in rollouts]
        self.rollouts: list[RolloutPart] = [
            make(self, done) for make, done in zip(rollouts, self._rollouts_done, strict=True)]
        self.replica: ReplicaPart | None = (
            replica(self.hosts, self.ctx, self.recount, self.rollouts) if replica else None)

    @property
    def stats(self) -> EngineStats:
        return self.ctx.stats

    @property
    def cards(self) -> list[CardMachine]:
        return [driver.machine for driver in self.drivers]

    # --- events -----------------------------------------------------------------------

    def release(self, host: str, device: int, who: str) -> str:
        """An operator's release of a quarantined card (docs/api.md): it is tried again
        from the start. UsageError if this engine drives no such card or it is not
        quarantined."""
        supervisor = next((h for h in self.hosts if h.name == host), None)
        driver = supervisor.drivers.get(device) if supervisor is not None else None
        if supervisor is None or driver is None:
            raise UsageError(f"card {host}/{device}: not a card of this fleet")
        if driver.machine.state is not S.QUARANTINED:
            raise UsageError(f"card {host}/{device} is {driver.machine.state.value}, not "
                             "quarantined")
        if supervisor.fenced or (self.replica is not None and
                                 supervisor.owner != self.replica.name):
            raise UsageError(f"card {host}/{device}: its host is driven by another replica "
                             f"({supervisor.owner or 'none now'}): ask that one")
        driver.release(who)
        return f"card {host}/{device} released from quarantine: it is tried again"

    async def cordons_changed(self) -> None:
        """The store's cordons (docs/api.md "Cordon"), applied to the hosts: at the
        start, after a cordon through this engine's API, and (replicas) every cycle."""
        cordons = await self.ctx.store.cordons()
        for host in self.hosts:
            host.cordon(cordons.get(host.name))

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()

    def recount(self) -> None:
        """Cards changed other than by a transition (taken over, shown from the store)."""
        self._unsettled = sum(d.machine.state not in SETTLED for d in self.drivers)
        self._check_settled()
        self._wake_waiters()

    def _card_moved(self, driver: CardDriver, t: CardTransition, revision: int) -> None:
        self._unsettled += (t.previous in SETTLED) - (t.state in SETTLED)
        self._emit(driver.event(t, revision))
        self._check_settled()

    def _escalate(self, err: StateDirError) -> None:
        if self.fatal is None:
            self.fatal = err
        if self._root is not None:
            self._root.cancel()

    async def changed(self) -> None:
        """Wait until the next event or a card has looked at its card again."""
        waiter = anyio.Event()
        self._waiters.append(waiter)
        await waiter.wait()

    def cards_by_name(self) -> dict[tuple[str, int], CardDriver]:
        return {(d.machine.host, d.machine.device): d for d in self.drivers}

    def reindex(self, plan: Plan, deployments: Sequence[Deployment]) -> None:
        """The hosts' drivers changed while running (engine/replacing.py): the plan and
        deployments they now serve, and the engine's views of drivers and groups."""
        self.plan = plan
        self.deployments = {d.name: d for d in deployments}
        self.ctx.policies = deployment_policies(plan)
        self.drivers = [d for host in self.hosts for d in host.drivers.values()]
        self.groups = {}
        for driver in sorted(self.drivers, key=lambda d: d.machine.partition):
            self.groups.setdefault(driver.machine.group, []).append(driver)
        self._unsettled = sum(d.machine.state not in SETTLED for d in self.drivers)

    # --- views ------------------------------------------------------------------------

    def group_serving(self, group: int) -> bool:
        """Every card of the group serves the version the group is to run."""
        return all(d.serving for d in self.groups[group])

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        counts = Counter(d.machine.state.value for d in self.drivers)
        cards = tuple(
            CardView(m.host, m.device, m.card_id, m.group, m.partition, m.state.value,
                     m.session_fingerprint, m.boot_counter, m.attempts, d.last_event,
                     m.reason, now - m.since, d.deployment)
            for d in self.drivers for m in (d.machine,))
        hosts = tuple(
            HostView(h.name, h.target.address, h.machine.state.value, h.machine.reason,
                     len(h.drivers),
                     sum(d.machine.state is S.SERVING for d in h.drivers.values()),
                     sum(h.violations.values()), now - h.machine.since, h.owner,
                     now - h.machine.not_up_since)
            for h in self.hosts)
        outages = self.stats.outages
        return Snapshot(cards, hosts, dict(counts), sum(map(self.group_serving, self.groups)),
                        len(self.groups), tuple(self._events), self.stats.rekeys,
                        percentile(outages, 0.5), percentile(outages, 0.99),
                        self.stats.disproved_hints, now - self.stats.started,
                        self.stats.deployed_after,
                        *((self.replica.name, self.replica.alive, self.replica.reachable)
                          if self.replica else ("", 0, True)),
                        tuple(now - t for t in self.stats.rekeyed_at if now - t <= 60.0),
                        rollouts=tuple(r.view() for r in self.rollouts),
                        deployments=self.deployment_outcomes())

    def judged(self, *, store_word: bool = False) -> list[CardMachine]:
        """The cards an exit code counts: every card, or with replicas those this
        replica verified itself and those no live replica holds (shown DISCONNECTED);
        the cards other live replicas hold are their word, read from the store, counted
        only with ``store_word``."""
        if self.replica is None or store_word:
            return self.cards
        return [d.machine for h in self.hosts for d in h.drivers.values()
                if h.owner in ("", self.replica.name)]

    def outcome(self, *, store_word: bool = False) -> tuple[int, list[CardMachine]]:
        """(exit code, cards not serving): 0 all serving, 3 some quarantined, 6 the
        rollout was rolled back, 4 some failed or disconnected, 5 the state directory
        failed. Of the cards ``judged`` counts."""
        cards = self.judged(store_word=store_word)
        if self.fatal is not None:
            return self.fatal.exit_code, [c for c in cards if c.state is not S.SERVING]
        not_serving = [c for c in cards if c.state is not S.SERVING]
        if any(c.state is S.QUARANTINED for c in not_serving):
            return 3, not_serving
        if any(r.rolled_back for r in self.rollouts):
            return ROLLED_BACK_EXIT, not_serving
        short = any(d.groups_serving < d.groups_wanted for d in self.deployment_outcomes())
        return (4 if not_serving or short else 0), not_serving

    def summary(self, *, store_word: bool = False) -> Summary:
        code, not_serving = self.outcome(store_word=store_word)
        busy, finished, seconds = self.stats.wound_down or (0, 0, 0.0)
        judged = len(self.judged(store_word=store_word))
        return Summary(exit_code=code, serving=judged - len(not_serving),
                       cards=judged, rekeys=self.stats.rekeys,
                       hosts_up=sum(h.up for h in self.hosts), hosts=len(self.hosts),
                       not_serving=tuple(CardOutcome(c.name, c.card_id, c.state.value,
                                                     c.reason) for c in not_serving),
                       error=str(self.fatal) if self.fatal else "",
                       rollout="\n".join(r.describe() for r in self.rollouts),
                       in_flight_at_end=busy, finished_at_end=finished,
                       wind_down_seconds=round(seconds, 3),
                       store_word=len(self.cards) - judged,
                       deployments=self.deployment_outcomes())

    def deployment_outcomes(self) -> tuple[DeploymentOutcome, ...]:
        """Each deployment's groups serving, placed, wanted (docs/deployments.md)."""
        serving: Counter[str] = Counter()
        for group, drivers in self.groups.items():
            serving[drivers[0].deployment] += self.group_serving(group)
        outcomes = []
        for spec in self.plan.deployments:
            if spec.name in self.unserved:
                outcomes.append(DeploymentOutcome(spec.name, spec.model.version, 0, 0,
                                                  spec.groups, self.unserved[spec.name]))
            elif (d := self.deployments.get(spec.name)) is not None:
                outcomes.append(DeploymentOutcome(d.name, d.program.version, serving[d.name],
                                                  len(d.groups), spec.groups, d.short,
                                                  pending=bool(d.short)))
        return tuple(outcomes)

    # --- running ------------------------------------------------------------------------

    async def run(self, *, keep_serving: bool = False,
                  until: Callable[[], Awaitable[object]] | None = None,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deploy and keep the fleet serving until ``until`` returns (by default: until
        the deployment, and a rollout, is over; ``keep_serving``: until cancelled);
        then wind down (the work in flight finishes) and return.

        Raises StateDirError if the state directory fails (everything is stopped).
        """
        end = until or (anyio.sleep_forever if keep_serving else self.finished.wait)
        _spare_the_collector()
        async with anyio.create_task_group() as tg:
            self._root, self._tasks = tg.cancel_scope, tg
            await self.cordons_changed()
            for rollout in self.rollouts:
                await rollout.place()
                if self.replica is None:   # with replicas, whoever holds its lease leads
                    tg.start_soon(rollout.run)
            if self.rollouts:
                tg.start_soon(self._finish_after_rollouts)
            if self.replica is not None:
                await tg.start(self.replica.run)
            else:
                for host in self.hosts:
                    await tg.start(host.run)
            self._check_settled()
            task_status.started()
            await end()
            await self.wind_down()
            tg.cancel_scope.cancel()
        self._root = self._tasks = None
        if self.fatal is not None:
            raise self.fatal

    async def wind_down(self) -> None:
        """The run is ending (a deploy is done, a watch's time is up): no driver takes
        new work; the work in flight (a re-key half done) finishes, bounded by
        ``timeouts.card``, so the fleet is judged on what its cards settled to, not
        on the instant the clock ran out (docs/engine.md). Drivers waiting for their
        next check return by themselves: a cancelled task unwinds with an exception
        and a traceback per frame, garbage that at 4,096 cards cost more CPU than the
        last second of a deployment. What is still busy at the bound is cancelled
        (and rolled back)."""
        started = time.monotonic()
        busy = [d for d in self.drivers if d.machine.state in IN_FLIGHT and not d.returned]
        for driver in self.drivers:
            driver.stop()
        with anyio.move_on_after(self.plan.timeouts.card):
            while not all(d.returned or (d.machine.state in SETTLED and not d.parked)
                          for d in self.drivers):
                with anyio.move_on_after(0.05):
                    await self.changed()
        if busy:
            finished = sum(d.machine.state is S.SERVING for d in busy)
            self.stats.wound_down = (len(busy), finished, time.monotonic() - started)

    async def start_rollout(self, make: MakeRollout) -> RolloutPart:
        """A rollout begun while the fleet runs (`modelip apply` of a deployment's new
        version): its versions staged on the hosts of its groups, then its groups
        switched from what they run now."""
        assert self._tasks is not None and self.replica is None  # noqa: S101 - one engine, running
        done = anyio.Event()
        rollout = make(self, done)
        for host in self.hosts:
            if any(d.deployment == rollout.deployment for d in host.drivers.values()):
                with contextlib.suppress(ModelIPError):   # else staged when a load needs it
                    await host.restage()
        self.rollouts.append(rollout)
        self._rollouts_done.append(done)
        self._tasks.start_soon(rollout.run)
        return rollout

    async def _finish_after_rollouts(self) -> None:
        for done in self._rollouts_done:
            await done.wait()
        await self.deployed.wait()
        self.finished.set()

    def _check_settled(self) -> None:
        """Every card settled for the first time: announce it (called where the count
        changes, not by a task woken at every event)."""
        if self._unsettled or self.deployed.is_set():
            return
        self.stats.deployed_after = time.monotonic() - self.stats.started
        counts = Counter(c.state for c in self.cards)
        self.deployed.set()
        if not self.rollouts:
            self.finished.set()
        self._emit(Deployed(
            seconds=round(self.stats.deployed_after, 3), serving=counts[S.SERVING],
            disconnected=counts[S.DISCONNECTED], quarantined=counts[S.QUARANTINED],
            failed=counts[S.FAILED], groups_serving=sum(map(self.group_serving, self.groups)),
            groups=len(self.groups)))



__all__ = ["CardView", "Engine", "HostTarget", "HostView", "RolloutView", "Snapshot"]
