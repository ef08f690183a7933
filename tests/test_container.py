"""The container layout: round trips, and malformed input rejected cleanly."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import FormatError
from orchestrator.qpc.container import (
    ENTRY,
    HEADER,
    MAGIC,
    Container,
    MemorySource,
    open_container,
)
from orchestrator.qpc.writer import bytes_segment, write_container


def build(segments: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    write_container(out, [bytes_segment(name, data) for name, data in segments.items()])
    return out.getvalue()


def test_layout_matches_the_documented_header_and_alignment() -> None:
    raw = build({"network.elf": b"\x01" * 13, "networkdesc.bin": b"abc", "x.crc": b""})
    magic, major, minor, compression, size, base, count, table = HEADER.unpack_from(raw)
    assert (magic, major, minor, compression) == (MAGIC, 0, 1, 0)
    assert size == len(raw) and base == 0 and count == 3 and table == 40
    for index in range(count):
        seg_size, _, name_ptr, start = ENTRY.unpack_from(raw, table + 32 * index)
        assert start % 8 == 0 and name_ptr % 8 == 0
        assert raw[name_ptr:].split(b"\0")[0] in (b"network.elf", b"networkdesc.bin", b"x.crc")
    container = Container(MemorySource(raw))
    assert container.read("network.elf") == b"\x01" * 13
    assert container.read("networkdesc.bin") == b"abc"
    assert container.read("x.crc") == b""


def test_reads_a_container_with_nonzero_base() -> None:
    """Pointers are absolute addresses of the writer's buffer: base is subtracted."""
    raw = bytearray(build({"network.elf": b"hello"}))
    base = 0x7F0000000000
    HEADER.pack_into(raw, 0, MAGIC, 0, 1, 0, len(raw), base, 1, 40 + base)
    size, offset, name_ptr, start = ENTRY.unpack_from(raw, 40)
    ENTRY.pack_into(raw, 40, size, offset, name_ptr + base, start + base)
    assert Container(MemorySource(bytes(raw))).read("network.elf") == b"hello"


def test_streams_segments_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.qpc"
    path.write_bytes(build({"network.elf": bytes(range(256)) * 40}))
    with open_container(path) as container:
        segment = container.segment("network.elf")
        pieces = list(container.iter_chunks(segment, 1000))
    assert [len(p) for p in pieces] == [1000] * 10 + [240]
    assert b"".join(pieces) == bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[:30], "too short"),
        (lambda r: b"\0\0\0\0" + r[4:], "not a program container"),
        (lambda r: r[:4] + b"\x07" + r[5:], "unsupported container version"),
        (lambda r: r[:-3], "header says"),
        (lambda r: _patch_u64(r, 24, 1 << 40), "absurd segment count"),
        (lambda r: _patch_u64(r, 32, 44), "not 8-byte aligned"),
        (lambda r: _patch_u64(r, 40, 1 << 30), "runs past the end"),
        (lambda r: _patch_u64(r, 56, 1 << 50), "is outside the container"),
        (lambda r: _patch_u64(r, 56, 3), "not NUL-terminated"),
        (lambda r: _patch_u64(r, 72 + 24, 40), "overlaps"),
    ],
)
def test_malformed_containers_are_rejected_with_a_clear_error(mutate, message) -> None:  # type: ignore[no-untyped-def]
    raw = build({"network.elf": b"A" * 64, "constants.bin": b"B" * 64})
    with pytest.raises(FormatError, match=message):
        Container(MemorySource(mutate(raw)))


def test_bad_and_duplicate_names_are_rejected() -> None:
    raw = bytearray(build({"network.elf": b"A", "networkdesc.bin": b"B"}))
    name_at = raw.index(b"networkdesc.bin")
    raw[name_at : name_at + 11] = b"network.elf"
    raw[name_at + 11 : name_at + 15] = b"\0\0\0\0"
    with pytest.raises(FormatError, match="appears twice"):
        Container(MemorySource(bytes(raw)))
    raw = bytearray(build({"network.elf": b"A"}))
    raw[raw.index(b"network.elf")] = ord("/")
    with pytest.raises(FormatError, match="invalid name"):
        Container(MemorySource(bytes(raw)))


def _patch_u64(raw: bytes, at: int, value: int) -> bytes:
    return raw[:at] + struct.pack("<Q", value) + raw[at + 8 :]


class CountingSource(MemorySource):
    """Records every read so the test can show none goes past the end."""

    def __init__(self, buffer: bytes) -> None:
        super().__init__(buffer)
        self.largest_end = 0
        self.total_read = 0

    def read_at(self, offset: int, size: int) -> bytes:
        self.largest_end = max(self.largest_end, offset + size)
        self.total_read += size
        return super().read_at(offset, size)


_VALID = build({"network.elf": b"E" * 200, "networkdesc.bin": b"D" * 24, "constants.bin": b""})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(_VALID)))
def test_mutated_containers_never_crash_or_read_past_the_end(flips, cut) -> None:  # type: ignore[no-untyped-def]
    raw = bytearray(_VALID[: max(cut, 0)] if cut < len(_VALID) // 2 else _VALID)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    source = CountingSource(bytes(raw))
    try:
        container = Container(source)
        for segment in container.segments:
            container.read(segment.name)
    except FormatError as err:
        assert str(err)  # one clear message
    assert source.largest_end <= len(raw)
    assert source.total_read <= 4 * len(raw) + 4096  # nothing allocated from untrusted sizes
