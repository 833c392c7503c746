"""The command line tells the truth and behaves in pipes: ``--version``; no
traceback when the reader of its output goes away (``lxm3 status X | head -1``);
a Ctrl-C message that says what had been launched; ``lxm3 logs -f`` that ends
with the task. All local; ``logs -f`` on Slurm is in test_status.py."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import lxm3

from conftest import (
    ROOT,
    interrupt_when,
    is_gone,
    launch_local,
    local_unit,
    lxm3_cli,
    lxm3_popen,
    new_record_id,
    read_lines,
    read_record,
    record_files,
    states,
    status_json,
    wait_until,
    write_files,
    write_launcher,
)

EXIT_LINE = re.compile(r"^lxm3-exit: task (\d+) status (\d+)$", re.M)


def test_version_flag_and_command():
    for args in (["--version"], ["version"]):
        proc = lxm3_cli(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"lxm3 {lxm3.__version__}\n", ""), args


# --- a reader that goes away -------------------------------------------------------


def run_with_closed_reader(*args):
    """``lxm3 ARGS | head -0``, deterministically: the pipe's read end is closed
    before lxm3 can write, so its first write fails as under ``head -1``."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "lxm3", *args], stdout=write_end,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    finally:
        os.close(write_end)
    return proc


def test_a_closed_pipe_ends_commands_quietly_with_141(tmp_path, task_project):
    _, record = launch_local(tmp_path, "pipe", {
        "title": "pipe", "project": task_project, "units": [local_unit(3, env={"LINES": "3", "EVERY": "0"})]})
    xid = str(record["experiment_id"])
    for args in (["list"], ["list", "--json"], ["status", xid], ["status", xid, "1", "--json"],
                 ["logs", xid], ["logs", xid, "-f"], ["version"]):
        proc = run_with_closed_reader(*args)
        # 141 = 128 + SIGPIPE: what a shell reports for cat or grep in the same place.
        assert (proc.returncode, proc.stderr) == (141, ""), args


