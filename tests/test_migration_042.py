"""Migration: lxm3 0.4.2's own launchers, run unchanged with this lxm3.

lxm3 0.4.2's sdist is downloaded from PyPI at test time (``pip download
lxm3==0.4.2 --no-deps --no-binary lxm3``) into a temporary directory; nothing
of it is committed. When the download fails, these tests fail under
``LXM3_REQUIRE_TESTBED=1`` (CI) and are skipped otherwise, with pip's reason.

The launchers in the sdist, and where each runs (``python -m lxm3 launch`` of
this checkout, in a subprocess):

- ``tests/integration/basic/launcher.py`` ("basic"), with its project
  (``py_package``) and ``lxm.toml``, run as the sdist's ``run_tests.sh`` runs it
  (from a ``tmp`` directory beside it, ``--lxm_config`` its ``lxm.toml``): plain,
  with ``--docker_image`` and with ``--singularity_image``. It hard-codes
  ``Local``, so it runs on this machine only; its containers run in the
  stand-in runtimes of tests/fakes/container_runtime.py (no Docker or
  Singularity can be installed here).
- The README's launcher blocks: the ```` ```python ```` blocks that call
  ``create_experiment(`` (``README_LAUNCHERS`` names each one;
  ``test_every_launcher_of_the_sdist_is_run`` fails on one it does not know).
  They are fragments of a launcher file, completed by two explicit rules and
  nothing else: a block that imports nothing gets the import lines of the
  README block that does (``from lxm3 import xm``, ``from lxm3 import
  xm_cluster``); a placeholder line ``NAME = ...`` is filled
  (``fill_placeholders``: the executor under test, and the package the first
  block builds). "hello" hard-codes ``Slurm()`` and offers ``GridEngine()`` and
  ``Local()`` as commented-out alternatives: each is run by making its line the
  active one. "sweep" runs with each executor as its placeholder.
  Both build ``my_package.main`` from ``path="."``, which the sdist lacks: the
  test writes the smallest project that matches (``my_package``, whose
  ``main`` writes its argv and environment, cluster_helpers.TASK_MAIN) and puts
  the launcher beside it, as the README says.

Cluster runs go to the test bed in ``ssh`` mode (tests/cluster_helpers.py),
with a config whose only cluster is the test bed. Every run checks that each
task got the arguments the launcher asked for: the expectation is computed
from the launcher's own sweep (its ``args=``, read from its source).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from typing import Any, Dict, List, Optional

import pytest
from cluster_helpers import TASK_MAIN, Launch, read_reports, toml_string

from conftest import PYPROJECT, ROOT, lxm3_cli, write_files
from testbed_env import REQUIRE_VAR, require_testbed

FAKE_RUNTIME = os.path.join(ROOT, "tests", "fakes", "container_runtime.py")
LAUNCH_TIMEOUT = 600  # seconds: a first build fetches the build backend from PyPI
WAIT_TIMEOUT = 300

# The README's launcher blocks, by a text each one (and no other) contains.
README_LAUNCHERS = {
    "hello": 'experiment_title="hello world"',
    "sweep": "xm_cluster.ArrayJob(",
}
# Every file of the sdist that is a launcher: outside the lxm3 package, not a
# unit test (*_test.py, which call create_experiment under mocks), and calling
# create_experiment.
SDIST_LAUNCHERS = ["tests/integration/basic/launcher.py"]
# The basic launcher's runs, as its run_tests.sh makes them (plus the plain one):
# variant -> (launcher flags, the stand-in runtime that must run the task).
BASIC_VARIANTS = {
    "plain": ([], None),
    "docker": (["--docker_image=python:3.10-slim"], "docker"),
    "singularity": (["--singularity_image=docker://python:3.10-slim"], "apptainer"),
}
EXECUTORS = {"local": "Local", "slurm": "Slurm", "sge": "GridEngine"}


# --- lxm3 0.4.2's sdist ------------------------------------------------------


@pytest.fixture(scope="session")
def sdist_042(tmp_path_factory) -> str:
    """The unpacked sdist of lxm3 0.4.2, fresh from PyPI: its root directory."""
    root = tmp_path_factory.mktemp("lxm3-042-sdist")
    # "--no-binary lxm3", not ":all:": older pips (23.0) pass ":all:" on to the
    # install of the build backend, and build it and its dependencies from
    # source (7 minutes here, instead of seconds).
    argv = [sys.executable, "-m", "pip", "download", "lxm3==0.4.2", "--no-deps",
            "--no-binary", "lxm3", "--disable-pip-version-check", "-d", str(root)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        failure = (None if proc.returncode == 0 else
                   f"pip exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = str(e)
    archive = os.path.join(str(root), "lxm3-0.4.2.tar.gz")
    if failure is None and not os.path.exists(archive):
        failure = f"pip saved no lxm3-0.4.2.tar.gz (got {os.listdir(str(root))})"
    if failure is not None:
        reason = f"cannot download lxm3 0.4.2's sdist ({' '.join(argv[1:])}): {failure}"
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(str(root), filter="data")
        else:  # Pythons before the extraction filters (3.9.0-3.9.16, ...)
            tar.extractall(str(root))
    return os.path.join(str(root), "lxm3-0.4.2")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def python_blocks(markdown: str) -> List[str]:
    """The text of every ```python fenced block."""
    return [textwrap.dedent(m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", markdown, re.M | re.S)]


def readme_launchers(sdist: str) -> Dict[str, str]:
    """{name: block} of the README blocks that are launchers (call create_experiment)."""
    found: Dict[str, str] = {}
    for block in python_blocks(read(os.path.join(sdist, "README.md"))):
        if "create_experiment(" not in block:
            continue
        names = [name for name, marker in README_LAUNCHERS.items() if marker in block]
        assert len(names) == 1, f"a README launcher block not in README_LAUNCHERS:\n{block}"
        assert names[0] not in found, f"two README blocks match {names[0]!r}"
        found[names[0]] = block
    return found


def complete_block(block: str, readme: Dict[str, str]) -> str:
    """A README block as a launcher file: the README's own import lines when it has none."""
    if re.search(r"^\s*(from|import) ", block, re.M):
        return block
    imports = [line for other in readme.values()
               for line in other.splitlines() if re.match(r"(from|import) ", line)]
    assert imports, "no README launcher block has import lines to take"
    return "\n".join(dict.fromkeys(imports)) + "\n\n" + block


def fill_placeholders(block: str, executor_kind: str) -> str:
    """Fill the lines ``NAME = ...`` the README leaves to the reader: ``executor``
    with the executor under test, ``executable`` with the package the "hello"
    block builds (``my_package.main`` from ``path="."``)."""
    fills = {
        "executor": f"xm_cluster.{executor_kind}()",
        "executable": (
            "experiment.package([xm.Packageable(xm_cluster.PythonPackage(path='.', "
            "entrypoint=xm_cluster.ModuleName('my_package.main')), "
            f"executor_spec=xm_cluster.{executor_kind}.Spec())])[0]"),
    }
    lines = []
    for line in block.splitlines():
        m = re.fullmatch(r"(\s*)(\w+) = \.\.\.\s*", line)
        if m:
            assert m.group(2) in fills, f"no fill for the placeholder {line.strip()!r}"
            line = f"{m.group(1)}{m.group(2)} = {fills[m.group(2)]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def choose_executor(block: str, executor_kind: str) -> str:
    """Make the block's line ``executor = xm_cluster.KIND()`` the active one and
    comment out its alternatives, as the block's comments tell the reader to."""
    pattern = re.compile(r"(\s*)(?:# )?executor = xm_cluster\.(\w+)\(\)\s*")
    lines, found = [], False
    for line in block.splitlines():
        m = pattern.fullmatch(line)
        if m:
            found = found or m.group(2) == executor_kind
            active = m.group(2) == executor_kind
            line = f"{m.group(1)}{'' if active else '# '}executor = xm_cluster.{m.group(2)}()"
        lines.append(line)
    assert found, f"the block offers no executor = xm_cluster.{executor_kind}()"
    return "\n".join(lines) + "\n"


# --- what a launcher asked for ------------------------------------------------


def launcher_sweep(source: str) -> List[Any]:
    """The args of each task the launcher adds, read from its source: the
    ``args=`` of its one ``Job``/``ArrayJob`` call (a name is looked up among
    the launcher's assignments), evaluated. A Job is one task."""
    tree = ast.parse(source)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr in ("Job", "ArrayJob")]
    assert len(calls) == 1, f"expected one Job/ArrayJob call, found {len(calls)}"
    [call] = calls
    args = next((k.value for k in call.keywords if k.arg == "args"), None)
    if isinstance(args, ast.Name):
        [args] = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and [getattr(t, "id", None) for t in node.targets] == [args.id]]
    value = None if args is None else eval(  # the pinned sdist's own expression
        compile(ast.Expression(args), "<launcher args>", "eval"), {"__builtins__": {"range": range}})
    return list(value) if call.func.attr == "ArrayJob" else [value]


def absl_argv(args: Any) -> List[str]:
    """Arguments as the program receives them: dict items absl-style, list items as text."""
    if args is None:
        return []
    if isinstance(args, dict):
        return [f"--{k}" if v is True else f"--no{k}" if v is False else f"--{k}={v}"
                for k, v in args.items()]
    return [str(a) for a in args]


# --- running lxm3 launch --------------------------------------------------------


def lxm3_launch(launcher: str, *args: str, cwd: str,
                env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python -m lxm3 launch LAUNCHER ARGS`` of this checkout."""
    return lxm3_cli("launch", launcher, *args, cwd=cwd, env=env, timeout=LAUNCH_TIMEOUT)


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"lxm3 exited {proc.returncode}\n--- stderr ---\n{proc.stderr}"
            f"\n--- stdout ---\n{proc.stdout}")


def the_record(proc: subprocess.CompletedProcess) -> dict:
    """The one record this test's launches wrote (each test has its own XDG_STATE_HOME)."""
    paths = glob.glob(os.path.join(os.environ["XDG_STATE_HOME"], "lxm3", "experiments", "*.json"))
    assert len(paths) == 1, f"records: {paths}\n{describe(proc)}"
    with open(paths[0], encoding="utf-8") as f:
        return json.load(f)


def the_task_logs(record: dict) -> List[str]:
    """The local log of each task of the record's one work unit, in task order."""
    [unit] = record["work_units"]
    return [read(path) for path in unit["log_paths"]]


def printed_argv(log: str) -> List[List[str]]:
    """The argv lists the basic program printed (``print(sys.argv[1:])``) in a log."""
    found = []
    for line in log.splitlines():
        line = re.sub(r"^\[\d+\] ", "", line.strip())  # a task prefix, if any
        if line.startswith("["):
            try:
                value = ast.literal_eval(line)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, list):
                found.append(value)
    return found


def my_package_project(directory: str, launcher_text: str) -> str:
    """The project the README blocks expect (``my_package.main`` at ``path="."``),
    which the sdist lacks, with the launcher beside it; returns the launcher."""
    write_files(directory, {
        "pyproject.toml": PYPROJECT.format(name="my_package"),
        "my_package/__init__.py": "",
        "my_package/main.py": TASK_MAIN,  # writes its argv to $ECHO_OUT/task-$LXM_TASK_ID.json
    })
    launcher = os.path.join(directory, "launcher.py")
    with open(launcher, "w", encoding="utf-8") as f:
        f.write(launcher_text)
    return launcher


def readme_launcher_text(sdist: str, name: str, executor_kind: str) -> str:
    readme = readme_launchers(sdist)
    text = complete_block(readme[name], readme)
    if name == "hello":
        return choose_executor(text, executor_kind)
    return fill_placeholders(text, executor_kind)


def check_reports(reports: Dict[int, dict], sweep: List[Any]) -> None:
    assert sorted(reports) == list(range(len(sweep))), sorted(reports)
    for task, args in enumerate(sweep):
        assert reports[task]["argv"] == absl_argv(args), (task, args)


@pytest.fixture
def fake_runtimes(tmp_path, monkeypatch):
    """docker, apptainer and singularity stand-ins first on the PATH; their call log."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    runtime = bindir / "_fake.py"
    runtime.write_text(f"#!{sys.executable}\n" + read(FAKE_RUNTIME))
    runtime.chmod(0o755)
    for name in ("docker", "apptainer", "singularity"):
        os.symlink(runtime, bindir / name)
    log = tmp_path / "runtime-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(log))
    return log


# --- the inventory --------------------------------------------------------------


def test_every_launcher_of_the_sdist_is_run(sdist_042):
    """No launcher of the sdist goes untested: the files and README blocks that
    call create_experiment are exactly those this module runs."""
    files = []
    for path in glob.glob(os.path.join(sdist_042, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, sdist_042)
        if rel.startswith("lxm3" + os.sep) or rel.endswith("_test.py"):
            continue
        if "create_experiment(" in read(path):
            files.append(rel)
    assert sorted(files) == SDIST_LAUNCHERS
    assert sorted(readme_launchers(sdist_042)) == sorted(README_LAUNCHERS)


def test_launcher_sweeps_are_read_from_the_launchers(sdist_042):
    """The expectations come from the launchers' own args (a self-check of
    launcher_sweep, so a wrong reading cannot pass the runs below)."""
    basic = read(os.path.join(sdist_042, *SDIST_LAUNCHERS[0].split("/")))
    assert [absl_argv(a) for a in launcher_sweep(basic)] == [["--seed=1"]]
    readme = readme_launchers(sdist_042)
    assert launcher_sweep(readme["hello"]) == [None]
    assert [absl_argv(a) for a in launcher_sweep(readme["sweep"])] == [
        [f"--seed={i}"] for i in range(5)]


# --- the basic integration launcher, on this machine -------------------------


@pytest.mark.parametrize("variant", sorted(BASIC_VARIANTS))
def test_basic_launcher_locally(sdist_042, tmp_path, fake_runtimes, variant):
    """tests/integration/basic as its run_tests.sh runs it: every task prints the
    argv the launcher's Job asked for, in the container runtime the flag names."""
    flags, runtime = BASIC_VARIANTS[variant]
    here = str(tmp_path / "basic")
    shutil.copytree(os.path.join(sdist_042, "tests", "integration", "basic"), here)
    launcher = os.path.join(here, "launcher.py")
    os.mkdir(os.path.join(here, "tmp"))
    proc = lxm3_launch(launcher, *flags, "--lxm_config", os.path.join(here, "lxm.toml"),
                       cwd=os.path.join(here, "tmp"))
    assert proc.returncode == 0, describe(proc)
    record = the_record(proc)
    assert record["status"] == "completed", describe(proc)
    sweep = launcher_sweep(read(launcher))
    logs = the_task_logs(record)
    assert [printed_argv(log) for log in logs] == [[absl_argv(args)] for args in sweep], logs
    calls = [json.loads(line) for line in open(fake_runtimes)] if fake_runtimes.exists() else []
    if runtime is None:
        assert calls == []
    else:
        image = flags[0].split("=", 1)[1]
        assert [(c["tool"], image in c["argv"]) for c in calls] == [(runtime, True)] * len(sweep)


# --- the README's launchers, on this machine and on the test bed ---------------


@pytest.mark.parametrize("name", sorted(README_LAUNCHERS))
def test_readme_launcher_locally(sdist_042, tmp_path, name):
    """A README launcher with Local: each task got its arguments."""
    out = tmp_path / "out"
    out.mkdir()
    project = str(tmp_path / "project")
    launcher = my_package_project(project, readme_launcher_text(sdist_042, name, "Local"))
    with open(os.path.join(project, "lxm.toml"), "w", encoding="utf-8") as f:
        f.write(f"[local.storage]\nstaging = {toml_string(str(tmp_path / 'staging'))}\n"
                f"[local.env]\nECHO_OUT = {toml_string(str(out))}\n")
    proc = lxm3_launch(launcher, cwd=project)
    assert proc.returncode == 0, describe(proc)
    assert the_record(proc)["status"] == "completed", describe(proc)
    check_reports(read_reports(str(out)), launcher_sweep(read(launcher)))


def launched(ws, proc: subprocess.CompletedProcess, seconds: float) -> Launch:
    """The launch as cluster_helpers knows it, from lxm3's record; its jobs are
    cancelled at teardown."""
    result = None
    paths = glob.glob(os.path.join(os.environ["XDG_STATE_HOME"], "lxm3", "experiments", "*.json"))
    if len(paths) == 1:
        with open(paths[0], encoding="utf-8") as f:
            record = json.load(f)
        result = {"experiment_id": record["experiment_id"], "work_units": {
            str(unit["id"]): {
                "arrays": [[a["job_id"], a["first_task"], a["count"]] for a in unit["arrays"]],
                "job_ids": sorted({a["job_id"] for a in unit["arrays"]}),
                "log_directory": unit["log_directory"],
                "job_directory": unit["job_directory"],
                "cluster": unit["cluster"],
            } for unit in record["work_units"]}}
    launch = Launch(proc.returncode, proc.stdout, proc.stderr, result, ws.title, seconds)
    ws.job_ids += launch.job_ids() + re.findall(r"(?:\(job| as job) (\d+)\b", proc.stderr)
    return launch


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge"])
@pytest.mark.parametrize("name", sorted(README_LAUNCHERS))
def test_readme_launcher_on_the_test_bed(sdist_042, cluster_workspaces, name, scheduler):
    """A README launcher with Slurm / GridEngine, on the test bed (ssh): each
    task of each work unit got its arguments."""
    tb = require_testbed(scheduler)
    ws = cluster_workspaces(tb, scheduler, "ssh")
    out = ws.out_dir()
    project = os.path.join(ws.root, "project")
    launcher = my_package_project(
        project, readme_launcher_text(sdist_042, name, EXECUTORS[scheduler]))
    config = ws.write_config(env={"ECHO_OUT": out})
    started = time.monotonic()
    proc = lxm3_launch(launcher, "--lxm_config", config, cwd=project)
    launch = launched(ws, proc, time.monotonic() - started).check()
    [unit] = launch.result["work_units"].values()
    assert unit["cluster"] == ws.cluster_name, unit
    sweep = launcher_sweep(read(launcher))
    check_reports(ws.wait_for_reports(out, len(sweep), launch, timeout=WAIT_TIMEOUT), sweep)
