"""The model encryption key (MEK): 128 random bits, kept out of logs and stores."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import secrets
import string
import sys
from pathlib import Path

from orchestrator.atomicfile import write_bytes_atomic
from orchestrator.errors import FileInputError, MEKError

MEK_BYTES = 16
_HEX = set(string.hexdigits)


class MEK:
    """A 128-bit key. ``repr`` and ``str`` never show the key bytes.

    The key lives in one mutable buffer, locked in memory where the system allows
    (never swapped out), handed out only as a read-only view of that buffer (no
    copies that ``wipe`` could not reach); ``wipe()`` overwrites it once it is no
    longer needed (the session-end hygiene of the reference system). A process
    that holds a MEK is made non-dumpable (docs/keys.md: what that protects
    against, and what it cannot).
    """

    __slots__ = ("_key", "_locked", "_wiped")

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != MEK_BYTES:
            raise MEKError(f"MEK must be {MEK_BYTES} bytes (128 bits), got {len(key)}")
        hold_secrets_privately()
        self._key = bytearray(key)
        self._locked = _lock_in_memory(self._key)
        self._wiped = False

    @classmethod
    def generate(cls) -> MEK:
        while True:  # never one that load_mek would take for a passphrase (p = 1.3e-7)
            key = secrets.token_bytes(MEK_BYTES)
            if not _looks_typed(key):
                return cls(key)

    @property
    def key(self) -> memoryview:
        """A read-only view of the key's one buffer (the libraries it is passed to take
        any bytes-like value); it reads zeros once wiped."""
        if self._wiped:
            raise MEKError("MEK was wiped and can no longer be used")
        return memoryview(self._key).toreadonly()

    def fingerprint(self) -> str:
        """A short public name for the key (SHA-256 of a domain tag and the key)."""
        digest = hashlib.sha256(b"modelip/v1 mek fingerprint\0")
        digest.update(self._key)
        return digest.hexdigest()[:16]

    def wipe(self) -> None:
        for index in range(len(self._key)):
            self._key[index] = 0
        self._wiped = True

    def __repr__(self) -> str:
        return f"MEK(fingerprint={self.fingerprint()})"

    __str__ = __repr__


_private = False


def hold_secrets_privately() -> None:
    """This process holds a key from now on: make it non-dumpable (Linux
    PR_SET_DUMPABLE 0: no core file, and no process of the same user may ptrace it
    or read its /proc/PID/mem or /proc/PID/environ). Root and the kernel still can
    (docs/keys.md). Elsewhere than Linux: nothing."""
    global _private
    if _private or not sys.platform.startswith("linux"):
        return
    _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    _private = True


_PR_SET_DUMPABLE = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, opened once (a card's every load locks a MEK in memory)."""
    return ctypes.CDLL(None, use_errno=True)


def _lock_in_memory(buffer: bytearray) -> object | None:
    """mlock the buffer's pages (never written to swap) where RLIMIT_MEMLOCK allows;
    the returned export also pins the buffer (an exported bytearray cannot be
    resized, so it is never moved). None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    pinned = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    _libc().mlock(ctypes.addressof(pinned), ctypes.c_size_t(len(buffer)))  # -1: not allowed
    return pinned


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
    data = (mek.key.hex() + "\n").encode("ascii") if hex_form else bytes(mek.key)
    # a MEK is never replaced: the data sealed under the old one would be lost
    write_bytes_atomic(path, data, mode=0o600, overwrite=False, hint="")
