"""Sealing a plaintext container into an encrypted one (docs/formats.md, "Encrypted
container"): the encryption info, each segment as streamed-AEAD ciphertext or an
allow-listed plaintext descriptor, MDP partitions as nested sealed containers,
key slots last. Opening one is crypto/container.py."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orchestrator._proto.modelip.v1 import evidence_pb2
from orchestrator.crypto import stream
from orchestrator.crypto.container import (
    ENCINFO,
    FORMAT_VERSION,
    KEYSLOTS,
    PLAINTEXT_ALLOWLIST,
    RESERVED,
    SealSettings,
    encode_key_slots,
)
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.wrap import KeySlot
from orchestrator.errors import FormatError
from orchestrator.qpc.container import VERSION_MINOR, Container, SliceSource
from orchestrator.qpc.mdp import read_mdp_meta
from orchestrator.qpc.writer import (
    SegmentSpec,
    bytes_segment,
    container_pieces,
    container_size,
    write_container,
)


def seal_specs(
    source: Container,
    mek: MEK,
    settings: SealSettings,
    *,
    key_slots: Sequence[KeySlot] | None,
    partition: int = 0,
    partition_count: int = 0,
    parent_salt: bytes = b"",
) -> list[SegmentSpec]:
    """The segments of the encrypted form of ``source`` (streamed producers).

    ``key_slots`` None makes a nested container (no key-slot segment); a list
    (possibly empty) makes a top-level one. Raises FormatError for containers
    that cannot be sealed (reserved names, nothing to encrypt).
    """
    for name in source.names():
        if name in RESERVED:
            raise FormatError(source.label, f"is already encrypted (has {name!r})")
    meta = read_mdp_meta(source)
    nested_names = {p.segment: p.index for p in meta.partitions} if meta else {}
    if parent_salt:
        salt = nested_salt(parent_salt, partition)
    else:
        salt = settings.salt or secrets.token_bytes(stream.SALT_BYTES)
    info = evidence_pb2.EncryptionInfo(
        format_version=FORMAT_VERSION,
        aead="AES-128-GCM",
        kdf="HKDF-SHA256",
        salt=salt,
        chunk_size=settings.chunk_size,
        model_id=settings.model_id,
        model_version=settings.model_version,
        mek_check=stream.derive_mek_check(mek, salt),
        policy=evidence_pb2.Policy(
            not_after=settings.policy.not_after,
            min_firmware=settings.policy.min_firmware,
            rollback_floor=(settings.model_version if settings.policy.rollback_floor is None
                            else settings.policy.rollback_floor),
        ),
        partition=partition,
        partition_count=partition_count,
        parent_salt=parent_salt,
        container_minor=VERSION_MINOR,
        compression=source.header.compression,
    )
    body: list[tuple[SegmentSpec, evidence_pb2.SegmentInfo]] = []
    stream_index = 0
    for segment in source.segments:
        entry = evidence_pb2.SegmentInfo(name=segment.name, plaintext_size=segment.size,
                                         offset=segment.offset)
        if segment.name in nested_names:
            inner = Container(
                SliceSource(source.source, segment.file_offset, segment.size),
                label=f"{source.label}:{segment.name}",
            )
            inner_specs = seal_specs(
                inner, mek, settings, key_slots=None, partition=nested_names[segment.name],
                partition_count=len(nested_names), parent_salt=salt,
            )
            entry.nested = True
            entry.nested_size = container_size(inner_specs)
            entry.nested_info_sha256 = hashlib.sha256(
                b"".join(bytes(piece) for piece in inner_specs[0].chunks())).digest()
            body.append((SegmentSpec(segment.name, container_size(inner_specs),
                                     _nested_producer(inner_specs, inner.header.compression),
                                     segment.offset), entry))
        elif segment.name in PLAINTEXT_ALLOWLIST:
            data = source.read(segment.name)
            entry.plaintext_sha256 = hashlib.sha256(data).digest()
            body.append((bytes_segment(segment.name, data, offset=segment.offset), entry))
        else:
            entry.encrypted = True
            entry.stream_index = stream_index
            stream_index += 1
            body.append((SegmentSpec(segment.name, 0, lambda: (), segment.offset), entry))
        info.segments.append(entry)
    if stream_index == 0 and not nested_names:
        raise FormatError(source.label, "has no model-bearing segment to encrypt")
    info_bytes = info.SerializeToString(deterministic=True)
    aead = stream.derive_content_key(mek, salt, settings.model_id)
    digest = stream.info_digest(info_bytes)
    specs = [bytes_segment(ENCINFO, info_bytes + stream.seal_info(aead, info_bytes))]
    for (spec, entry), segment in zip(body, source.segments, strict=True):
        if entry.encrypted:
            aad = stream.chunk_aad(digest, segment.name)
            spec = SegmentSpec(
                segment.name,
                stream.ciphertext_size(segment.size, settings.chunk_size),
                _encrypting_producer(source, segment.index, entry.stream_index, aad, aead,
                                     settings.chunk_size),
                segment.offset,
                _encrypting_writer(source, segment.index, entry.stream_index, aad, aead,
                                   settings.chunk_size, settings.workers),
            )
        specs.append(spec)
    if key_slots is not None:
        specs.append(bytes_segment(KEYSLOTS, encode_key_slots(key_slots)))
    return specs


def nested_salt(parent_salt: bytes, partition: int) -> bytes:
    """A partition's salt, derived from its container's (distinct per partition, as
    unpredictable as the parent's): the top-level salt alone reproduces a body."""
    return hashlib.sha256(b"modelip nested salt\0" + parent_salt
                          + partition.to_bytes(4, "big")).digest()[:stream.SALT_BYTES]


def write_sealed(handle: BinaryIO, source: Container, mek: MEK, settings: SealSettings, *,
                 key_slots: Sequence[KeySlot]) -> int:
    """Write the encrypted form of ``source`` (with ``key_slots``); returns its size.

    The header keeps the source's compression type, as the encryption info
    records it (both are compared when the container is opened).
    """
    return write_container(handle, seal_specs(source, mek, settings, key_slots=key_slots),
                           compression=source.header.compression)


def _nested_producer(specs: list[SegmentSpec], compression: int
                     ) -> Callable[[], Iterator[bytes | memoryview]]:
    return lambda: container_pieces(specs, compression=compression)


def _encrypting_writer(source: Container, index: int, stream_index: int, aad: bytes,
                       aead: AESGCM, chunk_size: int, workers: int
                       ) -> Callable[[int, int], None] | None:
    segment = source.segments[index]
    origin = source.source.fd_at(segment.file_offset)
    if origin is None:
        return None
    position = origin

    def write_at(fd: int, offset: int) -> None:
        stream.encrypt_file_range(aead, stream_index, aad, position, segment.size, chunk_size,
                                  (fd, offset), workers=workers)

    return write_at


def _encrypting_producer(source: Container, index: int, stream_index: int, aad: bytes,
                         aead: AESGCM, chunk_size: int) -> Callable[[], Iterator[bytes]]:
    segment = source.segments[index]

    def produce() -> Iterator[bytes]:
        return stream.encrypt_stream(
            aead, stream_index, aad, source.iter_chunks(segment, chunk_size), segment.size,
            chunk_size,
        )

    return produce
