"""The model encryption key (MEK): 128 random bits, kept out of logs and stores."""

from __future__ import annotations

import hashlib
import os
import secrets
import string
from pathlib import Path

from orchestrator.atomicfile import write_bytes_atomic
from orchestrator.errors import FileInputError, MEKError

MEK_BYTES = 16
_HEX = set(string.hexdigits)


class MEK:
    """A 128-bit key. ``repr`` and ``str`` never show the key bytes.

    ``wipe()`` overwrites the key in memory once it is no longer needed (the
    session-end hygiene of the reference system; Python may still hold copies
    made by the libraries it was passed to, which is why we pass it rarely).
    """

    __slots__ = ("_key", "_wiped")

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != MEK_BYTES:
            raise MEKError(f"MEK must be {MEK_BYTES} bytes (128 bits), got {len(key)}")
        self._key = bytearray(key)
        self._wiped = False

    @classmethod
    def generate(cls) -> MEK:
        while True:  # never one that load_mek would take for a passphrase (p = 1.3e-7)
            key = secrets.token_bytes(MEK_BYTES)
            if not _looks_typed(key):
                return cls(key)

    @property
    def key(self) -> bytes:
        if self._wiped:
            raise MEKError("MEK was wiped and can no longer be used")
        return bytes(self._key)

    def fingerprint(self) -> str:
        """A short public name for the key (SHA-256 of a domain tag and the key)."""
        return hashlib.sha256(b"modelip/v1 mek fingerprint\0" + bytes(self._key)).hexdigest()[:16]

    def wipe(self) -> None:
        for index in range(len(self._key)):
            self._key[index] = 0
        self._wiped = True

    def __repr__(self) -> str:
        return f"MEK(fingerprint={self.fingerprint()})"

    __str__ = __repr__


def _looks_typed(raw: bytes) -> bool:
    """Every byte printable ASCII: typed text, almost surely not a random key."""
    return all(0x20 <= byte <= 0x7E for byte in raw)


def exposure_warning(path: str | os.PathLike[str]) -> str | None:
    """A warning line if a MEK file can be read or written by anyone but its owner."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None  # load_mek says what is wrong with the path
    if mode & 0o077:
        return (f"WARNING: {os.fspath(path)}: the MEK file is readable or writable by "
                f"others (mode {mode:04o}); `chmod 600 {os.fspath(path)}`")
    return None


def load_mek(path: str | os.PathLike[str]) -> MEK:
    """Read a MEK file: exactly 16 raw bytes, or 32 hex digits (the reference's hex form).

    Raises FileInputError if unreadable, MEKError if it is not a 128-bit key.
    """
    target = Path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        raise FileInputError(target, "MEK file not found") from None
    except IsADirectoryError:
        raise FileInputError(target, "is a directory, not a MEK file") from None
    except OSError as exc:
        raise FileInputError(target, f"cannot read MEK: {exc.strerror}") from None
    if len(raw) == MEK_BYTES:
        if _looks_typed(raw):
            raise MEKError(f"{target}: 16 printable characters, not 16 random bytes (a "
                           "passphrase, or half of a 32-digit hex key?); a MEK file holds 16 "
                           "random bytes or 32 hex digits")
        return MEK(raw)
    text = raw.strip()
    if text.lower().startswith(b"0x"):
        text = text[2:]
    if len(text) == 2 * MEK_BYTES and all(chr(c) in _HEX for c in text):
        return MEK(bytes.fromhex(text.decode("ascii")))
    raise MEKError(
        f"{target}: MEK must be 16 raw bytes or 32 hex digits (128 bits), "
        f"got a {len(raw)}-byte file"
    )


def write_mek(path: str | os.PathLike[str], mek: MEK, *, hex_form: bool = False) -> None:
    """Create a MEK file with mode 0600; refuses to overwrite an existing file."""
    data = (mek.key.hex() + "\n").encode("ascii") if hex_form else mek.key
    # a MEK is never replaced: the data sealed under the old one would be lost
    write_bytes_atomic(path, data, mode=0o600, overwrite=False, hint="")
