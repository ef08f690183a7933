"""How an emulated host fails a call: our errors as a gRPC status, the protocol's shared
ErrorReason and the card concerned (docs/protocol.md)."""

from __future__ import annotations

import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.emulator.card import CardOffline
from orchestrator.errors import (
    FormatError,
    IntegrityError,
    ModelIPError,
    PolicyError,
    ProgramNotLoaded,
    SessionInvalidError,
)

R = runtime_pb2


class HostAbort(Exception):
    """A call's failure: gRPC status, the shared ErrorReason, the card concerned."""

    def __init__(self, code: grpc.StatusCode, reason: int, message: str,
                 device: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.device = device


def status_for(err: ModelIPError, device: int | None = None) -> HostAbort:
    """Our errors -> a gRPC status plus a machine-readable reason (docs/protocol.md)."""
    abort = _classify(err)
    abort.device = device
    return abort


def _classify(err: ModelIPError) -> HostAbort:
    if isinstance(err, SessionInvalidError):
        return HostAbort(grpc.StatusCode.FAILED_PRECONDITION, R.ERROR_REASON_SESSION_INVALID,
                         str(err))
    if isinstance(err, IntegrityError):
        return HostAbort(grpc.StatusCode.DATA_LOSS, R.ERROR_REASON_INTEGRITY, str(err))
    if isinstance(err, PolicyError):
        return HostAbort(grpc.StatusCode.PERMISSION_DENIED, R.ERROR_REASON_POLICY, str(err))
    if isinstance(err, ProgramNotLoaded):
        return HostAbort(grpc.StatusCode.FAILED_PRECONDITION, R.ERROR_REASON_NOT_LOADED, str(err))
    if isinstance(err, CardOffline):
        return HostAbort(grpc.StatusCode.UNAVAILABLE, R.ERROR_REASON_OFFLINE, str(err))
    if isinstance(err, FormatError):
        return HostAbort(grpc.StatusCode.INVALID_ARGUMENT, R.ERROR_REASON_FORMAT, str(err))
    return HostAbort(grpc.StatusCode.INTERNAL, R.ERROR_REASON_INTERNAL, str(err))
