"""Helpers shared by the benchmarks: run a command, time it, read its peak RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent


def run_measured(argv: Sequence[str], **kwargs: object) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process; raises if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{argv[0]} failed with exit code {process.returncode}")
    return wall, usage.ru_maxrss * 1024


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def write_random(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            take = min(remaining, len(block))
            handle.write(block[:take])
            remaining -= take
            block = block[1:] + block[:1]  # not one repeated block: no dedup shortcuts


def start_emulator(work: Path, hosts: int, devices: int, *extra: str
                   ) -> tuple[subprocess.Popen[bytes], list[str], Path]:
    """`modelip emulate` in its own process; (process, host addresses, trust root).
    Stop it with SIGINT."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "emulate.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "emulate", "--hosts", str(hosts),
             "--devices-per-host", str(devices), "--base-port", "0", "--pki-dir",
             str(work / "pki"), *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "READY" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"modelip emulate did not start: {log.read_text()[-500:]}")
        time.sleep(0.05)
    addresses = [line.split("listening on ", 1)[1].split()[0]
                 for line in log.read_text().splitlines() if "listening on" in line]
    return process, addresses, work / "pki" / "root.pem"


# A plan for an emulated fleet run by `modelip emulate` (hosts: its addresses).
FLEET_PLAN = """
model: {{onnx: tiny.onnx}}
mek: {{generate: true}}
fleet:
  hosts:
{hosts}
trust: {{roots: [{root}]}}
rekey: {{check_interval: 0}}
state_dir: state
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def floor_per_card(rounds: int = 400, repeat: int = 3, *, known: bool = False) -> float:
    """CPU seconds of the cryptography one card needs: verify its evidence (its chain
    verified afresh, as for a card seen for the first time; ``known``: cached, as for
    a card re-keyed), wrap the MEK to its session key, verify its load receipt."""
    from orchestrator._proto.modelip.v1 import evidence_pb2
    from orchestrator.crypto.chain import ChainCache
    from orchestrator.crypto.evidence import (
        TrustPolicy,
        sign_receipt,
        verify_evidence,
        verify_load_receipt,
    )
    from orchestrator.crypto.mek import MEK
    from orchestrator.crypto.wrap import wrap_mek
    from orchestrator.emulator.card import EmulatedCard
    from orchestrator.emulator.pki import VendorPKI

    pki = VendorPKI.create()
    identity = pki.issue_card("floor-card")
    card = EmulatedCard(identity)
    mek = MEK.generate()
    policy, chains = TrustPolicy(), ChainCache() if known else None
    requests = [os.urandom(32) for _ in range(rounds)]
    evidence = [card.attest(request) for request in requests]
    digest = b"\x01" * 32
    report = verify_evidence(evidence[0], roots=[pki.root], policy=policy,
                             request=requests[0], cache=chains)
    receipt, signature = sign_receipt(evidence_pb2.LoadReceipt(
        card_id=report.card_id, session_id=report.session_id, program_info_digest=digest,
        partition=0, verified=True), identity.key)
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        for request, data in zip(requests, evidence, strict=True):
            report = verify_evidence(data, roots=[pki.root], policy=policy, request=request,
                                     cache=chains)
            wrap_mek(mek, slot=0, card_id=report.card_id, session_id=report.session_id,
                     kem=report.kem, public_key=report.session_public_key, program=digest)
            verify_load_receipt(receipt, signature, report=report, program_info_digest=digest,
                                partition=0, source="floor", key_slot=b"")
        best = min(best, (time.thread_time() - start) / rounds)
    return best
