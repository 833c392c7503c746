"""What lxm3 asks Slurm and Grid Engine for: directives, submission commands, arrays.

Unit tests, no test bed: each option of ``Slurm`` and ``GridEngine`` and each
``xm.JobRequirements`` field is rendered the way the scheduler reads it, or
refused with an error when the scheduler cannot express it.
"""

import datetime
import os
import re
import subprocess
import textwrap

import pytest

import lxm3
from lxm3 import xm

MiB = 1 << 20
GiB = 1 << 30

SITE_CONFIG = """\
    [[clusters]]
    name = "site"
    server = "login.example"
    [clusters.slurm]
    gpu_types = {A100 = "a100_80g", h100 = "hopper"}
    [clusters.sge]
    parallel_environment = "threads"
    memory_resource = "mem_free"
    gpu_resource = "gpus"
    gpu_type_resource = "gpu_model"
    gpu_types = {A100 = "nvidia_a100"}

    [[clusters]]
    name = "plain"
    server = "other.example"
"""


@pytest.fixture
def site(tmp_path):
    """The clusters of SITE_CONFIG, read from a config file like a user's."""
    path = tmp_path / "site.toml"
    path.write_text(textwrap.dedent(SITE_CONFIG))
    config = lxm3.Config.from_file(str(path))
    return {name: config.cluster(name) for name in ("site", "plain")}


PLAIN = lxm3.ClusterConfig(name="plain", raw={})


def slurm(cluster=PLAIN, **options):
    return lxm3.SCHEDULERS["slurm"].directives(lxm3.Slurm(**options), cluster, "job")


def sge(cluster=PLAIN, **options):
    return lxm3.SCHEDULERS["sge"].directives(lxm3.GridEngine(**options), cluster, "job")


def req(**resources):
    return xm.JobRequirements(**resources)


def only(directives, prefix):
    """The directives that start with ``prefix`` (e.g. all "--mem" ones)."""
    return [d for d in directives if d.split("=")[0].split()[0] == prefix
            or (prefix.startswith("-l ") and d.startswith(prefix))]


# --- Slurm: requirements ------------------------------------------------------------


def test_slurm_defaults_name_the_job_and_nothing_else():
    assert slurm() == ["--job-name=job"]


def test_slurm_cpu_is_cpus_per_task_rounded_up():
    assert "--cpus-per-task=4" in slurm(requirements=req(cpu=4))
    assert only(slurm(requirements=req(cpu=2.5)), "--cpus-per-task") == ["--cpus-per-task=3"]


@pytest.mark.parametrize("ram, expected", [
    (16 * GiB, "--mem=16384M"),
    (100 * MiB, "--mem=100M"),
    (100 * MiB + 1, "--mem=101M"),  # rounded up, never below the request
    (1000, "--mem=1M"),
    (1.5 * GiB, "--mem=1536M"),
])  # fmt: skip
def test_slurm_ram_is_mem_in_mebibytes_rounded_up(ram, expected):
    assert only(slurm(requirements=req(ram=ram)), "--mem") == [expected]


def test_slurm_gpu_count_is_a_gres_request():
    assert only(slurm(requirements=req(gpu=2)), "--gres") == ["--gres=gpu:2"]
    assert only(slurm(requirements=req(local_gpu=1)), "--gres") == ["--gres=gpu:1"]


def test_slurm_typed_gpu_uses_the_sites_name_from_the_config(site):
    assert only(slurm(site["site"], requirements=req(a100=1)), "--gres") == \
        ["--gres=gpu:a100_80g:1"]
    # A lower-case key in the config works too.
    assert only(slurm(site["site"], requirements=req(h100=4)), "--gres") == ["--gres=gpu:hopper:4"]
    # Without a site name, the model's own name in lower case.
    assert only(slurm(site["plain"], requirements=req(a100=1)), "--gres") == ["--gres=gpu:a100:1"]
    assert only(slurm(site["site"], requirements=req(v100=2)), "--gres") == ["--gres=gpu:v100:2"]


