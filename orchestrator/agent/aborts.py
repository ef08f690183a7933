"""How a host fails a call (docs/protocol.md "Errors"): a gRPC status, the protocol's
shared ErrorReason and the card concerned. One table from reason to status serves the
agent's own refusals, a card's errors and an exec backend's answers alike."""

from __future__ import annotations

import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.errors import (
    CardOffline,
    FormatError,
    IntegrityError,
    ModelIPError,
    PolicyError,
    ProgramNotLoaded,
    SessionInvalidError,
)

R = runtime_pb2
C = grpc.StatusCode

CODES: dict[int, grpc.StatusCode] = {
    R.ERROR_REASON_SESSION_INVALID: C.FAILED_PRECONDITION,
    R.ERROR_REASON_INTEGRITY: C.DATA_LOSS,
    R.ERROR_REASON_POLICY: C.PERMISSION_DENIED,
    R.ERROR_REASON_NOT_LOADED: C.FAILED_PRECONDITION,
    R.ERROR_REASON_OFFLINE: C.UNAVAILABLE,
    R.ERROR_REASON_UNKNOWN_DEVICE: C.NOT_FOUND,
    R.ERROR_REASON_UNKNOWN_PROGRAM: C.NOT_FOUND,
    R.ERROR_REASON_FORMAT: C.INVALID_ARGUMENT,
    R.ERROR_REASON_INTERNAL: C.INTERNAL,
    R.ERROR_REASON_FENCED: C.FAILED_PRECONDITION,
    R.ERROR_REASON_CLAIMED: C.FAILED_PRECONDITION,
}


class HostAbort(Exception):
    """A call's failure: gRPC status, the shared ErrorReason, the card concerned."""

    def __init__(self, code: grpc.StatusCode, reason: int, message: str,
                 device: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.device = device

    @classmethod
    def of(cls, reason: int, message: str, device: int | None = None) -> HostAbort:
        """The failure ``reason`` with its status from the protocol's table."""
        return cls(CODES.get(reason, C.INTERNAL), reason, message, device)


_BY_KIND: tuple[tuple[type[ModelIPError], int], ...] = (
    (SessionInvalidError, R.ERROR_REASON_SESSION_INVALID),
    (IntegrityError, R.ERROR_REASON_INTEGRITY),
    (PolicyError, R.ERROR_REASON_POLICY),
    (ProgramNotLoaded, R.ERROR_REASON_NOT_LOADED),
    (CardOffline, R.ERROR_REASON_OFFLINE),
    (FormatError, R.ERROR_REASON_FORMAT),
)


def status_for(err: ModelIPError, device: int | None = None) -> HostAbort:
    """Our errors -> a gRPC status plus a machine-readable reason (docs/protocol.md)."""
    reason = next((r for kind, r in _BY_KIND if isinstance(err, kind)),
                  R.ERROR_REASON_INTERNAL)
    return HostAbort.of(reason, str(err), device)
