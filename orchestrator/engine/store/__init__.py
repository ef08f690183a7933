"""What the engine remembers, behind one interface (``Store``): the protocol and its
records (``protocol``), the embedded SQLite journal (``sqlite``), the shared PostgreSQL
store (``postgres``, imported by name: it loads psycopg), the tables of both
(``schema``)."""

from orchestrator.engine.store.protocol import Store
from orchestrator.engine.store.sqlite import SQLiteStore, StateDirLock

__all__ = ["SQLiteStore", "StateDirLock", "Store"]
