"""The cluster's Python and managed environments, on the real test bed over SSH.

A project declaring real packages from the package index (absl-py, pure
Python; numpy, compiled) runs its sweep with them importable in every task,
launched from a workstation Python other than the cluster's (pyenv's 3.12 or
3.13 here; the test bed's is Debian's 3.11): the environment is resolved here
as wheels for the cluster's 3.11, sent once and unpacked there; a second launch
reuses it untouched. The failures stop a launch before anything is submitted:
a package without a wheel for the cluster's Python, an environments directory
that cannot be written or is full, a missing interpreter. An interrupted build
leaves a directory that is never used; two launches at once build once; a
damaged environment is rebuilt; ``lxm3 clean`` removes environments nothing
uses and never one a running job uses.

Every launch is a real ``python -m lxm3 launch`` in a subprocess, as the
client user, through the test bed's sshd (``cluster_helpers``, ssh mode).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest
from cluster_helpers import (
    ClusterWorkspace,
    Launch,
    check_error,
    job_unit,
    workspace_factory,
)

import lxm3

from conftest import ROOT, write_files
from testbed_env import poll, require_testbed

pytestmark = pytest.mark.testbed

PYENV = os.path.expanduser("~/.pyenv/versions")


def other_python(version: str) -> str:
    """A workstation Python other than the cluster's (pyenv's), with pip."""
    found = sorted(glob.glob(os.path.join(PYENV, f"{version}.*", "bin", "python3")))
    if not found:
        pytest.skip(f"no Python {version} here (pyenv) to launch from")
    return found[-1]


# The program every task runs: imports what $IMPORTS names and reports, as
# cluster_helpers' TASK_MAIN does, what it got: versions, files, its Python.
DEP_MAIN = """\
    import importlib, json, os, sys, time
    start = time.time()
    try:
        from importlib.metadata import version
    except ImportError:
        version = None
    report = {"argv": sys.argv[1:], "env": dict(os.environ), "python": list(sys.version_info[:3]), "cwd": os.getcwd(),
              "executable": sys.executable, "sys_path": sys.path, "modules": {}}
    for name in filter(None, os.environ.get("IMPORTS", "").split(",")):
        module, _, dist = name.partition(":")
        imported = importlib.import_module(module)
        report["modules"][module] = {"file": imported.__file__, "version": version(dist or module)}
        print("task %s: %s %s from %s" % (os.environ.get("LXM_TASK_ID"), dist or module,
                                         report["modules"][module]["version"], imported.__file__), flush=True)
    report["start"], report["end"] = start, time.time()
    time.sleep(float(os.environ.get("ECHO_SLEEP") or 0))
    out = os.environ["ECHO_OUT"]
    path = os.path.join(out, "task-%s.json" % os.environ["LXM_TASK_ID"])
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
"""

DEP_PYPROJECT = """\
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "depapp"
    version = "0.1.0"
    dependencies = {dependencies}

    [tool.setuptools]
    packages = ["depapp"]
"""

# Drives one launch from spec.json, like cluster_helpers.LAUNCHER, for a
# PythonPackage of the dependency project; writes result.json.
DEP_LAUNCHER = """\
    import json, os
    from lxm3 import xm, xm_cluster

    HERE = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(HERE, "spec.json")) as f:
        SPEC = json.load(f)

    with xm_cluster.create_experiment(SPEC["title"]) as experiment:
        executor = getattr(xm_cluster, SPEC["executor"])(**SPEC.get("executor_options", {}))
        spec = xm_cluster.PythonPackage(xm_cluster.ModuleName("depapp.main"), path=SPEC["project"],
                                        environment=SPEC.get("environment"))
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(),
                                                   env_vars=SPEC["env"])])
        experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{"task": i} for i in range(SPEC["tasks"])]))

    with open(os.path.join(HERE, "result.json"), "w") as f:
        json.dump({"experiment_id": experiment.experiment_id, "work_units": {
            str(wid): {"arrays": [[a.job_id, a.first_task, a.count] for a in wu.arrays],
                       "job_ids": list(wu.job_ids), "log_directory": wu.log_directory,
                       "job_directory": wu.job_directory, "cluster": wu.cluster,
                       "environment": wu.environment}
            for wid, wu in experiment.work_units.items()}}, f)
