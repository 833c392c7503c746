"""`import xm` exposes XManager v0.4.0's public names, module for module, each doing what
v0.4.0's does, and cheaply."""

import collections.abc
import importlib
import os
import subprocess
import sys
import typing

import pytest
from xm_toy_backend import ToyExecutable, ToyExecutor, ToyExecutorSpec, make_job

import xm

XM_DIR = os.path.dirname(os.path.abspath(xm.__file__))

# The names xmanager v0.4.0's xm/__init__.py imports (the spec), by module.
UPSTREAM_V040_EXPORTS = {
    "core": [
        "AuxiliaryUnitJob",
        "AuxiliaryUnitRole",
        "Experiment",
        "ExperimentUnit",
        "ExperimentUnitError",
        "ExperimentUnitFailedError",
        "ExperimentUnitNotCompletedError",
        "ExperimentUnitRole",
        "ExperimentUnitStatus",
        "Importance",
        "LaunchedJob",
        "NotFoundError",
        "WorkUnit",
        "WorkUnitCompletedAwaitable",
        "WorkUnitRole",
    ],
    "executables": [
        "BazelBinary",
        "BazelContainer",
        "Binary",
        "BinaryDependency",
        "CommandList",
        "Container",
        "Dockerfile",
        "ModuleName",
        "PythonContainer",
    ],
    "job_blocks": [
        "Constraint",
        "Executable",
        "ExecutableSpec",
        "Executor",
        "ExecutorSpec",
        "get_args_for_all_jobs",
        "Job",
        "JobConfig",
        "JobGeneratorType",
        "JobGroup",
        "JobType",
        "merge_args",
        "Packageable",
        "SequentialArgs",
        "UserArgs",
    ],
    "metadata_context": ["ContextAnnotations", "MetadataContext"],
    "packagables": [
        "bazel_binary",
        "bazel_container",
        "binary",
        "container",
        "dockerfile_container",
        "python_container",
    ],
    "resources": [
        "GpuType",
        "InvalidTpuTopologyError",
        "JobRequirements",
        "ResourceDict",
        "ResourceQuantity",
        "ResourceType",
        "ServiceTier",
        "Topology",
        "TpuType",
    ],
    "utils": ["run_in_asyncio_loop", "ShellSafeArg"],
    # `from xmanager.xm.compute_units import *`
    "compute_units": ["vCPU", "KiB", "MiB", "GiB", "TiB", "PiB", "KB", "MB", "GB", "TB", "PB"],
}
LXM3_042_EXTRA_EXPORTS = {"compute_units": ["Sec", "Min", "Hr"]}
MODULES = [
    "async_packager",
    "compute_units",
    "core",
    "executables",
    "id_predictor",
    "job_blocks",
    "job_operators",
    "metadata_context",
    "packagables",
    "pattern_matching",
    "resources",
    "utils",
]


@pytest.mark.parametrize("module", sorted(UPSTREAM_V040_EXPORTS))
def test_upstream_names_are_exported_from_their_modules(module):
    mod = importlib.import_module(f"xm.{module}")
    for name in UPSTREAM_V040_EXPORTS[module]:
        assert getattr(xm, name) is getattr(mod, name), name


@pytest.mark.parametrize("module", MODULES)
def test_each_module_of_v040_imports_as_launchers_import_it(module):
    namespace = {}
    exec(f"from xm import {module}", namespace)  # as in `from xmanager.xm import utils`
    assert namespace[module].__file__ == os.path.join(XM_DIR, f"{module}.py")


# --- what each exported name does, used as a launcher uses it: xm.NAME ----------------
#
# Each check_* function checks the names it is registered for against xmanager
# v0.4.0's behaviour; test_every_exported_name_has_a_check keeps the table whole.

CHECKS = {}  # exported name: the function that checks it


def checks(*names):
    def register(function):
        for name in names:
            CHECKS[name] = function
        return function

    return register


def abstract_methods(cls):
    return sorted(cls.__abstractmethods__)


def message_of(error, call):
    """The message of the ``error`` that ``call()`` raises."""
    try:
        call()
    except error as e:
        return str(e)
    pytest.fail(f"{call} did not raise {error.__name__}")


@checks("Experiment", "ExperimentUnit", "WorkUnit", "ExperimentUnitStatus", "ExecutableSpec",
        "Executor", "ExecutorSpec", "Executable", "WorkUnitCompletedAwaitable")
