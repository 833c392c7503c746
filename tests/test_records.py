"""Records of launches and what users read back from them, on this machine only.

Every launch writes ``$XDG_STATE_HOME/lxm3/experiments/<id>.json``; ``lxm3
list``, ``status``, ``logs``, ``cancel``, ``launch --dry-run`` and
``get_experiment`` are checked here with the Local executor, as users run them
(``python -m lxm3 ...`` in a subprocess) or through the xm API in process.
The same commands on Slurm and Grid Engine are in test_status.py.

The tasks run ``lxmtask.main`` (``LXMTASK_MAIN`` in conftest.py): it prints a line naming its
task, optionally waits for a gate file to exist (so that a test decides when it
ends), prints ``$LINES`` numbered lines, and exits with the code ``$CODES``
gives its task.
"""

import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

import lxm3
from lxm3 import xm

from conftest import (
    error_line,
    experiments_dir,
    git,
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
    write_launcher,
)


def make_out(tmp_path, name="out"):
    out = tmp_path / name
    out.mkdir()
    return str(out)


def ran(out):
    return sorted(os.listdir(out))


# --- the record of a launch --------------------------------------------------


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_local_launch_is_recorded_with_everything_needed_to_find_it_again(tmp_path, task_project):
    repo = tmp_path / "repo"
    out = make_out(tmp_path)
    spec = {"title": "recorded sweep", "project": task_project,
            "units": [local_unit(3, env={"OUT": out, "CODES": '{"2": 3}'},
                                 task_env=lambda i: {"TASK_VALUE": f"value {i} $HOME"})]}
    write_launcher(repo, spec)
    git(repo, "init", "-q")
    git(repo, "add", "launcher.py", "spec.json")
    git(repo, "commit", "-q", "-m", "launcher")
    commit = git(repo, "rev-parse", "HEAD")
    started = datetime.datetime.now(datetime.timezone.utc)

    before = record_files()
    proc = lxm3_cli("launch", str(repo / "launcher.py"), "--lr", "0.1", "it's",
                    cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stderr  # task 2 failed
    record = read_record(new_record_id(before))

    assert record["title"] == "recorded sweep"
    created = datetime.datetime.fromisoformat(record["created"])
    assert created.tzinfo is not None
    assert abs((created - started).total_seconds()) < 120
    assert record["launcher"] == str(repo / "launcher.py")
    assert record["argv"] == ["--lr", "0.1", "it's"]
    assert record["git"]["commit"] == commit
    assert record["git"]["dirty"] is False
    assert os.path.realpath(record["git"]["root"]) == os.path.realpath(str(repo))
    assert record["status"] == "failed"
    assert "exit code 3" in record["error"] and "task 2" in record["error"]

    [unit] = record["work_units"]
    assert unit["id"] == 1
    assert unit["executor"] == "Local"
    assert unit["num_tasks"] == 3
    assert [t["args"] for t in unit["tasks"]] == [["--seed=0"], ["--seed=1"], ["--seed=2"]]
    for i, task in enumerate(unit["tasks"]):
        assert task["env"]["TASK_VALUE"] == f"value {i} $HOME"
        assert task["env"]["OUT"] == out
    assert unit["exit_codes"] == {"0": 0, "1": 0, "2": 3}
    assert len(unit["log_paths"]) == 3
    for i, path in enumerate(unit["log_paths"]):
        with open(path) as f:
            assert f.read().startswith(f'task {i} argv=["--seed={i}"]'), path
    assert os.path.isfile(unit["script"])
    assert os.path.isfile(unit["archive"])
    assert ran(out) == ["task-0", "task-1", "task-2"]

    # A change to a tracked file makes the next launch's tree dirty.
    with open(repo / "launcher.py", "a") as f:
        f.write("# edited\n")
    spec["units"] = [local_unit(1)]
    with open(repo / "spec.json", "w") as f:
        json.dump(spec, f)
    before = record_files()
    proc = lxm3_cli("launch", str(repo / "launcher.py"), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    record = read_record(new_record_id(before))
    assert record["git"]["commit"] == commit
    assert record["git"]["dirty"] is True
    assert record["status"] == "completed"
    assert record["work_units"][0]["exit_codes"] == {"0": 0}


def test_launch_outside_a_git_repository_records_no_commit(tmp_path, task_project):
    _, record = launch_local(tmp_path, "plain", {"title": "no git", "project": task_project,
                                                 "units": [local_unit(1)]})
    assert record["git"] is None
    assert record["status"] == "completed"
    assert record["error"] is None


def test_launcher_that_fails_after_adding_a_job_is_recorded_as_failed(tmp_path, task_project):
    gate = str(tmp_path / "never")
    proc, record = launch_local(
        tmp_path, "failing",
        {"title": "fails midway", "project": task_project, "raise": "boom after add",
         "units": [local_unit(2, env={"GATE": gate})]}, expect_rc=1)
    assert "RuntimeError: boom after add" in proc.stderr
    assert record["status"] == "failed"
    assert "boom after add" in record["error"]
    [unit] = record["work_units"]
    assert unit["num_tasks"] == 2 and unit["executor"] == "Local"

    shown = lxm3_cli("status", str(record["experiment_id"]))
    assert shown.returncode == 0, shown.stderr
    assert "failed" in shown.stdout and "boom after add" in shown.stdout
    # The launch is over and lxm3 stopped its tasks: nothing may look as if it still ran.
    status = status_json(record["experiment_id"])
    assert all(state not in ("running", "pending") for state, _ in states(status)), status
    assert "running" not in unit["state"], (
        f"work unit recorded as {unit['state']!r} after its tasks were stopped:\n{shown.stdout}")
    assert all(state == "cancelled" for state, _ in states(status)), (
        f"tasks that lxm3 stopped when the launcher failed should read cancelled:\n{shown.stdout}")


# --- ids and records under concurrency -----------------------------------------


def test_claimed_ids_are_distinct_across_threads_in_the_same_millisecond(monkeypatch):
    monkeypatch.setattr(lxm3.time, "time", lambda: 1700000000.0)  # every claim collides
    count = 16
    barrier = threading.Barrier(count)
    ids, errors = [], []

    def claim():
        try:
            barrier.wait(10)
            ids.append(lxm3.claim_experiment_id())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claim) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(ids) == list(range(1700000000000, 1700000000000 + count))
    # Claimed but not yet written: listing skips them instead of failing.
    assert lxm3.list_records() == []
    proc = lxm3_cli("list")
    assert proc.returncode == 0, proc.stderr
    assert "no experiments" in proc.stdout


def test_two_launches_at_once_both_get_their_own_record(tmp_path, task_project):
    outs = [make_out(tmp_path, f"out{n}") for n in range(2)]
    start_at = time.time() + 4  # both processes spin until this instant, then create
    launchers = [write_launcher(tmp_path / f"launch{n}", {
        "title": f"concurrent {n}", "project": task_project, "start_at": start_at,
        "units": [local_unit(2, env={"OUT": outs[n]})]}) for n in range(2)]
    procs = [lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) for launcher in launchers]
    results = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr

    names = record_files()
    assert all(re.fullmatch(r"\d+\.json", n) for n in names), names  # no temporary files left
    records = [read_record(n[:-5]) for n in names]
    assert sorted(r["title"] for r in records) == ["concurrent 0", "concurrent 1"]
    ids = [r["experiment_id"] for r in records]
    assert len(set(ids)) == 2
    assert abs(ids[0] - ids[1]) < 1000  # they really started together
    for record in records:
        assert record["status"] == "completed"
        assert record["work_units"][0]["exit_codes"] == {"0": 0, "1": 0}
        assert f"{record['experiment_id']}.json" in names
    for out in outs:
        assert ran(out) == ["task-0", "task-1"]
    listed = json.loads(lxm3_cli("list", "--json").stdout)
    assert sorted(e["experiment_id"] for e in listed) == sorted(ids)


