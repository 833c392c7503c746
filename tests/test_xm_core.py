"""The experiment lifecycle of `xm.core`, driven through a toy backend."""

import asyncio
import re
import threading
import time

import pytest
from xm_toy_backend import (
    PACKAGED_BATCHES,
    ToyExecutable,
    ToyExecutorSpec,
    ToyExperiment,
    ToySpec,
    ToyWorkUnit,
    make_job,
)

import xm
from xm import async_packager, core

# --- Entering and leaving ----------------------------------------------------


def test_with_runs_launches_on_a_daemon_loop_thread_and_stops_it():
    experiment = ToyExperiment()
    with experiment as entered:
        assert entered is experiment
        assert core._current_experiment.get() is experiment
        thread = experiment._event_loop_thread
        assert thread.daemon and thread is not threading.current_thread()
        assert experiment._event_loop.is_running()
        experiment.add(make_job())
    assert not thread.is_alive()
    assert experiment._event_loop.is_closed()
    assert core._current_experiment.get(None) is None
    assert experiment.create_unit_threads == [threading.current_thread()]
    assert len(experiment.work_units[0].launched) == 1


def test_async_with_uses_the_running_loop():
    async def main():
        experiment = ToyExperiment()
        async with experiment as entered:
            assert entered is experiment
            assert experiment._event_loop is asyncio.get_running_loop()
            unit = await experiment.add(make_job(name="train"))
            assert unit.work_unit_id == 1
            assert [job.name for job in unit.launched] == ["train"]
        assert core._current_experiment.get(None) is None
        return experiment

    experiment = asyncio.run(main())
    assert experiment.submission_order == [1]


def test_with_inside_a_running_loop_tells_to_use_async_with():
    async def main():
        with ToyExperiment():
            pass

    with pytest.raises(RuntimeError, match="please use `async with` syntax"):
        asyncio.run(main())


def test_with_works_from_a_worker_thread():
    result = {}

    def launch():
        with ToyExperiment() as experiment:
            experiment.add(make_job())
        result["ids"] = [wu.work_unit_id for wu in experiment.work_units]

    thread = threading.Thread(target=launch)
    thread.start()
    thread.join(timeout=30)
    assert result == {"ids": [1]}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_add_outside_the_context_is_an_error(mode):
    experiment = ToyExperiment()
    message = re.escape("Event loop is not running. Have you entered Experiment context manager")
    with pytest.raises(RuntimeError, match=message):
        experiment.add(make_job())
    if mode == "sync":
        with experiment:
            pass
    else:

        async def enter_and_leave():
            async with experiment:
                pass

        asyncio.run(enter_and_leave())
    with pytest.raises(RuntimeError, match=message):
        experiment.add(make_job())
    assert experiment.work_units == []


def test_create_task_outside_the_context_closes_the_coroutine():
    experiment = ToyExperiment()
    ran = []

    async def task():
        ran.append(True)

    coroutine = task()
    with pytest.raises(RuntimeError, match="Have you entered Experiment context manager"):
        experiment._create_task(coroutine)
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning
    assert ran == []


def test_exit_does_not_suppress_the_body_exception_and_still_waits():
    finished = threading.Event()

    async def slow(work_unit):
        await asyncio.sleep(0.2)
        finished.set()

    with pytest.raises(KeyError, match="body"):
        with ToyExperiment() as experiment:
            experiment.add(slow)
            raise KeyError("body")
    assert finished.is_set()


# --- Work unit ids -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ids_follow_add_order_under_concurrent_launches(mode):
    count = 25
    experiment = ToyExperiment(max_launch_delay=0.05)
    if mode == "sync":
        with experiment:
            for i in range(count):
                experiment.add(make_job(args={"i": i}))
                # Ids are reserved synchronously, before add() returns.
                assert experiment.work_units[-1].work_unit_id == i + 1
    else:

        async def main():
            async with experiment:
                futures = [experiment.add(make_job(args={"i": i})) for i in range(count)]
                units = await asyncio.gather(*futures)
            return units

        units = asyncio.run(main())
        assert [unit.work_unit_id for unit in units] == list(range(1, count + 1))

    ids = [unit.work_unit_id for unit in experiment.work_units]
    assert ids == list(range(1, count + 1))
    # Each unit runs the job of the add() call with the same rank ...
    for unit in experiment.work_units:
        [job] = unit.launched
        assert job.args.to_dict() == {"i": unit.work_unit_id - 1}
    # ... and the backend saw the submissions in id order despite random delays.
    assert experiment.submission_order == list(range(1, count + 1))


