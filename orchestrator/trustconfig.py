"""Where the vendor root comes from when a command is not given ``--trust-root``.

The reference tool's commands take no trust-root flag, yet evidence must be
verified before any wrap. As tools that verify certificates do (curl's
``CURL_CA_BUNDLE``, OpenSSL's ``SSL_CERT_FILE``), the root can be configured
once, in this order (docs/keys.md):

1. ``--trust-root PEM`` on the command line;
2. the environment variable ``MODELIP_TRUST_ROOT`` (a PEM file's path);
3. the file ``$XDG_CONFIG_HOME/modelip/trust-root.pem`` (``~/.config/...``);
4. the file ``/etc/modelip/trust-root.pem``.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.errors import UsageError

TRUST_ROOT_ENV = "MODELIP_TRUST_ROOT"
SYSTEM_TRUST_ROOT = Path("/etc/modelip/trust-root.pem")


def user_trust_root() -> Path:
    """The per-user configuration file of the vendor root."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "modelip" / "trust-root.pem"


def configured_trust_root(flag: str | None) -> str | None:
    """The trust root to use: the flag's, else the configured one, else None.

    An empty ``MODELIP_TRUST_ROOT`` counts as unset; one naming a missing file is
    refused (UsageError) rather than silently falling through to another root.
    """
    if flag:
        return flag
    named = os.environ.get(TRUST_ROOT_ENV, "")
    if named:
        if not Path(named).is_file():
            raise UsageError(f"${TRUST_ROOT_ENV} {named}: no such file (it names the vendor "
                             "root's PEM file)")
        return named
    for path in (user_trust_root(), SYSTEM_TRUST_ROOT):
        if path.is_file():
            return str(path)
    return None


def no_trust_root_problem() -> str:
    """What to say when evidence must be verified and no root is configured."""
    return (f"no vendor trust root to verify evidence with: give --trust-root PEM, or "
            f"configure it once with ${TRUST_ROOT_ENV}=PEM or by copying it to "
            f"{user_trust_root()} (or --insecure-unverified-key to wrap unverified)")