# --- lxm3 list / status / logs / cancel on local launches ----------------------


def test_list_shows_experiments_newest_first(tmp_path, task_project):
    proc = lxm3_cli("list")
    assert proc.returncode == 0 and "no experiments recorded yet" in proc.stdout, proc

    _, first = launch_local(tmp_path, "first", {"title": "first sweep", "project": task_project,
                                                "units": [local_unit(2)]})
    _, second = launch_local(
        tmp_path, "second",
        {"title": "second sweep", "project": task_project,
         "units": [local_unit(3, env={"CODES": '{"1": 4}'}), local_unit(1)]}, expect_rc=1)

    proc = lxm3_cli("list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "(UTC)", "TITLE", "WHERE", "UNITS", "TASKS",
                                "STATUS"]
    rows = lines[1:]
    assert len(rows) == 2
    assert rows[0].startswith(str(second["experiment_id"]))  # newest first
    assert rows[1].startswith(str(first["experiment_id"]))
    assert re.search(r"second sweep\s+local\s+2\s+4\s+failed$", rows[0]), rows[0]
    assert re.search(r"first sweep\s+local\s+1\s+2\s+completed$", rows[1]), rows[1]
    assert second["created"][:10] in rows[0]

    listed = json.loads(lxm3_cli("list", "--json").stdout)
    assert [e["experiment_id"] for e in listed] == [second["experiment_id"], first["experiment_id"]]
    assert [(e["title"], e["status"], e["work_units"], e["tasks"]) for e in listed] == [
        ("second sweep", "failed", 2, 4), ("first sweep", "completed", 1, 2)]
    assert listed[0]["created"] == second["created"]

    one = json.loads(lxm3_cli("list", "-n", "1", "--json").stdout)
    assert [e["experiment_id"] for e in one] == [second["experiment_id"]]


