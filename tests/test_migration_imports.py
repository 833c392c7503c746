"""Launchers written for lxm3 0.4.2 import its submodules; lxm3.py serves every
import form they use, each resolving to the very objects lxm3 has, from a checkout
(PYTHONPATH) and from a pip install, without slowing down `import lxm3`."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import venv
import zipfile

import pytest

import lxm3
from lxm3 import xm, xm_cluster

from conftest import ROOT, lxm3_cli, write_files

# What lxm3 0.4.2's modules export (read from its sdist: each module's public
# names), plus upstream's later get_current_experiment.
EXPORTS_042 = {
    "lxm3.xm_cluster": [
        "ArrayJob", "Config", "CommandList", "DockerContainer", "Fileset", "ModuleName",
        "PDMProject", "PythonContainer", "PythonPackage", "SingularityContainer",
        "UniversalPackage", "Command", "DockerOptions", "GridEngine", "Local",
        "SingularityOptions", "Slurm", "ClusterExperiment", "ClusterWorkUnit",
        "create_experiment", "get_current_experiment", "JobRequirements",
    ],
    "lxm3.xm_cluster.array_job": ["ArrayJob", "flatten_array_job"],
    "lxm3.xm_cluster.config": ["Config", "default"],
    "lxm3.xm_cluster.executable_specs": [
        "Fileset", "ModuleName", "CommandList", "PythonPackage", "UniversalPackage",
        "SingularityContainer", "PDMProject", "PythonContainer", "DockerContainer",
        "name_from_path",
    ],
    "lxm3.xm_cluster.executables": ["Command"],
    "lxm3.xm_cluster.executors": [
        "SingularityOptions", "DockerOptions", "LocalSpec", "Local", "GridEngineSpec",
        "GridEngine", "SlurmSpec", "Slurm", "JobRequirements",
    ],
    "lxm3.xm_cluster.experiment": [
        "ClusterExperiment", "ClusterWorkUnit", "create_experiment", "get_current_experiment",
    ],
    "lxm3.xm_cluster.requirements": [
        "JobRequirements", "ResourceType", "ResourceDict", "ResourceQuantity",
    ],
    "lxm3.contrib.ucl": ["UclGridEngine"],
    "lxm3.contrib.wandb": ["configure_wandb"],
    "lxm3.xm": ["core", "executables", "job_blocks", "job_operators", "utils", "JobRequirements",
                "ShellSafeArg", "GB", "Hr"],
}

# Where our object of each name lives when it is not lxm3.<name>.
OURS = {
    "ResourceType": xm.ResourceType,
    "ResourceDict": xm.ResourceDict,
    "ResourceQuantity": xm.ResourceQuantity,
    "default": lxm3.load_config,
    "name_from_path": lxm3._name_from_path,
    "Command": lxm3.ClusterExecutable,
    "core": xm.core,
    "executables": xm.executables,
    "job_blocks": xm.job_blocks,
    "job_operators": xm.job_operators,
    "utils": xm.utils,
    "GB": xm.GB,
    "Hr": xm.Hr,
    "ShellSafeArg": xm.ShellSafeArg,
}


@pytest.mark.parametrize("module, name", [(m, n) for m, names in EXPORTS_042.items() for n in names])
def test_every_042_name_is_ours(module, name):
    value = getattr(importlib.import_module(module), name)
    assert value is OURS.get(name, getattr(lxm3, name, None))


# Each form, and what must then hold, in an interpreter of its own.
IMPORT_FORMS = [
    ("import lxm3.xm_cluster",
     "assert lxm3.xm_cluster.Slurm is lxm3.Slurm"),
    ("import lxm3.xm",
     "import xm; assert lxm3.xm is xm and lxm3.xm.JobRequirements is lxm3.JobRequirements"),
    ("from lxm3.xm import utils",
     "import xm.utils; assert utils is xm.utils"),
    ("from lxm3.xm import core, executables, job_blocks, job_operators",
     "import xm; assert (core, executables, job_blocks, job_operators) == "
     "(xm.core, xm.executables, xm.job_blocks, xm.job_operators)"),
    # xm's modules are never loaded a second time under another name.
    ("import lxm3.xm.utils",
     "assert sys.modules['lxm3.xm.utils'] is sys.modules['xm.utils'] is lxm3.xm.utils\n"
     "assert {id(m) for m in list(sys.modules.values()) "
     "if getattr(m, '__file__', None) == lxm3.xm.utils.__file__} == {id(lxm3.xm.utils)}"),
    ("from lxm3.xm_cluster import config, requirements, executors, array_job, experiment, "
     "executable_specs, executables",
     "assert executors.Slurm is lxm3.Slurm and requirements.JobRequirements is lxm3.JobRequirements\n"
     "assert config.Config is lxm3.Config and array_job.ArrayJob is lxm3.ArrayJob\n"
     "assert experiment.create_experiment is lxm3.create_experiment\n"
     "assert executable_specs.PythonPackage is lxm3.PythonPackage\n"
     "assert executables.Command is lxm3.ClusterExecutable"),
    ("import lxm3.xm_cluster.executors",
     "assert lxm3.xm_cluster.executors.Slurm is lxm3.Slurm"),
    ("from lxm3.xm_cluster.executors import Slurm, GridEngine, Local, SingularityOptions",
     "assert (Slurm, GridEngine, Local, SingularityOptions) == "
     "(lxm3.Slurm, lxm3.GridEngine, lxm3.Local, lxm3.SingularityOptions)"),
    ("from lxm3.xm_cluster.requirements import JobRequirements, ResourceType",
     "assert JobRequirements is lxm3.xm.JobRequirements and ResourceType is lxm3.xm.ResourceType"),
    ("from lxm3.xm_cluster.config import Config, default",
     "assert Config is lxm3.Config and default is lxm3.load_config"),
    ("from lxm3.xm_cluster.experiment import create_experiment, get_current_experiment",
     "assert get_current_experiment is lxm3.get_current_experiment"),
    ("from lxm3.xm_cluster.executables import Command",
     "assert Command is lxm3.ClusterExecutable"),
    # One module, whichever name imported it first.
    ("import lxm3.xm_cluster.experiment as first\nfrom lxm3.xm_cluster import experiment as second",
     "assert first is second is sys.modules['lxm3.xm_cluster.experiment']"),
    ("from lxm3.contrib import ucl, wandb",
     "assert ucl.UclGridEngine is lxm3.UclGridEngine\n"
     "assert wandb.configure_wandb is lxm3.configure_wandb"),
    ("import lxm3.contrib.ucl",
     "assert lxm3.contrib.ucl.UclGridEngine is lxm3.UclGridEngine"),
    ("from lxm3.contrib.wandb import configure_wandb",
     "assert configure_wandb is lxm3.configure_wandb"),
    ("from lxm3 import singularity",
     "assert singularity.uri.split('docker://ubuntu:22.04') == ('docker', '//ubuntu:22.04')"),
    ("from lxm3.singularity import uri, images",
     "assert uri.filename('docker://sylabsio/lolcow:latest', 'sif') == 'lolcow_latest.sif'\n"
     "assert callable(images.build_singularity_image)"),
    # 0.4.2's xm_cluster package had its modules as attributes.
    ("from lxm3 import xm, xm_cluster",
     "assert xm_cluster.executors.Slurm is xm_cluster.Slurm\n"
     "assert xm_cluster.requirements.ResourceType is xm.ResourceType"),
]


def run_form(python, statement, check, env):
    code = f"{statement}\nimport lxm3, sys\n{check}\nprint('ok', lxm3.__file__)\n"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("statement, check", IMPORT_FORMS, ids=[f for f, _ in IMPORT_FORMS])
def test_import_form_from_a_checkout(statement, check):
    proc = run_form(sys.executable, statement, check, {**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", os.path.join(ROOT, "lxm3.py")]


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory):
    """A virtual environment with lxm3 installed by pip from this checkout."""
    path = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(str(path))
    python = os.path.join(str(path), "bin", "python")
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           ROOT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


@pytest.mark.parametrize("statement, check", IMPORT_FORMS, ids=[f for f, _ in IMPORT_FORMS])
def test_import_form_when_installed(installed_python, statement, check):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run_form(installed_python, statement, check, env)
    assert proc.returncode == 0, proc.stderr
    ok, where = proc.stdout.split()
    assert ok == "ok" and where.startswith(os.path.dirname(os.path.dirname(installed_python)))
    assert "site-packages" in where


def test_modules_are_made_only_when_imported():
    """`from lxm3 import xm, xm_cluster` (every launcher's first line) makes none of them."""
    code = ("import sys; from lxm3 import xm, xm_cluster\n"
            "print(sorted(m for m in sys.modules if m.startswith('lxm3.')))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    assert proc.stdout.strip() == "['lxm3.xm_cluster']"


def test_unknown_modules_are_still_errors():
    with pytest.raises(ModuleNotFoundError, match="No module named 'lxm3.no_such_module'"):
        importlib.import_module("lxm3.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="No module named 'lxm3.xm.no_such_module'"):
        importlib.import_module("lxm3.xm.no_such_module")
    with pytest.raises(ImportError, match="cannot import name 'Nothing'"):
        exec("from lxm3.xm_cluster.executors import Nothing", {})
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        lxm3.no_such_thing  # noqa: B018


# --- the 0.4.2 names at work --------------------------------------------------------


def test_requirements_read_as_042_code_reads_them():
    from lxm3.xm_cluster import requirements as cluster_requirements

    requirements = cluster_requirements.JobRequirements(gpu=1, ram=8 * xm.GB, cpu=4)
    seen = {}
    for resource, value in requirements.task_requirements.items():  # as contrib/ucl.py did
        if resource == cluster_requirements.ResourceType.RAM:
            seen["ram"] = value
        elif resource == cluster_requirements.ResourceType.GPU:
            seen["gpu"] = value
        elif resource == cluster_requirements.ResourceType.CPU:
            seen["cpu"] = value
    assert seen == {"ram": 8 * xm.GB, "gpu": 1, "cpu": 4}
    assert requirements.task_requirements.get(cluster_requirements.ResourceType.GPU, 0) > 0
    assert requirements.location is None
    assert cluster_requirements.JobRequirements(location="node-7").location == "node-7"
    assert cluster_requirements.ResourceType["gpu"] is xm.ResourceType.GPU


def test_create_experiment_keeps_the_project(monkeypatch):
    config = lxm3.Config(project="from-config")
    with xm_cluster.create_experiment("positional", "mine", config=config) as experiment:
        assert experiment.project == "mine"
    assert lxm3.load_record(experiment.experiment_id).project == "mine"
    with xm_cluster.create_experiment("keyword", project="kw", config=config) as experiment:
        pass
    assert lxm3.load_record(experiment.experiment_id).project == "kw"
    with xm_cluster.create_experiment("from config", config=config) as experiment:
        pass
    assert lxm3.load_record(experiment.experiment_id).project == "from-config"
    monkeypatch.setenv("LXM_PROJECT", "from-env")  # as upstream: the variable wins
    with xm_cluster.create_experiment("env", project="mine", config=config) as experiment:
        pass
    assert lxm3.load_record(experiment.experiment_id).project == "from-env"
    with pytest.raises(TypeError, match="pass a Config as config="):
        xm_cluster.create_experiment("config in project's place", config)


def test_get_current_experiment_is_the_running_one():
    with pytest.raises(RuntimeError, match="outside an experiment.*create_experiment"):
        xm_cluster.get_current_experiment()
    with xm_cluster.create_experiment("outer", config=lxm3.Config()) as experiment:
        assert xm_cluster.get_current_experiment() is experiment
    with pytest.raises(RuntimeError, match="outside an experiment"):
        xm_cluster.get_current_experiment()


def test_get_current_experiment_in_a_job_generator(tmp_path):
    write_files(tmp_path, {"app/build.sh": "#!/bin/sh\ntrue\n"})
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    seen = []
    with xm_cluster.create_experiment("generator", config=lxm3.Config()) as experiment:
        executor = xm_cluster.Local()
        spec = xm_cluster.UniversalPackage(entrypoint=["true"], build_script="build.sh",
                                           path=str(tmp_path / "app"))
        [executable] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])

        async def generator(work_unit):
            seen.append(xm_cluster.get_current_experiment())
            await work_unit.add(xm.Job(executable, executor))

        experiment.add(generator)
    assert seen == [experiment]


def test_packaged_executables_are_042s_command(tmp_path):
    from lxm3.xm_cluster import executables

    write_files(tmp_path, {"app/build.sh": "#!/bin/sh\ntrue\n"})
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    with xm_cluster.create_experiment("command", config=lxm3.Config()) as experiment:
        spec = xm_cluster.UniversalPackage(entrypoint=["true"], build_script="build.sh",
                                           path=str(tmp_path / "app"))
        [executable] = experiment.package([xm.Packageable(
            spec, executor_spec=xm_cluster.Local.Spec(), args={"n": 1}, env_vars={"E": "v"})])
    assert type(executable) is executables.Command
    # What a 0.4.2 launcher reads from it: its name, arguments, environment and archive.
    assert (executable.name, executable.args.to_list(), executable.env_vars) == (
        "app", ["--n=1"], {"E": "v"})
    assert os.path.isfile(executable.archive.path)
    with zipfile.ZipFile(executable.archive.path) as archive:
        assert "entrypoint.sh" in archive.namelist()


def test_flatten_array_job():
    from lxm3.xm_cluster import array_job

    executable, executor = xm_cluster.ClusterExecutable("x"), xm_cluster.Local()
    job = array_job.ArrayJob(executable, executor, args=[{"seed": 1}, {"seed": 2}],
                             env_vars=[{"SHARED": "yes"}])
    jobs = array_job.flatten_array_job(job)
    assert [j.args.to_dict() for j in jobs] == [{"seed": 1}, {"seed": 2}]
    assert [j.env_vars for j in jobs] == [{"SHARED": "yes"}, {"SHARED": "yes"}]
    assert all(j.executable is executable and j.executor is executor for j in jobs)


def test_config_default_is_the_config_in_force(tmp_path):
    from lxm3.xm_cluster import config

    (tmp_path / "lxm.toml").write_text(textwrap.dedent("""\
        project = "p"
        [[clusters]]
        name = "first"
        [[clusters]]
        name = "second"
    """))
    assert config.default().project == "p"
    assert config.default().default_cluster() == "first"


def test_name_from_path_and_image_uris():
    from lxm3.singularity import uri
    from lxm3.xm_cluster import executable_specs

    assert executable_specs.name_from_path("/work/my-project/") == "my_project"
    assert uri.split("docker://ubuntu") == ("docker", "//ubuntu")
    assert uri.split("oci-archive:path/to/image.tar") == ("oci-archive", "path/to/image.tar")
    assert uri.split("images/my:image.sif") == ("", "images/my:image.sif")
    assert uri.split("plain.sif") == ("", "plain.sif")
    assert uri.is_valid("library:alpine") == (True, "")
    assert uri.is_valid("nonsense:x")[0] is False
    assert uri.filename("docker://ghcr.io/me/app:v1,v2", "sif") == "app_v1.sif"
    assert uri.filename("docker://ubuntu", "sif") == "ubuntu_latest.sif"
    assert uri.filename("https://example.org/images/a.sif", "sif") == "a.sif"
    assert uri.filename("a.sif", "sif") == ""


def test_the_names_serve_a_launcher_written_for_042(tmp_path):
    """A launcher importing the way 0.4.2's users do runs a local job."""
    write_files(tmp_path, {
        "app/build.sh": "#!/bin/sh\ntrue\n",
        "launcher.py": """\
            import lxm3.xm_cluster
            from lxm3 import xm
            from lxm3.xm import utils
            from lxm3.xm_cluster import executors, requirements
            from lxm3.xm_cluster.executable_specs import UniversalPackage
            from lxm3.xm_cluster.experiment import create_experiment

            if __name__ == "__main__":
                assert utils.find_launch_script_path().endswith("launcher.py")
                with create_experiment("042 imports", project="p") as experiment:
                    executor = executors.Local(requirements.JobRequirements(cpu=1))
                    spec = UniversalPackage(entrypoint=['echo "ran with $*"'],
                                            build_script="build.sh", path="app")
                    [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
                    experiment.add(lxm3.xm_cluster.ArrayJob(exe, executor, args=[{"n": 1}]))
        """,
    })
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    proc = lxm3_cli("launch", "launcher.py", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ran with --n=1" in proc.stdout
    [record] = [r for r in lxm3.list_records() if r.title == "042 imports"]
    assert record.project == "p"
    assert json.dumps(record.to_json())  # the record stays plain data
