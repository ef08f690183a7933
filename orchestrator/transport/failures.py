"""How a host call fails, as modelip exceptions (docs/protocol.md "Errors"): a gRPC
status with the reason and the card in its trailing metadata, or one card's CardError
inside a batch. The one place where these become our exceptions."""

from __future__ import annotations

import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.errors import (
    ClaimedError,
    DeadlineError,
    DeviceOffline,
    FormatError,
    IntegrityError,
    LeaseLost,
    ModelIPError,
    NotFoundError,
    PolicyError,
    ProgramNotLoaded,
    ProgramNotStaged,
    RemoteError,
    SessionInvalidError,
    UnreachableError,
)
from orchestrator.terminal import terminal_safe
from orchestrator.transport.types import (
    DEVICE_KEY,
    REASON_KEY,
)

_BY_REASON: dict[int, type[ModelIPError]] = {
    runtime_pb2.ERROR_REASON_SESSION_INVALID: SessionInvalidError,
    runtime_pb2.ERROR_REASON_INTEGRITY: IntegrityError,
    runtime_pb2.ERROR_REASON_POLICY: PolicyError,
    runtime_pb2.ERROR_REASON_NOT_LOADED: ProgramNotLoaded,
    runtime_pb2.ERROR_REASON_UNKNOWN_PROGRAM: ProgramNotStaged,
}


def _reason_of(err: grpc.aio.AioRpcError) -> tuple[int, int | None]:
    """(ErrorReason, device) from the trailing metadata; unknown values count as none."""
    reason: int = runtime_pb2.ERROR_REASON_UNSPECIFIED
    device: int | None = None
    for key, value in err.trailing_metadata() or ():
        if key == REASON_KEY:
            try:
                reason = runtime_pb2.ErrorReason.Value(str(value))
            except ValueError:
                reason = runtime_pb2.ERROR_REASON_UNSPECIFIED
        elif key == DEVICE_KEY and str(value).isdigit() and len(str(value)) < 10:
            device = int(str(value))
    return reason, device


def translate(err: grpc.aio.AioRpcError, target: str, what: str) -> ModelIPError:
    """The one place where gRPC failures become our exceptions (LeaseLost, raised, if
    the host refused the caller's fencing epoch)."""
    reason, device = _reason_of(err)
    return _error(err.code(), reason, err.details() or err.code().name, target, what, device)


_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def card_error(error: runtime_pb2.CardError, target: str, what: str, device: int
                ) -> ModelIPError:
    """One card's failure inside a batch, as the same call alone would have failed."""
    code = _STATUS.get(error.status, grpc.StatusCode.UNKNOWN)
    reason = error.reason if error.reason in runtime_pb2.ErrorReason.values() else \
        runtime_pb2.ERROR_REASON_UNSPECIFIED
    return _error(code, reason, error.message or code.name, target, what, device)


def _error(code: grpc.StatusCode, reason: int, said: str, target: str, what: str,
           device: int | None) -> ModelIPError:
    details = terminal_safe(said)  # host text: bounded, inert
    result: ModelIPError
    if reason in _BY_REASON:
        result = _BY_REASON[reason](f"{target}: {what}: {details}")
    elif reason == runtime_pb2.ERROR_REASON_FENCED:
        # a newer holder of this host's lease has called it: ours is over
        raise LeaseLost(target, f"the host refused our fencing epoch ({what}): {details}")
    elif reason == runtime_pb2.ERROR_REASON_CLAIMED:
        result = ClaimedError(f"{target}: {what}: {details} (another fleet holds it: "
                              "`--take-over` takes it, on purpose)")
    elif reason == runtime_pb2.ERROR_REASON_OFFLINE:
        result = DeviceOffline(target, f"{what}: {details}")
    elif reason == runtime_pb2.ERROR_REASON_UNKNOWN_DEVICE or code == grpc.StatusCode.NOT_FOUND:
        result = NotFoundError(f"{target}: {details}")
    elif reason == runtime_pb2.ERROR_REASON_FORMAT or code == grpc.StatusCode.INVALID_ARGUMENT:
        result = FormatError(f"{target}: {what}", details)
    elif code == grpc.StatusCode.UNAVAILABLE:
        result = UnreachableError(target, f"{what}: host unreachable ({_why_unreachable(details)})")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        result = DeadlineError(target, f"{what}: no answer within the deadline")
    else:
        result = RemoteError(target, f"{what}: {code.name}: {details}")
    return result.located(host=target, device=device)


_UNREACHABLE = (("Connection refused", "connection refused"),
                ("No route to host", "no route to host"),
                ("Network is unreachable", "network unreachable"),
                ("Connection reset", "connection reset"),
                ("DNS resolution failed", "name not found"),
                ("Socket closed", "connection closed"),
                ("handshake", "TLS handshake failed"))


def _why_unreachable(details: str) -> str:
    """gRPC's own words, shortened to the cause ("failed to connect to all addresses;
    last error: UNKNOWN: ipv4:10.0.0.1:62473: Failed to connect to remote host:
    Connection refused" says the address twice and the cause once)."""
    for needle, said in _UNREACHABLE:
        if needle.lower() in details.lower():
            return said
    return details