def test_ids_continue_after_existing_work_units():
    experiment = ToyExperiment()
    with experiment:
        experiment.add(make_job())
        experiment.add(make_job())
    with experiment:
        experiment.add(make_job())
    assert [wu.work_unit_id for wu in experiment.work_units] == [1, 2, 3]


def test_experiment_unit_names():
    async def main():
        async with ToyExperiment(experiment_id=12) as experiment:
            unit = await experiment.add(make_job(name="learner"))
        return unit

    unit = asyncio.run(main())
    assert unit.experiment_id == 12
    assert unit.experiment_unit_name == "12_1"
    assert unit.get_full_job_name("learner") == "12_1_learner"
    assert unit.launched_jobs == [xm.LaunchedJob(name="learner")]


# --- Failures --------------------------------------------------------------------


class FirstError(Exception):
    pass


class SecondError(Exception):
    pass


def test_exit_reraises_the_first_exception_after_all_tasks_finish():
    finished = threading.Event()

    async def fails_late(work_unit):
        await asyncio.sleep(0.2)
        raise FirstError("first added")

    async def fails_early(work_unit):
        raise SecondError("second added")

    async def succeeds_later(work_unit):
        await asyncio.sleep(0.4)
        finished.set()

    experiment = ToyExperiment()
    with pytest.raises(FirstError, match="first added"):
        with experiment:
            experiment.add(fails_late)
            experiment.add(fails_early)
            experiment.add(succeeds_later)
    assert finished.is_set()
    assert not experiment._event_loop_thread.is_alive()
    # Units whose launch failed are stopped as failed.
    failed = [wu for wu in experiment.work_units if wu.stop_calls]
    assert [wu.work_unit_id for wu in failed] == [1, 2]
    assert failed[0].stop_calls[0]["mark_as_failed"] is True
    assert failed[0].stop_calls[0]["message"].startswith("Work unit creation failed.")


def test_async_exit_reraises_the_first_exception_after_all_tasks_finish():
    finished = []

    async def fails_late(work_unit):
        await asyncio.sleep(0.1)
        raise FirstError("first added")

    async def fails_early(work_unit):
        raise SecondError("second added")

    async def succeeds_later(work_unit):
        await asyncio.sleep(0.2)
        finished.append(True)

    async def main():
        async with ToyExperiment() as experiment:
            experiment.add(fails_late)
            experiment.add(fails_early)
            experiment.add(succeeds_later)

    with pytest.raises(FirstError, match="first added"):
        asyncio.run(main())
    assert finished == [True]


def test_unawaited_failed_add_does_not_log_never_retrieved(caplog):
    async def fails(work_unit):
        raise FirstError("boom")

    with pytest.raises(FirstError, match="^boom$"):
        with ToyExperiment() as experiment:
            future = experiment.add(fails)
    del future
    import gc

    gc.collect()
    assert "never retrieved" not in caplog.text


def test_wait_until_complete_wraps_launch_failures():
    async def fails(work_unit):
        raise FirstError("boom")

    async def main():
        async with ToyExperiment() as experiment:
            experiment.add(fails)
            await asyncio.sleep(0.05)
            awaitable = experiment.work_units[0].wait_until_complete()
            assert isinstance(awaitable, xm.WorkUnitCompletedAwaitable)
            assert awaitable.work_unit is experiment.work_units[0]
            with pytest.raises(
                xm.ExperimentUnitError, match="Experiment unit could not be created."
            ) as info:
                await awaitable
            assert isinstance(info.value.__cause__, FirstError)

    with pytest.raises(FirstError, match="^boom$"):
        asyncio.run(main())