"""


@pytest.fixture
def workspaces():
    with workspace_factory() as make:
        yield make


def dep_project(ws: ClusterWorkspace, dependencies, name: str = "depproject") -> str:
    return write_files(os.path.join(ws.root, name), {
        "pyproject.toml": DEP_PYPROJECT.format(dependencies=json.dumps(dependencies)),
        "depapp/__init__.py": "",
        "depapp/main.py": DEP_MAIN,
    })


def launch_deps(ws: ClusterWorkspace, project: str, *, python: str = sys.executable, tasks: int = 2,
                env=None, config=None, environment=None, extra_env=None, wait: bool = True,
                timeout: float = 600):
    """Launch the dependency project with ``python`` (this machine's interpreter of
    choice); returns the Launch, or (Popen, directory) with ``wait=False``."""
    ws._launches += 1
    directory = os.path.join(ws.root, f"deps-launch-{ws._launches}")
    os.mkdir(directory)
    spec = {"title": ws.title, "project": project, "executor": ws.executor_kind, "tasks": tasks,
            "env": env or {}, "environment": environment}
    write_files(directory, {"launcher.py": DEP_LAUNCHER, "spec.json": json.dumps(spec)})
    argv = [python, "-m", "lxm3", "launch", os.path.join(directory, "launcher.py"),
            "--lxm_config", config or ws.write_config(cluster={"environment": "managed"})]
    proc_env = {**os.environ, "PYTHONPATH": ROOT, **(extra_env or {})}
    if not wait:
        out, err = (open(os.path.join(directory, name), "w") for name in ("stdout", "stderr"))
        return subprocess.Popen(argv, env=proc_env, cwd=directory, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err), directory
    started = time.monotonic()
    proc = subprocess.run(argv, env=proc_env, cwd=directory, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return ws.launched(proc.returncode, proc.stdout, proc.stderr, directory, time.monotonic() - started)


def finished(ws: ClusterWorkspace, proc, directory: str, started: float) -> Launch:
    proc.wait(timeout=600)
    texts = [open(os.path.join(directory, name)).read() for name in ("stdout", "stderr")]
    return ws.launched(proc.returncode, texts[0], texts[1], directory, time.monotonic() - started)


def cluster_python_facts(tb) -> dict:
    """What the test bed's python3 says it is: the truth the probe must report."""
    return json.loads(tb.ssh(["python3", "-c", lxm3.PYTHON_INFO_CODE]).stdout)


def environment_dir(launch: Launch) -> str:
    path = launch.unit()["environment"]
    assert path and re.fullmatch(r"[0-9a-f]{64}", os.path.basename(path)), launch.describe()
    return path


def stamp(path: str):
    """Inode and mtime of a directory and of its completion marker."""
    marker = os.path.join(path, lxm3.ENVIRONMENT_MARKER)
    return [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in (path, marker)]


def check_tasks(ws: ClusterWorkspace, launch: Launch, out: str, count: int, env_dir: str, modules) -> dict:
    """Every task imported each module from the environment, with the cluster's Python."""
    reports = ws.wait_for_reports(out, count, launch)
    for task, report in reports.items():
        assert report["python"][:2] == [3, 11], report["python"]
        for module in modules:
            found = report["modules"][module]
            assert found["file"].startswith(env_dir + "/"), (task, module, found)
        # The code (the unpacked archive, where the task runs) first, then the environment.
        assert report["env"]["PYTHONPATH"].split(":")[:2] == [report["cwd"], env_dir], report["env"]["PYTHONPATH"]
        assert report["env"]["LXM_PYTHON"] == "python3"
    return reports


