"""The xm_cluster classes as users call them: lxm3 0.4.2's positional order,
value semantics, and what `import lxm3` costs."""

import inspect
import os
import re
import subprocess
import sys

import pytest

import lxm3
from lxm3 import xm, xm_cluster

from conftest import ROOT

# lxm3 0.4.2's signatures (its executors were attrs classes, called positionally
# in its own examples); ours may only add parameters after these.
SIGNATURES_042 = {
    "Local": ["requirements", "singularity_options", "docker_options"],
    "Slurm": ["requirements", "resources", "walltime", "singularity_options", "docker_options",
              "log_directory", "modules", "exclusive", "partition", "extra_directives",
              "skip_directives"],
    "GridEngine": ["requirements", "resources", "parallel_environments", "walltime", "queue",
                   "reserved", "log_directory", "merge_output", "shell", "project", "account",
                   "modules", "max_parallel_tasks", "extra_directives", "skip_directives",
                   "singularity_options", "docker_options"],
    "SingularityOptions": ["bind", "extra_options"],
    "DockerOptions": ["volumes", "extra_options"],
    "PythonPackage": ["entrypoint", "path", "resources", "extra_packages", "pip_args"],
    "UniversalPackage": ["entrypoint", "build_script", "build_args", "path"],
    "SingularityContainer": ["entrypoint", "image_path"],
    "DockerContainer": ["entrypoint", "image"],
    "ArrayJob": ["executable", "executor", "name", "args", "env_vars"],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES_042))
def test_positional_order_is_lxm3_042s(name):
    params = list(inspect.signature(getattr(xm_cluster, name)).parameters)
    expected = SIGNATURES_042[name]
    assert params[: len(expected)] == expected


def test_executors_called_positionally_as_in_042():
    requirements = xm.JobRequirements(cpu=2)
    slurm = xm_cluster.Slurm(requirements, {"gres": "gpu:1"}, 3600, None, None, "/logs",
                             ["cuda"], True, "gpu")
    assert (slurm.requirements, slurm.resources, slurm.walltime, slurm.log_directory,
            slurm.modules, slurm.exclusive, slurm.partition) == (
        requirements, {"gres": "gpu:1"}, 3600, "/logs", ["cuda"], True, "gpu")
    sge = xm_cluster.GridEngine(requirements, {}, {"smp": 2}, 60, "all.q")
    assert (sge.parallel_environments, sge.walltime, sge.queue) == ({"smp": 2}, 60, "all.q")
    assert xm_cluster.Local(requirements).requirements is requirements


def test_defaults_are_fresh_per_instance():
    a, b = xm_cluster.Slurm(), xm_cluster.Slurm()
    a.modules.append("cuda")
    a.resources["gres"] = "gpu:1"
    assert b.modules == [] and b.resources == {}
    assert xm_cluster.Slurm().requirements is not xm_cluster.Slurm().requirements


def test_value_semantics():
    # xm.JobRequirements compares by identity, as upstream's does.
    r = xm.JobRequirements()
    assert xm_cluster.Slurm(r, partition="gpu") == xm_cluster.Slurm(r, partition="gpu")
    assert xm_cluster.Slurm(r, partition="gpu") != xm_cluster.Slurm(r, partition="cpu")
    assert xm_cluster.Slurm(r) != xm_cluster.GridEngine(r)
    assert repr(xm_cluster.SingularityOptions(bind={"/a": "/b"})) == (
        "SingularityOptions(bind={'/a': '/b'}, extra_options=[], runtime=None, nv=None)")
    text = repr(xm_cluster.Slurm(partition="gpu", max_parallel_tasks=4))
    assert text.startswith("Slurm(requirements=") and "partition='gpu'" in text
    assert "max_parallel_tasks=4" in text
    with pytest.raises(TypeError, match="unhashable type: 'Local'"):
        hash(xm_cluster.Local())  # mutable, so unhashable
    config = xm_cluster.Config(clusters=[lxm3.ClusterConfig("c", raw={"big": "x" * 1000})])
    assert "raw" not in repr(config)  # the raw TOML is kept but not shown


def test_mistakes_are_caught_where_the_executor_is_written():
    with pytest.raises(ValueError, match=re.escape("Slurm(max_parallel_tasks=...) must be at least 1")):
        xm_cluster.Slurm(max_parallel_tasks=0)
    with pytest.raises(TypeError, match=re.escape("GridEngine(modules=...) must be a list of strings")):
        xm_cluster.GridEngine(modules="cuda")
    with pytest.raises(ValueError, match=re.escape(
            "walltime 'tomorrow' is not like '30', '2:00:00' or '1-00:00:00'")):
        xm_cluster.Slurm(walltime="tomorrow")


def test_import_lxm3_loads_nothing_heavy():
    """`lxm3 status` and launchers start fast: what slow modules cost is paid only
    by the commands that use them (asyncio, for one, when an experiment starts)."""
    heavy = ["asyncio", "typing", "dataclasses", "inspect", "json", "hashlib", "subprocess",
             "argparse", "datetime", "zipfile", "tempfile", "shutil", "logging"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from lxm3 import xm, xm_cluster; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    # -S: without site-packages' .pth files, which may import modules themselves.
    output = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "[]"


# --- where kept SSH connections live -----------------------------------------------


def test_kept_connections_live_in_a_private_runtime_directory(runtime_dir):
    path = lxm3._kept_connections_dir()
    assert path == os.path.join(runtime_dir, "lxm3")
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_kept_connections_refuse_a_directory_others_can_enter(runtime_dir):
    os.makedirs(os.path.join(runtime_dir, "lxm3"), mode=0o755)
    os.chmod(os.path.join(runtime_dir, "lxm3"), 0o755)
    assert lxm3._kept_connections_dir() is None  # so each command uses a private socket


def test_kept_connections_refuse_a_symlink(runtime_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, os.path.join(runtime_dir, "lxm3"))
    assert lxm3._kept_connections_dir() is None


def test_kept_connections_need_a_short_path(monkeypatch, tmp_path):
    long_dir = tmp_path / ("x" * 80)
    long_dir.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long_dir))
    assert lxm3._kept_connections_dir() is None  # a socket path is limited to ~100 bytes


def test_without_xdg_runtime_dir_a_per_user_directory_in_tmp(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert lxm3._kept_connections_dir() == f"/tmp/lxm3-{os.getuid()}"


def test_lxm3_ssh_keep_sets_how_long_a_connection_is_kept(monkeypatch):
    monkeypatch.delenv("LXM3_SSH_KEEP", raising=False)
    assert lxm3.ssh_keep_seconds() == 300
    monkeypatch.setenv("LXM3_SSH_KEEP", "0")
    assert lxm3.ssh_keep_seconds() == 0
    monkeypatch.setenv("LXM3_SSH_KEEP", "5m")
    with pytest.raises(lxm3.LaunchError, match="LXM3_SSH_KEEP='5m' is not a number of seconds"):
        lxm3.ssh_keep_seconds()


def test_a_missing_xdg_runtime_dir_is_not_created(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run" / "user" / "1000"))
    assert lxm3._kept_connections_dir() == f"/tmp/lxm3-{os.getuid()}"
    assert not (tmp_path / "run").exists()