def test_wait_until_complete_works_with_as_completed():
    async def main():
        async with ToyExperiment(max_launch_delay=0.02) as experiment:
            for _ in range(3):
                experiment.add(make_job())
            done = []
            waits = [wu.wait_until_complete() for wu in experiment.work_units]
            for next_done in asyncio.as_completed(waits):
                done.append(await next_done)
        return experiment, done

    experiment, done = asyncio.run(main())
    assert sorted(done, key=lambda wu: wu.work_unit_id) == experiment.work_units


def test_experiment_unit_wait_until_complete_returns_the_unit():
    async def main():
        async with ToyExperiment() as experiment:
            unit = await experiment.add(make_job())
            # The base-class coroutine (not the WorkUnit awaitable) also yields the unit.
            assert await xm.ExperimentUnit.wait_until_complete(unit) is unit

    asyncio.run(main())


def test_unused_completion_awaitable_does_not_warn(recwarn):
    async def main():
        async with ToyExperiment() as experiment:
            unit = await experiment.add(make_job())
            unit.wait_until_complete()

    asyncio.run(main())
    import gc

    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# --- Job generators -----------------------------------------------------------


def test_sync_job_generator_is_rejected_with_the_signature():
    def generator(work_unit):
        pass

    message = re.escape(
        "Job generator must be an async function. Signature needs to be "
        "`async def job_generator(work_unit: xm.WorkUnit) -> None:`"
    )
    with pytest.raises(ValueError, match=message):
        with ToyExperiment() as experiment:
            experiment.add(generator)


def test_work_unit_add_rejects_sync_generator_immediately():
    async def main():
        async with ToyExperiment() as experiment:
            unit = await experiment.add(make_job())
            with pytest.raises(ValueError, match="Job generator must be an async function"):
                unit.add(lambda work_unit: None)

    asyncio.run(main())


def test_async_generator_gets_the_unit_and_args_as_kwargs():
    seen = {}

    async def generator(work_unit, learning_rate, seed=0):
        seen.update(unit=work_unit, learning_rate=learning_rate, seed=seed)
        seen["current_unit"] = core._current_experiment_unit.get()
        seen["current_experiment"] = core._current_experiment.get()
        work_unit.add(make_job(name="trainer", args={"lr": learning_rate}))

    with ToyExperiment() as experiment:
        experiment.add(generator, args={"learning_rate": 0.1})
    [unit] = experiment.work_units
    assert seen == {
        "unit": unit,
        "learning_rate": 0.1,
        "seed": 0,
        "current_unit": unit,
        "current_experiment": experiment,
    }
    [job] = unit.launched
    assert job.name == "trainer"
    assert job.args.to_list() == ["--lr=0.1"]
    # The context variables did not leak into the caller.
    assert core._current_experiment_unit.get(None) is None


def test_object_with_async_call_is_a_generator():
    class Generator:
        def __init__(self):
            self.units = []

        async def __call__(self, work_unit):
            self.units.append(work_unit)

    generator = Generator()
    with ToyExperiment() as experiment:
        experiment.add(generator)
    assert generator.units == experiment.work_units


def test_generator_failure_reraised_on_exit():
    async def generator(work_unit):
        raise FirstError("in generator")

    with pytest.raises(FirstError, match="in generator"):
        with ToyExperiment() as experiment:
            experiment.add(generator)


# --- Jobs, groups and args -------------------------------------------------


