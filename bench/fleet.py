"""1,024 emulated cards (64 hosts x 16) from start to all serving, in this process,
against the reference way (one `attest` + one `encrypt-with-session-keys` process per
card, sequentially) on a sample, extrapolated. Prints both and the ratio.

    python bench/fleet.py [--hosts 64] [--devices-per-host 16] [--sample 6]

Targets: all serving in <= 10 s on this 2-core machine; >= 100x the reference way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
from cryptography.hazmat.primitives.serialization import Encoding

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator.engine.journal import Journal  # noqa: E402
from orchestrator.engine.plan import Plan  # noqa: E402
from orchestrator.engine.prepare import obtain_mek, prepare_program  # noqa: E402
from orchestrator.engine.supervisor import Engine  # noqa: E402
from orchestrator.fleetcli import fleet_for  # noqa: E402

PLAN = """
model:
  onnx: tiny.onnx
mek:
  generate: true
fleet:
  emulated: {{hosts: {hosts}, devices_per_host: {devices}}}
concurrency: {concurrency}
rekey:
  check_interval: 0
state_dir: state
"""


async def measure(work: Path, hosts: int, devices: int, sample: int, concurrency: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from models import tiny_mlp

    (work / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (work / "plan.yaml").write_text(PLAN.format(hosts=hosts, devices=devices,
                                                concurrency=concurrency))
    plan = Plan.load(work / "plan.yaml")
    mek = obtain_mek(plan)
    program = prepare_program(plan, mek)
    with Journal(plan.journal_path) as journal:
        started = time.perf_counter()
        async with fleet_for(plan) as (targets, roots):
            fleet_up = time.perf_counter() - started
            engine = Engine(plan, targets, roots, mek, program, journal)
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run(keep_serving=False))
                await engine.deployed.wait()
            deploy = time.perf_counter() - start
            serving = sum(card.state.value == "SERVING" for card in engine.cards)
            cards = len(engine.cards)
            print(f"emulated fleet: {hosts} hosts x {devices} cards started in {fleet_up:.2f} s")
            print(f"modelip deploy: {serving}/{cards} serving in {deploy:.2f} s "
                  f"({cards / deploy:.0f} cards/s)  (target <= 10 s)")
            # the reference way, on a sample of cards of the same fleet
            (work / "root.pem").write_bytes(roots[0].public_bytes(Encoding.PEM))
            modelip = str(Path(sys.executable).parent / "modelip")
            (work / "mek.dat").write_bytes(mek.key)
            encrypted = work / "body"
            encrypted.mkdir()
            (encrypted / "encrypted_model.qpc").write_bytes(program.body.read_bytes())
            start = time.perf_counter()
            for index in range(sample):
                target = targets[index % len(targets)]
                ip, port = target.address.rsplit(":", 1)
                evidence = work / f"pub{index}.dat"
                await anyio.run_process([modelip, "attest", "--ip", ip, "--port", port,
                                         "-d", str(index % devices), "-o", str(evidence)])
                await anyio.run_process([modelip, "encrypt-with-session-keys", "--input-dir",
                                         str(encrypted), "--mek", str(work / "mek.dat"),
                                         "--pub-keys", str(evidence), "--trust-root",
                                         str(work / "root.pem"), "--output-dir",
                                         str(work / f"out{index}")])
            per_card = (time.perf_counter() - start) / sample
            reference = per_card * cards
            print(f"reference way: {per_card:.3f} s per card (attest + "
                  f"encrypt-with-session-keys, {sample} sampled), {reference:.0f} s for "
                  f"{cards} cards")
            print(f"ratio: modelip is {reference / deploy:.0f}x faster  (target >= 100x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=64)
    parser.add_argument("--devices-per-host", type=int, default=16)
    parser.add_argument("--sample", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        anyio.run(measure, Path(scratch), args.hosts, args.devices_per_host, args.sample,
                  args.concurrency)


if __name__ == "__main__":
    main()
