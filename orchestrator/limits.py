"""Limits on the numbers a user types (flags and plans), in one place
(docs/plans.md): far above any fleet measured (bench/fleet.py: 4,096 cards), far
below what would hang a reader or overflow the wire's integers."""

MAX_HOSTS = 4096
MAX_CARDS_PER_HOST = 1024
MAX_DEVICE = (1 << 32) - 1     # uint32 on the wire
MAX_VERSION = (1 << 63) - 1    # uint64 on the wire, kept in SQLite's signed 64 bits
