"""Slurm, Grid Engine and PBS end to end on the test bed: real packaging, real
sbatch/qsub, real tasks.

Each test runs ``python -m lxm3 launch`` for each scheduler, and for each of two
modes, by parametrization: over SSH to ``lxm3test@localhost`` (``mode="ssh"``)
and as ``lxm3test`` on the machine itself, the login node (``mode="login"``;
Grid Engine refuses root, so lxm3 runs as the test user there). PBS has a host
of its own (an address in its network namespace, with its own sshd): its login
node is that namespace, and its qsub is found through the config's ``bin_dir``,
since Grid Engine's qsub comes first on the PATH. What all schedulers must do
is one test; what only one of them has (Slurm's partitions, Grid Engine's
resource lists, PBS's select) is a test of that scheduler. The scenarios
themselves are in cluster_helpers.py.

``qstat -j`` only knows pending and running jobs, so Grid Engine tests that read
it keep their tasks busy for a few seconds.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from typing import Dict, Tuple

import pytest
from cluster_helpers import (
    MODES,
    SCHEDULERS,
    ClusterWorkspace,
    array_limit,
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
)

from conftest import status_json
from testbed_env import require_testbed

pytestmark = pytest.mark.testbed

MiB = 1 << 20

# The largest array each scheduler of the test bed takes (tests/testbed sets them
# low, so that a sweep of 25 tasks needs three arrays).
ARRAY_LIMITS = {"slurm": 11, "sge": 10, "pbs": 10}
# The command that submits, and an option the scheduler refuses with its message.
SUBMIT_COMMANDS = {"slurm": "sbatch", "sge": "qsub", "pbs": "qsub"}
REFUSED = {
    "slurm": ({"partition": "nosuch"}, "invalid partition"),
    "sge": ({"resources": {"nosuch": 1}}, 'unknown resource "nosuch"'),
    "pbs": ({"queue": "nosuch"}, "Unknown queue"),
}

each_scheduler_and_mode = pytest.mark.parametrize(
    "scheduler, mode", [(s, m) for s in SCHEDULERS for m in MODES])
each_mode = pytest.mark.parametrize("mode", MODES)


def workspace(cluster_workspaces, scheduler: str, mode: str) -> ClusterWorkspace:
    return cluster_workspaces(require_testbed(scheduler), scheduler, mode)


def show_job(ws: ClusterWorkspace, job_id: str) -> Tuple[Dict[str, str], str]:
    """Slurm's ``scontrol show job`` of one job (an array: its first record), as a dict."""
    text = ws.job_info(job_id)
    first = text.split("\n\n")[0]
    return dict(m.groups() for m in re.finditer(r"([\w/:]+)=(\S*)", first)), text


def qstat_j(ws: ClusterWorkspace, job_id: str) -> Tuple[Dict[str, str], str]:
    """Grid Engine's ``qstat -j ID`` as {field: value} (continuation lines dropped)."""
    text = ws.job_info(job_id)
    fields = {}
    for line in text.splitlines():
        match = re.match(r"^([^\s:][^:]*):\s*(.*)$", line)
        if match:
            fields.setdefault(match.group(1).strip(), match.group(2).strip())
    return fields, text


def pbs_job(ws: ClusterWorkspace, job_id: str) -> Tuple[Dict[str, str], str]:
    """PBS's ``qstat -x -f ID`` as {attribute: value} (continuation lines joined)."""
    text = ws.job_info(job_id)
    fields: Dict[str, str] = {}
    key = None
    for line in text.splitlines():
        match = re.match(r"^    (\S+) = (.*)$", line)
        if match:
            key = match.group(1)
            fields[key] = match.group(2)
        elif key and line.startswith("\t"):
            fields[key] += line.strip()
    return fields, text


def pbs_job_ids(ws: ClusterWorkspace) -> set:
    """Every job of the test user PBS knows, finished ones included."""
    out = ws.tb.ssh([ws.tb.pbs_bin("qselect"), "-x", "-u", ws.tb.ssh_user], scheduler="pbs").stdout
    return set(out.split())


def sge_resources(job: Dict[str, str]) -> Dict[str, str]:
    """The ``hard resource_list`` of ``qstat -j``, as {name: value}."""
    return dict(r.split("=", 1) for r in job.get("hard resource_list", "").split(","))


# --- what both schedulers do ---------------------------------------------------------


