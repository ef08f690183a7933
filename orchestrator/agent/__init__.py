"""The host agent: one host's side of runtime.proto over a card backend
(docs/host-agent.md). Imports crypto-free pieces of the protocol only, never engine/
or emulator/ (the emulator is one of its backends)."""

from orchestrator.agent.aborts import HostAbort
from orchestrator.agent.backend import CardBackend, Emit
from orchestrator.agent.host import HostAgent, HostStats
from orchestrator.agent.servicers import TLSServerConfig, serve
from orchestrator.agent.staging import Staged, Staging

__all__ = ["CardBackend", "Emit", "HostAbort", "HostAgent", "HostStats", "Staged", "Staging",
           "TLSServerConfig", "serve"]
