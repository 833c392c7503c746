"""The job script: real bash runs it, and every value must arrive byte for byte."""

import os
import shutil
import subprocess
import sys

import pytest

import lxm3
from lxm3 import xm

from conftest import AWKWARD, make_archive, run_task, write_job


def test_awkward_arguments_arrive_byte_for_byte(tmp_path):
    tasks = [lxm3.Task(args=AWKWARD, env={}), lxm3.Task(args=list(reversed(AWKWARD)), env={})]
    script = write_job(str(tmp_path), tasks)
    for task_id, task in enumerate(tasks):
        proc, report = run_task(script, task_id, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert report["argv"] == task.args
    assert not os.path.exists("/tmp/lxm3-pwned")


def test_awkward_environment_values_arrive_byte_for_byte(tmp_path):
    env = {f"LXM_TEST_VAR_{i}": value for i, value in enumerate(AWKWARD)}
    script = write_job(str(tmp_path), [lxm3.Task(args=[], env=env)])
    proc, report = run_task(script, 0, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, value in env.items():
        assert report["env"][name] == value, name


def test_rendered_sequential_args_reach_the_program(tmp_path):
    args = xm.merge_args(
        xm.SequentialArgs.from_collection({"name": "it's $HOME", "flag": True, "off": False}),
        xm.SequentialArgs.from_collection(["pos with space", "*"]),
        xm.SequentialArgs.from_collection({"lst": [1, "a b"], "none": None}),
    )
    rendered = lxm3.render_args(args)
    assert rendered == ["--name=it's $HOME", "--flag", "--nooff", "pos with space", "*",
                        "--lst=1", "--lst=a b"]
    script = write_job(str(tmp_path), [lxm3.Task(rendered, {})])
    proc, report = run_task(script, 0, tmp_path)
    assert report["argv"] == rendered


def test_each_task_gets_its_own_arguments_and_environment(tmp_path):
    tasks = [lxm3.Task([f"--seed={i}"], {"SEED": str(i)}) for i in range(5)]
    script = write_job(str(tmp_path), tasks, common_env={"SHARED": "from config", "SEED": "x"})
    for i in range(5):
        proc, report = run_task(script, i, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert report["argv"] == [f"--seed={i}"]
        assert report["env"]["SEED"] == str(i)  # the task's value wins over the config's
        assert report["env"]["SHARED"] == "from config"
        assert report["env"]["LXM_TASK_ID"] == str(i)
        assert report["env"]["LXM_NUM_TASKS"] == "5"
        assert report["env"]["LXM_EXPERIMENT_ID"] == "1234"
        assert report["env"]["LXM_WORK_UNIT_ID"] == "7"


def test_program_runs_in_the_unpacked_archive_which_is_removed_afterwards(tmp_path):
    script = write_job(str(tmp_path), [lxm3.Task([], {})])
    proc, report = run_task(script, 0, tmp_path, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    workdir = report["cwd"]
    assert workdir.startswith(str(tmp_path))
    assert report["env"]["PYTHONPATH"].split(":")[0] == workdir
    assert not os.path.exists(workdir)


def test_exit_code_is_passed_on_and_workdir_removed_on_failure(tmp_path):
    script = write_job(str(tmp_path), [lxm3.Task([], {"ECHO_EXIT": "3"})])
    proc, report = run_task(script, 0, tmp_path, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 3
    assert not os.path.exists(report["cwd"])


def test_workdir_removed_when_the_task_is_terminated(tmp_path):
    main = """\
        import os, sys, time
        open(os.path.join(os.environ["ECHO_OUT"], "cwd"), "w").write(os.getcwd())
        time.sleep(60)
    """
    archive = make_archive(str(tmp_path), main)
    script = write_job(str(tmp_path), [lxm3.Task([], {})], archive=archive)
    env = {**os.environ, "LXM_TASK_ID": "0", "ECHO_OUT": str(tmp_path), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", script], env=env, start_new_session=True)
    cwd_file = tmp_path / "cwd"
    for _ in range(100):
        if cwd_file.exists() and cwd_file.read_text():
            break
        proc.poll()
        assert proc.returncode is None
        import time
        time.sleep(0.1)
    workdir = cwd_file.read_text()
    assert os.path.isdir(workdir)
    os.killpg(proc.pid, 15)  # what a scheduler or our local runner does
    assert proc.wait(10) == 143
    assert not os.path.exists(workdir)


def test_unpacks_with_python_when_unzip_is_missing(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "sed", "mkdir", "rm", "cat", "env"):
        found = shutil.which(tool)
        assert found, tool
        os.symlink(found, bindir / tool)
    os.symlink(os.path.realpath(sys.executable), bindir / "python3")  # not a pyenv shim
    main = """\
        import os, stat
        mode = os.stat("echoapp/tool.sh").st_mode
        print("tool executable:", bool(mode & stat.S_IXUSR))
        print("argv ok")
    """
    archive = make_archive(str(tmp_path), main)
    import zipfile
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("echoapp/tool.sh")
        info.external_attr = 0o100755 << 16
        zf.writestr(info, "#!/bin/sh\n")
    script = write_job(str(tmp_path), [lxm3.Task([], {})], archive=archive)
    proc, _ = run_task(script, 0, tmp_path, path=str(bindir))
    assert proc.returncode == 0, proc.stderr
    assert "tool executable: True" in proc.stdout


def test_task_index_outside_the_sweep_is_an_error(tmp_path):
    script = write_job(str(tmp_path), [lxm3.Task([], {})])
    proc, report = run_task(script, 1, tmp_path)
    assert proc.returncode == 125
    assert "task index '1' is not in 0..0" in proc.stderr
    assert report is None


def test_last_task_of_a_100k_sweep_gets_its_arguments(tmp_path):
    tasks = [lxm3.Task([f"--seed={i}", f"name {i}"], {"I": str(i)}) for i in range(100_000)]
    script = write_job(str(tmp_path), tasks)
    for task_id in (0, 54_321, 99_999):
        proc, report = run_task(script, task_id, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert report["argv"] == [f"--seed={task_id}", f"name {task_id}"]
        assert report["env"]["I"] == str(task_id)


def test_invalid_environment_variable_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'BAD NAME' is not a valid environment variable name"):
        write_job(str(tmp_path), [lxm3.Task([], {"BAD NAME": "x"})])


def test_encoded_values_contain_nothing_the_shell_would_act_on():
    for value in AWKWARD:
        encoded = lxm3.encode_value(value)
        assert not set(encoded) & set(" \t\n\r'\"$`*?[]{}~;&|<>!#()")