def test_add_applies_args_to_copies_of_jobs_and_groups():
    foo = make_job(args={"x": 1, "y": 2}, env_vars={"EDITOR": "vi"})
    bar = make_job(args=["--bar=1"])
    group = xm.JobGroup(foo=foo, bar=bar)
    with ToyExperiment() as experiment:
        experiment.add(
            group,
            args={
                "foo": {"args": {"x": 3, "z": 4}, "env_vars": {"TURBO": "ON"}},
                "bar": {"args": ["--spacebar"]},
            },
        )
    launched = experiment.work_units[0].launched
    assert launched[0].args == xm.SequentialArgs.from_collection({"x": 3, "y": 2, "z": 4})
    assert launched[0].env_vars == {"EDITOR": "vi", "TURBO": "ON"}
    assert launched[1].args == xm.SequentialArgs.from_collection(["--bar=1", "--spacebar"])
    assert [job.name for job in launched] == ["foo", "bar"]
    # The caller's objects are untouched.
    assert foo.args.to_dict() == {"x": 1, "y": 2}
    assert foo.env_vars == {"EDITOR": "vi"}
    assert foo.name is None
    assert group.jobs["foo"] is foo


def test_add_same_job_with_different_args():
    job = make_job()
    with ToyExperiment() as experiment:
        for i in range(3):
            experiment.add(job, args={"env_vars": {"FOO": i}})
    assert [wu.launched[0].env_vars for wu in experiment.work_units] == [
        {"FOO": 0},
        {"FOO": 1},
        {"FOO": 2},
    ]


def test_unsupported_job_args_are_rejected():
    with pytest.raises(ValueError, match=r"Arguments \{'abra'\} are not supported by xm.Job"):
        with ToyExperiment() as experiment:
            experiment.add(make_job(), args={"abra": "kadabra"})


def test_unknown_job_group_member_is_rejected():
    group = xm.JobGroup(learner=make_job())
    with pytest.raises(ValueError, match=r"Arguments \{'eval'\} are not supported by xm.JobGroup"):
        core._apply_args(group, {"eval": {"args": {"batch_size": 32}}})


def test_unit_args_view():
    with ToyExperiment() as experiment:
        experiment.add(make_job(args={"a": 1}, env_vars={"E": "v"}))
        experiment.add(make_job(args={"a": 1}), args={"args": {"b": 2}})
        experiment.add(xm.JobGroup(g=make_job(args={"c": 3}), h=make_job()))
    views = [wu.args_views[0] for wu in experiment.work_units]
    assert views == [
        {"args": {"a": 1}, "env_vars": {"E": "v"}},
        {"args": {"b": 2}},
        {"g": {"args": {"c": 3}}},
    ]


def test_job_names_default_to_executable_and_group_path():
    group = xm.JobGroup(outer=xm.JobGroup(inner=make_job()), named=make_job(name="mine"))
    with ToyExperiment() as experiment:
        experiment.add(make_job(executable_name="my_exe"))
        experiment.add(group)
    assert [job.name for job in experiment.work_units[0].launched] == ["my_exe"]
    assert [job.name for job in experiment.work_units[1].launched] == ["outer_inner", "mine"]


def test_job_config_is_passed_to_launch_job_config():
    class Config(xm.JobConfig):
        pass

    class ConfigUnit(ToyWorkUnit):
        async def _launch_job_config(self, job_config, args_view, identity):
            self.launched.append(job_config)

    class ConfigExperiment(ToyExperiment):
        def _create_experiment_unit(self, args, role, identity=""):
            unit = ConfigUnit(self, self._create_task, args, role,
                              self._work_unit_id_predictor.reserve_id(), identity)
            self._work_units.append(unit)

            async def created():
                return unit

            return created()

    config = Config()
    config.learning_rate = 0.1
    with ConfigExperiment() as experiment:
        experiment.add(config)
    [launched] = experiment.work_units[0].launched  # a shallow copy, as for jobs
    assert type(launched) is Config and launched.learning_rate == 0.1
    # A backend without _launch_job_config: the base's NotImplementedError, bare as upstream's.
    with pytest.raises(NotImplementedError, match="^$"):
        with ToyExperiment() as experiment:
            experiment.add(Config())


def test_auxiliary_unit_job_brings_its_role():
    job = make_job(name="tensorboard")
    with ToyExperiment() as experiment:
        experiment.add(xm.AuxiliaryUnitJob(job, termination_delay_secs=600))
    [aux] = experiment.auxiliary_units
    assert experiment.work_units == []
    assert aux._role == xm.AuxiliaryUnitRole(termination_delay_secs=600)
    assert [j.name for j in aux.launched] == ["tensorboard"]


