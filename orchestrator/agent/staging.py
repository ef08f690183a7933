"""Program bodies staged on a host, content addressed (docs/host-agent.md "Staging").

A body is kept under its hex SHA-256: in a directory (owner-only files, written under a
temporary name and renamed only once the whole body arrived and its digest matched: a
cut upload leaves nothing), or, without a directory, in memory (the emulator's hosts).
A size cap refuses what would not fit with RESOURCE_EXHAUSTED, as does a full disk.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.agent.aborts import HostAbort

R = runtime_pb2
HARD_LIMIT = 16 << 30        # no single body above this, whatever the cap
_ID = re.compile(r"[0-9a-f]{64}")
_PARTIAL = ".partial"
_log = logging.getLogger("modelip.agent")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Staged:
    """One staged body: its id, size and order of arrival; its file, or its bytes."""

    program_id: str
    size: int
    order: int
    path: Path | None = None
    body: bytes | None = None

    def read(self) -> bytes:
        if self.body is not None:
            return self.body
        assert self.path is not None  # noqa: S101 - one of the two is always set
        return self.path.read_bytes()


def _full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


class Staging:
    def __init__(self, directory: Path | None = None, *, limit: int = 0,
                 bandwidth: float = 0.0) -> None:
        self.directory = directory
        self.limit = limit            # bytes kept at most; 0: no cap but HARD_LIMIT per body
        self.bandwidth = bandwidth    # bytes per second accepted (a slow link, emulated); 0: any
        self._held: dict[str, Staged] = {}
        if directory is not None:
            self._adopt(directory)

    def _adopt(self, directory: Path) -> None:
        """Make the directory (owner-only) or take over what a previous run staged."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = []
        for entry in directory.iterdir():
            if entry.name.endswith(_PARTIAL):
                entry.unlink(missing_ok=True)  # a cut upload of a previous run
            elif _ID.fullmatch(entry.name) and entry.is_file():
                found.append((entry.stat().st_mtime_ns, entry))
        for order, (_, entry) in enumerate(sorted(found)):
            self._held[entry.name] = Staged(entry.name, entry.stat().st_size, order, entry)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held(self) -> int:
        """Bytes staged."""
        return sum(staged.size for staged in self._held.values())

    def get(self, program_id: str) -> Staged | None:
        return self._held.get(program_id)

    def oldest(self) -> Staged | None:
        return min(self._held.values(), key=lambda s: s.order, default=None)

    def _check_room(self, size: int) -> None:
        held = self.held
        if self.limit and held + size > self.limit:
            raise HostAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, R.ERROR_REASON_UNSPECIFIED,
                            f"no room to stage {size} bytes ({held} of {self.limit} in use)")

    async def receive(self, chunks: AsyncIterator[runtime_pb2.StageChunk]) -> tuple[str, bool]:
        """Take one upload; (program id, False if it was already staged). The first
        chunk names the program and its size; the body must be exactly that size and
        hash to that id."""
        first = await anext(chunks, None)
        program_id = first.program_id if first is not None else ""
        total = first.total_size if first is not None else 0
        if first is None or not _ID.fullmatch(program_id) or total > HARD_LIMIT:
            raise HostAbort.of(R.ERROR_REASON_FORMAT, "first stage message must name the "
                               "program (hex SHA-256) and its size (at most 16 GiB)")
        if program_id in self._held:
            return program_id, False
        self._check_room(total)
        sink = _Sink(self.directory, program_id)
        try:
            received, digest = await self._take(first, chunks, total, sink)
            if received != total:
                # a cancelled or cut upload: nothing half-staged is kept
                raise HostAbort.of(R.ERROR_REASON_FORMAT,
                                   f"stage ended after {received} of {total} bytes")
            if digest != program_id:
                raise HostAbort.of(R.ERROR_REASON_FORMAT,
                                   "program id is not the SHA-256 of the body received")
            if program_id in self._held:  # a concurrent upload of the same body won
                sink.discard()
                return program_id, False
            staged = await sink.keep(len(self._held), total)
        except BaseException:
            sink.discard()
            raise
        self._held[program_id] = staged
        return program_id, True

    async def _take(self, first: runtime_pb2.StageChunk,
                    rest: AsyncIterator[runtime_pb2.StageChunk], total: int, sink: _Sink
                    ) -> tuple[int, str]:
        hasher = hashlib.sha256()
        received = 0
        chunk: runtime_pb2.StageChunk | None = first
        while chunk is not None:
            received += len(chunk.data)
            if received > total:
                raise HostAbort.of(R.ERROR_REASON_FORMAT, "more program bytes than announced")
            hasher.update(chunk.data)
            sink.write(chunk.data)
            if self.bandwidth:
                await anyio.sleep(len(chunk.data) / self.bandwidth)
            chunk = await anext(rest, None)
        return received, hasher.hexdigest()


class _Sink:
    """Where one upload goes while it arrives: a temporary file, or a buffer."""

    def __init__(self, directory: Path | None, program_id: str) -> None:
        self.program_id = program_id
        self._final = directory / program_id if directory is not None else None
        self._buffer = bytearray()
        self._fd = -1
        self._path: Path | None = None
        if directory is not None:
            path = self._path = directory / f".{program_id[:16]}-{secrets.token_hex(4)}{_PARTIAL}"
            self._fd = self._guard(lambda: os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def _guard(self, step: Callable[[], _T]) -> _T:
        try:
            return step()
        except OSError as error:
            if _full(error):
                raise HostAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, R.ERROR_REASON_UNSPECIFIED,
                                f"staging directory is full ({error.strerror})") from None
            raise HostAbort.of(R.ERROR_REASON_INTERNAL,
                               f"staging directory: {error.strerror}") from None

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self._buffer += data
            return
        fd, view = self._fd, memoryview(data)
        while view:
            view = view[self._guard(functools.partial(os.write, fd, view)):]

    async def keep(self, order: int, size: int) -> Staged:
        if self._fd < 0:
            return Staged(self.program_id, size, order, body=bytes(self._buffer))
        fd, self._fd = self._fd, -1
        try:
            await anyio.to_thread.run_sync(lambda: self._guard(lambda: os.fsync(fd)))
        finally:
            os.close(fd)
        temporary, final = self._path, self._final
        assert temporary is not None and final is not None  # noqa: S101 - a file sink
        self._guard(lambda: os.replace(temporary, final))
        return Staged(self.program_id, size, order, path=final)

    def discard(self) -> None:
        self._buffer = bytearray()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._path is not None:
            self._path.unlink(missing_ok=True)
