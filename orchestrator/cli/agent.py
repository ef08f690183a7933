"""modelip host-agent --config AGENT.yaml: a host's side of the protocol over its card
backend (docs/host-agent.md). Composes the agent (agent/) with the backend the file
names: ``exec`` (agent/exec.py) or ``emulated`` (emulator/backend.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from orchestrator.errors import FileInputError, UsageError


class JSONLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the error)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _logging(as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONLines() if as_json else
                         logging.Formatter("modelip host-agent: %(levelname)s %(message)s"))
    root = logging.getLogger("modelip")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def _tls(config: Any) -> Any:
    from orchestrator.agent.servicers import TLSServerConfig

    if config.tls is None:
        return None
    files = config.tls
    try:
        return TLSServerConfig(files.cert.read_bytes(), files.key.read_bytes(),
                               files.client_ca.read_bytes() if files.client_ca else None)
    except OSError as err:
        raise FileInputError(err.filename, f"cannot read the agent's TLS material "
                             f"({(err.strerror or str(err)).lower()})") from None


def _backend(config: Any, staging: Any) -> tuple[Any, str]:
    """The backend the configuration names, and how to describe it in one line."""
    from orchestrator.agent.exec import ExecBackend, ExecConfig

    spec = config.backend
    if isinstance(spec, ExecConfig):
        how = f"exec backend {spec.executable}" + (f", events from {spec.watch}" if spec.watch
                                                  else f", polling every {spec.poll_interval:g} s")
        return ExecBackend(spec), how
    from orchestrator.emulator.backend import EmulatedBackend
    from orchestrator.emulator.card import EmulatedCard
    from orchestrator.emulator.pki import VendorPKI

    pki = VendorPKI.load_or_create(spec.pki)
    cards = [EmulatedCard(pki.issue_card(f"{config.name}-card{d}")) for d in range(spec.cards)]
    return EmulatedBackend(cards, staging), (f"emulated backend, {spec.cards} cards (trust "
                                             f"root {spec.pki / 'root.pem'})")


def cmd_host_agent(args: argparse.Namespace) -> int:
    from orchestrator.agent.config import AgentConfig

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    config = AgentConfig.load(args.config)
    _logging(args.log_json or config.log_json)
    tls = _tls(config)

    import anyio

    from orchestrator.agent.host import HostAgent
    from orchestrator.agent.servicers import serve
    from orchestrator.agent.staging import Staging

    try:
        staging = Staging(config.staging_dir, limit=config.staging_limit)
    except OSError as err:
        raise FileInputError(config.staging_dir, f"cannot use as the staging directory "
                             f"({(err.strerror or str(err)).lower()})") from None
    backend, how = _backend(config, staging)
    agent = HostAgent(config.name, backend, staging)
    bind, _, port = config.listen.rpartition(":")
    log = logging.getLogger("modelip.agent")

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            address = await tg.start(lambda task_status: serve(
                agent, bind=bind.strip("[]"), port=int(port), tls=tls,
                task_status=task_status))
            log.info("host %s listening on %s (%s; %s; staging in %s, %d staged)",
                     config.name, address, "mutual TLS" if tls and tls.client_ca_pem else
                     "TLS" if tls else "loopback, no TLS", how, config.staging_dir,
                     len(staging))
            log.info("stopping (%s)", await ready_until_stopped())
            tg.cancel_scope.cancel()

    try:
        anyio.run(run)
    except OSError as err:
        raise UsageError(f"host-agent: cannot listen on {config.listen}: {err}") from None
    return 0


async def ready_until_stopped() -> str:
    """Say READY on stdout (a serving command's word that it listens), then wait for
    SIGINT or SIGTERM; the signal's name."""
    import signal

    import anyio

    print("READY", flush=True)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            return signal.Signals(signum).name
    raise AssertionError("the signal receiver ended")  # noqa: EM101 - cannot happen


def register(sub: Any) -> None:
    """Add host-agent to the main parser."""
    p = sub.add_parser("host-agent", help="serve this host's cards to orchestrators, over a "
                                          "card backend (docs/host-agent.md)")
    p.add_argument("--config", required=True, metavar="AGENT.yaml",
                   help="the agent's configuration (listen, tls, staging, backend)")
    p.add_argument("--log-json", action="store_true",
                   help="structured logs: one JSON object per line on stderr")
    p.set_defaults(handler=cmd_host_agent)

