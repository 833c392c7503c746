"""``lxm3 status``/``logs``/``cancel``/``list``, ``launch --dry-run`` and the xm unit
API on the test bed's Slurm and Grid Engine, reached over SSH as the test user.

Launches are real ``python -m lxm3 launch`` runs (see conftest.LXMTASK_LAUNCHER)
of the task program conftest.LXMTASK_MAIN. Tasks that should stay pending or
running wait for a gate file that the test creates when they may end, so that
"while running" is not a race. The Slurm of the test bed has no accounting
(``sacct`` fails), so its states come from ``squeue`` and the exit record each
task leaves at the end of its log; Grid Engine forgets a job as soon as it ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict

import pytest
from status_workspace import (
    DEADLINE,
    Workspace,
    all_tasks,
    job_ids,
    settled,
    task_job,
    wait_status,
    workspaces,
)

import lxm3
from lxm3 import xm

from conftest import (
    experiments_dir,
    lxm3_cli,
    lxm3_popen,
    processes_mentioning,
    read_lines,
    record_files,
    states,
    status_json,
    wait_no_processes,
)

pytestmark = pytest.mark.testbed

@pytest.fixture
def workspace(task_project):
    """``make(scheduler)`` -> a Workspace (after require_testbed), cleaned up after."""
    with workspaces(task_project) as make:
        yield make



# --- status, logs and list on a sweep -------------------------------------------


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_status_while_running_and_after_completion(workspace, scheduler):
    ws = workspace(scheduler)
    if scheduler == "slurm":  # what this test is about: no accounting to ask
        assert ws.tb.ssh(["sacct", "-n"], check=False).returncode != 0
    proc, record = ws.launch([ws.unit(3, {"GATE": ws.gate("sweep"), "CODES": '{"1": 3}',
                                          "LINES": "2", "EVERY": "0.1"})])
    xid = record["experiment_id"]
    [job] = job_ids(record)
    assert record["status"] == "launched"
    [unit] = record["work_units"]
    assert (unit["cluster"], unit["executor"], unit["scheduler"]) == (
        ws.cluster, ws.executor, scheduler)
    assert unit["arrays"] == [{"job_id": job, "first_task": 0, "count": 3}]
    assert unit["log_directory"].startswith(ws.staging_path + "/")
    assert unit["script"] == f"{ws.staging_path}/experiments/{xid}/wu1/job.sh"
    assert unit["archive"].startswith(f"{ws.staging_path}/archives/lxmtask_project-")
    assert os.path.isfile(unit["script"]) and os.path.isfile(unit["archive"])  # (this machine)
    assert [t["args"] for t in unit["tasks"]] == [[f"--seed={i}"] for i in range(3)]
    assert unit["tasks"][0]["env"]["CODES"] == '{"1": 3}'
    assert unit["connection"]["server"] == ws.server

    # While the tasks wait at the gate: pending or running, never finished.
    status = wait_status(xid, lambda s: any(t["state"] == "running" for t in all_tasks(s)),
                         "a running task")
    assert all(t["state"] in ("pending", "running") and t["exit_code"] is None
               for t in all_tasks(status)), status
    assert [t["job"] for t in all_tasks(status)] == [task_job(scheduler, job, i) for i in range(3)]
    shown = lxm3_cli("status", str(xid))
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"work unit 1 on {ws.cluster} \({ws.executor}\) jobs {re.escape(job)}: submitted; "
                     r"3 task\(s\): .*running", shown.stdout), shown.stdout

    ws.open_gate("sweep")
    status = wait_status(xid, settled, "the tasks to end")
    assert states(status) == [("completed", 0), ("failed", 3), ("completed", 0)]
    assert status["work_units"]["1"]["counts"] == {"completed": 2, "failed": 1}

    shown = lxm3_cli("status", str(xid))
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"3 task\(s\): 2 completed, 1 failed", shown.stdout), shown.stdout
    assert "  task 1: failed exit 3" in shown.stdout
    table = [line.split() for line in lxm3_cli("status", str(xid), "1").stdout.splitlines()]
    assert ["1", task_job(scheduler, job, 1), "failed", "3"] in table, table

    # logs: the end of task 1's own log.
    proc = lxm3_cli("logs", str(xid), "--task", "1", "-n", "50")
    assert proc.returncode == 0, proc.stderr
    assert 'task 1 argv=["--seed=1"]' in proc.stdout
    assert "line 1 of task 1" in proc.stdout and "task 1 done" in proc.stdout
    assert "task 0" not in proc.stdout and "task 2" not in proc.stdout
    proc = lxm3_cli("logs", str(xid), "1", "--task", "2", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "task 2 argv" not in proc.stdout

    # list: where it ran, how much, in what state: status found every task ended,
    # one of them failed, so the experiment no longer reads "launched".
    listing = lxm3_cli("list").stdout.splitlines()
    [row] = [line for line in listing if line.startswith(str(xid))]
    assert re.search(rf"{re.escape(ws.title)}\s+{ws.cluster} \({ws.executor}\)\s+1\s+3\s+failed$",
                     row), row
    [entry] = [e for e in json.loads(lxm3_cli("list", "--json").stdout)
               if e["experiment_id"] == xid]
    assert (entry["title"], entry["work_units"], entry["tasks"], entry["status"]) == (
        ws.title, 1, 3, "failed")
    assert ws.cluster in json.dumps(entry), f"list --json does not say where it ran: {entry}"


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_status_and_logs_of_a_sweep_split_into_arrays(workspace, scheduler):
    """Past the array limit a sweep is several jobs; tasks keep their own index."""
    ws = workspace(scheduler)
    limit = {"slurm": ws.tb.slurm_max_array_size, "sge": ws.tb.sge_max_aj_tasks,
             "pbs": ws.tb.pbs_max_array_size}[scheduler]
    num_tasks = limit + 1
    last = num_tasks - 1
    _, record = ws.launch([ws.unit(num_tasks, {"CODES": json.dumps({"4": 4, str(last): 9})})])
    xid = record["experiment_id"]
    [unit] = record["work_units"]
    first_job, second_job = job_ids(record)
    assert unit["arrays"] == [{"job_id": first_job, "first_task": 0, "count": limit},
                              {"job_id": second_job, "first_task": limit, "count": 1}]
    status = wait_status(xid, settled, "the tasks to end")
    expected = [("completed", 0)] * num_tasks
    expected[4], expected[last] = ("failed", 4), ("failed", 9)
    assert states(status) == expected
    tasks = status["work_units"]["1"]["tasks"]
    assert tasks[4]["job"] == task_job(scheduler, first_job, 4)
    assert tasks[last]["job"] == task_job(scheduler, second_job, 0)
    proc = lxm3_cli("logs", str(xid), "--task", str(last))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f'task {last} argv=["--seed={last}"]'


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_status_keeps_the_work_units_of_an_experiment_apart(workspace, scheduler):
    """Task 0 of work unit 1 and task 0 of work unit 2 are different tasks."""
    ws = workspace(scheduler)
    _, record = ws.launch([ws.unit(1, {"CODES": '{"0": 0}'}), ws.unit(1, {"CODES": '{"0": 5}'}),
                           ws.unit(2, {"CODES": '{"1": 7}'})])
    xid = record["experiment_id"]
    status = wait_status(xid, settled, "the tasks to end")
    assert states(status, 1) == [("completed", 0)]
    assert states(status, 2) == [("failed", 5)]
    assert states(status, 3) == [("completed", 0), ("failed", 7)]
    assert states(status_json(xid, "2"), 2) == [("failed", 5)]


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_task_killed_without_a_chance_to_say_so_is_failed(workspace, scheduler):
    """A task killed outright (as by the OOM killer) leaves no exit record; it did
    not complete, and Grid Engine's accounting (qacct) knows its exit status."""
    ws = workspace(scheduler)
    _, record = ws.launch([ws.unit(2, {"KILL_TASK": "1"})])
    xid = record["experiment_id"]
    status = wait_status(xid, settled, "the tasks to end")
    [(state0, code0), (state1, code1)] = states(status)
    assert (state0, code0) == ("completed", 0)
    assert state1 == "failed", status
    if scheduler in ("sge", "pbs"):  # qacct -j: exit_status 137; PBS: Exit_status 265 (256 + KILL)
        assert code1 == 137, status