def test_slurm_replicas_are_tasks_and_location_a_nodelist():
    directives = slurm(requirements=xm.JobRequirements(cpu=2, replicas=4, location="node07"))
    assert "--ntasks=4" in directives
    assert "--cpus-per-task=2" in directives
    assert "--nodelist=node07" in directives
    assert only(slurm(requirements=req(cpu=1)), "--ntasks") == []


def test_slurm_disk_is_tmp_space():
    assert only(slurm(requirements=req(disk=10 * GiB)), "--tmp") == ["--tmp=10240M"]


@pytest.mark.parametrize("requirements, message", [
    (lambda: xm.JobRequirements(tpu_v2="2x2"), "Slurm cannot express the requirement TPU_V2=4"),
    (lambda: xm.JobRequirements(cpu=1, service_tier=xm.ServiceTier.BATCH),
     "Slurm cannot express the requirement service_tier=ServiceTier.BATCH"),
])  # fmt: skip
def test_slurm_refuses_what_it_cannot_express(requirements, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        slurm(requirements=requirements())


def test_slurm_service_tier_error_points_to_qos():
    with pytest.raises(ValueError, match=re.escape(
            "Slurm cannot express the requirement service_tier=ServiceTier.FREEBIE; "
            "use qos=... instead")):
        slurm(requirements=xm.JobRequirements(service_tier=xm.ServiceTier.FREEBIE))


# --- walltime -------------------------------------------------------------------------


@pytest.mark.parametrize("walltime, slurm_time, sge_time", [
    (datetime.timedelta(hours=2), "02:00:00", "02:00:00"),
    (datetime.timedelta(hours=36, seconds=5), "1-12:00:05", "36:00:05"),
    (3600, "01:00:00", "01:00:00"),
    (90.2, "00:01:31", "00:01:31"),  # whole seconds, rounded up
    ("2:00:00", "02:00:00", "02:00:00"),
    ("1-00:00:00", "1-00:00:00", "24:00:00"),
    ("2-03:04:05", "2-03:04:05", "51:04:05"),
    ("90", "01:30:00", "01:30:00"),  # minutes, as sbatch --time reads it
    ("1:30", "00:01:30", "00:01:30"),  # minutes:seconds
    ("1-2", "1-02:00:00", "26:00:00"),  # days-hours
    ("1-2:30", "1-02:30:00", "26:30:00"),  # days-hours:minutes
])  # fmt: skip
def test_walltime_forms(walltime, slurm_time, sge_time):
    assert only(slurm(walltime=walltime), "--time") == [f"--time={slurm_time}"]
    assert only(sge(walltime=walltime), "-l h_rt") == [f"-l h_rt={sge_time}"]


@pytest.mark.parametrize("walltime, error, message", [
    *[(text, ValueError, f"walltime {text!r} is not like '30', '2:00:00' or '1-00:00:00'")
      for text in ["abc", "2h", "1:2:3:4", "", "-5", "1-", "1.5:00"]],
    *[(value, ValueError, f"walltime must be positive, got {value!r}")
      for value in [0, -60, datetime.timedelta(0)]],
    *[(value, TypeError, "walltime must be a timedelta, seconds or a string like '2:00:00', "
                         f"not {value!r}")
      for value in [True, [1]]],
])  # fmt: skip
@pytest.mark.parametrize("executor", [lxm3.Slurm, lxm3.GridEngine])
def test_invalid_walltime_is_an_error_where_the_executor_is_written(executor, walltime, error,
                                                                    message):
    with pytest.raises(error, match=re.escape(message)):
        executor(walltime=walltime)


def test_no_walltime_no_time_directive():
    assert only(slurm(), "--time") == []
    assert only(sge(), "-l h_rt") == []


# --- Slurm: executor options ----------------------------------------------------------


def test_slurm_partition_account_qos_exclusive():
    directives = slurm(partition="gpu", account="proj-42", qos="high", exclusive=True)
    assert directives == ["--job-name=job", "--partition=gpu", "--account=proj-42",
                          "--qos=high", "--exclusive"]
    assert "--exclusive" not in slurm(exclusive=False)


def test_slurm_resources_are_directives():
    directives = slurm(resources={"constraint": "v100|a100", "requeue": True, "nice": 10})
    assert "--constraint=v100|a100" in directives
    assert "--requeue" in directives
    assert "--nice=10" in directives


@pytest.mark.parametrize("extra", ["--mem=1G", "#SBATCH --mem=1G", "  #SBATCH   --mem=1G  "])
def test_slurm_extra_directive_replaces_the_derived_one(extra):
    directives = slurm(requirements=req(ram=4 * GiB), extra_directives=[extra])
    assert only(directives, "--mem") == ["--mem=1G"]


def test_slurm_explicit_options_win_over_derived_ones():
    directives = slurm(
        requirements=req(cpu=4, ram=4 * GiB, gpu=2), walltime="1:00:00", partition="cpu",
        resources={"gres": "gpu:a100:1", "mem": "2G"},
        extra_directives=["-c 8", "#SBATCH -p gpu", "--time=2:00:00"],
    )
    assert only(directives, "--gres") == ["--gres=gpu:a100:1"]
    assert only(directives, "--mem") == ["--mem=2G"]
    assert only(directives, "--cpus-per-task") == []
    assert only(directives, "-c") == ["-c 8"]
    assert only(directives, "--partition") == []
    assert only(directives, "-p") == ["-p gpu"]
    assert only(directives, "--time") == ["--time=2:00:00"]


@pytest.mark.parametrize("requirements, explicit, derived", [
    (req(ram=4 * GiB), "--mem-per-cpu=2G", "--mem"),
    (req(ram=4 * GiB), "--mem-per-gpu=8G", "--mem"),
    (req(gpu=2), "--gpus=2", "--gres"),
    (req(gpu=2), "--gpus-per-node=2", "--gres"),
    (req(gpu=2), "-G 2", "--gres"),
    (req(cpu=4), "--cpus-per-gpu=4", "--cpus-per-task"),
])  # fmt: skip
def test_slurm_explicit_request_of_the_same_resource_replaces_the_derived_one(
        requirements, explicit, derived):
    # sbatch refuses --mem with --mem-per-cpu/--mem-per-gpu ("mutually exclusive"),
    # --cpus-per-task with --cpus-per-gpu, and a --gres=gpu request beside --gpus:
    # the user's own request must replace the one lxm3 derived, not clash with it.
    directives = slurm(requirements=requirements, extra_directives=[explicit])
    assert explicit in directives
    assert only(directives, derived) == [], directives


def test_slurm_header_prefix_and_skip_directives():
    executor = lxm3.Slurm(partition="debug", qos="high",
                          extra_directives=["#SBATCH --mail-type=END", "--signal=USR1@60"],
                          skip_directives=["--qos"])
    header = lxm3.scheduler_of(executor).header(executor, PLAIN, "my_job")
    assert header.splitlines() == [
        "#SBATCH --job-name=my_job",
        "#SBATCH --partition=debug",
        "#SBATCH --mail-type=END",
        "#SBATCH --signal=USR1@60",
    ]


# --- Grid Engine: requirements --------------------------------------------------------


def test_sge_defaults():
    # -S: Grid Engine otherwise runs the script with csh; -j y: one log per task;
    # no -R at all (a bare -R is rejected).
    assert sge() == ["-N job", "-S /bin/bash", "-j y"]


def test_sge_cpu_is_a_parallel_environment(site):
    assert only(sge(requirements=req(cpu=4)), "-pe") == ["-pe smp 4"]
    assert only(sge(requirements=req(cpu=2.5)), "-pe") == ["-pe smp 3"]
    assert only(sge(requirements=req(cpu=1)), "-pe") == []
    # The parallel environment's name comes from the cluster's config.
    assert only(sge(site["site"], requirements=req(cpu=4)), "-pe") == ["-pe threads 4"]


def test_sge_ram_is_per_slot_h_vmem(site):
    assert only(sge(requirements=req(ram=8 * GiB)), "-l h_vmem") == ["-l h_vmem=8192M"]
    assert only(sge(requirements=req(cpu=4, ram=8 * GiB)), "-l h_vmem") == ["-l h_vmem=2048M"]
    # Rounded up, so that slots x per-slot memory covers the request.
    assert only(sge(requirements=req(cpu=3, ram=1 * GiB)), "-l h_vmem") == ["-l h_vmem=342M"]
    assert only(sge(requirements=req(ram=1000)), "-l h_vmem") == ["-l h_vmem=1M"]
    # The memory complex's name comes from the cluster's config.
    directives = sge(site["site"], requirements=req(cpu=2, ram=8 * GiB))
    assert only(directives, "-l mem_free") == ["-l mem_free=4096M"]
    assert only(directives, "-l h_vmem") == []


def test_sge_ram_is_divided_over_the_parallel_environment_slots():
    directives = sge(requirements=req(ram=8 * GiB), parallel_environments={"mpi": 8})
    assert only(directives, "-pe") == ["-pe mpi 8"]
    assert only(directives, "-l h_vmem") == ["-l h_vmem=1024M"]


def test_sge_gpu_is_a_complex(site):
    assert only(sge(requirements=req(gpu=2)), "-l gpu") == ["-l gpu=2"]
    assert only(sge(site["site"], requirements=req(gpu=1)), "-l gpus") == ["-l gpus=1"]


def test_sge_typed_gpu_needs_the_type_complex_from_the_config(site):
    directives = sge(site["site"], requirements=req(a100=2))
    assert "-l gpus=2" in directives
    assert "-l gpu_model=nvidia_a100" in directives
    with pytest.raises(ValueError, match="gpu_type_resource"):
        sge(site["plain"], requirements=req(a100=1))


def test_sge_location_is_a_hostname_request():
    assert "-l hostname=node07" in sge(requirements=xm.JobRequirements(location="node07"))


@pytest.mark.parametrize("requirements, message", [
    (lambda: xm.JobRequirements(replicas=2), "Grid Engine cannot express the requirement replicas=2"),
    (lambda: xm.JobRequirements(disk=10 * GiB),
     "Grid Engine cannot express the requirement EPHEMERAL_STORAGE=1.07374e+10"),
    (lambda: xm.JobRequirements(tpu_v3="2x2"), "Grid Engine cannot express the requirement TPU_V3=4"),
    (lambda: xm.JobRequirements(service_tier=xm.ServiceTier.BATCH),
     "Grid Engine cannot express the requirement service_tier=ServiceTier.BATCH"),
])  # fmt: skip
def test_sge_refuses_what_it_cannot_express(requirements, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sge(requirements=requirements())


def test_sge_replicas_error_suggests_a_parallel_environment():
    with pytest.raises(ValueError, match=re.escape(
            "Grid Engine cannot express the requirement replicas=4; use a parallel environment "
            "(parallel_environments={'mpi': N})")):
        sge(requirements=xm.JobRequirements(replicas=4))


# --- Grid Engine: executor options ----------------------------------------------------


def test_sge_queue_project_account():
    directives = sge(queue="all.q", project="proj", account="acct")
    assert "-q all.q" in directives
    assert "-P proj" in directives
    assert "-A acct" in directives


@pytest.mark.parametrize("reserved, expected", [(True, ["-R y"]), (False, ["-R n"]), (None, [])])
def test_sge_reserved(reserved, expected):
    assert only(sge(reserved=reserved), "-R") == expected


def test_sge_merge_output_and_shell():
    assert only(sge(merge_output=False), "-j") == ["-j n"]
    assert only(sge(merge_output=True), "-j") == ["-j y"]
    assert only(sge(shell="/bin/zsh"), "-S") == ["-S /bin/zsh"]


def test_sge_resources_are_l_requests_and_win_over_derived_ones():
    directives = sge(requirements=req(ram=8 * GiB), resources={"h_vmem": "4G", "arch": "lx-amd64"})
    assert only(directives, "-l h_vmem") == ["-l h_vmem=4G"]
    assert "-l arch=lx-amd64" in directives


@pytest.mark.parametrize("prefix", ["", "#$ ", "#$"])
def test_sge_extra_directives_win_over_derived_ones(prefix):
    directives = sge(requirements=req(cpu=4), walltime="1:00:00",
                     extra_directives=[f"{prefix}-l h_rt=3:00:00", f"{prefix}-pe mpi 2",
                                       f"{prefix}-m bea"])
    assert only(directives, "-l h_rt") == ["-l h_rt=3:00:00"]
    assert only(directives, "-pe") == ["-pe mpi 2"]
    assert "-m bea" in directives


def test_sge_header_prefix_and_skip_directives():
    executor = lxm3.GridEngine(queue="all.q", reserved=True,
                               extra_directives=["#$ -m bea", "-cwd"], skip_directives=["-R "])
    header = lxm3.scheduler_of(executor).header(executor, PLAIN, "my_job")
    assert header.splitlines() == [
        "#$ -N my_job",
        "#$ -S /bin/bash",
        "#$ -q all.q",
        "#$ -j y",
        "#$ -m bea",
        "#$ -cwd",
    ]


# --- both schedulers: options refused ---------------------------------------------------


@pytest.mark.parametrize("render, options, message", [
    (slurm, {"partition": "debug\n#SBATCH --uid=0"},
     "Slurm(partition=...): 'debug\\n#SBATCH --uid=0' contains a newline"),
    (slurm, {"account": "a\rb"}, "Slurm(account=...): 'a\\rb' contains a carriage return"),
    (slurm, {"resources": {"constraint": "x\ny"}},
     "Slurm(resources={'constraint': ...}): 'x\\ny' contains a newline"),
    (slurm, {"requirements": xm.JobRequirements(location="node1\nnode2")},
     "Slurm(requirements=xm.JobRequirements(location=...)): 'node1\\nnode2' contains a newline"),
    (sge, {"queue": "all.q\n#$ -u root"},
     "GridEngine(queue=...): 'all.q\\n#$ -u root' contains a newline"),
    (sge, {"resources": {"arch": "x\ny"}},
     "GridEngine(resources={'arch': ...}): 'x\\ny' contains a newline"),
    (sge, {"parallel_environments": {"mpi\n": 2}},
     "GridEngine(parallel_environments=...) name: 'mpi\\n' contains a newline"),
], ids=["slurm-partition", "slurm-account", "slurm-resources", "slurm-location", "sge-queue",
        "sge-resources", "sge-parallel_environments"])  # fmt: skip
def test_values_with_newlines_are_refused(render, options, message):
    with pytest.raises(ValueError, match=re.escape(
            message + "; scheduler directives and arguments are single lines of printable text")):
        render(**options)


@pytest.mark.parametrize("executor", [lxm3.Slurm, lxm3.GridEngine])
def test_options_checked_where_the_executor_is_written(executor):
    name = executor.__name__
    with pytest.raises(ValueError, match=re.escape(f"{name}(max_parallel_tasks=...) must be at least 1")):
        executor(max_parallel_tasks=0)
    with pytest.raises(TypeError, match=re.escape(f"{name}(extra_directives=...) must be a list of strings")):
        executor(extra_directives="--mem=1G")
    with pytest.raises(TypeError, match=re.escape(f"{name}(modules=...) must be a list of strings")):
        executor(modules="gcc")


def test_modules_are_loaded_before_the_task_and_a_failure_stops_it():
    lines = lxm3.module_lines(["gcc/12", "cuda 12"]).splitlines()[-2:]
    assert lines[0].startswith("module load gcc/12 || lxm_fail")
    assert lines[1].startswith("module load 'cuda 12' || lxm_fail")


# --- the submission command -----------------------------------------------------------


def test_sbatch_command_of_an_array():
    argv = lxm3.submission_argv(lxm3.Slurm(), "/s/wu1/job.sh", 0, 10, "/s/wu1/logs", False)
    assert argv == ["sbatch", "--parsable", "--array=0-9", "--output=/s/wu1/logs/%x-%A_%a.log",
                    "/s/wu1/job.sh", "0"]


def test_sbatch_throttle_offset_and_chaining():
    executor = lxm3.Slurm(max_parallel_tasks=3)
    argv = lxm3.submission_argv(executor, "/s/job.sh", 11, 3, "/logs", True)
    assert "--array=0-2%3" in argv  # each array is indexed from 0...
    assert argv[-2:] == ["/s/job.sh", "11"]  # ...and told its first task
    assert "--dependency=afterany:{previous}" in argv


@pytest.mark.parametrize("options", [
    {"extra_directives": ["--output=/mine/%j.out"]},
    {"extra_directives": ["#SBATCH -o /mine/%j.out"]},
    {"resources": {"output": "/mine/%j.out"}},
])  # fmt: skip
def test_sbatch_output_is_left_to_the_user_when_set(options):
    argv = lxm3.submission_argv(lxm3.Slurm(**options), "/s/job.sh", 0, 2, "/logs", False)
    assert not any(a.startswith("--output") for a in argv)


def test_qsub_command_of_an_array():
    argv = lxm3.submission_argv(lxm3.GridEngine(), "/s/job.sh", 0, 10, "/logs", False)
    assert argv == ["qsub", "-terse", "-t", "1-10", "-o", "/logs/$JOB_NAME-$JOB_ID.$TASK_ID.log",
                    "/s/job.sh", "0"]


def test_qsub_throttle_offset_chaining_and_separate_errors():
    executor = lxm3.GridEngine(max_parallel_tasks=2, merge_output=False)
    argv = lxm3.submission_argv(executor, "/s/job.sh", 10, 5, "/logs", True)
    assert argv[argv.index("-t") + 1] == "1-5"
    assert argv[argv.index("-tc") + 1] == "2"
    assert argv[argv.index("-hold_jid") + 1] == "{previous}"
    assert argv[argv.index("-e") + 1] == "/logs/$JOB_NAME-$JOB_ID.$TASK_ID.err"
    assert argv[-2:] == ["/s/job.sh", "10"]


def test_qsub_output_is_left_to_the_user_when_set():
    executor = lxm3.GridEngine(extra_directives=["#$ -o /mine/"])
    argv = lxm3.submission_argv(executor, "/s/job.sh", 0, 2, "/logs", False)
    assert "-o" not in argv


def test_log_file_names_hold_the_job_id_and_task_index():
    assert lxm3.SCHEDULERS["slurm"].log_path_pattern("/l") == "/l/%x-%A_%a.log"
    assert lxm3.SCHEDULERS["sge"].log_path_pattern("/l") == "/l/$JOB_NAME-$JOB_ID.$TASK_ID.log"


def test_plan_chains_arrays_only_when_throttled():
    plain = lxm3.plan_submissions(1, lxm3.Slurm(), "/s/job.sh", 25, "/logs", 11)
    assert [(s.first_task, s.count) for s in plain] == [(0, 11), (11, 11), (22, 3)]
    assert not any("--dependency" in a for s in plain for a in s.argv)
    throttled = lxm3.plan_submissions(1, lxm3.Slurm(max_parallel_tasks=2), "/s/job.sh", 25,
                                      "/logs", 11)
    chained = ["--dependency=afterany:{previous}" in s.argv for s in throttled]
    assert chained == [False, True, True]


# --- arrays -------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks, limit, expected", [
    (25, 11, [(0, 11), (11, 11), (22, 3)]),
    (25, 10, [(0, 10), (10, 10), (20, 5)]),
    (22, 11, [(0, 11), (11, 11)]),
    (10, 10, [(0, 10)]),
    (1, 11, [(0, 1)]),
    (5, None, [(0, 5)]),
    (5, 0, [(0, 5)]),
])  # fmt: skip
def test_split_array(num_tasks, limit, expected):
    assert lxm3.split_array(num_tasks, limit) == expected


