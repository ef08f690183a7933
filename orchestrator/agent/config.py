"""AGENT.yaml (docs/host-agent.md): where the agent listens, its TLS material, its
staging directory and cap, its card backend. Read as plans are: every problem is one
line ``file:line: field: problem`` (PlanError, exit 2), every number range-checked,
unknown keys named, before anything starts."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from orchestrator.agent.exec import DEFAULT_TIMEOUTS, OPERATIONS, ExecConfig
from orchestrator.errors import PlanError
from orchestrator.limits import MAX_CARDS_PER_HOST
from orchestrator.plan.paths import is_loopback
from orchestrator.plan.reader import Problem, Reader, positive, read_document
from orchestrator.transport.types import DEFAULT_PORT

_SIZE = re.compile(r"(\d{1,15})\s*(B|KiB|MiB|GiB|TiB)?")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None   # set: orchestrators must present a certificate (mTLS)


@dataclass(frozen=True, slots=True)
class EmulatedCards:
    """``backend: {kind: emulated}``: emulated cards, as ``modelip emulate`` makes them."""

    cards: int = 4
    pki: Path = Path("emulated-pki")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    source: Path
    name: str
    listen: str
    tls: TLSFiles | None
    staging_dir: Path
    staging_limit: int
    backend: ExecConfig | EmulatedCards
    log_json: bool = False

    @classmethod
    def load(cls, path: str | Path) -> AgentConfig:
        source = Path(path)
        node = read_document(source, "agent configuration")
        try:
            return _read(Reader(node, ""), source, source.resolve().parent)
        except Problem as problem:
            raise PlanError(str(source), problem.line, problem.field_name,
                            problem.problem) from None


def _size(value: int | str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 0 else "must be a size in bytes (0: no cap)"
    return None if _SIZE.fullmatch(str(value).strip()) else \
        "must be bytes or a size such as 512MiB or 64GiB"


def _bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    found = _SIZE.fullmatch(value.strip())
    assert found is not None  # noqa: S101 - checked by _size
    return int(found.group(1)) * _UNITS[found.group(2)]


def _listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        return "must be ADDRESS:PORT with a port from 0 (any free one) to 65535"
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (socket.gaierror, UnicodeError):
        return f"{host} is not an address of this machine"
    return None


def _per_card(value: int) -> str | None:
    return None if 1 <= value <= 64 else "must be from 1 to 64 operations at once"


def _card_count(value: int) -> str | None:
    return None if 1 <= value <= MAX_CARDS_PER_HOST else \
        f"must be from 1 to {MAX_CARDS_PER_HOST} cards"


def _timeout(value: float) -> str | None:
    return None if 0 < value <= 3600 else "must be from more than 0 to 3600 seconds"


def _read(top: Reader, source: Path, base: Path) -> AgentConfig:
    listen = top.get("listen", str, f"127.0.0.1:{DEFAULT_PORT}", check=_listen)
    tls = None
    if (section := top.child("tls")) is not None:
        ca = section.get("client_ca", str)
        tls = TLSFiles(base / section.get("cert", str, required=True),
                       base / section.get("key", str, required=True),
                       base / ca if ca else None)
        section.done()
    elif not is_loopback(listen):
        raise Problem(top.items["listen"][1], "listen",
                      f"{listen} is not loopback: give tls (cert, key, client_ca), as "
                      "hosts are reached over TLS")
    staging_dir = base / top.get("staging_dir", str, required=True)
    limit = _bytes(top.get("staging_limit", (int, str), "64GiB", check=_size))
    backend_section = top.child("backend", required=True)
    assert backend_section is not None  # noqa: S101 - required
    backend = _backend(backend_section, base)
    log_json = top.get("log_json", bool, False)
    name = top.get("name", str, socket.gethostname())
    top.done()
    return AgentConfig(source, name, listen, tls, staging_dir, limit, backend, log_json)


def _backend(section: Reader, base: Path) -> ExecConfig | EmulatedCards:
    kind = section.get("kind", str, required=True)
    if kind == "emulated":
        cards = EmulatedCards(section.get("cards", int, 4, check=_card_count),
                              base / section.get("pki", str, "emulated-pki"))
        section.done()
        return cards
    if kind != "exec":
        raise Problem(section.items["kind"][1], section.field_name("kind"),
                      f"must be exec or emulated, got {kind!r}")
    executable = base / section.get("executable", str, required=True)
    watch = section.get("watch", str)
    timeouts = dict(DEFAULT_TIMEOUTS)
    if (given := section.child("timeouts")) is not None:
        for operation in OPERATIONS:
            timeouts[operation] = float(given.get(operation, (int, float),
                                                  DEFAULT_TIMEOUTS[operation], check=_timeout))
        given.done()
    env = {}
    if (variables := section.child("env")) is not None:
        for key in list(variables.items):
            env[key] = variables.get(key, str)
        variables.done()
    config = ExecConfig(executable, base / watch if watch else None,
                        float(section.get("poll_interval", (int, float), 1.0, check=positive)),
                        timeouts, section.get("per_card", int, 1, check=_per_card), env)
    section.done()
    for what, path in (("executable", config.executable), ("watch", config.watch)):
        if path is not None and not (path.is_file() and path.stat().st_mode & 0o111):
            raise Problem(section.items[what][1], section.field_name(what),
                          f"{path} is not an executable file")
    return config
