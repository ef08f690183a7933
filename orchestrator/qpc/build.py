"""Building plaintext containers from files: plain and multi-device (MDP)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestrator.atomicfile import atomic_output
from orchestrator.errors import FileInputError, UsageError
from orchestrator.qpc.container import check_segment_name, open_container
from orchestrator.qpc.mdp import MDP_META, MdpMeta, Partition, partition_segment_name
from orchestrator.qpc.writer import SegmentSpec, bytes_segment, write_container

READ_CHUNK = 8 << 20


def file_segment(name: str, path: str | os.PathLike[str], *, offset: int = 0) -> SegmentSpec:
    """A segment streamed from a file (never held in memory whole)."""
    check_segment_name(name)
    source = Path(path)
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        raise FileInputError(source, "segment file not found") from None
    if not source.is_file():
        raise FileInputError(source, "is not a regular file")

    def chunks() -> Iterator[bytes]:
        with open(source, "rb") as handle:
            while piece := handle.read(READ_CHUNK):
                yield piece

    return SegmentSpec(name, size, chunks, offset)


def pack_files(output: str | os.PathLike[str], segments: Sequence[tuple[str, str]], *,
               overwrite: bool = False) -> int:
    """Write a plain container of (name, file) segments; returns its size."""
    if not segments:
        raise UsageError("pack: give at least one --segment NAME=FILE")
    specs = [file_segment(name, path) for name, path in segments]
    with atomic_output(output, overwrite=overwrite) as handle:
        return write_container(handle, specs)


def pack_mdp(output: str | os.PathLike[str], partitions: Sequence[str],
             meta: MdpMeta | None = None, *, overwrite: bool = False) -> int:
    """Write an MDP container from partition containers, in pipeline order."""
    if not partitions:
        raise UsageError("pack: an MDP container needs at least one partition")
    for path in partitions:
        with open_container(path):
            pass  # each partition must itself be a valid container
    if meta is None:
        meta = MdpMeta(tuple(Partition(i, partition_segment_name(i))
                             for i in range(len(partitions))))
    specs = [bytes_segment(MDP_META, meta.encode())]
    specs += [file_segment(p.segment, path) for p, path in zip(meta.partitions, partitions,
                                                                strict=True)]
    with atomic_output(output, overwrite=overwrite) as handle:
        return write_container(handle, specs)
