"""What lxm3 asks PBS for, and how it reads PBS's answers (no test bed).

Directives, the qsub command of each array (the first task goes in ``-v``,
since qsub passes a job script no arguments), reruns, dependencies, and the
status parser fed with ``qstat -x -t -f`` text as OpenPBS 23.06 prints it (the
end-to-end tests in test_pbs.py run all of it on a real PBS).
"""

import textwrap

import pytest

import lxm3
from lxm3 import xm

MiB = 1 << 20
GiB = 1 << 30
PBS = lxm3.SCHEDULERS["pbs"]
PLAIN = lxm3.ClusterConfig(name="plain", raw={})


def directives(cluster=PLAIN, **options):
    return PBS.directives(lxm3.PBS(**options), cluster, "job")


@pytest.fixture
def site(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(textwrap.dedent("""\
        [[clusters]]
        name = "site"
        server = "login.example"
        [clusters.pbs]
        bin_dir = "/opt/pbs/bin"
        cpu_resource = "ncpus"
        memory_resource = "mem"
        gpu_resource = "ngpus"
        gpu_type_resource = "gpu_model"
        gpu_types = {A100 = "a100_80g"}
        """))
    return lxm3.Config.from_file(str(path)).cluster("site")


def test_requirements_become_one_select_chunk_per_replica():
    got = directives(requirements=xm.JobRequirements(cpu=4, ram=8 * GiB + 1, gpu=2))
    assert "-l select=1:ncpus=4:mem=8193mb:ngpus=2" in got  # memory rounded up to whole MiB
    got = directives(requirements=xm.JobRequirements(cpu=2, replicas=3, location="node07"))
    assert "-l select=3:ncpus=2:host=node07" in got
    assert not any(d.startswith("-l select") for d in directives())  # nothing asked: the queue's defaults


def test_gpu_models_need_the_sites_resource_name(site):
    with pytest.raises(ValueError, match=r"PBS cannot express .*gpu_type_resource"):
        directives(requirements=xm.JobRequirements(a100=1))
    got = directives(site, requirements=xm.JobRequirements(a100=1))
    assert "-l select=1:ngpus=1:gpu_model=a100_80g" in got


def test_what_pbs_cannot_express_is_refused():
    with pytest.raises(ValueError, match=r"PBS cannot express the requirement EPHEMERAL_STORAGE"):
        directives(requirements=xm.JobRequirements(disk=10 * GiB))
    with pytest.raises(ValueError, match=r"PBS cannot express the requirement service_tier"):
        directives(requirements=xm.JobRequirements(service_tier=xm.ServiceTier.BATCH))


def test_options_and_the_users_directives():
    got = directives(walltime=100 * 3600 + 61, queue="gpu", account="acc1", project="p9", requeue=True,
                     extra_directives=["#PBS -m ae", "-l walltime=1:00:00"])
    assert got[:2] == ["-N job", "-j oe"]
    assert "-l walltime=100:01:01" not in got and "-l walltime=1:00:00" in got  # the user's line wins
    assert {"-q gpu", "-A acc1", "-P p9", "-r y", "-m ae"} <= set(got)
    # A job-wide ncpus (or select) of the user's replaces the derived select: PBS refuses both.
    got = directives(requirements=xm.JobRequirements(cpu=4), resources={"ncpus": 2, "place": "excl"})
    assert [d for d in got if d.startswith("-l ")] == ["-l ncpus=2", "-l place=excl"]
    header = PBS.header(lxm3.PBS(queue="q1", skip_directives=["-j oe"]), PLAIN, "t_1_2")
    assert header.splitlines() == ["#PBS -N t_1_2", "#PBS -q q1"]


def test_gpu_requests_give_containers_gpus():
    assert lxm3._wants_gpu(lxm3.PBS(requirements=xm.JobRequirements(gpu=1)))
    assert lxm3._wants_gpu(lxm3.PBS(extra_directives=["-l select=2:ncpus=4:ngpus=1"]))
    assert lxm3._wants_gpu(lxm3.PBS(queue="gpu_long"))
    assert not lxm3._wants_gpu(lxm3.PBS(extra_directives=["-l select=1:ncpus=4:ngpus=0"]))
    assert not lxm3._wants_gpu(lxm3.PBS(resources={"ncpus": 8}))


def test_each_array_is_one_qsub_with_its_first_task_in_v():
    executor = lxm3.PBS()
    argv = lxm3.submission_argv(executor, "/s/job.sh", 20, 10, "/s/logs", chained=False)
    assert argv == ["qsub", "-J", "0-9", "-k", "oed", "-o", "/s/logs/", "-v", "LXM_FIRST_TASK=20", "/s/job.sh"]
    assert PBS.options_of(argv) == argv[:-3]
    # PBS refuses -J 0-0: one task is 0-1 with a step of 2.
    single = lxm3.submission_argv(executor, "/s/job.sh", 0, 1, "/s/logs", chained=False)
    assert single[1:3] == ["-J", "0-1:2"]


def test_throttle_chain_and_dependencies():
    executor = lxm3.PBS(max_parallel_tasks=2)
    argv = lxm3.submission_argv(executor, "/s/job.sh", 10, 10, "/s/logs", chained=True,
                                after=[("ok", ["5[].srv", "6[].srv"]), ("any", ["7[].srv"])])
    assert argv[1:3] == ["-J", "0-9%2"]
    assert argv[argv.index("-W") + 1] == "depend=afterok:5[].srv:6[].srv,afterany:7[].srv,afterany:{previous}"
    with pytest.raises(lxm3.LaunchError, match=r"PBS cannot make each task wait .*after_ok\(\)"):
        lxm3.submission_argv(executor, "/s/job.sh", 0, 3, "/s/logs", chained=False, after=[("each", ["5[].srv"])])


def test_a_users_v_directive_is_kept_in_the_one_v():
    """qsub's -v on the command line replaces the script's #PBS -v, and a second -v the first."""
    argv = lxm3.submission_argv(lxm3.PBS(extra_directives=["-v SITE=1,OTHER=2"]), "/s/job.sh", 3, 2,
                                "/s/logs", chained=False)
    assert argv.count("-v") == 1
    assert argv[argv.index("-v") + 1] == "SITE=1,OTHER=2,LXM_FIRST_TASK=3"
    assert PBS.options_of(argv)[-2:] == ["-v", "SITE=1,OTHER=2"]


def test_rerun_submits_one_range_with_lxm_rerun_and_without_the_launchs_dependencies():
    launch = PBS.options_of(lxm3.submission_argv(lxm3.PBS(max_parallel_tasks=3), "/s/job.sh", 0, 9, "/s/logs",
                                                 chained=False, after=[("ok", ["5[].srv"])]))
    rerun = PBS.rerun_argv(launch, [0, 1, 2], 1, after_previous=True)
    assert rerun[1:3] == ["-J", "0-2%3"] and "depend=afterok:5[].srv" not in rerun
    assert rerun[-2:] == ["-W", "depend=afterany:{previous}"]
    command = PBS.command_line(rerun, "/s/job.sh", 4)
    assert command[command.index("-v") + 1] == "LXM_RERUN=1,LXM_FIRST_TASK=4" and command.count("-v") == 1
    assert PBS.rerun_argv(launch, [0], 2, after_previous=False)[1:3] == ["-J", "0-1:2%3"]
    with pytest.raises(ValueError, match="one range"):
        PBS.rerun_argv(launch, [0, 2], 1, after_previous=False)


QSTAT = """\
Job Id: 16[].srv
    job_state = B
    substate = 70
Job Id: 16[0].srv
    job_state = X
    substate = 92
    Exit_status = 0
Job Id: 16[1].srv
    job_state = X
    substate = 92
    Exit_status = 3
Job Id: 16[2].srv
    job_state = X
    substate = 91
    Exit_status = 271
Job Id: 16[3].srv
    job_state = R
    substate = 42
Job Id: 16[4].srv
    job_state = Q
    substate = 10
Job Id: 16[5].srv
    job_state = F
    substate = 91
Job Id: 16[6].srv
    job_state = F
    substate = 93
    Exit_status = -29
Job Id: 16[7].srv
    job_state = H
    substate = 22
Job Id: 16[8].srv
    job_state = F
    substate = 92
    Exit_status = 265
Job Id: 16[9].srv
    job_state = F
    substate = 92
Job Id: 17[0].srv
    job_state = R
    substate = 42
"""


def test_qstat_states_and_exit_statuses():
    queued, finished = PBS.read_status(QSTAT.splitlines(), [], {"16[].srv"})
    assert queued == {("16[].srv", 3): "running", ("16[].srv", 4): "pending", ("16[].srv", 7): "pending"}
    assert finished == {
        ("16[].srv", 0): ("completed", "0"),
        ("16[].srv", 1): ("failed", "3"),
        ("16[].srv", 2): ("cancelled", "143"),  # qdel: TERM, 256 + 15, said as a shell says it
        ("16[].srv", 5): ("cancelled", ""),  # deleted before it ran, or its dependency failed
        ("16[].srv", 6): ("failed", ""),  # -29: PBS ended it at its walltime
        ("16[].srv", 8): ("failed", "137"),  # KILL
        ("16[].srv", 9): ("cancelled", ""),  # removed, its dependency unmet: it never ran
    }


def test_log_names_and_task_names():
    assert PBS.task_job("16[].srv", 7) == "16[7].srv"
    assert PBS.task_log_name("job", "16[].srv", 7) == "16[7].srv.OU"
    assert PBS.log_name_patterns("job", ["16[].srv", "not-an-id"]) == ["16\\[*.OU"]


def test_submit_output_is_read_as_the_whole_pbs_job_id():
    sub = lxm3.ArraySubmission(1, 0, 3, ["qsub"])
    assert lxm3.parse_submission_output("OK 1:0 16[].pbs01.example.org\n", [sub]) is None
    assert sub.job_id == "16[].pbs01.example.org"
    garbage = lxm3.ArraySubmission(1, 0, 3, ["qsub"])
    assert "no job id" in lxm3.parse_submission_output("OK 1:0 qsub: error\n", [garbage])


def test_bin_dir_goes_first_on_the_path_of_everything_run_there(site, tmp_path):
    assert site.scheduler_bin("pbs") == "/opt/pbs/bin"
    assert site.path_line() == 'PATH=/opt/pbs/bin:"$PATH"\n'
    assert PLAIN.path_line() == ""
    here = lxm3.ClusterConfig(name="here", raw={"pbs": {"bin_dir": str(tmp_path)}})
    (tmp_path / "qsub").write_text("#!/bin/sh\necho pbs_version = 99.1\n")
    (tmp_path / "qsub").chmod(0o755)
    assert lxm3.Connection(here).run_script("qsub --version\n", "asking") == "pbs_version = 99.1\n"


def test_job_names_are_ones_every_scheduler_takes():
    """PBS refuses non-ASCII characters and names over 236 characters ("illegal -N
    value", "Job name is too long"); Grid Engine fails on non-ASCII ones."""
    name = lxm3._job_name("résumé (v2): " * 40, 1796183144138, 3)
    assert len(name) <= 236 and name.endswith("_1796183144138_3")
    assert name.isascii() and name.replace("_", "").isalnum()
    assert lxm3._job_name("sweep lr=0.1", 7, 1) == "sweep_lr_0_1_7_1"
