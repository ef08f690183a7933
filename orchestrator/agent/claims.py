"""A host's side of claims (docs/protocol.md "Claims"): which fleet holds each card.

Two fleets (two stores, two state directories) that both name a card would otherwise
take turns loading it, each over the other's program. The host is where both meet,
so the host keeps the claim: the fleet whose load it last answered holds the card;
a load, reset or unload from another fleet is refused with ERROR_REASON_CLAIMED,
unless that call says it takes the card over on purpose (then the host logs it,
counts it, and names the fleet it was taken from). The holder's unload releases
the card. Calls that name no fleet (the reference tool, an operator's own `modelip
device reset`) are not checked, as calls without a fencing token are not fenced.

Claims are kept in the agent's memory, as fencing epochs are: a restarted agent
knows no claim until the next load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.agent.aborts import HostAbort
from orchestrator.transport.types import CLAIM_KEY, TAKE_OVER_KEY

_FLEET = re.compile(r"[\x21-\x7e]{1,128}")
_log = logging.getLogger("modelip.agent")


@dataclass(frozen=True, slots=True)
class Claim:
    fleet: str          # the calling fleet
    device: int
    taken_from: str     # the fleet that held the card, if the call takes it over


class ClaimKeeper:
    def __init__(self, host: str) -> None:
        self.host = host
        self.holders: dict[int, str] = {}   # device -> the fleet holding it
        self.refusals = 0
        self.takeovers = 0

    def admit(self, metadata: Iterable[tuple[str, str | bytes]] | None, device: int
              ) -> Claim | None:
        """Check a call that changes ``device`` (load, reset, unload): None if it names no
        fleet; HostAbort(ERROR_REASON_CLAIMED) if another fleet holds the card and the
        call does not take it over; else the claim, to ``settle`` once the call is done."""
        fleet, take_over = _claim(metadata)
        if fleet is None:
            return None
        holder = self.holders.get(device, "")
        if holder and holder != fleet and not take_over:
            self.refusals += 1
            raise HostAbort.of(runtime_pb2.ERROR_REASON_CLAIMED,
                               f"card {device} is held by fleet {holder}, not {fleet}", device)
        return Claim(fleet, device, holder if holder != fleet else "")

    def settle(self, claim: Claim | None, call: str) -> str:
        """The call was answered: a load (or a take-over) makes its fleet the holder, the
        holder's unload frees the card. Returns the fleet the card was taken from."""
        if claim is None:
            return ""
        if claim.taken_from:
            self.takeovers += 1
            _log.warning("host %s: card %d taken over by fleet %s from fleet %s (%s)",
                         self.host, claim.device, claim.fleet, claim.taken_from, call)
        if call == "Unload":
            self.holders.pop(claim.device, None)   # drained: free for any fleet
        elif call == "LoadProgram" or claim.taken_from:
            self.holders[claim.device] = claim.fleet
        return claim.taken_from

    def holder(self, device: int) -> str:
        return self.holders.get(device, "")


def _claim(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, bool]:
    fleet: str | None = None
    take_over = False
    for key, value in metadata or ():
        if key == CLAIM_KEY:
            if _FLEET.fullmatch(str(value)) is None:
                raise HostAbort(grpc.StatusCode.INVALID_ARGUMENT,
                                runtime_pb2.ERROR_REASON_FORMAT,
                                f"{CLAIM_KEY}: 1 to 128 printable characters, no spaces")
            fleet = str(value)
        elif key == TAKE_OVER_KEY:
            take_over = str(value) == "1"
    return fleet, take_over


__all__ = ["ClaimKeeper"]