def info(**limits):
    return lxm3.ClusterInfo(staging="/s", home="/h", **limits)


def test_array_limit():
    # Slurm: MaxArraySize bounds the index, so an array holds that many tasks;
    # max_array_tasks (SchedulerParameters) may bound it further.
    assert lxm3.SCHEDULERS["slurm"].array_limit(info(max_array_size=11)) == 11
    assert lxm3.SCHEDULERS["slurm"].array_limit(info(max_array_size=1001, max_array_tasks=100)) == 100
    assert lxm3.SCHEDULERS["slurm"].array_limit(info()) is None
    # Grid Engine: max_aj_tasks, 0 meaning no limit.
    assert lxm3.SCHEDULERS["sge"].array_limit(info(max_array_tasks=10)) == 10
    assert lxm3.SCHEDULERS["sge"].array_limit(info(max_array_tasks=0)) is None


# --- submission output --------------------------------------------------------------


def plan(*chunks):
    return [lxm3.ArraySubmission(wid, first, count, ["true"]) for wid, first, count in chunks]


def test_parse_submission_output_fills_in_job_ids():
    subs = plan((1, 0, 11), (1, 11, 3), (2, 0, 1))
    assert lxm3.parse_submission_output("OK 1:0 123\nOK 1:11 124\nOK 2:0 125\n", subs) is None
    assert [s.job_id for s in subs] == ["123", "124", "125"]


