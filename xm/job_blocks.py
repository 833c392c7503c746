"""The building blocks of a launch: arguments, executables, executors, jobs."""

from __future__ import annotations

import abc
import functools
import re
from collections.abc import Mapping, Sequence

from xm import utils

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar, Union

    UserArgs = Union[Mapping, Sequence, "SequentialArgs"]
    JobGeneratorType = Callable[..., Optional[Awaitable]]
    JobType = Union["Job", "JobGroup", JobGeneratorType, "JobConfig"]
    JobTypeVar = TypeVar("JobTypeVar", "Job", "JobGroup", JobGeneratorType, "JobConfig")

_TYPE_ALIASES = ("UserArgs", "JobGeneratorType", "JobType", "JobTypeVar")


def __getattr__(name: str) -> Any:
    """Creates the typing aliases on first use, so `typing` loads only then."""
    if name not in _TYPE_ALIASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from typing import Awaitable, Callable, Optional, TypeVar, Union

    generator_type = Callable[..., Optional[Awaitable]]
    aliases = {
        # Arguments as users give them.
        "UserArgs": Union[Mapping, Sequence, SequentialArgs],
        # Job generators are async functions `async def gen(work_unit, **kwargs)`.
        "JobGeneratorType": generator_type,
        "JobType": Union[Job, JobGroup, generator_type, JobConfig],
        "JobTypeVar": TypeVar("JobTypeVar", Job, JobGroup, generator_type, JobConfig),
    }
    globals().update(aliases)
    return aliases[name]


def __dir__() -> List[str]:
    return sorted({*globals(), *_TYPE_ALIASES})


@functools.cache
def print_none_warning(key: str) -> None:
    """Warns, once per flag, that a `None` value drops the flag."""
    import logging

    logging.getLogger(__name__).warning(
        "Setting `%s=None` will exclude the flag. To pass the actual value, "
        'pass the string literal `%s="None"` instead',
        key,
        key,
    )


def _is_nested_structure(structure: Union[List[Any], Tuple[Any, ...]]) -> bool:
    """Whether a list or tuple contains a list or tuple."""
    return any(type(element) in (list, tuple) for element in structure)


