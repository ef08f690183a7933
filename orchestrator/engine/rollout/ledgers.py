"""The rollout ledger of a store: the embedded journal's, or the shared store's."""

from __future__ import annotations

from orchestrator.engine.rollout.ledger import Ledger, RolloutLedger
from orchestrator.engine.store.protocol import Store
from orchestrator.engine.store.sqlite import SQLiteStore


def ledger_for(store: Store) -> Ledger:
    if isinstance(store, SQLiteStore):
        return RolloutLedger(store)
    from orchestrator.engine.rollout.shared import SharedLedger
    from orchestrator.engine.store.postgres import PostgresStore

    if not isinstance(store, PostgresStore):
        raise TypeError(f"no rollout ledger for {type(store).__name__}")
    return SharedLedger(store)
