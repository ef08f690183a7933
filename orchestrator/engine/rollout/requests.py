"""An operator's request to a running rollout (pause, resume, undo, approve), written into the
journal for the orchestrator running the plan to carry out (docs/rollouts.md): from
`modelip rollout` on the plan's machine, or through the control API (docs/api.md)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.engine.rollout.ledger import Ledger, Phase, RolloutRecord
from orchestrator.errors import UsageError

ACTIONS = ("pause", "resume", "undo", "approve")


@dataclass(frozen=True, slots=True)
class Requested:
    rollout: int
    written: bool       # False: the rollout was already so (nothing written)
    said: str


async def request(ledger: Ledger, action: str, who: str) -> Requested:
    """Write ``action`` for the rollout in progress, in ``who``'s name. UsageError if
    there is none, or if it cannot be done (an undo while committing)."""
    record = await ledger.active()
    if record is None:
        last = await ledger.latest()
        raise UsageError("no rollout in progress" +
                         (f" (the last one was {last.phase.value})" if last else ""))
    if action == "undo":
        if record.phase is Phase.COMMITTING:
            raise UsageError(f"rollout {record.id} is committing: cards are taking on the "
                             "raised rollback floor, there is no way back")
        if record.phase is Phase.ROLLING_BACK or record.undo:
            return Requested(record.id, False, f"rollout {record.id}: already rolling back")
        await ledger.request(record, undo=True, what=f"undo requested by {who}")
    elif action == "approve":
        return await _approve(ledger, record, who)
    elif (action == "pause") == record.paused:
        return Requested(record.id, False, f"rollout {record.id}: already "
                         f"{'paused' if record.paused else 'running'}")
    else:
        await ledger.request(record, paused=action == "pause",
                             what=f"{action} requested by {who}")
    return Requested(record.id, True, f"rollout {record.id}: {action} requested")


async def _approve(ledger: Ledger, record: RolloutRecord, who: str) -> Requested:
    """Approve the next wave that waits for an approval (docs/rollouts.md "Approvals"):
    the wave being gated's successor, or the one being switched if it still waits."""
    if record.phase not in (Phase.SWITCHING, Phase.GATING) or record.undo:
        raise UsageError(f"rollout {record.id} is {record.phase.value}"
                         f"{' (undo requested)' if record.undo else ''}: no wave to approve")
    waiting = [w for w in record.manual if w > record.approved and w >= record.wave]
    if not waiting:
        raise UsageError(f"rollout {record.id}: no wave waits for an approval (its steps "
                         "have no `approval: manual`, or they are approved)")
    wave = waiting[0]
    await ledger.request(record, approved=wave,
                         what=f"wave {wave + 1} approved by {who}")
    return Requested(record.id, True, f"rollout {record.id}: wave {wave + 1} of "
                     f"{len(record.waves)} approved")
