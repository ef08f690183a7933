"""The rollout ledger of a store: the embedded journal's, or the shared store's."""

from __future__ import annotations

from orchestrator.engine.rollout.ledger import Ledger, RolloutLedger
from orchestrator.engine.store.protocol import Store
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import UsageError

_IN_PROGRESS = "SELECT DISTINCT deployment FROM rollouts WHERE ended IS NULL ORDER BY 1"


async def requested_ledger(store: Store, deployment: str | None) -> Ledger:
    """The rollout an operator's request is for: the named deployment's, else the one
    rollout in progress (the fleet's, or its only deployment's with one). UsageError if
    several deployments have one and none is named."""
    if deployment is None:
        rows = store.query(_IN_PROGRESS).fetchall() if isinstance(store, SQLiteStore) else \
            await store.query(_IN_PROGRESS)  # type: ignore[attr-defined]
        active = [str(name) for (name,) in rows]
        if len(active) > 1:
            raise UsageError(f"rollouts are in progress in deployments {', '.join(active)}: "
                             "name one (--deployment NAME)")
        deployment = active[0] if active else ""
    return ledger_for(store, deployment or "")


def ledger_for(store: Store, deployment: str = "") -> Ledger:
    """``deployment``: that deployment's rollouts ("": the fleet's one model)."""
    if isinstance(store, SQLiteStore):
        return RolloutLedger(store, deployment)
    from orchestrator.engine.rollout.shared import SharedLedger
    from orchestrator.engine.store.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        raise TypeError(f"no rollout ledger for {type(store).__name__}")
    return SharedLedger(store, deployment)
