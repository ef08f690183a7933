"""grpc.aio client of a host's remote proxy (docs/protocol.md).

Every call has a deadline. Every gRPC failure becomes one of our exceptions in
``translate``, so callers reason in our words: a refused load says whether
the session was stale, the program tampered with, or the policy violated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator._proto.modelip.v1 import runtime_pb2, runtime_pb2_grpc
from orchestrator.crypto.container import encode_key_slots
from orchestrator.crypto.wrap import KeySlot
from orchestrator.errors import (
    FileInputError,
    FormatError,
    ProtocolViolation,
)
from orchestrator.limits import MAX_CARDS_PER_HOST
from orchestrator.tensors import from_wire, to_wire
from orchestrator.terminal import terminal_safe
from orchestrator.transport.batch import Coalescer
from orchestrator.transport.failures import card_error, translate
from orchestrator.transport.types import (
    CLAIM_KEY,
    DEFAULT_PORT,
    FENCE_KEY,
    MAX_MESSAGE,
    TAKE_OVER_KEY,
    Deadlines,
    DeviceEvent,
    DeviceState,
    DeviceStatus,
    EventKind,
    LoadResult,
    TLSClientConfig,
)

STAGE_CHUNK = 1 << 20
# What a host's answer may carry, by call (docs/security.md), checked by gRPC before
# anything is parsed: every call but Execute answers in kilobytes (evidence is at
# most 1 MiB, a listing of MAX_CARDS_PER_HOST cards some 150 KiB), so they share a
# channel whose answers are capped at CONTROL_MESSAGE; Execute's tensors come on a
# channel of their own (opened on first use) with MAX_MESSAGE. A listing of more
# cards than a host may have is refused before one object is made per entry.
CONTROL_MESSAGE = (1 << 20) + (64 << 10)
MAX_SEGMENTS = 4096   # names a load answer may list (a container's table is no larger)
ATTEST_BATCH = 64     # attestations in one batched call (their evidence fits CONTROL_MESSAGE)
# Seconds a batch waits for others to join it (attestations, loads), and again while
# some keep joining, at most BATCH_WINDOWS times: a lone card waits one window, a
# storm's cards (which come back from their reboots one after another) fill batches.
ATTEST_WINDOW, LOAD_WINDOW, BATCH_WINDOWS = 0.01, 0.002, 8
LOAD_BATCH = 16       # loads in one batched call (their receipts fit CONTROL_MESSAGE)


Asked = TypeVar("Asked", runtime_pb2.AttestationRequest, runtime_pb2.LoadProgramRequest)
Answer = TypeVar("Answer")

_DEVICE_STATES = {runtime_pb2.DEVICE_STATE_ONLINE: DeviceState.ONLINE,
                  runtime_pb2.DEVICE_STATE_OFFLINE: DeviceState.OFFLINE,
                  runtime_pb2.DEVICE_STATE_LOADED: DeviceState.LOADED}
_EVENT_KINDS = {runtime_pb2.EVENT_KIND_ONLINE: EventKind.ONLINE,
                runtime_pb2.EVENT_KIND_OFFLINE: EventKind.OFFLINE,
                runtime_pb2.EVENT_KIND_RESET: EventKind.RESET,
                runtime_pb2.EVENT_KIND_LOADED: EventKind.LOADED,
                runtime_pb2.EVENT_KIND_UNLOADED: EventKind.UNLOADED}


async def _finish(call: Any) -> Any:
    """Await a unary-response call so that cancelling the caller cancels the RPC.

    grpc.aio answers a cancellation of its awaiting task with a CancelledError
    of its own, which anyio's cancel scopes do not recognise: the scope then
    neither stops the call nor absorbs the error. So wait for completion on an
    anyio event, and on cancellation cancel the RPC and let anyio's own
    cancellation propagate.
    """
    done = anyio.Event()
    call.add_done_callback(lambda _: done.set())
    try:
        await done.wait()
    except BaseException:
        call.cancel()
        raise
    return await call  # complete: the response, or its AioRpcError


def open_channel(address: str, tls: TLSClientConfig | None, *, receive: int
                 ) -> grpc.aio.Channel:
    """A channel to ``address`` (TLS with ``tls``) whose answers are capped at ``receive``
    bytes; no retries (a caller decides)."""
    options = [("grpc.max_receive_message_length", receive),
               ("grpc.max_send_message_length", MAX_MESSAGE),
               ("grpc.enable_retries", 0)]
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem)
    return grpc.aio.secure_channel(address, credentials, options=options)


class HostClient:
    """Talks to one host. Use as ``async with HostClient(address) as host:``."""

    def __init__(self, address: str, *, tls: TLSClientConfig | None = None,
                 deadlines: Deadlines | None = None,
                 gate: Callable[[], float] | None = None,
                 fence: tuple[int, str] | None = None,
                 claim: tuple[str, bool] | None = None) -> None:
        """``gate``, if given, is asked before every call: it returns how many seconds
        the caller may still act (no deadline goes past it) or raises to forbid it.
        ``fence``: (epoch, holder) of the caller's lease on this host, sent with every
        call; the host refuses a change to a card under an epoch older than one it
        has seen (LeaseLost). ``claim``: (the fleet's identity, take over): the host
        refuses a change to a card another fleet holds unless taken over on purpose
        (docs/protocol.md "Claims")."""
        self.gate = gate
        metadata: list[tuple[str, str]] = []
        if fence:
            metadata.append((FENCE_KEY, f"{fence[0]}:{fence[1]}"))
        if claim:
            metadata.append((CLAIM_KEY, claim[0]))
            if claim[1]:
                metadata.append((TAKE_OVER_KEY, "1"))
        self._metadata = tuple(metadata) or None
        if ":" not in address:
            address = f"{address}:{DEFAULT_PORT}"
        self.address = address
        self.deadlines = deadlines or Deadlines()
        self._channel = open_channel(address, tls, receive=CONTROL_MESSAGE)
        self._bulk = open_channel(address, tls, receive=MAX_MESSAGE)
        # The evidence stays bytes here: it is parsed once, by its verifier (no parse
        # and re-serialize in between).
        self._attest_raw = self._channel.unary_unary(
            "/modelip.v1.RemoteAttestation/GetAttestationReport",
            request_serializer=runtime_pb2.AttestationRequest.SerializeToString,
            response_deserializer=bytes)
        self._attest_many = self._channel.unary_unary(
            "/modelip.v1.RemoteAttestation/GetAttestationReports",
            request_serializer=runtime_pb2.AttestationBatchRequest.SerializeToString,
            response_deserializer=runtime_pb2.AttestationBatchResponse.FromString)
        # attestations asked together go in one call (transport/batch.py), while the
        # host has the batched call (a host without it answers UNIMPLEMENTED once)
        self._attests: Coalescer[runtime_pb2.AttestationRequest, bytes] = Coalescer(
            self._attest_together, limit=ATTEST_BATCH, window=ATTEST_WINDOW,
            most=BATCH_WINDOWS)
        self._loads: Coalescer[runtime_pb2.LoadProgramRequest, LoadResult] = Coalescer(
            self._load_together, limit=LOAD_BATCH, window=LOAD_WINDOW, most=BATCH_WINDOWS)
        self._card_by_card: set[str] = set()   # batched calls this host lacks
        self._runtime = runtime_pb2_grpc.DeviceRuntimeStub(self._channel)
        self._execute = runtime_pb2_grpc.DeviceRuntimeStub(self._bulk).Execute
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __repr__(self) -> str:
        return f"HostClient({self.address!r})"

    async def __aenter__(self) -> HostClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        await self._bulk.close()

    @property
    def attest_calls(self) -> int:
        """Calls made for attestations (a batch is one call)."""
        return self._attests.calls

    @property
    def load_calls(self) -> int:
        """Calls made for loads (a batch is one call)."""
        return self._loads.calls

    def _allowed(self, deadline: float) -> float:
        return deadline if self.gate is None else min(deadline, self.gate())

    async def _call(self, what: str, method: Any, request: Any, deadline: float, *,
                    device: int | None = None) -> Any:
        deadline = self._allowed(deadline)
        try:
            return await _finish(method(request, timeout=deadline, metadata=self._metadata))
        except grpc.aio.AioRpcError as err:
            error = translate(err, self.address, what)
            if error.device is None:
                error.device = device  # a call about one card: that card
            raise error from err

    # --- attestation --------------------------------------------------------------

    async def attest(self, device: int, request: bytes) -> bytes:
        """The card's evidence for ``request``, as bytes (verify before use!). Asked
        in one call with the other attestations of its batch window (ATTEST_WINDOW)."""
        return await self._attests.submit(
            runtime_pb2.AttestationRequest(device=device, request=request))

    async def _attest_one(self, asked: runtime_pb2.AttestationRequest) -> bytes:
        evidence: bytes = await self._call(
            f"attest device {asked.device}", self._attest_raw, asked,
            self.deadlines.attest, device=asked.device)
        return evidence

    async def _attest_together(self, asked: Sequence[runtime_pb2.AttestationRequest]
                               ) -> list[bytes | BaseException]:
        return await self._together(
            "attest", asked, self._attest_one,
            lambda: self._attest_many(runtime_pb2.AttestationBatchRequest(requests=asked),
                                      timeout=self._allowed(self.deadlines.attest),
                                      metadata=self._metadata),
            lambda result: result.evidence if result.WhichOneof("result") == "evidence"
            else None)

    async def _together(self, what: str, asked: Sequence[Asked],
                        one: Callable[[Asked], Awaitable[Answer]], many: Callable[[], Any],
                        answer: Callable[[Any], Answer | None]) -> list[Answer | BaseException]:
        """Each card's answer or error, in order: one batched call (``many``; ``answer``
        takes a card's result, None when it is an error), or card by card (``one``: a
        card alone; a host without the batched call; an answer larger than the control
        channel takes, from then on)."""
        if len(asked) > 1 and what not in self._card_by_card:
            try:
                response = await _finish(many())
            except grpc.aio.AioRpcError as err:
                if err.code() not in (grpc.StatusCode.UNIMPLEMENTED,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise translate(err, self.address, f"{what} {len(asked)} devices"
                                    ) from err
                self._card_by_card.add(what)
            else:
                return self._each_answer(what, response, asked, answer)
        if len(asked) == 1:  # alone: its failure is the call's (LeaseLost included)
            return [await one(asked[0])]
        answers: dict[int, Answer | BaseException] = {}

        async def alone(index: int, request: Asked) -> None:
            try:
                answers[index] = await one(request)
            except Exception as error:  # noqa: BLE001 - each card's own (LeaseLost too)
                answers[index] = error

        async with anyio.create_task_group() as tg:
            for index, request in enumerate(asked):
                tg.start_soon(alone, index, request)
        return [answers[index] for index in range(len(asked))]

    def _each_answer(self, what: str, response: Any, asked: Sequence[Asked],
                     answer: Callable[[Any], Answer | None]) -> list[Answer | BaseException]:
        if len(response.results) != len(asked):
            raise ProtocolViolation(f"host {self.address}", f"answered {len(asked)} "
                                    f"requests ({what}) with {len(response.results)} results")
        answers: list[Answer | BaseException] = []
        for request, result in zip(asked, response.results, strict=True):
            device = request.device
            got = answer(result)
            if got is not None:
                answers.append(got)
            elif result.WhichOneof("result") == "error":
                answers.append(card_error(result.error, self.address,
                                          f"{what} device {device}", device))
            else:
                answers.append(ProtocolViolation(f"host {self.address}", f"answered the "
                                                 f"{what} of device {device} with nothing"))
        return answers

    # --- devices --------------------------------------------------------------------

    async def health(self) -> bool:
        response = await self._call("health check", self._health.Check,
                                    health_pb2.HealthCheckRequest(service=""),
                                    self.deadlines.control)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def list_devices(self, *, deadline: float | None = None) -> list[DeviceStatus]:
        """The host's claim about each card; values outside the protocol come back
        as DeviceState.UNDEFINED (for the caller to count), never as an exception."""
        response = await self._call("list devices", self._runtime.ListDevices,
                                    runtime_pb2.ListDevicesRequest(),
                                    deadline or self.deadlines.control)
        if len(response.devices) > MAX_CARDS_PER_HOST:
            raise ProtocolViolation(f"host {self.address}", f"lists {len(response.devices)} "
                                    f"cards, more than a host may have ({MAX_CARDS_PER_HOST})")
        return [DeviceStatus(d.device, terminal_safe(d.card_id, 256),
                             _DEVICE_STATES.get(d.state, DeviceState.UNDEFINED), d.boot_counter,
                             d.session_fingerprint[:32].hex(), terminal_safe(d.program_id, 128),
                             d.partition,
                             d.program_ready, d.session_id[:64].hex(),
                             terminal_safe(d.claimed_by, 128))
                for d in response.devices]

    async def watch_events(self) -> AsyncIterator[DeviceEvent]:
        """Stream host events until the host or the caller ends it (no deadline: a stream)."""
        if self.gate is not None:
            self.gate()
        batched = "watch" not in self._card_by_card
        call = (self._runtime.WatchEventBatches if batched else self._runtime.WatchEvents)(
            runtime_pb2.WatchEventsRequest(), metadata=self._metadata)
        try:
            async for message in call:
                for event in message.events if batched else (message,):
                    yield DeviceEvent(event.device,
                                      _EVENT_KINDS.get(event.kind, EventKind.UNDEFINED),
                                      event.boot_counter, event.time_ns)
        except grpc.aio.AioRpcError as err:
            if batched and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._card_by_card.add("watch")   # a host without it: event by event
                async for event in self.watch_events():
                    yield event
                return
            raise translate(err, self.address, "watch events") from err
        finally:
            call.cancel()

    async def reset(self, device: int) -> None:
        await self._call(f"reset device {device}", self._runtime.ResetDevice,
                         runtime_pb2.DeviceRef(device=device), self.deadlines.control,
                         device=device)

    async def unload(self, device: int) -> None:
        await self._call(f"unload device {device}", self._runtime.Unload,
                         runtime_pb2.DeviceRef(device=device), self.deadlines.control,
                         device=device)

    async def stats(self) -> dict[str, int]:
        response = await self._call("host stats", self._runtime.HostStats,
                                    runtime_pb2.HostStatsRequest(), self.deadlines.control)
        return {"stage_count": response.stage_count, "load_count": response.load_count,
                "staged_programs": response.staged_programs,
                "fenced_refusals": response.fenced_refusals,
                "claimed_refusals": response.claimed_refusals, "takeovers": response.takeovers}

    # --- programs -------------------------------------------------------------------

    async def stage(self, path: str | os.PathLike[str], *, program_id: str | None = None
                    ) -> tuple[str, bool]:
        """Upload an encrypted program (content addressed); (program id, was already there)."""
        source = Path(path)
        try:
            size = (await anyio.to_thread.run_sync(source.stat)).st_size
        except OSError:
            raise FileInputError(source, "encrypted program not found") from None
        if program_id is None:
            program_id = await anyio.to_thread.run_sync(program_digest, source)
        announced = program_id

        async def chunks() -> AsyncIterator[runtime_pb2.StageChunk]:
            handle = await anyio.open_file(source, "rb")
            async with handle:
                yield runtime_pb2.StageChunk(program_id=announced, total_size=size,
                                             data=await handle.read(STAGE_CHUNK))
                while data := await handle.read(STAGE_CHUNK):
                    yield runtime_pb2.StageChunk(data=data)

        try:
            response = await _finish(self._runtime.StageProgram(
                chunks(), timeout=self._allowed(self.deadlines.stage),
                metadata=self._metadata))
        except grpc.aio.AioRpcError as err:
            raise translate(err, self.address, "stage program") from err
        return terminal_safe(response.program_id, 128), bool(response.already_staged)

    async def load(self, device: int, program_id: str, *, partition: int = 0,
                   key_slots: Sequence[KeySlot] | None = None) -> LoadResult:
        """Have the card open its slot, decrypt and verify the program (check the
        receipt!). Answered once the body is verified in card memory. Sent in one call
        with the other loads of its batch window (LOAD_WINDOW)."""
        request = runtime_pb2.LoadProgramRequest(device=device, program_id=program_id,
                                                 partition=partition)
        if key_slots is not None:
            request.key_slots.ParseFromString(encode_key_slots(key_slots))
        return await self._loads.submit(request)

    async def _load_one(self, request: runtime_pb2.LoadProgramRequest) -> LoadResult:
        response = await self._call(f"load device {request.device}",
                                    self._runtime.LoadProgram, request, self.deadlines.load,
                                    device=request.device)
        return _loaded(response)

    async def _load_together(self, asked: Sequence[runtime_pb2.LoadProgramRequest]
                             ) -> list[LoadResult | BaseException]:
        return await self._together(
            "load", asked, self._load_one,
            lambda: self._runtime.LoadPrograms(
                runtime_pb2.LoadProgramBatchRequest(requests=asked),
                timeout=self._allowed(self.deadlines.load), metadata=self._metadata),
            lambda result: _loaded(result.loaded) if result.WhichOneof("result") == "loaded"
            else None)

    async def execute(self, devices: Sequence[int], inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one card, or an MDP group in partition order, on named numpy arrays."""
        request = runtime_pb2.ExecuteRequest(devices=list(devices), inputs=to_wire(inputs))
        response = await self._call(f"execute on devices {list(devices)}",
                                    self._execute, request, self.deadlines.execute)
        try:
            return {terminal_safe(name, 256): value
                    for name, value in from_wire(response.outputs).items()}
        except FormatError as err:  # the host's answer, not the caller's input
            raise ProtocolViolation(f"host {self.address}",
                                    f"answered execute with a malformed output: {err}") from None


def _loaded(response: runtime_pb2.LoadProgramResponse) -> LoadResult:
    """A card's answer to its load, as the engine takes it (host text made inert)."""
    return LoadResult([terminal_safe(name, 255) for name in response.segments[:MAX_SEGMENTS]],
                      response.receipt, response.receipt_signature,
                      terminal_safe(response.taken_from, 128))


def program_digest(path: str | os.PathLike[str]) -> str:
    """The content address of a program: hex SHA-256 of the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(8 << 20):
            digest.update(piece)
    return digest.hexdigest()
