"""The README runs as written: its shell blocks, in order, in one fresh directory (with
the repository's plans/ beside them, as in a clone), with `modelip` on PATH.

A block preceded by ``<!-- readme-test: skip (why) -->`` is not run here (the make
targets that build this very environment; the replicas demo, which
tests/test_replicas.py covers). Anything a block starts in the background is stopped
when the script ends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\n)?```sh\n(.*?)```", re.S)


def blocks(text: str) -> list[str]:
    return [body for skip, body in BLOCK.findall(text) if not skip]


def test_the_readme_blocks_run_as_written(tmp_path: Path) -> None:
    runnable = blocks((ROOT / "README.md").read_text())
    assert len(runnable) >= 5   # sample, orchestrator, file level, models, hosts
    shutil.copytree(ROOT / "plans", tmp_path / "plans")
    script = tmp_path / "readme.sh"
    script.write_text("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
                      + "\n".join(runnable))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # what the blocks say they make is there
    for made in ("final/programqpc.bin", "resnet4.qpc", "y0.npz", "y.npz", "out.npz",
                 "host-mdp/programqpc.bin", "wrappedMEK/slot_0/MEK.encrypt"):
        assert (tmp_path / "try" / made).is_file(), made   # in the examples' own directory
    assert {p.name for p in tmp_path.iterdir()} == {"plans", "readme.sh", "try"}
    assert "Traceback" not in result.stderr
    assert "inputs: " in result.stdout   # `inspect` names the model's inputs, not only --json


def test_shell_completion_offers_the_parsers_own_commands_and_flags(tmp_path: Path) -> None:
    script = tmp_path / "complete.sh"
    script.write_text(
        f'eval "$({sys.executable} -m orchestrator completion bash)"\n'
        'complete_for() { COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); '
        '_modelip; echo "${COMPREPLY[*]}"; }\n'
        "complete_for modelip enc\ncomplete_for modelip device ''\n"
        "complete_for modelip device load --q\ncomplete_for modelip watch --st\n")
    lines = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                           check=True).stdout.splitlines()
    assert lines == ["encrypt-model encrypt-with-session-keys", "exec list load reset unload",
                     "--qpc", "--store --store-word"]
    zsh = subprocess.run([sys.executable, "-m", "orchestrator", "completion", "zsh"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "bashcompinit" in zsh and "complete -o filenames -F _modelip modelip" in zsh


def test_every_command_has_an_example_and_every_argument_its_help() -> None:
    from orchestrator.cli.help import EXAMPLES, undocumented
    from orchestrator.cli.main import build_parser

    assert undocumented(build_parser()) == []
    shown = subprocess.run([sys.executable, "-m", "orchestrator", "device", "exec", "--help"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"example:\n  {EXAMPLES['device exec']}" in shown


def test_a_session_is_named_the_same_way_by_every_command(tmp_path: Path) -> None:
    def modelip(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    modelip("sample", ".")
    modelip("pki", "init", "pki")
    made = modelip("card", "init", "--pki", "pki", "--id", "0", "-o", "card0.json")
    session = re.search(r"session ([0-9a-f]{16})", made)
    assert session is not None, made
    modelip("card", "attest", "card0.json", "-o", "pub0.dat")
    modelip("generate-mek", "-o", "MEK.dat")
    modelip("pack", "-o", "model.qpc", "--segment", "network.elf=network.elf")
    modelip("encrypt-model", "--qpc", "model.qpc", "--mek", "MEK.dat", "--output-dir", "enc",
            "--pub-keys", "pub0.dat", "--trust-root", "pki/root.pem")
    shown = modelip("inspect", "enc/programqpc.bin")
    assert f"session {session.group(1)}" in shown, shown


def test_the_docs_shell_blocks_run_as_written(tmp_path: Path) -> None:
    """docs/*.md: each file's shell blocks in a fresh directory; SoftHSM2 gets a private
    token directory (SOFTHSM2_CONF), as a user's own configuration would give it."""
    conf = tmp_path / "softhsm2.conf"
    (tmp_path / "tokens").mkdir()
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\n"
                    "objectstore.backend = file\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               SOFTHSM2_CONF=str(conf))
    ran = 0
    for doc in sorted((ROOT / "docs").glob("*.md")):
        runnable = blocks(doc.read_text())
        if not runnable:
            continue
        work = tmp_path / doc.stem
        work.mkdir()
        script = work / "doc.sh"
        script.write_text("set -euo pipefail\n" + "\n".join(runnable))
        result = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True,
                                text=True, timeout=300, check=False)
        assert result.returncode == 0, (doc.name, result.stdout[-2000:], result.stderr[-2000:])
        ran += 1
    assert ran >= 1
    assert (tmp_path / "keys" / "mek.sealed").is_file()
    assert (tmp_path / "keys" / "existing.sealed").is_file()


def test_device_list_names_the_session_as_attest_does(tmp_path: Path) -> None:
    from tests.emulate import emulate

    def modelip(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    with emulate(tmp_path, devices=2) as (addresses, root):
        host, port = addresses[0].rsplit(":", 1)
        said = modelip("attest", "--ip", host, "--port", port, "-d", "1", "-o", "pub1.dat",
                       "--trust-root", str(root))
        session = re.search(r"session ([0-9a-f]{16})", said)
        assert session is not None, said
        listed = modelip("device", "list", "--ip", host, "--port", port)
    line = next(line for line in listed.splitlines() if line.startswith("device 1:"))
    assert f"session {session.group(1)}" in line, listed
