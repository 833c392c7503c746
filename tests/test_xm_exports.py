"""`import xm` exposes XManager v0.4.0's public names, module for module, cheaply."""

import importlib
import os
import subprocess
import sys

import pytest

import xm

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


def test_lxm3_extra_exports():
    for name in LXM3_042_EXTRA_EXPORTS["compute_units"]:
        assert hasattr(xm, name)


def test_job_operators_module_is_exported():
    from xm import job_operators

    assert xm.job_operators is job_operators
    for name in ["shallow_copy_job_type", "populate_job_names", "flatten_jobs"]:
        assert callable(getattr(xm.job_operators, name))


@pytest.mark.parametrize("module", MODULES)
def test_modules_exist(module):
    assert importlib.import_module(f"xm.{module}").__name__ == f"xm.{module}"


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
