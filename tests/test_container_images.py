"""Images built or converted on the workstation, as lxm3 0.4.2 did:
``PDMProject`` / ``PythonContainer`` (a Docker image of the project's
dependencies) and ``SingularityContainer`` images from ``docker-daemon:`` /
``docker-archive:``, converted to a ``.sif`` here once per image id.

No Docker daemon, Apptainer or Singularity can run on this machine (or CI's),
so these tests put stand-ins on the PATH (tests/fakes/container_runtime.py):
``docker build`` checks what the Dockerfile copies and gives the image an id
from its inputs, ``docker image inspect`` reads it back, ``apptainer build``
writes a new file from an image the stand-in daemon has; ``docker run`` and
``singularity exec`` run the task's command as the real ones would. The
stand-ins log every call, which is what the tests check.
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

from conftest import ROOT, echo_report, write_files
from testbed_env import poll, require_testbed

FAKE = os.path.join(ROOT, "tests", "fakes", "container_runtime.py")


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """Put stand-ins for the given tools first on the PATH (``only=True``: alone
    on it); returns their call log."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "runtime-calls.jsonl"
    launcher = bindir / "_fake.py"  # run with this interpreter, whatever python3 is
    launcher.write_text(f"#!{sys.executable}\n" + open(FAKE).read())
    launcher.chmod(0o755)
    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(log))
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "fake-docker-daemon.json"))

    def install(*names, only=False):
        for name in names:
            os.symlink(launcher, bindir / name)
        monkeypatch.setenv("PATH", str(bindir) if only else f"{bindir}:{os.environ['PATH']}")
        return log

    return install


def calls(log, tool=None, verb=None):
    entries = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return [e for e in entries if (tool is None or e["tool"] == tool)
            and (verb is None or e.get("argv", [None])[0] == verb)]


def builds(log):
    return [e["built"] for e in calls(log, "docker") if "built" in e]


@pytest.fixture
def project(echo_project):
    """The echo project, with a PDM lock file and a requirements file. They are
    unique to the test: the same inputs would give the same image id, whose
    .sif another test may have left in the session's cache."""
    unique = uuid.uuid4().hex
    return write_files(echo_project, {
        "pdm.lock": f"# pdm lock {unique}\n[metadata]\nlock_version = \"4.4\"\n",
        "requirements.txt": f"# {unique}\nnumpy==1.26.4\n",
    })


def docker_context(tmp_path):
    """A build context for an image of the stand-in daemon, unique to the test (see ``project``)."""
    return write_files(tmp_path / "ctx", {"Dockerfile": f"FROM python:3.11\nLABEL test={uuid.uuid4().hex}\n"})


# --- The specs ------------------------------------------------------------------


def test_pdm_project_and_python_container_take_every_field_of_0_4_2(project, tmp_path):
    entry = xm.ModuleName("echoapp.main")
    extra = lxm3.Fileset({str(tmp_path / "data.txt"): "data.txt"})
    pdm = lxm3.PDMProject(entry, "python:3.11-slim", "my.lock", project, [extra], ["six"], ["--no-deps"])
    assert (pdm.entrypoint, pdm.base_image, pdm.lock_file, pdm.path, pdm.resources,
            pdm.extra_packages, pdm.pip_args) == (
        entry, "python:3.11-slim", "my.lock", project, [extra], ["six"], ["--no-deps"])
    container = lxm3.PythonContainer(entrypoint=entry, base_image="python:3.11", path=project)
    assert (container.requirements, container.resources, container.extra_packages,
            container.pip_args) == ("requirements.txt", [], [], ["--no-deps", "--no-compile"])
    assert lxm3.PDMProject(entry, "python:3.11", path=project).lock_file == "pdm.lock"
    assert container.name == pdm.name == "echo_project"
    with pytest.raises(TypeError, match="entrypoint must be"):
        lxm3.PythonContainer("echoapp.main", "python:3.11")


