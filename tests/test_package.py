"""Installed as a package, modelip works as it does from a clone: the wheel and the
sdist are built from a copy of the tree, the wheel is installed into a fresh virtual
environment outside the checkout, and the commands run from an empty directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "try", "state", "build", "dist",
                                  "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist), built by the project's own backend from a copy of the tree."""
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT)
    dist = work / "dist"
    dist.mkdir()
    for hook in ("build_wheel", "build_sdist"):  # as a frontend does: one process each
        script = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        subprocess.run([sys.executable, "-c", script, str(dist)], cwd=source,
                       capture_output=True, text=True, timeout=300, check=True)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    return wheels[0], sdists[0]


def test_the_wheel_and_the_sdist_carry_what_they_should(built: tuple[Path, Path]) -> None:
    wheel, sdist = built
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        metadata = archive.read(next(n for n in files if n.endswith("/METADATA"))).decode()
    assert "orchestrator/data/demo.yaml" in files               # read at run time
    assert "orchestrator/_proto/modelip/v1/runtime_pb2.py" in files
    assert not [n for n in files if n.startswith(("tests/", "bench/", "plans/", "try/"))]
    assert not [n for n in files if n.endswith((".pyc", ".key", ".sealed", ".dat"))]
    assert "License-Expression: LicenseRef-Proprietary" in metadata
    assert any(n.endswith("/licenses/LICENSE") for n in files)
    assert "Description-Content-Type: text/markdown" in metadata
    assert "make demo" in metadata                              # the README
    with tarfile.open(sdist) as archive:
        members = [m.split("/", 1)[1] for m in archive.getnames() if "/" in m]
    assert "protos/modelip/v1/runtime.proto" in members         # to regenerate the code
    assert {"LICENSE", "README.md", "pyproject.toml"} <= set(members)
    assert not [m for m in members if m.startswith(("tests/", "bench/", "try/", "state/"))]
    assert not [m for m in members if m.endswith((".pyc", ".key", ".sealed", "MEK.dat"))]


def test_installed_from_the_wheel_it_runs_from_an_empty_directory(
        built: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the dependencies come from the test environment (no network needed); the package
    # itself only from the wheel: the checkout's editable install is not on the path
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
               XDG_STATE_HOME=str(tmp_path / "xdg-state"), HOME=str(tmp_path / "home"))

    def modelip(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["modelip", *args], cwd=empty, env=env, capture_output=True,
                                text=True, timeout=300, check=False)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        return result

    where = subprocess.run([str(python), "-c", "import orchestrator; print(orchestrator.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(purelib) and str(ROOT) not in where   # the wheel's, not the clone's
    assert modelip("--version").stdout.strip() == "modelip 0.1.0"
    demo = modelip("demo", "--duration", "3")
    assert "8/8 cards serving" in demo.stdout
    assert (tmp_path / "xdg-state" / "modelip" / "demo" / "journal.sqlite").is_file()
    assert sorted(p.name for p in empty.iterdir()) == []        # nothing left where it ran
    modelip("sample", ".")
    (empty / "plan.yaml").write_text("model: {onnx: model.onnx}\nmek: {generate: true}\n"
                                     "fleet: {emulated: {hosts: 1, devices_per_host: 2}}\n")
    deployed = modelip("deploy", "plan.yaml", "--json")
    assert '"event": "summary"' in deployed.stdout.splitlines()[-1]
    assert (empty / "demo.yaml").read_bytes() == (ROOT / "orchestrator" / "data" /
                                                  "demo.yaml").read_bytes()
