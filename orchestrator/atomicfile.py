"""Write-to-temp, fsync, rename: outputs are either whole or absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from orchestrator.errors import FileInputError

# The one rule of every command that writes (docs/operations.md): a file that exists
# is not replaced unless the user asked for it (--force), or it is the command's own
# (a card file it updates, a cache it keeps).
REFUSED = "already exists; refusing to overwrite"
FORCE_HINT = " (--force replaces it)"


def refuse_existing(paths: Iterable[str | os.PathLike[str]], *, overwrite: bool) -> None:
    """Before anything is written: FileInputError for the first of ``paths`` that
    exists, unless ``overwrite`` (a command with several outputs writes all or none)."""
    for path in paths:
        _refuse_directory(path)
        if not overwrite and os.path.lexists(path):
            raise FileInputError(path, REFUSED + FORCE_HINT)


def _refuse_directory(path: str | os.PathLike[str]) -> None:
    if os.path.isdir(path):  # not even --force replaces a directory with a file
        raise FileInputError(path, "is a directory (a file is expected here)")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, mode: int = 0o644, overwrite: bool = False,
    hint: str = FORCE_HINT,
) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block succeeds.

    The temporary file lives beside ``path`` (same file system, so the final
    rename is atomic), is created with ``mode`` from the start (a secret is never
    world-readable, not even briefly), and is fsynced before the rename.
    Raises FileInputError if ``path`` exists and ``overwrite`` is false (``hint``
    says how to ask for it).
    """
    target = Path(path)
    _refuse_directory(target)
    if not overwrite and os.path.lexists(target):
        raise FileInputError(target, REFUSED + hint)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileInputError(directory, "output directory does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, target)
        else:
            # link() fails if the target appeared meanwhile: no silent clobber.
            try:
                os.link(tmp_name, target)
            except FileExistsError as exc:
                raise FileInputError(target, REFUSED + hint) from exc
            os.unlink(tmp_name)
        _fsync_directory(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = False,
    hint: str = FORCE_HINT,
) -> None:
    """Write ``data`` to ``path`` atomically (see atomic_output)."""
    with atomic_output(path, mode=mode, overwrite=overwrite, hint=hint) as handle:
        handle.write(data)


@contextlib.contextmanager
def output_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The directory a command writes into, created if missing (with its parents);
    if the command fails, a directory it created is removed with what it holds, so a
    failed command leaves nothing behind. Raises FileInputError."""
    target = Path(path)
    created = None  # the outermost directory this call creates
    for ancestor in (target, *target.parents):
        if os.path.lexists(ancestor):
            break
        created = ancestor
    try:
        target.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileInputError(target, "exists and is not a directory") from None
    except OSError as exc:
        raise FileInputError(target, f"cannot create output directory: {exc.strerror}") from None
    try:
        yield target
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_tree(root: Path) -> None:
    """Make ``root`` (created if missing) and everything under it owner-only:
    directories 0700, files without group or other bits. Raises OSError."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _owner_only(str(root))
    for directory, subdirs, files in os.walk(root):
        for name in [*subdirs, *files]:
            _owner_only(os.path.join(directory, name))


def _owner_only(path: str) -> None:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return
    want = 0o700 if stat.S_ISDIR(mode) else mode & 0o700
    if stat.S_IMODE(mode) != want:  # no chmod when nothing changes (read-only media)
        os.chmod(path, want)
