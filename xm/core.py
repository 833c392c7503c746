"""The abstract launch API: experiments, experiment units and work units.

Backends subclass `Experiment` and `WorkUnit`; users then write

    with backend.create_experiment(...) as experiment:
        experiment.add(xm.Job(...))

or, inside a coroutine, `async with`. Launches run as tasks on an asyncio
event loop (a background thread for `with`, the running loop for
`async with`); leaving the context waits for all of them.

`asyncio` and `inspect` are imported inside functions: they are slow to
import and only needed once an experiment is entered.
"""

from __future__ import annotations

import abc
import contextvars
import enum
import queue
import threading
from collections.abc import Coroutine

from xm import async_packager, id_predictor, job_blocks, job_operators, metadata_context, utils

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    import asyncio
    from concurrent import futures
    from typing import (
        Any,
        Awaitable,
        Callable,
        Collection,
        Dict,
        Generator,
        List,
        Mapping,
        Optional,
        Sequence,
    )

# The experiment being entered or launched into, and (inside a launch or a job
# generator) the experiment unit.
_current_experiment: contextvars.ContextVar[Experiment] = contextvars.ContextVar(
    "_xm_current_experiment"
)
_current_experiment_unit: contextvars.ContextVar[ExperimentUnit] = contextvars.ContextVar(
    "_xm_current_experiment_unit"
)


def _check_if_unsupported_args_are_present(
    args: Mapping[str, Any], supported_args: Collection[str], job_type: str
) -> None:
    supported_args = set(supported_args)
    unsupported_args = set(args.keys()) - supported_args
    if unsupported_args:
        raise ValueError(
            f"Arguments {unsupported_args!r} are not supported by {job_type}. Only "
            f"{supported_args!r} are allowed."
        )


def _apply_args_to_job(job: job_blocks.Job, args: Mapping[str, Any]) -> None:
    """Merges `args['args']` into the job's args and `args['env_vars']` into its env."""
    _check_if_unsupported_args_are_present(args, ("args", "env_vars"), "xm.Job")
    if "args" in args:
        job.args = job_blocks.merge_args(job.args, args["args"])
    if "env_vars" in args:
        job.env_vars = {**job.env_vars, **args["env_vars"]}


def _apply_args_to_job_group(job_group: job_blocks.JobGroup, args: Mapping[str, Any]) -> None:
    """Applies `args[name]` to each member `name`, recursively."""
    if args:
        _check_if_unsupported_args_are_present(args, job_group.jobs.keys(), "xm.JobGroup")
        for key, job in job_group.jobs.items():
            _apply_args(job, args.get(key, {}))


def _apply_args(job: job_blocks.JobType, args: Mapping[str, Any]) -> None:
    """Applies `add()`'s args to a (copied) job structure; generators get them
    as keyword arguments instead and configs are left alone."""
    if isinstance(job, job_blocks.Job):
        _apply_args_to_job(job, args)
    elif isinstance(job, job_blocks.JobGroup):
        _apply_args_to_job_group(job, args)
    elif callable(job) or isinstance(job, job_blocks.JobConfig):
        return
    else:
        raise TypeError(f"{job!r} is not an xm.Job, xm.JobGroup, job generator or xm.JobConfig")


class ExperimentUnitStatus(abc.ABC):
    """The status of an experiment unit, as reported by a backend."""

    @property
    @abc.abstractmethod
    def is_active(self) -> bool:
        """Not in a terminal state: running or queued, may produce more results.

        A unit stopped by the user is neither active, completed nor failed.
        """
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def is_completed(self) -> bool:
        """Completed without failures (terminal, unless restarted)."""
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def is_failed(self) -> bool:
        """Failed: a job exited non-zero, could not be scheduled, or its job
        generator raised (terminal, unless restarted)."""
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def message(self) -> str:
        """An optional human-readable explanation of the status."""
        raise NotImplementedError


class ExperimentUnitError(RuntimeError):
    """An experiment unit could not be completed.

    Attributes:
      work_unit: the unit concerned, if known.
    """

    work_unit: Optional[WorkUnit] = None

    def __init__(self, message: Any, *, work_unit: Optional[WorkUnit] = None) -> None:
        super().__init__(message)
        self.work_unit = work_unit


class ExperimentUnitFailedError(ExperimentUnitError):
    """A job of the experiment unit failed."""


class ExperimentUnitNotCompletedError(ExperimentUnitError):
    """The unit is neither running nor completed (e.g. a user stopped it)."""