def test_auxiliary_unit_job_with_generator():
    calls = []

    async def generator(aux_unit):
        calls.append(aux_unit)

    with ToyExperiment() as experiment:
        experiment.add(
            xm.AuxiliaryUnitJob(generator, importance=xm.Importance.LOW, termination_delay_secs=5)
        )
    assert calls == experiment.auxiliary_units
    assert calls[0]._role.importance == xm.Importance.LOW


# --- Packaging ---------------------------------------------------------------


def _packageable(name):
    return xm.Packageable(ToySpec(name), ToyExecutorSpec())


def test_package_builds_queued_and_extra_items_in_one_batch():
    PACKAGED_BATCHES.clear()

    async def main():
        first = ToyExperiment.package_async(_packageable("first"))
        second = ToyExperiment.package_async(_packageable("second"))
        [extra] = ToyExperiment.package([_packageable("extra")])
        return extra, await first, await second

    extra, first, second = asyncio.run(main())
    assert [[p.executable_spec.name for p in batch] for batch in PACKAGED_BATCHES] == [
        ["first", "second", "extra"]
    ]
    assert (extra.name, first.name, second.name) == ("extra", "first", "second")
    assert ToyExperiment.package() == []  # nothing queued: no batch
    assert len(PACKAGED_BATCHES) == 1


def test_awaiting_before_package_raises():
    async def main():
        executable = ToyExperiment.package_async(_packageable("x"))
        with pytest.raises(
            async_packager.PackageHasNotBeenCalledError,
            match=re.escape(".package() must be called before awaiting on the packaging result"),
        ):
            await executable
        ToyExperiment.package()
        return await executable

    assert asyncio.run(main()).name == "x"


def test_packaging_failure_reaches_every_queued_item():
    class BuildError(Exception):
        pass

    def failing_router(packageables):
        raise BuildError("no space left")

    packager = async_packager.AsyncPackager(failing_router)

    async def main():
        queued = packager.add(_packageable("a"))
        with pytest.raises(BuildError, match="no space left"):
            packager.package([_packageable("b")])
        with pytest.raises(BuildError, match="no space left"):
            await queued

    asyncio.run(main())


def test_packaging_results_are_picklable():
    import pickle

    packager = async_packager.AsyncPackager(
        lambda packageables: [ToyExecutable(p.executable_spec.name) for p in packageables]
    )
    executable = packager.add(_packageable("pickled"))
    packager.package()
    restored = pickle.loads(pickle.dumps(executable))

    async def main():
        return await restored

    assert asyncio.run(main()) == ToyExecutable("pickled")
    assert pickle.dumps(restored) == pickle.dumps(executable)


