"""Task inputs that cannot reach the program exactly are refused before anything runs.

Arguments and environment reach a task's program through execve(): a NUL byte
would cut a value short, Linux refuses strings longer than MAX_ARG_STRLEN and
argument lists beyond ARG_MAX, an object without a text form would arrive as
``<object object at 0x...>``, and some environment names belong to the job
script or to bash.
"""

import enum
import errno
import os
import pathlib
import subprocess
import textwrap

import pytest
from cluster_helpers import array_unit, job_unit

import lxm3
from lxm3 import xm

from conftest import lxm3_cli, run_task, write_job
from testbed_env import require_testbed

MAX = lxm3.MAX_ARG_STRLEN


def exe(args=None, env_vars=None):
    """A packaged executable (no archive needed to build tasks)."""
    return lxm3.ClusterExecutable("echoapp", args=xm.SequentialArgs.from_collection(args),
                                  env_vars=env_vars)


def array(args=(), env_vars=(), executable=None):
    return lxm3.ArrayJob(executable or exe(), lxm3.Local(), args=list(args), env_vars=list(env_vars))


# -- NUL bytes ---------------------------------------------------------------

def test_a_nul_byte_in_an_argument_is_refused_naming_task_and_flag():
    with pytest.raises(ValueError, match=r"ArrayJob task 2: argument --name contains a NUL byte"):
        array(args=[{"name": "a"}, {"name": "b"}, {"name": "c\0d"}])
    with pytest.raises(ValueError, match=r"ArrayJob 'sweep' task 0: argument 2 contains a NUL byte"):
        lxm3.ArrayJob(exe(), lxm3.Local(), name="sweep", args=[["first", "x\0"]])


def test_a_nul_byte_in_an_environment_value_is_refused():
    with pytest.raises(ValueError, match=r"ArrayJob task 1: environment variable TOKEN contains "
                       r"a NUL byte"):
        array(env_vars=[{"TOKEN": "ok"}, {"TOKEN": "cut\0here"}])
    # The executable's own arguments and environment are part of every task.
    with pytest.raises(ValueError, match=r"ArrayJob task 0: environment variable FROM_EXE"):
        array(args=[{}], executable=exe(env_vars={"FROM_EXE": "\0"}))
    with pytest.raises(ValueError, match=r"ArrayJob task 0: argument --common contains a NUL"):
        array(args=[{}], executable=exe(args={"common": "\0"}))


# -- Linux's limits ------------------------------------------------------------

def test_max_arg_strlen_is_linuxs_limit():
    """The constant is what the kernel enforces: one byte more and exec fails."""
    true = "/bin/true"
    subprocess.run([true, "x" * (MAX - 1)], check=True)  # MAX bytes with its NUL
    with pytest.raises(OSError, match=r"\[Errno 7\] Argument list too long") as failure:
        subprocess.run([true, "x" * MAX])
    assert failure.value.errno == errno.E2BIG
    subprocess.run([true], env={"A": "x" * (MAX - 3)}, check=True)  # "A=" + value + NUL
    with pytest.raises(OSError, match=r"\[Errno 7\] Argument list too long") as failure:
        subprocess.run([true], env={"A": "x" * (MAX - 2)})
    assert failure.value.errno == errno.E2BIG


def test_an_argument_or_variable_over_the_limit_is_refused():
    [task] = array(args=[["x" * (MAX - 1)]])._tasks  # the largest that can be passed
    assert task.args == ["x" * (MAX - 1)]
    with pytest.raises(ValueError, match=rf"ArrayJob task 0: argument 1 is {MAX + 1} bytes; Linux "
                       rf"passes at most MAX_ARG_STRLEN = {MAX} bytes"):
        array(args=[["x" * MAX]])
    half = (MAX - len("--data=")) // 2 + 1  # 65,540 characters, 131,074 bytes with the NUL
    with pytest.raises(ValueError, match=rf"argument --data is {len('--data=') + 2 * half + 1} bytes"):
        array(args=[{"data": "é" * half}])  # counted in UTF-8 bytes
    array(env_vars=[{"A": "x" * (MAX - 3)}])
    with pytest.raises(ValueError, match=rf"ArrayJob task 0: environment variable A is {MAX + 1} "
                       r"bytes"):
        array(env_vars=[{"A": "x" * (MAX - 2)}])


def test_a_task_over_the_budget_is_refused():
    ok = {f"arg{i}": "x" * 100_000 for i in range(10)}  # 1,000,000 bytes and change
    array(args=[ok])
    too_much = {**ok, "one_more": "x" * 50_000}
    with pytest.raises(ValueError, match=r"ArrayJob task 1: its arguments and environment take "
                       r"\d+ bytes; a task may use at most TASK_INPUT_BUDGET = 1048576"):
        array(args=[{}, too_much])
    with pytest.raises(ValueError, match=r"TASK_INPUT_BUDGET"):
        array(args=[ok], env_vars=[{"MORE": "x" * 50_000}])


