"""What the orchestrator itself costs per card, against the cryptographic floor.

    python bench/orchestrator_cpu.py [--sizes 256,4096] [--devices-per-host 16] [--repeat 2]

For each fleet size: `modelip emulate` in its own process (hosts of 16 cards;
the cards' own cryptography is spent there, not here), and in this process the
engine brings every card to serving (deploy: attest, verify, wrap, load,
verify the receipt, journal every move). Printed: this process's CPU seconds
(user + system) per card, measured around the deployment only (not the
one-time preparation of the body), beside the floor per card measured in the
same run: one evidence verification (its chain verified afresh), one HPKE wrap
of the MEK, one receipt verification. Target (the performance issue): at most
3x the floor, and linear from the smallest to the largest fleet. Best of
--repeat deployments per size; the floor is the best of three rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _measure import start_emulator  # noqa: E402

from orchestrator._proto.modelip.v1 import evidence_pb2  # noqa: E402
from orchestrator.app import open_engine  # noqa: E402
from orchestrator.crypto.evidence import (  # noqa: E402
    TrustPolicy,
    sign_receipt,
    verify_evidence,
    verify_load_receipt,
)
from orchestrator.crypto.mek import MEK  # noqa: E402
from orchestrator.crypto.wrap import wrap_mek  # noqa: E402
from orchestrator.emulator.card import EmulatedCard  # noqa: E402
from orchestrator.emulator.pki import VendorPKI  # noqa: E402
from orchestrator.engine.plan import Plan  # noqa: E402
from tests.models import tiny_mlp  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def floor_per_card(rounds: int = 400, repeat: int = 3) -> float:
    """CPU seconds of the cryptography one card needs: verify its evidence (chain
    included), wrap the MEK to its session key, verify its load receipt."""
    pki = VendorPKI.create()
    identity = pki.issue_card("floor-card")
    card = EmulatedCard(identity)
    mek = MEK.generate()
    policy = TrustPolicy()
    requests = [os.urandom(32) for _ in range(rounds)]
    evidence = [card.attest(request) for request in requests]
    digest = b"\x01" * 32
    report = verify_evidence(evidence[0], roots=[pki.root], policy=policy,
                             request=requests[0])
    receipt, signature = sign_receipt(evidence_pb2.LoadReceipt(
        card_id=report.card_id, session_id=report.session_id, program_info_digest=digest,
        partition=0, verified=True), identity.key)
    best = float("inf")
    for _ in range(repeat):
        start = cpu()
        for request, data in zip(requests, evidence, strict=True):
            report = verify_evidence(data, roots=[pki.root], policy=policy, request=request)
            wrap_mek(mek, slot=0, card_id=report.card_id, session_id=report.session_id,
                     kem=report.kem, public_key=report.session_public_key, program=digest)
            verify_load_receipt(receipt, signature, report=report, program_info_digest=digest,
                                partition=0, source="floor")
        best = min(best, (cpu() - start) / rounds)
    return best


async def deploy(plan: Plan) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, cards serving) of one deployment, in this process."""
    async with open_engine(plan) as engine:
        start, wall = cpu(), time.perf_counter()
        await engine.run(keep_serving=False)
        spent, took = cpu() - start, time.perf_counter() - wall
        return spent, took, sum(c.state.value == "SERVING" for c in engine.cards)


def measure(cards: int, per_host: int, work: Path) -> tuple[float, float, int]:
    hosts = cards // per_host
    process, addresses, root = start_emulator(work, hosts, per_host)
    try:
        (work / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
        listed = "\n".join(f"    - {{address: \"{a}\", devices: {list(range(per_host))}}}"
                           for a in addresses)
        (work / "plan.yaml").write_text(f"""
model: {{onnx: tiny.onnx}}
mek: {{generate: true}}
fleet:
  hosts:
{listed}
trust: {{roots: [{root}]}}
rekey: {{check_interval: 0}}
state_dir: state
""")
        return anyio.run(deploy, Plan.load(work / "plan.yaml"))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,4096")
    parser.add_argument("--devices-per-host", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="deployments per size (best)")
    args = parser.parse_args()
    floor = floor_per_card()
    rows = []
    for text in args.sizes.split(","):
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as scratch:
                runs.append(measure(int(text), args.devices_per_host, Path(scratch)))
        spent, took, serving = min(runs)
        rows.append((int(text), spent, took, serving))
    print(f"cryptographic floor per card (verify evidence + wrap + verify receipt): "
          f"{floor * 1e3:.2f} ms CPU")
    print(f"{'cards':>6} {'serving':>8} {'wall s':>8} {'CPU s':>8} {'CPU/card':>10} "
          f"{'vs floor':>9}")
    for cards, spent, took, serving in rows:
        per = spent / cards
        print(f"{cards:>6} {serving:>8} {took:>8.2f} {spent:>8.2f} {per * 1e3:>8.2f}ms "
              f"{per / floor:>8.2f}x")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last[1] / last[0]) / (first[1] / first[0])
        print(f"linearity: CPU/card at {last[0]} is {growth:.2f}x that at {first[0]}")


if __name__ == "__main__":
    main()
