"""The fleet supervisor: brings every card to serving and keeps it there.

One anyio task group owns every task: a task per host (stage the body once,
then watch its event stream) and a task per card (its state machine's only
driver: attest, verify, wrap, load, serve; re-key when a hint or a periodic
attestation says its session changed). Verification failures quarantine a
card for good; transport failures are retried with exponential backoff and
jitter, a bounded number of times. docs/engine.md tells the whole story.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from cryptography import x509

from orchestrator.crypto.evidence import (
    TrustPolicy,
    VerifiedReport,
    verify_evidence,
    verify_load_receipt,
)
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.wrap import Kem, wrap_mek
from orchestrator.engine.journal import CardRecord, Journal
from orchestrator.engine.plan import Plan
from orchestrator.engine.prepare import PreparedProgram
from orchestrator.engine.state import TERMINAL, CardMachine, CardState
from orchestrator.errors import (
    DeviceOffline,
    InputError,
    IntegrityError,
    ModelIPError,
    ProgramNotLoaded,
    SessionInvalidError,
    TransportError,
    VerificationError,
)
from orchestrator.transport.client import Deadlines, HostClient, TLSClientConfig

S = CardState
REBOOT_WAIT = 30.0   # how long a reset card may take to come back before we attest anyway
_jitter = random.Random()  # noqa: S311 - retry timing, not security


@dataclass(frozen=True, slots=True)
class HostTarget:
    name: str                 # how the journal and the dashboard name the host
    address: str
    devices: tuple[int, ...]
    tls: TLSClientConfig | None = None


@dataclass(slots=True)
class EngineStats:
    started: float = field(default_factory=time.monotonic)
    deployed_after: float | None = None
    attestations: int = 0
    loads: int = 0
    rekeys: int = 0
    rekey_latencies: list[float] = field(default_factory=list)
    disproved_hints: int = 0
    verification_failures: Counter[str] = field(default_factory=Counter)


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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the dashboard and `status` render: a pure value."""

    cards: tuple[CardView, ...]
    counts: dict[str, int]
    groups_serving: int
    groups: int
    events: tuple[dict[str, Any], ...]
    rekeys: int
    rekey_p50: float | None
    rekey_p99: float | None
    disproved_hints: int
    elapsed: float
    deployed_after: float | None


