"""The program container (QPC): reading its real layout (writing: qpc/writer.py).

The layout is documented in docs/formats.md. The reader trusts nothing in the
file: every count, size, pointer and name is checked against the file's real
length before anything is allocated or read, so a malformed container ends in
FormatError, never in a crash, a hang or a read past the end.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from orchestrator.errors import FileInputError, FormatError

MAGIC = 0x00A1CD7C
VERSION_MAJOR = 0
VERSION_MINOR = 1
COMPRESSION_FASTPATH = 0
COMPRESSION_SLOWPATH = 1

HEADER = struct.Struct("<IBBHQQQQ")  # magic, major, minor, compression, size, base, n, table
ENTRY = struct.Struct("<QQQQ")  # size, offset, name pointer, start pointer
ALIGN = 8
MAX_SEGMENTS = 4096
MAX_NAME_BYTES = 255
_NAME_RE = re.compile(rb"[A-Za-z0-9_+\-][A-Za-z0-9._+\-]{0,254}")

assert HEADER.size == 40 and ENTRY.size == 32  # noqa: S101 - layout facts


def align_up(value: int) -> int:
    """Round ``value`` up to the container's 8-byte alignment."""
    return (value + ALIGN - 1) & ~(ALIGN - 1)


def check_segment_name(name: str) -> bytes:
    """Return ``name`` as bytes if it is a valid segment name, else raise FormatError."""
    raw = name.encode("ascii", "replace")
    if not _NAME_RE.fullmatch(raw):
        raise FormatError(f"segment name {name!r}", "must be 1-255 of A-Z a-z 0-9 . _ + -")
    return raw


class ByteSource(Protocol):
    """Random-access bytes: a file on disk or a buffer in (card) memory."""

    @property
    def length(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytes: ...

    def fd_at(self, offset: int) -> tuple[int, int] | None:
        """(file descriptor, absolute offset) for positioned I/O, if file-backed."""


class FileSource:
    """A ByteSource over an open file descriptor (pread: no shared position)."""

    def __init__(self, fd: int, length: int) -> None:
        self._fd = fd
        self._length = length

    @property
    def length(self) -> int:
        return self._length

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self._length:
            raise FormatError("container", f"read of {size} bytes at {offset} is past the end")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise FormatError("container", "file shrank while being read")
        return data

    def fd_at(self, offset: int) -> tuple[int, int] | None:
        return self._fd, offset


class MemorySource:
    """A ByteSource over bytes already in memory."""

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(buffer).cast("B")

    @property
    def length(self) -> int:
        return len(self._view)

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self._view):
            raise FormatError("container", f"read of {size} bytes at {offset} is past the end")
        return bytes(self._view[offset : offset + size])

    def fd_at(self, offset: int) -> tuple[int, int] | None:
        return None

    def view(self, offset: int, size: int) -> memoryview:
        """Zero-copy view of a range (bounds-checked)."""
        if offset < 0 or size < 0 or offset + size > len(self._view):
            raise FormatError("container", f"range of {size} bytes at {offset} is past the end")
        return self._view[offset : offset + size]


