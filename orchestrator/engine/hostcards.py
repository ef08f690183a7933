"""A host's card drivers as tasks (engine/host.py's HostSupervisor): each in a scope of
its own, so that one card can be placed, regrouped or given up while the others run
(docs/deployments.md "Applying"). Apart so each reads alone."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus

from orchestrator.engine.card import CardDriver
from orchestrator.engine.context import EngineContext
from orchestrator.engine.events import Staged
from orchestrator.engine.hostapi import Connect, HostAPI, HostLease, HostTarget
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.engine.state import CardState
from orchestrator.engine.strays import give_up_unplaced
from orchestrator.errors import LeaseLost, ModelIPError, ProgramNotLoaded, StoreUnavailable
from orchestrator.transport.types import Deadlines

# why a card is given up when its host answers again (engine/host.py)
BACK_AFTER_OUTAGE = ("given up when its host answered again: its group was placed "
                     "elsewhere while the host was down")


class CardsOnHost:
    """What HostSupervisor does with its drivers' tasks; the supervisor's state it uses
    is declared here and set by HostSupervisor."""

    name: str
    ctx: EngineContext
    drivers: dict[int, CardDriver]
    _groups: dict[int, list[CardDriver]]
    _client: HostAPI | None
    _cards: TaskGroup | None
    _scopes: dict[int, tuple[anyio.CancelScope, anyio.Event]]

    target: HostTarget
    _connect: Connect
    _lease: HostLease | None
    _stage_lock: anyio.Lock

    @property
    def down(self) -> bool:
        raise NotImplementedError

    @property
    def client(self) -> HostAPI:
        raise NotImplementedError

    # --- the programs it holds ------------------------------------------------------------

    async def _stage(self, programs: Sequence[PreparedProgram] | None = None) -> None:
        """Every program a card of this host may be told to run (a rollout: every
        version; deployments: those of the deployments placed here only, their
        rollouts' versions too), or ``programs``; content addressed: what the host has
        is not sent again."""
        if programs is None:
            programs = list(self.ctx.programs.values())
            if self.ctx.keys:   # a deployment's programs: those sealed under its MEK
                placed = {id(self.ctx.key_for(d.machine.program_id))
                          for d in self.drivers.values()}
                programs = [p for p in programs if id(self.ctx.key_for(p.program_id)) in placed]
        for program in programs:
            _, already = await self.client.stage(program.body, program_id=program.program_id)
            await self.ctx.store.record_stage(self.name, program.program_id)
            self.ctx.emit(Staged(host=self.name, program_id=program.program_id[:16],
                                 already_staged=already))

    async def restage(self, programs: Sequence[PreparedProgram] | None = None) -> None:
        """The host says it lacks the body, or (``programs``) a change places them here:
        send them (content addressed: cheap if another card's driver already did). Its
        host down: left to its next connection, which stages what its cards run."""
        if programs is not None and (self.down or self._client is None):
            return
        async with self._stage_lock:
            await self._stage(programs)

    def _deadlines(self) -> Deadlines:
        raise NotImplementedError

    async def give_up_strays(self, why: str = "given up when this replica took the host: "
                             "the plan places no deployment on it now") -> None:
        """With deployments, when a replica takes this host, or the host answers again
        after an outage: the cards of it the store knows that no deployment holds now
        (the plan changed, or their groups were placed elsewhere, while they were not
        driven) are given up, under this replica's lease if any (engine/strays.py).
        The lease lost or the store away meanwhile: left to the host's run, which says
        so."""
        if not self.ctx.keys:
            return
        with contextlib.suppress(LeaseLost, StoreUnavailable):
            await give_up_unplaced(
                self.ctx.store, [self.target], {(self.name, d) for d in self.drivers},
                self._connect, self._deadlines(), lease=self._lease, why=why)

    async def _drive_card(self, driver: CardDriver, *,
                          task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """One driver's task, in a scope of its own (a card given up is stopped alone)."""
        done = anyio.Event()
        with anyio.CancelScope() as scope:
            self._scopes[driver.machine.device] = (scope, done)
            try:
                await driver.run(task_status=task_status)
            finally:
                done.set()

    async def add(self, driver: CardDriver) -> None:
        """A card placed on this host while the engine runs: recorded, then driven."""
        m = driver.machine
        record, = await self.ctx.store.ensure_cards(self.name, [(m.device, m.group,
                                                                  m.partition)])
        driver.resume(record)
        self.drivers[m.device] = driver
        self._groups.clear()   # admission's groups: counted again at the next admit
        if self._cards is not None:
            await self._cards.start(self._drive_card, driver)

    async def regroup(self, driver: CardDriver) -> None:
        """The card's group or partition changed: recorded (its driver already knows)."""
        m = driver.machine
        await self.ctx.store.ensure_cards(self.name, [(m.device, m.group, m.partition)])
        self._groups.clear()

    async def give_up(self, device: int, why: str) -> CardDriver:
        """Stop driving the card: its driver is stopped, the card unloaded and reset (its
        session, and every slot ever wrapped to it, gone), the move journaled, and the
        card forgotten: no deployment holds it now. Its host down: the card stays in the
        journal, given up when the host answers again (give_up_strays)."""
        driver = self.drivers[device]
        scope, done = self._scopes.pop(device, (None, None))
        if scope is not None and done is not None:
            scope.cancel()
            await done.wait()
        said = "unloaded and reset"
        client = None if self.down else self._client
        answers = client is not None
        if client is None:   # kept in the journal: given up when its host answers again
            said = "its host does not answer: unloaded and reset when it answers again"
        else:
            try:
                with anyio.fail_after(self.ctx.plan.timeouts.card):
                    with contextlib.suppress(ProgramNotLoaded):
                        await client.unload(device)
                    await client.reset(device)
            except (ModelIPError, TimeoutError) as err:
                said = f"not unloaded or reset ({err or 'no answer in time'}): reset it by hand"
        if not answers:   # DISCONNECTED until the host answers: given up then
            if driver.machine.state not in (CardState.DISCONNECTED, CardState.FAILED):
                await driver.move(CardState.DISCONNECTED, f"{why}: {said}")
        else:
            if driver.machine.state not in (CardState.PENDING, CardState.FAILED):
                await driver.move(CardState.PENDING, f"{why}: {said}; no deployment holds "
                                  "it now", known_good=None)
            await self.ctx.store.forget_card(self.name, device)
        del self.drivers[device]
        self._groups.clear()
        return driver
