"""``lxm3 rerun``: run failed (or chosen) tasks of a work unit again.

On the test bed's Slurm and Grid Engine, reached over SSH as the test user:
launches are real ``python -m lxm3 launch`` runs of LXMTASK_LAUNCHER (conftest)
with the task program RERUN_MAIN below, which fails with the code ``$CODES``
gives its task until the file ``$FIXED`` exists (the "bug" is fixed), and
writes the LXM_RERUN it saw into ``$OUT``. The test bed's array limits are
small (Slurm MaxArraySize=11: indices 0-10; Grid Engine max_aj_tasks=10), so
task ids above 10 need offsets and splits. Local work units run their tasks
again on this machine (no test bed). The unit tests at the end plan index
lists without a test bed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any, Dict, List

import pytest
from status_workspace import (
    Workspace,
    all_tasks,
    job_ids,
    settled,
    task_job,
    wait_status,
    workspaces,
)

import lxm3

from conftest import (
    PYPROJECT,
    error_line,
    interrupt_when,
    launch_local,
    local_unit,
    lxm3_cli,
    lxm3_popen,
    new_record_id,
    read_record,
    record_files,
    status_json,
    wait_until,
    write_files,
    write_launcher,
)

RERUN_MAIN = """\
    import json, os, sys, time
    task = os.environ.get("LXM_TASK_ID")
    rerun = os.environ.get("LXM_RERUN", "-")
    print("task %s rerun=%s argv=%s" % (task, rerun, json.dumps(sys.argv[1:])), flush=True)
    deadline = time.time() + 300
    gate = os.environ.get("GATE")
    while gate and not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.2)
    out = os.environ.get("OUT")
    if out:  # one report per attempt
        with open(os.path.join(out, "task-%s-rerun-%s" % (task, rerun)), "w") as f:
            json.dump({"argv": sys.argv[1:], "rerun": rerun, "attempt": os.environ.get("LXM_ATTEMPT")}, f)
    fixed = os.environ.get("FIXED")
    if fixed and os.path.exists(fixed):
        sys.exit(0)
    sys.exit(int(json.loads(os.environ.get("CODES") or "{}").get(task, 0)))
