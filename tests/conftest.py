"""Shared fixtures: a vendor PKI, emulated cards, containers of several shapes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.crypto.mek import MEK
from orchestrator.emulator.card import CardConfig, EmulatedCard
from orchestrator.emulator.pki import VendorPKI
from orchestrator.qpc.build import pack_files, pack_mdp
from tests.pg import PostgresServer

# A few shapes every round-trip test runs through: one segment, many, an empty
# one, one spanning several 1 KiB chunks (chunk size is lowered in those tests).
SHAPES: dict[str, dict[str, int]] = {
    "one-segment": {"network.elf": 5000},
    "many-segments": {"network.elf": 3000, "networkdesc.bin": 64, "constantsdesc.bin": 32,
                      "constants.bin": 10000, "network.elf.crc": 4},
    "empty-segment": {"network.elf": 100, "constants.bin": 0},
    "multi-chunk": {"network.elf": 5 * 1024 + 17, "constants.bin": 3 * 1024},
}


@pytest.fixture(scope="session")
def pki() -> VendorPKI:
    return VendorPKI.create()


@pytest.fixture
def pki_dir(tmp_path: Path, pki: VendorPKI) -> Path:
    directory = tmp_path / "pki"
    pki.save(directory)
    return directory


@pytest.fixture
def make_card(pki: VendorPKI) -> Callable[..., EmulatedCard]:
    def make(card_id: str = "card-0", **config: object) -> EmulatedCard:
        return EmulatedCard(pki.issue_card(card_id), CardConfig(**config))  # type: ignore[arg-type]

    return make


@pytest.fixture
def mek() -> MEK:
    return MEK.generate()


def write_segments(directory: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    """Random segment files in ``directory``; returns name -> content."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        (directory / name).write_bytes(data)
        contents[name] = data
    return contents


@pytest.fixture
def make_qpc(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, bytes]]]:
    """Build a plaintext container; returns its path and the segment contents."""
    counter = iter(range(10_000))

    def make(sizes: dict[str, int], name: str | None = None) -> tuple[Path, dict[str, bytes]]:
        index = next(counter)
        contents = write_segments(tmp_path / f"segments-{index}", sizes)
        path = tmp_path / (name or f"model-{index}.qpc")
        pack_files(path, [(n, str(tmp_path / f"segments-{index}" / n)) for n in sizes])
        return path, contents

    return make


@pytest.fixture
def make_mdp(tmp_path: Path, make_qpc: Callable[..., tuple[Path, dict[str, bytes]]]
             ) -> Callable[[int], tuple[Path, list[dict[str, bytes]]]]:
    """An MDP container of ``n`` partitions, each a small two-segment container."""

    def make(n: int) -> tuple[Path, list[dict[str, bytes]]]:
        parts = [make_qpc({"network.elf": 2000 + 100 * i, "networkdesc.bin": 16})
                 for i in range(n)]
        path = tmp_path / f"mdp-{n}.qpc"
        pack_mdp(path, [str(p) for p, _ in parts])
        return path, [c for _, c in parts]

    return make


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of our own (root only: a real full or read-only filesystem)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# --- a PostgreSQL server for the replicas' tests (tests/pg.py), one per session ------------

@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    """A fresh database of the session's server (started again if a test stopped it)."""
    postgres.start() if not _answers(postgres) else None
    return postgres.new_database()


def _answers(server: PostgresServer) -> bool:
    import psycopg

    try:
        with psycopg.connect(server.url("postgres"), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False
