"""modelip: deploy encrypted AI models to fleets of attested accelerator cards."""

__version__ = "0.1.0"
