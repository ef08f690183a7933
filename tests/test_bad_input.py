"""Bad input of every kind: one line naming the thing and the problem, the documented
exit code, no traceback, and nothing left behind. Each case is run for real, in a
fresh directory, as a user would type it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import UsageError
from orchestrator.statedir import STATE_MARK, claim_state_dir
from tests.models import tiny_mlp

MODELIP = [sys.executable, "-m", "orchestrator"]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory holding a MEK, a file, a directory and a small plan."""
    subprocess.run([*MODELIP, "generate-mek", "-o", str(tmp_path / "mek.dat")], check=True,
                   capture_output=True)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_bytes(b"x" * 64)
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "plan.yaml").write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                                        "fleet: {emulated: {hosts: 1, devices_per_host: 2}}\n"
                                        "state_dir: state\n")
    (tmp_path / "short.bin").write_bytes(b"abc")
    np.save(tmp_path / "x.npy", np.zeros((1, 8), dtype=np.float32))
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("<p>a page</p>\n")
    (tmp_path / "www.yaml").write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                                       "fleet: {emulated: {hosts: 1}}\nstate_dir: www\n")
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\nmodel: {onnx: tiny.onnx}\n")
    (tmp_path / "cycle.yaml").write_text("model: &m {onnx: tiny.onnx, again: *m}\n")
    (tmp_path / "zen.yaml").write_text("model: {onnx: package:this.x/m.onnx}\n"
                                       "mek: {generate: true}\nfleet: {emulated: {}}\n")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "__init__.py").write_text("open('RAN', 'w').close()\n")
    (tmp_path / "evil" / "m.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "evil.yaml").write_text("model: {onnx: package:evil/m.onnx}\n"
                                        "mek: {generate: true}\nfleet: {emulated: {}}\n")
    subprocess.run([*MODELIP, "pki", "init", str(tmp_path / "pki")], check=True,
                   capture_output=True)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "model.onnx").write_bytes(b"mine")
    (tmp_path / "typed.mek").write_bytes(b"correcthorsebatt")  # 16 typed characters
    (tmp_path / "typed.mek").chmod(0o600)
    host = "{address: 127.0.0.1:1, devices: [0]}"
    (tmp_path / "twice.yaml").write_text(
        f"model: {{onnx: tiny.onnx}}\nmek: {{generate: true}}\nfleet: {{hosts: [{host}, "
        f"{host}]}}\ntrust: {{roots: [afile]}}\n")
    (tmp_path / "expired.yaml").write_text(
        "model: {onnx: tiny.onnx, expires: 2001-02-03}\nmek: {generate: true}\n"
        "fleet: {emulated: {hosts: 1}}\n")
    (tmp_path / "huge.yaml").write_text(
        "model: {onnx: tiny.onnx, version: 99999999999999999999}\nmek: {generate: true}\n"
        "fleet: {emulated: {hosts: 1000000000}}\n")
    (tmp_path / "bigfleet.yaml").write_text(
        "model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
        "fleet: {emulated: {hosts: 1000000000}}\n")
    return tmp_path


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


