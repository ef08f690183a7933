"""The file-level flow end to end on files-only emulated cards (``modelip demo``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from orchestrator.crypto.container import SealSettings
from orchestrator.crypto.mek import MEK
from orchestrator.emulator.card import EmulatedCard
from orchestrator.emulator.pki import VendorPKI
from orchestrator.encrypt import (
    SessionTarget,
    encrypt_model,
    load_session_targets,
    load_wrapped_dirs,
    replace_mek,
    verify_program,
    wrap_mek_to_dir,
)
from orchestrator.errors import SessionInvalidError
from orchestrator.qpc.build import pack_files
from orchestrator.qpc.container import open_container


def run_file_demo(workdir: str, *, echo: Callable[[str], None], cards: int = 4) -> int:
    """Generate a MEK, encrypt a model for ``cards`` cards, reset one, re-key it."""
    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "network.elf").write_bytes(os.urandom(4 << 20))
    (root / "networkdesc.bin").write_bytes(b"emulated network descriptor")
    qpc = root / "model.qpc"
    pack_files(qpc, [("network.elf", str(root / "network.elf")),
                     ("networkdesc.bin", str(root / "networkdesc.bin"))])
    echo(f"[1/6] built a 4 MiB program container: {qpc}")
    pki = VendorPKI.create()
    trust_root = pki.save(root / "pki")
    fleet = [EmulatedCard(pki.issue_card(f"card-{i}")) for i in range(cards)]
    evidence = []
    for card in fleet:
        path = root / f"{card.card_id}.dat"
        path.write_bytes(card.attest(os.urandom(32)))
        evidence.append(str(path))
    echo(f"[2/6] attested {cards} emulated cards (vendor root {trust_root})")
    mek = MEK.generate()
    targets = load_session_targets(evidence, trust_root=str(trust_root), insecure=False)
    written = encrypt_model(str(qpc), mek, str(root / "enc"), SealSettings("demo-model"),
                            targets=targets)
    program = written[-1]
    echo(f"[3/6] encrypted once, wrapped the MEK to {cards} verified session keys: {program}")
    for card in fleet:
        with open_container(program) as container:
            card.load(container, program_id="demo")
    echo("[4/6] every card decrypted and verified the model in its own memory")
    victim = fleet[-1]
    victim.reset()
    try:
        with open_container(program) as container:
            victim.load(container, program_id="demo")
        raise AssertionError("a stale key slot loaded")  # pragma: no cover
    except SessionInvalidError as err:
        echo(f"[5/6] {victim.card_id} reset; its old slot is refused: {err}")
    fresh = root / "fresh.dat"
    fresh.write_bytes(victim.attest(os.urandom(32)))
    new_targets: list[SessionTarget] = load_session_targets(
        [*evidence[:-1], str(fresh)], trust_root=str(trust_root), insecure=False)
    wrap_mek_to_dir(mek, new_targets, str(root / "wrapped"))
    slot_dir = root / "wrapped" / f"slot_{cards - 1}"
    load_wrapped_dirs([str(slot_dir)])
    replace_mek(str(program), [str(slot_dir)], out_dir=None, in_place=True)
    with open_container(program) as container:
        victim.load(container, program_id="demo")
    summary = verify_program(str(program), mek)
    mek.wipe()
    echo(f"[6/6] re-attested, replace-mek --in-place, {victim.card_id} serves again; owner "
         f"verify: {len(summary['segments'])} segments authentic")
    return 0
