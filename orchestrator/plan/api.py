"""A plan's ``api:`` section (docs/api.md): where the control API listens, its TLS
material and the CA whose client certificates it accepts, and who may do what."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.plan.paths import is_loopback
from orchestrator.plan.reader import Problem, Reader

ROLES = ("viewer", "operator", "admin")   # each may do what the ones before it may
DEFAULT_LISTEN = "127.0.0.1:62480"


@dataclass(frozen=True, slots=True)
class ApiTLS:
    cert: Path
    key: Path
    client_ca: Path     # callers present a certificate from this CA (mutual TLS)


@dataclass(frozen=True, slots=True)
class History:
    """The changes kept for watchers to resume from: the newest ``revisions`` and
    whatever is younger than ``seconds`` (docs/api.md)."""

    revisions: int = 100_000
    seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class ApiSpec:
    listen: str = DEFAULT_LISTEN
    tls: ApiTLS | None = None
    # a caller's certificate subject CN or SAN -> its role
    roles: Mapping[str, str] = field(default_factory=dict)
    history: History = History()


def _pem_certificates(path: Path) -> str | None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        return f"{path.name}: not a PEM certificate ({err})"
    return None


def read_api(reader: Reader, file: Callable[[Reader, str], Path]) -> ApiSpec:
    """``file(reader, key)``: the path the plan names under ``key`` (it must exist)."""
    listen = reader.get("listen", str, DEFAULT_LISTEN)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise Problem(reader.items["listen"][1], "api.listen",
                      "must be ADDRESS:PORT with a port from 0 (any free one) to 65535")
    tls = None
    if (section := reader.child("tls")) is not None:
        tls = ApiTLS(file(section, "cert"), file(section, "key"), file(section, "client_ca"))
        for key, path in (("cert", tls.cert), ("client_ca", tls.client_ca)):
            if (problem := _pem_certificates(path)) is not None:
                raise Problem(section.items[key][1], section.field_name(key), problem)
        section.done()
    elif not is_loopback(listen):
        raise Problem(reader.items["listen"][1], "api.listen",
                      f"{listen} is not loopback: give api.tls (cert, key, client_ca), so "
                      "that callers are known by their certificates")
    roles: dict[str, str] = {}
    if (section := reader.child("roles")) is not None:
        for role in ROLES:
            for name in section.list_of(role, str):
                if name in roles:
                    raise Problem(section.items[role][1], section.field_name(role),
                                  f"{name!r} is also {roles[name]}: one role each")
                roles[name] = role
        section.done()
        if tls is None:
            raise Problem(reader.items["roles"][1], "api.roles",
                          "roles name certificates: give api.tls too")
    history = History()
    if (section := reader.child("history")) is not None:
        history = History(
            section.get("revisions", int, history.revisions, check=lambda v: None if
                        1 <= v <= 1 << 40 else "must be from 1 to 2^40 revisions"),
            float(section.get("seconds", (int, float), history.seconds, check=lambda v:
                              None if 1 <= v <= 366 * 86400 else
                              "must be from 1 second to 366 days")))
        section.done()
    reader.done()
    return ApiSpec(listen, tls, roles, history)
