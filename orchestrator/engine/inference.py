"""Inference on a serving MDP group (Engine.execute): re-keying it first if a card
lost its session; an integrity failure found at execution quarantines the card it
names."""

from __future__ import annotations

from typing import Any

import anyio

from orchestrator.engine.card import CardDriver
from orchestrator.engine.host import HostSupervisor
from orchestrator.engine.ports import ReplicaPart
from orchestrator.engine.state import CardState, Trigger
from orchestrator.errors import IntegrityError, ProgramNotLoaded, SessionInvalidError
from orchestrator.plan.model import Plan

S = CardState


class Inference:
    """What Engine does to run inference; the engine's state it uses is declared here
    and set by Engine."""

    plan: Plan
    hosts: list[HostSupervisor]
    groups: dict[int, list[CardDriver]]
    replica: ReplicaPart | None

    def group_serving(self, group: int) -> bool:
        raise NotImplementedError

    async def changed(self) -> None:
        raise NotImplementedError

    async def execute(self, inputs: dict[str, Any], *, group: int | None = None,
                      deployment: str | None = None) -> dict[str, Any]:
        """Run inference on a serving group (re-keying it first if a card lost its session).

        An integrity failure found at execution quarantines the card it names (the
        whole group if it names none) and is raised.
        """
        for attempt in range(2):
            serving = [g for g, drivers in self.groups.items() if self.group_serving(g)
                       and deployment in (None, drivers[0].deployment)]
            chosen = group if group is not None else (serving[0] if serving else None)
            if chosen is None or not self.group_serving(chosen):
                raise ProgramNotLoaded("no MDP group is serving")
            drivers = sorted(self.groups[chosen], key=lambda d: d.machine.partition)
            host = drivers[0].host
            supervisor = next(h for h in self.hosts if h.name == host.name)
            if self.replica is not None and supervisor.owner != self.replica.name:
                return await supervisor.execute_unheld(   # another replica drives it
                    [d.machine.device for d in drivers], inputs)
            try:
                return await host.client.execute([d.machine.device for d in drivers], inputs)
            except IntegrityError as err:
                named = [d for d in drivers if d.machine.device == err.device]
                for driver in named or drivers:
                    driver.condemn(err)
                with anyio.fail_after(self.plan.timeouts.rpc):
                    while not all(d.machine.state is S.QUARANTINED for d in named or drivers):
                        await self.changed()
                raise
            except (SessionInvalidError, ProgramNotLoaded):
                if attempt:
                    raise
                before = {d: d.reconciled for d in drivers}
                for driver in drivers:
                    driver.hint(Trigger.REFUSED)
                with anyio.fail_after(self.plan.timeouts.card):
                    # until every card has looked again, and the group serves
                    while not self.group_serving(chosen) or any(
                            d.reconciled == before[d] for d in drivers):
                        await self.changed()
        raise ProgramNotLoaded("no MDP group is serving")
