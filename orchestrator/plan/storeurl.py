"""A plan's (or a command's) store URL: which ones this version can use, what an operator
should hear about one at every start, and the URL as messages show it (no secret)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit


def store_url_problem(value: str) -> str | None:
    """Why ``value`` is not a store this version can use, or None. A database across
    the network must be reached with its server verified (sslmode=verify-full), or
    with an sslmode that says, on purpose, that it is not (warned at every start:
    store_url_warning); libpq's default would fall back to plaintext unverified."""
    if value in ("", "sqlite"):
        return None
    if not value.startswith(("postgresql://", "postgres://")):
        return "must be postgresql://... (or omitted: the embedded journal)"
    params = _conninfo(value)
    if params is None:
        return "is not a PostgreSQL connection URL"
    if _local_database(params) or params.get("sslmode"):
        return None
    return ("reaches a database across the network: give sslmode=verify-full (with "
            "sslrootcert=CA.pem) so that the server is verified, or another sslmode on "
            "purpose (warned at every start)")


def store_url_warning(value: str) -> str | None:
    """What an operator should hear at every start about the store's connection."""
    params = _conninfo(value) if value.startswith(("postgresql://", "postgres://")) else None
    if params is None or _local_database(params) or params.get("sslmode") == "verify-full":
        return None
    return (f"WARNING: the store is reached with sslmode={params.get('sslmode')}: the "
            "database server is not verified, and anyone on the path can be the store "
            "(docs/security.md); sslmode=verify-full verifies it")


def _conninfo(value: str) -> dict[str, str] | None:
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {key: str(item) for key, item in conninfo_to_dict(value).items()}
    except Exception:  # noqa: BLE001 - psycopg's parser raises its own ProgrammingError
        return None


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _local_database(params: dict[str, str]) -> bool:
    """Every host a unix socket (a path, or none: libpq's default socket) or loopback."""
    hosts = [h for h in params.get("host", "").split(",") if h] + \
        [h for h in params.get("hostaddr", "").split(",") if h]
    return all(h.startswith("/") or h in _LOCAL_HOSTS for h in hosts)


# libpq parameters that carry a secret (a URL may carry them in its query)
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def redact(url: str) -> str:
    """The URL without its secrets, in the user part or the query (for messages and
    status: never printed, logged or journaled otherwise)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: show none of it
        return "(a store URL that cannot be parsed)"
    netloc, query = parts.netloc, parts.query
    if password is not None:
        user = netloc.rsplit("@", 1)[0].split(":", 1)[0]
        netloc = f"{user}:***@{netloc.rsplit('@', 1)[1]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key.lower() in SECRET_PARAMETERS for key, _ in pairs):
        query = "&".join(f"{key}={'***' if key.lower() in SECRET_PARAMETERS else value}"
                         for key, value in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
