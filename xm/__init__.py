"""XManager's launch API (v0.4.0) on the standard library.

Launchers written for XManager use it unchanged: `from lxm3 import xm`, or
`from xm import core` where they imported `xmanager.xm.core`. Importing it
is cheap; `asyncio` is only loaded once an experiment is entered.
"""

from xm import job_operators
from xm.compute_units import GB, KB, MB, PB, TB, GiB, Hr, KiB, MiB, Min, PiB, Sec, TiB, vCPU
from xm.core import (
    AuxiliaryUnitJob,
    AuxiliaryUnitRole,
    Experiment,
    ExperimentUnit,
    ExperimentUnitError,
    ExperimentUnitFailedError,
    ExperimentUnitNotCompletedError,
    ExperimentUnitRole,
    ExperimentUnitStatus,
    Importance,
    LaunchedJob,
    NotFoundError,
    WorkUnit,
    WorkUnitCompletedAwaitable,
    WorkUnitRole,
)
from xm.executables import (
    BazelBinary,
    BazelContainer,
    Binary,
    BinaryDependency,
    CommandList,
    Container,
    Dockerfile,
    ModuleName,
    PythonContainer,
)
from xm.job_blocks import (
    Constraint,
    Executable,
    ExecutableSpec,
    Executor,
    ExecutorSpec,
    Job,
    JobConfig,
    JobGroup,
    Packageable,
    SequentialArgs,
    get_args_for_all_jobs,
    merge_args,
)
from xm.metadata_context import ContextAnnotations, MetadataContext
from xm.packagables import (
    bazel_binary,
    bazel_container,
    binary,
    container,
    dockerfile_container,
    python_container,
)
from xm.resources import (
    GpuType,
    InvalidTpuTopologyError,
    JobRequirements,
    ResourceDict,
    ResourceType,
    ServiceTier,
    Topology,
    TpuType,
)
from xm.utils import ShellSafeArg, run_in_asyncio_loop

# typing aliases, created on first access so that `typing` is not imported
# by `import xm` (it is slow to import).
_LAZY_ALIASES = {
    "JobGeneratorType": "job_blocks",
    "JobType": "job_blocks",
    "UserArgs": "job_blocks",
    "ResourceQuantity": "resources",
}


def __getattr__(name: str):
    module = _LAZY_ALIASES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"xm.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY_ALIASES})


__all__ = [
    "job_operators",
    # compute_units
    "vCPU",
    "KiB",
    "MiB",
    "GiB",
    "TiB",
    "PiB",
    "KB",
    "MB",
    "GB",
    "TB",
    "PB",
    "Sec",
    "Min",
    "Hr",
    # core
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
    # executables
    "BazelBinary",
    "BazelContainer",
    "Binary",
    "BinaryDependency",
    "CommandList",
    "Container",
    "Dockerfile",
    "ModuleName",
    "PythonContainer",
    # job_blocks
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
    # metadata_context
    "ContextAnnotations",
    "MetadataContext",
    # packagables
    "bazel_binary",
    "bazel_container",
    "binary",
    "container",
    "dockerfile_container",
    "python_container",
    # resources
    "GpuType",
    "InvalidTpuTopologyError",
    "JobRequirements",
    "ResourceDict",
    "ResourceQuantity",
    "ResourceType",
    "ServiceTier",
    "Topology",
    "TpuType",
    # utils
    "run_in_asyncio_loop",
    "ShellSafeArg",
]
