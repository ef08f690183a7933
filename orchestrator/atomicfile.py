"""Write-to-temp, fsync, rename: outputs are either whole or absent."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from orchestrator.errors import FileInputError


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, mode: int = 0o644, overwrite: bool = True
) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block succeeds.

    The temporary file lives beside ``path`` (same file system, so the final
    rename is atomic), is created with ``mode`` from the start (a secret is never
    world-readable, not even briefly), and is fsynced before the rename.
    Raises FileInputError if ``path`` exists and ``overwrite`` is false.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise FileInputError(target, "already exists; refusing to overwrite")
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
                raise FileInputError(target, "already exists; refusing to overwrite") from exc
            os.unlink(tmp_name)
        _fsync_directory(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically (see atomic_output)."""
    with atomic_output(path, mode=mode, overwrite=overwrite) as handle:
        handle.write(data)


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