# --- cancel ------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_cancel_one_work_unit_then_the_experiment(workspace, scheduler):
    ws = workspace(scheduler)
    _, record = ws.launch([ws.unit(1, {"GATE": ws.gate("one")}),
                           ws.unit(1, {"GATE": ws.gate("two")})])
    xid = record["experiment_id"]
    [job1], [job2] = job_ids(record, 1), job_ids(record, 2)
    wait_status(xid, lambda s: all(t["state"] in ("pending", "running") for t in all_tasks(s)),
                "both units to be queued")

    proc = lxm3_cli("cancel", str(xid), "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cancelled job(s) {job2}"
    ws.wait_gone([job2])
    assert job1 in ws.queued([job1, job2])  # the other unit is untouched
    status = wait_status(xid, lambda s: settled({"work_units": {"2": s["work_units"]["2"]}}),
                         "work unit 2 to end")
    assert [s for s, _ in states(status, 2)] == ["cancelled"]
    assert [s for s, _ in states(status, 1)] in (["pending"], ["running"])
    shown = lxm3_cli("status", str(xid), "2")
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"^0\s+{re.escape(task_job(scheduler, job2, 0))}\s+cancelled",
                     shown.stdout, re.M), shown.stdout

    # Later, the whole experiment: the unit cancelled before is no reason to fail.
    proc = lxm3_cli("cancel", str(xid))
    assert proc.returncode == 0, f"lxm3 cancel exited {proc.returncode}: {proc.stderr}"
    assert job1 in proc.stdout
    ws.wait_gone([job1])
    status = wait_status(xid, settled, "work unit 1 to end")
    assert [s for s, _ in states(status, 1)] == ["cancelled"]
    assert [s for s, _ in states(status, 2)] == ["cancelled"]