def test_status_of_a_finished_local_launch(tmp_path, task_project):
    _, record = launch_local(
        tmp_path, "sweep",
        {"title": "local status", "project": task_project,
         "units": [local_unit(3, env={"CODES": '{"1": 3}'}), local_unit(1)]}, expect_rc=1)
    xid = record["experiment_id"]

    status = status_json(xid)
    assert status["status"] == "failed"
    assert states(status, 1) == [("completed", 0), ("failed", 3), ("completed", 0)]
    assert states(status, 2) == [("completed", 0)]
    assert status["work_units"]["1"]["counts"] == {"completed": 2, "failed": 1}

    proc = lxm3_cli("status", str(xid))
    assert proc.returncode == 0, proc.stderr
    assert f"experiment {xid} 'local status': failed" in proc.stdout
    assert re.search(r"work unit 1 on local: failed; 3 task\(s\): 2 completed, 1 failed",
                     proc.stdout), proc.stdout
    assert "  task 1: failed exit 3" in proc.stdout
    assert re.search(r"work unit 2 on local: completed; 1 task\(s\): 1 completed", proc.stdout)

    proc = lxm3_cli("status", str(xid), "1")
    assert proc.returncode == 0, proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()]
    header = table.index(["TASK", "JOB", "STATE", "EXIT"])
    assert table[header + 1:] == [["0", "-", "completed", "0"], ["1", "-", "failed", "3"],
                                  ["2", "-", "completed", "0"]]
    assert "work unit 2" not in proc.stdout

    one = status_json(xid, "2")
    assert list(one["work_units"]) == ["2"]


