"""One definition per scheduler: what is Slurm's, Grid Engine's or PBS's lives in its block.

These tests read lxm3.py itself, so that a later change that puts scheduler
knowledge elsewhere (an ``if scheduler == "slurm"``, a stray ``qsub``) fails
here rather than being found when the next scheduler is added.
"""

import ast
import inspect
import os

import pytest

import lxm3

from conftest import ROOT

SOURCE = open(os.path.join(ROOT, "lxm3.py"), encoding="utf-8").read()
TREE = ast.parse(SOURCE)
SCHEDULER_CLASSES = {type(s).__name__ for s in lxm3.SCHEDULERS.values()}
# Words only a scheduler block may use in code (docstrings and comments may name them).
SCHEDULER_WORDS = {"sbatch", "qsub", "squeue", "qstat", "scancel", "qdel", "sacct", "qacct", "scontrol",
                   "qconf", "#SBATCH", "#$", "SLURM_ARRAY_TASK_ID", "SGE_TASK_ID", "slurm", "sge",
                   "qselect", "qrerun", "#PBS", "PBS_ARRAY_INDEX", "PBS_JOBID", "pbs"}
SCHEDULER_NAMES = {"slurm", "sge", "pbs"}


def block_lines():
    """Line ranges of the Scheduler subclasses and of the module-level tables beside them."""
    start = SOURCE.index("# Schedulers: everything")
    end = SOURCE.index("# Submission: one scheduler call")
    return SOURCE[:start].count("\n") + 1, SOURCE[:end].count("\n") + 1


def docstring_nodes():
    nodes = set()
    for node in ast.walk(TREE):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def allowed_elsewhere():
    """Constants that may name a scheduler outside its block: an executor's
    ``scheduler = "slurm"`` (how it names its block) and the config schema's
    ``[clusters.slurm]`` / ``[clusters.sge]`` tables of site names."""
    allowed = set()
    for node in ast.walk(TREE):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("scheduler", "CLUSTER_SCHEMA")
                                                for t in node.targets):
            allowed |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return allowed


def test_scheduler_words_appear_only_in_the_scheduler_blocks():
    first, last = block_lines()
    skip = docstring_nodes() | allowed_elsewhere()
    outside = []
    for node in ast.walk(TREE):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        words = set(node.value.replace("(", " ").replace(")", " ").replace('"', " ").split())
        hits = words & SCHEDULER_WORDS
        if hits and not first <= node.lineno <= last:
            outside.append(f"line {node.lineno}: {sorted(hits)} in {node.value[:60]!r}")
    assert outside == []


def test_no_code_branches_on_a_scheduler_or_executor_class():
    first, last = block_lines()
    offenders = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if names & {"Slurm", "GridEngine", "PBS", "SlurmSpec", "GridEngineSpec", "PBSSpec"}:
                offenders.append(f"line {node.lineno}: isinstance(..., {sorted(names)})")
        if isinstance(node, ast.Compare) and not first <= node.lineno <= last:
            constants = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
            if constants & SCHEDULER_NAMES:
                offenders.append(f"line {node.lineno}: compares with {sorted(constants & SCHEDULER_NAMES)}")
    assert offenders == []


@pytest.mark.parametrize("name", sorted(lxm3.SCHEDULERS))
def test_each_scheduler_fills_in_the_whole_interface(name):
    scheduler = lxm3.SCHEDULERS[name]
    for attribute in ("name", "title", "submit_command", "cancel_command", "directive_prefix",
                      "output_option", "job_id_end", "task_id_line"):
        assert getattr(scheduler, attribute), f"{name}: {attribute} is empty"
    for method, _ in inspect.getmembers(lxm3.Scheduler, inspect.isfunction):
        if "raise NotImplementedError" in inspect.getsource(getattr(lxm3.Scheduler, method)):
            assert getattr(type(scheduler), method) is not getattr(lxm3.Scheduler, method), \
                f"{type(scheduler).__name__} does not define {method}"
    assert scheduler.name == name and type(scheduler).__name__ in SCHEDULER_CLASSES


@pytest.mark.parametrize("executor, values", [
    (lxm3.Slurm(), {"%x": "exp_1_2", "%A": "77", "%a": "3"}),
    (lxm3.GridEngine(), {"$JOB_NAME": "exp_1_2", "$JOB_ID": "77", "$TASK_ID": "4"}),  # 1-based
])
def test_the_log_name_read_back_is_the_one_the_scheduler_writes(executor, values):
    """The output pattern given to sbatch/qsub, expanded as the scheduler does for
    array index 3, is the file task_log_name names for index 3."""
    scheduler = lxm3.scheduler_of(executor)
    written = scheduler.log_path_pattern("/logs")
    for placeholder, value in values.items():
        written = written.replace(placeholder, value)
    assert written == "/logs/" + scheduler.task_log_name("exp_1_2", "77", 3)
    assert scheduler.task_job("77", 3) in {"77_3", "77.4"}


def test_pbs_log_name_read_back_is_the_one_pbs_writes():
    """-o <dir>/ (a directory): PBS names each task's file <its job id>.OU."""
    pbs = lxm3.SCHEDULERS["pbs"]
    assert pbs.log_path_pattern("/logs") == "/logs/"
    assert pbs.log_path_pattern("/logs") + "77[3].srv.OU" == "/logs/" + pbs.task_log_name("exp_1_2", "77[].srv", 3)
    assert pbs.task_job("77[].srv", 3) == "77[3].srv"


@pytest.mark.parametrize("name, variable, value", [("slurm", "SLURM_ARRAY_TASK_ID", 3),
                                                   ("sge", "SGE_TASK_ID", 4)])
def test_the_task_id_line_counts_from_the_arrays_first_task(name, variable, value):
    """Index 3 of an array that starts at task 22 is task 25, whatever the index base."""
    import subprocess

    line = lxm3.SCHEDULERS[name].task_id_line
    out = subprocess.run(["bash", "-c", f'{line}\necho "$LXM_TASK_ID"', "job.sh", "22"],
                         env={variable: str(value), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "25"


def test_pbs_task_id_line_counts_from_the_first_task_it_is_given_in_v():
    """qsub passes a job script no arguments: the first task comes as LXM_FIRST_TASK."""
    import subprocess

    line = lxm3.SCHEDULERS["pbs"].task_id_line
    out = subprocess.run(["bash", "-c", f'{line}\necho "$LXM_TASK_ID"'],
                         env={"PBS_ARRAY_INDEX": "3", "LXM_FIRST_TASK": "22", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "25"
