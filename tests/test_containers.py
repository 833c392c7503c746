"""Containers: Singularity/Apptainer and Docker.

No container runtime can be installed on this machine (or CI's), so these
tests put a stand-in on the PATH (tests/fakes/container_runtime.py, named
apptainer, singularity or docker). It records its arguments and runs the
command after the image the way the real runtime would (working directory,
environment, --cleanenv), so the job script's side is tested for real.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

import lxm3
from lxm3 import xm

from conftest import AWKWARD, ROOT, echo_report
from testbed_env import poll, require_testbed

FAKE = os.path.join(ROOT, "tests", "fakes", "container_runtime.py")


@pytest.fixture
def fake_runtime(tmp_path, monkeypatch):
    """Put stand-ins for the given runtimes first on the PATH; returns their call log."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "runtime-calls.jsonl"
    # The stand-in is Python: run it with this interpreter whatever python3 is.
    launcher = bindir / "_fake.py"
    launcher.write_text(f"#!{sys.executable}\n" + open(FAKE).read())
    launcher.chmod(0o755)

    def install(*names):
        for name in names:
            os.symlink(launcher, bindir / name)
        return log

    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(log))
    return install


def calls(log):
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def run_local(echo_project, out, spec_kind, image, executor, *, args=None, env=None, tasks=1):
    entry = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
    spec = (lxm3.SingularityContainer(entry, image_path=image) if spec_kind == "singularity"
            else lxm3.DockerContainer(entry, image=image))
    with lxm3.create_experiment("containers", config=lxm3.Config()) as experiment:
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(),
                                                   env_vars={"ECHO_OUT": str(out), **(env or {})})])
        experiment.add(lxm3.ArrayJob(exe, executor, args=args or [{}] * tasks))
    return experiment


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "images" / "env.sif"
    path.parent.mkdir()
    path.write_bytes(b"SIF" + os.urandom(4096))
    return str(path)


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


def test_singularity_runs_the_task_in_the_image_with_exact_arguments(
        fake_runtime, echo_project, out, image):
    log = fake_runtime("apptainer", "singularity")
    run_local(echo_project, out, "singularity", image, lxm3.Local(),
              args=[AWKWARD], env={"AWKWARD_ENV": AWKWARD[8]})
    got = echo_report(out)
    assert got["env"]["FAKE_RUNTIME"] == "apptainer"  # apptainer is preferred
    assert got["argv"] == [str(a) for a in AWKWARD]
    assert got["env"]["AWKWARD_ENV"] == AWKWARD[8]
    assert got["env"]["LXM_TASK_ID"] == "0" and got["env"]["LXM_WORK_UNIT_ID"] == "1"
    [call] = calls(log)
    workdir = got["cwd"]
    assert call["argv"][:6] == ["exec", "--bind", workdir, "--pwd", workdir, image]
    assert call["argv"][6:8] == ["bash", "./entrypoint.sh"]
    assert "--nv" not in call["argv"]
    assert got["env"]["PYTHONPATH"].split(":")[0] == workdir


def test_cleanenv_keeps_the_task_environment(fake_runtime, echo_project, out, image):
    fake_runtime("apptainer")
    executor = lxm3.Local(singularity_options=lxm3.SingularityOptions(extra_options=["--cleanenv"]))
    run_local(echo_project, out, "singularity", image, executor, env={"MY_VAR": "a b $c"})
    got = echo_report(out)
    assert got["env"]["MY_VAR"] == "a b $c"
    assert got["env"]["LXM_NUM_TASKS"] == "1"
    assert "HOME" not in got["env"]  # the stand-in really cleaned the environment


def test_singularity_is_used_when_apptainer_is_missing_and_runtime_can_be_chosen(
        fake_runtime, echo_project, out, image, tmp_path):
    log = fake_runtime("singularity")
    run_local(echo_project, out, "singularity", image, lxm3.Local())
    assert echo_report(out)["env"]["FAKE_RUNTIME"] == "singularity"
    fake_runtime("apptainer")
    out2 = tmp_path / "out2"
    out2.mkdir()
    executor = lxm3.Local(singularity_options=lxm3.SingularityOptions(runtime="singularity"))
    run_local(echo_project, out2, "singularity", image, executor)
    assert echo_report(out2)["env"]["FAKE_RUNTIME"] == "singularity"
    assert [c["tool"] for c in calls(log)] == ["singularity", "singularity"]


def test_nv_only_for_gpu_jobs_unless_overridden(fake_runtime, echo_project, tmp_path, image,
                                               monkeypatch):
    log = fake_runtime("apptainer")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the GPU local GPU tasks may have
    cases = [
        (lxm3.Local(requirements=xm.JobRequirements(gpu=1)), True),
        (lxm3.Local(requirements=xm.JobRequirements(a100=1)), True),
        (lxm3.Local(requirements=xm.JobRequirements(cpu=2)), False),
        (lxm3.Local(requirements=xm.JobRequirements(gpu=1),
                    singularity_options=lxm3.SingularityOptions(nv=False)), False),
        (lxm3.Local(singularity_options=lxm3.SingularityOptions(nv=True)), True),
    ]
    for i, (executor, want_nv) in enumerate(cases):
        out = tmp_path / f"out{i}"
        out.mkdir()
        run_local(echo_project, out, "singularity", image, executor)
        assert ("--nv" in calls(log)[-1]["argv"]) is want_nv, i