def test_a_real_head_gets_its_line(tmp_path, task_project):
    _, record = launch_local(tmp_path, "head", {
        "title": "head", "project": task_project, "units": [local_unit(2)]})
    proc = subprocess.run(f"{sys.executable} -m lxm3 status {record['experiment_id']} 1 | head -1",
                          shell=True, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.startswith(f"experiment {record['experiment_id']} 'head'"), proc.stdout
    assert proc.stderr == ""


# --- what a Ctrl-C says --------------------------------------------------------------


SLOW_BUILD_LAUNCHER = """\
    import sys
    from lxm3 import xm, xm_cluster

    executor = getattr(xm_cluster, sys.argv[1])()
    with xm_cluster.create_experiment("interrupted") as experiment:
        spec = xm_cluster.UniversalPackage(entrypoint=["echo ran"], build_script="build.sh", path="app")
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm.Job(exe, executor))
"""


@pytest.mark.parametrize("executor", ["Local", "Slurm"])
def test_ctrl_c_while_packaging_says_nothing_was_launched(tmp_path, executor):
    marker = tmp_path / "building"
    write_files(tmp_path, {
        # The build runs until interrupted: Ctrl-C lands while packaging.
        "app/build.sh": f"#!/bin/sh\necho $$ > {marker}.tmp && mv {marker}.tmp {marker}\nexec sleep 300\n",
        "launcher.py": SLOW_BUILD_LAUNCHER,
        "lxm.toml": '[[clusters]]\nname = "c"\nserver = "login.invalid"\n',
    })
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    before = record_files()
    proc = lxm3_popen("launch", "launcher.py", executor, cwd=str(tmp_path),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = interrupt_when(proc, marker.exists, f"{marker} to appear")
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == ("lxm3: interrupted before anything was launched: "
                                       "nothing was submitted or run"), stderr
    assert "local task" not in stderr
    assert read_record(new_record_id(before))["status"] == "interrupted"
    build = int(marker.read_text())
    wait_until(lambda: is_gone(build), 60, "the build to be stopped with the launch")


def test_ctrl_c_while_local_tasks_run_says_they_were_stopped(tmp_path, task_project):
    gate, out = tmp_path / "gate", tmp_path / "out"
    out.mkdir()
    launcher = write_launcher(tmp_path / "running", {
        "title": "running", "project": task_project,
        "units": [local_unit(2, env={"GATE": str(gate), "OUT": str(out)})]})
    before = record_files()
    proc = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    _, stderr = interrupt_when(proc, (out / "task-1").exists, "task 1 to start")
    xid = new_record_id(before)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == f"lxm3: interrupted; local tasks were stopped (lxm3 status {xid})"


def test_ctrl_c_while_submitting_says_so(tmp_path):
    """A stand-in ``sbatch`` that never returns holds the launch in submission (a real
    one answers too fast to interrupt there); it submits nothing."""
    bindir, marker = tmp_path / "bin", tmp_path / "submitting"
    write_files(tmp_path, {
        # It answers the launch's question of what it is, as sbatch does; a submission hangs.
        "bin/sbatch": f'#!/bin/sh\n[ "$1" != --version ] || exec echo "slurm 23.02.7"\ntouch {marker}\nexec sleep 300\n',
        "app/build.sh": '#!/bin/sh\necho hi > "$BUILDDIR/hi"\n',
        "launcher.py": SLOW_BUILD_LAUNCHER,
        # No server: this machine is the login node, sbatch runs here.
        "lxm.toml": f'[[clusters]]\nname = "c"\n[clusters.storage]\nstaging = "{tmp_path}/staging"\n',
    })
    os.chmod(bindir / "sbatch", 0o755)
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    before = record_files()
    proc = lxm3_popen("launch", "launcher.py", "Slurm", cwd=str(tmp_path),
                      env={"PATH": f"{bindir}:{os.environ['PATH']}"},
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = interrupt_when(proc, marker.exists, f"{marker} to appear")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the stand-in, if it outlived the launch
    xid = new_record_id(before)
    assert proc.returncode == 130, stderr
    # The stand-in still runs: what it may yet submit is left to the cluster's submission log.
    assert stderr.splitlines()[-1] == (
        "lxm3: interrupted while submitting to clusters: which arrays were submitted is in the "
        f"cluster's submission log, which 'lxm3 status' reads (lxm3 status {xid})"), stderr
    assert "sbatch call was still under way after" in stderr
    assert "local task" not in stderr


# --- logs -f ends with the task --------------------------------------------------------


def test_logs_follow_of_a_finished_local_task_prints_its_end_and_returns(tmp_path, task_project):
    _, record = launch_local(tmp_path, "done", {
        "title": "done", "project": task_project,
        "units": [local_unit(2, env={"LINES": "5", "EVERY": "0", "CODES": '{"1": 3}'})]}, expect_rc=1)
    xid = str(record["experiment_id"])
    proc = lxm3_cli("logs", xid, "--task", "1", "-f", "-n", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["task 1 done", "", "lxm3-exit: task 1 status 3"]
    proc = lxm3_cli("logs", xid, "--task", "0", "-f", "-n", "0", timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "")


def recorded_units(new_records):
    """The work units of the new launch's record; [] until it has been written
    (the id is claimed with an empty file first)."""
    try:
        return read_record(new_records[0][:-5])["work_units"] if new_records else []
    except ValueError:
        return []


def wait_first_task_log(launch, before, timeout=120):
    """Wait until the record of the launch (the one not in ``before``) names the log
    of its first task and that log exists, i.e. the task has started: (experiment
    id, its work units)."""
    found = {}

    def started():
        assert launch.poll() is None, launch.communicate()
        new = [n for n in record_files() if n not in before]
        units = recorded_units(new)
        if units and units[0].get("log_paths") and os.path.exists(units[0]["log_paths"][0]):
            found.update(xid=new[0][:-5], units=units)
        return bool(found)

    wait_until(started, timeout, "the first task to start", interval=0.2)
    return found["xid"], found["units"]


def follow_gated_local_task(tmp_path, task_project, name, env):
    """Launch one local task that waits for a gate; follow its log. Returns
    (launch, follower, gate) once the follower has shown the task's first line."""
    gate = tmp_path / f"gate-{name}"
    launcher = write_launcher(tmp_path / name, {
        "title": name, "project": task_project,
        "units": [local_unit(1, env={"GATE": str(gate), "LINES": "2", "EVERY": "0", **env})]})
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    xid, _ = wait_first_task_log(launch, before)
    follower = lxm3_popen("logs", xid, "-f", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    read_lines(follower, 1, r"task 0 argv=.*", timeout=120)
    return launch, follower, gate


def test_logs_follow_of_a_running_local_task_ends_with_the_task(tmp_path, task_project):
    launch, follower, gate = follow_gated_local_task(tmp_path, task_project, "run", {})
    try:
        time.sleep(1)
        assert follower.poll() is None, ("stopped following a running task", follower.communicate())
        gate.touch()
        stdout, stderr = follower.communicate(timeout=120)
        assert follower.returncode == 0, stderr
        assert stdout.splitlines()[-4:] == ["line 1 of task 0", "task 0 done", "",
                                            "lxm3-exit: task 0 status 0"], stdout
        assert launch.wait(120) == 0, launch.communicate()
    finally:
        gate.touch()
        for proc in (follower, launch):
            if proc.poll() is None:
                proc.kill()


def test_logs_follow_of_a_task_killed_outright_ends(tmp_path, task_project):
    """SIGKILL (the OOM killer): the job script's trap cannot write the exit record;
    the local runner, which saw the task end, writes it, and the follower stops."""
    launch, follower, gate = follow_gated_local_task(tmp_path, task_project, "oom", {"KILL_TASK": "0"})
    try:
        gate.touch()
        stdout, stderr = follower.communicate(timeout=120)
        assert follower.returncode == 0, stderr
        assert stdout.splitlines()[-1] == "lxm3-exit: task 0 status 137", stdout
        launch.wait(120)
    finally:
        for proc in (follower, launch):
            if proc.poll() is None:
                proc.kill()


def test_logs_follow_ends_when_the_launch_running_the_task_is_killed(tmp_path, task_project):
    """The launch itself is killed (-9): no exit record will ever come, nothing will
    be written; the follower notices that no lxm3 process writes the log, and stops."""
    launch, follower, gate = follow_gated_local_task(tmp_path, task_project, "gone", {})
    try:
        time.sleep(1)
        assert follower.poll() is None, ("stopped following a running task", follower.communicate())
        launch.kill()
        launch.wait(120)
        stdout, stderr = follower.communicate(timeout=120)
        assert follower.returncode == 0, stderr
        assert not EXIT_LINE.search(stdout)
    finally:
        gate.touch()  # the orphaned task goes on to its end
        if follower.poll() is None:
            follower.kill()


def test_status_of_a_running_local_launch_shows_tasks_that_ended(tmp_path, task_project):
    """The exit record in a local task's log tells ``status`` it ended, before the
    launch that runs it has recorded anything."""
    gate = tmp_path / "gate"
    launcher = write_launcher(tmp_path / "partly", {
        "title": "partly", "project": task_project,
        "units": [local_unit(2, task_env=lambda i: {"GATE": str(gate)} if i == 1 else {"CODES": '{"0": 4}'})]})
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    got = None
    try:
        deadline = time.monotonic() + 120
        while True:
            new = [n for n in record_files() if n not in before]
            status = status_json(new[0][:-5]) if recorded_units(new) else {"work_units": {}}
            got = states(status) if "1" in status["work_units"] else None
            if got == [("failed", 4), ("running", None)]:
                break
            assert launch.poll() is None, launch.communicate()
            assert time.monotonic() < deadline, f"task 0 is not shown as ended: {got}"
            time.sleep(0.5)
        gate.touch()
        assert launch.wait(120) == 1
    finally:
        gate.touch()
        if launch.poll() is None:
            launch.kill()


def test_logs_follow_of_a_queued_local_task_shows_all_it_writes(tmp_path, task_project):
    """Followed before it starts (one task at a time; task 0 holds the slot), task 1's
    log appears later and is shown from its first line, as ``tail -F`` does."""
    gate = tmp_path / "gate"
    spec = {"title": "queued", "project": task_project,
            "units": [local_unit(2, task_env=lambda i: {"GATE": str(gate)} if i == 0 else
                                 {"LINES": "40", "EVERY": "0"})]}
    spec["units"][0]["options"] = {"max_parallel_tasks": 1}
    launcher = write_launcher(tmp_path / "queued", spec)
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    follower = None
    try:
        xid, units = wait_first_task_log(launch, before)  # task 1 waits in the queue
        assert not os.path.exists(units[0]["log_paths"][1])
        follower = lxm3_popen("logs", xid, "--task", "1", "-f", "-n", "2",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Task 1 starts only once the follower has said it waits for it.
        read_lines(follower, 1, r"lxm3: waiting for the task to start \(.* does not exist yet\)",
                   timeout=120, stream="stderr")
        gate.touch()
        stdout, stderr = follower.communicate(timeout=120)
        assert follower.returncode == 0, stderr
        assert stdout.splitlines() == ['task 1 argv=["--seed=1"]', *[f"line {i} of task 1" for i in range(40)],
                                       "task 1 done", "", "lxm3-exit: task 1 status 0"]
        assert launch.wait(120) == 0
    finally:
        gate.touch()
        for proc in (follower, launch):
            if proc is not None and proc.poll() is None:
                proc.kill()