@each_scheduler_and_mode
def test_single_jobs_run_with_their_arguments(cluster_workspaces, scheduler, mode):
    scenario_single_jobs(workspace(cluster_workspaces, scheduler, mode))


@each_scheduler_and_mode
def test_log_directory_is_created_with_one_file_per_task(cluster_workspaces, scheduler, mode):
    scenario_custom_log_directory(workspace(cluster_workspaces, scheduler, mode))


@each_scheduler_and_mode
def test_sweep_arguments_and_environment_arrive_byte_for_byte(cluster_workspaces, scheduler,
                                                              mode):
    scenario_sweep_byte_for_byte(workspace(cluster_workspaces, scheduler, mode))


@each_scheduler_and_mode
def test_sweep_larger_than_the_array_limit_is_split(cluster_workspaces, scheduler, mode):
    ws = workspace(cluster_workspaces, scheduler, mode)
    # 25 tasks: arrays of 11, 11 and 3 on Slurm; of 10, 10 and 5 on Grid Engine and PBS.
    assert array_limit(ws.tb, scheduler) == ARRAY_LIMITS[scheduler]
    scenario_split_sweep(ws, 25)


@each_scheduler_and_mode
def test_throttled_array_runs_one_task_at_a_time(cluster_workspaces, scheduler, mode):
    ws = workspace(cluster_workspaces, scheduler, mode)
    num_tasks = array_limit(ws.tb, scheduler) + 2  # two arrays: the throttle spans both
    launch, out = scenario_throttled(ws, num_tasks, max_parallel=1, sleep=0.3)
    (first_id, _, _), (second_id, _, _) = launch.arrays()
    # The scheduler throttles each array to 1 task, and the second array waits for
    # the first, so that the throttle holds for the work unit.
    if scheduler == "pbs":
        first, text = pbs_job(ws, first_id)
        assert first.get("max_run_subjobs") == "1", text  # -J ...%1
        second, text = pbs_job(ws, second_id)
        assert second.get("max_run_subjobs") == "1", text
        assert second.get("depend", "").startswith(f"afterany:{first_id}"), text
    elif scheduler == "slurm":
        first, text = show_job(ws, first_id)
        assert first.get("ArrayTaskThrottle") == "1", text
        second, text = show_job(ws, second_id)
        assert second.get("ArrayTaskThrottle") == "1", text
        assert re.search(rf"\bDependency=afterany:{first_id}(?!\d)", text) or \
            first.get("JobState") == "COMPLETED", text
    else:
        first, text = qstat_j(ws, first_id)
        assert first.get("maximum concurrency") == "1", text  # qsub -tc 1
        second, text = qstat_j(ws, second_id)
        assert second.get("maximum concurrency") == "1", text
        assert re.search(rf"jid_predecessor_list[^:]*:\s*{first_id}\b", text), text  # -hold_jid
    finish_throttled(ws, launch, out, num_tasks)


@each_scheduler_and_mode
def test_second_launch_of_unchanged_code_transfers_no_archive(cluster_workspaces, scheduler,
                                                              mode):
    scenario_second_launch(workspace(cluster_workspaces, scheduler, mode))


# --- Slurm: resources and directives -----------------------------------------------------


@each_mode
def test_slurm_resource_requests_are_accepted_and_applied(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, "slurm", mode)
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


@each_mode
def test_slurm_explicit_directives_win_over_derived_ones(cluster_workspaces, mode):
    # ram=... derives --mem; the user asks per CPU instead, and sets the time
    # through resources: what they wrote is what Slurm gets.
    ws = workspace(cluster_workspaces, "slurm", mode)
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


# --- Grid Engine: resources and directives -----------------------------------------------


@each_mode
def test_sge_resource_requests_are_accepted_and_applied(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, "sge", mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"cpu": 2, "ram": 200 * MiB}, walltime="0:05:00",
                           queue="all.q", account="lxm3-it-account")
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "4"})
    launch.check()
    [(job_id, _, _)] = launch.arrays()
    job, text = qstat_j(ws, job_id)
    assert job.get("parallel environment", "").split() == ["smp", "range:", "2"], text
    resources = sge_resources(job)
    assert resources.get("h_vmem") == "100M", text  # 200 MiB over 2 slots: per slot
    assert resources.get("h_rt") == "300", text
    assert job.get("hard_queue_list") == "all.q", text
    assert job.get("account") == "lxm3-it-account", text
    [report] = ws.wait_for_reports(out, 1, launch).values()
    env = report["env"]
    assert env.get("NSLOTS") == "2"
    assert env.get("PE") == "smp"
    assert env.get("QUEUE") == "all.q"


