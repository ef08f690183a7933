"""Rollouts: a new model version replaces the one the fleet serves, MDP group by
MDP group (docs/rollouts.md).

The engine's drivers already bring every card to the program its group is to
run and keep it there (re-keying after resets); a rollout only decides, group by
group, which version that is. Level-triggered like the rest of the tree: the
journal says the phase and the wave, the phase says which version each group
is to run, and the controller switches the groups that differ, never more than
``max_unavailable`` out of service at once. A kill at any instant and a restart
continue from the journal's phase and wave; nothing a wave already passed is
done again.

    switching (wave k) -> gating (serving, smoke, soak) -> switching (wave k+1) ...
        -> committing (the version sealed with the raised rollback floor) -> committed
    any failed gate, or `modelip rollout undo` -> rolling back -> rolled back

The candidate is the new version sealed with the old version as its rollback
floor, so a card that loaded it can still go back; the floor is raised only at
commit, by loading the version as the plan seals it (one more switch per group).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from orchestrator.engine.events import RolloutChanged
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.engine.rollout.leadership import Leadership
from orchestrator.engine.rollout.ledger import Phase, RolloutRecord
from orchestrator.engine.rollout.setup import RolloutSetup
from orchestrator.engine.rollout.smoke import smoke_verdict
from orchestrator.engine.snapshot import RolloutView
from orchestrator.engine.state import CardState
from orchestrator.errors import LeaseLost, ModelIPError, StateDirError, StoreUnavailable

if TYPE_CHECKING:
    from orchestrator.engine.ports import Fleet, MakeRollout

S = CardState
_LOOK = 0.5      # seconds between looks at the journal for an operator's request
_SETTLE = 0.02   # after a wake, let the moves of the same instant land before looking


class Rollout(Leadership):
    """Drives one rollout inside the fleet (engine/ports.py ``RolloutPart``; started by
    Engine.run); sets ``done`` when it has ended."""

    def __init__(self, fleet: Fleet, setup: RolloutSetup, done: anyio.Event) -> None:
        self.fleet = fleet
        self.done = done
        self.ledger = setup.ledger
        self.deployment = setup.deployment
        self.order = sorted(group for group, members in fleet.groups.items()
                            if members[0].deployment == self.deployment)
        self.record = setup.record
        self.spec = setup.spec
        self.old, self.candidate, self.final = setup.old, setup.candidate, setup.final
        self.smoke_inputs, self.smoke_expect = setup.smoke_inputs, setup.smoke_expect
        fleet.ctx.offer(self.old, self.candidate, self.final)
        if setup.mek is not None:   # a deployment's versions: each sealed under its MEK
            fleet.ctx.keys.update(dict.fromkeys(
                (self.old.program_id, self.candidate.program_id, self.final.program_id),
                setup.mek))
        self.note = ""
        self.leading = False  # replicas: this one leads the rollout now
        self._looked = 0.0   # monotonic time of the last read of the journal
        self._opening = "started" if setup.fresh else (
            f"held: {self.record.verdict} (`modelip deploy --retry-rollout` tries again)"
            if self.rolled_back else "resumed from the journal")

    # --- what the phase wants -------------------------------------------------------

    @property
    def record(self) -> RolloutRecord:
        return self._record

    @record.setter
    def record(self, record: RolloutRecord) -> None:
        """Every change of phase or wave (led, followed, or an operator's) also says
        which groups go first when a host's cards wait for places (docs/engine.md
        "Admission"): the wave being switched or judged; the canary, at first."""
        self._record = record
        active = record.phase is Phase.GATING or (
            record.phase is Phase.SWITCHING and not record.awaits_approval(record.wave))
        self.fleet.ctx.urgent[self.deployment] = frozenset(
            self.wave_groups(record.wave) if active else ())

    @property
    def rolled_back(self) -> bool:
        return self.record.phase is Phase.ROLLED_BACK

    @property
    def floor(self) -> int:
        return max(0, len(self.order) - self.spec.max_unavailable)

    def desired(self, position: int) -> PreparedProgram:
        phase = self.record.phase
        if phase in (Phase.ROLLING_BACK, Phase.ROLLED_BACK):
            return self.old
        if phase in (Phase.COMMITTING, Phase.COMMITTED):
            return self.final
        return self.candidate if position < self.record.waves[self.record.wave] else self.old

    def target(self, group: int) -> str:
        return self.fleet.groups[group][0].machine.program_id

    def wave_groups(self, wave: int) -> list[int]:
        start = self.record.waves[wave - 1] if wave else 0
        return self.order[start:self.record.waves[wave]]

    async def place(self) -> None:
        """Before any card is driven: each group keeps the rollout's version its cards
        are known to hold; a group with none (or a mix) gets what the phase wants.
        Whatever else must change is then switched at the pace of the rollout."""
        records = {(r.host, r.device): r for r in await self.fleet.ctx.store.cards()}
        known = {self.old.program_id, self.candidate.program_id, self.final.program_id}
        targets = await self.ledger.targets(self.record.id)   # a leader's (replicas)
        for position, group in enumerate(self.order):
            if targets.get(group) in known:
                for member in self.fleet.groups[group]:
                    member.place(targets[group])
                continue
            held = set()
            for member in self.fleet.groups[group]:
                record = records.get((member.machine.host, member.machine.device))
                good = record.known_good if record else None
                held.add(good.program_id if good else "")
            target = held.pop() if len(held) == 1 else ""
            if target not in known:
                target = self.desired(position).program_id
            for member in self.fleet.groups[group]:
                member.place(target)

    # --- the task ---------------------------------------------------------------------

    async def run(self) -> None:
        await self.fleet.deployed.wait()  # every card looked at once: start from truth
        self._announce(self._opening)
        await self._carry_out()

    async def _carry_out(self) -> None:
        try:
            await self._drive()
            await self._converge(judge=False)  # ended: hold the fleet where the verdict put it
            self.note = ""
        except (LeaseLost, StoreUnavailable):
            raise   # a replica's leadership ended: another carries on from the store
        except StateDirError as err:
            self.fleet.ctx.escalate(err)
            return
        except Exception as exc:  # a bug: the fleet keeps serving what each group runs  # noqa: BLE001
            self.note = "stopped: " + self.fleet.ctx.internal_error("rollout", exc)
        self.done.set()

    async def _drive(self) -> None:
        while not self.record.phase.ended:
            phase, wave, last = self.record.phase, self.record.wave, len(self.record.waves) - 1
            if phase in (Phase.SWITCHING, Phase.GATING) and self.record.undo:
                await self._advance(Phase.ROLLING_BACK, "undone by the operator",
                                    verdict="undone by the operator (modelip rollout undo)")
            elif phase is Phase.SWITCHING and self.record.awaits_approval(wave):
                await self._hold(wave)
            elif phase is Phase.SWITCHING:
                failed = await self._converge(judge=True)
                if failed:
                    await self._fail(failed)
                elif not self.record.undo:
                    await self._advance(Phase.GATING, f"wave {wave + 1} of {last + 1} switched: "
                                        f"{self.record.waves[wave]} group(s) on version "
                                        f"{self.final.version}")
            elif phase is Phase.GATING:
                failed, passed = await self._gate()
                if failed:
                    await self._fail(failed)
                elif self.record.undo:
                    continue
                elif wave < last:
                    self._announce(passed)
                    await self._hold(wave + 1, self.spec.pause)
                    if not self.record.undo:
                        await self._advance(Phase.SWITCHING, f"{passed}; wave {wave + 2} of "
                                            f"{last + 1}", wave=wave + 1)
                elif self.final.program_id != self.candidate.program_id:
                    await self._advance(Phase.COMMITTING, f"{passed}; every wave passed: "
                                        f"loading version {self.final.version} with rollback "
                                        f"floor {self.final.floor}")
                else:
                    await self._commit(f"{passed}; ")
            elif phase is Phase.ROLLING_BACK:
                await self._converge(judge=False)
                await self._advance(Phase.ROLLED_BACK, f"every group runs version "
                                    f"{self.old.version} again")
            elif phase is Phase.COMMITTING:
                await self._converge(judge=False)
                await self._commit()

    async def _commit(self, passed: str = "") -> None:
        await self.ledger.set_fleet_program(self.final.program_id)
        await self._advance(Phase.COMMITTED, f"{passed}version {self.final.version} on every "
                            "group, "
                            f"rollback floor {self.final.floor}: no way back to version "
                            f"{self.old.version}")

    async def _fail(self, why: str) -> None:
        await self._advance(Phase.ROLLING_BACK, f"wave {self.record.wave + 1} failed: {why}",
                            verdict=why)

    # --- switching ----------------------------------------------------------------------

    async def _converge(self, *, judge: bool) -> str | None:
        """Switch every group the phase wants on another version, never taking more
        than max_unavailable out of service at once; wait until they serve it.

        ``judge``: a switched group that cannot serve the new version is a verdict
        against it (returned). Groups whose host is down are switched without being
        waited for (they come up on their version when the host is back)."""
        waited: dict[int, float] = {}
        timeout = self.fleet.ctx.plan.timeouts.card
        while True:
            await self._refresh()
            if judge and self.record.undo:
                return None
            now = time.monotonic()
            todo: list[tuple[int, str]] = []
            for position, group in enumerate(self.order):
                want = self.desired(position).program_id
                if self.target(group) != want:
                    todo.append((group, want))
            for group, since in list(waited.items()):
                if self.fleet.group_serving(group):
                    del waited[group]
                elif judge and (broken := self._broken(group)):
                    return f"group {group}: {broken}"
                elif now - since > timeout:
                    if judge:
                        return (f"group {group} does not serve version "
                                f"{self._program(group).version} after {timeout:g} s: "
                                f"{self._why_not(group)}")
                    del waited[group]
                    self._announce(f"gave up waiting for group {group}: {self._why_not(group)}")
            if not todo and not waited:
                return None
            if todo and (not self.record.paused or self.record.phase is Phase.ROLLING_BACK):
                out = sum(not self.fleet.group_serving(g) for g in self.order)
                for group, want in todo:
                    down = not self.fleet.group_serving(group)
                    if not down and out >= self.spec.max_unavailable:
                        continue
                    await self._switch(group, want)
                    out += not down
                    if not self._host_down(group):
                        waited[group] = now
            self.note = self._waiting_note(todo, waited)
            await self._wait()

    async def _switch(self, group: int, program_id: str) -> None:
        # written first (replicas: under the rollout's lease), then done
        await self.ledger.set_target(self.record.id, group, program_id)
        for member in self.fleet.groups[group]:
            member.retarget(program_id)
        program = self.fleet.ctx.programs[program_id]
        self._announce(f"group {group} ({self._where(group)}) switched to version "
                       f"{program.version} (rollback floor {program.floor})")

    # --- the gate -----------------------------------------------------------------------

    async def _gate(self) -> tuple[str | None, str]:
        """The wave's groups serve the new version, pass the smoke inference, and stay
        serving for the soak time (a re-key after a reset restarts the soak clock; a
        card quarantined or failed is a verdict)."""
        wave = self.record.wave
        judged = [g for g in self.wave_groups(wave) if not self._host_down(g)]
        deadline = time.monotonic() + self.fleet.ctx.plan.timeouts.card + self.spec.soak
        smoked: set[int] = set()
        stable_since: float | None = None
        while True:
            await self._refresh()
            if self.record.undo:
                return None, ""
            now = time.monotonic()
            for group in judged:
                if broken := self._broken(group):
                    return f"group {group}: {broken}", ""
            serving = all(self.fleet.group_serving(g) for g in judged)
            if serving:
                for group in judged:
                    if group not in smoked:
                        self.note = f"smoke inference on group {group}"
                        failed = await self._smoke(group)
                        if failed:
                            return failed, ""
                        smoked.add(group)
                stable_since = stable_since if stable_since is not None else now
                if now - stable_since >= self.spec.soak:
                    return None, (f"wave {wave + 1} passed: {len(judged)} new group(s) serve "
                                  f"version {self.final.version}"
                                  f"{', smoke passed' if self.spec.smoke else ''}"
                                  f"{f', soaked {self.spec.soak:g} s' if self.spec.soak else ''}")
                self.note = f"soak: {self.spec.soak - (now - stable_since):.0f} s left"
            else:
                stable_since = None
                self.note = f"wave {wave + 1}: waiting for its groups to serve"
            if now > deadline:
                late = [g for g in judged if not self.fleet.group_serving(g)]
                return (f"wave {wave + 1} did not stay serving for {self.spec.soak:g} s "
                        f"(group {late[0] if late else '?'}: "
                        f"{self._why_not(late[0]) if late else 'unsteady'})"), ""
            await self._wait(min(_LOOK, max(0.05, self.spec.soak / 4)))

    async def _smoke(self, group: int) -> str | None:
        smoke = self.spec.smoke
        if smoke is None:
            return None
        try:
            outputs = await self.fleet.execute(self.smoke_inputs, group=group)
        except (ModelIPError, TimeoutError) as err:
            return f"smoke inference on group {group} failed: {err or 'timed out'}"
        return smoke_verdict(outputs, self.smoke_expect, rtol=smoke.rtol, atol=smoke.atol,
                             group=group)

    async def _hold(self, wave: int, pause: float = 0.0) -> None:
        """Before switching ``wave``: the plan's pause, an operator's pause, and the
        approval the wave waits for (an ``approval: manual`` step); an undo ends it."""
        ends = time.monotonic() + pause
        told = False
        while not self.record.undo and (self.record.paused or time.monotonic() < ends
                                        or self.record.awaits_approval(wave)):
            left = ends - time.monotonic()
            if self.record.paused:
                self.note = "paused by the operator"
            elif left > 0:
                self.note = f"next wave in {left:.0f} s"
            else:
                self.note = f"wave {wave + 1} waits for an approval (modelip rollout approve)"
                if not told:
                    self._announce(self.note)
                    told = True
            await anyio.sleep(min(_LOOK, max(0.01, left)) if left > 0 and not
                              self.record.paused else _LOOK)
            await self._refresh()

    async def _wait(self, most: float = _LOOK) -> None:
        """Until a card moves (or ``most`` seconds), then a moment for the moves of the
        same instant: one look at the groups per burst, not per card."""
        with anyio.move_on_after(most):
            await self.fleet.changed()
        await anyio.sleep(_SETTLE)

    # --- journal and announcements ----------------------------------------------------

    async def _refresh(self) -> None:
        """The operator's requests (pause, resume, undo, approve) arrive through the journal,
        read at most every _LOOK seconds (the loops wake at every card move)."""
        if time.monotonic() - self._looked < _LOOK:
            return
        self._looked = time.monotonic()
        before = self.record
        self.record = await self.ledger.get(self.record.id)
        if self.record.paused != before.paused:
            self._announce("paused by the operator" if self.record.paused
                           else "resumed by the operator")
        if self.record.undo and not before.undo:
            self._announce("undo requested by the operator")
        if self.record.approved != before.approved:
            self._announce(f"wave {self.record.approved + 1} approved by the operator")

    async def _advance(self, phase: Phase, what: str, *, wave: int | None = None,
                       verdict: str | None = None) -> None:
        self.record = await self.ledger.advance(self.record, phase, what, wave=wave,
                                                verdict=verdict)
        self._announce(what)

    def _announce(self, what: str) -> None:
        view = self.view()
        self.fleet.ctx.emit(RolloutChanged(
            rollout=view.id, phase=view.phase, wave=view.wave, waves=view.waves,
            from_version=view.from_version, to_version=view.to_version,
            groups_new=view.groups_new, groups=view.groups, serving=view.serving,
            floor=view.floor, paused=view.paused, what=what, verdict=view.verdict,
            deployment=self.deployment))

    def view(self) -> RolloutView:
        record = self.record
        new = {self.candidate.program_id, self.final.program_id}
        return RolloutView(
            record.id, record.phase.value, record.wave + 1, len(record.waves),
            self.old.version, self.final.version,
            sum(self.target(g) in new for g in self.order), len(self.order),
            sum(map(self.fleet.group_serving, self.order)), self.floor, record.paused,
            record.verdict, self.note, self.deployment)

    def describe(self) -> str:
        """One line for the summary."""
        r, v = self.record, self.view()
        head = f"rollout {r.id} of {f'deployment {self.deployment} ' if self.deployment else ''}" \
            f"version {v.from_version} -> {v.to_version}"
        if r.phase is Phase.COMMITTED:
            return f"{head}: committed ({v.waves} waves)"
        if r.phase is Phase.ROLLED_BACK:
            return f"{head}: rolled back at wave {v.wave} of {v.waves}: {r.verdict}"
        return f"{head}: {r.phase.value}, wave {v.wave} of {v.waves}" + \
            (f" ({self.note})" if self.note else "")

    # --- groups ---------------------------------------------------------------------------

    def _program(self, group: int) -> PreparedProgram:
        return self.fleet.ctx.programs[self.target(group)]

    def _where(self, group: int) -> str:
        members = self.fleet.groups[group]
        return f"{members[0].machine.host} cards " + ",".join(
            str(d.machine.device) for d in members)

    def _host_down(self, group: int) -> bool:
        return any(m.host_down for m in self.fleet.groups[group])

    def _broken(self, group: int) -> str:
        for member in self.fleet.groups[group]:
            m = member.machine
            if m.state in (S.QUARANTINED, S.FAILED):
                return f"{m.name} {m.state.value}: {m.reason}"
        return ""

    def _why_not(self, group: int) -> str:
        for member in self.fleet.groups[group]:
            if not member.serving:
                m = member.machine
                return f"{m.name} {m.state.value}" + (f": {m.reason}" if m.reason else "")
        return "serving"

    def _waiting_note(self, todo: list[tuple[int, str]], waited: dict[int, float]) -> str:
        if todo and self.record.paused and self.record.phase is not Phase.ROLLING_BACK:
            return f"paused by the operator ({len(todo)} group(s) to switch)"
        if todo:
            return f"{len(todo)} group(s) to switch, {len(waited)} switching " \
                   f"(max_unavailable {self.spec.max_unavailable})"
        return f"{len(waited)} group(s) switching"


def rollout_of(setup: RolloutSetup) -> MakeRollout:
    """How the engine makes the rollout ``setup`` describes (engine/ports.py)."""
    return lambda fleet, done: Rollout(fleet, setup, done)


__all__ = ["Rollout", "rollout_of", "smoke_verdict"]
