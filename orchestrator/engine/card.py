"""A card's driver: the only one that moves its CardMachine.

Level-triggered (docs/engine.md): hints (host events, the host's device list,
a refused call) and the periodic timer only wake the driver; it then asks the
card what is true (a fresh attestation with our nonce) and acts on that. A
lost, forged or duplicated hint costs at most one check interval, never a
wrong verdict. Whatever the card's host does ends in this card's state with
a reason; an unexpected exception (a bug) is logged and FAILS this card only.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from orchestrator.crypto.evidence import VerifiedReport
from orchestrator.engine import keying
from orchestrator.engine.bringup import BringUp
from orchestrator.engine.context import EngineContext
from orchestrator.engine.decide import (
    CHECK_SAW,
    Act,
    Seen,
    classify,
    decide_serving,
    listing_says,
)
from orchestrator.engine.events import CardChanged, HintDisproved
from orchestrator.engine.inbox import Inbox, is_stale
from orchestrator.engine.state import (
    FINAL,
    IN_FLIGHT,
    CardMachine,
    CardState,
    CardTransition,
    KnownGood,
    Trigger,
)
from orchestrator.engine.store.protocol import CardRecord, LoadSent
from orchestrator.errors import (
    LeaseLost,
    ModelIPError,
    StateDirError,
    StoreUnavailable,
    VerificationError,
)
from orchestrator.transport.types import DeviceStatus

if TYPE_CHECKING:
    from orchestrator.engine.ports import CardHost
    from orchestrator.engine.prepare import PreparedProgram

S = CardState
# hints a wait for a rebooting card already knows: they do not end it
_REBOOTING = frozenset({Trigger.RESET_HINT, Trigger.OFFLINE_HINT})


class CardDriver(BringUp):
    def __init__(self, machine: CardMachine, host: CardHost, ctx: EngineContext
                 ) -> None:
        self.machine = machine
        self.host = host
        self.ctx = ctx
        self.resumed: CardRecord | None = None
        self.deployment = ""          # its deployment's name (docs/deployments.md)
        self.handover_session = b""   # a session keyed for the deployment it left: reset
        self.last_event = ""
        self.rekeys = 0
        self.reconciled = 0           # how many times the driver has looked at its card
        self.inbox = Inbox()
        self.verified_since = 0.0     # when the request of the last verified answer was sent
        self._sent = 0.0              # when the latest attestation or load was sent
        self._work: anyio.CancelScope | None = None
        self._verdict: VerificationError | None = None
        self.parked = False           # waiting for its next check (SERVING, nothing to do)
        self.returned = False         # its task has ended
        self._stopping = False
        self._release = anyio.Event()  # an operator released the card from quarantine
        self._released_by = ""

    def reset(self) -> None:
        """A fresh start (the host was taken over): nothing known but the store's word."""
        m = self.machine
        self.machine = CardMachine(m.host, m.device, m.group, m.partition, m.program_id)
        self.resumed = None
        self.last_event = ""
        self.inbox = Inbox()
        self.verified_since = 0.0
        self._verdict = None

    def mirror(self, record: CardRecord) -> None:
        """Show what another replica, which drives this card, last journaled."""
        m = self.machine
        state = CardState(record.state)
        if state is not m.state:
            m.state = state
            m.since = time.monotonic()
        m.reason, m.card_id, m.boot_counter = record.reason, record.card_id, record.boot_counter
        m.attempts = record.attempts
        m.known_good = record.known_good   # what it serves (a rollout's leader judges by it)
        if record.session_id != m.session_id.hex():
            m.session_id = bytes.fromhex(record.session_id)
            m.session_fingerprint = ""  # the journal keeps the id, not the key

    def resume(self, record: CardRecord) -> None:
        """What the store remembers of this card (before ``run``)."""
        self.resumed = record
        self.machine.known_good = record.known_good

    def __repr__(self) -> str:
        return f"CardDriver({self.machine!r})"

    def event(self, t: CardTransition, revision: int = 0) -> CardChanged:
        """The move ``t`` of this card, as the engine announces it."""
        m = self.machine
        return CardChanged(host=m.host, device=m.device, card_id=m.card_id, group=m.group,
                           partition=m.partition, previous=t.previous.value,
                           state=t.state.value, reason=t.reason, boot_counter=m.boot_counter,
                           session=m.session_fingerprint, attempts=m.attempts,
                           session_id=t.session_id[:16], revision=revision,
                           deployment=self.deployment)

    @property
    def program(self) -> PreparedProgram:
        """What this card is to run: its group's version (rollouts), else the plan's."""
        return self.ctx.programs[self.machine.program_id]

    @property
    def serving(self) -> bool:
        """SERVING the program it is to run (a card whose group was just switched to
        another version is still SERVING the old one until its driver moves it)."""
        good = self.machine.known_good
        return self.machine.state is S.SERVING and (
            good is None or good.program_id == self.machine.program_id)

    # --- what the rest of the tree may ask of a driver ------------------------------------

    @property
    def host_down(self) -> bool:
        return self.host.down

    def place(self, program_id: str) -> None:
        """Before the driver runs: the version the card starts on (a rollout's)."""
        self.machine.program_id = program_id

    def retarget(self, program_id: str) -> None:
        """Run ``program_id`` from now on (a rollout switched the card's group)."""
        if program_id != self.machine.program_id:
            self.machine.program_id = program_id
            self.hint(Trigger.SWITCH)

    def hand_over(self, deployment: str, group: int, partition: int, program_id: str
                  ) -> None:
        """Run in another deployment (or group) from now on: a card that changes key
        domain is reset before its new deployment's key (its current session was keyed
        for the one it leaves)."""
        if deployment != self.deployment:
            self.handover_session = self.machine.session_id
            self.deployment = deployment
        self.machine.group, self.machine.partition = group, partition
        self.machine.program_id = ""   # what it runs now is not what it is to run
        self.retarget(program_id)

    def hint(self, trigger: Trigger) -> None:
        """Something may have changed: look again (a hint, never a fact)."""
        self.inbox.hint(trigger)

    def heard(self, event: str, trigger: Trigger | None, *, stale_from: int | None = None
              ) -> None:
        """The host's event stream said ``event`` of the card (shown as its last event);
        ``trigger``: look again, unless a verified attestation has since seen boot
        ``stale_from`` or a later one (engine/inbox.py: no work on stale news)."""
        self.last_event = event
        if trigger is None:
            return
        if is_stale(stale_from, None, self.machine.boot_counter, self.verified_since):
            self.ctx.stats.stale_hints += 1   # old already: the driver is not woken for it
        else:
            self.inbox.hint(trigger, stale_from=stale_from)

    def observe(self, status: DeviceStatus, *, answered: float = 0.0) -> None:
        """The host's device list, answered at ``answered`` (monotonic), says this
        about the card: wake if it disagrees (unless it is old news by then: inbox)."""
        said = listing_says(status, self.machine)
        if said is None:
            return
        trigger, stale_from = said
        if is_stale(stale_from, answered, self.machine.boot_counter, self.verified_since):
            self.ctx.stats.stale_hints += 1
        else:
            self.inbox.hint(trigger, stale_from=stale_from, true_at=answered)

    def host_lost(self) -> None:
        """The host stopped answering: abandon the work in flight (its RPCs would only
        time out); the driver then shows the card DISCONNECTED until the host is back."""
        if self._work is not None:
            self._work.cancel()
        self.inbox.ring()

    def stop(self) -> None:
        """The run is ending: take no new work. A driver waiting for its next check
        returns now, by itself; one in the middle of work finishes it first."""
        self._stopping = True
        self._release.set()
        if self.parked:
            self.inbox.ring()

    def release(self, who: str) -> None:
        """An operator's decision: try the quarantined card again (docs/api.md)."""
        self._released_by = who
        self._release.set()

    def condemn(self, verdict: VerificationError) -> None:
        """A security verdict found outside the driver (at Execute): quarantine."""
        self._verdict = verdict
        if self._work is not None:
            self._work.cancel()
        self.inbox.ring()

    # --- moving the machine -----------------------------------------------------------------

    async def move(self, target: CardState, reason: str = "", *,
                   known_good: KnownGood | None | bool = True, load: LoadSent | None = None,
                   concludes: tuple[int, str] | None = None) -> int:
        """Propose, write ahead to the store, apply, announce. ``load``, ``concludes``:
        the load the move announces (its id is returned) or ends, in the same write."""
        transition = self.machine.propose(target, reason, known_good=known_good)
        # Written means applied, never half a move: the store's write is shielded, and
        # nothing between its return and the apply can be interrupted.
        recorded = await self.ctx.store.record_card(transition, load=load, concludes=concludes)
        self.machine.apply(transition)
        if target is S.SERVING:   # only ever on a verified report or receipt
            self.verified_since = self._sent
        self.host.card_moved(transition, recorded.revision)
        return recorded.load_id

    # --- the task -----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._drive()
        except LeaseLost as lost:
            self.host.fence(lost)
        except StoreUnavailable as err:
            self.host.fence(LeaseLost(self.machine.host, str(err)))
        except StateDirError as err:
            self.ctx.escalate(err)
        except Exception as exc:  # a bug: contained to this card  # noqa: BLE001
            message = self.ctx.internal_error(f"card {self.machine.name}", exc)
            with contextlib.suppress(StateDirError, LeaseLost):
                if self.machine.state not in FINAL:
                    await self.move(S.FAILED, f"internal error: {message}")
        finally:
            # fenced: not one more call or write about this card
            if self.machine.state in IN_FLIGHT and not self.host.fenced:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5), \
                        contextlib.suppress(StateDirError, LeaseLost):
                    await self._roll_back()
            self.returned = True

    async def _drive(self) -> None:
        m = self.machine
        previous = self.resumed
        trigger = Trigger.START
        if previous is not None and previous.state == S.QUARANTINED.value \
                and not self.ctx.retry_quarantined:
            m.card_id = previous.card_id
            await self.move(S.QUARANTINED, f"still quarantined: {previous.reason}")
        while True:
            if m.state is not S.QUARANTINED:
                await self._bring_to_settle(trigger)
            if m.state is not S.QUARANTINED or not await self._released():
                return
            trigger = Trigger.START

    async def _released(self) -> bool:
        """Until an operator releases the quarantined card (then PENDING, True) or the
        run ends (False)."""
        await self._release.wait()
        self._release = anyio.Event()
        if self._stopping:
            return False
        self._verdict = None
        await self.move(S.PENDING, f"released from quarantine by {self._released_by}")
        return True

    async def _bring_to_settle(self, trigger: Trigger) -> None:
        m = self.machine
        while m.state not in FINAL and not self._stopping:
            if not self.host.up:
                await self._while_host_down()
                if m.state is S.DISCONNECTED:
                    trigger = Trigger.HOST_BACK
                continue
            with anyio.CancelScope() as self._work:
                if self._verdict is None:
                    if m.state is S.SERVING:
                        woken = await self._next_trigger()
                        if woken is None:
                            return
                        trigger = woken
                    await self._reconcile(trigger)
            self._work = None
            self.reconciled += 1
            self.host.card_checked()
            if self._verdict is not None and m.state not in FINAL:
                self.ctx.stats.verification_failures[type(self._verdict).__name__] += 1
                await self.move(S.QUARANTINED, str(self._verdict))

    async def _while_host_down(self) -> None:
        m = self.machine
        while not self.host.up and m.state not in FINAL:
            if self.host.down and m.state is not S.DISCONNECTED:
                await self.move(S.DISCONNECTED, f"host {self.host.name} {self.host.describe()}")
            await self.host.changed()

    async def _next_trigger(self) -> Trigger | None:
        """Wait for a hint or the periodic check; rate-limit hints per card. None:
        the engine stops."""
        check = self.ctx.plan.rekey.check_interval
        due = time.monotonic() + (self.ctx.jittered(check) if check else float("inf"))
        while True:
            self.parked = True
            try:
                woken = await self.inbox.wait(due - time.monotonic())
            finally:
                self.parked = False
            if self._stopping:
                return None
            news, stale = self.inbox.take(self.machine.boot_counter, self.verified_since)
            self.ctx.stats.stale_hints += stale
            if news is not None or not woken:  # only stale news: back to waiting
                break
        trigger = news or Trigger.PERIODIC
        wait = self.inbox.looked_at + self.ctx.plan.rekey.min_interval - time.monotonic()
        if trigger.is_hint and wait > 0:
            await anyio.sleep(wait)  # storms cost one attestation per interval, no more
        return trigger

    async def _pause(self, seconds: float) -> None:
        """Wait for a rebooting card: sleep, unless a hint (the card is back online, say)
        comes first; a reset or offline hint says it is rebooting, which is known."""
        await self.inbox.wait(seconds, unless=_REBOOTING)
        self.inbox.take()

    # --- reconcile: observe, compare, act --------------------------------------------------

    async def _reconcile(self, trigger: Trigger) -> None:
        m = self.machine
        started = self.inbox.look()
        report: VerifiedReport | None = None
        if m.state is S.SERVING:
            seen, report, said = await self._check(routine=trigger is Trigger.PERIODIC)
            decision = decide_serving(seen, hinted=trigger.is_hint,
                                      suspected=bool(self.inbox.first_sign))
            if decision.outage:
                self.inbox.first_sign = self.inbox.first_sign or started
            if decision.act is Act.KEEP:
                self.verified_since = self._sent
                if decision.disproved and report is not None:
                    self.ctx.stats.disproved_hints += 1
                    self.ctx.emit(HintDisproved(host=m.host, device=m.device,
                                                trigger=trigger.value,
                                                boot_counter=report.boot_counter))
                self.inbox.first_sign = 0.0
                return
            if decision.act is Act.LOOK_AGAIN:  # while the host is probed
                self.hint(Trigger.PERIODIC)
                return
            if decision.act is Act.QUARANTINE:
                await self.move(S.QUARANTINED, said)
                return
            await self.move(S.REKEYING, f"{trigger.value}: {said}",
                            known_good=None if decision.forget else True)
            if seen is Seen.OFFLINE:   # just found rebooting: wait for it, do not ask again
                await self._bring_up(trigger, None, rebooting=True)
                return
        await self._bring_up(trigger, report)

    async def _check(self, *, routine: bool) -> tuple[Seen, VerifiedReport | None, str]:
        """Look at a serving card once: what was seen, the verified report (if one came
        back) and what to say. The one place a check's outcome is classified."""
        m = self.machine
        try:
            async with self.host.admit(m.group, routine=routine):
                self._sent = time.monotonic()
                report = await keying.attest(self.ctx, self.host.client, self.machine,
                                             self.deployment)
        except Exception as err:
            failure = classify(err)
            if failure is None or failure not in CHECK_SAW:
                raise
            seen = CHECK_SAW[failure]
            if seen is Seen.UNANSWERED:
                self.host.suspect()
            elif seen is Seen.REFUTED:
                self.ctx.stats.verification_failures[type(err).__name__] += 1
            return seen, None, ("the card is rebooting" if seen is Seen.OFFLINE
                                else str(err) or "timed out")
        seen, said = keying.seen_in(report, m, self.program, self.ctx.digests)
        if seen is Seen.FOREIGN:
            self.ctx.stats.verification_failures["ProgramSubstituted"] += 1
        return seen, report, said

    async def _roll_back(self) -> None:
        """Stopped mid-flight: unload a half-done load, leave the store consistent."""
        m = self.machine
        if m.state is S.LOADING:
            if self.host.up:
                with contextlib.suppress(ModelIPError):
                    await self.host.client.unload(m.device)
            await self.move(S.PENDING, "interrupted: load rolled back")
        elif m.state in IN_FLIGHT:
            await self.move(S.PENDING, "interrupted")
