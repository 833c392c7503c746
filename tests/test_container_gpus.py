"""GPUs inside containers wherever lxm3 0.4.2 gave them: ``--nv`` when the GPU
comes from ``requirements``, ``resources``, ``extra_directives``, a Grid Engine
parallel environment (or a partition / queue) named for GPUs; and Grid
Engine's automatic ``-R y`` for jobs with a parallel environment or a GPU.

The job scripts are the ones a dry run writes (nothing is submitted). The
test bed has no GPUs and no container runtime can be installed here, so the
launch at the end asks for a GPU whose directive it skips (sbatch would refuse
a GPU the test bed lacks) and runs the task through a stand-in ``singularity``
(tests/fakes/container_runtime.py) first on the node's PATH, which records
its arguments.
"""

import json
import os
import shutil
import subprocess
import uuid

import pytest

import lxm3
from lxm3 import xm

from conftest import ROOT
from testbed_env import poll, require_testbed

FAKE = os.path.join(ROOT, "tests", "fakes", "container_runtime.py")
IMAGE = "docker://python:3.11-slim"  # a URI: handed to the runtime, no file needed

CONFIG = lxm3.Config(clusters=[lxm3.ClusterConfig(name="site", server="login.example", user="me",
                                                  staging="/scratch/me/lxm3")])


def job_scripts(tmp_path, monkeypatch, echo_project, executors):
    """The job.sh of each executor's work unit, as a dry run writes them."""
    directory = tmp_path / "dry"
    spec = lxm3.SingularityContainer(
        lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=echo_project), IMAGE)
    with lxm3.LaunchOptions(dry_run_directory=str(directory)).applied():
        with lxm3.create_experiment("gpus", config=CONFIG) as experiment:
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executors[0].Spec())])
            for executor in executors:
                experiment.add(xm.Job(exe, executor))
    base = directory / "site" / "experiments" / str(experiment.experiment_id)
    return [(base / f"wu{i + 1}" / "job.sh").read_text() for i in range(len(executors))]


def exec_argv(script):
    """The runtime's command line (the job script runs it in a subshell, ``exec ...``)."""
    [line] = [line for line in script.splitlines() if '"$lxm_runtime" exec ' in line]
    return line[line.index('"$lxm_runtime" exec '):].split()


def header(script, prefix):
    return [line[len(prefix) + 1:] for line in script.splitlines() if line.startswith(prefix + " ")]


req = xm.JobRequirements
NO_NV = lxm3.SingularityOptions(nv=False)

SLURM_CASES = [  # (executor options, --nv expected)
    ({}, False),
    ({"requirements": req(gpu=1)}, True),
    ({"requirements": req(a100=2)}, True),
    ({"requirements": req(cpu=4)}, False),
    ({"resources": {"gres": "gpu:1"}}, True),
    ({"resources": {"gres": "tmp:10G,gpu:a100:2"}}, True),
    ({"resources": {"gpus": 2}}, True),
    ({"resources": {"gpus-per-task": 1}}, True),
    ({"resources": {"tres-per-task": "gres/gpu:1"}}, True),
    ({"resources": {"gres": "gpu:0"}}, False),
    ({"resources": {"gres": "tmp:10G"}}, False),
    ({"resources": {"constraint": "gpu_node"}}, False),  # a constraint gives no GPU by itself
    ({"extra_directives": ["--gres=gpu:1"]}, True),
    ({"extra_directives": ["#SBATCH --gpus-per-node=2"]}, True),
    ({"extra_directives": ["-G 1"]}, True),
    ({"extra_directives": ["--gres gpu:v100:1"]}, True),
    ({"extra_directives": ["--mail-type=END"]}, False),
    ({"partition": "gpu"}, True),
    ({"extra_directives": ["-p gpu_short"]}, True),
    ({"partition": "cpu"}, False),
    ({"resources": {"gres": "gpu:1"}, "singularity_options": NO_NV}, False),
    ({"requirements": req(gpu=1), "singularity_options": NO_NV}, False),
]


def test_slurm_nv_from_every_source_of_a_gpu(tmp_path, monkeypatch, echo_project):
    scripts = job_scripts(tmp_path, monkeypatch, echo_project,
                          [lxm3.Slurm(**options) for options, _ in SLURM_CASES])
    got = [("--nv" in exec_argv(script)) for script in scripts]
    assert got == [want for _, want in SLURM_CASES]
    assert "--gres=tmp:10G,gpu:a100:2" in header(scripts[5], "#SBATCH")  # as written