# -- the done-when: a sweep with real dependencies, launched from another Python --


def test_sweep_with_numpy_and_absl_from_python_312_then_reused_from_313(workspaces):
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    project = dep_project(ws, ["absl-py", "numpy"])
    imports = {"IMPORTS": "absl:absl-py,numpy"}
    out = ws.out_dir("first")
    first = launch_deps(ws, project, python=other_python("3.12"), tasks=4, env={**imports, "ECHO_OUT": out}).check()
    env_dir = environment_dir(first)
    short = os.path.basename(env_dir)[:12]
    created = re.search(rf"environment {short} created: ([\d,]+) files, ([\d.]+ [KMG]iB)", first.stderr)
    assert created, first.describe()
    assert env_dir.startswith(ws.staging_path + "/envs/")
    reports = check_tasks(ws, first, out, 4, env_dir, ["absl", "numpy"])
    versions = {report["modules"]["numpy"]["version"] for report in reports.values()}
    assert len(versions) == 1 and f"numpy {versions.pop()}" in first.stderr  # the pins it announced
    # What was said is what is there: files and size of the new environment.
    marker = dict(line.split(" ", 1) for line in open(os.path.join(env_dir, lxm3.ENVIRONMENT_MARKER)).read().splitlines())
    assert f"{int(marker['files']):,}" == created.group(1)
    # The record keeps the cluster's Python, as that Python says it is, and the environment.
    record = lxm3.load_record(first.experiment_id)
    facts, unit = cluster_python_facts(tb), record.unit(1)
    assert {k: unit.python[k] for k in ("version", "executable", "cache_tag", "libc", "machine")} == \
        {k: facts[k] for k in ("version", "executable", "cache_tag", "libc", "machine")}
    assert unit.python["command"] == "python3" and unit.environment == env_dir
    before = stamp(env_dir)

    # A second launch, from 3.13: nothing resolved, nothing sent, nothing rebuilt.
    out = ws.out_dir("second")
    second = launch_deps(ws, project, python=other_python("3.13"), tasks=2,
                         env={**imports, "ECHO_OUT": out}, config=ws.write_config(
                             cluster={"environment": "managed"})).check()
    assert environment_dir(second) == env_dir
    assert f"environment {short} is there" in second.stderr, second.describe()
    assert "resolving" not in second.stderr and " created" not in second.stderr, second.describe()
    assert "environment archive" not in second.stderr, second.describe()  # none was copied
    check_tasks(ws, second, out, 2, env_dir, ["absl", "numpy"])
    assert stamp(env_dir) == before, "the environment was replaced or modified"
    assert not glob.glob(os.path.join(ws.staging_path, "incoming", "*")), "an archive was left or sent"

    # --dry-run shows the cluster's Python as the last launch found it.
    launcher = os.path.join(ws.root, f"deps-launch-{ws._launches}", "launcher.py")
    dry = subprocess.run([sys.executable, "-m", "lxm3", "launch", "--dry-run", launcher, "--lxm_config",
                          ws.write_config(cluster={"environment": "managed"})],
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert f"python3 is CPython {facts['version']} (cpython-311, x86_64, {facts['libc']}) at " \
           f"{facts['executable']}" in dry.stdout, dry.stdout + dry.stderr
    assert f"managed environment {short}" in dry.stdout


def test_sweep_on_grid_engine_from_python_313(workspaces):
    tb = require_testbed("sge")
    ws = workspaces(tb, "sge", "ssh")
    project = dep_project(ws, ["absl-py", "numpy"])
    out = ws.out_dir()
    launch = launch_deps(ws, project, python=other_python("3.13"), tasks=3,
                         env={"IMPORTS": "absl:absl-py,numpy", "ECHO_OUT": out}).check()
    env_dir = environment_dir(launch)
    assert f"environment {os.path.basename(env_dir)[:12]} created" in launch.stderr, launch.describe()
    check_tasks(ws, launch, out, 3, env_dir, ["absl", "numpy"])


# -- the cluster's Python without a managed environment -------------------------------


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_tasks_run_the_configured_python_unless_they_choose(workspaces, scheduler):
    tb = require_testbed(scheduler)
    ws = workspaces(tb, scheduler, "ssh")
    out = ws.out_dir()
    config = ws.write_config(cluster={"python": "/usr/bin/python3.11"})
    launch = ws.launch([job_unit(ws.executor(), env_vars={"ECHO_OUT": out}),
                        job_unit(ws.executor(), env_vars={"ECHO_OUT": ws.out_dir("own"),
                                                          "LXM_PYTHON": "/usr/bin/python3"})],
                       config=config).check()
    [report] = ws.wait_for_reports(out, 1, launch).values()
    assert report["env"]["LXM_PYTHON"] == "/usr/bin/python3.11"
    [own] = ws.wait_for_reports(os.path.join(ws.root, "own"), 1, launch).values()
    assert own["env"]["LXM_PYTHON"] == "/usr/bin/python3"  # the task's own wins
    unit = lxm3.load_record(launch.experiment_id).unit(1)
    assert unit.python["command"] == "/usr/bin/python3.11"
    assert unit.python["version"] == cluster_python_facts(tb)["version"]
    assert unit.environment is None


def test_a_missing_interpreter_is_named_before_anything_is_submitted(workspaces):
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    launch = ws.launch([job_unit(ws.executor())],
                       config=ws.write_config(cluster={"python": "/opt/nowhere/python3.11"}))
    check_error(launch, "/opt/nowhere/python3.11 (config key python of cluster 'testbed-ssh') is not on "
                        "the PATH of localhost", "nothing was submitted")
    ws.assert_nothing_submitted(launch)


# -- failures before anything is submitted ------------------------------------------


def test_a_dependency_without_a_wheel_for_the_clusters_python(workspaces, tmp_path):
    """A package with only a source distribution, found by pip in a local directory."""
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    links = tmp_path / "links"
    sdist = write_files(tmp_path / "lxm3_sdist_only-1.0", {
        "setup.py": "from setuptools import setup\nsetup(name='lxm3-sdist-only', version='1.0')\n"})
    links.mkdir()
    with tarfile.open(str(links / "lxm3_sdist_only-1.0.tar.gz"), "w:gz") as tar:
        tar.add(sdist, arcname="lxm3_sdist_only-1.0")
    project = dep_project(ws, ["absl-py", "lxm3-sdist-only"])
    launch = launch_deps(ws, project, env={"ECHO_OUT": ws.out_dir()}, extra_env={"PIP_FIND_LINKS": str(links)})
    check_error(launch, "no wheel of lxm3-sdist-only for the cluster's CPython 3.11 (cp311)",
                "cp311-cp311-manylinux_2_36_x86_64", "pin a version", "pure-Python alternative",
                "container")
    ws.assert_nothing_submitted(launch)


def test_an_environments_directory_that_cannot_be_written(workspaces):
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    tb.ssh(["mkdir", "-p", "--", ws.staging])
    envs = os.path.join(ws.staging_path, "envs")
    os.mkdir(envs, 0o755)  # root's: the test user can neither write nor chmod it
    launch = launch_deps(ws, dep_project(ws, ["absl-py"]), env={"ECHO_OUT": ws.out_dir()})
    check_error(launch, f"cannot use {ws.staging}/envs on localhost", "for managed environments",
                "Permission denied", "environments = ", "nothing was submitted")
    ws.assert_nothing_submitted(launch)


def test_a_full_file_system_is_named(workspaces):
    """The environments directory on a file system with no room (a 64 KiB tmpfs)."""
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    mount = os.path.join(ws.root, "small")
    os.mkdir(mount)
    uid, gid = (int(v) for v in tb.ssh("id -u; id -g").stdout.split())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,uid={uid},gid={gid},mode=0700", "tmpfs",
                       mount], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill")
    try:
        config = ws.write_config(cluster={"environment": "managed", "environments": mount})
        launch = launch_deps(ws, dep_project(ws, ["absl-py"]), env={"ECHO_OUT": ws.out_dir()}, config=config)
        check_error(launch, "cannot create the managed environment", f"no space is left in {mount}",
                    "environments = ", "nothing was submitted")
        ws.assert_nothing_submitted(launch)
        assert [n for n in os.listdir(mount) if not n.startswith(".")] == [], "a half-built environment is left"
    finally:
        subprocess.run(["umount", mount], check=False)