def test_image_transports_are_recognised_and_archives_resolved(tmp_path):
    entry = lxm3.PythonPackage(xm.ModuleName("echoapp.main"))
    for image in ("docker-daemon:repo/name:1.0", "docker-daemon://name:latest"):
        assert lxm3.SingularityContainer(entry, image).image_path == image  # not a local path
    spec = lxm3.SingularityContainer(entry, "docker-archive:images/app.tar")
    launcher_dir = os.path.dirname(lxm3.resolve_path("x"))
    assert spec.image_path == f"docker-archive:{launcher_dir}/images/app.tar"
    assert lxm3.docker_transport("docker-archive:///abs/app.tar") == ("docker-archive", "/abs/app.tar")
    assert lxm3.docker_transport("docker://python:3.11") is None


# --- PythonContainer / PDMProject on Local: built, then run with Docker ---------------


def run_local(spec, out, executor=None, tasks=1):
    executor = executor or lxm3.Local()
    with lxm3.create_experiment("images", config=lxm3.Config()) as experiment:
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(),
                                                   env_vars={"ECHO_OUT": str(out)})])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{"i": i} for i in range(tasks)]))
    return exe


def test_python_container_is_built_from_the_project_and_run_with_docker_locally(
        fake_bin, project, tmp_path):
    log = fake_bin("docker")
    out = tmp_path / "out"
    out.mkdir()
    spec = lxm3.PythonContainer(xm.ModuleName("echoapp.main"), "python:3.11-slim", path=project)
    exe = run_local(spec, out, tasks=2)
    [build] = calls(log, "docker", "build")
    argv = build["argv"]
    assert argv[:3] == ["build", "-t", "echo_project:latest"]  # 0.4.2's tag: the project's name
    assert argv[-1] == project  # the build context is the project
    [built] = builds(log)
    text = built["dockerfile"]
    assert text.splitlines()[1] == "FROM python:3.11-slim"
    assert 'COPY ["requirements.txt", "/requirements.txt"]' in text
    assert "RUN pip install --no-cache-dir -r /requirements.txt" in text
    assert (exe.container, exe.image) == ("docker", built["id"])  # run by id: what was just built
    for task in range(2):
        got = echo_report(out, task)
        assert got["argv"] == [f"--i={task}"]
        assert got["env"]["FAKE_RUNTIME"] == "docker"
    runs = calls(log, "docker", "run")
    assert sorted(r["argv"][r["argv"].index(built["id"]) + 1:] for r in runs) == [
        ["bash", "./entrypoint.sh", "--i=0"], ["bash", "./entrypoint.sh", "--i=1"]]


def test_pdm_project_image_holds_the_locked_dependencies(fake_bin, project, tmp_path):
    log = fake_bin("docker")
    out = tmp_path / "out"
    out.mkdir()
    spec = lxm3.PDMProject(xm.ModuleName("echoapp.main"), "python:3.10", path=project)
    run_local(spec, out)
    [built] = builds(log)
    lines = built["dockerfile"].splitlines()
    assert "FROM python:3.10 AS lxm3-lock" in lines
    assert 'COPY ["pdm.lock", "pdm.lock"]' in lines and 'COPY ["pyproject.toml", "pyproject.toml"]' in lines
    assert "RUN pdm export > /requirements.txt" in lines
    assert lines.index("FROM python:3.10") > lines.index("RUN pdm export > /requirements.txt")
    assert "COPY --from=lxm3-lock /requirements.txt /requirements.txt" in lines
    assert echo_report(out)["argv"] == ["--i=0"]


def test_a_missing_requirements_or_lock_file_fails_the_build_clearly(fake_bin, project):
    fake_bin("docker")
    for spec, missing in ((lxm3.PDMProject(xm.ModuleName("echoapp.main"), "python:3.11",
                                           lock_file="nope.lock", path=project), "nope.lock"),
                          (lxm3.PythonContainer(xm.ModuleName("echoapp.main"), "python:3.11",
                                                requirements="req/dev.txt", path=project), "req/dev.txt")):
        with pytest.raises(lxm3.BuildError, match=f"{missing} does not exist; the image is built from it"):
            lxm3.package(xm.Packageable(spec, executor_spec=lxm3.LocalSpec()))
    outside = lxm3.PythonContainer(xm.ModuleName("echoapp.main"), "python:3.11",
                                   requirements="../requirements.txt", path=project)
    with pytest.raises(lxm3.BuildError, match="must be a path inside .* the Docker build context"):
        lxm3.package(xm.Packageable(outside, executor_spec=lxm3.LocalSpec()))


