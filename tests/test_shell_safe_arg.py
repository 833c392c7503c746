"""``xm.ShellSafeArg``: shell text the job script expands on the node, in the
task's environment, as a shell expands an unquoted word of a command line;
every other argument still arrives exactly as written."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from cluster_helpers import LAUNCHER, job_unit

import lxm3
from lxm3 import xm

from conftest import AWKWARD, run_task, write_job
from testbed_env import require_testbed

Shell = xm.ShellSafeArg


# -- rendering ---------------------------------------------------------------


def test_shell_safe_arg_renders_as_shell_words_and_plain_values_stay_plain():
    args = xm.SequentialArgs.from_collection(
        {"data": Shell("$SCRATCH/data"), "plain": "$HOME", "lst": [Shell("$A"), "$B"]})
    args = xm.merge_args(args, xm.SequentialArgs.from_collection([Shell("--run=$SLURM_JOB_ID"), "$X"]))
    rendered = lxm3.render_args(args)
    assert rendered == ["--data=$SCRATCH/data", "--plain=$HOME", "--lst=$A", "--lst=$B",
                        "--run=$SLURM_JOB_ID", "$X"]
    kinds = [isinstance(a, lxm3.ShellWords) for a in rendered]
    assert kinds == [True, False, True, False, True, False]


def test_a_flag_name_is_quoted_in_front_of_shell_text():
    [arg] = lxm3.render_args(xm.SequentialArgs.from_collection({"we ird": Shell("$V")}))
    assert isinstance(arg, lxm3.ShellWords) and arg == "'--we ird'=$V"


def test_tasks_file_marks_shell_text_with_its_own_token_kind():
    task = lxm3.Task(["$HOME", lxm3.ShellWords("$HOME")], {"V": "$x"})
    [_, line] = lxm3.tasks_file_lines([task], {})
    assert line.split() == ["#0", "eV=\\x24x", "a\\x24HOME", "s\\x24HOME"]


@pytest.mark.parametrize("args, message", [
    ([[Shell("$A"), "b"]], r"a positional argument holds an xm\.ShellSafeArg where only text can go"),
    ({"nested": [[Shell("$A")]]}, r"argument --nested holds an xm\.ShellSafeArg where only text"),
    ({"n": Shell(3)}, r"argument --n is an xm\.ShellSafeArg of int, not of shell text"),
])
def test_shell_safe_arg_where_no_shell_word_can_be_is_refused(args, message):
    with pytest.raises(TypeError, match=message):
        lxm3.render_args(xm.SequentialArgs.from_collection(args))


def test_shell_safe_arg_as_an_environment_value_is_refused(echo_project):
    with lxm3.create_experiment("t", config=lxm3.Config()) as experiment:
        executor = lxm3.Local()
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        with pytest.raises(TypeError, match=r"environment variable V is an xm\.ShellSafeArg where "
                                            r"only text can go"):
            experiment.add(xm.Job(exe, executor, env_vars={"V": Shell("$HOME")}))


# -- the job script, run by bash -----------------------------------------------


def run(tmp_path, args, env=None, common_env=None, node_env=None):
    script = write_job(str(tmp_path), [lxm3.Task(args, env or {})], common_env=common_env)
    return run_task(script, 0, tmp_path, env=node_env)


def test_shell_text_is_expanded_in_the_tasks_environment_and_plain_text_is_not(tmp_path):
    W = lxm3.ShellWords
    args = [W("--job=$NODE_VAR"), "--job=$NODE_VAR", W("$TASK_VAR"), "$TASK_VAR",
            W("--from-config=$CONFIG_VAR"), W("--task=$LXM_TASK_ID"), W("$(echo sub)"), *AWKWARD]
    proc, report = run(tmp_path, args, env={"TASK_VAR": "task value"},
                       common_env={"CONFIG_VAR": "c"}, node_env={"NODE_VAR": "4242"})
    assert proc.returncode == 0, proc.stderr
    assert report["argv"] == ["--job=4242", "--job=$NODE_VAR", "task", "value", "$TASK_VAR",
                              "--from-config=c", "--task=0", "sub", *AWKWARD]


def test_shell_text_splits_globs_quotes_and_may_vanish(tmp_path):
    W = lxm3.ShellWords
    args = ["first", W("$UNSET_VARIABLE"), W("'one word' two"), W("echoapp/*.py"),
            W("keep #comment dropped"), W('"$EMPTY"'), W("nomatch*.xyz"), "last"]
    proc, report = run(tmp_path, args, env={"EMPTY": ""})
    assert proc.returncode == 0, proc.stderr
    # Globs match in the unpacked archive, where the program runs.
    assert report["argv"] == ["first", "one word", "two", "echoapp/__init__.py", "echoapp/main.py",
                              "keep", "", "nomatch*.xyz", "last"]


def test_shell_text_that_is_not_shell_syntax_fails_the_task_saying_which(tmp_path):
    proc, report = run(tmp_path, ["ok", lxm3.ShellWords("a ) b")])
    assert report is None  # the program never ran
    assert proc.returncode == 125
    assert "lxm3: cannot expand the ShellSafeArg a ) b (argument 2) with bash" in proc.stderr


# -- a real Local launch ---------------------------------------------------------


def test_local_launch_expands_shell_safe_args_and_records_them_as_written(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with lxm3.create_experiment("t", config=lxm3.Config(local_env={"FROM_CONFIG": "cfg"})) as experiment:
        executor = lxm3.Local()
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
        [exe] = experiment.package([xm.Packageable(
            spec, executor_spec=executor.Spec(), args={"exe": Shell("$FROM_CONFIG")},
            env_vars={"ECHO_OUT": str(out)})])
        args = xm.merge_args(xm.SequentialArgs.from_collection([Shell("--home=$HOME"), "$HOME"]),
                             xm.SequentialArgs.from_collection({"mine": Shell("$MY_VAR")}))
        experiment.add(xm.Job(exe, executor, env_vars={"MY_VAR": "mine"}, args=args))
    with open(out / "task-0.json") as f:
        report = json.load(f)
    assert report["argv"] == ["--exe=cfg", f"--home={os.environ['HOME']}", "$HOME", "--mine=mine"]
    [unit] = lxm3.load_record(experiment.experiment_id).work_units
    [task] = unit.tasks
    assert task["args"] == ["--exe=$FROM_CONFIG", "--home=$HOME", "$HOME", "--mine=$MY_VAR"]
    assert task["shell_args"] == [0, 1, 3]


# -- Slurm and Grid Engine on the test bed ---------------------------------------

# The shared launcher, with arguments written {"shell": text} turned into ShellSafeArgs.
SHELL_SAFE_HELPER = """\
from lxm3 import xm as _xm


