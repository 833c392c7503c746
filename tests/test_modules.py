"""``modules=[...]`` on clusters whose ``module`` comes from the login profile.

Lmod and Environment Modules define the ``module`` function in the login
profile (/etc/profile.d); a batch job's shell is no login shell. When
``module`` is missing, the job script reads the profile as ``bash -l`` does,
in a child shell, and takes what it left; the task's own variables keep their
values. Neither Lmod nor Environment Modules is installed here, so the
profile of these tests defines a small ``module`` function that loads
"modules" (directories of programs) as Lmod would: by changing PATH and
LOADEDMODULES. The test user's real profile is shared with other tests, so
each task's HOME points the login shell at a profile of the test's own.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap

import pytest
from cluster_helpers import job_unit

import lxm3

from conftest import run_task, write_job
from testbed_env import poll, require_testbed

PROFILE = """\
    echo "Welcome to the cluster: this line must not reach the task's output"
    PATH=/usr/local/bin:/usr/bin:/bin  # as /etc/profile sets it
    export LXM_IT_PROFILE=read
    export LXM_IT_TASK_VAR="the profile's value"
    export LXM_IT_MODULES="$HOME/modules"
    module() {
      [ "$1" = load ] || return 2
      shift
      for m in "$@"; do
        [ -d "$LXM_IT_MODULES/$m" ] || { echo "ERROR: unknown module $m" >&2; return 1; }
        PATH="$LXM_IT_MODULES/$m/bin:$PATH"
        LOADEDMODULES="${LOADEDMODULES:+$LOADEDMODULES:}$m"
      done
      export PATH LOADEDMODULES
    }