def test_parse_submission_output_returns_the_schedulers_message():
    subs = plan((1, 0, 1), (2, 0, 1))
    output = "OK 1:0 77\nFAIL 2:0\nsbatch: error: invalid partition specified: nosuch\n"
    error = lxm3.parse_submission_output(output, subs)
    assert error == "sbatch: error: invalid partition specified: nosuch"
    assert [s.job_id for s in subs] == ["77", None]


def test_parse_submission_output_without_a_job_id_is_an_error():
    subs = plan((1, 0, 1))
    error = lxm3.parse_submission_output("", subs)
    assert error and "no job id" in error
    assert subs[0].job_id is None


def fake_scheduler(tmp_path, name, script):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(script))
    path.chmod(0o755)
    return str(bindir)


def run_submission(tmp_path, bindir, submissions):
    scheduler = lxm3.SCHEDULERS["sge" if submissions[0].argv[0] == "qsub" else "slurm"]
    script = lxm3.submission_script([str(tmp_path / "logs")], submissions, str(tmp_path / "exp"), scheduler)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return lxm3.parse_submission_output(proc.stdout, submissions)


def test_sbatch_id_with_cluster_name_and_chaining(tmp_path):
    # sbatch --parsable prints "ID;CLUSTER" on multi-cluster sites.
    bindir = fake_scheduler(tmp_path, "sbatch", """\
        echo "$*" >> "$CALLS"
        n=$(wc -l < "$CALLS")
        echo "$((122 + n));cluster-a"
    """)
    executor = lxm3.Slurm(max_parallel_tasks=1)
    subs = lxm3.plan_submissions(1, executor, "/s/job.sh", 13, str(tmp_path / "logs"), 11)
    assert run_submission(tmp_path, bindir, subs) is None
    assert [s.job_id for s in subs] == ["123", "124"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "--dependency=afterany:123 " in calls[1] + " "
    assert (tmp_path / "logs").is_dir()


def test_qsub_terse_array_id_is_the_job_id(tmp_path):
    # qsub -terse prints "ID.1-N:1" for an array.
    bindir = fake_scheduler(tmp_path, "qsub", """\
        echo "$*" >> "$CALLS"
        echo "45.1-10:1"
    """)
    subs = lxm3.plan_submissions(3, lxm3.GridEngine(max_parallel_tasks=2), "/s/job.sh", 12,
                                 str(tmp_path / "logs"), 10)
    assert run_submission(tmp_path, bindir, subs) is None
    assert [s.job_id for s in subs] == ["45", "45"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "-hold_jid 45 " in calls[1]


def test_rejected_submission_stops_and_quotes_the_scheduler(tmp_path):
    bindir = fake_scheduler(tmp_path, "sbatch", """\
        echo "$*" >> "$CALLS"
        if [[ $* == *nosuch* ]]; then
          echo "sbatch: error: invalid partition specified: nosuch" >&2
          exit 1
        fi
        echo 99
    """)
    subs = [*lxm3.plan_submissions(1, lxm3.Slurm(), "/s/1/job.sh", 1, "/tmp/l", None),
            *lxm3.plan_submissions(2, lxm3.Slurm(extra_directives=["--partition=nosuch"]),
                                   "/s/nosuch/job.sh", 1, "/tmp/l", None),
            *lxm3.plan_submissions(3, lxm3.Slurm(), "/s/3/job.sh", 1, "/tmp/l", None)]
    error = run_submission(tmp_path, bindir, subs)
    assert error == "sbatch: error: invalid partition specified: nosuch"
    # Independent arrays go out together: what was submitted is known and reported.
    assert [s.job_id for s in subs] == ["99", None, "99"]
    assert len((tmp_path / "calls").read_text().splitlines()) == 3


def test_no_submission_starts_after_a_rejection(tmp_path):
    # The rejection comes after 0.2 s, an accepted call after 0.6 s: a worker's
    # second call starts after the rejection is known, so none is made.
    bindir = fake_scheduler(tmp_path, "sbatch", """\
        echo "$*" >> "$CALLS"
        if [[ $* == *nosuch* ]]; then
          sleep 0.2
          echo "sbatch: error: invalid partition specified: nosuch" >&2
          exit 1
        fi
        sleep 0.6
        echo 7
    """)
    batch = lxm3.SUBMIT_PARALLELISM
    subs = []
    for wid in range(1, 2 * batch + 1):  # each worker gets two work units
        script = "/s/nosuch/job.sh" if wid == 2 else f"/s/{wid}/job.sh"
        subs += lxm3.plan_submissions(wid, lxm3.Slurm(), script, 1, "/tmp/l", None)
    error = run_submission(tmp_path, bindir, subs)
    assert "invalid partition specified: nosuch" in error
    calls = (tmp_path / "calls").read_text()
    called = {wid for wid in range(1, 2 * batch + 1) if f"/s/{wid}/job.sh" in calls}
    submitted = {s.work_unit_id for s in subs if s.job_id is not None}
    assert submitted == called  # what is reported as submitted is exactly what was
    assert not any(s.job_id for s in subs[batch:]), "a submission started after the rejection"
    assert "/s/nosuch/job.sh" in calls and subs[1].job_id is None


def test_independent_arrays_are_submitted_at_once_and_chains_in_order(tmp_path):
    # Each fake sbatch sleeps: submitted one after another, 16 would take 3.2 s.
    bindir = fake_scheduler(tmp_path, "sbatch", """\
        sleep 0.2
        echo "$*" >> "$CALLS"
        echo $RANDOM
    """)
    subs = lxm3.plan_submissions(1, lxm3.Slurm(), "/s/1/job.sh", 88, "/tmp/l", 11)  # 8 arrays
    subs += lxm3.plan_submissions(2, lxm3.Slurm(max_parallel_tasks=1), "/s/2/job.sh", 33, "/tmp/l", 11)
    assert run_submission(tmp_path, bindir, subs) is None
    assert all(s.job_id for s in subs)
    calls = (tmp_path / "calls").read_text().splitlines()
    chained = [c for c in calls if "/s/2/" in c]
    assert [c.split()[-1] for c in chained] == ["0", "11", "22"]  # a chain keeps its order
    assert f"--dependency=afterany:{subs[-2].job_id} " in chained[2] + " "
