"""Encrypted containers: their format, key slots, and opening a sealed one (sealing
a plaintext container: crypto/seal.py).

Layout (docs/formats.md, "Encrypted container"): the same container format;
first the ``modelip_encinfo`` segment (EncryptionInfo bytes + a 16-byte tag that
authenticates them under the MEK), then the original segments in order
(model-bearing ones as streamed-AEAD ciphertext, allow-listed descriptors in
plaintext with their digests in the info, MDP partitions as nested encrypted
containers), then ``modelip_keyslots`` LAST, outside every chunk's associated
data, so replacing key slots never touches the model body.
"""

from __future__ import annotations

import hashlib
import mmap
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from orchestrator._proto.modelip.v1 import evidence_pb2
from orchestrator.crypto import stream
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.wrap import Kem, KeySlot
from orchestrator.errors import FormatError, IntegrityError, WrongMEKError
from orchestrator.qpc.container import Container, MemorySource, SliceSource
from orchestrator.qpc.mdp import MDP_META, MdpMeta

FORMAT_VERSION = 3  # 2: header fields and offsets authenticated, slots bound to a program;
#                    3: nested partitions bound by size and info digest, receipts by slot
ENCINFO = "modelip_encinfo"
KEYSLOTS = "modelip_keyslots"
RESERVED = frozenset({ENCINFO, KEYSLOTS})
# Segments that stay readable by the host: descriptors it needs to set up
# buffers, and our own plaintext metadata. Everything else is encrypted.
PLAINTEXT_ALLOWLIST = frozenset({"networkdesc.bin", "constantsdesc.bin", MDP_META, "io_desc.json"})
MAX_INFO_BYTES = 1 << 20
MAX_SLOTS = 4096


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """Policy the card enforces before decrypting (bound into the encryption info)."""

    not_after: int = 0
    min_firmware: str = ""
    rollback_floor: int | None = None  # None: the model's version (no going back)


@dataclass(frozen=True, slots=True)
class SealSettings:
    model_id: str
    model_version: int = 1
    policy: ContentPolicy = field(default_factory=ContentPolicy)
    chunk_size: int = stream.DEFAULT_CHUNK
    # Processes for large segments; >1 only where forking is safe (the CLI).
    workers: int = 1
    # None: a fresh random salt (always, but to reproduce a recorded encryption of
    # the same source under the same MEK bit for bit: the caller guarantees that,
    # since one salt over two plaintexts would reuse (key, nonce) pairs).
    salt: bytes | None = None

    def __post_init__(self) -> None:
        if self.salt is not None and len(self.salt) != stream.SALT_BYTES:
            raise FormatError("salt", f"must be {stream.SALT_BYTES} bytes")
        if not stream.MIN_CHUNK <= self.chunk_size <= stream.MAX_CHUNK:
            raise FormatError("chunk size", f"must be between {stream.MIN_CHUNK} and "
                              f"{stream.MAX_CHUNK} bytes")
        if not self.model_id or len(self.model_id) > 256:
            raise FormatError("model id", "must be 1-256 characters")


# --- plaintext buffers -------------------------------------------------------------

PlainBuffer = bytearray | mmap.mmap
_MAP_THRESHOLD = 1 << 20


def allocate_plaintext(size: int) -> PlainBuffer:
    """Writable memory for a decrypted segment.

    Large buffers are anonymous mappings: the kernel hands out zero pages as
    they are first written, instead of ``bytearray`` zero-filling the whole
    size up front while holding the interpreter (seconds of stall per GiB).
    """
    return mmap.mmap(-1, size) if size >= _MAP_THRESHOLD else bytearray(size)


def wipe_plaintext(buffer: PlainBuffer) -> None:
    """Overwrite a plaintext buffer with zeros, a MiB at a time."""
    view = memoryview(buffer)
    zeros = bytes(min(len(view), _MAP_THRESHOLD))
    for start in range(0, len(view), len(zeros) or 1):
        piece = view[start : start + len(zeros)]
        piece[:] = zeros[: len(piece)]
    view.release()