def check_what_a_backend_implements():
    assert abstract_methods(xm.Experiment) == [
        "_create_experiment_unit", "experiment_id", "work_unit_count", "work_units"]
    assert abstract_methods(xm.ExperimentUnit) == ["_launch_job_group", "experiment_unit_name"]
    assert issubclass(xm.WorkUnit, xm.ExperimentUnit)
    assert abstract_methods(xm.WorkUnit) == [
        "_launch_job_group", "experiment_unit_name", "work_unit_id"]
    assert abstract_methods(xm.ExperimentUnitStatus) == [
        "is_active", "is_completed", "is_failed", "message"]
    assert issubclass(xm.WorkUnitCompletedAwaitable, collections.abc.Coroutine)
    assert abstract_methods(xm.ExecutableSpec) == ["name"]
    assert abstract_methods(xm.Executor) == ["Spec"]
    assert isinstance(ToyExecutor.Spec(), xm.ExecutorSpec)
    assert ToyExecutable("e") == ToyExecutable("e") and ToyExecutable("e").name == "e"


@checks("ExperimentUnitError", "ExperimentUnitFailedError", "ExperimentUnitNotCompletedError",
        "NotFoundError")
def check_errors():
    error = xm.ExperimentUnitError("lost", work_unit="wu")
    assert (str(error), error.work_unit) == ("lost", "wu")
    assert issubclass(xm.ExperimentUnitError, RuntimeError)
    assert issubclass(xm.ExperimentUnitFailedError, xm.ExperimentUnitError)
    assert issubclass(xm.ExperimentUnitNotCompletedError, xm.ExperimentUnitError)
    assert issubclass(xm.NotFoundError, KeyError)


@checks("Importance", "ExperimentUnitRole", "WorkUnitRole", "AuxiliaryUnitRole",
        "AuxiliaryUnitJob", "LaunchedJob")
def check_roles_and_launched_jobs():
    assert [(i.name, i.value) for i in xm.Importance] == [
        ("HIGH", "high"), ("NORMAL", "normal"), ("LOW", "low")]
    assert issubclass(xm.WorkUnitRole, xm.ExperimentUnitRole)
    assert issubclass(xm.AuxiliaryUnitRole, xm.ExperimentUnitRole)
    assert xm.WorkUnitRole().importance is xm.Importance.NORMAL
    assert xm.AuxiliaryUnitRole(termination_delay_secs=5).termination_delay_secs == 5
    assert "'termination_delay_secs'" in message_of(TypeError, xm.AuxiliaryUnitRole)
    job = xm.AuxiliaryUnitJob(make_job(), importance=xm.Importance.LOW, termination_delay_secs=60)
    assert job.role == xm.AuxiliaryUnitRole(importance=xm.Importance.LOW,
                                            termination_delay_secs=60)
    launched = xm.LaunchedJob(name="n")
    assert (launched.name, launched.address, launched.logs) == ("n", None, None)
    assert xm.LaunchedJob("n", "host:1", "/logs").address == "host:1"


class Dependency(xm.BinaryDependency):
    def __eq__(self, other):
        return type(other) is Dependency

    def __hash__(self):
        return 0


@checks("ModuleName", "CommandList", "Binary", "BinaryDependency", "BazelBinary",
        "BazelContainer", "Container", "Dockerfile", "PythonContainer")
def check_executable_specs():
    assert xm.ModuleName("pkg.main").module_name == "pkg.main"
    assert xm.CommandList(["make", "./run"]).commands == ["make", "./run"]
    binary = xm.Binary("/opt/bin/train", dependencies=[Dependency()])
    assert (binary.name, binary.dependencies) == ("train", [Dependency()])
    assert xm.Binary("/b").dependencies == []
    bazel = xm.BazelBinary("//a/b:c", bazel_args=["-c", "opt"])
    assert (bazel.name, bazel.bazel_args, bazel.dependencies) == ("b_c", ["-c", "opt"], [])
    assert xm.BazelContainer("//a:image.tar").name == "a_image_tar"
    assert xm.Container("docker.io/library/python:3.11").name == "python_3_11"
    dockerfile = xm.Dockerfile("/src/app")
    assert (dockerfile.name, dockerfile.dockerfile) == ("app", "/src/app/Dockerfile")
    python = xm.PythonContainer(xm.ModuleName("m"), path="/src/my-app")
    assert (python.name, python.base_image, python.use_deep_module) == ("my_app", None, False)


class Config(xm.JobConfig):
    pass


class SameMachine(xm.Constraint):
    pass


