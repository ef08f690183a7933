"""replace-mek --in-place on a 1 MiB and a 1 GiB container, same run; prints the ratio.

    python bench/replace_mek.py [--large 1G]

Target: large/small <= 1.5x (the cost is the key slots, not the model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import parse_size, write_random  # noqa: E402

from orchestrator.crypto.container import SealSettings  # noqa: E402
from orchestrator.crypto.mek import MEK  # noqa: E402
from orchestrator.emulator.card import EmulatedCard  # noqa: E402
from orchestrator.emulator.pki import VendorPKI  # noqa: E402
from orchestrator.fileops.encrypt import (  # noqa: E402
    encrypt_model,
    replace_mek,
    wrap_mek_to_dir,
)
from orchestrator.fileops.targets import load_session_targets  # noqa: E402
from orchestrator.qpc.build import pack_files  # noqa: E402


def prepare(work: Path, size: int, pki: VendorPKI, cards: list[EmulatedCard], mek: MEK) -> Path:
    write_random(work / "elf", size)
    pack_files(work / "m.qpc", [("network.elf", str(work / "elf"))])
    (work / "elf").unlink()
    evidence = []
    for card in cards:
        path = work / f"{card.card_id}.dat"
        path.write_bytes(card.attest(os.urandom(32)))
        evidence.append(str(path))
    targets = load_session_targets(evidence, trust_root=str(work.parent / "root.pem"),
                                   insecure=False)
    return encrypt_model(str(work / "m.qpc"), mek, str(work / "out"),
                         SealSettings("bench", workers=os.cpu_count() or 1), targets=targets)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", default="1G")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    pki = VendorPKI.create()
    cards = [EmulatedCard(pki.issue_card(f"card-{i}")) for i in range(4)]
    mek = MEK.generate()
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        root = Path(scratch)
        pki.save(root)
        timings = {}
        for label, size in (("1 MiB", 1 << 20), (args.large, parse_size(args.large))):
            work = root / label.replace(" ", "")
            work.mkdir()
            program = prepare(work, size, pki, cards, mek)
            samples = []
            for round_ in range(args.rounds):
                cards[0].reset()
                evidence = work / f"fresh{round_}.dat"
                evidence.write_bytes(cards[0].attest(os.urandom(32)))
                targets = load_session_targets([str(evidence)],
                                               trust_root=str(root / "root.pem"), insecure=False)
                wrap_mek_to_dir(mek, targets, str(work / f"w{round_}"))
                start = time.perf_counter()
                replace_mek(str(program), [str(work / f"w{round_}" / "slot_0")], out_dir=None,
                            in_place=True)
                samples.append(time.perf_counter() - start)
            timings[label] = statistics.median(samples)
            print(f"{label:>8}: replace-mek --in-place median {timings[label] * 1e3:.2f} ms "
                  f"({args.rounds} rounds, file {program.stat().st_size:,} bytes)")
        small, large = timings.values()
        print(f"ratio large/small: {large / small:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
