"""Reading a program back: ``verify`` (decrypt and authenticate every segment with
the owner's MEK, optionally extracting them, all or nothing) and ``inspect``
(what a container shows without a key)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.atomicfile import output_directory, refuse_existing
from orchestrator.crypto.container import SealedContainer
from orchestrator.crypto.mek import MEK
from orchestrator.errors import FormatError
from orchestrator.qpc.container import Container, open_container
from orchestrator.qpc.mdp import read_mdp_meta
from orchestrator.qpc.onnx_package import IO_DESC


def verify_program(path: str, mek: MEK, *, extract: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Decrypt and authenticate every segment with the owner's MEK.

    Nothing plaintext is written unless ``extract`` names a directory (files
    there are not replaced unless ``overwrite``).
    Returns a summary (segments and sizes). Raises WrongMEKError/IntegrityError.
    """
    program = Path(path)
    with open_container(program) as container:
        sealed = SealedContainer(container).open(mek)
        summary: dict[str, Any] = {"file": str(program), "model_id": sealed.info.model_id,
                                   "segments": []}
        plan = _collect(sealed, mek, prefix="")
        if extract:
            refuse_existing([Path(extract) / name for name, _, _ in plan], overwrite=overwrite)
            with output_directory(extract) as directory:
                summary["segments"] = _extract(plan, directory)
        else:
            for name, container_sealed, entry_name in plan:
                size = sum(len(p) for p in container_sealed.iter_decrypted(entry_name))
                summary["segments"].append({"name": name, "size": size})
    return summary


def _extract(plan: list[tuple[str, Any, str]], directory: Path) -> list[dict[str, Any]]:
    """Decrypt into a private staging directory; move into place only when all verified."""
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=directory))
    try:
        written = []
        for name, sealed, entry_name in plan:
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            size = 0
            with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                           "wb") as handle:
                for piece in sealed.iter_decrypted(entry_name):
                    handle.write(piece)
                    size += len(piece)
                os.fsync(handle.fileno())
            written.append({"name": name, "size": size})
        for item in written:
            name = str(item["name"])
            final = directory / name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, final)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _collect(sealed: SealedContainer, mek: MEK, *, prefix: str) -> list[tuple[str, Any, str]]:
    plan: list[tuple[str, Any, str]] = []
    meta = sealed.mdp_meta()
    index = {p.segment: p.index for p in meta.partitions} if meta else {}
    for entry in sealed.info.segments:
        if entry.nested:
            assert meta is not None  # noqa: S101 - mdp_meta is None only without partitions
            inner = sealed.partition(index[entry.name], mek, meta)
            plan.extend(_collect(inner, mek, prefix=f"{prefix}{entry.name}/"))
        else:
            plan.append((prefix + entry.name, sealed, entry.name))
    return plan


def inspect_container(path: str) -> dict[str, Any]:
    """Everything a container shows without a key, as a JSON-able dict."""
    with open_container(path) as container:
        return _describe(container)


def _describe(container: Container) -> dict[str, Any]:
    header = container.header
    document: dict[str, Any] = {
        "file": container.label,
        "version": f"{header.major}.{header.minor}",
        "compression": header.compression,
        "size": header.size,
        "segments": [],
        "encrypted": False,
    }
    sealed = None
    try:
        sealed = SealedContainer(container)
    except FormatError:
        if container.has("modelip_encinfo"):
            raise
    entries = {e.name: e for e in sealed.info.segments} if sealed else {}
    for segment in container.segments:
        entry = entries.get(segment.name)
        document["segments"].append({
            "name": segment.name, "size": segment.size, "offset": segment.offset,
            "file_offset": segment.file_offset,
            "encrypted": bool(entry and (entry.encrypted or entry.nested)),
        })
    meta = read_mdp_meta(container)
    if meta is not None:
        document["mdp"] = json.loads(meta.encode())
        document["io"] = {"inputs": document["mdp"].get("model_inputs", []),
                          "outputs": document["mdp"].get("model_outputs", [])}
    elif container.has(IO_DESC):  # a one-stage program packaged from ONNX (plaintext)
        try:
            described = json.loads(container.read(IO_DESC))
            document["io"] = {"inputs": list(described["inputs"]),
                              "outputs": list(described["outputs"])}
        except (ValueError, KeyError, TypeError):
            raise FormatError(container.label, "io_desc.json is malformed") from None
    if sealed is not None:
        info = sealed.info
        document["encrypted"] = True
        document["encryption"] = {
            "format_version": info.format_version, "aead": info.aead, "kdf": info.kdf,
            "chunk_size": info.chunk_size, "model_id": info.model_id,
            "model_version": info.model_version,
            "policy": {"not_after": info.policy.not_after,
                       "min_firmware": info.policy.min_firmware,
                       "rollback_floor": info.policy.rollback_floor},
        }
        document["key_slots"] = [
            {"slot": s.slot, "card_id": s.card_id, "session_id": s.session_id.hex(),
             "kem": s.kem.value, "program": s.program.hex(), "bound": s.bound}
            for s in sealed.key_slots
        ]
    return document
