"""Writing containers (docs/formats.md): the layout of header, table and names, the
pieces a writer streams in order, and rewriting the last segment of an existing
container in place. Reading and validating them is qpc/container.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from orchestrator.errors import FormatError
from orchestrator.qpc.container import (
    COMPRESSION_FASTPATH,
    ENTRY,
    HEADER,
    MAGIC,
    MAX_SEGMENTS,
    VERSION_MAJOR,
    VERSION_MINOR,
    Container,
    Segment,
    align_up,
    check_segment_name,
)


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """A segment to write: its name, exact size and a producer of its bytes."""

    name: str
    size: int
    chunks: Callable[[], Iterable[bytes | memoryview]]
    offset: int = 0
    # Optional fast path for real files: write the data at (fd, file offset)
    # with positioned I/O instead of streaming it through ``chunks``.
    write_at: Callable[[int, int], None] | None = None


def bytes_segment(name: str, data: bytes, *, offset: int = 0) -> SegmentSpec:
    """A SegmentSpec for data already in memory (small segments)."""
    return SegmentSpec(name, len(data), lambda: (data,), offset)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything goes in a container with base 0."""

    table: int
    name_offsets: tuple[int, ...]
    starts: tuple[int, ...]
    total: int


def plan_layout(names: Sequence[str], sizes: Sequence[int]) -> Layout:
    """Place header, table, names and data, each 8-byte aligned."""
    if len(names) > MAX_SEGMENTS:
        raise FormatError("container", f"too many segments ({len(names)})")
    if len(set(names)) != len(names):
        raise FormatError("container", "duplicate segment names")
    table = HEADER.size
    cursor = table + len(names) * ENTRY.size
    name_offsets = []
    for name in names:
        cursor = align_up(cursor)
        name_offsets.append(cursor)
        cursor += len(check_segment_name(name)) + 1
    starts = []
    for size in sizes:
        cursor = align_up(cursor)
        starts.append(cursor)
        cursor += size
    return Layout(table, tuple(name_offsets), tuple(starts), cursor)


def encode_metadata(
    names: Sequence[str],
    sizes: Sequence[int],
    offsets: Sequence[int],
    layout: Layout,
    *,
    compression: int = COMPRESSION_FASTPATH,
) -> bytes:
    """Header + table + names, up to the first data byte (base 0)."""
    head = bytearray(
        HEADER.pack(
            MAGIC, VERSION_MAJOR, VERSION_MINOR, compression, layout.total, 0, len(names),
            layout.table,
        )
    )
    for size, offset, name_at, start in zip(
        sizes, offsets, layout.name_offsets, layout.starts, strict=True
    ):
        head += ENTRY.pack(size, offset, name_at, start)
    for name, name_at in zip(names, layout.name_offsets, strict=True):
        head += b"\0" * (name_at - len(head))
        head += name.encode("ascii") + b"\0"
    return bytes(head)


def container_size(segments: Sequence[SegmentSpec]) -> int:
    """Total size of the container ``segments`` would make."""
    return plan_layout([s.name for s in segments], [s.size for s in segments]).total


def container_pieces(
    segments: Sequence[SegmentSpec], *, compression: int = COMPRESSION_FASTPATH
) -> Iterator[bytes | memoryview]:
    """The bytes of a container, streamed: metadata, padding, each segment's data.

    Raises FormatError if a producer yields more or fewer bytes than its size.
    """
    names = [segment.name for segment in segments]
    sizes = [segment.size for segment in segments]
    layout = plan_layout(names, sizes)
    head = encode_metadata(
        names, sizes, [s.offset for s in segments], layout, compression=compression
    )
    yield head
    written = len(head)
    for segment, start in zip(segments, layout.starts, strict=True):
        if start > written:
            yield bytes(start - written)
        written = start
        for piece in segment.chunks():
            written += len(piece)
            if written > start + segment.size:
                break
            yield piece
        if written != start + segment.size:
            raise FormatError(
                f"segment {segment.name!r}",
                f"produced {written - start} bytes, declared {segment.size}",
            )


