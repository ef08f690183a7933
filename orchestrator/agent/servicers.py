"""A host agent's gRPC servicers: messages in, HostAgent calls, messages out.

Every unary handler goes through ``_answers``: whatever fails becomes a status
with a reason (our errors by kind; anything else INTERNAL with a fixed text, its
traceback kept in this process's log).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
import grpc
from anyio.abc import TaskStatus
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from orchestrator._proto.modelip.v1 import evidence_pb2, runtime_pb2, runtime_pb2_grpc
from orchestrator.agent.aborts import HostAbort, status_for
from orchestrator.agent.host import HostAgent
from orchestrator.errors import ModelIPError, UsageError
from orchestrator.tensors import from_wire, to_wire
from orchestrator.transport.types import DEVICE_KEY, MAX_MESSAGE, REASON_KEY

R = runtime_pb2
MAX_BATCH = 256  # requests in one batched call
# what a host serves (gRPC server reflection lists them, with itself)
SERVICES = (*(service.full_name for service in runtime_pb2.DESCRIPTOR.services_by_name.values()),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
_log = logging.getLogger("modelip.agent")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: HostAbort) -> None:
    metadata = [(REASON_KEY, runtime_pb2.ErrorReason.Name(error.reason))]
    if error.device is not None:
        metadata.append((DEVICE_KEY, str(error.device)))
    await context.abort(error.code, str(error), trailing_metadata=tuple(metadata))


_Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
# the calls that change a card: fenced (agent/fencing.py)
_CHANGES = frozenset({"ResetDevice", "StageProgram", "LoadProgram", "LoadPrograms", "Unload"})


def failure(exc: Exception, device: int | None, what: str) -> HostAbort:
    """What a call (or one card of a batch) fails with: our errors by kind, anything
    else INTERNAL with a fixed text (the traceback stays in this process's log)."""
    if isinstance(exc, HostAbort):
        return exc
    if isinstance(exc, ModelIPError):
        return status_for(exc, device)
    _log.error("%s failed", what, exc_info=exc)
    return HostAbort.of(R.ERROR_REASON_INTERNAL, "internal error on the host agent")


def _answers(method: _Handler) -> _Handler:
    """A unary handler whose every failure is a status with a reason: our errors by
    kind, anything else INTERNAL with a fixed text (the traceback stays in this
    process's log; nothing of a library's internals goes to the client)."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> Any:
        device = getattr(request, "device", None)
        try:
            self.host.fences.admit(context.invocation_metadata(),
                                   changes=method.__name__ in _CHANGES)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered with a status
            await _abort(context, failure(exc, device if isinstance(device, int) else None,
                                          method.__name__))

    return handler


class _OnHost:
    """A servicer answering for one host agent."""

    def __init__(self, host: HostAgent[Any]) -> None:
        self.host = host


class Attestation(_OnHost, runtime_pb2_grpc.RemoteAttestationServicer):  # type: ignore[misc]

    @_answers
    async def GetAttestationReport(self, request: runtime_pb2.AttestationRequest,  # noqa: N802
                                   context: grpc.aio.ServicerContext[Any, Any]
                                   ) -> evidence_pb2.AttestationEvidence:
        return await self.host.attest(request.device, request.request)

    @_answers
    async def GetAttestationReports(self, request: runtime_pb2.AttestationBatchRequest,  # noqa: N802
                                    context: grpc.aio.ServicerContext[Any, Any]
                                    ) -> runtime_pb2.AttestationBatchResponse:
        response = runtime_pb2.AttestationBatchResponse()

        async def one(asked: runtime_pb2.AttestationRequest,
                      result: runtime_pb2.AttestationResult) -> None:
            evidence = await self.host.attest(asked.device, asked.request)
            result.evidence = evidence.SerializeToString(deterministic=True)

        await each_card(request.requests, response.results, one, "GetAttestationReports")
        return response


async def each_card(requests: Sequence[Any], results: Any,
                    one: Callable[[Any, Any], Awaitable[None]], what: str) -> None:
    """A batched call's cards, at once: ``one(request, result)`` fills each card's
    result, and a card's failure becomes its own ``CardError`` (what the same
    request alone would have failed with); the answers in the order asked."""
    if len(requests) > MAX_BATCH:
        raise HostAbort.of(R.ERROR_REASON_FORMAT, f"{len(requests)} requests in "
                           f"one call; at most {MAX_BATCH}")
    answers = [results.add() for _ in requests]

    async def guarded(asked: Any, result: Any) -> None:
        try:
            await one(asked, result)
        except Exception as exc:  # noqa: BLE001 - each card's failure is its own answer
            abort = failure(exc, asked.device, what)
            result.Clear()
            result.error.status = abort.code.value[0]
            result.error.reason = cast(runtime_pb2.ErrorReason, abort.reason)
            result.error.message = str(abort)

    async with anyio.create_task_group() as tg:
        for asked, result in zip(requests, answers, strict=True):
            tg.start_soon(guarded, asked, result)


class Runtime(_OnHost, runtime_pb2_grpc.DeviceRuntimeServicer):  # type: ignore[misc]

    @_answers
    async def ListDevices(self, request: runtime_pb2.ListDevicesRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> runtime_pb2.ListDevicesResponse:
        return runtime_pb2.ListDevicesResponse(devices=await self.host.devices())

    async def WatchEvents(self, request: runtime_pb2.WatchEventsRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> AsyncIterator[runtime_pb2.DeviceEvent]:
        async for queued in self.host.events():
            for event in queued:
                yield event

    async def WatchEventBatches(self, request: runtime_pb2.WatchEventsRequest,  # noqa: N802
                                context: grpc.aio.ServicerContext[Any, Any]
                                ) -> AsyncIterator[runtime_pb2.DeviceEventBatch]:
        async for queued in self.host.events(MAX_BATCH):
            yield runtime_pb2.DeviceEventBatch(events=queued)

    @_answers
    async def ResetDevice(self, request: runtime_pb2.DeviceRef,  # noqa: N802
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> runtime_pb2.ResetDeviceResponse:
        claim = self.host.claims.admit(context.invocation_metadata(), request.device)
        await self.host.reset(request.device)
        return runtime_pb2.ResetDeviceResponse(
            taken_from=self.host.claims.settle(claim, "ResetDevice"))

    @_answers
    async def StageProgram(self, request_iterator: AsyncIterator[runtime_pb2.StageChunk],  # noqa: N802
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> runtime_pb2.StageProgramResponse:
        return await self.host.stage(request_iterator)

    @_answers
    async def LoadProgram(self, request: runtime_pb2.LoadProgramRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> runtime_pb2.LoadProgramResponse:
        return await self._load(request, context)

    @_answers
    async def LoadPrograms(self, request: runtime_pb2.LoadProgramBatchRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> runtime_pb2.LoadProgramBatchResponse:
        response = runtime_pb2.LoadProgramBatchResponse()

        async def one(asked: runtime_pb2.LoadProgramRequest,
                      result: runtime_pb2.LoadProgramResult) -> None:
            result.loaded.CopyFrom(await self._load(asked, context))

        await each_card(request.requests, response.results, one, "LoadPrograms")
        return response

    async def _load(self, request: runtime_pb2.LoadProgramRequest,
                    context: grpc.aio.ServicerContext[Any, Any]
                    ) -> runtime_pb2.LoadProgramResponse:
        """One card's load, its claim checked (docs/protocol.md "Claims")."""
        slots = request.key_slots if request.HasField("key_slots") else None
        claim = self.host.claims.admit(context.invocation_metadata(), request.device)
        answer = await self.host.load(request.device, request.program_id, request.partition,
                                      slots)
        answer.taken_from = self.host.claims.settle(claim, "LoadProgram")
        return answer

    @_answers
    async def Execute(self, request: runtime_pb2.ExecuteRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[Any, Any]) -> runtime_pb2.ExecuteResponse:
        outputs = await self.host.execute(list(request.devices), from_wire(request.inputs))
        return runtime_pb2.ExecuteResponse(outputs=to_wire(outputs))

    @_answers
    async def Unload(self, request: runtime_pb2.DeviceRef,  # noqa: N802
                     context: grpc.aio.ServicerContext[Any, Any]) -> runtime_pb2.UnloadResponse:
        claim = self.host.claims.admit(context.invocation_metadata(), request.device)
        await self.host.unload(request.device)
        self.host.claims.settle(claim, "Unload")
        return runtime_pb2.UnloadResponse()

    @_answers
    async def HostStats(self, request: runtime_pb2.HostStatsRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext[Any, Any]
                        ) -> runtime_pb2.HostStatsResponse:
        stats = self.host.stats
        return runtime_pb2.HostStatsResponse(stage_count=stats.stage_count,
                                             load_count=stats.load_count,
                                             staged_programs=len(self.host.staging),
                                             fenced_refusals=self.host.fences.refusals,
                                             claimed_refusals=self.host.claims.refusals,
                                             takeovers=self.host.claims.takeovers)