CASES = [
    # (arguments, exit code, what the line must say)
    (["encrypt-model", "--qpc", "adir", "--mek", "mek.dat", "--output-dir", "out"], 2,
     "adir: is a directory, not a container file"),
    (["verify", "--qpc", "adir", "--mek", "mek.dat"], 2, "adir: is a directory"),
    (["inspect", "adir"], 2, "adir: is a directory"),
    (["pack", "-o", "adir", "--segment", "network.elf=afile"], 2,
     "adir: is a directory (a file is expected here)"),
    (["pki", "init", "afile"], 2, "afile: already exists"),
    (["card", "init", "--pki", "afile", "--id", "0", "-o", "card.json"], 2,
     "afile/root.key: a part of this path is not a directory"),
    (["emulate", "--bind", "999.1.1.1"], 2, "--bind 999.1.1.1: not an address of this machine"),
    (["emulate", "--base-port", "70000"], 2, "--base-port: 70000: a port is 0-65535"),
    (["emulate", "--base-port", "{busy}"], 2, "cannot listen on 127.0.0.1:{busy}"),
    (["emulate", "--base-port", "65535", "--hosts", "2"], 2, "would be past 65535"),
    (["emulate", "--reset-rate", "-1"], 2, "--reset-rate: -1: must not be negative"),
    (["emulate", "--drop-events", "1.5"], 2, "a probability is between 0 and 1"),
    (["emulate", "--hosts", "zero"], 2, "--hosts: 'zero' is not a whole number"),
    (["device", "load", "--ip", "127.0.0.1", "-d", "-1", "--qpc", "afile"], 2,
     "-d/--device: -1: a device number is 0 to 4294967295"),
    (["device", "list", "--ip", "127.0.0.1", "--port", "-3"], 2, "a port is 0-65535"),
    (["watch", "plan.yaml", "--duration", "-5"], 2, "--duration: -5: must be greater than 0"),
    (["watch", "plan.yaml", "--duration", "nan"], 2, "'nan' is not a finite number"),
    (["watch", "plan.yaml", "--metrics-port", "99999"], 2, "a port is 0-65535"),
    (["watch", "plan.yaml", "--json", "--duration", "5", "--metrics-port", "{busy}"], 2,
     "--metrics-port {busy}: cannot listen on 127.0.0.1:{busy}: address already in use"),
    (["generate-mek", "-o", "adir"], 2, "adir: is a directory (a file is expected here)"),
    (["generate-mek", "-o", "afile"], 2, "afile: already exists; refusing to overwrite"),
    (["wrap-mek", "--mek", "mek.dat", "--encrypted-qpc", "adir", "--pub-keys", "afile",
      "--trust-root", "afile", "--output-dir", "w"], 2, "adir/programqpc.bin: encrypted program "
     "not found"),
    (["replace-mek", "--encrypted-qpc", "afile", "--wrapped-meks", "adir", "--in-place"], 2,
     "adir: holds no wrapped MEK"),
    (["card", "attest", "afile", "-o", "p.dat"], 2, "afile: not an emulated card file"),
    (["card", "reset", "adir"], 2, "adir: is a directory, not a card file"),
    (["attest", "--ip", "127.0.0.1", "--port", "1", "-d", "0", "-o", "out.dat"], 4,
     "127.0.0.1:1: attest device 0: host unreachable (connection refused)"),
    (["device", "exec", "--ip", "127.0.0.1", "--port", "1", "-d", "0", "--input", "afile"], 2,
     "afile: not a numpy .npy/.npz file"),
    (["deploy", "adir"], 2, "adir: is a directory, not a plan file"),
    (["run", "afile", "--input", "afile"], 2, "afile:1: must be a mapping"),
    (["package", "afile", "-o", "o.qpc"], 2, "afile: not an ONNX model"),
    (["package", "package:nosuchpkg/x.onnx"], 2, "no installed package 'nosuchpkg'"),
    (["sample", "afile"], 2, "afile: exists and is not a directory"),
    (["completion", "fish"], 2, "argument shell: invalid choice: 'fish'"),
    (["hsm", "init-kek", "--pkcs11-module", "afile", "--token", "t", "--kek", "k"], 2,
     "$MODELIP_PKCS11_PIN, which is not set"),
    (["encrpt-model"], 2, "unknown command 'encrpt-model': did you mean 'encrypt-model'?"),
    (["inspct", "x"], 2, "did you mean 'inspect'?"),
    (["status", "plan.yaml", "--bogus"], 2, "unrecognized arguments: --bogus"),
    # the first hour: accepted before, silently wrong or a traceback
    (["attest", "--ip", "127.0.0.1", "-d", "0", "-d", "1"], 2,
     "attest: -d given 2 times; attest one card per command"),
    (["attest", "--ip", "127.0.0.1", "-d", "0", "-i", "short.bin"], 2,
     "-i short.bin: 3 bytes cannot make the report fresh"),
    (["card", "attest", "afile", "-i", "short.bin"], 2, "afile: not an emulated card file"),
    (["attest", "--ip", "127.0.0.1:62473", "-d", "0"], 2,
     "127.0.0.1:62473: give the address alone and the port with --port 62473"),
    (["device", "list", "--ip", "localhost:9"], 2, "the port with --port 9"),
    (["pack", "-o", "afile", "--segment", "network.elf=afile"], 2,
     "afile: already exists; refusing to overwrite (--force replaces it)"),
    (["run", "plan.yaml", "--input", "x.npy", "--output", "afile"], 2,
     "afile: already exists; refusing to overwrite (--force replaces it)"),
    (["device", "exec", "--ip", "127.0.0.1", "--port", "1", "-d", "0", "--input", "x.npy",
      "--output", "afile"], 2, "afile: already exists; refusing to overwrite"),
    (["sample", "samples"], 2, "samples/model.onnx: already exists; refusing to overwrite "
     "(--force replaces it)"),
    (["package", "tiny.onnx", "-o", "afile"], 2, "afile: already exists; refusing to overwrite"),
    (["encrypt-model", "--qpc", "afile", "--mek", "mek.dat", "--output-dir", "out",
      "--expires", "2001-01-01"], 2, "--expires 2001-01-01: that moment has passed"),
    (["encrypt-model", "--qpc", "afile", "--mek", "mek.dat", "--output-dir", "out",
      "--expires", "0d"], 2, "--expires 0d: a span is 1 to"),
    (["encrypt-model", "--qpc", "afile", "--mek", "mek.dat", "--output-dir", "out",
      "--model-version", "99999999999999999999"], 2, "a version is a whole number from 1"),
    (["encrypt-model", "--qpc", "afile", "--mek", "mek.dat", "--output-dir", "out",
      "--rollback-floor", "0"], 2, "--rollback-floor: 0: a version is a whole number from 1"),
    (["encrypt-model", "--qpc", "afile", "--mek", "typed.mek", "--output-dir", "out/deeper"],
     2, "typed.mek: 16 printable characters, not 16 random bytes"),
    (["encrypt-model", "--qpc", "afile", "--mek", "mek.dat", "--output-dir", "out/deeper"],
     2, "afile: "),
    (["emulate", "--hosts", "1000000"], 2, "--hosts: 1000000: from 1 to 4096 hosts"),
    (["emulate", "--devices-per-host", "5000"], 2, "from 1 to 1024 cards per host"),
    (["card", "load", "afile", "afile", "--partition", "-2"], 2,
     "--partition: -2: a device number is 0 to"),
    (["card", "init", "--pki", "pki", "--id", "\udcff", "-o", "c.json"], 2,
     "'\\udcff': not valid UTF-8 text (names and identifiers must be"),  # shown escaped
    # plans are data, never code (docs/security.md)
    (["deploy", "bomb.yaml"], 2, "expands to more than 100000 values"),
    (["deploy", "cycle.yaml"], 2, "cycle.yaml:1: an alias refers to the value that contains it"),
    (["deploy", "zen.yaml"], 2, "'this.x' is not the name of a top-level package"),
    (["deploy", "evil.yaml"], 2, "model.onnx: no installed package 'evil'"),
    (["package", "package:evil/m.onnx", "-o", "x.qpc"], 2, "no installed package 'evil'"),
    (["deploy", "www.yaml"], 2, "www: a directory modelip did not create, and not empty"),
    (["deploy", "twice.yaml"], 2, "twice.yaml:3: fleet.hosts[1].address: 127.0.0.1:1 is already "
     "fleet.hosts[0]"),
    (["deploy", "expired.yaml"], 2, "expired.yaml:1: model.expires: 2001-02-03 00:00 UTC has "
     "passed"),
    (["deploy", "huge.yaml"], 2, "model.version: must be between 1 and 9223372036854775807"),
    (["deploy", "bigfleet.yaml"], 2, "fleet.emulated.hosts: must be between 1 and 4096"),
]