def test_logs_shows_the_end_of_the_right_tasks_log(tmp_path, task_project):
    _, record = launch_local(tmp_path, "sweep", {
        "title": "local logs", "project": task_project,
        "units": [local_unit(3, env={"LINES": "4", "EVERY": "0"})]})
    xid = str(record["experiment_id"])
    # The log ends as on clusters: a blank line and the task's exit record.
    proc = lxm3_cli("logs", xid, "--task", "1", "-n", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["line 3 of task 1", "task 1 done", "",
                                        "lxm3-exit: task 1 status 0"]

    proc = lxm3_cli("logs", xid, "1", "--task", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ['task 2 argv=["--seed=2"]', *[
        f"line {i} of task 2" for i in range(4)], "task 2 done", "", "lxm3-exit: task 2 status 0"]

    proc = lxm3_cli("logs", xid)  # task 0 by default
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == 'task 0 argv=["--seed=0"]'


def test_status_and_logs_follow_while_a_local_launch_runs(tmp_path, task_project):
    """A local launch runs in the foreground; from another terminal, status says
    running and ``logs -f`` streams the task's output as it is written: the lines
    arrive while the task cannot end yet (it waits for the HOLD gate)."""
    gate, hold = str(tmp_path / "gate"), str(tmp_path / "hold")
    out = make_out(tmp_path)
    launcher = write_launcher(tmp_path / "running", {
        "title": "local follow", "project": task_project,
        "units": [local_unit(1, env={"OUT": out, "GATE": gate, "HOLD": hold, "LINES": "3",
                                     "EVERY": "0.2"})]})
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    follower = None
    try:
        # The task has started (and waits for the gate).
        wait_until(lambda: ran(out) == ["task-0"] or launch.poll() is not None, 120,
                   "the task to start")
        assert launch.poll() is None, launch.stderr.read()
        xid = str(new_record_id(before))
        status = status_json(xid)
        assert status["status"] == "launching"
        assert list(status["work_units"]) == ["1"], (
            f"the running launch's record has no work unit yet: {read_record(xid)}")
        assert states(status) == [("running", None)]

        follower = lxm3_popen("logs", xid, "-f", "-n", "5", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
        [(_, first)] = read_lines(follower, 1, r"task 0 argv=.*", timeout=120)
        assert first == 'task 0 argv=["--seed=0"]'
        open(gate, "w").close()
        streamed = read_lines(follower, 3, r"line \d+ of task 0", timeout=120)
        assert [text for _, text in streamed] == [f"line {i} of task 0" for i in range(3)]
        assert states(status_json(xid)) == [("running", None)]  # held: it has not ended
        os.killpg(follower.pid, signal.SIGINT)  # Ctrl-C
        assert follower.wait(120) == 130
        open(hold, "w").close()
        assert launch.wait(120) == 0, launch.stderr.read()
    finally:
        for path in (gate, hold):
            open(path, "w").close()
        for proc in (follower, launch):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    status = status_json(xid)
    assert status["status"] == "completed"
    assert states(status) == [("completed", 0)]


def test_command_errors_say_what_is_wrong(tmp_path, task_project):
    _, record = launch_local(tmp_path, "two", {"title": "errors", "project": task_project,
                                               "units": [local_unit(3), local_unit(1)]})
    xid = str(record["experiment_id"])
    state = experiments_dir()

    for command in ("status", "logs", "cancel"):
        line = error_line(lxm3_cli(command, "1234567"))
        assert line == (f"lxm3: error: no record of experiment 1234567 in {state}; "
                        "'lxm3 list' shows the experiments launched from this machine")
        line = error_line(lxm3_cli(command, "not-an-id"))
        assert line == "lxm3: error: 'not-an-id' is not an experiment id; 'lxm3 list' shows them"
        line = error_line(lxm3_cli(command, xid, "7"))
        assert line == f"lxm3: error: experiment {xid} has no work unit 7 (it has 1, 2)"

    assert error_line(lxm3_cli("logs", xid, "1", "--task", "3")) == (
        "lxm3: error: work unit 1 has tasks 0..2, not 3")
    assert error_line(lxm3_cli("logs", xid, "1", "--task", "-1")) == (
        "lxm3: error: work unit 1 has tasks 0..2, not -1")
    assert error_line(lxm3_cli("logs", xid)) == (
        f"lxm3: error: experiment {xid} has 2 work units: name one (lxm3 logs XID WID)")

    proc = lxm3_cli("cancel", xid)  # a local launch has no scheduler jobs
    assert proc.returncode == 0, proc.stderr
    assert "nothing to cancel" in proc.stdout


def test_dry_run_of_a_local_launch_runs_nothing_and_records_nothing(tmp_path, task_project,
                                                                    monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the dry run's folder goes
    out = make_out(tmp_path)
    launcher = write_launcher(tmp_path / "dry", {
        "title": "dry local", "project": task_project,
        "units": [local_unit(3, env={"OUT": out})]})
    proc = lxm3_cli("launch", "--dry-run", launcher, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"dry run: job scripts are written to (\S+);", proc.stderr)
    assert match, proc.stderr
    folder = match.group(1)
    assert folder.startswith(str(tmp_path))
    [script] = [os.path.join(d, "job.sh") for d, _, files in os.walk(folder) if "job.sh" in files]
    with open(os.path.join(os.path.dirname(script), "tasks")) as f:
        assert len(f.read().splitlines()) == 1 + 3  # the common line, then one per task
    assert re.search(rf"\[dry run\] would run 3 task\(s\) locally: .*bash {re.escape(script)}",
                     proc.stdout), proc.stdout

    time.sleep(1)
    assert ran(out) == []  # no task ran
    assert record_files() == []  # nothing was launched, so nothing is recorded
    assert not os.path.exists(os.path.join(os.environ["XDG_DATA_HOME"], "lxm3"))
    assert "no experiments recorded yet" in lxm3_cli("list").stdout


# --- the xm API ------------------------------------------------------------------


def test_xm_unit_api_on_local_units(tmp_path, task_project, monkeypatch):
    monkeypatch.setenv("LXM_POLL_INTERVAL", "1")
    gate = str(tmp_path / "gate")
    experiment = lxm3.create_experiment("xm api local", config=lxm3.Config())
    with pytest.raises(lxm3.TaskFailedError,
                       match=r"^1 of 3 task\(s\) failed:\n  work unit 2 task 0: exit code 6 \(log: "):
        with experiment:
            executor = lxm3.Local()
            spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("lxmtask.main"), path=task_project)
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
            experiment.add(lxm3.ArrayJob(exe, executor, args=[{"seed": i} for i in range(2)],
                                         env_vars=[{"GATE": gate}]))
            experiment.add(xm.Job(exe, executor, args={"seed": 9}, env_vars={"CODES": '{"0": 6}'}))
            running = experiment.work_units[1].get_status()
            assert running.is_active and not running.is_completed and not running.is_failed
            assert [t.state for t in running.tasks] == ["running", "running"]
            open(gate, "w").close()
    xid = experiment.experiment_id

    done = experiment.work_units[1].get_status()
    assert done.is_completed and not done.is_active and not done.is_failed
    assert [(t.state, t.exit_code) for t in done.tasks] == [("completed", 0), ("completed", 0)]
    failed = experiment.work_units[2].get_status()
    assert failed.is_failed and not failed.is_active
    assert [(t.state, t.exit_code) for t in failed.tasks] == [("failed", 6)]

    loaded = lxm3.get_experiment(xid)
    assert loaded.experiment_id == xid and loaded.experiment_title == "xm api local"
    assert sorted(loaded.work_units) == [1, 2]
    unit = loaded.work_units[1]
    assert unit.get_status().is_completed
    assert asyncio.run(unit.wait_until_complete()) is unit
    with pytest.raises(xm.ExperimentUnitFailedError, match=r"^1 task\(s\): 1 failed$"):
        asyncio.run(loaded.work_units[2].wait_until_complete())
    with pytest.raises(lxm3.LaunchError, match="no record of experiment 42"):
        lxm3.get_experiment(42)


def test_many_local_work_units_save_the_record_a_few_times_not_once_each(
        tmp_path, task_project, monkeypatch):
    """A local unit saves the record as it starts, so that `status` sees it run; with
    many units the saves are spaced out (one per unit would rewrite a growing file
    each time), yet every unit is in the record soon after it starts."""
    saves = []  # (time, status) of each save
    real_save = lxm3.save_record
    monkeypatch.setattr(lxm3, "save_record", lambda record: (saves.append(
        (time.monotonic(), record.status)), real_save(record)))
    gate = str(tmp_path / "gate")
    units = 30
    experiment = lxm3.create_experiment("many units", config=lxm3.Config())
    with experiment:
        executor = lxm3.Local()
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("lxmtask.main"), path=task_project)
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        for i in range(units):
            experiment.add(xm.Job(exe, executor, args={"seed": i}, env_vars={"GATE": gate}))
        deadline = time.time() + 60
        while time.time() < deadline:  # the units start; the record catches up within ~1 s
            time.sleep(0.2)
            record = read_record(experiment.experiment_id)
            if len(record["work_units"]) == units and all(
                    u.get("state") == "running" for u in record["work_units"]):
                break
        else:
            pytest.fail(f"the record never showed {units} running units: {record}")
        open(gate, "w").close()
    final = read_record(experiment.experiment_id)
    assert final["status"] == "completed" and len(final["work_units"]) == units
    assert len(saves) < units, f"the record was saved {len(saves)} times for {units} units"
    # After the save that claims the id, the units' saves are RECORD_SAVE_INTERVAL apart.
    while_starting = [t for t, status in saves[1:] if status == "launching"]
    gaps = [b - a for a, b in zip(while_starting, while_starting[1:])]
    assert all(gap >= 0.9 * lxm3.RECORD_SAVE_INTERVAL for gap in gaps), gaps