def shell_safe(args):
    def convert(value):
        return _xm.ShellSafeArg(value["shell"]) if isinstance(value, dict) else value
    if isinstance(args, dict):
        return {k: convert(v) for k, v in args.items()}
    return [convert(v) for v in args]


"""
JOB_LINE = 'experiment.add(xm.Job(exe, executor, args=unit.get("args") or {},'


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler, job_id_variable", [("slurm", "SLURM_JOB_ID"), ("sge", "JOB_ID"),
                                                        ("pbs", "PBS_ARRAY_ID")])
def test_cluster_task_gets_shell_safe_arg_expanded_and_plain_home_literally(
        cluster_workspaces, scheduler, job_id_variable):
    ws = cluster_workspaces(require_testbed(scheduler), scheduler, "ssh")
    out = ws.out_dir()
    units = [job_unit(ws.executor(), args=[{"shell": f"--job=${job_id_variable}"}, "$HOME",
                                           {"shell": '--mine="$MY_VAR"'}],
                      env_vars={"ECHO_OUT": out, "MY_VAR": "my value"})]
    argv, env, directory = ws.launch_command(units)
    launcher = textwrap.dedent(LAUNCHER)
    assert JOB_LINE in launcher  # the shared launcher changed: update this test
    launcher = SHELL_SAFE_HELPER + launcher.replace(
        JOB_LINE, 'experiment.add(xm.Job(exe, executor, args=shell_safe(unit.get("args") or {}),')
    with open(os.path.join(directory, "launcher.py"), "w", encoding="utf-8") as f:
        f.write(launcher)
    proc = subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    launch = ws.launched(proc.returncode, proc.stdout, proc.stderr, directory, 0).check()
    [job_id] = launch.job_ids()
    [report] = ws.wait_for_reports(out, 1, launch).values()
    assert report["env"][job_id_variable] == job_id
    assert report["argv"] == [f"--job={job_id}", "$HOME", "--mine=my value"]