"""


def make_home(root, profile=PROFILE, modules=("gcc/12", "cuda")):
    """A home directory whose login profile (.bash_profile) is ``profile``, readable by all."""
    home = os.path.join(str(root), "home")
    os.makedirs(home)
    with open(os.path.join(home, ".bash_profile"), "w") as f:
        f.write(textwrap.dedent(profile))
    for module in modules:
        os.makedirs(os.path.join(home, "modules", module, "bin"))
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return home


def run_with_modules(tmp_path, modules, home, node_env=None, task_env=None):
    tasks = [lxm3.Task(["arg"], {"LXM_IT_TASK_VAR": "the task's value", **(task_env or {})})]
    script = write_job(str(tmp_path), tasks, setup=lxm3.module_lines(modules))
    return run_task(script, 0, tmp_path, env={"HOME": home, **(node_env or {})})


def test_module_from_the_login_profile_loads_and_the_tasks_variables_win(tmp_path):
    home = make_home(tmp_path)
    proc, report = run_with_modules(tmp_path, ["gcc/12", "cuda"], home)
    assert proc.returncode == 0, proc.stderr
    env = report["env"]
    modules = os.path.join(home, "modules")
    assert env["PATH"] == f"{modules}/cuda/bin:{modules}/gcc/12/bin:/usr/local/bin:/usr/bin:/bin"
    assert env["LOADEDMODULES"] == "gcc/12:cuda"
    assert env["LXM_IT_PROFILE"] == "read"
    assert env["LXM_IT_TASK_VAR"] == "the task's value"
    assert report["argv"] == ["arg"]
    assert "Welcome" not in proc.stdout + proc.stderr


def test_a_module_function_the_job_already_has_is_used_without_reading_the_profile(tmp_path):
    home = make_home(tmp_path)
    exported = {"BASH_FUNC_module%%": '() { export LOADED_BY_EXPORTED="$2"; }'}
    proc, report = run_with_modules(tmp_path, ["x"], home, node_env=exported)
    assert proc.returncode == 0, proc.stderr
    assert report["env"]["LOADED_BY_EXPORTED"] == "x"
    assert "LXM_IT_PROFILE" not in report["env"]


def test_unknown_module_stops_the_task_before_the_program(tmp_path):
    proc, report = run_with_modules(tmp_path, ["gcc/12", "nosuch/1.0"], make_home(tmp_path))
    assert report is None
    assert proc.returncode == 125
    assert "ERROR: unknown module nosuch/1.0" in proc.stderr
    assert "lxm3: module load nosuch/1.0 failed" in proc.stderr


@pytest.mark.parametrize("profile", ["true\n", "exit 7\n", "exec sleep 0\n"])
def test_no_module_anywhere_is_a_clear_error(tmp_path, profile):
    proc, report = run_with_modules(tmp_path, ["gcc/12"], make_home(tmp_path, profile))
    assert report is None
    assert proc.returncode == 125
    assert re.search(r"lxm3: module: command not found: is Lmod/Environment Modules installed "
                     r"on \S+\? Neither the job's environment nor the login profile \(bash -l\) "
                     r"defines it", proc.stderr), proc.stderr


def test_no_modules_no_profile():
    assert lxm3.module_lines([]) == ""


# -- Slurm and Grid Engine on the test bed ---------------------------------------


def exit_line(path):
    """The job script's last line, once the task has ended (or None)."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        text = f.read()
    return text if re.search(lxm3.EXIT_RECORD_PATTERN, text) else None


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_cluster_job_loads_modules_from_the_login_profile(cluster_workspaces, scheduler):
    ws = cluster_workspaces(require_testbed(scheduler), scheduler, "ssh")
    homes = [make_home(os.path.join(ws.root, f"home{i}"), profile)
             for i, profile in enumerate([PROFILE, PROFILE, "echo no modules here\n"])]
    outs = [ws.out_dir(f"out{i}") for i in range(3)]
    module_lists = [["gcc/12", "cuda"], ["gcc/12", "nosuch/1.0"], ["gcc/12"]]
    units = [job_unit(ws.executor(modules=modules), env_vars={
        "ECHO_OUT": out, "HOME": home, "LXM_IT_TASK_VAR": "the task's value"})
        for modules, out, home in zip(module_lists, outs, homes)]
    launch = ws.launch(units).check()

    [report] = ws.wait_for_reports(outs[0], 1, launch).values()
    modules = os.path.join(homes[0], "modules")
    assert report["env"]["PATH"].startswith(f"{modules}/cuda/bin:{modules}/gcc/12/bin:")
    assert report["env"]["LOADEDMODULES"] == "gcc/12:cuda"
    assert report["env"]["LXM_IT_PROFILE"] == "read"
    assert report["env"]["LXM_IT_TASK_VAR"] == "the task's value"

    logs = {}
    for wid in (2, 3):
        directory = launch.unit(wid)["log_directory"]

        def ended(directory=directory):
            names = os.listdir(directory) if os.path.isdir(directory) else []
            return next(filter(None, (exit_line(os.path.join(directory, n)) for n in names)), None)

        logs[wid] = poll(ended, timeout=300, what=f"work unit {wid} to end")
    assert "ERROR: unknown module nosuch/1.0" in logs[2]
    assert "lxm3: module load nosuch/1.0 failed" in logs[2]
    assert "lxm3-exit: task 0 status 125" in logs[2]
    assert re.search(r"lxm3: module: command not found: is Lmod/Environment Modules installed on "
                     r"\S+\?", logs[3]), logs[3]
    assert "lxm3-exit: task 0 status 125" in logs[3]
    assert os.listdir(outs[1]) == os.listdir(outs[2]) == []  # the programs never ran


def test_job_script_with_modules_is_valid_bash(tmp_path):
    script = lxm3.render_job_script(header="", task_id="LXM_TASK_ID=0", experiment_id=1,
                                    work_unit_id=1, num_tasks=1, archive="a.zip", tasks_file="t",
                                    setup=lxm3.module_lines(["a b", "c"]))
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert "module load 'a b' || lxm_fail 'module load a b failed'" in script