# -- half-built, damaged, and built twice at once ----------------------------------


def test_an_interrupted_build_is_never_used_and_a_damaged_environment_is_rebuilt(workspaces):
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    project = dep_project(ws, ["absl-py"])
    env = {"IMPORTS": "absl:absl-py"}
    first = launch_deps(ws, project, tasks=1, env={**env, "ECHO_OUT": ws.out_dir("first")}).check()
    env_dir = environment_dir(first)
    ws.wait_for_reports(os.path.join(ws.root, "first"), 1, first)
    # What an interrupted build leaves: the files under a temporary name, no marker
    # (a stand-in made by renaming, since a build cannot be stopped on cue).
    ws.tb.ssh(["bash", "-c", f"mv {env_dir} {env_dir}.tmp-interrupted && rm {env_dir}.tmp-interrupted/"
                             f"{lxm3.ENVIRONMENT_MARKER}"])
    out = ws.out_dir("after-interrupt")
    again = launch_deps(ws, project, tasks=1, env={**env, "ECHO_OUT": out}).check()
    assert environment_dir(again) == env_dir
    assert f"environment {os.path.basename(env_dir)[:12]} created" in again.stderr, again.describe()
    assert not os.path.exists(env_dir + ".tmp-interrupted"), "the leftover of the interrupted build stays"
    check_tasks(ws, again, out, 1, env_dir, ["absl"])
    # A file gone from a complete environment (a scratch purge): rebuilt, not used.
    victim = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(env_dir, "absl")) for f in fs
                  if f.endswith(".py"))
    os.unlink(victim)
    out = ws.out_dir("after-damage")
    third = launch_deps(ws, project, tasks=1, env={**env, "ECHO_OUT": out}).check()
    assert "was incomplete" in third.stderr and "rebuilt it" in third.stderr, third.describe()
    assert os.path.exists(victim)
    check_tasks(ws, third, out, 1, env_dir, ["absl"])


