"""The emulated cards as a host agent's backend (``backend: emulated``).

The cards of one host, behind the agent (agent/host.py), which does the rest of a
host's work. Card work that costs CPU (attestation signatures, decryption,
inference) runs in worker threads so the server keeps answering. Fault knobs make
the host slow or flaky; adversary modes make it hostile (docs/protocol.md,
"Adversary modes"): the backend runs on the untrusted host, so it is where the
emulation plays the host's attacks.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from orchestrator._proto.modelip.v1 import evidence_pb2, runtime_pb2
from orchestrator.agent.aborts import HostAbort, status_for
from orchestrator.agent.backend import Emit
from orchestrator.agent.staging import Staged, Staging
from orchestrator.crypto.container import key_slots_from_proto
from orchestrator.emulator.adversary import (
    Adversary,
    flip_middle,
    malformed_chain,
    slots_in,
)
from orchestrator.emulator.card import EmulatedCard
from orchestrator.errors import FormatError, ModelIPError
from orchestrator.qpc.container import Container, MemorySource

R = runtime_pb2
_LIFECYCLE = (R.EVENT_KIND_RESET, R.EVENT_KIND_OFFLINE, R.EVENT_KIND_ONLINE)
_QUICK_LOAD = 1 << 20   # bytes of program a card loads on the host's loop; more: a thread


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Knobs that make a host slow or flaky (not hostile)."""

    reset_rate: float = 0.0        # spontaneous resets per card per second
    reboot_time: float = 0.2       # seconds a card stays OFFLINE after a reset
    attest_latency: float = 0.0    # seconds added to every attestation
    stage_bandwidth: float = 0.0   # bytes per second when staging; 0 = unlimited
    drop_events: float = 0.0       # probability that an event is not delivered
    delay_events: float = 0.0      # seconds every event is held back
    stage_capacity: int = 0        # bytes the host keeps staged; 0 = unlimited (a full
                                   # disk: staging is refused with RESOURCE_EXHAUSTED)