class NotFoundError(KeyError):
    """An experiment, work unit or similar was not found."""


def _work_unit_arguments(
    job: job_blocks.JobType, args: Optional[Mapping[str, Any]]
) -> Mapping[str, Any]:
    """The arguments to show for a unit in UIs.

    Explicit `add(..., args=...)` are shown as given. Otherwise they are read
    off the jobs: `{'args': ..., 'env_vars': ...}` (empty parts left out) for a
    job, nested by name for a group, `{}` for a generator.
    """
    if args is not None:
        return args
    if isinstance(job, job_blocks.Job):
        deduced = {"args": job.args.to_dict(kwargs_only=True), "env_vars": job.env_vars}
        return {key: value for key, value in deduced.items() if value}
    if isinstance(job, job_blocks.JobGroup):
        result: Dict[str, Any] = {}
        for name, member in job.jobs.items():
            member_args = _work_unit_arguments(member, None)
            if member_args:
                result[name] = member_args
        return result
    return {}


class LaunchedJob(utils.ValueObject):
    """A read-only view of one launched instance of a job.

    A job without a unique identity can be added several times, so one `Job`
    may correspond to several launched jobs, each with the job's name but
    its own address and logs.

    Attributes:
      name: the job's name.
      address: where the job runs, if known.
      logs: where its logs are (path or URL), if known.
    """

    def __init__(
        self, name: str, address: Optional[str] = None, logs: Optional[str] = None
    ) -> None:
        self.name = name
        self.address = address
        self.logs = logs


class Importance(enum.Enum):
    """A scheduling hint: how important a unit is among your own units.

    Not every scheduler uses it. Unlike `ServiceTier`, it does not affect how
    resources are shared with other users.
    """

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class ExperimentUnitRole(utils.ValueObject, abc.ABC):
    """The role of an experiment unit within the experiment (keyword-only).

    Attributes:
      importance: how important it is to schedule this unit among yours.
    """

    def __init__(self, *, importance: Importance = Importance.NORMAL) -> None:
        self.importance = importance


class WorkUnitRole(ExperimentUnitRole):
    """The role of work units: the trials of the experiment (e.g. of a sweep).

    Their statuses make up the experiment's status.
    """


class AuxiliaryUnitRole(ExperimentUnitRole):
    """The role of auxiliary units, which support the trials (e.g. TensorBoard).

    Their statuses do not count towards the experiment's status.

    Attributes:
      termination_delay_secs: how long to keep the unit running after the
        experiment completes.
    """

    def __init__(
        self, *, importance: Importance = Importance.NORMAL, termination_delay_secs: int
    ) -> None:
        super().__init__(importance=importance)
        self.termination_delay_secs = termination_delay_secs


def _is_coroutine_function(job_generator: Any) -> bool:
    """Async functions and objects with an async `__call__` are generators."""
    import inspect

    if inspect.iscoroutinefunction(job_generator):
        return True
    return callable(job_generator) and inspect.iscoroutinefunction(job_generator.__call__)