def write_container(
    handle: BinaryIO, segments: Sequence[SegmentSpec], *, compression: int = COMPRESSION_FASTPATH
) -> int:
    """Write a container to ``handle``; returns its total size.

    Segments with a ``write_at`` fast path are written with positioned I/O on
    the handle's file descriptor; the others are streamed.
    """
    if not any(segment.write_at for segment in segments):
        total = 0
        for piece in container_pieces(segments, compression=compression):
            handle.write(piece)
            total += len(piece)
        return total
    names = [segment.name for segment in segments]
    layout = plan_layout(names, [segment.size for segment in segments])
    handle.write(encode_metadata(names, [s.size for s in segments], [s.offset for s in segments],
                                 layout, compression=compression))
    handle.truncate(layout.total)  # sized up front: positioned writes fill it in
    for segment, start in zip(segments, layout.starts, strict=True):
        if segment.write_at is not None:
            handle.flush()
            segment.write_at(handle.fileno(), start)
        else:
            handle.seek(start)
            written = 0
            for piece in segment.chunks():
                handle.write(piece)
                written += len(piece)
            if written != segment.size:
                raise FormatError(f"segment {segment.name!r}",
                                  f"produced {written} bytes, declared {segment.size}")
    handle.seek(layout.total)
    handle.truncate(layout.total)
    return layout.total


def rewrite_last_segment(fd: int, container: Container, data: bytes) -> None:
    """Replace the data of the container's last segment, in place and crash-safe.

    The new data goes where it overlaps nothing live (right after the other
    segments, or after the current copy), is fsynced, and only then does one
    write of the header and table (the commit point, a few hundred bytes at the
    start of the file) switch to it; the file is then trimmed. A kill at any
    instant leaves a container that reads with either the old or the new data.
    """
    if not container.segments:
        raise FormatError(container.label, "has no segments")
    last = container.segments[-1]
    if container.header.base != 0:
        raise FormatError(container.label, "in-place rewrite needs a container with base 0")
    others_end = max(
        [container.header.table_pointer + container.header.count * ENTRY.size]
        + [s.file_offset + s.size for s in container.segments[:-1]]
    )
    home = align_up(others_end)
    names_end = max(
        _name_end(container, segment) for segment in container.segments
    )
    home = max(home, align_up(names_end))
    if home + len(data) <= last.file_offset:
        start = home
    else:
        start = align_up(max(home, last.file_offset + last.size))
    total = start + len(data)
    os.pwrite(fd, data, start)
    os.fsync(fd)
    sizes = [s.size for s in container.segments[:-1]] + [len(data)]
    head = bytearray(source_head(container))
    HEADER.pack_into(
        head, 0, MAGIC, container.header.major, container.header.minor,
        container.header.compression, total, 0, container.header.count,
        container.header.table_pointer,
    )
    table = container.header.table_pointer
    entry_at = table + last.index * ENTRY.size
    ENTRY.pack_into(head, entry_at, sizes[-1], last.offset,
                    _name_pointer(container, last), start)
    os.pwrite(fd, bytes(head), 0)  # the commit point
    os.fsync(fd)
    os.ftruncate(fd, total)
    os.fsync(fd)


def source_head(container: Container) -> bytes:
    """Header and segment table bytes, as they are in the file."""
    end = container.header.table_pointer + container.header.count * ENTRY.size
    return container.source.read_at(0, end)


def _name_pointer(container: Container, segment: Segment) -> int:
    raw = container.source.read_at(
        container.header.table_pointer + segment.index * ENTRY.size, ENTRY.size
    )
    return int(ENTRY.unpack(raw)[2])


def _name_end(container: Container, segment: Segment) -> int:
    return _name_pointer(container, segment) + len(segment.name) + 1
