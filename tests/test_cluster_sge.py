"""Grid Engine end to end on the test bed: real packaging, real qsub, real tasks.

Each test runs ``python -m lxm3 launch`` twice over, by parametrization: over
SSH to the test user at ``localhost`` (``mode="ssh"``) and as the test user on the
machine itself, the login node (``mode="login"``; Grid Engine refuses root, so
lxm3 runs as the test user there). See cluster_helpers.py.

``qstat -j`` only knows pending and running jobs, so tests that read it keep
their tasks busy for a few seconds.
"""

from __future__ import annotations

import re

import pytest
from cluster_helpers import (
    MODES,
    check_error,
    finish_throttled,
    job_unit,
    path_without,
    scenario_custom_log_directory,
    scenario_forbidden_staging,
    scenario_half_failed,
    scenario_rejected,
    scenario_second_launch,
    scenario_single_jobs,
    scenario_split_sweep,
    scenario_sweep_byte_for_byte,
    scenario_throttled,
    scenario_unwritable_archives,
    workspace_factory,
)

from testbed_env import require_testbed

pytestmark = pytest.mark.testbed

SCHEDULER = "sge"
MiB = 1 << 20


@pytest.fixture
def cluster_workspaces():
    with workspace_factory() as make:
        yield make


def workspace(cluster_workspaces, mode):
    tb = require_testbed(SCHEDULER)
    return cluster_workspaces(tb, SCHEDULER, mode)


def qstat_j(ws, job_id):
    """``qstat -j ID`` as {field: value} (continuation lines dropped), and the text."""
    text = ws.job_info(job_id)
    fields = {}
    for line in text.splitlines():
        match = re.match(r"^([^\s:][^:]*):\s*(.*)$", line)
        if match:
            fields.setdefault(match.group(1).strip(), match.group(2).strip())
    return fields, text


@pytest.mark.parametrize("mode", MODES)
def test_single_jobs_run_with_their_arguments(cluster_workspaces, mode):
    scenario_single_jobs(workspace(cluster_workspaces, mode))


@pytest.mark.parametrize("mode", MODES)
def test_log_directory_is_created_with_one_file_per_task(cluster_workspaces, mode):
    scenario_custom_log_directory(workspace(cluster_workspaces, mode))


@pytest.mark.parametrize("mode", MODES)
def test_sweep_arguments_and_environment_arrive_byte_for_byte(cluster_workspaces, mode):
    scenario_sweep_byte_for_byte(workspace(cluster_workspaces, mode))


@pytest.mark.parametrize("mode", MODES)
def test_sweep_larger_than_max_aj_tasks_is_split(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    assert ws.tb.sge_max_aj_tasks == 10  # 25 tasks: arrays of 10, 10 and 5
    scenario_split_sweep(ws, 25)


@pytest.mark.parametrize("mode", MODES)
def test_throttled_array_runs_one_task_at_a_time(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    num_tasks = ws.tb.sge_max_aj_tasks + 2  # two arrays: the throttle spans both
    launch, out = scenario_throttled(ws, num_tasks, max_parallel=1, sleep=0.3)
    (first_id, _, _), (second_id, _, _) = launch.arrays()
    first, text = qstat_j(ws, first_id)
    assert first.get("maximum concurrency") == "1", text  # qsub -tc 1
    second, text = qstat_j(ws, second_id)
    assert second.get("maximum concurrency") == "1", text
    # The second array waits for the first (-hold_jid), so the throttle holds for
    # the work unit.
    assert re.search(rf"jid_predecessor_list[^:]*:\s*{first_id}\b", text), text
    finish_throttled(ws, launch, out, num_tasks)


@pytest.mark.parametrize("mode", MODES)
def test_resource_requests_are_accepted_and_applied(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"cpu": 2, "ram": 200 * MiB}, walltime="0:05:00",
                           queue="all.q", account="lxm3-it-account")
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "4"})
    launch.check()
    [(job_id, _, _)] = launch.arrays()
    job, text = qstat_j(ws, job_id)
    assert job.get("parallel environment", "").split() == ["smp", "range:", "2"], text
    resources = dict(r.split("=", 1) for r in job.get("hard resource_list", "").split(","))
    assert resources.get("h_vmem") == "100M", text  # 200 MiB over 2 slots: per slot
    assert resources.get("h_rt") == "300", text
    assert job.get("hard_queue_list") == "all.q", text
    assert job.get("account") == "lxm3-it-account", text
    [report] = ws.wait_for_reports(out, 1, launch).values()
    env = report["env"]
    assert env.get("NSLOTS") == "2"
    assert env.get("PE") == "smp"
    assert env.get("QUEUE") == "all.q"


@pytest.mark.parametrize("mode", MODES)
def test_explicit_resources_and_directives_win_over_derived_ones(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"ram": 100 * MiB}, walltime="0:05:00",
                           resources={"h_vmem": "150M"},
                           extra_directives=["#$ -l h_rt=0:07:00"])
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "4"})
    [(job_id, _, _)] = launch.check().arrays()
    job, text = qstat_j(ws, job_id)
    resources = dict(r.split("=", 1) for r in job.get("hard resource_list", "").split(","))
    assert resources.get("h_vmem") == "150M", text
    assert resources.get("h_rt") == "420", text
    ws.wait_for_reports(out, 1, launch)


@pytest.mark.parametrize("mode", MODES)
def test_second_launch_of_unchanged_code_transfers_no_archive(cluster_workspaces, mode):
    scenario_second_launch(workspace(cluster_workspaces, mode))


# --- failures: exit code 1 and a message that says what happened ------------------------


# An unreachable host and failed authentication fail before any scheduler is
# involved: tests/test_cluster_slurm.py covers them once.


def test_missing_qsub_is_named(cluster_workspaces):
    # Login-node mode with a PATH that has everything but qsub (over SSH the
    # PATH is the remote login shell's, which the test bed cannot change).
    ws = workspace(cluster_workspaces, "login")
    path = path_without(ws.root, "qsub")
    launch = ws.launch([job_unit(ws.executor())], path=path)
    check_error(launch, "qsub", "not found")
    ws.assert_nothing_submitted(launch)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_resource_rejection_is_quoted(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    scenario_rejected(ws, {"resources": {"nosuch": 1}}, 'unknown resource "nosuch"')


@pytest.mark.parametrize("mode", MODES)
def test_half_failed_launch_says_what_was_submitted(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    scenario_half_failed(ws, {"resources": {"nosuch": 1}}, 'unknown resource "nosuch"')


@pytest.mark.parametrize("mode", MODES)
def test_broken_transfer_is_reported_and_nothing_submitted(cluster_workspaces, mode):
    scenario_unwritable_archives(workspace(cluster_workspaces, mode))


@pytest.mark.parametrize("mode", MODES)
def test_forbidden_staging_directory_is_reported(cluster_workspaces, mode):
    scenario_forbidden_staging(workspace(cluster_workspaces, mode))