@each_mode
def test_sge_explicit_resources_and_directives_win_over_derived_ones(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, "sge", mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"ram": 100 * MiB}, walltime="0:05:00",
                           resources={"h_vmem": "150M"},
                           extra_directives=["#$ -l h_rt=0:07:00"])
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "4"})
    [(job_id, _, _)] = launch.check().arrays()
    job, text = qstat_j(ws, job_id)
    resources = sge_resources(job)
    assert resources.get("h_vmem") == "150M", text
    assert resources.get("h_rt") == "420", text
    ws.wait_for_reports(out, 1, launch)


# --- PBS: resources, directives, and which qsub answers --------------------------------------


@each_mode
def test_pbs_resource_requests_are_accepted_and_applied(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, "pbs", mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"cpu": 2, "ram": 100 * MiB}, walltime="0:05:00",
                           queue=ws.tb.get("PBS_QUEUE"), account="lxm3-it-account", requeue=True)
    before = pbs_job_ids(ws)
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out}).check()
    [(job_id, _, _)] = launch.arrays()
    # The launch submitted its array and nothing else (asking which qsub answers
    # must not submit: PBS's qsub reads "-help" as -h -e lp, a held job).
    assert pbs_job_ids(ws) - before == {job_id}
    job, text = pbs_job(ws, job_id)
    assert job.get("Resource_List.select") == "1:ncpus=2:mem=100mb", text
    assert job.get("Resource_List.walltime") == "00:05:00", text
    assert job.get("queue") == ws.tb.get("PBS_QUEUE"), text
    assert job.get("Account_Name") == "lxm3-it-account", text
    assert job.get("Rerunable") == "True", text
    assert job.get("Keep_Files") == "oed", text  # output straight into the log directory
    [report] = ws.wait_for_reports(out, 1, launch).values()
    assert report["env"].get("NCPUS") == "2"  # what PBS gave the task


@each_mode
def test_pbs_explicit_directives_win_over_derived_ones(cluster_workspaces, mode):
    ws = workspace(cluster_workspaces, "pbs", mode)
    out = ws.out_dir()
    executor = ws.executor(requirements={"cpu": 2}, walltime="0:05:00",
                           resources={"select": "1:ncpus=1:mem=50mb"},
                           extra_directives=["#PBS -l walltime=0:07:00"])
    launch = ws.launch([job_unit(executor)], exe_env={"ECHO_OUT": out}).check()
    [(job_id, _, _)] = launch.arrays()
    job, text = pbs_job(ws, job_id)
    assert job.get("Resource_List.select") == "1:ncpus=1:mem=50mb", text
    assert job.get("Resource_List.walltime") == "00:07:00", text
    ws.wait_for_reports(out, 1, launch)


@each_mode
def test_another_schedulers_qsub_first_on_the_path_is_named(cluster_workspaces, mode):
    # The PBS host's PATH has Grid Engine's qsub (/usr/bin/qsub): without bin_dir,
    # the launch says whose qsub answered and what to set, and submits nothing.
    ws = workspace(cluster_workspaces, "pbs", mode)
    config = ws.write_config(pbs_bin_dir=False)
    launch = ws.launch([job_unit(ws.executor())], config=config)
    check_error(launch, "/usr/bin/qsub", "Grid Engine's (SGE ", "not PBS's", "[clusters.pbs] bin_dir",
                "nothing was submitted")
    ws.assert_nothing_submitted(launch)


def test_pbs_takes_a_long_non_ascii_title(cluster_workspaces):
    ws = workspace(cluster_workspaces, "pbs", "ssh")
    ws.title = "entraînement à grande échelle " * 12 + ws.title  # 372 characters
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor(), env_vars={"ECHO_OUT": out})]).check()
    [(job_id, _, _)] = launch.arrays()
    job, text = pbs_job(ws, job_id)
    assert job.get("Job_Name", "").startswith("entra_nement___grande__chelle_"), text
    ws.wait_for_reports(out, 1, launch)