# --- logs -f ----------------------------------------------------------------------


@pytest.fixture
def short_tmpdir():
    """A TMPDIR for ``lxm3 logs -f``, short enough for ssh's control socket path."""
    path = tempfile.mkdtemp(prefix="lxm3-f-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def follow_running_task(ws: Workspace, tmpdir: str):
    """Launch a task that prints a few lines 0.4 s apart, then waits quietly for a
    gate the test never opens; start ``lxm3 logs -f`` on it and check that lines
    stream while the task runs. Returns the follower (still running) and the record.

    The log then stays quiet: a ``tail`` left on the cluster by a stopped follower
    would wait there for a write that never comes (a remote tail learns that
    nobody reads only when it writes), so the tests below see it."""
    _, record = ws.launch([ws.unit(1, {"GATE": ws.gate("follow"), "LINES": "3",
                                       "EVERY": "0.4", "HOLD": ws.gate("never")})])
    xid = record["experiment_id"]
    wait_status(xid, lambda s: states(s) == [("running", None)], "the task to run")
    follower = lxm3_popen("logs", str(xid), "-f", "-n", "3", env={"TMPDIR": tmpdir},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    try:
        [(_, first)] = read_lines(follower, 1, r"task 0 argv=.*", timeout=120)
        assert first == 'task 0 argv=["--seed=0"]'
        ws.open_gate("follow")
        streamed = read_lines(follower, 3, r"line \d+ of task 0", timeout=120)
    except BaseException:
        follower.kill()
        follower.wait()
        raise
    # The task cannot end (it waits for the gate "never"): these lines were streamed.
    numbers = [int(text.split()[1]) for _, text in streamed]
    assert numbers == list(range(numbers[0], numbers[0] + 3)), streamed
    return follower, record


def stop_leftovers(tmpdir: str) -> None:
    """Terminate what a test's ``lxm3 logs -f`` left behind (ids found by its TMPDIR)."""
    for pid in processes_mentioning(tmpdir):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_logs_follow_streams_a_running_task_until_ctrl_c(workspace, short_tmpdir):
    ws = workspace("slurm")
    tmpdir = short_tmpdir
    follower, record = follow_running_task(ws, tmpdir)
    try:
        os.killpg(follower.pid, signal.SIGINT)
        assert follower.wait(60) == 130
        left = wait_no_processes(tmpdir, 60)
        assert left == {}, f"still running after Ctrl-C: {left}"
        log_dir = record["work_units"][0]["log_directory"]
        assert wait_no_processes(log_dir, 60) == {}, "something still follows the log"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        stop_leftovers(tmpdir)


def test_logs_follow_leaves_nothing_running_when_terminated(workspace, short_tmpdir):
    """``timeout 60 lxm3 logs -f``, a closed terminal or a supervisor's kill send
    SIGTERM: the ssh connection lxm3 opened must not outlive it."""
    ws = workspace("slurm")
    tmpdir = short_tmpdir
    follower, record = follow_running_task(ws, tmpdir)
    try:
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(60)
        left = wait_no_processes(tmpdir, 60)
        assert left == {}, f"still running 60 s after lxm3 logs -f was terminated: {left}"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        stop_leftovers(tmpdir)


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_logs_follow_streams_and_ends_with_the_task(workspace, scheduler):
    """PBS included: it copies -o files back only when a job ends, unless told to
    write them in place (-k oed), which lxm3 does."""
    ws = workspace(scheduler)
    _, record = ws.launch([ws.unit(1, {"GATE": ws.gate("follow"), "LINES": "2", "EVERY": "0"})])
    xid = str(record["experiment_id"])
    wait_status(int(xid), lambda s: states(s) == [("running", None)], "the task to run")
    follower = lxm3_popen("logs", xid, "-f", "-n", "5", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        read_lines(follower, 1, r"task 0 argv=.*", timeout=120)
        time.sleep(1)
        assert follower.poll() is None, ("stopped following a running task", follower.communicate())
        ws.open_gate("follow")
        stdout, stderr = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
    assert follower.returncode == 0, stderr
    assert stdout.splitlines()[-3:] == ["task 0 done", "", "lxm3-exit: task 0 status 0"]
    # Finished: -f shows the end and returns at once, also with -n 0.
    proc = lxm3_cli("logs", xid, "-f", "-n", "2", timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "\nlxm3-exit: task 0 status 0\n"), proc.stderr
    proc = lxm3_cli("logs", xid, "-f", "-n", "0", timeout=120)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    # Nothing is left following the log on the cluster.
    log_dir = record["work_units"][0]["log_directory"]
    assert wait_no_processes(log_dir, 60) == {}


# --- failed and partial launches -----------------------------------------------------


def test_rejected_and_partial_launches_are_recorded(workspace):
    ws = workspace("slurm")
    # The node has 2 CPUs: sbatch refuses 3 (EnforcePartLimits), nothing is submitted.
    proc, record = ws.launch([ws.unit(1, cpu=3)], expect_rc=1)
    assert record["status"] == "failed"
    assert "sbatch" in record["error"] and "Nothing was submitted" in record["error"]
    [unit] = record["work_units"]
    assert unit["arrays"] == [] and unit["state"] == "not submitted"
    shown = lxm3_cli("status", str(record["experiment_id"]))
    assert shown.returncode == 0, shown.stderr
    assert "failed" in shown.stdout and "Nothing was submitted" in shown.stdout
    assert "nothing to cancel" in lxm3_cli("cancel", str(record["experiment_id"])).stdout

    # Work unit 1 is accepted, work unit 2 refused: a partial launch.
    proc, record = ws.launch([ws.unit(1, {"GATE": ws.gate("partial")}), ws.unit(1, cpu=3)],
                             expect_rc=1)
    xid = record["experiment_id"]
    assert record["status"] == "partial"
    [job] = job_ids(record)
    assert f"Already submitted: work unit 1 task 0 (job {job})" in record["error"]
    units = {u["id"]: u for u in record["work_units"]}
    assert units[1]["state"] == "submitted" and units[2]["state"] == "not submitted"
    assert job in ws.queued([job])
    listing = lxm3_cli("list").stdout
    assert re.search(rf"^{xid}\s.*\s2\s+2\s+partial$", listing, re.M), listing
    proc = lxm3_cli("cancel", str(xid))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cancelled job(s) {job}"
    ws.wait_gone([job])


# --- launch --dry-run ----------------------------------------------------------------


STUB = """#!/bin/sh
echo "$0 $*" >> {calls}
echo "dry run test: $0 must not be called" >&2
exit 1
"""


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_dry_run_writes_scripts_and_reaches_nothing(workspace, scheduler, tmp_path):
    ws = workspace(scheduler)
    # ssh, rsync and the schedulers' commands on this machine record any call and fail.
    bindir, calls = tmp_path / "bin", tmp_path / "calls"
    bindir.mkdir()
    for name in ("ssh", "scp", "rsync", "sbatch", "qsub", "squeue", "qstat"):
        (bindir / name).write_text(STUB.format(calls=calls))
        (bindir / name).chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    proc, _ = ws.launch([ws.unit(3, {"OUT": str(out)})], dry_run=True, env=env)

    assert not calls.exists(), calls.read_text()
    assert not os.path.exists(ws.staging_path)  # nothing was created on the cluster
    assert ws.tb.ssh(["test", "-e", ws.staging], check=False).returncode == 1
    assert record_files() == []  # nothing was launched: no record
    assert not os.path.exists(experiments_dir())
    prefix = re.sub(r"\W", "_", ws.title)
    assert [n for n in ws.job_names() if n.startswith(prefix)] == []

    match = re.search(r"dry run: job scripts are written to (\S+);", proc.stderr)
    assert match, proc.stderr
    folder = match.group(1)
    assert folder.startswith(str(tmp_path))
    tree = os.path.join(folder, ws.cluster)
    [xid] = os.listdir(os.path.join(tree, "experiments"))
    unit_dir = os.path.join(tree, "experiments", xid, "wu1")
    with open(os.path.join(unit_dir, "job.sh")) as f:
        script = f.read()
    job_name = f"{prefix}_{xid}_1"
    if scheduler == "slurm":
        assert f"#SBATCH --job-name={job_name}" in script
    elif scheduler == "pbs":
        assert re.search(rf"^#PBS -N {job_name}$", script, re.M), script
    else:
        assert re.search(rf"^#\$ -N {job_name}$", script, re.M), script
    with open(os.path.join(unit_dir, "tasks")) as f:
        assert len(f.read().splitlines()) == 1 + 3
    [archive] = os.listdir(os.path.join(tree, "archives"))
    assert archive.startswith("lxmtask_project-") and archive.endswith(".zip")

    stdout = proc.stdout
    target = f"{ws.tb.ssh_user}@{ws.server}"
    assert f"[dry run] {ws.cluster}: would copy {tree}/ to {target}:~/{ws.staging}/" in stdout, stdout
    assert f"archives/{archive}" in stdout
    submit = [line for line in stdout.splitlines() if "job.sh" in line]
    assert len(submit) == 1, stdout
    if scheduler == "slurm":
        assert "sbatch --parsable --array=0-2" in submit[0], submit
    elif scheduler == "pbs":
        assert "qsub -J 0-2 -k oed -o " in submit[0] and "LXM_FIRST_TASK=0 " in submit[0], submit
    else:
        assert "qsub -terse -t 1-3" in submit[0], submit
    assert f"{ws.staging}/experiments/{xid}/wu1/job.sh" in submit[0]
    assert not out.exists() or os.listdir(out) == []  # no task ran anywhere


# --- the xm API ---------------------------------------------------------------------


def launch_in_process(ws: Workspace, title: str, num_tasks: int, env: Dict[str, str]):
    """An experiment launched with the xm API in this process; returns it."""
    experiment = lxm3.create_experiment(f"{ws.title} {title}", config=ws.config_object())
    with experiment:
        executor = getattr(lxm3, ws.executor)()
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("lxmtask.main"), path=ws.project)
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{"seed": i} for i in range(num_tasks)],
                                     env_vars=[env]))
    return experiment


