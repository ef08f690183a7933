"""Keying a card (docs/protocol.md), with no state and no moves: one fresh attestation
verified against the plan's roots and policy; what the verified report says of the
card; the MEK wrapped to the card's session, bound to card, session, slot and
program; the card's load receipt verified against the report and the slot. The
card driver (engine/card.py) decides and moves."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator.crypto.evidence import VerifiedReport, verify_evidence, verify_load_receipt
from orchestrator.crypto.wrap import KeySlot, key_slot_digest, wrap_mek
from orchestrator.engine.decide import Seen
from orchestrator.engine.state import CardMachine, KnownGood
from orchestrator.errors import AttestationError, DeviceOffline, InputError

if TYPE_CHECKING:
    from orchestrator._proto.modelip.v1 import evidence_pb2
    from orchestrator.engine.context import EngineContext
    from orchestrator.engine.hostapi import HostAPI
    from orchestrator.engine.prepare import PreparedProgram
    from orchestrator.transport.types import LoadResult


async def attest(ctx: EngineContext, client: HostAPI, machine: CardMachine,
                 deployment: str = "") -> VerifiedReport:
    """The card's evidence for a fresh request, verified (against ``deployment``'s trust
    policy). Malformed evidence from a host is an attestation failure
    (AttestationError), not bad input."""
    request = os.urandom(32)
    try:
        evidence = await client.attest(machine.device, request)
    except DeviceOffline:
        ctx.stats.found_rebooting += 1
        raise
    ctx.stats.attestations += 1
    try:
        return verify_evidence(evidence, roots=ctx.roots, policy=ctx.policy_for(deployment),
                               request=request,
                               source=machine.name, cache=ctx.chains)
    except InputError as err:
        raise AttestationError(str(err)).located(host=machine.host,
                                                 device=machine.device) from None


def holds(report: VerifiedReport, program: PreparedProgram, partition: int) -> bool:
    """Does the card's own signed report say it holds ``program``, verified, as this
    partition? (Only the MEK's holder can have made the slot that opens it.)"""
    held = report.loaded
    return held is not None and held.info_digest == program.info_digest \
        and held.partition == partition


def seen_in(report: VerifiedReport, machine: CardMachine, program: PreparedProgram,
            digests: frozenset[bytes]) -> tuple[Seen, str]:
    """What a verified report of a serving card shows (``digests``: every version this
    fleet serves), and what to say about it."""
    if report.session_id != machine.session_id:
        return Seen.NEW_SESSION, f"new session (boot {report.boot_counter})"
    if holds(report, program, machine.partition):
        return Seen.OURS, ""
    if report.loaded is None:
        return Seen.NOTHING, "the card no longer holds the program (same session)"
    if report.loaded.info_digest in digests:
        return Seen.OTHER_VERSION, f"switching to version {program.version}"
    return Seen.FOREIGN, (f"runs another program: {report.loaded.describe()} "
                          "(its own signed report)")


def other_domain(ctx: EngineContext, report: VerifiedReport, program: PreparedProgram
                 ) -> str | None:
    """With deployments (docs/deployments.md "Handover"): what the card holds, if it is
    sealed under another MEK than ``program`` (another deployment's, or one this run
    does not know); the card is then reset before ``program``'s key is wrapped to its
    session, so no slot of the other key domain can ever open on it again."""
    if not ctx.keys or report.loaded is None:
        return None
    mine = ctx.key_for(program.program_id)
    for known in ctx.programs.values():
        if known.info_digest == report.loaded.info_digest:
            if ctx.key_for(known.program_id) is mine:
                return None
            return f"{known.model_id or 'a model'} version {known.version} (program " \
                   f"{known.program_id[:16]})"
    return report.loaded.describe()


def adopt(machine: CardMachine, report: VerifiedReport) -> None:
    """The card, as its verified report says it is now."""
    machine.card_id = report.card_id
    machine.boot_counter = report.boot_counter
    machine.session_id = report.session_id
    machine.session_fingerprint = report.session_fingerprint


def verified_good(report: VerifiedReport, program: PreparedProgram, partition: int
               ) -> KnownGood:
    return KnownGood(report.card_id, report.session_id.hex(), program.program_id, partition)


def slot_for(ctx: EngineContext, report: VerifiedReport, program: PreparedProgram,
             partition: int) -> KeySlot:
    """The MEK wrapped to the reported session, for ``program`` as ``partition``."""
    return wrap_mek(ctx.key_for(program.program_id), slot=partition, card_id=report.card_id,
                    session_id=report.session_id, kem=report.kem,
                    public_key=report.session_public_key, program=program.info_digest)


def receipt_of(result: LoadResult, report: VerifiedReport, program: PreparedProgram,
               partition: int, slot: KeySlot, source: str) -> evidence_pb2.LoadReceipt:
    """The card's signed receipt for the load of ``slot``, verified (ReceiptError...)."""
    return verify_load_receipt(result.receipt, result.receipt_signature, report=report,
                               program_info_digest=program.info_digest, partition=partition,
                               source=source, key_slot=key_slot_digest(slot))


__all__ = ["adopt", "attest", "holds", "other_domain", "receipt_of", "seen_in", "slot_for",
           "verified_good"]