def test_pbs_task_killed_at_its_walltime_is_failed_and_its_log_says_why(cluster_workspaces):
    """PBS has no warning before the walltime: it sends TERM to every process of the
    task (then KILL). The program dies of TERM, the job script records that, and
    PBS's own line about the kill is in the task's log."""
    ws = workspace(cluster_workspaces, "pbs", "ssh")
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor(walltime=5), env_vars={"ECHO_OUT": out, "ECHO_SLEEP": "300"})])
    launch.check()
    xid = str(launch.experiment_id)
    deadline = time.monotonic() + 240
    while True:
        [task] = status_json(xid)["work_units"]["1"]["tasks"]
        if task["state"] not in ("pending", "running"):
            break
        assert time.monotonic() < deadline, task
        time.sleep(2)
    assert (task["state"], task["exit_code"]) == ("failed", 143), task
    [log] = ws.log_files(launch).values()
    assert "PBS: job killed: walltime" in log, log
    assert log.rstrip().endswith("lxm3-exit: task 0 status 143"), log


# --- failures: exit code 1 and a message that says what happened --------------------------


# An unreachable host, failed authentication and LXM3_SSH_KEEP=0 are about ssh,
# before any scheduler is involved: they are checked once, with Slurm.


def test_lxm3_ssh_keep_0_ends_the_connection_with_the_launch(cluster_workspaces, monkeypatch,
                                                              runtime_dir):
    monkeypatch.setenv("LXM3_SSH_KEEP", "0")
    ws = workspace(cluster_workspaces, "slurm", "ssh")
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor())], exe_env={"ECHO_OUT": out}).check()
    assert not glob.glob(os.path.join(runtime_dir, "lxm3", "ssh-*")), "a connection was kept"
    masters = subprocess.run(["pgrep", "-f", "lxm3-ssh-.*ControlMaster=yes"], capture_output=True,
                             text=True).stdout.split()
    assert masters == [], "the launch's private master outlived it"
    ws.wait_for_reports(out, 1, launch)


def test_unreachable_host_shows_ssh_message(cluster_workspaces):
    ws = workspace(cluster_workspaces, "slurm", "ssh")
    config = ws.write_config(cluster={"port": 1})  # nothing listens on port 1
    launch = ws.launch([job_unit(ws.executor())], config=config)
    check_error(launch, "localhost", "port 1", "Connection refused")
    ws.assert_nothing_submitted(launch)


def test_failed_authentication_shows_ssh_message(cluster_workspaces):
    ws = workspace(cluster_workspaces, "slurm", "ssh")
    config = ws.write_config(cluster={"user": "lxm3-no-such-user"})
    launch = ws.launch([job_unit(ws.executor())], config=config)
    check_error(launch, "localhost", "Permission denied")
    ws.assert_nothing_submitted(launch)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_missing_submit_command_is_named(cluster_workspaces, scheduler):
    # Login-node mode with a PATH that has everything but sbatch or qsub (over SSH
    # the PATH is the remote login shell's, which the test bed cannot change).
    ws = workspace(cluster_workspaces, scheduler, "login")
    command = SUBMIT_COMMANDS[scheduler]
    path = path_without(ws.root, command)
    launch = ws.launch([job_unit(ws.executor())], path=path,
                       config=ws.write_config(pbs_bin_dir=False))
    check_error(launch, command, "not found")
    ws.assert_nothing_submitted(launch)


@each_scheduler_and_mode
def test_rejection_is_quoted_and_nothing_submitted(cluster_workspaces, scheduler, mode):
    # Slurm: an unknown partition; Grid Engine: an unknown resource; PBS: an unknown queue.
    options, message = REFUSED[scheduler]
    scenario_rejected(workspace(cluster_workspaces, scheduler, mode), options, message)


@each_mode
def test_slurm_gpu_request_rejection_is_quoted(cluster_workspaces, mode):
    # The test bed has no GPUs: Slurm refuses --gres=gpu:1.
    ws = workspace(cluster_workspaces, "slurm", mode)
    scenario_rejected(ws, {"requirements": {"gpu": 1}},
                      "Invalid generic resource (gres) specification")


@each_scheduler_and_mode
def test_half_failed_launch_says_what_was_submitted(cluster_workspaces, scheduler, mode):
    options, message = REFUSED[scheduler]
    scenario_half_failed(workspace(cluster_workspaces, scheduler, mode), options, message)


@each_scheduler_and_mode
def test_broken_transfer_is_reported_and_nothing_submitted(cluster_workspaces, scheduler, mode):
    scenario_unwritable_archives(workspace(cluster_workspaces, scheduler, mode))


@each_scheduler_and_mode
def test_forbidden_staging_directory_is_reported(cluster_workspaces, scheduler, mode):
    scenario_forbidden_staging(workspace(cluster_workspaces, scheduler, mode))