def test_without_docker_the_error_says_so(fake_bin, project):
    fake_bin("apptainer", only=True)  # no docker on the PATH
    spec = lxm3.PythonContainer(xm.ModuleName("echoapp.main"), "python:3.11", path=project)
    with pytest.raises(lxm3.BuildError, match="PythonContainer .* needs docker on this machine"):
        lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))


def test_docker_build_failures_are_reported_with_their_output(fake_bin, project, monkeypatch):
    fake_bin("docker")
    monkeypatch.setenv("FAKE_DOCKER_DOWN", "1")
    spec = lxm3.PythonContainer(xm.ModuleName("echoapp.main"), "python:3.11", path=project)
    with pytest.raises(lxm3.BuildError, match=r"(?s)docker build of echo_project:latest from .* failed "
                                              r"\(exit code 1\):\nCannot connect to the Docker daemon"):
        lxm3.package(xm.Packageable(spec, executor_spec=lxm3.LocalSpec()))


# --- On clusters: the image becomes a .sif here, once per image id ------------------


def test_cluster_packaging_converts_the_built_image_to_a_sif_once(fake_bin, project):
    log = fake_bin("docker", "apptainer")
    spec = lxm3.PythonContainer(xm.ModuleName("echoapp.main"), "python:3.11", path=project)
    first = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))
    [convert] = calls(log, "apptainer", "build")
    assert convert["argv"][2] == "docker-daemon:echo_project:latest"
    assert first.container == "singularity" and os.path.basename(first.image) == "echo_project_latest.sif"
    with open(first.image, "rb") as f:
        assert f.read(200).startswith(b"FAKE-SIF from docker-daemon:echo_project:latest")
    # Rebuilt with the same inputs: the same image id, so no new conversion.
    again = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.GridEngineSpec()))
    assert len(calls(log, "docker", "build")) == 2  # docker decides what is up to date
    assert len(calls(log, "apptainer", "build")) == 1
    assert again.image == first.image
    # Other requirements: another image, converted.
    with open(os.path.join(project, "requirements.txt"), "a") as f:
        f.write("scipy\n")
    changed = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))
    assert len(calls(log, "apptainer", "build")) == 2
    assert changed.image != first.image


def test_docker_daemon_images_are_converted_once_per_image_id(fake_bin, project, tmp_path):
    log = fake_bin("docker", "singularity")  # singularity when there is no apptainer
    context = docker_context(tmp_path)
    subprocess.run(["docker", "build", "-t", "ghcr.io/me/trainer:v1", context], check=True)
    entry = lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=project)
    spec = lxm3.SingularityContainer(entry, "docker-daemon://ghcr.io/me/trainer:v1")
    first = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))
    second = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))
    assert first.image == second.image and os.path.basename(first.image) == "trainer_v1.sif"
    [convert] = calls(log, "singularity", "build")
    assert convert["argv"][2] == "docker-daemon:ghcr.io/me/trainer:v1"
    inspects = calls(log, "docker", "image")
    assert [c["argv"] for c in inspects] == [["image", "inspect", "--format", "{{.Id}}",
                                              "ghcr.io/me/trainer:v1"]] * 2
    # The tag now names another image: converted again.
    with open(os.path.join(context, "Dockerfile"), "a") as f:
        f.write("RUN true\n")
    subprocess.run(["docker", "build", "-t", "ghcr.io/me/trainer:v1", context], check=True)
    third = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))
    assert len(calls(log, "singularity", "build")) == 2
    assert lxm3.deployed_image_name(third.image) != lxm3.deployed_image_name(first.image)


