"""One host's supervisor: its client, staging, event stream, liveness, its cards.

Started by the Engine with ``tg.start``; it starts a CardDriver per card in
its own task group and contains every failure of its subtree. The host's
lifecycle (CONNECTING -> UP -> UNREACHABLE -> CONNECTING ...) is journaled
and announced; while it is not UP its cards are not SERVING. Everything the
host sends is hostile input: values outside the protocol are counted as
protocol violations of this host and ignored, never raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from orchestrator.engine.admission import RECOVER, ROUTINE, PriorityLimiter
from orchestrator.engine.card import CardDriver
from orchestrator.engine.context import EngineContext
from orchestrator.engine.events import HostChanged, ProtocolViolation
from orchestrator.engine.hostapi import Connect, HostAPI, HostLease, HostTarget
from orchestrator.engine.hostcards import BACK_AFTER_OUTAGE, CardsOnHost
from orchestrator.engine.state import (
    CardState,
    CardTransition,
    HostMachine,
    HostState,
    Trigger,
)
from orchestrator.engine.store.protocol import CardRecord, HostRecord
from orchestrator.errors import (
    DeadlineError,
    LeaseLost,
    ModelIPError,
    StateDirError,
    StoreUnavailable,
    UnreachableError,
)
from orchestrator.errors import ProtocolViolation as HostBrokeProtocol
from orchestrator.transport.types import (
    Deadlines,
    DeviceEvent,
    DeviceState,
    DeviceStatus,
    EventKind,
)

H = HostState
MAX_BOOT_COUNTER = 1 << 48   # a card that reboots every millisecond for 8,900 years
_EVENT_TRIGGERS = {EventKind.RESET: Trigger.RESET_HINT, EventKind.OFFLINE: Trigger.OFFLINE_HINT,
                   EventKind.ONLINE: Trigger.ONLINE_HINT, EventKind.UNLOADED: Trigger.RESYNC}
# An event is old news once a verified attestation has seen boot counter (the event's
# + this): a RESET or OFFLINE ends the boot it names, an ONLINE begins it.
_STALE_FROM = {EventKind.RESET: 1, EventKind.OFFLINE: 1, EventKind.ONLINE: 0}


class HostLost(Exception):  # noqa: N818 - a condition, not an error of ours
    """Raised inside the supervisor when probes say the host is gone."""


class HostSupervisor(CardsOnHost):
    def __init__(self, target: HostTarget, ctx: EngineContext, *, share: int,
                 on_card_moved: Callable[[CardDriver, CardTransition, int], None],
                 on_card_checked: Callable[[], None],
                 group_serving: Callable[[int], bool], connect: Connect) -> None:
        """``connect`` makes the host's HostAPI (app.py: the gRPC client)."""
        self.target = target
        self._connect = connect
        self.name = target.name
        self.ctx = ctx
        self.machine = HostMachine(target.name, target.address)
        self._places = PriorityLimiter(share)  # this host's share, and only its own
        self._groups: dict[int, list[CardDriver]] = {}
        self.drivers: dict[int, CardDriver] = {}
        self.violations: Counter[str] = Counter()
        self.group_serving = group_serving
        self._on_card_moved = on_card_moved
        self._on_card_checked = on_card_checked
        self._client: HostAPI | None = None
        self._changed = anyio.Event()
        self._probe_now = anyio.Event()
        self._stage_lock = anyio.Lock()
        self._stream_open = False
        self._alive = anyio.CancelScope()
        self._running = anyio.CancelScope()
        # Shared stores: how long this replica may still act on the host (raises
        # LeaseLost when it may not); None with the embedded store. Set by claim().
        self._lease: HostLease | None = None
        self._lease_lost: LeaseLost | None = None
        self._owner = ""   # the replica driving this host (shared stores)
        self._cordoned_by: str | None = None
        self._cards: TaskGroup | None = None     # the drivers' tasks, while running
        self._scopes: dict[int, tuple[anyio.CancelScope, anyio.Event]] = {}

    def __repr__(self) -> str:
        return f"HostSupervisor({self.name}, {self.machine.state.value})"

    # --- what drivers may ask -----------------------------------------------------------------

    @property
    def client(self) -> HostAPI:
        assert self._client is not None  # noqa: S101 - drivers run inside run()
        return self._client

    @property
    def up(self) -> bool:
        return self.machine.state is H.UP

    @property
    def down(self) -> bool:
        return self.machine.state in (H.UNREACHABLE, H.REFUSING, H.FAILED)

    @property
    def cordoned_by(self) -> str | None:
        return self._cordoned_by

    def cordon(self, who: str | None) -> None:
        """An operator cordoned the host (``who``) or uncordoned it (None), as the store
        says (docs/api.md "Cordon"): its cards that wait on it look again."""
        if who != self._cordoned_by:
            self._cordoned_by = who
            self._wake()

    def describe(self) -> str:
        state = self.machine.state.value.lower()
        return f"{state}: {self.machine.reason}" if self.machine.reason else state

    async def changed(self) -> None:
        """Until the host's state changes."""
        await self._changed.wait()

    def admit(self, group: int, *, routine: bool = False
              ) -> AbstractAsyncContextManager[None]:
        """One of this host's places, by priority (engine/admission.py)."""
        if not self._groups:   # the drivers are all added before anything runs
            for driver in self.drivers.values():
                self._groups.setdefault(driver.machine.group, []).append(driver)
        down = sum(not d.serving for d in self._groups.get(group, ()))
        return self._places.admit((ROUTINE if routine else RECOVER,
                                   not self.ctx.is_urgent(group), down))

    def suspect(self) -> None:
        """A call to this host failed: probe it now rather than at the next resync."""
        self._probe_now.set()

    def card_moved(self, transition: CardTransition, revision: int) -> None:
        self._on_card_moved(self.drivers[transition.device], transition, revision)

    def card_checked(self) -> None:
        self._on_card_checked()

    # --- the task ---------------------------------------------------------------------------

    @property
    def owner(self) -> str:
        """The replica driving this host (shared stores), "" if none is known."""
        return self._owner

    @property
    def lease_lost(self) -> LeaseLost | None:
        """Why this replica lost the host's lease, if it did."""
        return self._lease_lost

    @property
    def fenced(self) -> bool:
        """This replica lost the host's lease: no more writes about it, no more calls."""
        return self._lease_lost is not None

    def fence(self, lost: LeaseLost) -> None:
        """Stop everything on this host now, without a call to its cards (no roll back:
        another replica may already drive them)."""
        if self._lease_lost is None:
            self._lease_lost = lost
        self._running.cancel()

    def claim(self, lease: HostLease) -> None:
        """This replica (``lease.holder``) holds the host now, under ``lease`` (before
        run): what was known of it and its cards is forgotten, the store says what is
        true now."""
        self.machine = HostMachine(self.target.name, self.target.address)
        self._lease_lost = None
        self._owner, self._lease = lease.holder, lease
        self.violations.clear()
        self._stream_open = False
        self._probe_now = anyio.Event()
        for driver in self.drivers.values():
            driver.reset()

    def release(self) -> None:
        """This replica no longer holds the host (handed back, or its lease lost)."""
        self._owner = ""

    def mirror(self, record: HostRecord, cards: Sequence[CardRecord]) -> None:
        """Show what the replica that drives this host last journaled of it and its
        cards (``record.owner`` "": no live replica holds it, and its cards are shown
        DISCONNECTED, verified by no one, whatever the store says)."""
        self._owner = record.owner
        with contextlib.suppress(ValueError):
            self.machine.show(HostState(record.state), record.reason)
        for card in cards:
            driver = self.drivers.get(card.device)
            if driver is None:
                continue
            if not record.owner and card.state != CardState.DISCONNECTED.value:
                card = dataclasses.replace(
                    card, state=CardState.DISCONNECTED.value,
                    reason=f"no live replica holds host {card.host} (the store said "
                           f"{card.state}, verified by no one)")
            with contextlib.suppress(ValueError):
                driver.mirror(card)

    def _deadlines(self) -> Deadlines:
        plan = self.ctx.plan
        return Deadlines(attest=plan.timeouts.rpc, control=plan.timeouts.rpc,
                         load=plan.timeouts.load)

    async def execute_unheld(self, devices: list[int], inputs: dict[str, Any]
                             ) -> dict[str, Any]:
        """Inference on cards of this host that another replica drives (a rollout's
        smoke, led from here): a connection of its own and no lease, since execution
        changes no card (the host does not fence it)."""
        async with _closing(self._connect(self.target, self._deadlines(), None)) as client:
            return await client.execute(devices, inputs)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        client = self._connect(self.target, self._deadlines(), self._lease)
        with anyio.CancelScope() as self._running:
            try:
                async with _closing(client), anyio.create_task_group() as cards:
                    self._client = client
                    drivers = list(self.drivers.values())
                    records = await self.ctx.store.ensure_cards(self.name, [
                        (d.machine.device, d.machine.group, d.machine.partition)
                        for d in drivers])
                    for driver, record in zip(drivers, records, strict=True):
                        driver.resume(record)
                        await cards.start(self._drive_card, driver)
                    self._cards = cards
                    task_status.started()
                    started = True
                    async with anyio.create_task_group() as tg:
                        self._alive = tg.cancel_scope
                        tg.start_soon(self._contained, self._watch_events)
                        tg.start_soon(self._contained, self._supervise)
            except* (LeaseLost, StoreUnavailable) as group:  # reading the cards' records
                err = group.exceptions[0]
                self.fence(err if isinstance(err, LeaseLost) else LeaseLost(self.name, str(err)))
        if not started:
            task_status.started()

    async def _contained(self, work: Callable[[], Awaitable[None]]) -> None:
        """Nothing raises out of a host: a bug FAILS this host (its cards show it)."""
        try:
            await work()
        except LeaseLost as lost:
            self.fence(lost)
        except StoreUnavailable as err:
            self.fence(LeaseLost(self.name, str(err)))
        except StateDirError as err:
            self.ctx.escalate(err)
        except Exception as exc:  # a bug: contained to this host  # noqa: BLE001
            message = self.ctx.internal_error(f"host {self.name}", exc)
            self._alive.cancel()
            self._interrupt_cards()
            try:
                if self.machine.state is not H.FAILED:
                    await self._move(H.FAILED, f"internal error: {message}")
            except (LeaseLost, StoreUnavailable):
                self.fence(LeaseLost(self.name, "while failing the host"))
            except StateDirError as err:
                self.ctx.escalate(err)

    async def _supervise(self) -> None:
        attempts = self.ctx.plan.retry.attempts
        failures = 0
        was_up = False
        while True:
            try:
                async with self._stage_lock:
                    self._accept(await self.client.list_devices(deadline=self._probe_deadline))
                    await self._stage()
                if was_up:   # back after an outage: what was placed elsewhere is given up
                    await self.give_up_strays(BACK_AFTER_OUTAGE)
                failures = 0
                was_up = True
                await self._move(H.UP)
                await self._resync_until_lost()
            except (ModelIPError, HostLost) as err:
                failures += 1
                if self.machine.state is H.CONNECTING and not was_up and failures < attempts:
                    await anyio.sleep(self.ctx.backoff(failures))
                    continue
                reason = f"{err} (attempt {failures})" if not was_up else str(err)
                self._interrupt_cards()
                # it answered, and said no: that is not "unreachable"
                answered = isinstance(err, ModelIPError) and not isinstance(
                    err, UnreachableError | DeadlineError)
                await self._move(H.REFUSING if answered else H.UNREACHABLE, reason)
                await anyio.sleep(self.ctx.backoff(min(failures, 8)))
                await self._move(H.CONNECTING, "retrying")

    @property
    def _probe_deadline(self) -> float:
        return min(self.ctx.plan.timeouts.rpc, self.ctx.plan.rekey.probe_timeout)

    async def _resync_until_lost(self) -> None:
        """Level-triggered resync: every resync_interval (sooner when a driver suspects
        the host or the event stream broke), list the cards and wake every driver whose
        card the host shows differently. Two failed probes in a row (one with the
        stream down) and the host is lost."""
        interval = self.ctx.plan.rekey.resync_interval
        misses = 0
        while True:
            with anyio.move_on_after(self.ctx.jittered(interval)):
                await self._probe_now.wait()
            self._probe_now = anyio.Event()
            try:
                listing = await self.client.list_devices(deadline=self._probe_deadline)
            except HostBrokeProtocol as err:
                self._violation(err.problem)  # counted against the host, as any other
                misses += 1
                if misses >= 2 or not self._stream_open:
                    raise HostLost(f"{err}") from None
                continue
            except ModelIPError as err:
                misses += 1
                if misses >= 2 or not self._stream_open:
                    raise HostLost(f"does not answer: {err}") from None
                continue
            misses = 0
            self._accept(listing, wake=self.ctx.plan.rekey.auto, answered=time.monotonic())

    def _accept(self, listing: list[DeviceStatus], *, wake: bool = False,
                answered: float = 0.0) -> None:
        """The host's listing, answered at ``answered`` (monotonic): each card's driver
        is told what it says (``wake``)."""
        seen: set[int] = set()
        for status in listing:
            if status.device not in self.drivers:
                # ListDevices lists every card of the host: a plan may name some of them
                continue
            if status.device in seen:
                self._violation("lists a card twice")
            elif status.state is DeviceState.UNDEFINED:
                self._violation("undefined device state")
            elif status.boot_counter > MAX_BOOT_COUNTER:
                self._violation("absurd boot counter")
            else:
                seen.add(status.device)
                if wake:
                    self.drivers[status.device].observe(status, answered=answered)
        for device in self.drivers.keys() - seen:
            if wake:
                self.drivers[device].hint(Trigger.RESYNC)

    async def _watch_events(self) -> None:
        failures = 0
        while True:
            try:
                async for event in self.client.watch_events():
                    self._stream_open = True
                    failures = 0
                    self._on_event(event)
            except ModelIPError:
                pass
            self._stream_open = False
            self._probe_now.set()  # the stream broke: is the host still there?
            failures += 1
            await anyio.sleep(self.ctx.backoff(min(failures, 6)))

    def _on_event(self, event: DeviceEvent) -> None:
        driver = self.drivers.get(event.device)
        if driver is None:  # a card of this host the plan does not name: not ours
            return
        if event.kind is EventKind.UNDEFINED:
            self._violation("undefined event kind")
            return
        if event.boot_counter > MAX_BOOT_COUNTER:
            self._violation("absurd boot counter")
            return
        driver.heard(event.kind.value,
                     _EVENT_TRIGGERS.get(event.kind) if self.ctx.plan.rekey.auto else None,
                     stale_from=event.boot_counter + _STALE_FROM[event.kind]
                     if event.kind in _STALE_FROM else None)

    def _violation(self, what: str) -> None:
        self.violations[what] += 1
        self.ctx.stats.protocol_violations[self.name] += 1
        count = self.violations[what]
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: visible, never a flood
            self.ctx.emit(ProtocolViolation(host=self.name, what=what, count=count))

    def _wake(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _interrupt_cards(self) -> None:
        for driver in self.drivers.values():
            driver.host_lost()

    async def _move(self, target: HostState, reason: str = "") -> None:
        transition = self.machine.propose(target, reason)
        revision = await self.ctx.store.record_host(transition, self.target.address)
        self.machine.apply(transition)
        self._wake()
        self.ctx.emit(HostChanged(host=self.name, address=self.target.address,
                                  previous=transition.previous.value,
                                  state=transition.state.value, reason=reason,
                                  revision=revision))


@asynccontextmanager
async def _closing(client: HostAPI) -> AsyncIterator[HostAPI]:
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await client.close()


__all__ = ["CardState", "HostSupervisor", "HostTarget"]
