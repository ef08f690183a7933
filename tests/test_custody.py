"""MEK custody in a real PKCS#11 token: SoftHSM2, a throwaway token per test session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.crypto.custody import TokenSpec, seal, unseal
from orchestrator.crypto.mek import MEK, load_mek
from orchestrator.plan.model import Plan
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


@pytest.fixture(autouse=True)
def pin_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a command started with the PIN in its environment."""
    monkeypatch.setenv("MODELIP_PKCS11_PIN", PIN)


def run(*argv: object) -> int:
    """One command, as its own process would run it: the PIN it was given leaves the
    command's environment once the token session is open; the next command (a new
    process) finds it again."""
    pin = os.environ.get("MODELIP_PKCS11_PIN")
    try:
        return main([str(a) for a in argv])
    finally:
        if pin is not None:
            os.environ["MODELIP_PKCS11_PIN"] = pin


def unsealed(path: Path) -> MEK:
    """unseal() in a process of its own (the PIN back for the next one, as with run)."""
    try:
        return unseal(path, TokenSpec(MODULE, "modelip", "kek"))
    finally:
        os.environ["MODELIP_PKCS11_PIN"] = PIN


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
    mek = unsealed(sealed)
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
    assert unsealed(tmp_path / "old.sealed").key == \
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
    try:
        blob, _ = seal(TokenSpec(MODULE, "modelip", "kek"))
    finally:
        os.environ["MODELIP_PKCS11_PIN"] = PIN  # the command under test is a new process
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
        key = bytes(engine.ctx.mek.key)  # a copy: the engine wipes its MEK at the end
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



def test_the_pin_leaves_the_environment_once_the_token_is_open(tmp_path: Path) -> None:
    sealed = tmp_path / "mek.sealed"
    assert run("generate-mek", "-o", sealed, *flags()) == 0
    assert os.environ.get("MODELIP_PKCS11_PIN") == PIN
    unseal(sealed, TokenSpec(MODULE, "modelip", "kek"))
    assert "MODELIP_PKCS11_PIN" not in os.environ   # no child process inherits it
    os.environ["MODELIP_PKCS11_PIN"] = PIN


HOLDER = """
import ctypes, os, sys, time
from orchestrator.crypto.mek import MEK
ready_r, ready_w = os.pipe()
holder = os.fork()
if holder == 0:                       # a process of user nobody that holds a MEK (or not)
    os.setgid(65534); os.setuid(65534)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # dumpable, as any process its user started
    key = MEK.generate() if sys.argv[1] == "mek" else None
    os.write(ready_w, b"1"); time.sleep(60); os._exit(0)
os.read(ready_r, 1)
said = []
for name in ("environ", "mem"):
    reader = os.fork()
    if reader == 0:                   # another process of the same user reads it
        os.setgid(65534); os.setuid(65534)
        try:
            with open(f"/proc/{holder}/{name}", "rb") as handle:
                handle.read(1) if name == "environ" else None
            os._exit(0)
        except PermissionError:
            os._exit(13)
    said.append(f"{name}={os.waitstatus_to_exitcode(os.waitpid(reader, 0)[1])}")
os.kill(holder, 9); os.waitpid(holder, 0)
print(" ".join(said))
"""


@pytest.mark.parametrize(("holds", "expected"), [("mek", "environ=13 mem=13"),
                                                  ("nothing", "environ=0 mem=0")])
def test_a_process_holding_a_mek_is_closed_to_its_own_user(holds: str, expected: str) -> None:
    """Staged for real: two processes of one unprivileged user; the one that holds a MEK
    cannot be read through /proc/PID/mem or /proc/PID/environ by the other (the control,
    holding nothing, can)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("needs root to become two processes of another user")
    result = subprocess.run([sys.executable, "-c", HOLDER, holds], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == expected, result.stderr


def test_a_pkcs11_module_outside_the_system_libraries_is_not_loaded(tmp_path: Path) -> None:
    """A plan or a flag naming a module names code that would run in the process that
    holds the MEK: a shared object whose constructor leaves a mark is refused before it
    is opened, unless the operator's allow-list names it."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the shared object")
    source = tmp_path / "mark.c"
    mark = tmp_path / "RAN"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void)'
                      f' {{ FILE *f = fopen("{mark}", "w"); if (f) fclose(f); }}\n')
    module = tmp_path / "libmark.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(module), str(source)], check=True)
    argv = [sys.executable, "-m", "orchestrator", "hsm", "init-kek", "--pkcs11-module",
            str(module), "--token", "modelip", "--kek", "k"]
    env = {**os.environ, "MODELIP_PKCS11_PIN": PIN}
    env.pop("MODELIP_PKCS11_MODULES", None)
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert refused.returncode == 2, refused.stderr
    assert "is loaded only if $MODELIP_PKCS11_MODULES lists it" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not mark.exists()
    listed = subprocess.run(argv, env={**env, "MODELIP_PKCS11_MODULES": str(module)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert mark.exists(), listed.stderr        # the operator's list: it is opened
    assert listed.returncode == 3 and "cannot load the PKCS#11 module" in listed.stderr


def _two_deployments(tmp_path: Path, token: str) -> Path:
    """A plan of two deployments on one fleet, the second sealed under ``token``."""
    from tests.models import tiny_mlp

    assert run("generate-mek", "-o", tmp_path / "mek.sealed", *flags()) == 0
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    path = tmp_path / "plan.yaml"
    path.write_text(f"""deployments:
  - name: open
    model: {{onnx: tiny.onnx}}
    mek: {{generate: true}}
    groups: 2
  - name: sealed
    model: {{onnx: tiny.onnx, id: sealed}}
    mek: {{sealed: mek.sealed, pkcs11: {{module: {MODULE}, token: {token}, kek: kek}}}}
    groups: 2
fleet: {{emulated: {{hosts: 2, devices_per_host: 2}}}}
state_dir: state
""")
    return path


async def test_a_deployment_whose_key_custody_fails_fails_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deployments on one fleet, one of them sealed under the token: with a wrong
    PIN its custody fails at start; it serves nothing (saying why), its groups are kept
    for it (not driven, not given away), the other serves, and the run says the fleet
    is short (exit 4)."""
    import anyio

    from orchestrator.app import open_engine

    path = _two_deployments(tmp_path, "modelip")
    monkeypatch.setenv("MODELIP_PKCS11_PIN", "not-the-pin")
    async with open_engine(Plan.load(path)) as engine:
        with anyio.fail_after(60):
            await engine.run()
        summary = engine.summary()
        placements = await engine.store.placements()
    outcomes = {d.name: d for d in summary.deployments}
    assert (outcomes["open"].groups_serving, outcomes["open"].groups_wanted) == (2, 2)
    assert outcomes["sealed"].groups_serving == 0
    assert "its key custody failed" in outcomes["sealed"].short
    assert len(placements["sealed"]) == 2   # kept for it
    assert {d.deployment for d in engine.drivers} == {"open"}
    assert summary.exit_code == 4 and summary.serving == summary.cards == 2


def test_a_deployment_sealed_under_a_missing_token_is_refused_before_anything_starts(
        tmp_path: Path) -> None:
    """One line with the plan's file:line, exit 2, no state directory made."""
    path = _two_deployments(tmp_path, "not-there")
    done = subprocess.run([sys.executable, "-m", "orchestrator", "deploy", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"modelip: error: {path}:8: deployments[1].mek.pkcs11: no PKCS#11 token labelled "
        f"'not-there' in {MODULE}"], done.stderr
    assert not (tmp_path / "state").exists()
