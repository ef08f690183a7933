"""The orchestrator: plan, per-card state machines, fleet supervisor, journal."""
