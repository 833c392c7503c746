"""lxm3 needs nothing but the standard library: checked in empty virtual environments."""

import json
import os
import subprocess
import sys
import venv

import pytest

from conftest import ROOT

# What the launch path may import besides the standard library.
OWN_MODULES = {"lxm3", "xm", "__main__", "_virtualenv"}


def make_venv(path, with_pip=False):
    venv.EnvBuilder(with_pip=with_pip, clear=True).create(str(path))
    return os.path.join(str(path), "bin", "python")


def test_import_in_an_empty_venv_loads_only_the_standard_library(tmp_path):
    python = make_venv(tmp_path / "venv")
    code = (
        f"import sys, json; sys.path.insert(0, {ROOT!r})\n"
        "before = set(sys.modules)\n"
        "from lxm3 import xm, xm_cluster\n"
        "import lxm3.xm_cluster\n"
        "assert xm_cluster.PythonPackage and xm.JobRequirements is xm_cluster.JobRequirements\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    proc = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded = {name.split(".")[0] for name in json.loads(proc.stdout)}
    stdlib = set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else None
    if stdlib is None:
        pytest.skip("sys.stdlib_module_names needs Python 3.10+")
    foreign = {m for m in loaded if m not in stdlib and m not in OWN_MODULES and not m.startswith("_")}
    assert not foreign, f"lxm3 imported non-standard modules: {sorted(foreign)}"


def test_pip_install_gives_a_working_lxm3_command(tmp_path):
    python = make_venv(tmp_path / "venv", with_pip=True)
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           ROOT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bindir = os.path.dirname(python)
    proc = subprocess.run([os.path.join(bindir, "lxm3"), "version"], capture_output=True, text=True,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lxm3 ")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert installed <= {"lxm3", "pip", "setuptools", "wheel"}, installed