def policy_from_plan(plan: Plan) -> TrustPolicy:
    return TrustPolicy(
        allowed_firmware=frozenset(plan.policy.firmware),
        min_firmware=plan.policy.min_firmware,
        allowed_measurements={name: frozenset(bytes.fromhex(v) for v in values)
                              for name, values in plan.policy.measurements.items()},
        card_allowlist=frozenset(plan.policy.cards),
        allowed_kems=frozenset(Kem.parse(k) for k in plan.policy.kems),
        max_age=plan.policy.max_age,
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Engine:
    """Deploys one prepared program to a fleet and keeps it serving."""

    def __init__(self, plan: Plan, hosts: Sequence[HostTarget],
                 roots: Sequence[x509.Certificate], mek: MEK, program: PreparedProgram,
                 journal: Journal, *, retry_quarantined: bool = False) -> None:
        self.plan = plan
        self.hosts = list(hosts)
        self.roots = list(roots)
        self.mek = mek
        self.program = program
        self.journal = journal
        self.policy = policy_from_plan(plan)
        self.stats = EngineStats()
        self.deployed = anyio.Event()
        self.retry_quarantined = retry_quarantined
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._events: deque[dict[str, Any]] = deque(maxlen=12)
        self._limiter = anyio.CapacityLimiter(plan.concurrency)
        self._clients: dict[str, HostClient] = {}
        self._host_ready: dict[str, anyio.Event] = {h.name: anyio.Event() for h in hosts}
        self._host_error: dict[str, str] = {}
        self._loaded_hint: dict[tuple[str, int], tuple[str, int]] = {}
        self._waiters: list[anyio.Event] = []
        self.cards: list[CardMachine] = []
        self._unsettled = 0  # cards not SERVING, QUARANTINED or FAILED
        self.groups: dict[int, list[CardMachine]] = {}
        self._by_device: dict[tuple[str, int], CardMachine] = {}
        self._resume: dict[tuple[str, int], CardRecord] = {}
        group = 0
        for host in self.hosts:
            devices = sorted(host.devices)
            for start in range(0, len(devices), plan.group_size):
                for partition, device in enumerate(devices[start:start + plan.group_size]):
                    previous = journal.card(host.name, device)
                    if previous is not None:
                        self._resume[(host.name, device)] = previous
                    journal.ensure_card(host.name, device, group, partition)
                    card = CardMachine(host.name, device, group, partition, journal, self._emit)
                    card.program_id = program.program_id
                    self.cards.append(card)
                    self._unsettled += 1
                    self.groups.setdefault(group, []).append(card)
                    self._by_device[(host.name, device)] = card
                group += 1

    # --- events ----------------------------------------------------------------------

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    def _emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "transition":  # keep the count of unsettled cards current
            self._unsettled += (S(event["from"]) in TERMINAL) - (S(event["to"]) in TERMINAL)
        event = {"ts": round(time.time(), 6), **event}
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()

    async def changed(self) -> None:
        """Wait until the next event (any state change)."""
        waiter = anyio.Event()
        self._waiters.append(waiter)
        await waiter.wait()

    # --- views ------------------------------------------------------------------------

    def group_serving(self, group: int) -> bool:
        return all(card.state is S.SERVING for card in self.groups[group])

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        counts = Counter(card.state.value for card in self.cards)
        views = tuple(
            CardView(c.host, c.device, c.card_id, c.group, c.partition, c.state.value,
                     c.session_fingerprint, c.boot_counter, c.attempts, c.last_event, c.reason,
                     now - c.since)
            for c in self.cards)
        latencies = self.stats.rekey_latencies
        return Snapshot(views, dict(counts), sum(map(self.group_serving, self.groups)),
                        len(self.groups), tuple(self._events), self.stats.rekeys,
                        percentile(latencies, 0.5), percentile(latencies, 0.99),
                        self.stats.disproved_hints, now - self.stats.started,
                        self.stats.deployed_after)

    def outcome(self) -> tuple[int, list[CardMachine], list[CardMachine]]:
        """(exit code, quarantined cards, failed cards): 0 all serving, 3, 4."""
        quarantined = [c for c in self.cards if c.state is S.QUARANTINED]
        failed = [c for c in self.cards if c.state is S.FAILED]
        code = 3 if quarantined else 4 if failed else 0
        return code, quarantined, failed

    # --- running ------------------------------------------------------------------------

    async def run(self, *, keep_serving: bool,
                  task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deploy; then return (``keep_serving`` false) or keep the fleet serving."""
        deadlines = Deadlines(attest=self.plan.timeouts.rpc, control=self.plan.timeouts.rpc,
                              load=self.plan.timeouts.load)
        async with AsyncExitStack() as stack:
            for host in self.hosts:
                self._clients[host.name] = await stack.enter_async_context(
                    HostClient(host.address, tls=host.tls, deadlines=deadlines))
            async with anyio.create_task_group() as tg:
                for host in self.hosts:
                    tg.start_soon(self._host_task, host, tg)
                for card in self.cards:
                    tg.start_soon(self._card_task, card)
                tg.start_soon(self._watch_deployed)
                task_status.started()
                if not keep_serving:
                    await self.deployed.wait()
                    tg.cancel_scope.cancel()

    async def _watch_deployed(self) -> None:
        while True:
            if self._unsettled == 0:
                if not self.deployed.is_set():
                    self.stats.deployed_after = time.monotonic() - self.stats.started
                    code, quarantined, failed = self.outcome()
                    self._emit({"event": "deployed", "seconds": round(
                        self.stats.deployed_after, 3),
                        "serving": sum(c.state is S.SERVING for c in self.cards),
                        "quarantined": len(quarantined), "failed": len(failed),
                        "groups_serving": sum(map(self.group_serving, self.groups)),
                        "groups": len(self.groups)})
                    self.deployed.set()
            await self.changed()

    # --- hosts -----------------------------------------------------------------------------

    async def _host_task(self, host: HostTarget, tg: TaskGroup) -> None:
        client = self._clients[host.name]
        retry = self.plan.retry
        for attempt in range(1, retry.attempts + 1):
            try:
                for status in await client.list_devices():
                    if status.program_id:
                        self._loaded_hint[(host.name, status.device)] = (status.program_id,
                                                                         status.partition)
                # Content addressed: a host that has the body answers at once.
                _, already = await client.stage(self.program.body,
                                                program_id=self.program.program_id)
                self.journal.record_stage(host.name, self.program.program_id)
                self._emit({"event": "staged", "host": host.name,
                            "program_id": self.program.program_id[:16],
                            "already_staged": already})
                break
            except TransportError as err:
                if attempt == retry.attempts:
                    self._host_error[host.name] = f"host {host.name}: {err}"
                    self._emit({"event": "host_failed", "host": host.name, "reason": str(err)})
                    break
                await anyio.sleep(self._backoff(attempt))
        self._host_ready[host.name].set()
        if host.name in self._host_error:
            return
        await self._watch_events(host)

    async def _watch_events(self, host: HostTarget) -> None:
        client = self._clients[host.name]
        failures = 0
        while True:
            try:
                async for event in client.watch_events():
                    failures = 0
                    card = self._by_device.get((host.name, event.device))
                    if card is None:
                        continue
                    card.last_event = event.kind
                    if event.kind in ("RESET", "OFFLINE"):
                        card.online_at = 0.0
                        if self.plan.rekey.auto:
                            card.poke(f"{event.kind.lower()} hint")
                    elif event.kind == "ONLINE":
                        card.online_at = time.monotonic()
                        if self.plan.rekey.auto:
                            card.poke("online hint")
            except TransportError:
                failures += 1
            await anyio.sleep(self._backoff(min(failures, 6)))

    # --- cards -------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        retry = self.plan.retry
        base = min(retry.max_backoff, retry.backoff * 2.0 ** (attempt - 1))
        return float(base * (0.5 + _jitter.random()))  # jitter: hosts are not hit in step

    async def _card_task(self, card: CardMachine) -> None:
        await self._host_ready[card.host].wait()
        if card.host in self._host_error:
            card.move(S.FAILED, reason=self._host_error[card.host])
            return
        previous = self._resume.get((card.host, card.device))
        if previous is not None and previous.state == S.QUARANTINED.value \
                and not self.retry_quarantined:
            card.card_id = previous.card_id
            card.move(S.QUARANTINED, reason=f"still quarantined: {previous.reason}")
            return
        try:
            await self._bring_up(card, rekey=False, resume=previous)
            check = self.plan.rekey.check_interval
            while card.state is S.SERVING:
                assert card.wake is not None  # noqa: S101 - set by the machine
                with anyio.move_on_after(check * (0.75 + 0.5 * _jitter.random())
                                         if check else float("inf")):
                    await card.wake.wait()
                card.wake = anyio.Event()
                trigger, card.trigger = card.trigger or "periodic attestation", ""
                await self._recheck(card, trigger)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._roll_back(card)

    async def _roll_back(self, card: CardMachine) -> None:
        """Cancelled mid-flight: unload a half-done load, leave the journal consistent."""
        if card.state in (S.LOADING,):
            try:
                await self._clients[card.host].unload(card.device)
            except ModelIPError:
                pass  # the card may be gone; the journal still says what we know
            card.move(S.PENDING, reason="interrupted: load rolled back")
        elif card.state in (S.ATTESTING, S.KEYED, S.REKEYING, S.RETRY_WAIT):
            card.move(S.PENDING, reason="interrupted")

    async def _recheck(self, card: CardMachine, trigger: str) -> None:
        """A hint or the periodic timer: is the card still on the session we loaded?"""
        rekey = self.plan.rekey
        started = card.triggered_at or time.monotonic()
        card.triggered_at = 0.0
        wait = card.checked_at + rekey.min_interval - time.monotonic()
        if "hint" in trigger and wait > 0:
            await anyio.sleep(wait)  # rate limit per card: storms cannot starve the fleet
        card.checked_at = time.monotonic()
        # Every hint so far is answered by the attestation we are about to make.
        card.trigger = ""
        card.wake = anyio.Event()
        fresh: VerifiedReport | None = None
        reason = trigger
        for _ in range(2):
            try:
                async with self._limiter:
                    fresh = await self._attest(card)
                break
            except DeviceOffline as err:
                # Really rebooting (a forged hint would find the card answering):
                # wait for it to come back, then attest once more.
                reason = f"{trigger}: {err}"
                await self._wait_online(card)
            except (TransportError, SessionInvalidError, TimeoutError) as err:
                if "hint" not in trigger:
                    return  # a missed periodic check is retried at the next one
                reason = f"{trigger}: {err}"
                break
            except VerificationError as err:
                self.stats.verification_failures[type(err).__name__] += 1
                card.move(S.REKEYING, reason=trigger)
                card.move(S.QUARANTINED, reason=str(err))
                return
        if fresh is not None:
            if fresh.session_id == card.session_id:
                if "hint" in trigger:
                    self.stats.disproved_hints += 1
                    self._emit({"event": "hint_disproved", "host": card.host,
                                "device": card.device, "hint": trigger,
                                "boot_counter": fresh.boot_counter})
                return
            reason = f"{trigger}: new session (boot {fresh.boot_counter})"
        card.move(S.REKEYING, reason=reason)
        rekey_from = max(started, card.online_at or started)
        await self._bring_up(card, rekey=True, report=fresh)
        card.trigger = ""  # hints that arrived meanwhile are answered by this re-key
        card.wake = anyio.Event()
        if card.state is S.SERVING:
            self.stats.rekeys += 1
            latency = time.monotonic() - rekey_from
            self.stats.rekey_latencies.append(latency)
            card.rekeys += 1
            self._emit({"event": "rekeyed", "host": card.host, "device": card.device,
                        "latency_ms": round(latency * 1e3, 2), "group": card.group,
                        "group_serving": self.group_serving(card.group)})

    async def _wait_online(self, card: CardMachine) -> None:
        """Until the host says the card is back (bounded: the hint may be suppressed)."""
        with anyio.move_on_after(REBOOT_WAIT):
            while card.online_at == 0.0:
                await self.changed_for(card)

    async def changed_for(self, card: CardMachine) -> None:
        assert card.wake is not None  # noqa: S101 - set by the machine
        await card.wake.wait()
        card.wake = anyio.Event()

    async def _attest(self, card: CardMachine) -> VerifiedReport:
        request = os.urandom(32)
        client = self._clients[card.host]
        evidence = await client.attest(card.device, request)
        self.stats.attestations += 1
        report = verify_evidence(evidence, roots=self.roots, policy=self.policy,
                                 request=request, source=f"{card.host}/{card.device}")
        return report

    def _adopt(self, card: CardMachine, report: VerifiedReport) -> None:
        card.card_id = report.card_id
        card.boot_counter = report.boot_counter
        card.session_id = report.session_id
        card.session_fingerprint = report.session_fingerprint

    def _still_loaded(self, card: CardMachine, report: VerifiedReport,
                      previous: CardRecord | None) -> bool:
        """Resume: same session as journaled serving, and the host shows our program."""
        if previous is None or previous.program_id != self.program.program_id:
            return False
        if previous.session_id != report.session_id.hex() or previous.card_id != report.card_id:
            return False
        if previous.state not in (S.SERVING.value, S.LOADING.value, S.REKEYING.value):
            return False
        hint = self._loaded_hint.get((card.host, card.device))
        return hint == (self.program.program_id, card.partition)

    async def _bring_up(self, card: CardMachine, *, rekey: bool,
                        report: VerifiedReport | None = None,
                        resume: CardRecord | None = None) -> None:
        retry = self.plan.retry
        first = S.REKEYING if rekey else S.ATTESTING
        for attempt in range(1, retry.attempts + 1):
            card.attempts = attempt
            try:
                with anyio.fail_after(self.plan.timeouts.card):
                    async with self._limiter:
                        if card.state is not first:
                            card.move(first, reason=f"attempt {attempt}")
                        if report is None:
                            report = await self._attest(card)
                        self._adopt(card, report)
                        if resume is not None and self._still_loaded(card, report, resume):
                            card.move(S.SERVING, reason="confirmed by a fresh attestation: "
                                      "same session, not reloaded")
                            return
                        # A re-key does not wait for the card to re-verify the whole
                        # body: the first load of this deployment already did.
                        await self._wrap_and_load(card, report, verify_later=rekey)
                        return
            except (SessionInvalidError, DeviceOffline, TransportError, TimeoutError,
                    ProgramNotLoaded) as err:
                report = None
                resume = None
                message = str(err) or "timed out"
                if attempt == retry.attempts:
                    card.move(S.FAILED, reason=f"gave up after {attempt} attempts: {message}")
                    return
                card.move(S.RETRY_WAIT, reason=message)
                await anyio.sleep(self._backoff(attempt))
            except VerificationError as err:
                self.stats.verification_failures[type(err).__name__] += 1
                card.move(S.QUARANTINED, reason=str(err))
                return
            except InputError as err:
                card.move(S.FAILED, reason=str(err))
                return

    async def _wrap_and_load(self, card: CardMachine, report: VerifiedReport, *,
                             verify_later: bool) -> None:
        slot = wrap_mek(self.mek, slot=card.partition, card_id=report.card_id,
                        session_id=report.session_id, kem=report.kem,
                        public_key=report.session_public_key)
        card.move(S.KEYED, reason=f"MEK wrapped to session {report.session_fingerprint}")
        card.move(S.LOADING)
        load_id = self.journal.record_load(card.host, card.device, card_id=card.card_id,
                                           session_id=report.session_id.hex(),
                                           program_id=self.program.program_id,
                                           partition=card.partition)
        result = await self._clients[card.host].load(
            card.device, self.program.program_id, partition=card.partition, key_slots=[slot],
            verify_later=verify_later)
        self.stats.loads += 1
        try:
            verify_load_receipt(result.receipt, result.receipt_signature, report=report,
                                program_info_digest=self.program.info_digest,
                                partition=card.partition, source=f"{card.host}/{card.device}")
        except VerificationError:
            self.journal.finish_load(load_id, "refused receipt")
            raise
        self.journal.finish_load(load_id, "ok")
        card.move(S.SERVING, reason=f"loaded {len(result.segments)} segments")

    # --- inference ------------------------------------------------------------------------------

    async def execute(self, inputs: dict[str, Any], *, group: int | None = None
                      ) -> dict[str, Any]:
        """Run inference on a serving group (re-keying it first if a card lost its session)."""
        for attempt in range(2):
            serving = [g for g in self.groups if self.group_serving(g)]
            chosen = group if group is not None else (serving[0] if serving else None)
            if chosen is None or not self.group_serving(chosen):
                raise ProgramNotLoaded("no MDP group is serving")
            cards = sorted(self.groups[chosen], key=lambda c: c.partition)
            try:
                return await self._clients[cards[0].host].execute(
                    [c.device for c in cards], inputs)
            except IntegrityError as err:
                # Found while decrypting in the background after a re-key: the
                # body was altered. Quarantine the card named, else the group.
                named = [c for c in cards if c.card_id and c.card_id in str(err)]
                for card in named or cards:
                    self.stats.verification_failures[type(err).__name__] += 1
                    card.move(S.QUARANTINED, reason=str(err))
                raise
            except (SessionInvalidError, ProgramNotLoaded):
                if attempt:
                    raise
                for card in cards:
                    card.poke("execute refused")
                with anyio.fail_after(self.plan.timeouts.card):
                    while not self.group_serving(chosen) or any(c.trigger for c in cards):
                        await self.changed()
        raise ProgramNotLoaded("no MDP group is serving")