def test_text_that_cannot_be_encoded_is_refused():
    with pytest.raises(ValueError, match=r"argument --name cannot be encoded as UTF-8"):
        array(args=[{"name": "\ud800"}])


# -- Objects without a text form ---------------------------------------------

class Color(enum.Enum):
    RED = 1


class WithStr:
    def __str__(self):
        return "with-str"


class WithRepr:
    def __repr__(self):
        return "WithRepr()"


class Plain:
    pass


def a_generator():
    yield 1


@pytest.mark.parametrize("value, kind", [
    (object(), r"is an instance of object, which defines neither __str__ nor __repr__"),
    (Plain(), r"is an instance of Plain"),
    (len, r"is a function or method"),
    (lambda: 1, r"is a function or method"),
    (a_generator, r"is a function or method"),
    (WithStr().__str__, r"is a function or method"),
    (Plain, r"is a class"),
    (os, r"is a module"),
    (a_generator(), r"is a generator"),
    ([1, object()], r"holds an instance of object"),
    ([[1, 2], [3, Plain()]], r"holds an instance of Plain"),
    ({"key": len}, r"holds a function or method"),
])
def test_objects_without_a_text_form_are_refused(value, kind):
    with pytest.raises(TypeError, match=rf"ArrayJob task 1: argument --obj {kind}[^:]*: it has no text "
                       r"form to pass on the command line \(it would arrive as "):
        array(args=[{"obj": 1}, {"obj": value}])


def test_a_positional_object_and_an_environment_object_are_refused():
    with pytest.raises(TypeError, match=r"ArrayJob task 0: a positional argument is an instance "
                       r"of object"):
        array(args=[["fine", object()]])
    with pytest.raises(TypeError, match=r"ArrayJob task 0: environment variable HANDLE is an "
                       r"instance of object"):
        array(env_vars=[{"HANDLE": object()}])


def test_values_with_a_meaningful_text_are_accepted():
    [task] = array(args=[{
        "s": "text", "i": 3, "f": 0.5, "yes": True, "no": False, "color": Color.RED,
        "path": pathlib.Path("/data/x"), "own_str": WithStr(), "own_repr": WithRepr(),
        "values": [1, "two"], "nested": [[1, 2], [3]],
    }], env_vars=[{"NUMBER": 7, "TEXT": "t"}])._tasks
    assert task.args == ["--s=text", "--i=3", "--f=0.5", "--yes", "--nono", "--color=RED",
                         "--path=/data/x", "--own_str=with-str", "--own_repr=WithRepr()",
                         "--values=1", "--values=two", "--nested=[[1, 2], [3]]"]
    assert task.env == {"NUMBER": "7", "TEXT": "t"}


# -- Reserved environment names -----------------------------------------------

SCRIPT_NAMES = ["lxm_archive", "lxm_args", "lxm_tasks", "lxm_workdir", "lxm_anything",
                "LXM_TASK_ID", "LXM_EXPERIMENT_ID", "LXM_WORK_UNIT_ID", "LXM_NUM_TASKS"]
BASH_NAMES = sorted(n for n in lxm3.RESERVED_ENV_NAMES if not n.startswith("LXM_"))


@pytest.mark.parametrize("name", SCRIPT_NAMES + BASH_NAMES)
def test_reserved_environment_names_are_refused(name):
    with pytest.raises(ValueError, match=rf"ArrayJob task 0: environment variable {name} is "):
        array(env_vars=[{name: "x"}])


def test_ordinary_names_and_lxm_python_are_allowed():
    [task] = array(env_vars=[{"LXM_PYTHON": "/opt/py/bin/python3", "LXM_OTHER": "1",
                              "value": "v", "PATH": "/usr/bin:/bin"}])._tasks
    assert task.env["LXM_PYTHON"] == "/opt/py/bin/python3"


def test_bashs_reserved_names_really_would_not_arrive(tmp_path):
    """Why they are reserved: written into a job script anyway (past the checks), none of
    them reaches the program with its value, or the task fails."""
    for name in BASH_NAMES:
        directory = tmp_path / name
        directory.mkdir()
        script = write_job(str(directory), [lxm3.Task([], {name: "sentinel"})])
        proc, report = run_task(script, 0, directory)
        arrived = proc.returncode == 0 and report and report["env"].get(name) == "sentinel"
        assert not arrived, f"{name} would reach the program: it need not be reserved"