def test_binds_and_extra_options_come_before_the_image(fake_runtime, echo_project, out, image):
    log = fake_runtime("apptainer")
    options = lxm3.SingularityOptions(bind={"/data": "/mnt/data", "/scratch dir": "/scratch"},
                                      extra_options=["--containall", "--no-home"])
    run_local(echo_project, out, "singularity", image, lxm3.Local(singularity_options=options))
    argv = calls(log)[0]["argv"]
    tail = argv[argv.index("--pwd") + 2:]
    assert tail[:7] == ["--bind", "/data:/mnt/data", "--bind", "/scratch dir:/scratch",
                        "--containall", "--no-home", image]


def test_image_uris_are_passed_as_they_are(fake_runtime, echo_project, out):
    log = fake_runtime("apptainer")
    for uri in ("docker://python:3.11-slim", "oras://ghcr.io/x/y:1", "library://a/b/c:latest"):
        spec = lxm3.SingularityContainer(lxm3.PythonPackage(xm.ModuleName("echoapp.main")), uri)
        assert spec.image_path == uri
    run_local(echo_project, out, "singularity", "docker://python:3.11-slim", lxm3.Local())
    assert "docker://python:3.11-slim" in calls(log)[0]["argv"]


def test_missing_local_image_is_reported(fake_runtime, echo_project, out, tmp_path):
    fake_runtime("apptainer")
    with pytest.raises(lxm3.LaunchError, match="container image .*nope.sif does not exist"):
        run_local(echo_project, out, "singularity", str(tmp_path / "nope.sif"), lxm3.Local())


def test_docker_on_local(fake_runtime, echo_project, out, monkeypatch):
    log = fake_runtime("docker")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the GPUs local GPU tasks may have
    options = lxm3.DockerOptions(volumes={"/data": "/data"}, extra_options=["--shm-size=1g"])
    executor = lxm3.Local(requirements=xm.JobRequirements(gpu=1), docker_options=options)
    run_local(echo_project, out, "docker", "python:3.11", executor, args=[AWKWARD[:12]],
              env={"DOCKER_VAR": "x 'y' $z"})
    got = echo_report(out)
    assert got["argv"] == [str(a) for a in AWKWARD[:12]]
    assert got["env"]["DOCKER_VAR"] == "x 'y' $z"
    assert got["env"]["LXM_TASK_ID"] == "0"
    argv = calls(log)[0]["argv"]
    workdir = got["cwd"]
    assert argv[:4] == ["run", "--rm", "--init", "--user"]
    assert argv[4] == f"{os.getuid()}:{os.getgid()}"
    assert argv[5:9] == ["-v", f"{workdir}:{workdir}", "-w", workdir]
    assert ["-e", "DOCKER_VAR"] == argv[argv.index("DOCKER_VAR") - 1:argv.index("DOCKER_VAR") + 1]
    assert "x 'y' $z" not in argv  # values travel in the environment, not the command line
    i = argv.index("--gpus")  # the task's own GPU of the two, in docker's CSV form
    assert argv[i:i + 6] == ["--gpus", '"device=3"', "-v", "/data:/data", "--shm-size=1g", "python:3.11"]
    assert "CUDA_VISIBLE_DEVICES" not in got["env"]  # inside, its one GPU is device 0


def test_docker_containers_are_refused_on_clusters():
    exe = lxm3.ClusterExecutable(name="x", container="docker", image="python:3.11")
    with pytest.raises(lxm3.LaunchError, match="DockerContainer runs only on the Local executor"):
        lxm3._check_launchable(exe, lxm3.Slurm())


def test_image_is_hashed_once_while_unchanged(tmp_path, monkeypatch, image):
    hashed = []
    real = lxm3._hash_file
    monkeypatch.setattr(lxm3, "_hash_file", lambda p: hashed.append(p) or real(p))
    first = lxm3.deployed_image_name(image)
    assert lxm3.deployed_image_name(image) == first
    assert hashed == [image]
    with open(image, "ab") as f:  # a changed file is hashed again, and gets another name
        f.write(b"more")
    assert lxm3.deployed_image_name(image) != first
    assert len(hashed) == 2


def test_same_name_images_with_other_contents_get_other_names(tmp_path):
    names = set()
    for i in range(2):
        path = tmp_path / f"dir{i}" / "model.sif"
        path.parent.mkdir()
        path.write_bytes(b"image %d" % i)
        names.add(lxm3.deployed_image_name(str(path)))
    assert len(names) == 2
    assert all(n.startswith("model-") and n.endswith(".sif") for n in names)


# --- On the test bed: the image is deployed once, and jobs run in it ----------------


