"""Help that every command shares: an example for each command (shown by --help), and
the words for arguments that mean the same thing everywhere (a host's port, a plan,
an output). ``document`` fills them in once the parser is built; a test checks that
no command is left without an example and no argument without help."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

EXAMPLES = {
    "generate-mek": "modelip generate-mek -o MEK.dat",
    "hsm init-kek": "modelip hsm init-kek --pkcs11-module /usr/lib/softhsm/libsofthsm2.so "
                    "--token modelip --kek mek-kek",
    "hsm wrap-existing": "modelip hsm wrap-existing --mek MEK.dat -o MEK.sealed "
                         "--pkcs11-module /usr/lib/softhsm/libsofthsm2.so --token modelip "
                         "--kek mek-kek",
    "encrypt-model": "modelip encrypt-model --qpc model.qpc --mek MEK.dat --output-dir enc "
                     "--pub-keys pub0.dat --trust-root pki/root.pem",
    "encrypt-with-session-keys": "modelip encrypt-with-session-keys --input-dir enc --mek "
                                 "MEK.dat --pub-keys pub0.dat pub1.dat --trust-root "
                                 "pki/root.pem --output-dir final",
    "wrap-mek": "modelip wrap-mek --mek MEK.dat --pub-keys pub0.dat --output-dir wrapped "
                "(with the root configured; --encrypted-qpc enc binds to one program)",
    "replace-mek": "modelip replace-mek --encrypted-qpc final --wrapped-meks wrapped/slot_1 "
                   "--in-place",
    "verify": "modelip verify --qpc final/programqpc.bin --mek MEK.dat",
    "pack": "modelip pack -o model.qpc --segment network.elf=network.elf "
            "--segment networkdesc.bin=desc.bin",
    "completion": 'eval "$(modelip completion bash)"',
    "sample": "modelip sample .",
    "package": "modelip package model.onnx --partitions 3 -o mdp.qpc",
    "inspect": "modelip inspect final/programqpc.bin --json",
    "pki init": "modelip pki init pki",
    "card init": "modelip card init --pki pki --id 0 -o card0.json",
    "card attest": "modelip card attest card0.json -i request.bin -o pub0.dat",
    "card reset": "modelip card reset card0.json",
    "card load": "modelip card load card0.json final/programqpc.bin",
    "card unload": "modelip card unload card0.json",
    "card show": "modelip card show card0.json card1.json --json",
    "events": "modelip events --api 127.0.0.1:62480 --since 1200 --follow --json",
    "fleet": "modelip fleet --api 127.0.0.1:62480",
    "release": "modelip release host0 3 --api ops.example:62480 --tls-ca ca.pem --tls-cert "
               "bob.pem --tls-key bob.key",
    "cordon": "modelip cordon host0 --api 127.0.0.1:62480",
    "uncordon": "modelip uncordon host0 --api 127.0.0.1:62480",
    "host-agent": "modelip host-agent --config /etc/modelip/agent.yaml --log-json",
    "emulate": "modelip emulate --hosts 2 --devices-per-host 4 --reset-rate 0.01",
    "attest": "modelip attest --ip 127.0.0.1 -d 0 -o pub0.dat --trust-root "
              "emulated-pki/root.pem",
    "device list": "modelip device list --ip 127.0.0.1",
    "device reset": "modelip device reset --ip 127.0.0.1 -d 0",
    "device load": "modelip device load --ip 127.0.0.1 --qpc enc/programqpc.bin -d 0 "
                   "(MDP: -d 1 -d 2 -d 3, partition k on the k-th card)",
    "device unload": "modelip device unload --ip 127.0.0.1 -d 0",
    "device exec": "modelip device exec --ip 127.0.0.1 -d 0 --input x.npz --output y.npz",
    "deploy": "modelip deploy demo.yaml --json",
    "apply": "modelip apply plans/deployments.yaml --dry-run",
    "watch": "modelip watch demo.yaml --duration 60 --metrics-port 9464",
    "run": "modelip run demo.yaml --input image.npy --output out.npz",
    "status": "modelip status demo.yaml --cards",
    "rollout status": "modelip rollout status plans/rollout-v2.yaml",
    "rollout pause": "modelip rollout pause plans/rollout-v2.yaml",
    "rollout resume": "modelip rollout resume plans/rollout-v2.yaml",
    "rollout undo": "modelip rollout undo plans/rollout-v2.yaml",
    "rollout approve": "modelip rollout approve --api 127.0.0.1:62480",
    "demo": "modelip demo --duration 20",
}

# by argument (dest): the same meaning wherever it appears
HELP = {
    "port": "the host proxy's port (default 62473)",
    "plan": "the plan file (YAML; docs/plans.md)",
    "device": "the card's number on its host (repeat for an MDP group: partition k on the "
              "k-th)",
    "partition": "which partition of an MDP container this card runs (default 0)",
    "qpc": "the program container file",
    "output_dir": "a directory for the outputs (created; files written whole or not at all)",
    "input_dir": "the directory encrypt-model wrote (its encrypted_model.qpc)",
    "mek": "the MEK file (16 raw bytes or 32 hex digits), or a sealed MEK",
    "card": "a files-only card (JSON, from `modelip card init`)",
    "shell": "bash or zsh",
    "print_json": "print the request and the report as JSON",
    "json": "machine-readable output",
    "in_place": "rewrite the file itself (only its key-slot tail changes)",
    "wrapped_meks": "wrapped-MEK directories (from wrap-mek), one per slot to replace",
    "encrypted_qpc": "an encrypted program (file, or the directory that holds it)",
    "segment": "NAME=FILE: a segment of the container, in order",
    "model_version": "the model's version (cards refuse versions below their floor)",
    "partitions": "pipeline stages (1: a plain container; N: an MDP container)",
    "balance": "cut by parameter bytes (params) or by compute (flops)",
    "file": "a container file, plain or encrypted",
    "dir": "a directory",
    "pki": "the vendor PKI directory (from `modelip pki init`)",
    "id": "the card's identity, as its certificate names it (--id 0: card '0')",
    "firmware": "the firmware version the card reports",
    "hosts": "how many hosts",
    "devices_per_host": "cards per host",
    "bind": "the address to listen on (default 127.0.0.1)",
    "reboot_time": "seconds a reset card takes to come back",
    "attest_latency": "seconds added to every attestation",
    "tls_cert": "serve TLS with this certificate (PEM)",
    "tls_key": "... and this private key (PEM)",
    "duration": "seconds from the start; then work in flight finishes (bounded by the "
                "plan's timeouts) and the fleet is judged",
}
OUTPUT_HELP = "the file to write (whole or not at all)"
INPUT_HELP = "the input file"


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
            ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from _leaves(sub, (*path, name))
            return
    yield " ".join(path), parser


def document(parser: argparse.ArgumentParser) -> None:
    """Give every command its example and every argument its words."""
    for name, leaf in _leaves(parser):
        if name in EXAMPLES:
            leaf.epilog = f"example:\n  {EXAMPLES[name]}"
            leaf.formatter_class = argparse.RawDescriptionHelpFormatter
        for action in leaf._actions:  # noqa: SLF001
            if action.help is not None or action.dest == "help":
                continue
            if action.dest in HELP:
                action.help = HELP[action.dest]
            elif action.dest == "output":
                action.help = OUTPUT_HELP
            elif action.dest == "input":
                action.help = INPUT_HELP


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Commands without an example and arguments without help (for the test)."""
    missing = []
    for name, leaf in _leaves(parser):
        if not leaf.epilog:
            missing.append(f"{name}: no example")
        missing += [f"{name}: {a.dest}" for a in leaf._actions  # noqa: SLF001
                    if a.help is None and a.dest != "help"]
    return missing