class EmulatedBackend:
    """The emulated cards of one host (agent/backend.py ``CardBackend``)."""

    def __init__(self, cards: Sequence[EmulatedCard], staging: Staging, *,
                 faults: FaultConfig | None = None, adversary: Adversary = Adversary.NONE,
                 adversary_devices: frozenset[int] | None = None, seed: int | None = None
                 ) -> None:
        self.cards = list(cards)
        self.faults = faults or FaultConfig()
        self.adversary = adversary
        self.adversary_devices = adversary_devices
        self._staging = staging  # what OLD_VERSION substitutes from
        self._emit: Emit | None = None
        self._rng = random.Random(seed)  # noqa: S311 - fault timing, not security
        self._first_reports: dict[int, bytes] = {}
        self._host_key = ec.generate_private_key(ec.SECP256R1())
        self._rebooting: set[int] = set()
        self._seen_slots: list[Any] = []  # every slot relayed: material for swap-slots
        # each card session's last load answer: material for replay-receipt
        self._replayed: dict[tuple[int, bytes], runtime_pb2.LoadProgramResponse] = {}
        self._slot_relayed = anyio.Event()  # set (and renewed) each time slots are relayed
        self._tg: TaskGroup | None = None

    def hostile(self, device: int) -> bool:
        if self.adversary is Adversary.NONE:
            return False
        return self.adversary_devices is None or device in self.adversary_devices

    def card(self, device: int) -> EmulatedCard:
        if not 0 <= device < len(self.cards):
            raise HostAbort.of(R.ERROR_REASON_UNKNOWN_DEVICE,
                               f"no device {device} (has 0..{len(self.cards) - 1})")
        return self.cards[device]

    # --- life cycle ---------------------------------------------------------------

    async def live(self, emit: Emit, *,
                   task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The host's own life while it serves (spontaneous resets, an adversary's reset
        storm or garbage, delayed events), until cancelled."""
        self._emit = emit
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.faults.reset_rate > 0:
                    tg.start_soon(self._spontaneous_resets)
                if self.adversary is Adversary.RESET_STORM:
                    tg.start_soon(self._reset_storm)
                if self.adversary is Adversary.GARBAGE:
                    tg.start_soon(self._garbage_events)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._emit = None

    # --- resets and events ----------------------------------------------------------

    async def reset(self, device: int) -> None:
        """Reset a card: memory zeroed, session gone; back online after reboot_time."""
        card = self.card(device)
        if device in self._rebooting:
            return
        self._rebooting.add(device)
        # quick (a small program to zero) on the loop; else in a thread, as a signature
        if not card.power_off(blocking=False):
            await anyio.to_thread.run_sync(card.power_off)
        self.emit(device, R.EVENT_KIND_RESET, card.boot_counter)
        self.emit(device, R.EVENT_KIND_OFFLINE, card.boot_counter)
        if self._tg is not None:
            self._tg.start_soon(self._reboot, device)
        else:
            await self._reboot(device)

    async def _reboot(self, device: int) -> None:
        card = self.cards[device]
        try:
            await anyio.sleep(self.faults.reboot_time)
        finally:
            with anyio.CancelScope(shield=True):
                if not card.boot(blocking=False):
                    await anyio.to_thread.run_sync(card.boot)
                self._rebooting.discard(device)
        self.emit(device, R.EVENT_KIND_ONLINE, card.boot_counter)

    async def _spontaneous_resets(self) -> None:
        rate = self.faults.reset_rate * len(self.cards)
        while True:
            await anyio.sleep(self._rng.expovariate(rate))
            await self.reset(self._rng.randrange(len(self.cards)))

    async def _reset_storm(self) -> None:
        while True:
            await anyio.sleep(0.005)
            for device in range(len(self.cards)):
                if self.hostile(device):
                    self.emit(device, R.EVENT_KIND_RESET, self.cards[device].boot_counter,
                              forged=True)

    async def _garbage_events(self) -> None:
        """Values the protocol does not define, a card it does not have, an absurd
        counter: again and again, to every watcher."""
        while True:
            for device, kind, boot in ((0, 99, 0), (4_000_000_000, R.EVENT_KIND_RESET, 0),
                                       (0, R.EVENT_KIND_RESET, (1 << 64) - 1)):
                self._send(runtime_pb2.DeviceEvent(device=device, kind=kind,  # type: ignore[arg-type]
                                                   boot_counter=boot, time_ns=time.time_ns()))
            await anyio.sleep(0.1)

    def emit(self, device: int, kind: int, boot_counter: int, *, forged: bool = False) -> None:
        if self.adversary is Adversary.SUPPRESS_RESETS and self.hostile(device) \
                and kind in _LIFECYCLE and not forged:
            return
        if self.faults.drop_events and self._rng.random() < self.faults.drop_events:
            return
        event = runtime_pb2.DeviceEvent(device=device, kind=kind,  # type: ignore[arg-type]
                                        boot_counter=boot_counter, time_ns=time.time_ns())
        if self.faults.delay_events and self._tg is not None:
            self._tg.start_soon(self._deliver_later, event)
        else:
            self._send(event)

    async def _deliver_later(self, event: runtime_pb2.DeviceEvent) -> None:
        await anyio.sleep(self.faults.delay_events)
        self._send(event)

    def _send(self, event: runtime_pb2.DeviceEvent) -> None:
        if self._emit is not None:
            self._emit(event)

    # --- listing ----------------------------------------------------------------------

    async def devices(self) -> list[runtime_pb2.DeviceInfo]:
        listed = []
        if self.adversary is Adversary.GARBAGE:
            # values the protocol does not define, a card it does not have, an absurd counter
            listed += [
                runtime_pb2.DeviceInfo(device=len(self.cards) + 1000, card_id="ghost",
                                       state=R.DEVICE_STATE_ONLINE),
                runtime_pb2.DeviceInfo(device=0, card_id="?", state=77),  # type: ignore[arg-type]
                runtime_pb2.DeviceInfo(device=1, card_id="?", state=R.DEVICE_STATE_ONLINE,
                                       boot_counter=(1 << 64) - 1)]
        for index, card in enumerate(self.cards):
            info = runtime_pb2.DeviceInfo(device=index, card_id=card.card_id,
                                          boot_counter=card.boot_counter)
            listed.append(info)
            if not card.online:
                info.state = R.DEVICE_STATE_OFFLINE
                continue
            info.session_fingerprint = card.session_fingerprint
            info.session_id = card.session_id
            program = card.program
            if program is None:
                info.state = R.DEVICE_STATE_ONLINE
            else:
                info.state = R.DEVICE_STATE_LOADED
                info.program_id = program.program_id
                info.partition = program.partition
                info.program_ready = True  # installed only once verified
        return listed

    # --- attestation ------------------------------------------------------------------

    async def attest(self, device: int, request: bytes) -> evidence_pb2.AttestationEvidence:
        card = self.card(device)
        if self.faults.attest_latency:
            await anyio.sleep(self.faults.attest_latency)
        hostile = self.hostile(device)
        if hostile and self.adversary is Adversary.IGNORE_NONCE:
            request = os.urandom(32)
        # A signature takes tens of microseconds: on the loop, unless the card is busy
        # (a load installing): then in a thread, never blocking the loop.
        message = card.attest_message(request, blocking=False)
        if message is None:
            message = await anyio.to_thread.run_sync(card.attest_message, request)
            assert message is not None  # noqa: S101 - blocking call
        if not hostile:
            return message
        if self.adversary is Adversary.REPLAY_REPORT:
            return evidence_pb2.AttestationEvidence.FromString(self._first_reports.setdefault(
                device, message.SerializeToString(deterministic=True)))
        if self.adversary is Adversary.MALFORMED_CHAIN:
            del message.certificate_chain[:]
            message.certificate_chain.extend(malformed_chain(self._host_key, card.card_id))
        elif self.adversary is Adversary.SUBSTITUTE_KEY:
            body = evidence_pb2.ReportBody.FromString(message.body)
            body.session_kem = "P256"
            body.session_public_key = self._host_key.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint)
            message.body = body.SerializeToString(deterministic=True)
        return message

    # --- programs -------------------------------------------------------------------------

    async def load(self, device: int, program: Staged, partition: int,
                   key_slots: evidence_pb2.KeySlotTable | None
                   ) -> runtime_pb2.LoadProgramResponse:
        card = self.card(device)
        body = program.read()
        slots = key_slots_from_proto(key_slots, source="key slots") if key_slots else None
        if self.hostile(device):
            if self.adversary is Adversary.TAMPER_BODY:
                body = flip_middle(body)
            elif self.adversary is Adversary.OLD_VERSION:
                older = self._staging.oldest()
                body = older.read() if older is not None else body
            elif self.adversary is Adversary.SWAP_SLOTS:
                slots = await self._swap_slots(slots, card, body)
        self._relay(slots)
        replayed = self._replayed.get((device, card.session_id))
        if replayed is not None and self.hostile(device) \
                and self.adversary is Adversary.REPLAY_RECEIPT:
            return replayed  # the card is not asked: it may hold nothing at all

        container = Container(MemorySource(body), label=f"program {program.program_id[:16]}")

        def answer(names: list[str]) -> runtime_pb2.LoadProgramResponse:
            receipt, signature = card.load_receipt()
            return runtime_pb2.LoadProgramResponse(segments=names, receipt=receipt,
                                                   receipt_signature=signature)

        def load() -> runtime_pb2.LoadProgramResponse:
            return answer(card.load(container, program_id=program.program_id,
                                    partition=partition, key_slots=slots))

        # a small program on the host's loop if the card is free (a thread per load
        # cost a storm's hosts a quarter of their CPU); else in a thread
        names = card.try_load(container, program_id=program.program_id,
                              partition=partition, key_slots=slots) \
            if len(body) <= _QUICK_LOAD else None
        result = answer(names) if names is not None else \
            await anyio.to_thread.run_sync(load)
        self._replayed[(device, card.session_id)] = result
        self.emit(device, R.EVENT_KIND_LOADED, card.boot_counter)
        return result

    def _relay(self, key_slots: Any) -> None:
        if key_slots:
            self._seen_slots.extend(key_slots)
            self._slot_relayed.set()
            self._slot_relayed = anyio.Event()

    async def _swap_slots(self, key_slots: Any, card: EmulatedCard, body: bytes) -> Any:
        """Hand the card another card's slot relabelled as its own (the strongest swap).

        The slot comes from this request, the body, or any request the host relays
        (an orchestrator sends each card only its own slot): the host holds this load
        until another card's slot passes through it, as a patient attacker would. With
        none in sight after a while, the card's own slot is corrupted instead.
        """
        slots = slots_in(key_slots, body)
        mine = [s for s in slots if s.card_id == card.card_id]
        if not mine:
            return slots
        self._relay(mine)  # the genuine slot is material for the other cards' swaps
        with anyio.move_on_after(10):
            while not (others := [s for s in [*slots, *self._seen_slots]
                                  if s.card_id != card.card_id]):
                await self._slot_relayed.wait()
        if not others:
            return [replace(mine[0], wrapped_mek=flip_middle(mine[0].wrapped_mek))]
        return [replace(others[0], slot=mine[0].slot, card_id=card.card_id,
                        session_id=card.session_id)]

    async def unload(self, device: int) -> None:
        card = self.card(device)
        if card.program is None:  # as the protocol says (docs/protocol.md "Errors")
            raise HostAbort.of(R.ERROR_REASON_NOT_LOADED,
                               f"card {card.card_id}: no program loaded", device)
        await anyio.to_thread.run_sync(card.unload)
        self.emit(device, R.EVENT_KIND_UNLOADED, card.boot_counter)

    async def execute(self, devices: Sequence[int], inputs: Mapping[str, Any]
                      ) -> dict[str, Any]:
        """Run one card, or an MDP group in partition order relaying activations.

        Tensors go to stages by name; one unnamed tensor feeds the first stage
        only, and only if that stage takes exactly one input.
        """
        cards = [self.card(device) for device in devices]
        tensors = dict(inputs)
        results: dict[str, Any] = {}
        for position, (device, card) in enumerate(zip(devices, cards, strict=True)):
            program = card.program
            if program is None:
                raise HostAbort.of(R.ERROR_REASON_NOT_LOADED,
                                   f"card {card.card_id}: no program loaded", device)
            if len(cards) > 1 and program.partition != position:
                raise HostAbort.of(R.ERROR_REASON_FORMAT,
                                   f"card {card.card_id} holds partition {program.partition}, "
                                   f"named in position {position}", device)
            try:
                if position == 0 and "" in tensors:
                    names = await anyio.to_thread.run_sync(card.input_names)
                    if len(names) != 1:
                        raise FormatError("input", f"an unnamed tensor needs a first stage "
                                          f"with one input; it takes {names}")
                    tensors[names[0]] = tensors.pop("")
                outputs = await anyio.to_thread.run_sync(card.execute, tensors)
            except ModelIPError as err:
                raise status_for(err, device) from err
            tensors.update(outputs)
            final = (program.io_desc or {}).get("model_outputs")
            if isinstance(final, list):  # this stage says which of its outputs the model returns
                results.update({name: outputs[name] for name in final
                                if isinstance(name, str) and name in outputs})
            elif position == len(cards) - 1:
                results.update(outputs)
        return results
