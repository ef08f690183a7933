"""The orchestrator engine: plan, supervision tree (engine, hosts, cards), store, events."""