@checks("SequentialArgs", "merge_args", "UserArgs", "ShellSafeArg")
def check_arguments():
    assert xm.SequentialArgs.from_collection(["pos arg"]).to_list() == ["'pos arg'"]
    assert xm.SequentialArgs.from_collection(
        {"flag": True, "off": False, "lst": [1, "a b"]}).to_list() == [
        "--flag", "--nooff", "--lst=1", "--lst='a b'"]
    assert message_of(ValueError, lambda: xm.SequentialArgs.from_collection("--foo")) == (
        "Tried to construct xm.SequentialArgs from a string: '--foo'. Wrap it in a list: "
        "['--foo'] to make it a single argument.")
    assert xm.merge_args([1], {"a": "z", "b": "y"}, [2], {"b": "x", "c": "t"}, [3]).to_list() == [
        "1", "--a=z", "--b=x", "2", "--c=t", "3"]
    assert xm.SequentialArgs in typing.get_args(xm.UserArgs)
    assert xm.SequentialArgs.from_collection([xm.ShellSafeArg("$HOME"), "$HOME"]).to_list() == [
        "$HOME", "'$HOME'"]


@checks("Job", "JobGroup", "JobConfig", "JobType", "JobGeneratorType", "Constraint",
        "get_args_for_all_jobs", "job_operators")
def check_jobs():
    job = make_job(args={"a": 1}, env_vars={"E": "v"})
    assert (job.args.to_list(), job.env_vars, job.name) == (["--a=1"], {"E": "v"}, None)
    same_machine = SameMachine()
    group = xm.JobGroup(learner=make_job("l"), actor=make_job("a"), constraints=[same_machine])
    assert list(group.jobs) == ["learner", "actor"] and group.constraints == [same_machine]
    assert {xm.Job, xm.JobGroup, xm.JobConfig} <= set(typing.get_args(xm.JobType))
    assert isinstance(Config(), xm.JobConfig)
    assert typing.get_origin(xm.JobGeneratorType) is collections.abc.Callable
    nested = xm.JobGroup(a=make_job("a"), b=xm.JobGroup(c=make_job("c")))
    assert xm.get_args_for_all_jobs(nested, {"seed": 1}) == {
        "a": {"args": {"seed": 1}}, "b": {"c": {"args": {"seed": 1}}}}
    assert [j.name for j in xm.job_operators.flatten_jobs(nested)] == ["a", "c"]


PACKAGEABLE = {"args": {"lr": 0.1}, "env_vars": {"SEED": "1"}}


def check_packaged(packageable, spec_type, **fields):
    """A Packageable of the backend's executor spec, of ``spec_type`` with ``fields``."""
    assert type(packageable) is xm.Packageable
    assert isinstance(packageable.executor_spec, ToyExecutorSpec)
    assert type(packageable.executable_spec) is spec_type
    for field, value in fields.items():
        assert getattr(packageable.executable_spec, field) == value, field
    assert packageable.args.to_list() == ["--lr=0.1"]
    assert packageable.env_vars == {"SEED": "1"}


@checks("Packageable", "binary", "bazel_binary", "container", "bazel_container",
        "dockerfile_container", "python_container")
def check_packagables():
    spec = ToyExecutorSpec()
    check_packaged(xm.Packageable(xm.Binary("/b"), spec, **PACKAGEABLE), xm.Binary, path="/b")
    check_packaged(xm.binary(spec, "/opt/train", **PACKAGEABLE), xm.Binary, path="/opt/train")
    check_packaged(xm.bazel_binary(spec, "//t:train", **PACKAGEABLE), xm.BazelBinary,
                   label="//t:train")
    check_packaged(xm.container(spec, "python:3.11", **PACKAGEABLE), xm.Container,
                   image_path="python:3.11")
    check_packaged(xm.bazel_container(spec, "//t:image.tar", **PACKAGEABLE), xm.BazelContainer,
                   label="//t:image.tar")
    check_packaged(xm.dockerfile_container(spec, "/src/app", **PACKAGEABLE), xm.Dockerfile,
                   path="/src/app", dockerfile="/src/app/Dockerfile")
    check_packaged(xm.python_container(spec, xm.ModuleName("train"), "/src/app", **PACKAGEABLE),
                   xm.PythonContainer, entrypoint=xm.ModuleName("train"), path="/src/app")


@checks("ContextAnnotations", "MetadataContext")
def check_metadata_context():
    annotations = xm.ContextAnnotations()
    annotations.set_title("ignored")  # the base stores nothing
    assert annotations.title == ""
    context = xm.MetadataContext(creator="me", annotations=annotations)
    assert (context.creator, context.annotations) == ("me", annotations)