def test_docker_archive_images_are_converted_once_per_content(fake_bin, project, tmp_path):
    log = fake_bin("apptainer")
    archive = tmp_path / "app.tar"
    archive.write_bytes(b"a docker save archive" + os.urandom(1000))
    entry = lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=project)
    spec = lxm3.SingularityContainer(entry, f"docker-archive://{archive}")
    first = lxm3.package(xm.Packageable(spec, executor_spec=lxm3.GridEngineSpec()))
    assert lxm3.package(xm.Packageable(spec, executor_spec=lxm3.GridEngineSpec())).image == first.image
    [convert] = calls(log, "apptainer", "build")
    assert convert["argv"][2] == f"docker-archive:{archive}"
    assert os.path.basename(first.image) == "app.sif"
    archive.write_bytes(b"another docker save archive")
    assert lxm3.package(xm.Packageable(spec, executor_spec=lxm3.GridEngineSpec())).image != first.image
    assert len(calls(log, "apptainer", "build")) == 2


def test_a_local_singularity_run_uses_the_converted_sif(fake_bin, project, tmp_path):
    log = fake_bin("docker", "apptainer")
    subprocess.run(["docker", "build", "-t", "trainer", docker_context(tmp_path)], check=True)
    out = tmp_path / "out"
    out.mkdir()
    entry = lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=project)
    exe = run_local(lxm3.SingularityContainer(entry, "docker-daemon:trainer"), out)
    [run] = calls(log, "apptainer", "exec")
    assert exe.image in run["argv"] and exe.image.endswith("/trainer_latest.sif")
    assert echo_report(out)["env"]["FAKE_RUNTIME"] == "apptainer"


def test_conversion_errors_say_what_is_missing(fake_bin, project, tmp_path):
    entry = lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=project)
    daemon = lxm3.SingularityContainer(entry, "docker-daemon:trainer:v1")
    fake_bin("apptainer", only=True)
    with pytest.raises(lxm3.BuildError, match=r"docker-daemon:trainer:v1 \(read from the local Docker "
                                              r"daemon\) needs docker on this machine"):
        lxm3.package(xm.Packageable(daemon, executor_spec=lxm3.SlurmSpec()))
    fake_bin("docker", only=True)
    with pytest.raises(lxm3.BuildError, match="(?s)docker image inspect trainer:v1 .*No such image: trainer:v1"):
        lxm3.package(xm.Packageable(daemon, executor_spec=lxm3.SlurmSpec()))
    os.unlink(tmp_path / "fakebin" / "apptainer")
    archive = tmp_path / "app.tar"
    archive.write_bytes(b"archive")
    spec = lxm3.SingularityContainer(entry, f"docker-archive:{archive}")
    with pytest.raises(lxm3.BuildError, match="needs apptainer or singularity on this machine"):
        lxm3.package(xm.Packageable(spec, executor_spec=lxm3.SlurmSpec()))
    missing = lxm3.SingularityContainer(entry, f"docker-archive:{tmp_path / 'nope.tar'}")
    with pytest.raises(lxm3.BuildError, match="nope.tar does not exist"):
        lxm3.package(xm.Packageable(missing, executor_spec=lxm3.SlurmSpec()))


# --- On the test bed's Slurm: built/converted here, sent once, run in the image ----------


@pytest.fixture
def shared(tmp_path):
    """A directory the test bed's user can use: the node's stand-in runtimes, task reports."""
    path = f"/tmp/lxm3-images-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(path, "bin"))
    for name in ("singularity", "apptainer"):  # the node's runtime: the stand-in
        shutil.copy(FAKE, os.path.join(path, "bin", name))
        os.chmod(os.path.join(path, "bin", name), 0o755)
    os.chmod(path, 0o777)
    yield path
    subprocess.run(["rm", "-rf", path])


