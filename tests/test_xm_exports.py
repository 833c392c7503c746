"""`import xm` exposes XManager v0.4.0's public names, module for module, each doing what
v0.4.0's does, and cheaply."""

import collections.abc
import importlib
import os
import subprocess
import sys
import typing

import pytest

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


class Spec(xm.ExecutorSpec):
    """A backend's executor spec, for the packagables."""


class Exe(xm.Executable):
    pass


class Exec(xm.Executor):
    @classmethod
    def Spec(cls):  # noqa: N802 - the API's name
        return Spec()


def job(name=None, **kwargs):
    return xm.Job(Exe("exe"), Exec(), name=name, **kwargs)


def packaged(packageable, spec_type, **fields):
    """A packageable of the backend's spec, with the given executable spec fields."""
    assert type(packageable) is xm.Packageable
    assert isinstance(packageable.executor_spec, Spec)
    assert type(packageable.executable_spec) is spec_type
    for field, value in fields.items():
        assert getattr(packageable.executable_spec, field) == value, field
    assert packageable.args.to_list() == ["--lr=0.1"]
    assert packageable.env_vars == {"SEED": "1"}
    return True


def abstract(cls):
    """cls cannot be instantiated: its abstract methods."""
    return sorted(cls.__abstractmethods__)


def raises(error, call):
    try:
        call()
    except error as e:
        return str(e)
    raise AssertionError(f"{call} did not raise {error.__name__}")


PACKAGEABLE = {"args": {"lr": 0.1}, "env_vars": {"SEED": "1"}}