class SequentialArgs:
    """Positional and keyword command-line arguments, in order.

    Built from a mapping (`{'batch_size': 16}` renders `--batch_size=16`), a
    sequence (`['--foo', 'bar']`, rendered as is) or a mix via `merge_args`.
    Merging appends positional arguments and overrides keyword arguments in
    place, so defaults can be given first and overridden later:

        xm.merge_args({'foo': '1', 'bar': '42'}, {'foo': '2'})  # --foo=2 --bar=42

    Only appending and overriding are supported, not removal or insertion.
    """

    def __init__(self) -> None:
        """Creates empty arguments; prefer `merge_args` or `from_collection`."""
        # Items are (is_keyword, value) for positionals and (is_keyword, name)
        # for keywords, whose values live in `_kwvalues`.
        self._items: List[Tuple[bool, Any]] = []
        self._kwvalues: Dict[str, Any] = {}

    def _ingest_regular_item(self, value: Any) -> None:
        self._items.append((False, value))

    def _ingest_keyword_item(self, name: str, value: Any) -> None:
        # A repeated keyword keeps the position it was first given at.
        if name not in self._kwvalues:
            self._items.append((True, name))
        self._kwvalues[name] = value

    def _merge_from(self, args: SequentialArgs) -> None:
        """Appends (or, for known keywords, overrides with) `args`' items."""
        for is_keyword, payload in args._items:
            if is_keyword:
                self._ingest_keyword_item(payload, args._kwvalues[payload])
            else:
                self._ingest_regular_item(payload)

    @staticmethod
    def from_collection(collection: Optional[UserArgs]) -> SequentialArgs:
        """Builds arguments from `None`, a mapping, a sequence or `SequentialArgs`.

        Raises:
          ValueError: `collection` is a string (a common mistake: it would
            otherwise become one argument per character).
          TypeError: `collection` is some other kind of object.
        """
        result = SequentialArgs()
        if collection is None:
            return result
        if isinstance(collection, str):
            raise ValueError(
                f"Tried to construct xm.SequentialArgs from a string: {collection!r}. "
                f"Wrap it in a list: [{collection!r}] to make it a single argument."
            )
        if isinstance(collection, SequentialArgs):
            result._merge_from(collection)
        elif isinstance(collection, Mapping):
            for key, value in collection.items():
                result._ingest_keyword_item(str(key), value)
        elif isinstance(collection, Sequence):
            for value in collection:
                result._ingest_regular_item(value)
        else:
            raise TypeError(
                "xm.SequentialArgs can be built from a mapping, a sequence, "
                f"xm.SequentialArgs or None; got {type(collection).__name__}: {collection!r}"
            )
        return result

    def rewrite_args(self, rewrite: Callable[[str], str]) -> SequentialArgs:
        """Returns a copy with `rewrite` applied to every string value."""
        result = SequentialArgs()
        for is_keyword, payload in self._items:
            value = self._kwvalues[payload] if is_keyword else payload
            if isinstance(value, str):
                value = rewrite(value)
            if is_keyword:
                result._ingest_keyword_item(payload, value)
            else:
                result._ingest_regular_item(value)
        return result

    def _keyword_to_list(
        self,
        name: str,
        escaper: Callable[[Any], str],
        kwargs_joiner: Callable[[str, str], str],
    ) -> List[str]:
        value = self._kwvalues[name]
        if value is None:
            # Dropping the flag lets the program use its default; the string
            # 'None' passes a literal None.
            print_none_warning(name)
            return []
        if isinstance(value, bool):
            return [escaper(f"--{'' if value else 'no'}{name}")]
        if type(value) in (list, tuple) and not _is_nested_structure(value):
            # Repeat the flag per element, as absl expects for multi flags.
            # Nested sequences are rendered whole; the program parses them.
            return [kwargs_joiner(escaper(f"--{name}"), escaper(v)) for v in value]
        return [kwargs_joiner(escaper(f"--{name}"), escaper(value))]

    def to_list(
        self,
        escaper: Callable[[Any], str] = utils.ARG_ESCAPER,
        kwargs_joiner: Callable[[str, str], str] = utils.trivial_kwargs_joiner,
    ) -> List[str]:
        """Renders the arguments as a command-line list (shell-quoted by default)."""
        flags: List[str] = []
        for is_keyword, payload in self._items:
            if is_keyword:
                flags.extend(self._keyword_to_list(payload, escaper, kwargs_joiner))
            else:
                flags.append(escaper(payload))
        return flags

    def to_dict(self, kwargs_only: bool = False) -> Dict[str, Any]:
        """Returns the arguments as a dict.

        Positional arguments map `str(value)` to `True` unless `kwargs_only`,
        in which case only keyword arguments are returned.
        """
        if kwargs_only:
            return dict(self._kwvalues)
        result: Dict[str, Any] = {}
        for is_keyword, payload in self._items:
            if is_keyword:
                result[payload] = self._kwvalues[payload]
            else:
                result[str(payload)] = True
        return result

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SequentialArgs)
            and self._items == other._items
            and self._kwvalues == other._kwvalues
        )

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"[{', '.join(self.to_list(repr))}]"


def merge_args(*operands: Union[SequentialArgs, UserArgs]) -> SequentialArgs:
    """Merges argument collections left to right into a new `SequentialArgs`."""
    result = SequentialArgs()
    for operand in operands:
        if not isinstance(operand, SequentialArgs):
            operand = SequentialArgs.from_collection(operand)
        result._merge_from(operand)
    return result