def test_the_job_scripts_own_names_do_not_catch_a_tasks_variables(tmp_path):
    """The job script's locals are lxm_* too: a task's "value" or "line" arrives."""
    env = {name: f"{name}!" for name in ("line", "value", "token", "tokens", "status", "name")}
    script = write_job(str(tmp_path), [lxm3.Task(["arg"], env)], common_env={"key": "k"})
    proc, report = run_task(script, 0, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, value in {**env, "key": "k"}.items():
        assert report["env"].get(name) == value, name


@pytest.mark.parametrize("table, header", [
    ('[local.env]\nlxm_archive = "/tmp/other.zip"\n', r"\[local\.env\]"),
    ('[[clusters]]\nname = "c"\n[clusters.env]\nIFS = ","\n', r"\[clusters\.env\] of cluster 'c'"),
    ('[local.env]\nSECRET = "a\\u0000b"\n', r"\[local\.env\]"),
])
def test_the_configs_env_is_checked_when_it_is_read(tmp_path, table, header):
    path = tmp_path / "lxm.toml"
    path.write_text(table)
    with pytest.raises(lxm3.ConfigError, match=rf"^{path}: {header}: environment variable "):
        lxm3.Config.from_file(str(path))


# -- Refused before anything runs or is submitted ------------------------------

def test_add_refuses_a_job_at_the_call(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = lxm3.Config(clusters=[lxm3.ClusterConfig(name="c")])
    with lxm3.create_experiment("refused", config=config) as experiment:
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=lxm3.Local.Spec(),
                                                   env_vars={"ECHO_OUT": str(out)})])
        experiment.add(xm.Job(exe, lxm3.Local(), args={"n": 1}))
        with pytest.raises(ValueError, match=r"work unit 2 task 0: environment variable "
                           r"lxm_workdir is set by the job script"):
            experiment.add(xm.Job(exe, lxm3.Local(), env_vars={"lxm_workdir": "/"}))
        with pytest.raises(ValueError, match=r"work unit 2 task 0: argument --n contains a NUL"):
            experiment.add(xm.Job(exe, lxm3.Slurm()), args={"args": {"n": "\0"}})
    assert len(experiment.work_units) == 1  # the refused jobs made no work unit
    assert os.listdir(str(out)) == ["task-0.json"]


def test_the_configs_env_counts_in_the_budget(echo_project, tmp_path):
    config = lxm3.Config(local_env={"BIG": "x" * 100_000})
    big = {f"arg{i}": "x" * 100_000 for i in range(10)}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"work unit 1 task 0: its arguments and environment with "
                       r"the config's env take \d+ bytes"):
        with lxm3.create_experiment("budget", config=config) as experiment:
            spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=lxm3.Local.Spec(),
                                                       env_vars={"ECHO_OUT": str(out)})])
            experiment.add(lxm3.ArrayJob(exe, lxm3.Local(), args=[big]))
    assert os.listdir(str(out)) == []


LAUNCHER = """\
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment(experiment_title="refused") as experiment:
        executor = xm_cluster.Local()
        spec = xm_cluster.PythonPackage(path={project!r},
                                        entrypoint=xm_cluster.ModuleName("echoapp.main"))
        [exe] = experiment.package([xm.Packageable(
            spec, executor_spec=executor.Spec(), env_vars={{"ECHO_OUT": {out!r}}})])
        experiment.add(xm_cluster.ArrayJob(exe, executor, args=[
            {{"seed": 0}}, {{"seed": 1, "handle": object()}}, {{"seed": 2}}]))
"""


def test_a_local_launch_with_a_bad_task_runs_nothing(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER.format(project=echo_project, out=str(out))))
    data = tmp_path / "xdg_data_home"
    proc = lxm3_cli("launch", str(launcher), cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 1
    assert ("TypeError: ArrayJob task 1: argument --handle is an instance of object, which "
            "defines neither __str__ nor __repr__") in proc.stderr, proc.stderr
    assert 'launcher.py", line 9' in proc.stderr  # the line that made the sweep
    assert os.listdir(str(out)) == []  # not even its valid tasks 0 and 2 ran
    assert "started locally" not in proc.stderr
    job_dirs = [d for _, dirs, _ in os.walk(str(data)) for d in dirs if d.startswith("wu")]
    assert job_dirs == []


# -- On the test bed: nothing is submitted ----------------------------------


@pytest.mark.testbed
def test_a_cluster_launch_with_a_bad_task_submits_nothing(cluster_workspaces):
    ws = cluster_workspaces(require_testbed("slurm"), "slurm", "ssh")
    out = ws.out_dir()
    launch = ws.launch(
        [array_unit(ws.executor(), args=[{"seed": 0}, {"seed": 1}]),
         job_unit(ws.executor(), env_vars={"lxm_archive": "/tmp/another.zip"})],
        exe_env={"ECHO_OUT": out})
    assert launch.returncode == 1, launch.describe()
    assert ("ValueError: work unit 2 task 0: environment variable lxm_archive is set by the "
            "job script") in launch.stderr, launch.describe()
    ws.assert_nothing_submitted(launch)
    launch = ws.launch([array_unit(ws.executor(), args=[{"seed": 0}, {"seed": "1\u0000"}])],
                       exe_env={"ECHO_OUT": out})
    assert launch.returncode == 1, launch.describe()
    assert "ValueError: ArrayJob task 1: argument --seed contains a NUL byte" in launch.stderr, \
        launch.describe()
    ws.assert_nothing_submitted(launch)
    assert os.listdir(out) == []