# name: a check that is true when xm.NAME behaves as xmanager v0.4.0's does.
BEHAVIOUR = {
    # core: the experiment API a backend implements
    "Experiment": lambda: abstract(xm.Experiment) == [
        "_create_experiment_unit", "experiment_id", "work_unit_count", "work_units"],
    "ExperimentUnit": lambda: abstract(xm.ExperimentUnit) == ["_launch_job_group",
                                                              "experiment_unit_name"],
    "WorkUnit": lambda: issubclass(xm.WorkUnit, xm.ExperimentUnit) and abstract(xm.WorkUnit) == [
        "_launch_job_group", "experiment_unit_name", "work_unit_id"],
    "WorkUnitCompletedAwaitable": lambda: issubclass(
        xm.WorkUnitCompletedAwaitable, collections.abc.Coroutine),
    "ExperimentUnitStatus": lambda: abstract(xm.ExperimentUnitStatus) == [
        "is_active", "is_completed", "is_failed", "message"],
    "ExperimentUnitError": lambda: (
        (str(xm.ExperimentUnitError("lost", work_unit="wu")),
         xm.ExperimentUnitError("lost", work_unit="wu").work_unit) == ("lost", "wu")
        and issubclass(xm.ExperimentUnitError, RuntimeError)),
    "ExperimentUnitFailedError": lambda: issubclass(xm.ExperimentUnitFailedError,
                                                    xm.ExperimentUnitError),
    "ExperimentUnitNotCompletedError": lambda: issubclass(xm.ExperimentUnitNotCompletedError,
                                                          xm.ExperimentUnitError),
    "NotFoundError": lambda: issubclass(xm.NotFoundError, KeyError),
    "Importance": lambda: [(i.name, i.value) for i in xm.Importance] == [
        ("HIGH", "high"), ("NORMAL", "normal"), ("LOW", "low")],
    "ExperimentUnitRole": lambda: all(issubclass(r, xm.ExperimentUnitRole)
                                      for r in (xm.WorkUnitRole, xm.AuxiliaryUnitRole)),
    "WorkUnitRole": lambda: xm.WorkUnitRole().importance is xm.Importance.NORMAL,
    "AuxiliaryUnitRole": lambda: (
        xm.AuxiliaryUnitRole(termination_delay_secs=5).termination_delay_secs == 5
        and "termination_delay_secs" in raises(TypeError, xm.AuxiliaryUnitRole)),
    "AuxiliaryUnitJob": lambda: xm.AuxiliaryUnitJob(
        job(), importance=xm.Importance.LOW, termination_delay_secs=60).role == xm.AuxiliaryUnitRole(
        importance=xm.Importance.LOW, termination_delay_secs=60),
    "LaunchedJob": lambda: (xm.LaunchedJob(name="n").address, xm.LaunchedJob(name="n").logs,
                            xm.LaunchedJob("n", "host:1", "/logs").address) == (None, None, "host:1"),
    # executables: what to package; names come from the path
    "ModuleName": lambda: xm.ModuleName("pkg.main").module_name == "pkg.main",
    "CommandList": lambda: xm.CommandList(["make", "./run"]).commands == ["make", "./run"],
    "Binary": lambda: (xm.Binary("/opt/bin/train").name, xm.Binary("/opt/bin/train").dependencies
                       ) == ("train", []),
    "BinaryDependency": lambda: xm.Binary("/b", dependencies=[Dependency()]).dependencies[0] == (
        Dependency()),
    "BazelBinary": lambda: (xm.BazelBinary("//a/b:c", bazel_args=["-c", "opt"]).name,
                            xm.BazelBinary("//a/b:c", bazel_args=["-c", "opt"]).bazel_args
                            ) == ("b_c", ["-c", "opt"]),
    "BazelContainer": lambda: xm.BazelContainer("//a:image.tar").name == "a_image_tar",
    "Container": lambda: xm.Container("docker.io/library/python:3.11").name == "python_3_11",
    "Dockerfile": lambda: (xm.Dockerfile("/src/app").dockerfile,
                           xm.Dockerfile("/src/app").name) == ("/src/app/Dockerfile", "app"),
    "PythonContainer": lambda: (xm.PythonContainer(xm.ModuleName("m"), path="/src/my-app").name,
                                xm.PythonContainer(xm.ModuleName("m")).use_deep_module
                                ) == ("my_app", False),
    # job_blocks: jobs, their arguments and the base classes of a backend
    "SequentialArgs": lambda: (
        xm.SequentialArgs.from_collection(["pos arg"]).to_list() == ["'pos arg'"]
        and xm.SequentialArgs.from_collection({"flag": True, "off": False, "lst": [1, "a b"]}
                                              ).to_list() == ["--flag", "--nooff", "--lst=1",
                                                              "--lst='a b'"]
        and "Wrap it in a list" in raises(ValueError,
                                          lambda: xm.SequentialArgs.from_collection("--foo"))),
    "merge_args": lambda: xm.merge_args([1], {"a": "z", "b": "y"}, [2], {"b": "x", "c": "t"},
                                        [3]).to_list() == ["1", "--a=z", "--b=x", "2", "--c=t", "3"],
    "UserArgs": lambda: xm.SequentialArgs in typing.get_args(xm.UserArgs),
    "Job": lambda: (job(args={"a": 1}, env_vars={"E": "v"}).args.to_list(),
                    job(env_vars={"E": "v"}).env_vars) == (["--a=1"], {"E": "v"}),
    "JobGroup": lambda: list(xm.JobGroup(learner=job(), actor=job()).jobs) == ["learner", "actor"],
    "JobConfig": lambda: isinstance(Config(), xm.JobConfig),
    "JobType": lambda: {xm.Job, xm.JobGroup, xm.JobConfig} <= set(typing.get_args(xm.JobType)),
    "JobGeneratorType": lambda: typing.get_origin(xm.JobGeneratorType) is (
        collections.abc.Callable),
    "get_args_for_all_jobs": lambda: xm.get_args_for_all_jobs(
        xm.JobGroup(a=job(), b=xm.JobGroup(c=job())), {"seed": 1}) == {
        "a": {"args": {"seed": 1}}, "b": {"c": {"args": {"seed": 1}}}},
    "Packageable": lambda: packaged(xm.Packageable(xm.Binary("/b"), Spec(), **PACKAGEABLE),
                                    xm.Binary, path="/b"),
    "Executable": lambda: Exe("e") == Exe("e") and Exe("e").name == "e",
    "ExecutableSpec": lambda: abstract(xm.ExecutableSpec) == ["name"],
    "Executor": lambda: abstract(xm.Executor) == ["Spec"] and isinstance(Exec.Spec(), Spec),
    "ExecutorSpec": lambda: issubclass(Spec, xm.ExecutorSpec),
    "Constraint": lambda: xm.JobGroup(a=job(), constraints=[SAME_MACHINE]).constraints == [
        SAME_MACHINE],
    # metadata_context
    "ContextAnnotations": lambda: xm.ContextAnnotations().title == "",
    "MetadataContext": lambda: xm.MetadataContext(
        creator="me", annotations=xm.ContextAnnotations()).creator == "me",
    # packagables: each makes a Packageable of its spec
    "binary": lambda: packaged(xm.binary(Spec(), "/opt/train", **PACKAGEABLE), xm.Binary,
                               path="/opt/train"),
    "bazel_binary": lambda: packaged(xm.bazel_binary(Spec(), "//t:train", **PACKAGEABLE),
                                     xm.BazelBinary, label="//t:train"),
    "container": lambda: packaged(xm.container(Spec(), "python:3.11", **PACKAGEABLE),
                                  xm.Container, image_path="python:3.11"),
    "bazel_container": lambda: packaged(xm.bazel_container(Spec(), "//t:image.tar", **PACKAGEABLE),
                                        xm.BazelContainer, label="//t:image.tar"),
    "dockerfile_container": lambda: packaged(
        xm.dockerfile_container(Spec(), "/src/app", **PACKAGEABLE), xm.Dockerfile,
        path="/src/app", dockerfile="/src/app/Dockerfile"),
    "python_container": lambda: packaged(
        xm.python_container(Spec(), xm.ModuleName("train"), "/src/app", **PACKAGEABLE),
        xm.PythonContainer, entrypoint=xm.ModuleName("train"), path="/src/app"),
    # resources
    "ResourceType": lambda: (xm.ResourceType.CPU.value, xm.ResourceType["ram"],
                             str(xm.ResourceType.V100)) == (100002, xm.ResourceType.MEMORY, "V100"),
    "GpuType": lambda: xm.GpuType["V100"] is xm.ResourceType.V100 and xm.ResourceType.CPU not in (
        xm.GpuType),
    "TpuType": lambda: xm.TpuType["TPU_V2"] is xm.ResourceType.TPU_V2 and xm.ResourceType.V100 not in (
        xm.TpuType),
    "JobRequirements": lambda: repr(xm.JobRequirements(cpu=4, memory=8 * xm.GiB, a100=2,
                                                       location="node01")) == (
        "xm.JobRequirements(cpu=4.0, memory=8589934592.0, a100=2.0, location='node01')"),
    "ResourceDict": lambda: str(resource_dict(V100=1.0, CPU=2.0)) == "CPU: 2.0, V100: 1.0",
    "ResourceQuantity": lambda: xm.Topology in typing.get_args(xm.ResourceQuantity),
    "ServiceTier": lambda: xm.JobRequirements().service_tier is xm.ServiceTier.PROD,
    "Topology": lambda: (xm.Topology("4x4").chip_count, repr(xm.Topology("4x4"))) == (
        16, "xm.Topology('4x4')"),
    "InvalidTpuTopologyError": lambda: raises(xm.InvalidTpuTopologyError,
                                              lambda: xm.Topology("4y4")) == "Invalid TPU topology: 4y4.",
    # utils
    "ShellSafeArg": lambda: xm.SequentialArgs.from_collection(
        [xm.ShellSafeArg("$HOME"), "$HOME"]).to_list() == ["$HOME", "'$HOME'"],
    "run_in_asyncio_loop": lambda: xm.run_in_asyncio_loop(add_async)(1, 2) == 3,
    # compute units: multipliers for JobRequirements
    "vCPU": lambda: xm.vCPU == 1.0,
    "KiB": lambda: xm.KiB == 2**10, "MiB": lambda: xm.MiB == 2**20, "GiB": lambda: xm.GiB == 2**30,
    "TiB": lambda: xm.TiB == 2**40, "PiB": lambda: xm.PiB == 2**50,
    "KB": lambda: xm.KB == 10**3, "MB": lambda: xm.MB == 10**6, "GB": lambda: xm.GB == 10**9,
    "TB": lambda: xm.TB == 10**12, "PB": lambda: xm.PB == 10**15,
    # lxm3 0.4.2's additions
    "Sec": lambda: xm.Sec == 1, "Min": lambda: xm.Min == 60, "Hr": lambda: xm.Hr == 3600,
    "job_operators": lambda: [j.name for j in xm.job_operators.flatten_jobs(
        xm.JobGroup(a=job("a"), b=xm.JobGroup(c=job("c"))))] == ["a", "c"],
}


class Dependency(xm.BinaryDependency):
    def __eq__(self, other):
        return type(other) is Dependency

    def __hash__(self):
        return 0


class Config(xm.JobConfig):
    pass


class SameMachine(xm.Constraint):
    pass


SAME_MACHINE = SameMachine()


def resource_dict(**amounts):
    resources = xm.ResourceDict()
    for name, amount in amounts.items():
        resources[xm.ResourceType[name]] = amount
    return resources


async def add_async(a, b):
    return a + b


def test_every_exported_name_has_its_behaviour_checked():
    exported = {n for names in UPSTREAM_V040_EXPORTS.values() for n in names}
    exported |= set(LXM3_042_EXTRA_EXPORTS["compute_units"]) | {"job_operators"}
    assert set(BEHAVIOUR) == exported


@pytest.mark.parametrize("name", sorted(BEHAVIOUR))
def test_exported_name_does_what_v040s_does(name):
    assert BEHAVIOUR[name]() is True, name


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
