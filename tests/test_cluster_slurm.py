"""Slurm end to end on the test bed: real packaging, real sbatch, real tasks.

Each test runs ``python -m lxm3 launch`` twice over, by parametrization: over
SSH to the test user at ``localhost`` (``mode="ssh"``) and as the test user on the
machine itself, the login node (``mode="login"``). See cluster_helpers.py.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

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

SCHEDULER = "slurm"
MiB = 1 << 20


@pytest.fixture
def cluster_workspaces():
    with workspace_factory() as make:
        yield make


def workspace(cluster_workspaces, mode):
    tb = require_testbed(SCHEDULER)
    return cluster_workspaces(tb, SCHEDULER, mode)


def show_job(ws, job_id):
    """``scontrol show job`` of one job (an array: its first record), as a dict."""
    text = ws.job_info(job_id)
    first = text.split("\n\n")[0]
    return dict(m.groups() for m in re.finditer(r"([\w/:]+)=(\S*)", first)), text


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
def test_sweep_larger_than_max_array_size_is_split(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    assert ws.tb.slurm_max_array_size == 11  # 25 tasks: arrays of 11, 11 and 3
    scenario_split_sweep(ws, 25)


@pytest.mark.parametrize("mode", MODES)
def test_throttled_array_runs_one_task_at_a_time(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    num_tasks = ws.tb.slurm_max_array_size + 2  # two arrays: the throttle spans both
    launch, out = scenario_throttled(ws, num_tasks, max_parallel=1, sleep=0.3)
    (first_id, _, _), (second_id, _, _) = launch.arrays()
    first, text = show_job(ws, first_id)
    assert first.get("ArrayTaskThrottle") == "1", text
    second, text = show_job(ws, second_id)
    assert second.get("ArrayTaskThrottle") == "1", text
    # The second array waits for the first, so the throttle holds for the work unit.
    assert re.search(rf"\bDependency=afterany:{first_id}(?!\d)", text) or \
        first.get("JobState") == "COMPLETED", text
    finish_throttled(ws, launch, out, num_tasks)


@pytest.mark.parametrize("mode", MODES)
def test_resource_requests_are_accepted_and_applied(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"cpu": 2, "ram": 100 * MiB}, walltime="0:05:00",
                           partition="debug", account="lxm3-it-account")
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out}).check()
    [(job_id, _, _)] = launch.arrays()
    job, text = show_job(ws, job_id)
    assert job.get("CPUs/Task") == "2", text
    assert job.get("MinMemoryNode") == "100M", text
    assert job.get("TimeLimit") == "00:05:00", text
    assert job.get("Partition") == "debug", text
    assert job.get("Account") == "lxm3-it-account", text
    [report] = ws.wait_for_reports(out, 1, launch).values()
    env = report["env"]
    assert env.get("SLURM_CPUS_PER_TASK") == "2"
    assert env.get("SLURM_MEM_PER_NODE") == "100"
    assert env.get("SLURM_JOB_PARTITION") == "debug"


@pytest.mark.parametrize("mode", MODES)
def test_explicit_directives_win_over_derived_ones(cluster_workspaces, mode):
    # ram=... derives --mem; the user asks per CPU instead, and sets the time
    # through resources: what they wrote is what Slurm gets.
    ws = workspace(cluster_workspaces, mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"cpu": 1, "ram": 100 * MiB}, walltime="0:05:00",
                           resources={"time": "0:07:00"},
                           extra_directives=["#SBATCH --mem-per-cpu=60M"])
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out}).check()
    [(job_id, _, _)] = launch.arrays()
    job, text = show_job(ws, job_id)
    assert job.get("MinMemoryCPU") == "60M", text
    assert job.get("TimeLimit") == "00:07:00", text
    ws.wait_for_reports(out, 1, launch)


@pytest.mark.parametrize("mode", MODES)
def test_second_launch_of_unchanged_code_transfers_no_archive(cluster_workspaces, mode):
    scenario_second_launch(workspace(cluster_workspaces, mode))


def test_lxm3_ssh_keep_0_ends_the_connection_with_the_launch(cluster_workspaces, monkeypatch,
                                                              runtime_dir):
    monkeypatch.setenv("LXM3_SSH_KEEP", "0")
    ws = workspace(cluster_workspaces, "ssh")
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor())], exe_env={"ECHO_OUT": out}).check()
    assert not glob.glob(os.path.join(runtime_dir, "lxm3", "ssh-*")), "a connection was kept"
    masters = subprocess.run(["pgrep", "-f", "lxm3-ssh-.*ControlMaster=yes"], capture_output=True,
                             text=True).stdout.split()
    assert masters == [], "the launch's private master outlived it"
    ws.wait_for_reports(out, 1, launch)


# --- failures: exit code 1 and a message that says what happened ------------------------


def test_unreachable_host_shows_ssh_message(cluster_workspaces):
    ws = workspace(cluster_workspaces, "ssh")
    config = ws.write_config(cluster={"port": 1})  # nothing listens on port 1
    launch = ws.launch([job_unit(ws.executor())], config=config)
    check_error(launch, "localhost", "port 1", "Connection refused")
    ws.assert_nothing_submitted(launch)


def test_failed_authentication_shows_ssh_message(cluster_workspaces):
    ws = workspace(cluster_workspaces, "ssh")
    config = ws.write_config(cluster={"user": "lxm3-no-such-user"})
    launch = ws.launch([job_unit(ws.executor())], config=config)
    check_error(launch, "localhost", "Permission denied")
    ws.assert_nothing_submitted(launch)


def test_missing_sbatch_is_named(cluster_workspaces):
    # Login-node mode with a PATH that has everything but sbatch (over SSH the
    # PATH is the remote login shell's, which the test bed cannot change).
    ws = workspace(cluster_workspaces, "login")
    path = path_without(ws.root, "sbatch")
    launch = ws.launch([job_unit(ws.executor())], path=path)
    check_error(launch, "sbatch", "not found")
    ws.assert_nothing_submitted(launch)


@pytest.mark.parametrize("mode", MODES)
def test_unknown_partition_rejection_is_quoted(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    scenario_rejected(ws, {"partition": "nosuch"}, "invalid partition")


@pytest.mark.parametrize("mode", MODES)
def test_gpu_request_rejection_is_quoted(cluster_workspaces, mode):
    # The test bed has no GPUs: Slurm refuses --gres=gpu:1.
    ws = workspace(cluster_workspaces, mode)
    scenario_rejected(ws, {"requirements": {"gpu": 1}},
                      "Invalid generic resource (gres) specification")


@pytest.mark.parametrize("mode", MODES)
def test_half_failed_launch_says_what_was_submitted(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, mode)
    scenario_half_failed(ws, {"partition": "nosuch"}, "invalid partition")


@pytest.mark.parametrize("mode", MODES)
def test_broken_transfer_is_reported_and_nothing_submitted(cluster_workspaces, mode):
    scenario_unwritable_archives(workspace(cluster_workspaces, mode))


@pytest.mark.parametrize("mode", MODES)
def test_forbidden_staging_directory_is_reported(cluster_workspaces, mode):
    scenario_forbidden_staging(workspace(cluster_workspaces, mode))