@checks("ResourceType", "GpuType", "TpuType", "JobRequirements", "ResourceDict",
        "ResourceQuantity", "ServiceTier", "Topology", "InvalidTpuTopologyError")
def check_resources():
    assert xm.ResourceType.CPU.value == 100002
    assert xm.ResourceType["ram"] is xm.ResourceType.MEMORY
    assert str(xm.ResourceType.V100) == "V100"
    assert xm.GpuType["V100"] is xm.ResourceType.V100 and xm.ResourceType.CPU not in xm.GpuType
    assert xm.TpuType["TPU_V2"] is xm.ResourceType.TPU_V2 and xm.ResourceType.V100 not in xm.TpuType
    requirements = xm.JobRequirements(cpu=4, memory=8 * xm.GiB, a100=2, location="node01")
    assert repr(requirements) == (
        "xm.JobRequirements(cpu=4.0, memory=8589934592.0, a100=2.0, location='node01')")
    assert requirements.service_tier is xm.ServiceTier.PROD
    resources = xm.ResourceDict()
    resources[xm.ResourceType.V100] = 1.0
    resources[xm.ResourceType.CPU] = 2.0
    assert str(resources) == "CPU: 2.0, V100: 1.0"
    assert xm.Topology in typing.get_args(xm.ResourceQuantity)
    assert (xm.Topology("4x4").chip_count, repr(xm.Topology("4x4"))) == (16, "xm.Topology('4x4')")
    assert message_of(xm.InvalidTpuTopologyError, lambda: xm.Topology("4y4")) == (
        "Invalid TPU topology: 4y4.")


async def add_async(a, b):
    return a + b


@checks("run_in_asyncio_loop")
def check_run_in_asyncio_loop():
    assert xm.run_in_asyncio_loop(add_async)(1, 2) == 3


@checks(*UPSTREAM_V040_EXPORTS["compute_units"], *LXM3_042_EXTRA_EXPORTS["compute_units"])
def check_compute_units():
    assert xm.vCPU == 1.0
    assert [xm.KiB, xm.MiB, xm.GiB, xm.TiB, xm.PiB] == [2**10, 2**20, 2**30, 2**40, 2**50]
    assert [xm.KB, xm.MB, xm.GB, xm.TB, xm.PB] == [10**3, 10**6, 10**9, 10**12, 10**15]
    assert [xm.Sec, xm.Min, xm.Hr] == [1, 60, 3600]  # lxm3 0.4.2's additions


def test_every_exported_name_has_a_check():
    exported = {n for names in UPSTREAM_V040_EXPORTS.values() for n in names}
    exported |= set(LXM3_042_EXTRA_EXPORTS["compute_units"]) | {"job_operators"}
    assert set(CHECKS) == exported


@pytest.mark.parametrize("check", sorted(set(CHECKS.values()), key=lambda f: f.__name__),
                         ids=lambda f: f.__name__)
def test_exported_names_do_what_v040s_do(check):
    check()


def test_star_import_and_dir_list_every_name():
    namespace = {}
    exec("from xm import *", namespace)
    expected = {n for names in UPSTREAM_V040_EXPORTS.values() for n in names}
    expected |= set(LXM3_042_EXTRA_EXPORTS["compute_units"]) | {"job_operators"}
    assert expected <= set(namespace)
    assert expected <= set(dir(xm))
    assert set(xm.__all__) == expected


def test_typing_aliases():
    import typing

    assert typing.get_origin(xm.JobType) is typing.Union
    assert xm.Job in typing.get_args(xm.JobType)
    assert xm.SequentialArgs in typing.get_args(xm.UserArgs)
    assert xm.Topology in typing.get_args(xm.ResourceQuantity)
    assert "JobTypeVar" in dir(importlib.import_module("xm.job_blocks"))
    with pytest.raises(AttributeError, match="module 'xm' has no attribute 'Nope'"):
        xm.Nope  # noqa: B018
    with pytest.raises(AttributeError, match="module 'xm.job_blocks' has no attribute 'Nope'"):
        importlib.import_module("xm.job_blocks").Nope  # noqa: B018


def test_import_xm_loads_nothing_heavy():
    code = (
        "import sys; import xm; "
        "heavy = ['asyncio', 'typing', 'concurrent.futures', 'logging', 'getpass',"
        " 'xm.pattern_matching', 'dataclasses', 'inspect'];"
        "print([m for m in heavy if m in sys.modules])"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # -S: no site-packages .pth files, which may preload modules themselves.
    output = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