class SliceSource:
    """A ByteSource over a range of another (a container nested in a segment)."""

    def __init__(self, parent: ByteSource, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > parent.length:
            raise FormatError("container", "nested range is past the end")
        self._parent = parent
        self._offset = offset
        self._length = length

    @property
    def length(self) -> int:
        return self._length

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self._length:
            raise FormatError("container", f"read of {size} bytes at {offset} is past the end")
        return self._parent.read_at(self._offset + offset, size)

    def fd_at(self, offset: int) -> tuple[int, int] | None:
        return self._parent.fd_at(self._offset + offset)


@dataclass(frozen=True, slots=True)
class Segment:
    """One entry of the segment table, with its data's position in the file."""

    index: int
    name: str
    size: int
    offset: int  # the table's `offset` field (meaningful for constants.bin only)
    file_offset: int  # where the data starts in the file


@dataclass(frozen=True, slots=True)
class Header:
    major: int
    minor: int
    compression: int
    size: int
    base: int
    count: int
    table_pointer: int


class Container:
    """A parsed, validated container over a ByteSource. Segment data is read lazily."""

    def __init__(self, source: ByteSource, *, label: str = "container") -> None:
        self.source = source
        self.label = label
        self.header = _parse_header(source, label)
        self.segments: tuple[Segment, ...] = _parse_table(source, self.header, label)
        self._by_name = {segment.name: segment for segment in self.segments}

    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    def has(self, name: str) -> bool:
        return name in self._by_name

    def segment(self, name: str) -> Segment:
        """The segment called ``name``; FormatError if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise FormatError(self.label, f"has no segment {name!r}") from None

    def read(self, name: str) -> bytes:
        """The whole data of one segment (use only for small segments)."""
        segment = self.segment(name)
        return self.source.read_at(segment.file_offset, segment.size)

    def iter_chunks(self, segment: Segment, chunk_size: int) -> Iterator[bytes]:
        """Stream a segment's data in pieces of at most ``chunk_size`` bytes."""
        position = 0
        while position < segment.size:
            take = min(chunk_size, segment.size - position)
            yield self.source.read_at(segment.file_offset + position, take)
            position += take


def _parse_header(source: ByteSource, label: str) -> Header:
    if source.length < HEADER.size:
        raise FormatError(label, f"too short for a container header ({source.length} bytes)")
    magic, major, minor, compression, size, base, count, table = HEADER.unpack(
        source.read_at(0, HEADER.size)
    )
    if magic != MAGIC:
        raise FormatError(label, f"not a program container (magic {magic:#010x})")
    if major != VERSION_MAJOR:
        raise FormatError(label, f"unsupported container version {major}.{minor}")
    if compression not in (COMPRESSION_FASTPATH, COMPRESSION_SLOWPATH):
        raise FormatError(label, f"unknown compression type {compression}")
    if size > source.length:
        raise FormatError(label, f"header says {size} bytes but the file has {source.length}")
    if size < HEADER.size:
        raise FormatError(label, f"header size {size} is smaller than the header")
    if count > MAX_SEGMENTS or count * ENTRY.size > size:
        raise FormatError(label, f"absurd segment count {count}")
    return Header(major, minor, compression, size, base, count, table)


def _relative(pointer: int, header: Header, label: str, what: str) -> int:
    offset = pointer - header.base
    if offset < 0 or offset > header.size:
        raise FormatError(label, f"{what} pointer {pointer:#x} is outside the container")
    return offset


def _parse_table(source: ByteSource, header: Header, label: str) -> tuple[Segment, ...]:
    table = _relative(header.table_pointer, header, label, "segment table")
    if table % ALIGN:
        raise FormatError(label, "segment table is not 8-byte aligned")
    table_end = table + header.count * ENTRY.size
    if table < HEADER.size or table_end > header.size:
        raise FormatError(label, "segment table is out of bounds")
    raw_table = source.read_at(table, table_end - table)
    regions: list[tuple[int, int, str]] = [(0, HEADER.size, "header"), (table, table_end, "table")]
    segments: list[Segment] = []
    seen: set[str] = set()
    for index in range(header.count):
        size, field_offset, name_pointer, start_pointer = ENTRY.unpack_from(
            raw_table, index * ENTRY.size
        )
        name_at = _relative(name_pointer, header, label, f"segment {index} name")
        name = _read_name(source, name_at, header.size, label, index)
        if name in seen:
            raise FormatError(label, f"segment name {name!r} appears twice")
        seen.add(name)
        start = _relative(start_pointer, header, label, f"segment {name!r} data")
        if start % ALIGN:
            raise FormatError(label, f"segment {name!r} data is not 8-byte aligned")
        if size > header.size - start:
            raise FormatError(label, f"segment {name!r} ({size} bytes) runs past the end")
        if field_offset > size:
            raise FormatError(label, f"segment {name!r} offset field exceeds its size")
        regions.append((name_at, name_at + len(name) + 1, f"name of {name!r}"))
        if size:
            regions.append((start, start + size, f"segment {name!r}"))
        segments.append(Segment(index, name, size, field_offset, start))
    regions.sort()
    for (_, end_a, what_a), (start_b, _, what_b) in zip(regions, regions[1:], strict=False):
        if start_b < end_a:
            raise FormatError(label, f"{what_a} overlaps {what_b}")
    return tuple(segments)


def _read_name(source: ByteSource, at: int, limit: int, label: str, index: int) -> str:
    window = source.read_at(at, min(MAX_NAME_BYTES + 1, limit - at))
    end = window.find(b"\0")
    if end <= 0:
        raise FormatError(label, f"segment {index} name is empty or not NUL-terminated")
    raw = window[:end]
    if not _NAME_RE.fullmatch(raw):
        raise FormatError(label, f"segment {index} has an invalid name {raw[:40]!r}")
    return raw.decode("ascii")


def open_container(path: str | os.PathLike[str], *, label: str | None = None) -> OpenContainer:
    """Open and validate a container file; use as a context manager."""
    return OpenContainer(path, label=label)


class OpenContainer:
    """Context manager that owns the file descriptor behind a Container."""

    def __init__(self, path: str | os.PathLike[str], *, label: str | None = None) -> None:
        self.path = os.fspath(path)
        self.label = label or self.path
        self._fd: int | None = None

    def __enter__(self) -> Container:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileInputError(self.path, "no such file") from None
        except IsADirectoryError:
            raise FileInputError(self.path, "is a directory, not a container file") from None
        except OSError as exc:
            raise FileInputError(self.path, exc.strerror or "cannot open") from None
        try:
            info = os.fstat(self._fd)
            if stat.S_ISDIR(info.st_mode):  # open(2) lets a directory be opened to read
                raise FileInputError(self.path, "is a directory, not a container file")
            if not stat.S_ISREG(info.st_mode):
                raise FileInputError(self.path, "is not a regular file")
            return Container(FileSource(self._fd, info.st_size), label=self.label)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