# --- key slots ------------------------------------------------------------------


def encode_key_slots(slots: Sequence[KeySlot]) -> bytes:
    table = evidence_pb2.KeySlotTable(format_version=FORMAT_VERSION)
    for slot in slots:
        table.slots.add(slot=slot.slot, card_id=slot.card_id, session_id=slot.session_id,
                        kem=slot.kem.value, enc=slot.enc, wrapped_mek=slot.wrapped_mek,
                        program_info_digest=slot.program)
    return table.SerializeToString(deterministic=True)


def key_slots_from_proto(table: evidence_pb2.KeySlotTable, *, source: str) -> list[KeySlot]:
    if table.format_version != FORMAT_VERSION:
        raise FormatError(source, f"unsupported key-slot table version {table.format_version}")
    if len(table.slots) > MAX_SLOTS:
        raise FormatError(source, "too many key slots")
    return [
        KeySlot(s.slot, s.card_id, s.session_id, Kem.parse(s.kem), s.enc, s.wrapped_mek,
                s.program_info_digest)
        for s in table.slots
    ]


def decode_key_slots(raw: bytes, *, source: str) -> list[KeySlot]:
    try:
        table = evidence_pb2.KeySlotTable.FromString(raw)
    except DecodeError:
        raise FormatError(source, "key-slot segment is malformed") from None
    return key_slots_from_proto(table, source=source)


# --- opening ------------------------------------------------------------------------