@pytest.mark.parametrize(("args", "code", "said"), CASES,
                         ids=[" ".join(case[0])[:60] for case in CASES])
def test_one_line_the_documented_code_and_nothing_left(work: Path, busy_port: int,
                                                       args: list[str], code: int,
                                                       said: str) -> None:
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    filled = [a.replace("{busy}", str(busy_port)) for a in args]
    env = _clean_env(work)
    result = subprocess.run([*MODELIP, *filled], cwd=work, capture_output=True, text=True,
                            timeout=120, check=False, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert said.replace("{busy}", str(busy_port)) in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    after = sorted(p.relative_to(work) for p in work.rglob("*"))
    created = set(after) - set(before)
    # nothing half-written; only the plan's own state directory may appear (locked, empty
    # of outputs) when the failure comes after the plan was read
    assert {p for p in created if p.parts[0] != "state"} == set(), created


def _clean_env(work: Path) -> dict[str, str]:
    """No token PIN, no configured trust root but what the test puts in ``work``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODELIP_PKCS11_PIN", "MODELIP_TRUST_ROOT")}
    env["XDG_CONFIG_HOME"] = str(work / "config")
    return env


def test_a_mek_file_others_can_read_is_used_with_a_warning(work: Path) -> None:
    (work / "mek.dat").chmod(0o644)
    subprocess.run([*MODELIP, "pack", "-o", "model.qpc", "--segment", "network.elf=afile"],
                   cwd=work, check=True, capture_output=True)
    result = subprocess.run([*MODELIP, "encrypt-model", "--qpc", "model.qpc", "--mek",
                             "mek.dat", "--output-dir", "out"], cwd=work, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "mek.dat: the MEK file is readable or writable by others (mode 0644)" in result.stderr
    (work / "mek.dat").chmod(0o600)
    again = subprocess.run([*MODELIP, "verify", "--qpc", "out/encrypted_model.qpc", "--mek",
                            "mek.dat"], cwd=work, capture_output=True, text=True, timeout=60,
                           check=False)
    assert again.returncode == 0 and "WARNING" not in again.stderr


def test_the_readme_exit_code_table_matches_the_code() -> None:
    import re

    from orchestrator.errors import (
        ROLLED_BACK_EXIT,
        InputError,
        StateError,
        TransportError,
        VerificationError,
    )

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = {int(code) for code in re.findall(r"^\| *(\d+) \|", readme, flags=re.M)}
    codes = {InputError.exit_code, VerificationError.exit_code, TransportError.exit_code,
             StateError.exit_code}
    assert codes | {0, 130, ROLLED_BACK_EXIT} == table


def test_an_unknown_plan_key_names_the_nearest_known_one(work: Path) -> None:
    (work / "typo.yaml").write_text("model: {onnx: tiny.onnx}\nmek: {generate: true}\n"
                                    "fleet: {emulated: {hosts: 1, devcies_per_host: 2}}\n")
    result = subprocess.run([*MODELIP, "deploy", "typo.yaml"], cwd=work, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("typo.yaml:3: fleet.emulated.devcies_per_host: is "
                                          "not a known key: did you mean 'devices_per_host'?")


def test_a_state_dir_is_modelips_own_or_refused(work: Path) -> None:
    """A plan naming a directory of someone else's (a web root, a home) changes nothing
    in it; an empty one is taken and marked; modelip's own is used again."""
    page = work / "www" / "index.html"
    page.chmod(0o644)
    tool = work / "www" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    result = subprocess.run([*MODELIP, "deploy", "www.yaml"], cwd=work, capture_output=True,
                            text=True, timeout=120, check=False, env=_clean_env(work))
    assert result.returncode == 2, result.stderr
    assert (page.stat().st_mode & 0o777, tool.stat().st_mode & 0o777) == (0o644, 0o755)
    assert sorted(p.name for p in (work / "www").iterdir()) == ["index.html", "tool"]
    (work / "empty").mkdir()
    (work / "empty.yaml").write_text((work / "www.yaml").read_text().replace("www", "empty"))
    for _ in range(2):  # taken and marked, then known again
        result = subprocess.run([*MODELIP, "deploy", "empty.yaml", "--json"], cwd=work,
                                capture_output=True, text=True, timeout=120, check=False,
                                env=_clean_env(work))
        assert result.returncode == 0, result.stderr
    assert (work / "empty" / ".modelip-state").is_file()
    assert (work / "empty").stat().st_mode & 0o777 == 0o700


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`modelip ... | head -1` or `| grep -q`: the pipe closes early; the command ends as
    Unix tools do (141: SIGPIPE), with no error line and no traceback."""
    process = subprocess.Popen([*MODELIP, "completion", "bash"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()   # before it writes a byte
    with process.stderr:
        err = process.stderr.read()
    assert process.wait(timeout=60) == 141
    assert err == b""


def test_replicas_sharing_a_new_state_dir_both_claim_it(tmp_path: Path) -> None:
    """Two replicas started together on one new state directory: while one writes the
    mark (a temporary file beside it), the other must not take the directory for
    someone else's. Staged as it happens: the other's half-written mark is there."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "..modelip-state.k2j4x9.tmp").write_bytes(b"")   # another process, mid-write
    (state / "lock-watch").write_bytes(b"")
    claim_state_dir(state)
    assert (state / STATE_MARK).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "..bashrc.k2j4x9.tmp").write_bytes(b"")        # not a name of modelip's
    with pytest.raises(UsageError, match="did not create"):
        claim_state_dir(other)