def wait_until_complete(unit):
    """``await unit.wait_until_complete()``, with a deadline."""
    async def wait():
        return await asyncio.wait_for(unit.wait_until_complete(), DEADLINE)

    return asyncio.run(wait())


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_xm_unit_api(workspace, scheduler, monkeypatch):
    ws = workspace(scheduler)
    monkeypatch.setenv("LXM_POLL_INTERVAL", "1")
    # The test bed has 2 slots: the gated tasks take them, the others wait their turn.
    failing = launch_in_process(ws, "failing", 2, {"GATE": ws.gate("failing"),
                                                   "CODES": '{"1": 3}'})
    stopped = launch_in_process(ws, "stopped", 1, {"GATE": ws.gate("never")})
    quick = launch_in_process(ws, "quick", 1, {})

    # A submitted unit: its status and its jobs.
    unit = failing.work_units[1]
    status = unit.get_status()
    assert status.is_active and not status.is_completed and not status.is_failed
    assert {t.state for t in status.tasks} <= {"pending", "running"}
    [job] = unit.job_ids
    [launched] = unit.launched_jobs
    assert isinstance(launched, xm.LaunchedJob)
    assert launched.address == f"{ws.cluster}:{job}"
    assert launched.logs == unit.log_directory
    assert launched.name == re.sub(r"\W", "_", f"{ws.title} failing_{failing.experiment_id}_1")
    assert [j.address for j in lxm3.get_experiment(failing.experiment_id)
            .work_units[1].launched_jobs] == [launched.address]

    # stop(): the job is cancelled, and the unit reads so, live and from its record.
    stopped_unit = stopped.work_units[1]
    [stopped_job] = stopped_unit.job_ids
    stopped_unit.stop()
    ws.wait_gone([stopped_job])
    deadline = time.monotonic() + DEADLINE
    while stopped_unit.get_status().is_active:
        assert time.monotonic() < deadline, stopped_unit.get_status().tasks
        time.sleep(1)
    assert [t.state for t in stopped_unit.get_status().tasks] == ["cancelled"]
    stopped_status = lxm3.get_experiment(stopped.experiment_id).work_units[1].get_status()
    assert [t.state for t in stopped_status.tasks] == ["cancelled"]
    assert not stopped_status.is_active and not stopped_status.is_completed

    # A failing unit, waited for from its record.
    ws.open_gate("failing")
    loaded = lxm3.get_experiment(failing.experiment_id).work_units[1]
    with pytest.raises(xm.ExperimentUnitFailedError,
                       match=r"^2 task\(s\): 1 completed, 1 failed$"):
        wait_until_complete(loaded)
    status = loaded.get_status()
    assert [(t.state, t.exit_code) for t in status.tasks] == [("completed", 0), ("failed", 3)]
    assert status.is_failed and not status.is_active

    # A completing unit, waited for from its record and live.
    loaded = lxm3.get_experiment(quick.experiment_id).work_units[1]
    assert wait_until_complete(loaded) is loaded
    assert loaded.get_status().is_completed
    assert wait_until_complete(quick.work_units[1]) is quick.work_units[1]

    # xm.ExperimentUnitStatus: "A unit stopped by the user is neither active,
    # completed nor failed."
    assert not stopped_status.is_failed, f"a stopped unit reads as failed: {stopped_status.message}"


def test_a_unit_queued_for_submission_is_pending_not_failed(workspace):
    """Cluster jobs are submitted when the experiment block ends; until then the
    unit has not failed (the XManager pattern ``await unit.wait_until_complete()``
    inside the block relies on it)."""
    ws = workspace("slurm")
    experiment = lxm3.create_experiment(f"{ws.title} queued", config=ws.config_object())
    with experiment:
        executor = lxm3.Slurm()
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("lxmtask.main"), path=ws.project)
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{"seed": 0}, {"seed": 1}], env_vars=[{}]))
        queued = experiment.work_units[1].get_status()
    assert experiment.work_units[1].job_ids  # submitted when the block ended
    assert not queued.is_failed, f"a unit waiting to be submitted reads as failed: {queued.message!r}"
    assert queued.is_active
    assert [t.state for t in queued.tasks] == ["pending", "pending"]