class SealedContainer:
    """An encrypted container, parsed and checked for shape (no key needed).

    ``open(mek)`` authenticates the encryption info; ``decrypt_*`` then verify
    every chunk. Nothing here trusts the file: sizes come from the info, which
    is authenticated before any of them is used for decryption.
    """

    def __init__(self, container: Container) -> None:
        self.container = container
        self.label = container.label
        if not container.has(ENCINFO):
            raise FormatError(self.label, "is not an encrypted container (no encryption info)")
        raw = container.read(ENCINFO)
        if len(raw) > MAX_INFO_BYTES or len(raw) <= stream.TAG_BYTES:
            raise FormatError(self.label, "encryption info has an impossible size")
        self.info_bytes, self.info_tag = raw[: -stream.TAG_BYTES], raw[-stream.TAG_BYTES :]
        try:
            self.info = evidence_pb2.EncryptionInfo.FromString(self.info_bytes)
        except DecodeError:
            raise FormatError(self.label, "encryption info is malformed") from None
        if self.info.format_version != FORMAT_VERSION:
            raise FormatError(self.label,
                              f"unsupported encryption format {self.info.format_version}")
        if not stream.MIN_CHUNK <= self.info.chunk_size <= stream.MAX_CHUNK:
            raise FormatError(self.label, "encryption info has an impossible chunk size")
        if len(self.info.salt) != stream.SALT_BYTES:
            raise FormatError(self.label, "encryption info has a bad salt")
        self.key_slots: list[KeySlot] = (
            decode_key_slots(container.read(KEYSLOTS), source=self.label)
            if container.has(KEYSLOTS) else []
        )
        self.has_key_slot_segment = container.has(KEYSLOTS)
        if self.has_key_slot_segment and container.segments[-1].name != KEYSLOTS:
            raise FormatError(self.label, "key-slot segment is not the last segment")
        self._aead: AESGCM | None = None

    @property
    def segment_infos(self) -> list[evidence_pb2.SegmentInfo]:
        return list(self.info.segments)

    def check_mek(self, mek: MEK) -> None:
        """WrongMEKError if ``mek`` is not this container's key."""
        expected = stream.derive_mek_check(mek, self.info.salt)
        if not secrets.compare_digest(expected, self.info.mek_check):
            raise WrongMEKError(f"{self.label}: the MEK given is not the one this model was "
                                "encrypted with (or its encryption info was altered)")

    def open(self, mek: MEK) -> SealedContainer:
        """Authenticate the encryption info with ``mek``; returns self.

        Raises WrongMEKError or IntegrityError.
        """
        aead = stream.derive_content_key(mek, self.info.salt, self.info.model_id)
        try:
            stream.open_info(aead, self.info_bytes, self.info_tag)
        except IntegrityError:
            # Tell a wrong key from tampering where the key commitment can.
            self.check_mek(mek)
            raise IntegrityError(f"{self.label}: encryption info was altered "
                                 "(authentication failed)") from None
        self._check_table()
        self._aead = aead
        return self

    def _check_table(self) -> None:
        """Everything in the plaintext header and table that changes how a card reads
        the container must be what the (authenticated) encryption info says."""
        header = self.container.header
        if (header.minor, header.compression) != (self.info.container_minor,
                                                   self.info.compression):
            raise IntegrityError(f"{self.label}: container header was altered (version "
                                 f"0.{header.minor}, compression {header.compression}; the "
                                 f"encryption info says 0.{self.info.container_minor}, "
                                 f"{self.info.compression})")
        names = [s.name for s in self.container.segments]
        expected = [ENCINFO, *[entry.name for entry in self.info.segments]]
        if self.has_key_slot_segment:
            expected.append(KEYSLOTS)
        if names != expected:
            raise IntegrityError(f"{self.label}: segment table does not match the encryption "
                                 "info (segments added, removed, renamed or reordered)")
        for reserved in (ENCINFO, KEYSLOTS):
            if self.container.has(reserved) and self.container.segment(reserved).offset:
                raise IntegrityError(f"{self.label}: segment {reserved!r} has an offset field")
        for entry in self.info.segments:
            segment = self.container.segment(entry.name)
            if segment.offset != entry.offset:
                raise IntegrityError(f"{self.label}: segment {entry.name!r} offset field was "
                                     f"altered ({segment.offset}, sealed as {entry.offset})")
            if entry.encrypted:
                want = stream.ciphertext_size(entry.plaintext_size, self.info.chunk_size)
                if segment.size != want:
                    raise IntegrityError(f"{self.label}: segment {entry.name!r} has "
                                         f"{segment.size} bytes, expected {want} (truncated?)")
            elif not entry.nested and segment.size != entry.plaintext_size:
                raise IntegrityError(f"{self.label}: segment {entry.name!r} changed size")

    def _require_open(self) -> AESGCM:
        if self._aead is None:
            raise RuntimeError("SealedContainer.open(mek) must be called first")
        return self._aead

    def nested(self, name: str, mek: MEK) -> SealedContainer:
        """Open the nested encrypted container (an MDP partition) called ``name``."""
        self._require_open()
        entry = self._entry(name)
        if not entry.nested:
            raise FormatError(self.label, f"segment {name!r} is not a nested container")
        segment = self.container.segment(name)
        inner = SealedContainer(Container(
            SliceSource(self.container.source, segment.file_offset, segment.size),
            label=f"{self.label}:{name}",
        )).open(mek)
        if inner.info.parent_salt != self.info.salt:
            raise IntegrityError(f"{self.label}: partition {name!r} belongs to another model")
        return inner

    def _check_sealed_as(self, name: str, inner: SealedContainer) -> None:
        """The nested container is, byte for byte, the one sealed into this container:
        its size and its encryption info are recorded in the (authenticated) outer info,
        so nothing can be added to or cut from it and its content address is fixed."""
        entry = self._entry(name)
        size = self.container.segment(name).size
        if size != entry.nested_size:
            raise IntegrityError(f"{self.label}: partition {name!r} has {size} bytes, sealed "
                                 f"as {entry.nested_size} (bytes added or cut)")
        if hashlib.sha256(inner.container.read(ENCINFO)).digest() != entry.nested_info_sha256:
            raise IntegrityError(f"{self.label}: partition {name!r} is not the one sealed "
                                 "into this container")

    def mdp_meta(self) -> MdpMeta | None:
        """The MDP metadata, authenticated before it is parsed; None if not MDP.

        IntegrityError if a nested container is not one of its partitions."""
        nested = {entry.name for entry in self.info.segments if entry.nested}
        if not nested:
            return None
        meta = MdpMeta.decode(bytes(self.decrypt_segment(MDP_META)), source=self.label)
        if {p.segment for p in meta.partitions} != nested:
            raise IntegrityError(f"{self.label}: MDP metadata and nested partitions disagree")
        return meta

    def partition(self, index: int, mek: MEK, meta: MdpMeta) -> SealedContainer:
        """Open partition ``index`` (``meta`` from mdp_meta), checking that the sealed
        partition says it is that index of that many: swapped partitions refuse."""
        if not 0 <= index < len(meta.partitions):
            raise FormatError(self.label, f"has no partition {index}")
        inner = self.nested(meta.partitions[index].segment, mek)
        if (inner.info.partition, inner.info.partition_count) != (index, len(meta.partitions)):
            raise IntegrityError(f"{self.label}: partition {index} holds partition "
                                 f"{inner.info.partition} of {inner.info.partition_count} "
                                 "(partitions swapped)")
        self._check_sealed_as(meta.partitions[index].segment, inner)
        return inner

    def _entry(self, name: str) -> evidence_pb2.SegmentInfo:
        for entry in self.info.segments:
            if entry.name == name:
                return entry
        raise FormatError(self.label, f"has no segment {name!r}")

    def decrypt_segment(self, name: str, *, into: PlainBuffer | None = None,
                        between_chunks: Callable[[], None] | None = None) -> PlainBuffer:
        """Decrypt (or check the digest of) one segment.

        The plaintext goes into ``into`` when given (card memory allocated once,
        exactly the plaintext size), else into a new buffer. ``between_chunks``
        runs after each chunk of an in-memory segment (background decryption).
        """
        aead = self._require_open()
        entry = self._entry(name)
        segment = self.container.segment(name)
        if entry.nested:
            raise FormatError(self.label, f"segment {name!r} is a nested container")
        if not entry.encrypted:
            data: PlainBuffer = bytearray(self.container.read(name))
            if hashlib.sha256(data).digest() != entry.plaintext_sha256:
                raise IntegrityError(f"{self.label}: plaintext segment {name!r} was altered")
            return data
        if into is not None and len(into) != entry.plaintext_size:
            raise ValueError("output buffer is not the segment's plaintext size")
        out = allocate_plaintext(entry.plaintext_size) if into is None else into
        source = self.container.source
        aad = stream.chunk_aad(stream.info_digest(self.info_bytes), name)
        if isinstance(source, MemorySource):
            ciphertext = source.view(segment.file_offset, segment.size)
            stream.decrypt_stream_into(aead, entry.stream_index, aad, ciphertext,
                                       entry.plaintext_size, self.info.chunk_size,
                                       memoryview(out), segment_name=name,
                                       between_chunks=between_chunks)
            return out
        position = 0
        pieces = self.container.iter_chunks(segment, self.info.chunk_size + stream.TAG_BYTES)
        for plain in stream.decrypt_stream(aead, entry.stream_index, aad, pieces,
                                           entry.plaintext_size, self.info.chunk_size,
                                           segment_name=name):
            out[position : position + len(plain)] = plain
            position += len(plain)
        return out

    def iter_decrypted(self, name: str) -> Iterator[bytes]:
        """Stream the plaintext of an encrypted segment (constant memory)."""
        aead = self._require_open()
        entry = self._entry(name)
        if not entry.encrypted:
            yield bytes(self.decrypt_segment(name))
            return
        segment = self.container.segment(name)
        aad = stream.chunk_aad(stream.info_digest(self.info_bytes), name)
        pieces = self.container.iter_chunks(segment, self.info.chunk_size + stream.TAG_BYTES)
        yield from stream.decrypt_stream(aead, entry.stream_index, aad, pieces,
                                         entry.plaintext_size, self.info.chunk_size,
                                         segment_name=name)

    def decrypt_all(self, *, between_chunks: Callable[[], None] | None = None
                    ) -> dict[str, PlainBuffer]:
        """Every non-nested segment, decrypted and verified (card memory)."""
        return {
            entry.name: self.decrypt_segment(entry.name, between_chunks=between_chunks)
            for entry in self.info.segments
            if not entry.nested
        }