@dataclass(frozen=True, slots=True)
class TLSServerConfig:
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None  # set: clients must present a cert (mTLS)


async def serve(host: HostAgent[Any], *, bind: str = "127.0.0.1", port: int = 0,
                tls: TLSServerConfig | None = None, grace: float = 1.0,
                task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``host`` over gRPC: listen, report the address through ``task_status``,
    serve (the host living its own life meanwhile) until cancelled."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.so_reuseport", 0)])
    runtime_pb2_grpc.add_RemoteAttestationServicer_to_server(Attestation(host), server)
    runtime_pb2_grpc.add_DeviceRuntimeServicer_to_server(Runtime(host), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*SERVICES, reflection.SERVICE_NAME), server)
    target = f"{bind}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(target)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key_pem, tls.cert_pem)], root_certificates=tls.client_ca_pem,
                require_client_auth=tls.client_ca_pem is not None)
            bound = server.add_secure_port(target, credentials)
    except RuntimeError:  # grpc's way of saying the address cannot be bound
        bound = 0
    if bound == 0:
        raise UsageError(f"cannot listen on {target}: the port is in use, or "
                         f"{bind!r} is not an address of this machine")
    host.address = f"{bind}:{bound}"
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(host.live)
            task_status.started(host.address)
    finally:
        with anyio.CancelScope(shield=True):
            await health.enter_graceful_shutdown()
            await server.stop(grace)