class ExecutableSpec(abc.ABC):
    """What to run, before packaging (see `xm.binary`, `xm.python_container`, ...).

    `Experiment.package()` turns a spec into an `Executable`. Specs are meant
    to be backend-agnostic.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        raise NotImplementedError


class Executable(utils.ValueObject, abc.ABC):  # noqa: B024 - an abstract marker, as upstream
    """A packaged executable spec, ready to run on a particular backend.

    Backends subclass it with their own `__init__`, which calls
    `super().__init__(name)`; equality and repr cover the public attributes
    set, so a subclass's fields count too.

    Attributes:
      name: used as the default name of jobs running it.
    """

    def __init__(self, name: str) -> None:
        self.name = name


class ExecutorSpec(abc.ABC):  # noqa: B024 - an abstract marker, as upstream
    """Which kind of runtime environment to package for."""


class Executor(abc.ABC):
    """Where and how a job runs (a scheduler, the local machine, ...)."""

    @classmethod
    @abc.abstractmethod
    def Spec(cls) -> ExecutorSpec:  # upstream's (capitalised) name
        raise NotImplementedError


_ENV_VAR_NAME = re.compile("[a-zA-Z_][a-zA-Z0-9_]*")


def _validate_env_vars(env_vars: Mapping[str, str]) -> None:
    for key in env_vars:
        if not isinstance(key, str) or not _ENV_VAR_NAME.fullmatch(key):
            raise ValueError(
                f"Environment variables names must conform to [a-zA-Z_][a-zA-Z0-9_]*. Got {key!r}."
            )


def _convert_env_vars(env_vars: Optional[Mapping[str, str]]) -> Dict[str, str]:
    result = dict(env_vars) if env_vars is not None else {}
    _validate_env_vars(result)
    return result


class Packageable(utils.ValueObject):
    """What to build (`executable_spec`) for where (`executor_spec`), with its
    static arguments and environment.
    """

    def __init__(
        self,
        executable_spec: ExecutableSpec,
        executor_spec: ExecutorSpec,
        args: Optional[UserArgs] = None,
        env_vars: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.executable_spec = executable_spec
        self.executor_spec = executor_spec
        self.args = SequentialArgs.from_collection(args)
        self.env_vars = _convert_env_vars(env_vars)


class Constraint(abc.ABC):  # noqa: B024 - an abstract marker, as upstream
    """A requirement on where the jobs of a group run (same machine, ...)."""


class Job(utils.ValueObject):
    """A unit of computation: an executable run by an executor.

    Attributes:
      executable: what to run, one of `Experiment.package()`'s results.
      executor: where to run it.
      name: unique within the work unit; defaults to the executable's name.
      args: command-line arguments: a dict (`{'batch_size': 16}` becomes
        `--batch_size=16`), a list or `xm.SequentialArgs`.
      env_vars: environment variables to set.
    """

    def __init__(
        self,
        executable: Executable,
        executor: Executor,
        name: Optional[str] = None,
        args: Optional[UserArgs] = None,
        env_vars: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.executable = executable
        self.executor = executor
        self.name = name
        self.args = SequentialArgs.from_collection(args)
        self.env_vars = _convert_env_vars(env_vars)


class JobGroup:
    """Jobs scheduled together (gang scheduling), given by name:

        JobGroup(learner=Job(...), actor=Job(...), constraints=[...])

    Groups may nest. Schedulers may not always be able to honour the
    grouping.

    Attributes:
      jobs: the jobs (or nested groups) by name.
      constraints: extra scheduling constraints.
    """

    jobs: Dict[str, JobType]
    constraints: List[Constraint]

    def __init__(
        self,
        *,
        constraints: Optional[Sequence[Constraint]] = None,
        **jobs: JobType,
    ) -> None:
        self.jobs = jobs
        self.constraints = list(constraints) if constraints else []

    def __repr__(self) -> str:
        items = [f"{name}={job!r}" for name, job in self.jobs.items()]
        if self.constraints:
            items.append(f"constraints={self.constraints!r}")
        return f"JobGroup({', '.join(items)})"


class JobConfig(abc.ABC):  # noqa: B024 - an abstract marker, as upstream
    """A job given in a backend's own configuration language."""


def get_args_for_all_jobs(job: JobType, args: Dict[str, Any]) -> Dict[str, Any]:
    """Builds `add()` args that pass the same `args` to every job of a group.

    Returns `{'args': args}` for a single job and the same structure nested
    by job name for a (possibly nested) `JobGroup`.
    """
    if not isinstance(job, JobGroup):
        return {"args": dict(args)}
    return {name: get_args_for_all_jobs(member, args) for name, member in job.jobs.items()}