class ExperimentUnit(abc.ABC):
    """A collection of jobs launched and tracked together.

    Backends implement `_launch_job_group` (and usually `_wait_until_complete`,
    `stop`, `get_status`, `launched_jobs`) and `experiment_unit_name`.
    """

    experiment: Experiment

    def __init__(
        self,
        experiment: Experiment,
        create_task: Callable[[Awaitable[Any]], futures.Future],
        args: Optional[Mapping[str, Any]],
        role: ExperimentUnitRole,
        identity: str = "",
    ) -> None:
        """Initialises the unit.

        Args:
          experiment: the experiment the unit belongs to.
          create_task: schedules a coroutine on the experiment's event loop
            (normally `experiment._create_task`).
          args: the unit's arguments, e.g. the sweep point it runs; shown in UIs.
          role: the unit's role in the experiment.
          identity: an optional unique identifier of the unit.
        """
        self.experiment = experiment
        self._create_task = create_task
        self._args = args
        self._role = role
        self._identity = identity
        self._launch_tasks: List[futures.Future] = []

    @property
    def experiment_id(self) -> int:
        """The id of the experiment the unit belongs to."""
        return self.experiment.experiment_id

    def add(
        self,
        job: job_blocks.JobType,
        args: Optional[Mapping[str, Any]] = None,
        *,
        identity: str = "",
    ) -> Awaitable[None]:
        """Adds a job, a job group, a job generator or a job config to the unit.

        Args:
          job: what to launch. Jobs and groups are copied, so the caller's
            objects are not modified.
          args: per-unit overrides. For a job: `{'args': ..., 'env_vars': ...}`;
            for a group, such dicts nested by job name, e.g.
            `{'agent': {'args': {'learning_rate': 0.1}}}`; for a generator,
            its keyword arguments.
          identity: optional unique job identifier ('add if absent').

        Returns:
          An awaitable fulfilled once the job is launched.

        Raises:
          ValueError: unsupported `args` keys, or a generator that is not async.
        """
        job = job_operators.shallow_copy_job_type(job)
        if args is not None:
            _apply_args(job, args)
        job_operators.populate_job_names(job)
        launch = self._launch_coroutine(job, args, identity)
        launch_task = self._create_task(launch)
        self._launch_tasks.append(launch_task)
        return _wrap_future(launch_task, getattr(self.experiment, "_event_loop", None))

    def _launch_coroutine(
        self, job: job_blocks.JobType, args: Optional[Mapping[str, Any]], identity: str
    ) -> Coroutine:
        """Returns the coroutine launching `job` (dispatch: Job, JobGroup,
        generator, JobConfig)."""
        if isinstance(job, job_blocks.Job):
            group = job_blocks.JobGroup(**{job.name: job})
            return self._in_unit_context(
                self._launch_job_group, group, _work_unit_arguments(job, self._args), identity
            )
        if isinstance(job, job_blocks.JobGroup):
            return self._in_unit_context(
                self._launch_job_group, job, _work_unit_arguments(job, self._args), identity
            )
        if callable(job):
            if not _is_coroutine_function(job):
                raise ValueError(
                    "Job generator must be an async function. Signature needs to be "
                    "`async def job_generator(work_unit: xm.WorkUnit) -> None:`"
                )
            return self._in_unit_context(job, self, **(args or {}))
        if isinstance(job, job_blocks.JobConfig):
            return self._in_unit_context(self._launch_job_config, job, args or {}, identity)
        raise TypeError(f"{job!r} is not an xm.Job, xm.JobGroup, job generator or xm.JobConfig")

    async def _in_unit_context(
        self, launch: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        # Runs in its own task, so the context variables do not leak to the caller.
        _current_experiment.set(self.experiment)
        _current_experiment_unit.set(self)
        return await launch(*args, **kwargs)

    async def _wait_until_complete_impl(self) -> ExperimentUnit:
        import asyncio

        try:
            for task in self._launch_tasks:
                await asyncio.wrap_future(task)
        except Exception as e:
            raise ExperimentUnitError("Experiment unit could not be created.") from e
        await self._wait_until_complete()
        return self

    def wait_until_complete(self) -> Coroutine:
        """Waits until the unit is completed, failed or stopped; returns the unit.

        Raises:
          ExperimentUnitError: the unit could not be launched or completed.
        """
        return self._wait_until_complete_impl()

    @abc.abstractmethod
    async def _launch_job_group(
        self,
        job_group: job_blocks.JobGroup,
        args_view: Mapping[str, Any],
        identity: str,
    ) -> None:
        """Launches `job_group` as part of the unit (backend-specific)."""
        raise NotImplementedError

    async def _launch_job_config(
        self,
        job_config: job_blocks.JobConfig,
        args_view: Mapping[str, Any],
        identity: str,
    ) -> None:
        """Launches a backend-specific job config as part of the unit."""
        raise NotImplementedError

    async def _wait_until_complete(self) -> None:
        """Waits for a fully launched unit to finish (backend-specific)."""
        raise NotImplementedError

    def stop(
        self,
        *,
        mark_as_failed: bool = False,
        mark_as_completed: bool = False,
        message: Optional[str] = None,
    ) -> None:
        """Requests the unit to stop, without waiting for it to do so.

        Follow with `wait_until_complete()` to wait.

        Args:
          mark_as_failed: mark the unit failed rather than stopped.
          mark_as_completed: mark the unit completed rather than stopped.
          message: an optional status message.
        """
        raise NotImplementedError

    def get_status(self) -> ExperimentUnitStatus:
        """Returns the unit's current status."""
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def experiment_unit_name(self) -> str:
        """A name unique in the experiment; by convention `f'{xid}_{wid}'`."""
        raise NotImplementedError

    def get_full_job_name(self, job_name: str) -> str:
        """The full name of a job of this unit (e.g. usable as a host name)."""
        return f"{self.experiment_unit_name}_{job_name}"

    @property
    def context(self) -> metadata_context.MetadataContext:
        """The unit's metadata."""
        return _default_context()

    @property
    def launched_jobs(self) -> List[LaunchedJob]:
        """One `LaunchedJob` per launched job (each leaf job of a group)."""
        raise NotImplementedError


class WorkUnitCompletedAwaitable(Coroutine):
    """Awaitable completion of a work unit that yields the unit.

    Usable with `asyncio.as_completed`:

        for done in asyncio.as_completed([wu.wait_until_complete() for wu in units]):
            try:
                unit = await done
            except xm.ExperimentUnitError as e:
                print(f'{e.work_unit} failed: {e}')
    """

    def __init__(self, work_unit: WorkUnit, awaitable: Callable[[], Any]) -> None:
        self.work_unit = work_unit
        self._awaitable = awaitable
        self._wait_coro: Optional[Coroutine] = None

    async def _wait(self) -> WorkUnit:
        await self._awaitable()
        return self.work_unit

    def _coro(self) -> Coroutine:
        # Created on first use, so an unused awaitable does not warn that a
        # coroutine was never awaited.
        if self._wait_coro is None:
            self._wait_coro = self._wait()
        return self._wait_coro

    def __await__(self) -> Generator[Any, None, WorkUnit]:
        return self._coro().__await__()

    def send(self, value: Any) -> Any:
        return self._coro().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coro().throw(typ)
        return self._coro().throw(typ, val, tb)

    def close(self) -> None:
        if self._wait_coro is not None:
            self._wait_coro.close()


class WorkUnit(ExperimentUnit):
    """An experiment unit with the work-unit role (a trial of the experiment)."""

    @property
    @abc.abstractmethod
    def work_unit_id(self) -> int:
        """The unit's id within the experiment, from 1 in `add()` order."""
        raise NotImplementedError

    def wait_until_complete(self) -> WorkUnitCompletedAwaitable:
        """Waits until the unit is completed, failed or stopped; yields the unit.

        Raises:
          ExperimentUnitError: the unit could not be launched or completed.
        """
        return WorkUnitCompletedAwaitable(self, self._wait_until_complete_impl)


class AuxiliaryUnitJob(abc.ABC):
    """A job bundled with an `AuxiliaryUnitRole`.

    Adding it to an experiment creates an auxiliary unit, which lets a
    library ship self-contained helpers (e.g. TensorBoard). It is itself a
    job generator.
    """

    role: AuxiliaryUnitRole
    _job: job_blocks.JobType

    def __init__(
        self,
        job: job_blocks.JobType,
        *,
        importance: Importance = Importance.NORMAL,
        termination_delay_secs: int,
    ) -> None:
        self.role = AuxiliaryUnitRole(
            importance=importance, termination_delay_secs=termination_delay_secs
        )
        self._job = job

    async def __call__(self, aux_unit: ExperimentUnit, **kwargs: Any) -> None:
        job = self._job
        if callable(job) and not isinstance(job, (job_blocks.Job, job_blocks.JobGroup)):
            await job(aux_unit, **kwargs)
        else:
            aux_unit.add(job, args=kwargs)


# The default role of `Experiment.add` (roles are treated as immutable).
_DEFAULT_ROLE = WorkUnitRole()

_NOT_ENTERED_MESSAGE = (
    "Event loop is not running. Have you entered Experiment context "
    "manager (e.g. with xm.create-experiment() as experiment:)?"
)


class Experiment(abc.ABC):
    """A set of work units (and auxiliary units) launched together.

    Backends provide `create_experiment()` functions returning a subclass.
    Adding units requires entering the experiment:

        with backend.create_experiment(...) as experiment:
            experiment.add(xm.Job(...))

    Entering starts an event loop for the launches (on a background thread;
    `async with` uses the running loop instead); leaving waits for every
    launch and re-raises the first failure.
    """

    # The event loop that runs launches and job generators.
    _event_loop: asyncio.AbstractEventLoop
    # Futures of the background tasks (launches), in creation order.
    _running_tasks: queue.Queue
    # Predicts work unit ids; created on entry.
    _work_unit_id_predictor: id_predictor.Predictor
    # Batches packaging requests; a class attribute set by each backend.
    _async_packager: async_packager.AsyncPackager
    # Context-variable tokens from entering the context.
    _current_experiment_token: contextvars.Token
    _current_async_experiment_token: contextvars.Token

    @property
    @abc.abstractmethod
    def experiment_id(self) -> int:
        """The experiment's unique id."""
        raise NotImplementedError

    # --- Context management ------------------------------------------------

    def __enter__(self) -> Experiment:
        import asyncio

        try:
            asyncio.get_running_loop()
            in_coroutine = True
        except RuntimeError:
            in_coroutine = False
        if in_coroutine:
            raise RuntimeError(
                "When using Experiment from a coroutine please use `async with` syntax"
            )

        self._current_experiment_token = _current_experiment.set(self)
        self._event_loop = asyncio.new_event_loop()
        self._event_loop_thread = threading.Thread(
            target=self._event_loop.run_forever, name="xm-experiment-loop", daemon=True
        )
        self._event_loop_thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._async_enter(), loop=self._event_loop).result()
        except BaseException:
            self._stop_event_loop()
            _current_experiment.reset(self._current_experiment_token)
            raise
        return self

    async def _async_enter(self) -> None:
        await self.__aenter__()

    def _stop_event_loop(self) -> None:
        """Stops the background loop, joins its thread and closes the loop."""
        self._event_loop.call_soon_threadsafe(self._event_loop.stop)
        self._event_loop_thread.join()
        utils.close_event_loop(self._event_loop)

    def _wait_for_tasks(self) -> None:
        """Waits for every queued task (including ones queued meanwhile).

        Cancelled tasks are ignored; the first exception is raised once all
        tasks have finished.
        """
        from concurrent import futures

        exception: Optional[BaseException] = None
        while not self._running_tasks.empty():
            try:
                self._running_tasks.get_nowait().result()
            except futures.CancelledError:
                pass
            except Exception as e:
                if exception is None:
                    exception = e
        if exception is not None:
            raise exception

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            _current_experiment.reset(self._current_experiment_token)
            self._wait_for_tasks()
        finally:
            self._stop_event_loop()

    async def __aenter__(self) -> Experiment:
        import asyncio

        self._current_async_experiment_token = _current_experiment.set(self)
        self._event_loop = asyncio.get_running_loop()
        self._running_tasks = queue.Queue()
        self._work_unit_id_predictor = id_predictor.Predictor(1 + self.work_unit_count)
        return self

    async def _await_for_tasks(self) -> None:
        """Async `_wait_for_tasks`: awaits every queued task, then raises the
        first exception (cancelled tasks are ignored)."""
        import asyncio

        exception: Optional[BaseException] = None
        while not self._running_tasks.empty():
            task = self._running_tasks.get_nowait()
            await asyncio.wait([asyncio.wrap_future(task)])
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None and exception is None:
                exception = error
        if exception is not None:
            raise exception

    async def __aexit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        _current_experiment.reset(self._current_async_experiment_token)
        await self._await_for_tasks()

    # --- Packaging -----------------------------------------------------------

    @classmethod
    def package(
        cls, packageables: Sequence[job_blocks.Packageable] = ()
    ) -> Sequence[job_blocks.Executable]:
        """Packages `packageables` and everything queued by `package_async`.

        Everything is built in one batch (calling `package` repeatedly builds
        sequentially).

        Returns:
          The executables for `packageables`, in the same order.
        """
        return cls._async_packager.package(packageables)

    @classmethod
    def package_async(cls, packageable: job_blocks.Packageable) -> Awaitable[job_blocks.Executable]:
        """Queues `packageable`; the next `package()` call builds it.

            train = experiment.package_async(xm.python_container(...))
            experiment.package()
            job = xm.Job(await train, executor)

        Awaiting the result before `package()` raises
        `PackageHasNotBeenCalledError`.
        """
        return cls._async_packager.add(packageable)

    # --- Adding units ------------------------------------------------------

    def add(
        self,
        job: job_blocks.JobType,
        args: Optional[Mapping[str, Any]] = None,
        *,
        role: ExperimentUnitRole = _DEFAULT_ROLE,
        identity: str = "",
    ) -> Awaitable[ExperimentUnit]:
        """Adds a job, group, generator or config to a new experiment unit.

        Args:
          job: what to launch (see `ExperimentUnit.add`).
          args: per-unit overrides, or a generator's keyword arguments, e.g.
            `{'agent': {'args': {'learning_rate': 0.1}}}` for a group.
          role: the unit's role; an `AuxiliaryUnitJob` brings its own.
          identity: optional unique unit identifier: if a unit with it exists
            it is returned unchanged (generators still run).

        Returns:
          An awaitable (an asyncio future on the experiment's loop) resolving
          to the unit once its jobs are launched. Work-unit ids are assigned
          now, in call order.

        Raises:
          RuntimeError: the experiment has not been entered.
        """
        self._check_event_loop_is_running()
        if isinstance(job, AuxiliaryUnitJob):
            role = job.role
        # Synchronous, so that ids follow the order of `add` calls.
        experiment_unit_future = self._create_experiment_unit(args, role, identity)

        async def launch() -> ExperimentUnit:
            experiment_unit = await experiment_unit_future
            try:
                await experiment_unit.add(job, args, identity=identity)
            except Exception:
                _stop_failed_unit(experiment_unit)
                raise
            return experiment_unit

        return _wrap_future(self._create_task(launch()), self._event_loop)

    @abc.abstractmethod
    def _create_experiment_unit(
        self,
        args: Optional[Mapping[str, Any]],
        role: ExperimentUnitRole,
        identity: str = "",
    ) -> Awaitable[ExperimentUnit]:
        """Starts creating a unit and returns an awaitable for it.

        Called synchronously by `add` so that ids are assigned in call order;
        the creation itself may finish in the background.

        Args:
          args: the unit's arguments (shown as part of a sweep).
          role: whether to create a work unit or an auxiliary unit.
          identity: optional user-given unit identifier.
        """
        raise NotImplementedError

    def _check_event_loop_is_running(self) -> None:
        loop = getattr(self, "_event_loop", None)
        if loop is None or loop.is_closed() or not loop.is_running():
            raise RuntimeError(_NOT_ENTERED_MESSAGE)

    def _create_task(self, task: Awaitable[Any]) -> futures.Future:
        """Schedules coroutine `task` on the experiment's loop (thread-safe) and
        queues it to be waited for on exit."""
        import asyncio
        import inspect

        try:
            self._check_event_loop_is_running()
        except RuntimeError:
            if inspect.iscoroutine(task):
                task.close()  # never to run: avoid "was never awaited" warnings
            raise
        future = asyncio.run_coroutine_threadsafe(task, loop=self._event_loop)
        self._running_tasks.put_nowait(future)
        return future

    @property
    @abc.abstractmethod
    def work_unit_count(self) -> int:
        """How many work units the experiment has."""
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def work_units(self) -> Mapping[int, WorkUnit]:
        """The experiment's work units (by id, or in order)."""
        raise NotImplementedError

    @property
    def context(self) -> metadata_context.MetadataContext:
        """The experiment's metadata."""
        return _default_context()


