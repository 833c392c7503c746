"""A minimal in-memory backend for testing the abstract `xm` launch API.

Imported by the `test_xm_*` modules (pytest puts `tests/` on `sys.path`).
"""

import asyncio
import random
import threading

import xm
from xm import async_packager


class ToyExecutable(xm.Executable):
    pass


class ToyExecutorSpec(xm.ExecutorSpec):
    pass


class ToyExecutor(xm.Executor):
    @classmethod
    def Spec(cls):  # noqa: N802 - the API's name
        return ToyExecutorSpec()


class ToySpec(xm.ExecutableSpec):
    def __init__(self, name):
        self._name = name

    @property
    def name(self):
        return self._name


def make_job(name=None, executable_name="exe", **kwargs):
    return xm.Job(ToyExecutable(executable_name), ToyExecutor(), name=name, **kwargs)


# Every batch the packaging router was called with, across all experiments.
PACKAGED_BATCHES = []


def toy_router(packageables):
    PACKAGED_BATCHES.append(list(packageables))
    return [ToyExecutable(p.executable_spec.name) for p in packageables]


class ToyWorkUnit(xm.WorkUnit):
    """Launches by recording; submits to the 'backend' in predicted-id order."""

    def __init__(self, experiment, create_task, args, role, work_unit_id, identity=""):
        super().__init__(experiment, create_task, args, role, identity)
        self._work_unit_id = work_unit_id
        self.launched = []
        self.args_views = []
        self.stop_calls = []

    async def _launch_job_group(self, job_group, args_view, identity):
        experiment = self.experiment
        # Simulated backend latency, different for every launch.
        await asyncio.sleep(random.uniform(0, experiment.max_launch_delay))
        async with experiment._work_unit_id_predictor.submit_id(self._work_unit_id):
            experiment.submission_order.append(self._work_unit_id)
        self.launched.extend(xm.job_operators.flatten_jobs(job_group))
        self.args_views.append(args_view)

    async def _wait_until_complete(self):
        return None

    def stop(self, *, mark_as_failed=False, mark_as_completed=False, message=None):
        self.stop_calls.append({"mark_as_failed": mark_as_failed, "message": message})

    @property
    def work_unit_id(self):
        return self._work_unit_id

    @property
    def experiment_unit_name(self):
        return f"{self.experiment_id}_{self._work_unit_id}"

    @property
    def launched_jobs(self):
        return [xm.LaunchedJob(name=job.name) for job in self.launched]


class ToyAuxiliaryUnit(xm.ExperimentUnit):
    def __init__(self, experiment, create_task, args, role, identity=""):
        super().__init__(experiment, create_task, args, role, identity)
        self.launched = []

    async def _launch_job_group(self, job_group, args_view, identity):
        self.launched.extend(xm.job_operators.flatten_jobs(job_group))

    @property
    def experiment_unit_name(self):
        return f"{self.experiment_id}_aux"


class ToyExperiment(xm.Experiment):
    _async_packager = async_packager.AsyncPackager(toy_router)

    def __init__(self, max_launch_delay=0.0, experiment_id=7):
        self.max_launch_delay = max_launch_delay
        self._experiment_id = experiment_id
        self._work_units = []
        self.auxiliary_units = []
        self.submission_order = []
        self.create_unit_threads = []

    def _create_experiment_unit(self, args, role, identity=""):
        self.create_unit_threads.append(threading.current_thread())
        if isinstance(role, xm.AuxiliaryUnitRole):
            unit = ToyAuxiliaryUnit(self, self._create_task, args, role, identity)
            self.auxiliary_units.append(unit)
        else:
            work_unit_id = self._work_unit_id_predictor.reserve_id()
            unit = ToyWorkUnit(self, self._create_task, args, role, work_unit_id, identity)
            self._work_units.append(unit)

        async def created():
            # Creation itself finishes later, in the background.
            await asyncio.sleep(random.uniform(0, self.max_launch_delay))
            return unit

        return created()

    @property
    def experiment_id(self):
        return self._experiment_id

    @property
    def work_unit_count(self):
        return len(self._work_units)

    @property
    def work_units(self):
        return self._work_units
