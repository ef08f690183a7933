"""Card-side decryption in memory vs raw AES-128-GCM on the same buffer, same run.

    python bench/decrypt_throughput.py [--size 256M]

Target: card decrypt >= 0.7x raw AES-GCM.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import parse_size  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from orchestrator.crypto.container import SealedContainer, SealSettings  # noqa: E402
from orchestrator.crypto.mek import MEK  # noqa: E402
from orchestrator.crypto.seal import write_sealed  # noqa: E402
from orchestrator.qpc.container import Container, MemorySource  # noqa: E402
from orchestrator.qpc.writer import bytes_segment, write_container  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    plain = os.urandom(size)
    mek = MEK.generate()
    source = io.BytesIO()
    write_container(source, [bytes_segment("network.elf", plain)])
    sealed = io.BytesIO()
    write_sealed(sealed, Container(MemorySource(source.getbuffer())), mek, SealSettings("bench"),
                 key_slots=[])
    program = sealed.getvalue()
    del source, sealed

    raw_key = AESGCM(os.urandom(16))
    chunk = 1 << 20
    raw_ct = [raw_key.encrypt(i.to_bytes(12, "big"), plain[i * chunk:(i + 1) * chunk], b"")
              for i in range(-(-size // chunk))]
    out = bytearray(size)
    view = memoryview(out)
    raw, card, card_alloc = [], [], []
    card_memory = bytearray(size)
    for _ in range(args.repeat):
        start = time.perf_counter()
        for i, piece in enumerate(raw_ct):
            raw_key.decrypt_into(i.to_bytes(12, "big"), piece, b"",
                                 view[i * chunk : i * chunk + len(piece) - 16])
        raw.append(time.perf_counter() - start)
        start = time.perf_counter()
        opened = SealedContainer(Container(MemorySource(program))).open(mek)
        opened.decrypt_segment("network.elf", into=card_memory)
        card.append(time.perf_counter() - start)
        start = time.perf_counter()
        opened = SealedContainer(Container(MemorySource(program))).open(mek)
        result = opened.decrypt_segment("network.elf")
        card_alloc.append(time.perf_counter() - start)
    assert bytes(result) == plain and card_memory == plain
    raw_rate = size / min(raw) / 1e9
    card_rate = size / min(card) / 1e9
    print(f"buffer {size / (1 << 20):.0f} MiB, best of {args.repeat}")
    print(f"  raw AES-128-GCM decrypt_into: {raw_rate:.2f} GB/s")
    print(f"  card decrypt (container):     {card_rate:.2f} GB/s  (into card memory, as raw)")
    print(f"  card decrypt + allocation:    {size / min(card_alloc) / 1e9:.2f} GB/s  "
          "(fresh buffer each time: page faults included)")
    print(f"ratio card/raw: {card_rate / raw_rate:.2f}x  (target >= 0.7x)")


if __name__ == "__main__":
    main()
