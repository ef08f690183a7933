"""MEK custody in a PKCS#11 token (docs/keys.md).

The key-encryption key (KEK) is an AES-256 key generated inside the token,
sensitive and not extractable: it never leaves it. The MEK is generated from
the token's random generator and kept only as a *sealed blob*: a small JSON
file with a versioned header (token and KEK labels, mechanism) and the MEK
encrypted under the KEK with AES-GCM inside the token, the header being the
associated data. Unsealing asks the token to decrypt into this process's
memory, and nowhere else. The PIN comes from an environment variable only.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.atomicfile import write_bytes_atomic
from orchestrator.crypto.mek import MEK, MEK_BYTES, hold_secrets_privately
from orchestrator.errors import CustodyError, FileInputError, MEKError, ModelIPError, UsageError

SEALED_FORMAT = "modelip-sealed-mek/1"
MECHANISM = "CKM_AES_GCM"
DEFAULT_PIN_ENV = "MODELIP_PKCS11_PIN"
KEK_BITS = 256
IV_BYTES = 12


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """Where the KEK lives: a PKCS#11 module, a token label, the KEK's label, and the
    environment variable holding the user PIN."""

    module: str
    token: str
    kek: str
    pin_env: str = DEFAULT_PIN_ENV

    def describe(self) -> str:
        return f"KEK {self.kek!r} on token {self.token!r}"


# Loading a PKCS#11 module runs its code in this process, which holds the MEK: a
# plan or a flag naming one is naming code. By default only modules installed where
# the system keeps its libraries are loaded (where distributions install token
# modules: SoftHSM2, OpenSC, vendors' packages); any other needs the operator's
# allow-list (docs/keys.md).
SYSTEM_LIBRARY_DIRS = (Path("/usr/lib"), Path("/usr/lib64"), Path("/usr/local/lib"),
                       Path("/lib"), Path("/lib64"))
MODULES_ENV = "MODELIP_PKCS11_MODULES"


def refuse_unlisted_module(module: str) -> None:
    """UsageError unless ``module`` (its real path) lies in a system library directory
    or is listed in $MODELIP_PKCS11_MODULES (absolute paths, ':'-separated)."""
    real = Path(module).resolve()
    if any(real.is_relative_to(directory) for directory in SYSTEM_LIBRARY_DIRS):
        return
    listed = {Path(entry).resolve() for entry in os.environ.get(MODULES_ENV, "").split(":")
              if entry and Path(entry).is_absolute()}
    if real in listed:
        return
    raise UsageError(f"{module}: a PKCS#11 module outside the system's library directories "
                     f"({', '.join(map(str, SYSTEM_LIBRARY_DIRS))}) is loaded only if "
                     f"${MODULES_ENV} lists it (it would run as code in this process)")


def _token(spec: TokenSpec) -> Any:
    """The token ``spec`` names (no login); CustodyError / UsageError / FileInputError."""
    import pkcs11
    from pkcs11 import exceptions as p11

    if not Path(spec.module).is_file():
        raise FileInputError(spec.module, "PKCS#11 module not found")
    refuse_unlisted_module(spec.module)
    try:
        library = pkcs11.lib(spec.module)
    except p11.PKCS11Error as err:
        raise CustodyError(f"{spec.module}: cannot load the PKCS#11 module ({err})") from None
    try:
        return library.get_token(token_label=spec.token)
    except p11.NoSuchToken:
        raise CustodyError(f"no PKCS#11 token labelled {spec.token!r} in {spec.module}") from None
    except p11.MultipleObjectsReturned:
        raise CustodyError(f"several tokens are labelled {spec.token!r}") from None


def token_missing(spec: TokenSpec) -> str | None:
    """Why the token ``spec`` names cannot be found, or None: a plan's check before
    anything starts (no PIN needed; a wrong PIN fails at start, that key alone)."""
    try:
        _token(spec)
    except ModelIPError as err:
        return str(err)
    return None


@contextmanager
def _session(spec: TokenSpec) -> Iterator[Any]:
    """A logged-in read-write session; CustodyError / UsageError / FileInputError."""
    from pkcs11 import exceptions as p11

    hold_secrets_privately()  # before the PIN is read: it is a secret too
    pin = os.environ.get(spec.pin_env)
    if not pin:
        raise UsageError(f"the token PIN is read from ${spec.pin_env}, which is not set")
    token = _token(spec)
    try:
        session = token.open(user_pin=pin, rw=True)
        # logged in: the PIN leaves the environment, so no child process inherits it
        # (and the process is non-dumpable: /proc/PID/environ is not for others)
        os.environ.pop(spec.pin_env, None)
    except (p11.PinIncorrect, p11.PinLenRange):
        raise CustodyError(f"token {spec.token!r}: wrong PIN (from ${spec.pin_env})") from None
    except p11.PinLocked:
        raise CustodyError(f"token {spec.token!r}: the PIN is locked") from None
    except p11.PKCS11Error as err:
        raise CustodyError(f"token {spec.token!r}: cannot log in ({type(err).__name__})") from None
    try:
        yield session
    finally:
        session.close()


def _kek(session: Any, spec: TokenSpec) -> Any:
    from pkcs11 import KeyType
    from pkcs11 import exceptions as p11

    try:
        return session.get_key(label=spec.kek, key_type=KeyType.AES)
    except p11.NoSuchKey:
        raise CustodyError(f"token {spec.token!r} has no AES key labelled {spec.kek!r}") from None
    except p11.MultipleObjectsReturned:
        raise CustodyError(f"token {spec.token!r} has several keys labelled {spec.kek!r}"
                           ) from None


def init_kek(spec: TokenSpec) -> None:
    """Create the KEK in the token: AES-256, sensitive, never extractable.

    CustodyError if a key with that label exists already (nothing is created).
    """
    from pkcs11 import Attribute, KeyType
    from pkcs11 import exceptions as p11

    with _session(spec) as session:
        try:
            session.get_key(label=spec.kek)
        except p11.NoSuchKey:
            pass
        except p11.MultipleObjectsReturned:
            raise CustodyError(f"{spec.describe()} exists already (several)") from None
        else:
            raise CustodyError(f"{spec.describe()} exists already; refusing to create "
                               "another")
        session.generate_key(KeyType.AES, KEK_BITS, label=spec.kek, store=True, template={
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.MODIFIABLE: False})


def _header(spec: TokenSpec) -> dict[str, str]:
    return {"format": SEALED_FORMAT, "token": spec.token, "kek": spec.kek,
            "mechanism": MECHANISM}


def _aad(header: dict[str, str]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def seal(spec: TokenSpec, mek: MEK | None = None) -> tuple[bytes, MEK]:
    """A sealed blob of ``mek`` (or of a new MEK from the token's RNG), and the MEK."""
    from pkcs11 import Mechanism
    from pkcs11 import exceptions as p11
    from pkcs11.mechanisms import GCMParams

    with _session(spec) as session:
        kek = _kek(session, spec)
        if mek is None:
            mek = MEK(session.generate_random(MEK_BYTES * 8))
        header = _header(spec)
        iv = secrets.token_bytes(IV_BYTES)
        try:
            sealed = kek.encrypt(bytes(mek.key), mechanism=Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(iv, _aad(header)))
        except p11.PKCS11Error as err:
            raise CustodyError(f"{spec.describe()}: the token refused to seal "
                               f"({type(err).__name__})") from None
    blob = {**header, "iv": iv.hex(), "sealed": bytes(sealed).hex()}
    return (json.dumps(blob, indent=1, sort_keys=True) + "\n").encode(), mek


def write_sealed_mek(path: str | os.PathLike[str], blob: bytes) -> None:
    write_bytes_atomic(path, blob, mode=0o600, overwrite=False, hint="")


def is_sealed(raw: bytes) -> bool:
    return raw.lstrip().startswith(b"{") and SEALED_FORMAT.encode() in raw[:4096]


def unseal(path: str | os.PathLike[str], spec: TokenSpec) -> MEK:
    """Ask the token to open a sealed blob. FileInputError (missing file), MEKError
    (not a sealed MEK), CustodyError (token, PIN, KEK, another KEK, tampered)."""
    from pkcs11 import Mechanism
    from pkcs11 import exceptions as p11
    from pkcs11.mechanisms import GCMParams

    target = Path(path)
    try:
        raw = target.read_bytes()[: 1 << 16]
    except FileNotFoundError:
        raise FileInputError(target, "sealed MEK not found") from None
    except OSError as exc:
        raise FileInputError(target, f"cannot read sealed MEK: {exc.strerror}") from None
    try:
        blob = json.loads(raw)
        header = {key: str(blob[key]) for key in ("format", "token", "kek", "mechanism")}
        iv, sealed = bytes.fromhex(blob["iv"]), bytes.fromhex(blob["sealed"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise MEKError(f"{target}: not a sealed MEK") from None
    if header["format"] != SEALED_FORMAT or header["mechanism"] != MECHANISM:
        raise MEKError(f"{target}: unsupported sealed-MEK format {header['format']!r} / "
                       f"{header['mechanism']!r}")
    with _session(spec) as session:
        kek = _kek(session, spec)  # first: a wrong token or KEK name is said as such
        if (header["token"], header["kek"]) != (spec.token, spec.kek):
            raise CustodyError(f"{target}: sealed under KEK {header['kek']!r} on token "
                               f"{header['token']!r}, not {spec.describe()}")
        if len(iv) != IV_BYTES:
            raise CustodyError(f"{target}: sealed MEK was altered (IV)")
        try:
            opened = kek.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(iv, _aad(header)))
        except p11.PKCS11Error:
            raise CustodyError(f"{target}: does not open under {spec.describe()} (sealed by "
                               "another key of that name, or altered)") from None
    key = bytearray(opened)
    try:
        return MEK(key)
    except MEKError:
        raise CustodyError(f"{target}: opened, but does not hold a 128-bit MEK") from None
    finally:
        key[:] = bytes(len(key))
