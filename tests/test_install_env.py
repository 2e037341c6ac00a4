"""Installing questa-nemo into an environment that already has torch and megatron-core never replaces them.

A NeMo container ships torch, megatron-core and Transformer Engine at versions NVIDIA chose, in the system
site-packages. The slow test rebuilds that situation: a fresh venv layered over this test venv's
site-packages (torch 2.13.0 CPU and megatron-core 0.16.1 already there, like a container's dist-packages
under --system-site-packages), then a plain `pip install <repo>`. pip cannot uninstall from the layer below, so
an upgrade or downgrade would show up as a second copy in the new venv; the test checks there is none and that
the versions are unchanged.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
KEPT = ("torch", "megatron-core")

# Versions NVIDIA containers ship (from their release notes): pip accepts an installed pre-release or local
# version when the specifier contains it with prereleases=True, which is how its resolver checks them.
CONTAINER_VERSIONS = [
    ("NGC PyTorch 25.12 (base of NeMo 26.x)", "torch", "2.10.0a0+b4e4ee81d3"),
    ("NeMo 25.09 (Megatron-Bridge lock)", "megatron-core", "0.14.0rc3"),
    ("tested here", "torch", "2.13.0+cpu"),
    ("tested here", "megatron-core", "0.16.1"),
]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


@pytest.mark.parametrize("container, package, version", CONTAINER_VERSIONS)
def test_pins_admit_what_containers_ship(container, package, version):
    requirement = _requirements()[package]
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement} rejects {container}"


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    """This venv's pip acting on another interpreter's environment (pip --python, pip >= 22.3)."""
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pip_install_keeps_the_preinstalled_torch_and_megatron_core(tmp_path):
    before = {name: importlib.metadata.version(name) for name in KEPT}
    base_site = sysconfig.get_paths()["purelib"]
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "_preinstalled.pth").write_text(base_site + "\n")

    # What pip would do, before it does anything: neither kept package may be in the install list.
    report = tmp_path / "report.json"
    plan = _pip(python, "install", "--dry-run", "--quiet", "--report", str(report), str(REPO))
    assert plan.returncode == 0, plan.stderr
    planned = {
        item["metadata"]["name"]: item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert not set(planned) & set(KEPT), f"pip would replace {planned}"

    done = _pip(python, "install", "--quiet", str(REPO))
    assert done.returncode == 0, done.stderr
    probe = (
        "import importlib.metadata as m, json, torch, megatron.core, questa_nemo; "
        f"print(json.dumps({{'versions': {{n: m.version(n) for n in {KEPT!r}}}, 'torch': torch.__file__, "
        "'questa': questa_nemo.__file__}))"
    )
    # Run outside the checkout, so that `import questa_nemo` finds the installed copy.
    after = json.loads(
        subprocess.check_output([python, "-W", "ignore", "-c", probe], text=True, cwd=tmp_path)
    )
    assert after["versions"] == before
    assert after["torch"].startswith(base_site), "torch was reinstalled into the new environment"
    assert after["questa"].startswith(str(site)), "questa-nemo was not installed into the new environment"
    assert not list(site.glob("torch-*.dist-info")) and not list(site.glob("megatron_core-*.dist-info"))
    cli = subprocess.run([env / "bin" / "questa-nemo", "--help"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "doctor" in cli.stdout
