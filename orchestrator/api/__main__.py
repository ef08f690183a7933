"""The control API's own process (orchestrator/api/apart.py): started by a running
`modelip deploy|watch` that serves the API, never by hand."""

from orchestrator.api.apart import main

raise SystemExit(main())
