"""Shorthands that build a `Packageable` from an executor spec and a spec's fields.

experiment.package([xm.python_container(executor.Spec(), xm.ModuleName('train'))])
"""

from __future__ import annotations

import types

from xm import executables, job_blocks

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import Collection, List, Mapping, Optional, Union

_NO_ENV_VARS: Mapping[str, str] = types.MappingProxyType({})


def _packageable(
    spec: job_blocks.ExecutableSpec,
    executor_spec: job_blocks.ExecutorSpec,
    args: Optional[job_blocks.UserArgs],
    env_vars: Mapping[str, str],
) -> job_blocks.Packageable:
    return job_blocks.Packageable(
        executable_spec=spec, executor_spec=executor_spec, args=args, env_vars=env_vars
    )


def binary(
    executor_spec: job_blocks.ExecutorSpec,
    path: str,
    dependencies: Collection[executables.BinaryDependency] = (),
    *,
    args: Optional[job_blocks.UserArgs] = None,
    env_vars: Mapping[str, str] = _NO_ENV_VARS,
) -> job_blocks.Packageable:
    """A prebuilt program (`xm.Binary`), with arguments and environment."""
    spec = executables.Binary(path=path, dependencies=list(dependencies))
    return _packageable(spec, executor_spec, args, env_vars)


def bazel_binary(
    executor_spec: job_blocks.ExecutorSpec,
    label: str,
    dependencies: Collection[executables.BinaryDependency] = (),
    bazel_args: Collection[str] = (),
    *,
    args: Optional[job_blocks.UserArgs] = None,
    env_vars: Mapping[str, str] = _NO_ENV_VARS,
) -> job_blocks.Packageable:
    """A binary built by Bazel (`xm.BazelBinary`)."""
    spec = executables.BazelBinary(
        label=label, dependencies=list(dependencies), bazel_args=list(bazel_args)
    )
    return _packageable(spec, executor_spec, args, env_vars)


def container(
    executor_spec: job_blocks.ExecutorSpec,
    image_path: str,
    *,
    args: Optional[job_blocks.UserArgs] = None,
    env_vars: Mapping[str, str] = _NO_ENV_VARS,
) -> job_blocks.Packageable:
    """A prebuilt container image (`xm.Container`)."""
    return _packageable(executables.Container(image_path=image_path), executor_spec, args, env_vars)


def bazel_container(
    executor_spec: job_blocks.ExecutorSpec,
    label: str,
    bazel_args: Collection[str] = (),
    *,
    args: Optional[job_blocks.UserArgs] = None,
    env_vars: Mapping[str, str] = _NO_ENV_VARS,
) -> job_blocks.Packageable:
    """A container image built by Bazel (`xm.BazelContainer`)."""
    spec = executables.BazelContainer(label=label, bazel_args=list(bazel_args))
    return _packageable(spec, executor_spec, args, env_vars)


def python_container(
    executor_spec: job_blocks.ExecutorSpec,
    entrypoint: Union[executables.ModuleName, executables.CommandList],
    path: str = ".",
    base_image: Optional[str] = None,
    docker_instructions: Optional[List[str]] = None,
    use_deep_module: bool = False,
    *,
    args: Optional[job_blocks.UserArgs] = None,
    env_vars: Mapping[str, str] = _NO_ENV_VARS,
) -> job_blocks.Packageable:
    """A directory of Python code run in a container (`xm.PythonContainer`)."""
    spec = executables.PythonContainer(
        entrypoint=entrypoint,
        path=path,
        base_image=base_image,
        docker_instructions=docker_instructions,
        use_deep_module=use_deep_module,
    )
    return _packageable(spec, executor_spec, args, env_vars)


def dockerfile_container(
    executor_spec: job_blocks.ExecutorSpec,
    path: str = ".",
    dockerfile: Optional[str] = None,
    *,
    args: Optional[job_blocks.UserArgs] = None,
    env_vars: Mapping[str, str] = _NO_ENV_VARS,
) -> job_blocks.Packageable:
    """An image built from a Dockerfile (`xm.Dockerfile`)."""
    spec = executables.Dockerfile(path=path, dockerfile=dockerfile)
    return _packageable(spec, executor_spec, args, env_vars)
