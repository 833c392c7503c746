"""What lxm3 writes on this machine is the user's alone, whatever the umask.

Records and tasks files hold task environments (API keys, tokens), logs hold
the programs' output: files are 0600 (job.sh 0700), directories 0700, from the
moment they are created. Directories lxm3 did not create keep their modes.
"""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

import lxm3
from lxm3 import xm

from conftest import ROOT

LAUNCHER = """\
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment(experiment_title="private") as experiment:
        executor = xm_cluster.Local()
        spec = xm_cluster.PythonPackage(path={project!r},
                                        entrypoint=xm_cluster.ModuleName("echoapp.main"))
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{{"seed": s}} for s in range(2)],
                                           env_vars=[{{"API_KEY": "secret"}}]))
"""


@pytest.fixture
def umask():
    """Set the process umask for the test; restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes_under(root):
    """{path: permission bits} of root and everything under it (links not followed)."""
    found = {root: stat.S_IMODE(os.lstat(root).st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[path] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_a_local_launch_writes_private_files(echo_project, tmp_path, mask):
    base = tmp_path / "home"
    base.mkdir(mode=0o755)
    os.chmod(str(base), 0o755)
    # XDG_STATE_HOME exists (the user's, left alone); the cache and data homes do not:
    # lxm3 creates them, and so makes them private.
    state_home = base / "state"
    state_home.mkdir()
    os.chmod(str(state_home), 0o755)
    env = {"XDG_STATE_HOME": str(state_home), "XDG_CACHE_HOME": str(base / "cache"),
           "XDG_DATA_HOME": str(base / "share"), "PYTHONPATH": ROOT}
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER.format(project=echo_project)))
    proc = subprocess.run(
        [sys.executable, "-c", f"import os, sys; os.umask({mask}); import lxm3; "
         "sys.exit(lxm3.main(sys.argv[1:]))", "launch", str(launcher)],
        cwd=str(tmp_path), env={**os.environ, **env}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr

    assert stat.S_IMODE(os.stat(str(state_home)).st_mode) == 0o755  # not lxm3's to change
    written = {}
    for root in (state_home / "lxm3", base / "cache", base / "share"):
        written.update(modes_under(str(root)))
    build_envs = str(base / "cache" / "lxm3" / "build-env") + os.sep
    kinds = {"record": 0, "tasks": 0, "job.sh": 0, "log": 0, "archive": 0, "cache key": 0}
    for path, mode in written.items():
        if path.startswith(build_envs) and path.count(os.sep) > build_envs.count(os.sep):
            continue  # pip's files inside a private build environment
        if os.path.isdir(path):
            assert mode == 0o700, f"{path} is {mode:o}"
            continue
        name = os.path.basename(path)
        kind = ("record" if f"{os.sep}experiments{os.sep}" in path and name.endswith(".json")
                else "tasks" if name == "tasks" else "job.sh" if name == "job.sh"
                else "log" if name.endswith(".log") else "archive" if name.endswith(".zip")
                else "cache key" if name.endswith(".json")
                else "project lock" if name.endswith(".lock") else name)
        kinds[kind] = kinds.get(kind, 0) + 1
        expected = 0o700 if name == "job.sh" else 0o600
        assert mode == expected, f"{path} is {mode:o}, not {expected:o}"
    assert kinds == {"record": 1, "tasks": 1, "job.sh": 1, "log": 2, "archive": 1,
                     "cache key": 1, "project lock": 1, lxm3.LOG_WRITER_LOCK: 1}, kinds


def test_a_record_is_never_readable_by_others_even_while_it_is_written(tmp_path, monkeypatch,
                                                                      umask):
    """The temporary file is created 0600, before any content is in it."""
    path = str(tmp_path / "new" / "record.json")
    seen = []
    real_open = os.open

    def watching_open(file, flags, mode=0o777, *args, **kwargs):
        fd = real_open(file, flags, mode, *args, **kwargs)
        if str(file).startswith(path):
            seen.append((os.fstat(fd).st_size, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", watching_open)
    lxm3._write_json_atomic(path, {"env": {"API_KEY": "secret"}})
    assert seen == [(0, 0o600)]  # empty and already private when opened
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert os.listdir(os.path.dirname(path)) == ["record.json"]


def test_existing_directories_keep_their_modes(tmp_path, umask):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o755)
    lxm3.make_private_dirs(str(shared / "a" / "b"))
    assert stat.S_IMODE(os.stat(str(shared)).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(str(shared / "a")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(shared / "a" / "b")).st_mode) == 0o700


def test_an_unusual_umask_still_gives_the_owner_access(tmp_path, umask):
    umask(0o277)  # would leave 0400 files and 0500 directories
    lxm3.make_private_dirs(str(tmp_path / "d"))
    lxm3.write_job_files(str(tmp_path / "d" / "job"), "#!/bin/bash\n",
                         [lxm3.Task(["a"], {"K": "v"})], {})
    assert stat.S_IMODE(os.stat(str(tmp_path / "d")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(tmp_path / "d" / "job" / "job.sh")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(str(tmp_path / "d" / "job" / "tasks")).st_mode) == 0o600


def test_the_archive_in_the_cache_is_private(echo_project, umask):
    archive = lxm3.build_archive(lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"),
                                                    path=echo_project), use_cache=False)
    assert stat.S_IMODE(os.stat(archive.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(archive.path)).st_mode) == 0o700
