"""Executable specifications shared by all backends (what to package)."""

from __future__ import annotations

import abc
import collections
import os
import re

from xm import job_blocks, utils

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import Iterable, List, Optional, Union


def name_from_path(path: str) -> str:
    """A name usable as a job name, from the last component of `path`."""
    return re.sub(r"\W", "_", os.path.basename(path.rstrip(os.sep)))


class ModuleName(collections.namedtuple("ModuleName", ["module_name"])):
    """A Python module to run (`python -m module_name`)."""

    __slots__ = ()


class CommandList(collections.namedtuple("CommandList", ["commands"])):
    """Shell commands to run, in order."""

    __slots__ = ()


class Dockerfile(utils.ValueObject, job_blocks.ExecutableSpec):
    """A Docker image built from a Dockerfile.

    Attributes:
      path: the build context; relative paths are relative to the launcher.
      dockerfile: the Dockerfile (`docker build -f`); defaults to
        `{path}/Dockerfile`. Relative paths are relative to the launcher.
    """

    def __init__(self, path: str = ".", dockerfile: Optional[str] = None) -> None:
        self.path = utils.resolve_path_relative_to_launcher(path)
        if not dockerfile:
            dockerfile = os.path.join(self.path, "Dockerfile")
        self.dockerfile = utils.resolve_path_relative_to_launcher(dockerfile)

    @property
    def name(self) -> str:
        return name_from_path(self.path)


class PythonContainer(utils.ValueObject, job_blocks.ExecutableSpec):
    """A directory of Python code, run in a container.

    Attributes:
      entrypoint: the module (`ModuleName`) or commands (`CommandList`) to run.
      path: the project directory; relative paths are relative to the launcher.
      base_image: the image to build `FROM`.
      docker_instructions: Docker instructions replacing the default ones;
        they must then copy the project directory themselves.
      use_deep_module: whether the code imports itself by package path
        (`from project import models`) rather than `import models`.
    """

    def __init__(
        self,
        entrypoint: Union[ModuleName, CommandList],
        path: str = ".",
        base_image: Optional[str] = None,
        docker_instructions: Optional[List[str]] = None,
        use_deep_module: bool = False,
    ) -> None:
        self.entrypoint = entrypoint
        self.path = utils.resolve_path_relative_to_launcher(path)
        self.base_image = base_image
        self.docker_instructions = docker_instructions
        self.use_deep_module = use_deep_module

    @property
    def name(self) -> str:
        return name_from_path(self.path)


class BinaryDependency(abc.ABC):  # noqa: B024 - an abstract marker, as upstream
    """Extra data packaged with a `Binary`/`BazelBinary` (backend-defined).

    Implementations must be comparable and hashable, hence immutable.
    """


class Container(utils.ValueObject, job_blocks.ExecutableSpec):
    """A prebuilt container image, local or in a registry.

    Attributes:
      image_path: the image reference or path.
    """

    def __init__(self, image_path: str) -> None:
        self.image_path = image_path

    @property
    def name(self) -> str:
        return name_from_path(self.image_path)


class Binary(utils.ValueObject, job_blocks.ExecutableSpec):
    """A prebuilt executable program.

    Attributes:
      path: the program.
      dependencies: data packaged together with it.
    """

    def __init__(
        self, path: str, dependencies: Optional[Iterable[BinaryDependency]] = None
    ) -> None:
        self.path = path
        self.dependencies = [] if dependencies is None else list(dependencies)

    @property
    def name(self) -> str:
        return name_from_path(self.path)


class BazelContainer(utils.ValueObject, job_blocks.ExecutableSpec):
    """A Bazel target producing a `.tar` image.

    Attributes:
      label: the target to build.
      bazel_args: extra Bazel command-line arguments.
    """

    def __init__(self, label: str, bazel_args: Optional[Iterable[str]] = None) -> None:
        self.label = label
        self.bazel_args = [] if bazel_args is None else list(bazel_args)

    @property
    def name(self) -> str:
        return name_from_path(self.label)


class BazelBinary(utils.ValueObject, job_blocks.ExecutableSpec):
    """A Bazel target producing a self-contained binary.

    Attributes:
      label: the target to build.
      dependencies: data packaged together with it.
      bazel_args: extra Bazel command-line arguments.
    """

    def __init__(
        self,
        label: str,
        dependencies: Optional[Iterable[BinaryDependency]] = None,
        bazel_args: Optional[Iterable[str]] = None,
    ) -> None:
        self.label = label
        self.dependencies = [] if dependencies is None else list(dependencies)
        self.bazel_args = [] if bazel_args is None else list(bazel_args)

    @property
    def name(self) -> str:
        return name_from_path(self.label)
