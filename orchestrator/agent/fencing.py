"""A host's side of fencing (docs/protocol.md "Fencing"): the highest lease epoch its
callers have shown; a call that changes a card under an older one is refused, so a
replica whose lease has lapsed cannot reach a card even if its own clock or gate
misjudges. Kept per host, as leases are."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.agent.aborts import HostAbort
from orchestrator.transport.types import FENCE_KEY

_TOKEN = re.compile(r"(\d{1,19}):([\x21-\x7e]{1,255})")
_log = logging.getLogger("modelip.agent")


class FenceKeeper:
    def __init__(self, host: str) -> None:
        self.host = host
        self.epoch = 0        # the highest epoch seen, and its holder
        self.holder = ""
        self.refusals = 0

    def admit(self, metadata: Iterable[tuple[str, str | bytes]] | None, *, changes: bool
              ) -> None:
        """Check a call's fencing token (absent: not fenced). A token at or above the
        highest seen raises it; below it (or the same epoch from another holder), a
        call that ``changes`` a card is refused with ERROR_REASON_FENCED."""
        token = _token(metadata)
        if token is None:
            return
        epoch, holder = token
        if epoch > self.epoch or (epoch == self.epoch and holder == self.holder):
            self.epoch, self.holder = epoch, holder
            return
        if epoch == self.epoch and not self.holder:
            self.holder = holder
            return
        if changes:
            self.refusals += 1
            _log.warning("host %s: refused a change by %s under fencing epoch %d (the "
                         "highest seen is %d, of %s)", self.host, holder, epoch, self.epoch,
                         self.holder)
            raise HostAbort(grpc.StatusCode.FAILED_PRECONDITION,
                            runtime_pb2.ERROR_REASON_FENCED,
                            f"fencing epoch {epoch} of {holder} is below the highest this "
                            f"host has seen ({self.epoch}, of {self.holder})")


def _token(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[int, str] | None:
    for key, value in metadata or ():
        if key == FENCE_KEY:
            found = _TOKEN.fullmatch(str(value))
            if found is None:
                raise HostAbort(grpc.StatusCode.INVALID_ARGUMENT,
                                runtime_pb2.ERROR_REASON_FORMAT,
                                f"{FENCE_KEY}: not EPOCH:HOLDER")
            return int(found.group(1)), found.group(2)
    return None


__all__ = ["FenceKeeper"]