"""


@pytest.fixture(scope="session")
def rerun_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerunapp")
    os.chmod(str(root), 0o755)
    return write_files(root / "rerun_project", {
        "pyproject.toml": PYPROJECT.format(name="lxmtask"),
        "lxmtask/__init__.py": "",
        "lxmtask/main.py": RERUN_MAIN,
    })  # fmt: skip


@pytest.fixture
def workspace(rerun_project):
    """``make(scheduler)`` -> a Workspace (after require_testbed), cleaned up after."""
    with workspaces(rerun_project) as make:
        yield make


def unit_of(xid: int) -> Dict[str, Any]:
    [unit] = read_record(xid)["work_units"]
    return unit


def log_names(ws: Workspace, log_dir: str) -> List[str]:
    return ws.tb.ssh(["ls", "-1", "--", log_dir]).stdout.split()


def log_name(ws: Workspace, job_name: str, job_id: str, index: int) -> str:
    """The file the scheduler writes array index ``index`` (0-based) of ``job_id`` to."""
    if ws.scheduler == "slurm":
        return f"{job_name}-{job_id}_{index}.log"
    if ws.scheduler == "pbs":  # -o <log dir>/: PBS names it by the task's job id
        return f"{job_id.replace('[]', f'[{index}]')}.OU"
    return f"{job_name}-{job_id}.{index + 1}.log"


def attempts(status: Dict[str, Any]) -> List[int]:
    return [t["attempts"] for t in all_tasks(status)]


# --- on the test bed -------------------------------------------------------------


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_rerun_failed_resubmits_exactly_the_failed_tasks(workspace, scheduler):
    ws = workspace(scheduler)
    out = os.path.join(ws.root, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)
    _, record = ws.launch([ws.unit(4, {"CODES": '{"1": 3, "3": 4}', "FIXED": ws.gate("fixed"), "OUT": out})])
    xid = record["experiment_id"]
    [launch_job] = job_ids(record)
    status = wait_status(xid, settled, "the launch's tasks to end")
    assert [(t["state"], t["exit_code"]) for t in all_tasks(status)] == [
        ("completed", 0), ("failed", 3), ("completed", 0), ("failed", 4)]
    assert attempts(status) == [1, 1, 1, 1]
    unit = unit_of(xid)
    archives = ws.tb.ssh(["stat", "-c", "%n %Y %i", "--", *ws.tb.ssh(
        ["sh", "-c", f"ls -1d {ws.staging}/archives/*"]).stdout.split()]).stdout

    ws.open_gate("fixed")  # the "bug" is fixed: reruns succeed
    proc = lxm3_cli("rerun", str(xid))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"work unit 1: resubmitted 2 tasks \(1, 3\) as job", proc.stdout), proc.stdout
    assert re.search(r"rerunning 2 tasks \(1, 3; attempt 2\)", proc.stderr), proc.stderr
    # Nothing was packaged or copied: the staged archive is the launch's, untouched.
    assert "rsync" not in proc.stderr and "copied" not in proc.stderr.lower(), proc.stderr
    assert ws.tb.ssh(["stat", "-c", "%n %Y %i", "--", *ws.tb.ssh(
        ["sh", "-c", f"ls -1d {ws.staging}/archives/*"]).stdout.split()]).stdout == archives

    rerun_unit = unit_of(xid)
    launch_array, *reruns = rerun_unit["arrays"]
    assert launch_array == {"job_id": launch_job, "first_task": 0, "count": 4}
    if scheduler == "slurm":  # one array, indices 0 and 2 from offset 1
        [rerun] = reruns
        assert {k: v for k, v in rerun.items() if k != "job_id"} == {
            "first_task": 1, "count": 2, "tasks": "1,3", "attempt": 2}
        expected_logs = [log_name(ws, unit["job_name"], rerun["job_id"], i) for i in (0, 2)]
    else:  # -t / -J take one range: one array per task here
        assert [{k: v for k, v in r.items() if k != "job_id"} for r in reruns] == [
            {"first_task": 1, "count": 1, "tasks": "1", "attempt": 2},
            {"first_task": 3, "count": 1, "tasks": "3", "attempt": 2}]
        expected_logs = [log_name(ws, unit["job_name"], r["job_id"], 0) for r in reruns]
    assert rerun_unit["state"] == "submitted"

    status = wait_status(xid, settled, "the rerun tasks to end")
    assert [(t["state"], t["exit_code"]) for t in all_tasks(status)] == [("completed", 0)] * 4
    assert attempts(status) == [1, 2, 1, 2]
    assert status["work_units"]["1"]["counts"] == {"completed": 4}  # tasks, not attempts
    assert [t["job"] for t in all_tasks(status)][0] == task_job(scheduler, launch_job, 0)
    names = log_names(ws, unit["log_directory"])
    assert set(expected_logs) <= set(names), names
    assert len(names) == 6  # 4 of the launch, 2 of the rerun: every attempt keeps its log

    # The tasks saw LXM_RERUN=1 (one earlier submission); the launch's saw none.
    assert sorted(os.listdir(out)) == sorted(
        ["task-0-rerun--", "task-1-rerun--", "task-2-rerun--", "task-3-rerun--",
         "task-1-rerun-1", "task-3-rerun-1"])
    with open(os.path.join(out, "task-3-rerun-1")) as f:
        assert json.load(f)["argv"] == ["--seed=3"]  # its original arguments

    # logs shows the latest attempt; status XID WID counts attempts.
    proc = lxm3_cli("logs", str(xid), "--task", "3")
    assert proc.returncode == 0, proc.stderr
    assert 'task 3 rerun=1 argv=["--seed=3"]' in proc.stdout
    table = [line.split() for line in lxm3_cli("status", str(xid), "1").stdout.splitlines()]
    assert ["TASK", "JOB", "STATE", "EXIT", "ATTEMPTS"] in table
    assert ["3", task_job(scheduler, reruns[-1]["job_id"], 2 if scheduler == "slurm" else 0),
            "completed", "0", "2"] in table, table
    assert read_record(xid)["status"] == "completed"

    # Nothing failed any more: nothing to rerun (from Python as well).
    proc = lxm3_cli("rerun", str(xid), "--failed")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("nothing to rerun")
    assert lxm3.get_experiment(xid).work_units[1].rerun(failed=True) == []
    assert len(unit_of(xid)["arrays"]) == len(rerun_unit["arrays"])


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_rerun_tasks_above_the_array_limit_split_and_offset(workspace, scheduler):
    ws = workspace(scheduler)
    limit = {"slurm": ws.tb.slurm_max_array_size, "sge": ws.tb.sge_max_aj_tasks,
             "pbs": ws.tb.pbs_max_array_size}[scheduler]
    assert limit == (11 if scheduler == "slurm" else 10), "the expectations below assume these limits"
    out = os.path.join(ws.root, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)
    _, record = ws.launch([ws.unit(25, {"OUT": out}, max_parallel_tasks=4)])
    xid = record["experiment_id"]
    wait_status(xid, settled, "the launch's tasks to end")
    chosen = [3, *range(12, 25)]

    # From Python: the arrays submitted come back.
    arrays = lxm3.get_experiment(xid).work_units[1].rerun(tasks=chosen)
    got = [(a.first_task, a.tasks, a.attempt) for a in arrays]
    if scheduler == "slurm":  # indices below 11: 3 -> 0, 12 -> 9, 13 -> 10; then 14.. from 0
        assert got == [(3, "3,12-13", 2), (14, "14-24", 2)]
    else:  # one range each, at most 10 tasks (Grid Engine -t, PBS -J)
        assert got == [(3, "3", 2), (12, "12-21", 2), (22, "22-24", 2)]
    assert all(a.job_id for a in arrays)
    status = wait_status(xid, settled, "the rerun tasks to end", timeout=300)
    assert [t["state"] for t in all_tasks(status)] == ["completed"] * 25
    assert attempts(status) == [2 if t in chosen else 1 for t in range(25)]
    unit = unit_of(xid)
    names = set(log_names(ws, unit["log_directory"]))
    for array in arrays:
        for task in array.task_ids():
            assert log_name(ws, unit["job_name"], array.job_id, task - array.first_task) in names
    assert sorted(f for f in os.listdir(out) if f.endswith("-rerun-1")) == sorted(
        f"task-{t}-rerun-1" for t in chosen)

    # CLI: a list with a run in it; the attempts go on counting.
    proc = lxm3_cli("rerun", str(xid), "1", "--tasks", "13,20-21")
    assert proc.returncode == 0, proc.stderr
    assert "resubmitted 3 tasks (13, 20-21)" in proc.stdout
    status = wait_status(xid, settled, "the second rerun to end", timeout=300)
    assert [all_tasks(status)[t]["attempts"] for t in (12, 13, 20, 21, 0)] == [2, 3, 3, 3, 1]
    assert sorted(f for f in os.listdir(out) if f.endswith("-rerun-2")) == [
        "task-13-rerun-2", "task-20-rerun-2", "task-21-rerun-2"]


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_rerun_refuses_running_tasks_and_tasks_out_of_range(workspace, scheduler):
    ws = workspace(scheduler)
    _, record = ws.launch([ws.unit(3, {"GATE": ws.gate("go"), "CODES": '{"2": 5}'})])
    xid = record["experiment_id"]
    [job] = job_ids(record)
    wait_status(xid, lambda s: any(t["state"] == "running" for t in all_tasks(s)), "a running task")

    proc = lxm3_cli("rerun", str(xid), "1", "--tasks", "0,2")
    assert proc.returncode == 1
    assert re.search(r"lxm3: error: work unit 1: tasks 0, 2 are still pending or running .*nothing was "
                     r"submitted\. Wait for them to end, or cancel them first", proc.stderr), proc.stderr
    assert task_job(scheduler, job, 0) in proc.stderr
    proc = lxm3_cli("rerun", str(xid), "--tasks", "1,3-4")
    assert proc.returncode == 1
    assert "work unit 1 has tasks 0-2; 3-4 are not among them: nothing was submitted" in proc.stderr
    proc = lxm3_cli("rerun", str(xid), "--tasks", "2-1")
    assert proc.returncode == 1 and "is not a list of task ids such as 3,7,12-20" in proc.stderr
    with pytest.raises(lxm3.LaunchError, match="task 1 is still pending or running"):
        lxm3.get_experiment(xid).work_units[1].rerun(tasks=[1])
    assert unit_of(xid)["arrays"] == record["work_units"][0]["arrays"]  # nothing submitted

    ws.open_gate("go")
    wait_status(xid, settled, "the tasks to end")
    proc = lxm3_cli("rerun", str(xid))  # --failed by default: task 2 only
    assert proc.returncode == 0, proc.stderr
    assert "resubmitted 1 task (2)" in proc.stdout
    status = wait_status(xid, settled, "the rerun to end")
    assert [(t["state"], t["exit_code"], t["attempts"]) for t in all_tasks(status)] == [
        ("completed", 0, 1), ("completed", 0, 1), ("failed", 5, 2)]


# --- locally ----------------------------------------------------------------------


def launch_local_sweep(tmp_path, rerun_project, name, env=None, options=None, expect_rc=1):
    """A local sweep of 4 tasks (--seed=i) where tasks 1 and 3 fail (codes 3 and 4)
    until ``fixed`` exists; returns (record, reports directory, fixed)."""
    out, fixed = tmp_path / f"{name}-out", tmp_path / f"{name}-fixed"
    out.mkdir()
    unit = local_unit(4, {"CODES": '{"1": 3, "3": 4}', "OUT": str(out), "FIXED": str(fixed), **(env or {})})
    if options:
        unit["options"] = options
    _, record = launch_local(tmp_path, name, {"title": name, "project": rerun_project, "units": [unit]},
                             expect_rc=expect_rc)
    return record, out, fixed


def reports(out) -> Dict[str, Dict[str, Any]]:
    """The reports of every attempt of every task: ``task-I-rerun-R`` -> what it saw."""
    return {name: json.loads((out / name).read_text()) for name in sorted(os.listdir(str(out)))}


def local_tasks(xid):
    return [(t["state"], t["exit_code"], t["attempts"]) for t in status_json(xid)["work_units"]["1"]["tasks"]]


def test_a_local_rerun_runs_the_failed_tasks_again_here_and_keeps_every_attempt(tmp_path, rerun_project):
    record, out, fixed = launch_local_sweep(tmp_path, rerun_project, "local-rerun", options={"max_parallel_tasks": 2})
    xid = record["experiment_id"]
    assert record["work_units"][0]["max_parallel_tasks"] == 2  # recorded, so a rerun runs as the launch did
    assert "gpus_per_task" not in record["work_units"][0]  # none asked: left out, as older records have it
    assert local_tasks(xid) == [("completed", 0, 1), ("failed", 3, 1), ("completed", 0, 1), ("failed", 4, 1)]
    fixed.write_text("")

    proc = lxm3_cli("rerun", str(xid))
    assert proc.returncode == 0, proc.stderr
    assert "work unit 1: reran 2 tasks (1, 3) here: 2 completed" in proc.stdout
    assert '[1:1] task 1 rerun=1 argv=["--seed=1"]' in proc.stdout  # streamed, as a launch does
    assert "rerunning 2 tasks (1, 3; attempt 2) here" in proc.stderr
    seen = reports(out)
    assert sorted(seen) == ["task-0-rerun--", "task-1-rerun--", "task-1-rerun-1", "task-2-rerun--",
                            "task-3-rerun--", "task-3-rerun-1"]  # exactly the failed ones ran again
    assert seen["task-1-rerun-1"] == {"argv": ["--seed=1"], "rerun": "1", "attempt": "2"}
    assert seen["task-3-rerun-1"] == {"argv": ["--seed=3"], "rerun": "1", "attempt": "2"}
    assert seen["task-1-rerun--"]["attempt"] == "1"
    assert local_tasks(xid) == [("completed", 0, 1), ("completed", 0, 2), ("completed", 0, 1), ("completed", 0, 2)]
    table = lxm3_cli("status", str(xid), "1")
    assert re.search(r"^1\s+-\s+completed\s+0\s+2$", table.stdout, re.MULTILINE), table.stdout
    after = read_record(xid)
    unit = after["work_units"][0]
    assert after["status"] == "completed" and after["error"] is None and unit["state"] == "completed"
    assert unit["attempts"] == {"1": 2, "3": 2}
    assert unit["exit_codes"] == {"0": 0, "1": 0, "2": 0, "3": 0}
    assert os.path.basename(unit["log_paths"][1]) == "task-1.attempt-2.log"
    first = unit["log_paths"][1].replace("task-1.attempt-2.log", "task-1.log")
    with open(first) as f:  # the first attempt's log is kept
        assert "task 1 rerun=-" in f.read()
    logs = lxm3_cli("logs", str(xid), "1", "--task", "1")
    assert logs.returncode == 0, logs.stderr
    assert "task 1 rerun=1" in logs.stdout and "rerun=-" not in logs.stdout  # the latest attempt's

    again = lxm3_cli("rerun", str(xid))
    assert again.returncode == 0 and "nothing to rerun" in again.stdout, again.stderr

    chosen = lxm3_cli("rerun", str(xid), "--tasks", "0,1")  # completed tasks, chosen: run again
    assert chosen.returncode == 0, chosen.stderr
    assert "rerunning 2 tasks (0-1; attempt 2, 3)" in chosen.stderr
    seen = reports(out)
    assert seen["task-0-rerun-1"]["attempt"] == "2" and seen["task-1-rerun-2"]["attempt"] == "3"
    assert "task-2-rerun-1" not in seen and "task-3-rerun-2" not in seen
    assert local_tasks(xid) == [("completed", 0, 2), ("completed", 0, 3), ("completed", 0, 1), ("completed", 0, 2)]

    fixed.unlink()  # the bug is back: the rerun fails, says which task, and exits 1
    failing = lxm3_cli("rerun", str(xid), "1", "--tasks", "3")
    assert failing.returncode == 1, failing.stderr
    assert "work unit 1: reran 1 task (3) here: 0 completed, 1 failed" in failing.stdout
    assert "work unit 1 task 3: exit code 4 (log: " in failing.stdout
    assert local_tasks(xid)[3] == ("failed", 4, 3)
    after = read_record(xid)
    assert after["status"] == "failed" and after["work_units"][0]["state"] == "failed"


def test_a_local_rerun_is_refused_while_the_launch_still_runs(tmp_path, rerun_project):
    gate = tmp_path / "gate"
    out = tmp_path / "running-out"
    out.mkdir()
    launcher = write_launcher(tmp_path / "running", {
        "title": "still running", "project": rerun_project,
        "units": [local_unit(2, {"CODES": '{"1": 3}', "GATE": str(gate), "OUT": str(out)})]})
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(record_files()) > len(before) and read_record(new_record_id(before))["work_units"],
                   240, "the launch to record its work unit")
        xid = new_record_id(before)
        wait_until(lambda: [s for s, _, _ in local_tasks(xid)] == ["running", "running"], 240,
                   "the tasks to run")
        for args in ([], ["1", "--tasks", "0"]):
            proc = lxm3_cli("rerun", str(xid), *args)
            line = error_line(proc)
            assert f"work unit 1 of experiment {xid} is still running on this machine" in line
            assert "nothing was run" in line
        with pytest.raises(lxm3.LaunchError, match="is still running on this machine"):
            lxm3.get_experiment(xid).work_units[1].rerun(tasks=[1])
        gate.write_text("")
        launch.communicate(timeout=240)
    finally:
        gate.write_text("")
        if launch.poll() is None:
            launch.kill()
            launch.communicate()
    assert launch.returncode == 1
    assert sorted(os.listdir(str(out))) == ["task-0-rerun--", "task-1-rerun--"]  # nothing ran twice
    assert local_tasks(xid) == [("completed", 0, 1), ("failed", 3, 1)]


def test_ctrl_c_stops_a_local_rerun_and_records_its_tasks_as_stopped(tmp_path, rerun_project):
    gate = tmp_path / "gate"
    gate.write_text("")  # open at launch
    record, out, _ = launch_local_sweep(tmp_path, rerun_project, "local-stop", env={"GATE": str(gate)})
    xid = record["experiment_id"]
    gate.unlink()  # closed for the rerun: its tasks wait until stopped
    rerun = lxm3_popen("rerun", str(xid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = interrupt_when(rerun, lambda: "task 3 rerun=1" in read_log(xid, 3) and
                                    "task 1 rerun=1" in read_log(xid, 1), "the rerun's tasks to start")
    assert rerun.returncode != 0, (stdout, stderr)
    tasks = status_json(xid)["work_units"]["1"]["tasks"]
    assert [(t["state"], t["attempts"]) for t in tasks] == [
        ("completed", 1), ("cancelled", 2), ("completed", 1), ("cancelled", 2)]
    assert read_record(xid)["work_units"][0]["state"] == "stopped"
    assert not any(name.endswith("rerun-1") for name in os.listdir(str(out)))  # stopped before reporting


def read_log(xid, task):
    path = read_record(xid)["work_units"][0]["log_paths"][task]
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def test_python_api_reruns_a_local_work_unit_in_the_foreground(tmp_path, rerun_project):
    record, out, fixed = launch_local_sweep(tmp_path, rerun_project, "local-api")
    xid = record["experiment_id"]
    fixed.write_text("")
    unit = lxm3.get_experiment(xid).work_units[1]
    results = unit.rerun()
    assert [(r.task_id, r.returncode) for r in results] == [(1, 0), (3, 0)]
    assert all(r.log_path.endswith(f"task-{r.task_id}.attempt-2.log") for r in results)
    assert reports(out)["task-3-rerun-1"]["attempt"] == "2"
    assert unit.rerun() == []  # nothing failed any more
    assert local_tasks(xid) == [("completed", 0, 1), ("completed", 0, 2), ("completed", 0, 1), ("completed", 0, 2)]
    assert lxm3.get_experiment(xid).work_units[1].get_status().is_completed


# --- planning, without a test bed ----------------------------------------------------


@pytest.mark.parametrize("tasks, max_index, max_count, contiguous, expected", [
    ([3, 7, 12, 13, 14], None, None, False, [(3, [0, 4, 9, 10, 11])]),
    ([3, *range(12, 25)], 11, None, False, [(3, [0, 9, 10]), (14, list(range(11)))]),
    ([3, *range(12, 25)], None, 10, True, [(3, [0]), (12, list(range(10))), (22, [0, 1, 2])]),
    ([5, 6, 7, 8], 11, 2, False, [(5, [0, 1]), (7, [0, 1])]),  # max_array_tasks bounds the count
    ([40, 2, 40], 11, None, False, [(2, [0]), (40, [0])]),  # sorted, once each
    ([], 11, 10, True, []),
])
def test_index_lists_fit_the_limits(tasks, max_index, max_count, contiguous, expected):
    chunks = lxm3.split_index_lists(tasks, max_index, max_count, contiguous)
    assert chunks == expected
    assert sorted(offset + i for offset, indices in chunks for i in indices) == sorted(set(tasks))


def test_task_lists_are_read_as_users_write_them():
    assert lxm3.parse_task_list("3,7,12-15") == [3, 7, 12, 13, 14, 15]
    assert lxm3.parse_task_list("5, 1-2,2") == [1, 2, 5]
    for bad in ("", "a", "3-", "-3", "5-2", "1,,2"):
        with pytest.raises(lxm3.LaunchError, match="is not a list of task ids"):
            lxm3.parse_task_list(bad)


def test_rerun_commands_keep_the_launch_options_and_say_which_attempt():
    slurm = lxm3.SCHEDULERS["slurm"]
    executor = lxm3.Slurm(max_parallel_tasks=3)
    launch = slurm.submit_argv(executor, "/s/job.sh", 20, "/s/logs", chained=False)
    assert launch[:3] == ["sbatch", "--parsable", "--array=0-19%3"]
    argv = slurm.rerun_argv(launch, [0, 9, 10], 1, after_previous=False)
    assert argv == ["sbatch", "--parsable", "--array=0,9-10%3", "--output=/s/logs/%x-%A_%a.log",
                    "--export=ALL,LXM_RERUN=1"]
    chained = slurm.rerun_argv(launch + ["--dependency=afterok:12"], [0, 1], 2, after_previous=True)
    assert chained[-2:] == ["--export=ALL,LXM_RERUN=2", "--dependency=afterany:{previous}"]
    assert "--dependency=afterok:12" not in chained
    unthrottled = slurm.submit_argv(lxm3.Slurm(), "/s/job.sh", 5, "/s/logs", chained=False)
    assert "{previous}" not in " ".join(slurm.rerun_argv(unthrottled, [0], 1, after_previous=True))

    sge = lxm3.SCHEDULERS["sge"]
    launch = sge.submit_argv(lxm3.GridEngine(max_parallel_tasks=2, merge_output=False), "/s/job.sh", 10,
                             "/s/logs", chained=True)
    argv = sge.rerun_argv(launch, [0, 1, 2], 1, after_previous=True)
    assert argv[:5] == ["qsub", "-terse", "-t", "1-3", "-tc"]
    assert argv[-4:] == ["-v", "LXM_RERUN=1", "-hold_jid", "{previous}"]
    assert argv.count("-hold_jid") == 1 and "-e" in argv
    with pytest.raises(ValueError, match="one range"):
        sge.rerun_argv(launch, [0, 2], 1, after_previous=False)


def test_rerun_arrays_are_recorded_and_read_back_and_old_records_still_load():
    rerun = lxm3.ArrayRecord(3, 3, job_id="42", tasks="3,12-13", attempt=2)
    assert rerun.to_json() == {"first_task": 3, "count": 3, "job_id": "42", "tasks": "3,12-13", "attempt": 2}
    assert lxm3.ArrayRecord.from_json(rerun.to_json()).task_ids() == [3, 12, 13]
    launch = lxm3.ArrayRecord.from_json({"first_task": 10, "count": 2, "job_id": "7"})
    assert (launch.task_ids(), launch.attempt, launch.to_json()) == (
        [10, 11], 1, {"first_task": 10, "count": 2, "job_id": "7"})
    unit = lxm3.WorkUnitRecord(1, "submitted", scheduler="slurm", num_tasks=14,
                               arrays=[lxm3.ArrayRecord(0, 14, job_id="7"), rerun])
    assert lxm3.task_attempts(unit)[12] == 2 and lxm3.task_attempts(unit)[0] == 1
    assert "submit_argv" not in unit.to_json()
    assert lxm3._unsubmitted_tasks(14, unit.arrays) == []
    assert lxm3.task_log_path(lxm3.WorkUnitRecord(1, "submitted", scheduler="slurm", job_name="j",
                                                  log_directory="/l", arrays=unit.arrays), 12) == "/l/j-42_9.log"


def test_rerun_help_teaches():
    proc = lxm3_cli("rerun", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for words in ("--failed", "--tasks LIST", "3,7,12-20", "nothing is packaged or copied", "LXM_RERUN",
                  "cancel them first"):
        assert words in text, words
