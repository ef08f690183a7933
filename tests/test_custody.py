"""MEK custody in a real PKCS#11 token: SoftHSM2, a throwaway token per test session."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.crypto.custody import TokenSpec, seal, unseal
from orchestrator.crypto.mek import load_mek
from orchestrator.engine.plan import Plan
from tests.test_engine import running, write_plan

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4711-pin"


@pytest.fixture(scope="module", autouse=True)
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two tokens (`modelip`, `other`) in a temp dir, before the library is first loaded."""
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", "MODELIP_PKCS11_PIN")}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in ("modelip", "other"):
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
                        "--so-pin", "so-" + PIN], check=True, capture_output=True)
    os.environ["MODELIP_PKCS11_PIN"] = PIN
    for token in ("modelip", "other"):
        assert run("hsm", "init-kek", *flags(token=token)) == 0
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


def flags(*, token: str = "modelip", kek: str = "kek") -> list[str]:
    return ["--pkcs11-module", MODULE, "--token", token, "--kek", kek]


def files_holding(root: Path, secret: bytes) -> list[Path]:
    """Every file under ``root`` that contains the key, raw or as hex."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if secret in data or secret.hex().encode() in data.lower():
                found.append(path)
    return found


def test_a_kek_is_made_once_sensitive_and_not_extractable(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType

    capsys.readouterr()
    assert run("hsm", "init-kek", *flags()) == 3
    assert "exists already" in capsys.readouterr().err
    token = pkcs11.lib(MODULE).get_token(token_label="modelip")
    with token.open(user_pin=PIN) as session:
        key = session.get_key(label="kek", key_type=KeyType.AES)
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        assert key[Attribute.TOKEN] and not key[Attribute.WRAP]


def test_generate_seal_use_and_nothing_leaks(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    sealed = tmp_path / "mek.sealed"
    assert run("generate-mek", "-o", sealed, *flags()) == 0
    assert sealed.stat().st_mode & 0o777 == 0o600
    blob = json.loads(sealed.read_text())
    assert (blob["format"], blob["token"], blob["kek"]) == ("modelip-sealed-mek/1", "modelip",
                                                            "kek")
    mek = unseal(sealed, TokenSpec(MODULE, "modelip", "kek"))
    (tmp_path / "elf").write_bytes(os.urandom(5000))
    assert run("pack", "-o", tmp_path / "m.qpc", "--segment", f"network.elf={tmp_path / 'elf'}"
               ) == 0
    assert run("encrypt-model", "--qpc", tmp_path / "m.qpc", "--mek", sealed, *flags(),
               "--output-dir", tmp_path / "enc") == 0
    assert run("verify", "--qpc", tmp_path / "enc" / "encrypted_model.qpc", "--mek", sealed,
               *flags()) == 0
    capsys.readouterr()
    assert run("verify", "--qpc", tmp_path / "enc" / "encrypted_model.qpc", "--mek", sealed) == 2
    assert "is a sealed MEK; give --pkcs11-module" in capsys.readouterr().err
    assert files_holding(tmp_path, mek.key) == []
    # an existing MEK brought into custody opens to the same key
    assert run("generate-mek", "-o", tmp_path / "MEK.dat") == 0
    assert run("hsm", "wrap-existing", "--mek", tmp_path / "MEK.dat", "-o",
               tmp_path / "old.sealed", *flags()) == 0
    assert unseal(tmp_path / "old.sealed", TokenSpec(MODULE, "modelip", "kek")).key == \
        load_mek(tmp_path / "MEK.dat").key


@pytest.mark.parametrize(("case", "code", "expected"), [
    ("wrong pin", 3, "wrong PIN"),
    ("no pin", 2, "$MODELIP_PKCS11_PIN, which is not set"),
    ("no token", 3, "no PKCS#11 token labelled 'nope'"),
    ("no kek", 3, "has no AES key labelled 'nope'"),
    ("another kek", 3, "sealed under KEK 'kek' on token 'modelip', not KEK 'kek' on token "
                       "'other'"),
    ("same label, another token", 3, "does not open under"),
    ("tampered", 3, "does not open under"),
    ("missing file", 2, "MEK file not found"),
])
def test_every_custody_failure_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        case: str, code: int, expected: str) -> None:
    sealed = tmp_path / "mek.sealed"
    blob, _ = seal(TokenSpec(MODULE, "modelip", "kek"))
    sealed.write_bytes(blob)
    argv = flags()
    if case == "wrong pin":
        monkeypatch.setenv("MODELIP_PKCS11_PIN", "0000")
    elif case == "no pin":
        monkeypatch.delenv("MODELIP_PKCS11_PIN")
    elif case == "no token":
        argv = flags(token="nope")
    elif case == "no kek":
        argv = flags(kek="nope")
    elif case == "another kek":
        argv = flags(token="other")
    elif case == "same label, another token":
        document = json.loads(blob)
        document["token"] = "other"  # claims the other token's KEK of the same name
        sealed.write_text(json.dumps(document))
        argv = flags(token="other")
    elif case == "tampered":
        document = json.loads(blob)
        document["sealed"] = ("0" if document["sealed"][0] != "0" else "1") + \
            document["sealed"][1:]
        sealed.write_text(json.dumps(document))
    elif case == "missing file":
        sealed.unlink()
    capsys.readouterr()
    # wrap-existing takes a MEK file, not a sealed blob: refused as bad input
    assert run("hsm", "wrap-existing", "--mek", sealed, "-o", tmp_path / "out.sealed",
               *argv) == 2
    capsys.readouterr()
    assert run("verify", "--qpc", tmp_path / "none.qpc", "--mek", sealed, *argv) == code
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.sealed").exists()
    capsys.readouterr()
    assert run("generate-mek", "-o", tmp_path / "new.sealed", *argv) in (0, code)
    if case in ("wrong pin", "no pin", "no token", "no kek"):
        assert not (tmp_path / "new.sealed").exists()


async def test_the_demo_fleet_deploys_with_a_sealed_mek_and_the_unseal_is_journaled(
        tmp_path: Path) -> None:
    assert run("generate-mek", "-o", tmp_path / "mek.sealed", *flags()) == 0
    path = write_plan(tmp_path, hosts=2, devices=2)
    text = path.read_text().replace("mek:\n  generate: true", (
        f"mek:\n  sealed: mek.sealed\n  pkcs11: {{module: {MODULE}, token: modelip, kek: kek}}"))
    path.write_text(text)
    plan = Plan.load(path)
    assert plan.mek.sealed is not None
    async with running(plan) as (engine, _):
        assert all(c.state.value == "SERVING" for c in engine.cards)
        key = engine.ctx.mek.key
        unseals = await engine.ctx.store.unseals()
    assert [(u[2], u[3]) for u in unseals] == [("modelip", "kek")]
    assert files_holding(tmp_path, key) == []
    assert not (plan.state_dir / "mek.dat").exists()


def test_a_sealed_mek_refuses_a_plan_without_its_token(tmp_path: Path) -> None:
    from orchestrator.errors import PlanError

    path = write_plan(tmp_path, hosts=1, devices=1)
    (tmp_path / "mek.sealed").write_text("{}")
    path.write_text(path.read_text().replace("mek:\n  generate: true",
                                             "mek:\n  sealed: mek.sealed"))
    with pytest.raises(PlanError, match="a sealed MEK and its pkcs11 token go together"):
        Plan.load(path)

