"""Streamed segment AEAD (docs/formats.md, "Segment encryption").

In the manner of Tink's AES-GCM-HKDF streaming: a content key derived from the
MEK and a fresh salt, AES-128-GCM per chunk, a nonce made of the segment's
stream index, the chunk counter and a last-chunk flag (truncation, reordering
and chunk swaps all fail authentication), and associated data binding the
encryption info. Memory use is a few chunks, whatever the segment size.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from orchestrator.crypto.mek import MEK
from orchestrator.errors import IntegrityError

TAG_BYTES = 16
SALT_BYTES = 32
DEFAULT_CHUNK = 1 << 20
MIN_CHUNK = 1 << 10
MAX_CHUNK = 64 << 20
MAX_COUNTER = (1 << 56) - 1
PARALLEL_BLOCK = 16  # chunks a worker takes at a time (interleaved between workers)
INFO_TAG_STREAM = 0xFFFFFFFF  # stream index reserved for the encryption-info tag


def derive_content_key(mek: MEK, salt: bytes, model_id: str) -> AESGCM:
    """HKDF-SHA256(MEK, salt, "modelip/v1 content key" || model id) -> AES-128-GCM."""
    info = b"modelip/v1 content key\0" + model_id.encode("utf-8")
    key = HKDF(algorithm=hashes.SHA256(), length=16, salt=salt, info=info).derive(mek.key)
    return AESGCM(key)


def derive_seal_salt(mek: MEK, source_key: bytes) -> bytes:
    """The salt the engine seals a program with: HKDF-SHA256(MEK, info = tag || the
    source key: digest of the source, the MEK's fingerprint and the settings). Chosen by
    no one (not a store, not a replica), the same wherever the same source is sealed
    under the same MEK and settings, and different whenever either differs: one salt
    never seals two plaintexts, so a (key, nonce) pair is never reused."""
    return HKDF(algorithm=hashes.SHA256(), length=SALT_BYTES, salt=None,
                info=b"modelip/v1 seal salt\0" + source_key).derive(mek.key)


def derive_mek_check(mek: MEK, salt: bytes) -> bytes:
    """A 16-byte key commitment: tells a wrong MEK apart from tampering."""
    return HKDF(
        algorithm=hashes.SHA256(), length=16, salt=salt, info=b"modelip/v1 key check"
    ).derive(mek.key)


def chunk_nonce(stream_index: int, counter: int, last: bool) -> bytes:
    """u32 stream index || u56 chunk counter || u8 last flag, big-endian (12 bytes)."""
    if counter > MAX_COUNTER:
        raise IntegrityError("segment has more chunks than the nonce can count")
    return struct.pack(">I", stream_index) + counter.to_bytes(7, "big") + bytes((int(last),))


def chunk_aad(info_digest: bytes, segment_name: str) -> bytes:
    """Associated data of every chunk of a segment: SHA-256(info) || name."""
    return info_digest + segment_name.encode("ascii")


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    """Chunks of a segment; an empty segment still has one (empty, final) chunk."""
    return max(1, -(-plaintext_size // chunk_size))


def ciphertext_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG_BYTES * chunk_count(plaintext_size, chunk_size)


def info_digest(info_bytes: bytes) -> bytes:
    return hashlib.sha256(info_bytes).digest()


def seal_info(aead: AESGCM, info_bytes: bytes) -> bytes:
    """The tag that authenticates the encryption info on its own (empty plaintext)."""
    return aead.encrypt(chunk_nonce(INFO_TAG_STREAM, 0, True), b"", info_bytes)


def open_info(aead: AESGCM, info_bytes: bytes, tag: bytes) -> None:
    """Raise IntegrityError unless ``tag`` authenticates ``info_bytes``."""
    try:
        aead.decrypt(chunk_nonce(INFO_TAG_STREAM, 0, True), tag, info_bytes)
    except InvalidTag:
        raise IntegrityError("encryption info was altered (authentication failed)") from None


def encrypt_stream(
    aead: AESGCM,
    stream_index: int,
    aad: bytes,
    chunks: Iterable[bytes | memoryview],
    plaintext_size: int,
    chunk_size: int,
) -> Iterator[bytes]:
    """Encrypt a segment given as consecutive plaintext chunks of ``chunk_size``.

    ``chunks`` must yield exactly ``plaintext_size`` bytes in full chunks (the last
    may be shorter). Yields one ciphertext chunk (data + tag) per chunk.
    """
    total = chunk_count(plaintext_size, chunk_size)
    counter = 0
    seen = 0
    for piece in chunks:
        if len(piece) != min(chunk_size, plaintext_size - seen):
            raise ValueError("plaintext chunks do not match the declared chunk size")
        seen += len(piece)
        yield aead.encrypt(chunk_nonce(stream_index, counter, counter == total - 1), piece, aad)
        counter += 1
    if plaintext_size == 0:
        yield aead.encrypt(chunk_nonce(stream_index, 0, True), b"", aad)
        counter = 1
    if counter != total or seen != plaintext_size:
        raise ValueError("plaintext ended before its declared size")


def encrypt_file_range(
    aead: AESGCM,
    stream_index: int,
    aad: bytes,
    source: tuple[int, int],
    plaintext_size: int,
    chunk_size: int,
    target: tuple[int, int],
    *,
    chunks: Iterable[int] | None = None,
    workers: int = 1,
) -> None:
    """Encrypt a segment file-to-file with positioned I/O and reused buffers.

    ``source`` and ``target`` are (fd, offset) of the plaintext and of where the
    ciphertext goes. ``chunks`` restricts the work to some chunk numbers (each
    chunk's place is known in advance, so workers can share a segment).
    ``workers`` > 1 splits large segments over forked processes: AES-GCM here
    holds the GIL, so threads do not scale; processes do. Only for callers with
    no other threads (the CLI): forking a threaded process is unsafe.
    Raises IntegrityError if the source is shorter than declared or a worker fails.
    """
    total = chunk_count(plaintext_size, chunk_size)
    if workers > 1 and chunks is None and total >= 2 * PARALLEL_BLOCK:
        _encrypt_in_workers(aead, stream_index, aad, source, plaintext_size, chunk_size,
                            target, workers)
        return
    plain = memoryview(bytearray(chunk_size))
    sealed = memoryview(bytearray(chunk_size + TAG_BYTES))
    src_fd, src_offset = source
    dst_fd, dst_offset = target
    flushed = flushing = -1   # [flushing, flushed): written, writeback not yet started
    for counter in chunks if chunks is not None else range(total):
        start = counter * chunk_size
        take = min(chunk_size, plaintext_size - start)
        if take and os.preadv(src_fd, [plain[:take]], src_offset + start) != take:
            raise IntegrityError("plaintext segment is shorter than declared (file changed?)")
        nonce = chunk_nonce(stream_index, counter, counter == total - 1)
        aead.encrypt_into(nonce, plain[:take], aad, sealed[: take + TAG_BYTES])
        out = sealed[: take + TAG_BYTES]
        position = dst_offset + start + counter * TAG_BYTES
        if position != flushed:   # not contiguous with what came before
            if flushing >= 0:
                start_writeback(dst_fd, flushing, flushed - flushing)
            flushing = position
        while out:
            written = os.pwrite(dst_fd, out, position)
            out = out[written:]
            position += written
        flushed = position
        if flushed - flushing >= WRITEBACK_BYTES:
            start_writeback(dst_fd, flushing, flushed - flushing)
            flushing = flushed
    if flushing >= 0 and flushed > flushing:
        start_writeback(dst_fd, flushing, flushed - flushing)


WRITEBACK_BYTES = 8 << 20


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return function
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _libc_sync_file_range() if hasattr(os, "pwrite") else None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting
    (Linux sync_file_range, SYNC_FILE_RANGE_WRITE): the final fsync then finds
    little left to do, so encryption and disk writes overlap. A hint: no-op
    where unavailable, and the fsync that makes the output durable is unchanged."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, 2)


def _encrypt_in_workers(aead: AESGCM, stream_index: int, aad: bytes, source: tuple[int, int],
                        plaintext_size: int, chunk_size: int, target: tuple[int, int],
                        workers: int) -> None:
    total = chunk_count(plaintext_size, chunk_size)
    context = multiprocessing.get_context("fork")
    blocks = range(0, total, PARALLEL_BLOCK)
    processes = []
    try:
        for worker in range(workers):
            mine = [c for b in blocks[worker::workers]
                    for c in range(b, min(b + PARALLEL_BLOCK, total))]
            process = context.Process(
                target=_encrypt_worker,
                args=(aead, stream_index, aad, source, plaintext_size, chunk_size, target, mine),
                daemon=True,
            )
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
    if any(process.exitcode != 0 for process in processes):
        raise IntegrityError("an encryption worker failed (source changed or disk full?)")


def _encrypt_worker(aead: AESGCM, stream_index: int, aad: bytes, source: tuple[int, int],
                    plaintext_size: int, chunk_size: int, target: tuple[int, int],
                    chunks: list[int]) -> None:
    try:
        encrypt_file_range(aead, stream_index, aad, source, plaintext_size, chunk_size, target,
                           chunks=chunks)
    except BaseException:  # noqa: BLE001 - reported by exit code, never a child traceback
        os._exit(3)


def decrypt_stream_into(
    aead: AESGCM,
    stream_index: int,
    aad: bytes,
    ciphertext: memoryview,
    plaintext_size: int,
    chunk_size: int,
    out: memoryview,
    *,
    segment_name: str,
    between_chunks: Callable[[], None] | None = None,
) -> None:
    """Decrypt a whole segment held in memory into ``out`` (len == plaintext_size).

    ``between_chunks`` runs after every chunk (a background decryption yields
    the interpreter there). Raises IntegrityError naming the segment and chunk.
    """
    total = chunk_count(plaintext_size, chunk_size)
    if len(ciphertext) != plaintext_size + TAG_BYTES * total or len(out) != plaintext_size:
        raise IntegrityError(f"segment {segment_name!r}: ciphertext has the wrong length")
    for counter in range(total):
        start = counter * chunk_size
        take = min(chunk_size, plaintext_size - start)
        where = start + counter * TAG_BYTES
        nonce = chunk_nonce(stream_index, counter, counter == total - 1)
        try:
            if take:
                aead.decrypt_into(
                    nonce, ciphertext[where : where + take + TAG_BYTES], aad,
                    out[start : start + take],
                )
            else:
                aead.decrypt(nonce, ciphertext[where : where + TAG_BYTES], aad)
        except InvalidTag:
            raise IntegrityError(
                f"segment {segment_name!r}: chunk {counter} failed authentication"
            ) from None
        if between_chunks is not None:
            between_chunks()


def decrypt_stream(
    aead: AESGCM,
    stream_index: int,
    aad: bytes,
    ciphertext_chunks: Iterable[bytes],
    plaintext_size: int,
    chunk_size: int,
    *,
    segment_name: str,
) -> Iterator[bytes]:
    """Decrypt a segment given as ciphertext chunks (each chunk + tag); streamed."""
    total = chunk_count(plaintext_size, chunk_size)
    counter = 0
    for piece in ciphertext_chunks:
        if counter >= total:
            raise IntegrityError(f"segment {segment_name!r}: more chunks than declared")
        nonce = chunk_nonce(stream_index, counter, counter == total - 1)
        try:
            yield aead.decrypt(nonce, piece, aad)
        except InvalidTag:
            raise IntegrityError(
                f"segment {segment_name!r}: chunk {counter} failed authentication"
            ) from None
        counter += 1
    if counter != total:
        raise IntegrityError(f"segment {segment_name!r}: truncated ({counter} of {total} chunks)")
