"""The record format: typed, versioned, and read back by older and newer lxm3.

A record written by an earlier lxm3 (fields added since then are missing)
still loads and answers ``lxm3 list``/``status``; one written by a later
lxm3 (a higher version) is refused with a message that says to upgrade,
and ``lxm3 list`` names it rather than failing on it.
"""

import json
import os

import pytest

import lxm3

from conftest import lxm3_cli as run_cli


def write_record(data):
    directory = os.path.join(os.environ["XDG_STATE_HOME"], "lxm3", "experiments")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{data['experiment_id']}.json"), "w") as f:
        json.dump(data, f)


def older_records(tmp_path):
    """A local and a Slurm experiment as the first lxm3 with records wrote them:
    no planned arrays, submission log, output flag, exit codes for clusters."""
    log = tmp_path / "task-0.log"
    log.write_text("hello\nlxm3-exit: task 0 status 0\n")
    local = {"version": 1, "experiment_id": 1700000000001, "title": "old local", "project": None,
             "created": "2023-11-14T22:13:20+00:00", "launcher": "/x/launcher.py", "argv": [],
             "cwd": "/x", "git": None, "config": None, "status": "completed", "error": None,
             "work_units": [{"id": 1, "state": "completed", "executor": "Local", "scheduler": "local",
                             "cluster": None, "num_tasks": 1, "tasks": [{"args": ["--seed=1"], "env": {}}],
                             "log_paths": [str(log)], "exit_codes": {"0": 0}, "arrays": []}]}
    slurm = {"experiment_id": 1700000000002, "title": "old slurm",  # no version: the very first format
             "created": "2023-11-14T22:13:21+00:00", "status": "launched",
             "work_units": [{"id": 1, "state": "submitted", "executor": "Slurm", "scheduler": "slurm",
                             "cluster": "hpc", "num_tasks": 12, "job_name": "old_1", "log_directory": "/l",
                             "arrays": [{"job_id": "41", "first_task": 0, "count": 11},
                                        {"job_id": "42", "first_task": 11, "count": 1}]}]}
    return local, slurm


def test_an_older_record_loads_and_answers_list_and_status(tmp_path):
    local, slurm = older_records(tmp_path)
    write_record(local)
    write_record(slurm)
    shown = run_cli("list")
    assert shown.returncode == 0, shown.stderr
    assert "old local" in shown.stdout and "old slurm" in shown.stdout
    status = run_cli("status", "1700000000001")
    assert status.returncode == 0, status.stderr
    assert "1 task(s): 1 completed" in status.stdout
    loaded = lxm3.get_experiment(1700000000002)
    unit = loaded.work_units[1]
    assert [j.address for j in unit.launched_jobs] == ["hpc:41", "hpc:42"]
    assert lxm3.task_log_path(unit.record, 11) == "/l/old_1-42_0.log"  # task 11 is index 0 of job 42
    assert unit.record.planned == [] and unit.record.custom_output is False


def test_a_record_round_trips_through_its_classes(tmp_path):
    local, _ = older_records(tmp_path)
    record = lxm3.ExperimentRecord.from_json(local)
    again = lxm3.ExperimentRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    assert again.work_units[0].exit_codes == {0: 0}  # JSON's string keys become task numbers
    assert again.to_json()["work_units"][0]["exit_codes"] == {"0": 0}


def test_a_newer_record_is_refused_with_a_clear_message(tmp_path):
    local, _ = older_records(tmp_path)
    newer = {**local, "experiment_id": 1700000000003, "title": "from the future",
             "version": lxm3.RECORD_VERSION + 1}
    write_record(local)
    write_record(newer)
    status = run_cli("status", "1700000000003")
    assert status.returncode == 1
    assert "written by a newer lxm3" in status.stderr and "upgrade lxm3" in status.stderr
    assert "Traceback" not in status.stderr
    shown = run_cli("list")  # the others are still listed; the newer one is named
    assert shown.returncode == 0
    assert "old local" in shown.stdout and "from the future" not in shown.stdout
    assert "1700000000003.json was written by a newer lxm3" in shown.stderr
    with pytest.raises(lxm3.LaunchError, match=r"record version \d+; this lxm3 .* reads versions up to"):
        lxm3.load_record(1700000000003)


def test_a_file_that_is_not_a_record_is_named(tmp_path):
    write_record({"experiment_id": 1700000000004, "work_units": "nonsense"})
    with pytest.raises(lxm3.LaunchError, match=r"1700000000004\.json is not an lxm3 record"):
        lxm3.load_record(1700000000004)


def test_states_move_only_as_allowed():
    unit = lxm3.WorkUnitRecord(id=3, state=lxm3.UnitState.SUBMITTING)
    unit.set_state(lxm3.UnitState.PARTIALLY_SUBMITTED)
    assert unit.state == "partially submitted"
    with pytest.raises(RuntimeError, match="work unit 3 cannot go from 'partially submitted' to 'running'"):
        unit.set_state(lxm3.UnitState.RUNNING)
    named = {v for k, v in vars(lxm3.UnitState).items() if k.isupper() and isinstance(v, str)}
    reachable = set(lxm3.UnitState.NEXT) | {s for targets in lxm3.UnitState.NEXT.values() for s in targets}
    assert named == reachable  # every state is reachable or left: none is dead
