"""Shared fixtures: every test runs with private XDG directories and a scratch project."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One cache for the session, so the pip build environment is made once."""
    return str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(autouse=True)
def xdg_dirs(tmp_path, monkeypatch, session_cache):
    """Keep lxm3's config, data and state out of the real home directory."""
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("XDG_CACHE_HOME", session_cache)
    for name in ("LXM_CONFIG", "LXM_CLUSTER", "LXM_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch):
    """A private XDG_RUNTIME_DIR, so each test starts without kept SSH connections;
    the connections a test kept are ended after it. Short: sockets live there."""
    path = tempfile.mkdtemp(prefix="lxm3rt-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield path
    for socket in glob.glob(os.path.join(path, "lxm3", "ssh-*")):
        subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "kept"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(path, ignore_errors=True)


def write_files(root, files):
    """Write ``{relative path: text}`` under root (text is dedented)."""
    for rel, text in files.items():
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
    return str(root)


PYPROJECT = """\
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{name}"
    version = "0.1.0"

    [tool.setuptools]
    packages = ["{name}"]
"""

# A program that reports exactly what it received, for byte-for-byte checks.
ECHO_MAIN = """\
    import json, os, sys
    report = {
        "argv": sys.argv[1:],
        "env": {k: v for k, v in os.environ.items()},
        "cwd": os.getcwd(),
    }
    out = os.environ.get("ECHO_OUT")
    if out:
        path = os.path.join(out, "task-%s.json" % os.environ.get("LXM_TASK_ID"))
        with open(path, "w") as f:
            json.dump(report, f)
    print("echo argv=%s" % json.dumps(sys.argv[1:]))
    sys.exit(int(os.environ.get("ECHO_EXIT", "0")))
"""


@pytest.fixture
def echo_project(tmp_path):
    """A Python project whose module ``echoapp.main`` reports its argv and env."""
    return write_files(tmp_path / "echo_project", {
        "pyproject.toml": PYPROJECT.format(name="echoapp"),
        "echoapp/__init__.py": "",
        "echoapp/main.py": ECHO_MAIN,
    })
