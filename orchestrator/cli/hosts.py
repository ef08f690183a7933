"""Commands that talk to hosts: emulate, attest, device (thin; see cli/main.py).

Kept apart from main.py so the file-level commands never import grpc.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.atomicfile import atomic_output, refuse_existing, write_bytes_atomic
from orchestrator.cli import argtypes
from orchestrator.errors import FileInputError, UsageError

if TYPE_CHECKING:
    from orchestrator.agent.host import HostAgent
    from orchestrator.emulator.backend import EmulatedBackend


def _client(args: argparse.Namespace) -> Any:
    from orchestrator.transport.client import HostClient
    from orchestrator.transport.types import TLSClientConfig

    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TLSClientConfig.from_paths(args.tls_ca, args.tls_cert, args.tls_key)
    return HostClient(f"{args.ip}:{args.port}", tls=tls)


# --- emulate ------------------------------------------------------------------------------


def cmd_emulate(args: argparse.Namespace) -> int:
    import socket

    # gRPC's C core logs its own failures on stderr; ours are one line each.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        socket.getaddrinfo(args.bind, None)
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--bind {args.bind}: not an address of this machine") from None
    if args.base_port and args.base_port + args.hosts - 1 > 65535:
        raise UsageError(f"--base-port {args.base_port} with --hosts {args.hosts}: the last "
                         "host's port would be past 65535")
    for port in range(args.base_port, args.base_port + args.hosts) if args.base_port else ():
        # before anything is created (the PKI): a busy port is one line, nothing left
        with socket.socket(socket.AF_INET6 if ":" in args.bind else socket.AF_INET) as probe:
            try:
                probe.bind((args.bind, port))
            except OSError as exc:
                raise UsageError(f"cannot listen on {args.bind}:{port}: "
                                 f"{(exc.strerror or str(exc)).lower()}") from None

    import anyio

    from orchestrator.agent.servicers import TLSServerConfig
    from orchestrator.emulator.adversary import Adversary
    from orchestrator.emulator.backend import FaultConfig
    from orchestrator.emulator.card import CardConfig
    from orchestrator.emulator.fleet import FleetConfig, run_fleet
    from orchestrator.emulator.pki import VendorPKI

    try:
        adversary = Adversary(args.adversary)
    except ValueError:
        modes = ", ".join(a.value for a in Adversary)
        raise UsageError(f"--adversary: unknown mode {args.adversary!r} ({modes})") from None
    if args.hosts < 1 or args.devices_per_host < 1:
        raise UsageError("--hosts and --devices-per-host must be at least 1")
    pki = VendorPKI.load_or_create(args.pki_dir)
    config = FleetConfig(
        hosts=args.hosts, devices_per_host=args.devices_per_host,
        faults=FaultConfig(reset_rate=args.reset_rate, reboot_time=args.reboot_time,
                           attest_latency=args.attest_latency,
                           stage_bandwidth=args.stage_bandwidth,
                           drop_events=args.drop_events, delay_events=args.delay_events),
        card=CardConfig(firmware_version=args.firmware),
        adversary=adversary,
        adversary_devices=frozenset(args.adversary_device) if args.adversary_device else None,
        bind=args.bind, base_port=args.base_port,
    )
    tls = None
    if args.tls_cert:
        try:
            tls = TLSServerConfig(Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes(),
                                  Path(args.tls_client_ca).read_bytes()
                                  if args.tls_client_ca else None)
        except (OSError, TypeError):
            raise FileInputError(args.tls_cert, "cannot read the TLS certificate/key") from None

    async def serve() -> None:
        from orchestrator.cli.agent import ready_until_stopped

        async with run_fleet(config, pki=pki, tls=tls) as fleet:
            for host in fleet.hosts:
                print(f"{host.name} listening on {host.address} "
                      f"({len(host.backend.cards)} cards: {host.backend.cards[0].card_id} .. "
                      f"{host.backend.cards[-1].card_id})")
            print(f"trust root: {Path(args.pki_dir) / 'root.pem'}")
            if adversary.value != "none":
                print(f"adversary mode: {adversary.value}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(power_cuts, fleet.hosts)
                await ready_until_stopped()
                tg.cancel_scope.cancel()
            print("stopping", flush=True)

    try:
        anyio.run(serve)
    except OSError as err:
        raise UsageError(f"emulate: cannot listen: {err}") from None
    return 0


async def power_cuts(hosts: Sequence[HostAgent[EmulatedBackend]]) -> None:
    """SIGUSR1: a power cut (a rack loses power): every card of every host resets at
    once, as ResetDevice resets one (its events, then back after the reboot time)."""
    import signal

    import anyio

    with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            async with anyio.create_task_group() as tg:
                for host in hosts:
                    for device in range(len(host.backend.cards)):
                        tg.start_soon(host.backend.reset, device)
            print(f"power cut: {sum(len(h.backend.cards) for h in hosts)} cards reset",
                  flush=True)


# --- attest ---------------------------------------------------------------------------------


def cmd_attest(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.crypto.chain import load_roots_file
    from orchestrator.crypto.evidence import TrustPolicy, parse_evidence, verify_evidence
    from orchestrator.fileops.targets import read_request
    from orchestrator.trustconfig import configured_trust_root

    if len(args.device) > 1:
        raise UsageError(f"attest: -d given {len(args.device)} times; attest one card per "
                         "command (one evidence file each)")
    args.device = args.device[0]
    request = read_request(args.input)
    trust_root = configured_trust_root(args.trust_root)
    roots = load_roots_file(trust_root) if trust_root else None

    async def fetch() -> bytes:
        async with _client(args) as host:
            evidence: bytes = await host.attest(args.device, request)
            return evidence

    evidence = anyio.run(fetch)
    _, body = parse_evidence(evidence, source=f"{args.ip}:{args.port} device {args.device}")
    if args.print_json:
        print(json.dumps({
            "request": {"device": args.device, "request": request.hex()},
            "report": {"card_id": body.card_id, "serial": body.serial, "sku": body.sku,
                       "firmware_version": body.firmware_version,
                       "boot_counter": body.boot_counter, "session_id": body.session_id.hex(),
                       "session_kem": body.session_kem,
                       "session_public_key": body.session_public_key.hex(),
                       "request_digest": body.request_digest.hex(),
                       "issued_at": body.issued_at,
                       "measurements": {m.name: m.digest.hex() for m in body.measurements}},
        }, indent=2))
    if roots is not None:
        report = verify_evidence(evidence, roots=roots, policy=TrustPolicy(), request=request,
                                 source=f"device {args.device}")
        print(f"verified: card {report.card_id!r} firmware {report.firmware_version} boot "
              f"{report.boot_counter} session {report.session_id.hex()[:16]} "
              f"({report.kem.value})",
              file=sys.stderr if args.print_json else sys.stdout)
    write_bytes_atomic(args.output, evidence, overwrite=args.force)
    print(f"wrote {args.output}", file=sys.stderr if args.print_json else sys.stdout)
    return 0


# --- device -----------------------------------------------------------------------------------


def cmd_device(args: argparse.Namespace) -> int:
    import anyio

    action = args.device_command
    devices: list[int] = args.device or []
    if action in ("reset", "unload", "load", "exec") and not devices:
        raise UsageError(f"device {action}: name the card with -d N")
    if action in ("reset", "unload") and len(devices) != 1:
        raise UsageError(f"device {action}: name exactly one card")
    inputs = read_inputs(args.input) if action == "exec" else None
    if action == "exec" and args.output:  # before the card runs anything
        refuse_existing([args.output], overwrite=args.force)

    async def run() -> Any:
        async with _client(args) as host:
            if action == "list":
                return await host.list_devices()
            if action == "reset":
                await host.reset(devices[0])
                return None
            if action == "unload":
                await host.unload(devices[0])
                return None
            if action == "load":
                program_id, _ = await host.stage(args.qpc)
                return [await host.load(device, program_id, partition=k if len(devices) > 1
                                        else args.partition)
                        for k, device in enumerate(devices)]
            return await host.execute(devices, inputs or {})

    if action == "load" and not args.qpc:
        raise UsageError("device load: --qpc FILE is required")
    result = anyio.run(run)
    if action == "list":
        for d in result:
            program = f"program {d.program_id[:16]} part {d.partition}" if d.program_id else ""
            claimed = f" held by {d.claimed_by}" if d.claimed_by else ""
            print(f"device {d.device}: {d.card_id:<14} {d.state.value:<8} boot {d.boot_counter:<4} "
                  f"session {d.session_id[:16] or '-':<16} {program}".rstrip() + claimed)
    elif action == "load":
        for device, loaded in zip(devices, result, strict=True):
            print(f"device {device}: loaded {', '.join(loaded.segments)}")
    elif action == "exec":
        write_outputs(args.output, result, overwrite=args.force)
        for name, value in result.items():
            print(f"{name}: {value.dtype} {list(value.shape)}")
    else:
        print(f"device {devices[0]}: {action} done")
    return 0


def read_inputs(path: str | None) -> dict[str, Any]:
    from orchestrator.arrays import read_arrays

    if not path:
        raise UsageError("device exec: --input x.npy (or .npz keyed by input name) is required")
    return read_arrays(path)


def write_outputs(path: str | None, outputs: dict[str, Any], *, overwrite: bool = False
                  ) -> None:
    import numpy as np

    if not path:
        return
    buffer = io.BytesIO()
    if path.endswith(".npz"):
        np.savez(buffer, **outputs)
    elif len(outputs) == 1:
        np.save(buffer, next(iter(outputs.values())))
    else:
        raise UsageError(f"--output {path}: the model has {len(outputs)} outputs; use .npz")
    with atomic_output(path, overwrite=overwrite) as handle:
        handle.write(buffer.getvalue())


def add_host_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ip", required=True, type=argtypes.host_address,
                        help="host address (the port goes in --port)")
    parser.add_argument("--port", type=argtypes.port, default=62473)
    parser.add_argument("--tls-ca", metavar="PEM", help="verify the host with this CA (TLS)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="client key (mTLS)")


def register(sub: Any) -> None:
    """Add emulate, attest and device to the main parser."""
    p = sub.add_parser("emulate", help="run emulated hosts and cards on loopback",
                       description="Run emulated hosts and cards on loopback until SIGINT or "
                       "SIGTERM. SIGUSR1 is a power cut: every card of every host resets at "
                       "once (back after --reboot-time).")
    p.add_argument("--hosts", type=argtypes.host_count, default=1)
    p.add_argument("--devices-per-host", type=argtypes.cards_per_host, default=4)
    p.add_argument("--base-port", type=argtypes.port, default=62473,
                   help="host i listens on base+i "
                   "(0: any free port)")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--pki-dir", default="emulated-pki", help="vendor PKI (created if missing)")
    p.add_argument("--firmware", default="1.12.0")
    p.add_argument("--reset-rate", type=argtypes.non_negative, default=0.0,
                   help="resets per card per second")
    p.add_argument("--reboot-time", type=argtypes.non_negative, default=0.2)
    p.add_argument("--attest-latency", type=argtypes.non_negative, default=0.0)
    p.add_argument("--stage-bandwidth", type=argtypes.non_negative, default=0.0,
                   help="bytes/s, 0 unlimited")
    p.add_argument("--drop-events", type=argtypes.probability, default=0.0, help="probability")
    p.add_argument("--delay-events", type=argtypes.non_negative, default=0.0, help="seconds")
    p.add_argument("--adversary", default="none", metavar="MODE",
                   help="substitute-key, replay-report, ignore-nonce, reset-storm, "
                        "suppress-resets, tamper-body, swap-slots, old-version, "
                        "malformed-chain, garbage, replay-receipt")
    p.add_argument("--adversary-device", type=argtypes.device, action="append", metavar="N",
                   help="only these cards are attacked (default: all)")
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require client certs (mTLS)")
    p.set_defaults(handler=cmd_emulate)

    p = sub.add_parser("attest", help="get a card's attestation evidence through its host")
    add_host_flags(p)
    p.add_argument("-d", "--device", type=argtypes.device, required=True, action="append",
                   metavar="N", help="the card (one per command)")
    p.add_argument("-i", "--input", metavar="REQUEST",
                   help="request bytes, at least 16 (default: 32 random)")
    p.add_argument("-o", "--output", default="report.dat")
    p.add_argument("-j", "--print-json", action="store_true")
    p.add_argument("--trust-root", metavar="PEM",
                   help="verify and print the verdict (default: the configured root, "
                        "$MODELIP_TRUST_ROOT or ~/.config/modelip/trust-root.pem, if any)")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_attest)

    device = sub.add_parser("device", help="low-level commands for one host's cards")
    device_sub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    for name, text in (("list", "list cards"), ("reset", "reset a card"),
                       ("load", "stage and load an encrypted QPC"),
                       ("unload", "unload a card"), ("exec", "run a loaded program")):
        p = device_sub.add_parser(name, help=text)
        add_host_flags(p)
        p.add_argument("-d", "--device", type=argtypes.device, action="append", metavar="N",
                       help="card number; repeat for an MDP group, in partition order")
        if name == "load":
            p.add_argument("--qpc", metavar="FILE")
            p.add_argument("--partition", type=argtypes.device, default=0)
        if name == "exec":
            p.add_argument("--input", metavar="x.npy|x.npz")
            p.add_argument("--output", metavar="y.npy|y.npz")
            argtypes.add_force_flag(p)
        p.set_defaults(handler=cmd_device)
