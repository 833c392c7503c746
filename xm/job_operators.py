"""Operations on job structures (jobs, groups, generators) used by backends."""

from __future__ import annotations

import copy

from xm import job_blocks, utils

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import Any, Callable, List, Sequence, Tuple


def _is_generator(job_type: Any) -> bool:
    """Job generators are the callables among job types."""
    return not isinstance(job_type, (job_blocks.Job, job_blocks.JobGroup)) and callable(job_type)


def shallow_copy_job_type(job_type: job_blocks.JobTypeVar) -> job_blocks.JobTypeVar:
    """Copies the job structure (jobs and groups), sharing everything else.

    Lets `add()` apply per-unit args and names without touching the caller's
    objects. Generators are returned as they are.
    """
    if isinstance(job_type, job_blocks.Job):
        return copy.copy(job_type)
    if isinstance(job_type, job_blocks.JobGroup):
        group = copy.copy(job_type)
        group.jobs = {name: shallow_copy_job_type(job) for name, job in job_type.jobs.items()}
        return group
    if _is_generator(job_type):
        return job_type
    if isinstance(job_type, job_blocks.JobConfig):
        return copy.copy(job_type)
    raise TypeError(f"{job_type!r} is not an xm.Job, xm.JobGroup, job generator or xm.JobConfig")


def populate_job_names(job_type: job_blocks.JobTypeVar) -> None:
    """Names unnamed jobs in place.

    A lone job takes its executable's name; a job in a group takes its path
    of keys joined by `_` (`JobGroup(a=JobGroup(b=job))` names it `a_b`).
    """
    _populate_job_names([], job_type)


def _populate_job_names(prefix: Sequence[str], target: Any) -> None:
    if isinstance(target, job_blocks.Job):
        if target.name is None:
            target.name = "_".join(prefix) if prefix else target.executable.name
    elif isinstance(target, job_blocks.JobGroup):
        for key, job in target.jobs.items():
            _populate_job_names([*prefix, key], job)


def collect_jobs_by_filter(
    job_group: job_blocks.JobGroup,
    predicate: Callable[[job_blocks.Job], bool],
) -> List[job_blocks.Job]:
    """Flattens a (nested) group, keeping the jobs `predicate` accepts."""
    if isinstance(job_group, job_blocks.JobGroup):
        collected: List[job_blocks.Job] = []
        for job in job_group.jobs.values():
            collected.extend(collect_jobs_by_filter(job, predicate))
        return collected
    if isinstance(job_group, job_blocks.Job):
        return [job_group] if predicate(job_group) else []
    raise TypeError(f"Expected xm.Job or xm.JobGroup, got {job_group!r}")


class ConstraintClique(utils.ValueObject):
    """A constraint and the jobs it applies to."""

    def __init__(self, constraint: job_blocks.Constraint, jobs: List[job_blocks.Job]) -> None:
        self.constraint = constraint
        self.jobs = jobs


def aggregate_constraint_cliques(job_group: job_blocks.JobGroup) -> List[ConstraintClique]:
    """Lists every constraint in a (nested) group with all the jobs under it.

    Outer constraints come before inner ones.
    """
    cliques, _ = _cliques_and_jobs(job_group)
    return cliques


def _cliques_and_jobs(target: Any) -> Tuple[List[ConstraintClique], List[job_blocks.Job]]:
    if isinstance(target, job_blocks.Job):
        return [], [target]
    if not isinstance(target, job_blocks.JobGroup):
        raise TypeError(f"Expected xm.Job or xm.JobGroup, got {target!r}")
    cliques: List[ConstraintClique] = []
    jobs: List[job_blocks.Job] = []
    for job in target.jobs.values():
        sub_cliques, sub_jobs = _cliques_and_jobs(job)
        cliques += sub_cliques
        jobs += sub_jobs
    own = [ConstraintClique(constraint, jobs) for constraint in target.constraints]
    return own + cliques, jobs


def flatten_jobs(job_group: job_blocks.JobGroup) -> List[job_blocks.Job]:
    """All jobs of a (nested) group, in order."""
    return collect_jobs_by_filter(job_group, lambda _: True)
