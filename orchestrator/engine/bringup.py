"""Bringing a card up: attest (or take a fresh report), then confirm that it holds
its program or wrap the MEK to its session and load; retried as ``after_failure``
decides; held while its host is cordoned. The card driver's (engine/card.py) work
on a card that is not serving, apart so each reads alone."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from orchestrator.crypto.evidence import VerifiedReport
from orchestrator.engine import keying
from orchestrator.engine.context import EngineContext
from orchestrator.engine.decide import Failure, Next, after_failure, classify
from orchestrator.engine.events import Rekeyed
from orchestrator.engine.inbox import Inbox
from orchestrator.engine.state import CardMachine, CardState, KnownGood, Trigger
from orchestrator.engine.store.protocol import LoadSent
from orchestrator.errors import DeviceOffline, ModelIPError

if TYPE_CHECKING:
    from orchestrator.engine.ports import CardHost
    from orchestrator.engine.prepare import PreparedProgram

S = CardState


class BringUp:
    """What CardDriver does to bring its card up; the driver's state it uses is
    declared here and set by CardDriver."""

    machine: CardMachine
    host: CardHost
    ctx: EngineContext
    inbox: Inbox
    rekeys: int
    verified_since: float
    handover_session: bytes
    deployment: str
    _sent: float
    _stopping: bool
    _release: anyio.Event

    @property
    def program(self) -> PreparedProgram:
        raise NotImplementedError

    async def move(self, target: CardState, reason: str = "", *,
                   known_good: KnownGood | None | bool = True, load: LoadSent | None = None,
                   concludes: tuple[int, str] | None = None) -> int:
        raise NotImplementedError

    async def _pause(self, seconds: float) -> None:
        raise NotImplementedError

    def _other_domain(self, report: VerifiedReport) -> str | None:
        """Why the card must be reset before this deployment's key is wrapped to it
        (docs/deployments.md "Handover"), if it must: it holds a program of another key
        domain, or (given to this deployment while running) its session was keyed for
        the deployment it left, even if nothing is loaded now."""
        if other := keying.other_domain(self.ctx, report, self.program):
            return f"the card holds {other}, sealed under another deployment's MEK"
        if self.handover_session and report.session_id == self.handover_session:
            return "its session was keyed for the deployment it left"
        return None

    async def _bring_up(self, trigger: Trigger, report: VerifiedReport | None, *,
                        rebooting: bool = False) -> None:
        """Attest (unless ``report`` is fresh), then confirm or wrap and load; retried.
        ``rebooting``: a check has just found the card rebooting: wait for it first."""
        m = self.machine
        rekey = m.state is S.REKEYING
        first = S.REKEYING if rekey else S.ATTESTING
        timeouts = self.ctx.plan.timeouts
        attempt = 0
        offline_since = time.monotonic() if rebooting else 0.0
        if rebooting and not await self._after_failure(
                Failure.OFFLINE, DeviceOffline(self.host.name, "the card is rebooting"), 0,
                offline_since):
            return
        while True:
            attempt += 1
            m.attempts = attempt
            try:
                with anyio.fail_after(timeouts.card):
                    async with self.host.admit(m.group):
                        if m.state is not first and not offline_since:
                            await self.move(first, f"{trigger.value}, attempt {attempt}")
                        if report is None:
                            self._sent = time.monotonic()
                            report = await keying.attest(self.ctx, self.host.client, m,
                                                         self.deployment)
                        if m.state is not first:  # a rebooting card answers again
                            await self.move(first, f"{trigger.value}: the card is back")
                        keying.adopt(m, report)
                        cordoned = handed_over = False
                        if keying.holds(report, self.program, m.partition):
                            await self.move(S.SERVING, "confirmed by a fresh attestation: the card "
                                      "holds the program, verified, not reloaded",
                                      known_good=keying.verified_good(
                                          report, self.program, m.partition))
                        elif self.host.cordoned_by is not None:
                            cordoned = True
                        elif (other := self._other_domain(report)) is not None:
                            await self.move(S.RETRY_WAIT, f"handover: {other}: reset before "
                                            "this deployment's key", known_good=None)
                            await self.host.client.reset(m.device)
                            handed_over = True
                        else:
                            await self._wrap_and_load(report)
                if handed_over:   # attested again once it is back, in a new session
                    report, offline_since = None, time.monotonic()
                    continue
                if cordoned:  # no key for it until its host is uncordoned
                    if not await self._held_by_cordon():
                        return
                    report, attempt, offline_since = None, 0, 0.0
                    continue
                self._served(counted=trigger not in (Trigger.START, Trigger.SWITCH))
                return
            except Exception as err:
                failure = classify(err)
                if failure is None:
                    raise
                report = None
                if failure is Failure.OFFLINE:  # rebooting: waiting for it is not an attempt
                    attempt -= 1
                    offline_since = offline_since or time.monotonic()
                if not await self._after_failure(failure, err, attempt, offline_since):
                    return

    async def _held_by_cordon(self) -> bool:
        """The card needs a key and its host is cordoned (docs/api.md "Cordon"): CORDONED
        until the host is uncordoned (True: try again), goes down or the run ends."""
        await self.move(S.CORDONED, f"host {self.host.name} cordoned by "
                        f"{self.host.cordoned_by}: not keyed until it is uncordoned")
        while self.host.cordoned_by is not None and self.host.up and not self._stopping:
            async with anyio.create_task_group() as tg:
                async def first(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    tg.cancel_scope.cancel()
                tg.start_soon(first, self.host.changed)
                tg.start_soon(first, self._release.wait)   # set by stop()
        return self.host.cordoned_by is None and self.host.up and not self._stopping

    async def _after_failure(self, failure: Failure, err: Exception, attempt: int,
                             offline_since: float) -> bool:
        """Apply what ``after_failure`` decides; False: the bring-up has ended."""
        m = self.machine
        retry, limit = self.ctx.plan.retry, self.ctx.plan.timeouts.card
        message = str(err) or "timed out"
        if failure is Failure.TRANSIENT:
            self.host.suspect()
        elif failure is Failure.REFUTED:
            self.ctx.stats.verification_failures[type(err).__name__] += 1
        offline_for = time.monotonic() - offline_since if offline_since else 0.0
        step = after_failure(failure, attempt=attempt, attempts=retry.attempts, limit=limit,
                             offline_for=offline_for)
        if step is Next.QUARANTINE:
            await self.move(S.QUARANTINED, message)
        elif step is Next.FAIL:
            await self.move(S.FAILED, message if failure is Failure.INVALID else
                            f"offline for more than {limit:g} s: {message}"
                            if failure is Failure.OFFLINE else
                            f"gave up after {attempt} attempts: {message}")
        elif step is Next.WAIT_ONLINE:
            # The card's ONLINE event (or a listing that shows it back) ends the pause;
            # asking is the fallback for a lost one, and costs its host an answer: first
            # after 0.25 s, then as long as the card has been rebooting (doubling,
            # capped). Bounded by timeouts.card.
            if m.state not in (S.RETRY_WAIT, S.REKEYING):   # a re-key waits as it is
                await self.move(S.RETRY_WAIT, "the card is rebooting")
            await self._pause(min(retry.max_backoff, max(0.25, offline_for)))
        elif step is Next.RESTAGE:   # the host lacks the body (lost it, or new): never final
            if m.state is not S.RETRY_WAIT:   # a load refused: tried again from the start
                await self.move(S.RETRY_WAIT, f"the host lacks the program: sent again "
                                f"({message})")
            await self.host.restage()
        else:
            await self.move(S.RETRY_WAIT, f"attempt {attempt} of {retry.attempts}: {message}")
            await anyio.sleep(self.ctx.backoff(attempt))
        return step not in (Next.QUARANTINE, Next.FAIL)

    def _served(self, *, counted: bool) -> None:
        """Just moved to SERVING: if something had gone wrong, that was an outage."""
        m = self.machine
        outage = self.inbox.since_first_sign()
        if outage is not None and counted:
            self.ctx.stats.outages.append(outage)
            self.ctx.stats.rekeyed_at.append(time.monotonic())
            self.ctx.stats.rekeys += 1
            self.rekeys += 1
            self.ctx.emit(Rekeyed(host=m.host, device=m.device, group=m.group,
                                  outage_ms=round(outage * 1e3, 2),
                                  group_serving=self.host.group_serving(m.group)))

    async def _wrap_and_load(self, report: VerifiedReport) -> None:
        m = self.machine
        program = self.program   # read once: a rollout may switch the group meanwhile
        slot = keying.slot_for(self.ctx, report, program, m.partition)
        same_session = m.known_good is not None \
            and m.known_good.session_id == report.session_id.hex()
        await self.move(S.KEYED, f"MEK wrapped to session {report.session_fingerprint}",
                  known_good=True if same_session else None)
        load_id = await self.move(S.LOADING, load=LoadSent(program.program_id, m.partition))
        outcome = "interrupted"
        try:
            self._sent = time.monotonic()
            result = await self.host.client.load(
                m.device, program.program_id, partition=m.partition, key_slots=[slot])
            self.ctx.stats.loads += 1
            outcome = "refused receipt"
            receipt = keying.receipt_of(result, report, program, m.partition, slot, m.name)
        except BaseException as exc:
            if isinstance(exc, ModelIPError) and outcome == "interrupted":
                outcome = "failed"
            with anyio.CancelScope(shield=True):
                await self.ctx.store.finish_load(load_id, outcome)
            raise
        taken = f"; taken over from fleet {result.taken_from} (--take-over), by the host's " \
            "word" if result.taken_from else ""
        await self.move(S.SERVING, f"loaded {len(result.segments)} segments, verified by the card "
                  f"(version {receipt.model_version}, rollback floor {receipt.rollback_floor})"
                  f"{taken}",
                  known_good=keying.verified_good(report, program, m.partition),
                  concludes=(load_id, "ok"))