def slurm_launch(tb, spec, shared, staging, name, tasks=2, executor=None):
    out = os.path.join(shared, name)
    os.makedirs(out)
    os.chmod(out, 0o777)
    config = lxm3.Config(clusters=[lxm3.ClusterConfig(
        name="testbed", server=tb.ssh_host, user=tb.ssh_user, port=tb.ssh_port,
        ssh_private_key=tb.ssh_key, staging=staging)])
    executor = executor or lxm3.Slurm()
    env = {"ECHO_OUT": out, "FAKE_RUNTIME_LOG": os.path.join(out, "calls.jsonl"),
           # The stand-in runtime first on the node's PATH, as a module load would put the real one.
           "PATH": f"{shared}/bin:/usr/local/bin:/usr/bin:/bin"}
    with lxm3.create_experiment("images", config=config) as experiment:
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(), env_vars=env)])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{"i": i} for i in range(tasks)]))
    unit = experiment.work_units[1]
    try:
        poll(lambda: True if sum(n.startswith("task-") for n in os.listdir(out)) == tasks else None,
             timeout=300, what=f"{tasks} task reports in {out}")
    finally:
        if unit.job_ids:
            tb.ssh(["scancel", *unit.job_ids], check=False)
    return out, unit


def copy_line(stderr):
    return [line for line in stderr.splitlines() if line.startswith("lxm3: testbed: ") and
            ("copied" in line or "already there" in line or "nothing to copy" in line)][-1]


@pytest.mark.testbed
def test_pdm_project_runs_on_slurm_in_the_converted_image(fake_bin, project, shared, capfd):
    tb = require_testbed("slurm")
    log = fake_bin("docker", "apptainer")
    staging = f".lxm3-tests/images-{uuid.uuid4().hex[:8]}"
    spec = lxm3.PDMProject(xm.ModuleName("echoapp.main"), "python:3.11-slim", path=project)
    try:
        out, unit = slurm_launch(tb, spec, shared, staging, "pdm")
        assert len(calls(log, "docker", "build")) == 1
        [convert] = calls(log, "apptainer", "build")
        assert convert["argv"][2] == "docker-daemon:echo_project:latest"
        assert "copied 1 archive" in copy_line(capfd.readouterr().err)
        assert unit.image_path.startswith(f"{tb.user_home}/{staging}/images/echo_project_latest-")
        for task in range(2):
            got = echo_report(out, task)
            assert got["argv"] == [f"--i={task}"]
            assert got["env"]["FAKE_RUNTIME"] in ("apptainer", "singularity")
        node_calls = calls(os.path.join(out, "calls.jsonl"))
        assert {c["argv"][0] for c in node_calls} == {"exec"}
        assert all(unit.image_path in c["argv"] for c in node_calls)
    finally:
        tb.ssh(["rm", "-rf", staging], check=False)


@pytest.mark.testbed
def test_a_docker_daemon_image_is_converted_and_sent_once(fake_bin, project, shared, tmp_path, capfd):
    tb = require_testbed("slurm")
    log = fake_bin("docker", "apptainer")
    subprocess.run(["docker", "build", "-t", "trainer:v1", docker_context(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    staging = f".lxm3-tests/images-{uuid.uuid4().hex[:8]}"
    entry = lxm3.PythonPackage(xm.ModuleName("echoapp.main"), path=project)
    spec = lxm3.SingularityContainer(entry, "docker-daemon://trainer:v1")
    try:
        out, unit = slurm_launch(tb, spec, shared, staging, "first")
        assert len(calls(log, "apptainer", "build")) == 1
        line = copy_line(capfd.readouterr().err)
        assert "1 image (256 KiB)" in line, line  # the stand-in's .sif
        first_image = unit.image_path
        assert os.path.basename(first_image).startswith("trainer_v1-")
        out, unit = slurm_launch(tb, spec, shared, staging, "second")
        assert len(calls(log, "apptainer", "build")) == 1  # nothing converted ...
        line = copy_line(capfd.readouterr().err)
        assert "images already there" in line and "image (" not in line, line  # ... nothing sent
        assert unit.image_path == first_image
        assert echo_report(out, 1)["argv"] == ["--i=1"]
        assert tb.ssh(f"ls {staging}/images").stdout.split() == [os.path.basename(first_image)]
    finally:
        tb.ssh(["rm", "-rf", staging], check=False)
