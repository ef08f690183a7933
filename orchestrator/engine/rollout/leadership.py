"""A rollout with replicas (docs/replicas.md "Rollouts"): every replica follows the
store's word on it (the groups' targets, the phase), and the one holding the rollout's
lease leads it. The rollout controller's (engine/rollout/controller.py) part for
replicas, apart so each reads alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from orchestrator.engine.rollout.ledger import Ledger, RolloutRecord
from orchestrator.engine.store.protocol import rollout_lease
from orchestrator.errors import InvalidTransition, LeaseLost

if TYPE_CHECKING:
    from orchestrator.engine.ports import Fleet


class Leadership:
    """What Rollout does with replicas; the rollout's state it uses is declared here
    and set by Rollout."""

    fleet: Fleet
    deployment: str
    ledger: Ledger
    record: RolloutRecord
    done: anyio.Event
    note: str
    leading: bool

    def _announce(self, what: str) -> None:
        raise NotImplementedError

    async def _carry_out(self) -> None:
        raise NotImplementedError

    @property
    def ended(self) -> bool:
        return self.record.phase.ended

    async def lead(self, replica: str) -> None:
        """Lead the rollout from the store's phase and wave (this replica holds the
        rollout's lease) until it ends; LeaseLost when the lease is lost, or another
        leader moved it meanwhile (every write of a leader is fenced by the lease)."""
        self.leading = True
        try:
            self.record = await self.ledger.get(self.record.id)
            if self.ended:
                self.done.set()
                return
            await self._follow_targets()
            await self.fleet.deployed.wait()
            self._announce(f"led by replica {replica} from the store's phase and wave")
            try:
                await self._carry_out()
            except InvalidTransition as err:
                raise LeaseLost(rollout_lease(self.deployment),
                                f"another leader moved it: {err}") from None
        finally:
            self.leading = False

    async def follow(self) -> None:
        """The store's word on the rollout, for a replica that may not lead it: each
        group's target as the leader set it, the phase (for the views), and its end."""
        await self._follow_targets()
        if not self.leading:
            record = await self.ledger.get(self.record.id)
            if record != self.record:
                self.record = record
                self.note = "led by another replica"
        if self.ended and self.fleet.deployed.is_set():
            self.done.set()

    async def _follow_targets(self) -> None:
        for group, program_id in (await self.ledger.targets(self.record.id)).items():
            if group in self.fleet.groups and program_id in self.fleet.ctx.programs:
                for member in self.fleet.groups[group]:
                    member.retarget(program_id)