def test_package_is_thread_safe():
    PACKAGED_BATCHES.clear()
    awaitables = []

    def queue_some():
        for i in range(50):
            awaitables.append(ToyExperiment.package_async(_packageable(str(i))))

    threads = [threading.Thread(target=queue_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ToyExperiment.package()

    async def main():
        return [await a for a in awaitables]

    assert len(asyncio.run(main())) == 200
    assert sum(len(batch) for batch in PACKAGED_BATCHES) == 200


# --- Roles, statuses and errors --------------------------------------------------


def abstract_class_error(cls, *methods):
    """The TypeError of instantiating ``cls`` with ``methods`` unimplemented, as
    Python 3.9-3.11 and 3.12+ word it."""
    names = ", ".join(f"'?{re.escape(m)}'?" for m in methods)
    return (rf"^Can't instantiate abstract class {cls} with(out an implementation for)? "
            rf"abstract methods? {names}$")


def test_roles_are_keyword_only_value_objects():
    assert xm.WorkUnitRole() == xm.WorkUnitRole(importance=xm.Importance.NORMAL)
    assert xm.WorkUnitRole().importance is xm.Importance.NORMAL
    with pytest.raises(TypeError, match=r"__init__\(\) takes 1 positional argument but 2 were given"):
        xm.WorkUnitRole(xm.Importance.HIGH)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: "
                                        "'termination_delay_secs'"):
        xm.AuxiliaryUnitRole()
    role = xm.AuxiliaryUnitRole(importance=xm.Importance.HIGH, termination_delay_secs=3)
    assert (role.importance, role.termination_delay_secs) == (xm.Importance.HIGH, 3)
    assert isinstance(role, xm.ExperimentUnitRole)
    assert "termination_delay_secs=3" in repr(role)
    assert xm.WorkUnitRole() != xm.AuxiliaryUnitRole(termination_delay_secs=0)


def test_importance_values():
    assert [(i.name, i.value) for i in xm.Importance] == [
        ("HIGH", "high"),
        ("NORMAL", "normal"),
        ("LOW", "low"),
    ]


def test_launched_job_defaults():
    job = xm.LaunchedJob(name="n")
    assert (job.name, job.address, job.logs) == ("n", None, None)
    assert xm.LaunchedJob(name="n", address="a", logs="l") != job


def test_error_classes():
    error = xm.ExperimentUnitFailedError("failed", work_unit="wu")
    assert isinstance(error, xm.ExperimentUnitError)
    assert isinstance(error, RuntimeError)
    assert (str(error), error.work_unit) == ("failed", "wu")
    assert xm.ExperimentUnitNotCompletedError("x").work_unit is None
    assert issubclass(xm.NotFoundError, KeyError)
    with pytest.raises(TypeError, match=r"__init__\(\) takes 2 positional arguments but 3 were given"):
        xm.ExperimentUnitError("m", "positional work unit")


def test_status_is_abstract():
    with pytest.raises(TypeError, match=abstract_class_error(
            "ExperimentUnitStatus", "is_active", "is_completed", "is_failed", "message")):
        xm.ExperimentUnitStatus()

    class Done(xm.ExperimentUnitStatus):
        is_active = False
        is_completed = True
        is_failed = False
        message = ""

    assert Done().is_completed


def test_experiment_and_units_are_abstract():
    class Incomplete(xm.Experiment):
        pass

    with pytest.raises(TypeError, match=abstract_class_error(
            "Incomplete", "_create_experiment_unit", "experiment_id", "work_unit_count",
            "work_units")):
        Incomplete()
    with pytest.raises(TypeError, match=abstract_class_error(
            "WorkUnit", "_launch_job_group", "experiment_unit_name", "work_unit_id")):
        xm.WorkUnit(ToyExperiment(), None, None, xm.WorkUnitRole())


def test_default_context():
    experiment = ToyExperiment()
    context = experiment.context
    assert isinstance(context, xm.MetadataContext)
    assert isinstance(context.creator, str) and context.creator
    assert context.annotations.title == ""
    context.annotations.set_title("ignored")
    assert context.annotations.title == ""


# What the base classes leave to a backend: each raises a bare NotImplementedError,
# as upstream's do. The toy backend implements the others; these are called on
# the base class so that its overrides do not hide them.
BACKEND_HOOKS = {
    "ExperimentUnit.get_status": lambda unit: unit.get_status(),
    "ExperimentUnit.stop": lambda unit: xm.ExperimentUnit.stop(unit, mark_as_failed=True),
    "ExperimentUnit.launched_jobs": lambda unit: xm.ExperimentUnit.launched_jobs.fget(unit),
    "ExperimentUnit._wait_until_complete":
        lambda unit: asyncio.run(xm.ExperimentUnit._wait_until_complete(unit)),
    "ExperimentUnit._launch_job_config":
        lambda unit: asyncio.run(xm.ExperimentUnit._launch_job_config(unit, None, {}, "")),
    "xm.core.create_experiment": lambda unit: core.create_experiment("title"),
    "xm.core.get_experiment": lambda unit: core.get_experiment(1),
}


@pytest.fixture
def toy_unit():
    async def main():
        async with ToyExperiment() as experiment:
            return await experiment.add(make_job())

    return asyncio.run(main())


@pytest.mark.parametrize("hook", sorted(BACKEND_HOOKS))
def test_what_a_backend_provides_is_not_implemented_in_the_base(toy_unit, hook):
    with pytest.raises(NotImplementedError, match="^$"):
        BACKEND_HOOKS[hook](toy_unit)



# --- Id predictor ------------------------------------------------------------------


def test_predictor_reserves_ids_in_order_across_threads():
    from xm import id_predictor

    predictor = id_predictor.Predictor(1)
    reserved = []
    lock = threading.Lock()

    def reserve():
        for _ in range(200):
            value = predictor.reserve_id()
            with lock:
                reserved.append(value)

    threads = [threading.Thread(target=reserve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(reserved) == list(range(1, 801))


def test_predictor_serialises_submissions_and_breaks_on_failure():
    from xm import id_predictor

    async def main():
        predictor = id_predictor.Predictor(5)
        order = []

        async def submit(wid, delay, fail=False):
            await asyncio.sleep(delay)
            async with predictor.submit_id(wid):
                if fail:
                    raise FirstError(wid)
                order.append(wid)

        ids = [predictor.reserve_id() for _ in range(3)]
        assert ids == [5, 6, 7]
        await asyncio.gather(submit(7, 0), submit(6, 0.02), submit(5, 0.04))
        assert order == [5, 6, 7]

        results = await asyncio.gather(
            submit(8, 0.02, fail=True), submit(9, 0), return_exceptions=True
        )
        assert isinstance(results[0], FirstError)
        assert isinstance(results[1], id_predictor.BrokenSequenceError)
        assert str(results[1]) == (
            "Id 9 would never be ready to submit as submission of the previous one has failed"
        )

    asyncio.run(main())


def test_run_in_asyncio_loop():
    @xm.run_in_asyncio_loop
    async def add(a, b=1):
        await asyncio.sleep(0)
        return a + b, asyncio.get_running_loop()

    first, loop1 = add(1, b=2)
    second, loop2 = add(5)
    assert (first, second) == (3, 6)
    assert loop1 is not loop2 and loop1.is_closed()
    assert add.__name__ == "add"


def test_run_in_asyncio_loop_cancels_leftover_tasks():
    cancelled = []

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    @xm.run_in_asyncio_loop
    async def main():
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0)

    start = time.monotonic()
    main()
    assert cancelled == [True]
    assert time.monotonic() - start < 5


def test_close_event_loop_runs_queued_callbacks_and_cancels_tasks():
    from xm import utils

    loop = asyncio.new_event_loop()
    ran = []
    task = loop.create_task(asyncio.sleep(3600))
    loop.run_until_complete(asyncio.sleep(0))  # the task is now waiting
    loop.call_soon(lambda: loop.call_soon(ran.append, True))  # two iterations deep
    utils.close_event_loop(loop)
    assert ran == [True]
    assert task.cancelled()
    assert loop.is_closed()


def test_failing_aenter_leaves_nothing_running():
    class SetupError(Exception):
        pass

    class Broken(ToyExperiment):
        async def __aenter__(self):
            await super().__aenter__()
            raise SetupError("no cluster")

    experiment = Broken()
    with pytest.raises(SetupError, match="no cluster"):
        with experiment:
            pass  # pragma: no cover - not reached
    assert not experiment._event_loop_thread.is_alive()
    assert experiment._event_loop.is_closed()
    assert core._current_experiment.get(None) is None


def test_subclass_can_wait_for_tasks_before_the_base_exit():
    class Flushing(ToyExperiment):
        def __exit__(self, *exc_info):
            self._wait_for_tasks()
            self.flushed = len(self.work_units[0].launched)
            # Tasks can still be created before the base class stops the loop.
            self._create_task(asyncio.sleep(0))
            return super().__exit__(*exc_info)

    with Flushing(max_launch_delay=0.05) as experiment:
        experiment.add(make_job())
    assert experiment.flushed == 1
