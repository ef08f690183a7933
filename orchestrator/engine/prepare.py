"""Once per plan: the MEK, the packaged model, the encrypted body (cached).

The encrypted body is cached in the state directory by the content of the
source container, the MEK fingerprint and the sealing settings, so a restart
reuses it (same program id: hosts that already staged it are not sent it again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.atomicfile import atomic_output, write_bytes_atomic
from orchestrator.crypto.container import (
    FORMAT_VERSION,
    ContentPolicy,
    SealedContainer,
    SealSettings,
)
from orchestrator.crypto.mek import MEK, load_mek, write_mek
from orchestrator.crypto.seal import write_sealed
from orchestrator.crypto.stream import derive_seal_salt
from orchestrator.errors import FormatError, UsageError
from orchestrator.plan.model import Plan
from orchestrator.qpc.container import open_container
from orchestrator.qpc.mdp import TensorSpec, read_mdp_meta
from orchestrator.qpc.onnx_package import IO_DESC


@dataclass(frozen=True, slots=True)
class PreparedProgram:
    body: Path                 # encrypted container, no key slots
    program_id: str            # hex SHA-256 of the body (its content address on hosts)
    info_digest: bytes         # SHA-256 of the top-level encryption info (load receipts)
    partitions: int            # 1 for a plain container
    model_inputs: tuple[str, ...]   # names, when the container says (ONNX-packaged)
    salt: bytes                # the encryption's salt: with source and MEK, the body
    model_id: str
    version: int
    floor: int                 # the rollback floor a card takes on when it loads this
    input_specs: tuple[TensorSpec, ...]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(8 << 20):
            digest.update(piece)
    return digest.hexdigest()


def obtain_mek(plan: Plan) -> MEK:
    """The plan's MEK: its file, unsealed by its PKCS#11 token, or one generated once
    into the state dir (0600)."""
    if plan.mek.sealed is not None and plan.mek.pkcs11 is not None:
        from orchestrator.crypto.custody import unseal

        return unseal(plan.mek.sealed, plan.mek.pkcs11)
    if plan.mek.file is not None:
        return load_mek(plan.mek.file)
    path = plan.state_dir / "mek.dat"
    if path.exists():
        return load_mek(path)
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    mek = MEK.generate()
    write_mek(path, mek)
    return mek


def sealing_source(plan: Plan, mek: MEK) -> tuple[Path, SealSettings, str]:
    """(the plaintext container to seal, its settings, the source key: a digest of
    the container, the MEK's fingerprint and the settings, which names the body)."""
    cache = plan.state_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if plan.model.onnx is not None:
        from orchestrator.qpc.partition import package_onnx

        key = hashlib.sha256(f"{file_digest(plan.model.onnx)}:{plan.model.partitions}:"
                             f"{plan.model.balance}".encode()).hexdigest()[:16]
        source = cache / f"packaged-{key}.qpc"
        if not source.exists():
            # our own cache, which replicas sharing a state directory fill at once
            package_onnx(plan.model.onnx, source, partitions=plan.model.partitions,
                         balance=plan.model.balance, overwrite=True)
    else:
        assert plan.model.qpc is not None  # noqa: S101 - the plan has exactly one
        source = plan.model.qpc
    settings = SealSettings(
        model_id=plan.model.model_id, model_version=plan.model.version,
        policy=ContentPolicy(not_after=plan.model.expires, min_firmware=plan.model.min_firmware,
                             rollback_floor=plan.model.rollback_floor))
    source_key = hashlib.sha256(json.dumps([
        FORMAT_VERSION, file_digest(source), mek.fingerprint(), settings.model_id,
        settings.model_version, plan.model.expires, plan.model.min_firmware,
        plan.model.rollback_floor]).encode()).hexdigest()
    return source, settings, source_key


def prepare_program(plan: Plan, mek: MEK) -> PreparedProgram:
    """The plan's encrypted body (from the cache when it is there).

    Its salt is derived from the MEK and the source key (stream.derive_seal_salt):
    every replica, every state directory seals the same source the same way, bit for
    bit, and nothing read from a store can make one salt seal two plaintexts.
    """
    source, settings, source_key = sealing_source(plan, mek)
    cache = plan.state_dir / "cache"
    salt = derive_seal_salt(mek, bytes.fromhex(source_key))
    settings = dataclasses.replace(settings, salt=salt)
    body = cache / f"encrypted-{source_key[:16]}-{salt[:8].hex()}.qpc"
    digest_file = body.with_suffix(".sha256")
    if not (body.exists() and digest_file.exists()):
        with open_container(source) as container:
            meta = read_mdp_meta(container)
            partitions = len(meta.partitions) if meta else 1
            if partitions != plan.group_size:
                raise UsageError(f"{source}: the program has {partitions} partition(s) but "
                                 f"the plan groups {plan.group_size} card(s)")
            with atomic_output(body, overwrite=True) as handle:  # our own cache
                write_sealed(handle, container, mek, settings, key_slots=[])
        write_bytes_atomic(digest_file, file_digest(body).encode(), overwrite=True)
    return describe_body(body, digest_file.read_text().strip(), mek, plan.group_size)


def describe_body(body: Path, program_id: str, mek: MEK, group_size: int) -> PreparedProgram:
    """A sealed body ready to deploy: checked against the MEK and the plan's groups."""
    with open_container(body) as container:
        sealed = SealedContainer(container)
        sealed.check_mek(mek)
        meta = read_mdp_meta(container)
        partitions = len(meta.partitions) if meta else 1
        inputs: tuple[TensorSpec, ...] = ()
        if meta is not None:
            inputs = meta.model_inputs
        elif container.has(IO_DESC):
            try:
                inputs = tuple(TensorSpec(str(t["name"]), str(t["dtype"]),
                                          tuple(t.get("shape", ())))
                               for t in json.loads(container.read(IO_DESC))["inputs"])
            except (ValueError, KeyError, TypeError):
                raise FormatError(str(body), "io_desc.json is malformed") from None
        if partitions != group_size:
            raise FormatError(str(body), f"has {partitions} partitions, the plan groups "
                              f"{group_size} cards")
        info = sealed.info
        return PreparedProgram(body, program_id, hashlib.sha256(sealed.info_bytes).digest(),
                               partitions, tuple(t.name for t in inputs), info.salt,
                               info.model_id, info.model_version, info.policy.rollback_floor,
                               inputs)