SGE_CASES = [  # (executor options, --nv expected, -R expected)
    ({}, False, []),
    ({"requirements": req(gpu=1)}, True, ["-R y"]),
    ({"requirements": req(cpu=4)}, False, ["-R y"]),  # -pe smp 4
    ({"resources": {"gpu": 1}}, True, ["-R y"]),
    ({"resources": {"gpu": "true"}}, True, ["-R y"]),  # UCL CS's boolean complex
    ({"resources": {"ngpus": 2}}, True, ["-R y"]),
    ({"resources": {"h_vmem": "4G"}}, False, []),
    ({"extra_directives": ["-l gpu=1"]}, True, ["-R y"]),
    ({"extra_directives": ["#$ -l h_vmem=4G,gpu=2"]}, True, ["-R y"]),
    ({"extra_directives": ["-l gpu=0"]}, False, []),
    ({"parallel_environments": {"gpu": 2}}, True, ["-R y"]),
    ({"parallel_environments": {"gpu-mpi": 4}}, True, ["-R y"]),
    ({"parallel_environments": {"smp": 4}}, False, ["-R y"]),
    ({"extra_directives": ["-pe mpi 8"]}, False, ["-R y"]),
    ({"queue": "gpu.q"}, True, ["-R y"]),
    ({"parallel_environments": {"smp": 4}, "reserved": False}, False, ["-R n"]),
    ({"resources": {"gpu": 1}, "extra_directives": ["-R n"]}, True, ["-R n"]),
    ({"resources": {"gpu": 1}, "singularity_options": NO_NV}, False, ["-R y"]),
    ({"reserved": True}, False, ["-R y"]),
]


def test_grid_engine_nv_and_reservation_from_every_source_of_a_gpu(tmp_path, monkeypatch, echo_project):
    scripts = job_scripts(tmp_path, monkeypatch, echo_project,
                          [lxm3.GridEngine(**options) for options, _, _ in SGE_CASES])
    got = [("--nv" in exec_argv(script), [d for d in header(script, "#$") if d.startswith("-R")])
           for script in scripts]
    assert got == [(nv, reserve) for _, nv, reserve in SGE_CASES]


def test_the_task_keeps_its_gpus_with_cleanenv(tmp_path, monkeypatch, echo_project):
    """CUDA_VISIBLE_DEVICES (set by the scheduler or the local runner) reaches the
    program even when ``--cleanenv`` drops the host environment."""
    [script] = job_scripts(tmp_path, monkeypatch, echo_project, [lxm3.Slurm(resources={"gpus": 1})])
    assert ('[[ -z ${CUDA_VISIBLE_DEVICES+set} ]] || export '
            '"${lxm_prefix}CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"') in script


# --- On the test bed's Slurm -------------------------------------------------------


@pytest.mark.testbed
def test_a_gpu_from_resources_reaches_the_container_on_slurm(echo_project):
    tb = require_testbed("slurm")
    shared = f"/tmp/lxm3-gpus-{uuid.uuid4().hex[:8]}"  # the test bed's user runs the tasks
    os.makedirs(os.path.join(shared, "bin"))
    shutil.copy(FAKE, os.path.join(shared, "bin", "singularity"))
    os.chmod(os.path.join(shared, "bin", "singularity"), 0o755)
    os.chmod(shared, 0o777)
    staging = f".lxm3-tests/gpus-{uuid.uuid4().hex[:8]}"
    config = lxm3.Config(clusters=[lxm3.ClusterConfig(
        name="testbed", server=tb.ssh_host, user=tb.ssh_user, port=tb.ssh_port,
        ssh_private_key=tb.ssh_key, staging=staging)])
    # The GPU comes from resources, as on a cluster with GPUs; the test bed has
    # none, so the directive is skipped (sbatch would refuse it), not the intent.
    executor = lxm3.Slurm(resources={"gres": "gpu:1"}, skip_directives=["--gres"])
    spec = lxm3.SingularityContainer(
        lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=echo_project), IMAGE)
    env = {"ECHO_OUT": shared, "FAKE_RUNTIME_LOG": os.path.join(shared, "calls.jsonl"),
           "PATH": f"{shared}/bin:/usr/local/bin:/usr/bin:/bin"}  # the stand-in first
    unit = None
    try:
        with lxm3.create_experiment("gpus", config=config) as experiment:
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(), env_vars=env)])
            experiment.add(xm.Job(exe, executor, args={"seed": 7}))
        unit = experiment.work_units[1]
        report = poll(lambda: _read_json(os.path.join(shared, "task-0.json")), timeout=300,
                      what="the task's report")
        assert report["argv"] == ["--seed=7"]
        assert report["env"]["FAKE_RUNTIME"] == "singularity"
        [call] = [json.loads(line) for line in open(os.path.join(shared, "calls.jsonl"))]
        argv = call["argv"]
        assert argv[0] == "exec" and "--nv" in argv[:argv.index(IMAGE)]
    finally:
        if unit is not None and unit.job_ids:
            tb.ssh(["scancel", *unit.job_ids], check=False)
        tb.ssh(["rm", "-rf", staging], check=False)
        subprocess.run(["rm", "-rf", shared])


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