def test_two_launches_at_once_build_the_environment_once(workspaces):
    """Both launches reach the build while a third party holds the environment's
    lock; released, one builds it and the other waits, then uses it."""
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    project = dep_project(ws, ["absl-py"])
    # The key, resolved here as the launches will find it in the cache.
    requirements = lxm3.declared_requirements(lxm3.PythonPackage(lxm3.ModuleName("depapp.main"), path=project))
    key = lxm3.resolve_environment(requirements, lxm3.PythonTarget(cluster_python_facts(tb), "test bed"), "t").key
    envs = f"{ws.staging_path}/envs"
    release = f"{ws.staging_path}/release"
    tb.ssh(["mkdir", "-p", envs])
    holder = subprocess.Popen(tb.ssh_argv(f"flock {envs}/.{key}.lock -c 'echo held; while [ ! -e {release} ]; "
                                          "do sleep 0.2; done'"), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        runs = [launch_deps(ws, project, tasks=1, wait=False, env={"IMPORTS": "absl:absl-py",
                                                                  "ECHO_OUT": ws.out_dir(f"out{i}")})
                for i in range(2)]
        # Both have sent their files and gone on to build: they now wait for the lock.
        poll(lambda: all("copied" in open(os.path.join(d, "stderr")).read() for _, d in runs) or None,
             timeout=300, what="both launches to reach the build")
        time.sleep(1)
    finally:
        tb.ssh(["touch", release])
        holder.wait(timeout=60)
    launches = [finished(ws, proc, directory, started).check() for proc, directory in runs]
    said = [("created" in launch.stderr, "made meanwhile by another launch" in launch.stderr) for launch in launches]
    assert sorted(said) == [(False, True), (True, False)], [launch.stderr for launch in launches]
    env_dir = f"{envs}/{key}"
    assert [n for n in os.listdir(envs) if not n.startswith(".")] == [key]
    for i, launch in enumerate(launches):
        assert environment_dir(launch) == env_dir
        check_tasks(ws, launch, os.path.join(ws.root, f"out{i}"), 1, env_dir, ["absl"])


# -- lxm3 clean --type env -------------------------------------------------------------


def clean(ws: ClusterWorkspace, config: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lxm3", "clean", "--type", "env", "--lxm_config", config,
                             *args], env={**os.environ, "PYTHONPATH": ROOT}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_clean_removes_environments_nothing_uses_and_keeps_those_jobs_use(workspaces):
    tb = require_testbed("slurm")
    ws = workspaces(tb, "slurm", "ssh")
    config = ws.write_config(cluster={"environment": "managed"})
    out = ws.out_dir()
    launch = launch_deps(ws, dep_project(ws, ["absl-py"]), tasks=1, config=config,
                         env={"IMPORTS": "absl:absl-py", "ECHO_OUT": out, "ECHO_SLEEP": "25"}).check()
    env_dir = environment_dir(launch)
    envs = os.path.dirname(env_dir)
    # An environment no experiment references and no launch used for 40 days, and
    # the leftover of a build that was interrupted.
    old = "0" * 64
    tb.ssh(["bash", "-c", f"cd {envs} && mkdir -p {old}/pkg {old}.tmp-123 && echo x > {old}/pkg/a.py && "
                          f"printf 'key {old}\\nfiles 1\\nchecked_files 1\\nbytes 2\\n' > {old}/{lxm3.ENVIRONMENT_MARKER}"
                          f" && touch -d '40 days ago' .{old}.used {old}"])
    listed = clean(ws, config, "--days", "0", "--dry-run").stdout
    assert re.search(rf"remove\s+env\s+{envs}/{old}\s+1 files\s+2 B\s+no recent experiment uses it", listed), listed
    assert re.search(rf"remove\s+env\s+{envs}/{old}\.tmp-123 .*left by an interrupted build", listed), listed
    assert re.search(rf"keep\s+env\s+{env_dir}\s.*jobs of experiment {launch.experiment_id} may be using it", listed), listed
    assert os.path.isdir(f"{envs}/{old}")  # a dry run removes nothing
    removed = clean(ws, config, "--days", "0", "--force").stdout
    assert not os.path.exists(f"{envs}/{old}") and not os.path.exists(f"{envs}/{old}.tmp-123"), removed
    assert os.path.isdir(env_dir), "the environment of a running job was removed"
    # Once its job has ended: kept while its experiment is recent, removed with --days 0.
    ws.wait_for_reports(out, 1, launch)
    poll(lambda: None if ws.active_jobs(launch.job_ids()) else True, timeout=120, what="the job to end")
    assert "experiment" in clean(ws, config, "--days", "30", "--force").stdout and os.path.isdir(env_dir)
    # Its experiment's directory names it: it goes with that directory (older than an hour).
    assert f"experiment {launch.experiment_id} uses it" in clean(ws, config, "--days", "0", "--force").stdout
    experiment_dir = os.path.dirname(launch.unit()["job_directory"])
    tb.ssh(["find", experiment_dir, "-exec", "touch", "-h", "-d", "2 hours ago", "{}", "+"])
    clean(ws, config, "--days", "0", "--force", "--type", "job,env")
    assert not os.path.exists(env_dir) and not os.path.exists(experiment_dir)
