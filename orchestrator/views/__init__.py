"""What renders an engine snapshot: the live dashboard, the interactive view (Textual)
and the Prometheus metrics. Each reads ``engine/snapshot.py`` and nothing else of the
engine; imported by their module (the interactive view loads Textual)."""