def _default_context() -> metadata_context.MetadataContext:
    """A context created by the current user, with inert annotations."""
    import getpass

    return metadata_context.MetadataContext(
        creator=getpass.getuser(), annotations=metadata_context.ContextAnnotations()
    )


def _wrap_future(future: futures.Future, loop: Any) -> asyncio.Future:
    """Wraps a task's future for awaiting on `loop`.

    A failure is also raised when the experiment is left, so an unawaited
    result should not log "exception was never retrieved" as well.
    """
    import asyncio

    wrapped = asyncio.wrap_future(future, loop=loop)
    if loop is None or _running_loop() is loop:
        wrapped.add_done_callback(_retrieve_exception)
    else:
        # Futures are not thread-safe: the result may be arriving right now.
        loop.call_soon_threadsafe(wrapped.add_done_callback, _retrieve_exception)
    return wrapped


def _running_loop() -> Any:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _retrieve_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _stop_failed_unit(experiment_unit: ExperimentUnit) -> None:
    """Marks a unit whose launch failed as failed, logging if that fails too."""
    import logging
    import traceback

    try:
        experiment_unit.stop(
            mark_as_failed=True,
            message=f"Work unit creation failed. {traceback.format_exc()}",
        )
    except Exception as stop_exception:
        logging.getLogger(__name__).error("Couldn't stop experiment unit: %s", stop_exception)


def create_experiment(experiment_title: Optional[str] = None) -> Experiment:
    """Returns a new experiment; each backend provides its own."""
    raise NotImplementedError


def get_experiment(experiment_id: int) -> Experiment:
    """Returns the experiment with this id; each backend provides its own.

    Raises:
      NotFoundError: there is no such experiment.
    """
    raise NotImplementedError