def cluster_launch(tb, kind, echo_project, out, image, staging, runtime, tasks=3):
    pbs = kind == "pbs"  # its own host; its qsub by bin_dir
    config = lxm3.Config(clusters=[lxm3.ClusterConfig(
        name="testbed", server=tb.pbs_ssh_host if pbs else tb.ssh_host, user=tb.ssh_user,
        port=tb.pbs_ssh_port if pbs else tb.ssh_port, ssh_private_key=tb.ssh_key, staging=staging,
        singularity_binds=[("/tmp", "/tmp")], raw={"pbs": {"bin_dir": tb.pbs_bin("")}} if pbs else {})])
    options = lxm3.SingularityOptions(runtime=runtime)
    executor = {"slurm": lxm3.Slurm, "sge": lxm3.GridEngine, "pbs": lxm3.PBS}[kind](singularity_options=options)
    spec = lxm3.SingularityContainer(
        lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project), image)
    with lxm3.create_experiment("containers", config=config) as experiment:
        [exe] = experiment.package([xm.Packageable(
            spec, executor_spec=executor.Spec(),
            env_vars={"ECHO_OUT": str(out), "FAKE_RUNTIME_LOG": os.path.join(str(out), "calls.jsonl")})])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{"i": i} for i in range(tasks)]))
    return experiment, experiment._connections


@pytest.mark.testbed
@pytest.mark.parametrize("kind", ["slurm", "sge", "pbs"])
def test_cluster_job_runs_in_a_deployed_image_sent_once(kind, echo_project, tmp_path, monkeypatch):
    tb = require_testbed(kind)
    shared = f"/tmp/lxm3-containers-{uuid.uuid4().hex[:8]}"  # readable by the test user
    os.makedirs(shared)
    os.chmod(shared, 0o777)
    runtime = os.path.join(shared, "apptainer")
    shutil.copy(FAKE, runtime)
    os.chmod(runtime, 0o755)
    image = os.path.join(shared, "model.sif")
    with open(image, "wb") as f:
        f.write(os.urandom(1 << 20))
    staging = f".lxm3-tests/containers-{uuid.uuid4().hex[:8]}"
    sent = []
    real_copy = lxm3.Connection.copy_tree

    def counting_copy(self, local_dir, remote_dir):
        before = self.bytes_sent
        copied = real_copy(self, local_dir, remote_dir)
        sent.append(self.bytes_sent - before)
        return copied

    monkeypatch.setattr(lxm3.Connection, "copy_tree", counting_copy)
    try:
        for launch in range(2):
            out = os.path.join(shared, f"out{launch}")
            os.makedirs(out)
            os.chmod(out, 0o777)
            experiment, _ = cluster_launch(tb, kind, echo_project, out, image, staging, runtime)
            poll(lambda out=out: True if sum(n.startswith("task-") for n in os.listdir(out)) == 3 else None,
                 timeout=180, what=f"3 task reports in {out}")
            got = echo_report(out, 2)
            assert got["argv"] == ["--i=2"]
            assert got["env"]["FAKE_RUNTIME"] == "apptainer"
            unit = experiment.work_units[1]
            assert unit.image_path.endswith("/images/" + lxm3.deployed_image_name(image))
            argv = calls(os.path.join(out, "calls.jsonl"))[0]["argv"]
            assert unit.image_path in argv and "/tmp:/tmp" in argv and "--nv" not in argv
        listing = tb.ssh(f"ls -l {staging}/images").stdout
        assert listing.count("model-") == 1
        assert sent[0] > 1 << 20  # the first launch sent the 1 MiB image ...
        assert sent[1] < 100_000  # ... the second neither it nor the archive
    finally:
        tb.ssh(["rm", "-rf", staging], check=False)
        subprocess.run(["rm", "-rf", shared])


# --- With a real runtime, where one is installed (never on this project's CI) ---------

REAL_RUNTIME = shutil.which("apptainer") or shutil.which("singularity")


@pytest.mark.skipif(REAL_RUNTIME is None, reason="no apptainer/singularity on the PATH")
def test_real_runtime_runs_the_task_with_exact_arguments_and_environment(echo_project, out):
    """The end-to-end checks above, against the real runtime instead of the stand-in.

    The image needs Python 3: $LXM3_TEST_IMAGE (a .sif path or a URI), by
    default docker://python:3.11-slim (which the runtime fetches).
    """
    image = os.environ.get("LXM3_TEST_IMAGE", "docker://python:3.11-slim")
    options = lxm3.SingularityOptions(extra_options=["--cleanenv"])
    run_local(echo_project, out, "singularity", image, lxm3.Local(singularity_options=options),
              args=[AWKWARD], env={"AWKWARD_ENV": AWKWARD[8]})
    got = echo_report(out)
    assert got["argv"] == [str(a) for a in AWKWARD]
    assert got["env"]["AWKWARD_ENV"] == AWKWARD[8]
    assert got["env"]["LXM_TASK_ID"] == "0"
