"""Dependencies between work units: ``experiment.add(job, dependency=wu.after_ok())``.

On the test bed (Slurm and Grid Engine, over SSH): a real launch whose
launcher chains work units with the awaitable ``experiment.add`` returns (not
awaited, as most launchers use it); tasks write their start and end times,
which tell the order they ran in. Locally: the same kinds in the LocalRunner.
The rendered scheduler options and the add-time refusals are checked without
a cluster (nothing is submitted by them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List

import pytest
from cluster_helpers import ROOT, SCHEDULERS, ClusterWorkspace, check_error, read_reports

import lxm3
from lxm3 import xm

from conftest import write_files
from testbed_env import require_testbed

WAIT = 300  # seconds for a launch's tasks, on a test bed shared with other suites

# cluster_helpers.LAUNCHER, plus "after": [[kind, work unit id], ...] per unit.
LAUNCHER = """\
    import json
    import os

    from lxm3 import xm, xm_cluster

    HERE = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(HERE, "spec.json"), encoding="utf-8") as f:
        SPEC = json.load(f)

    with xm_cluster.create_experiment(SPEC["title"]) as experiment:
        added = {}
        exe = None
        for wid, unit in enumerate(SPEC["units"], 1):
            spec = dict(unit["executor"])
            executor = getattr(xm_cluster, spec.pop("kind"))(**spec)
            if exe is None:
                package = xm_cluster.PythonPackage(
                    path=SPEC["project"], entrypoint=xm_cluster.ModuleName("echoapp.main"))
                [exe] = experiment.package([xm.Packageable(package, executor_spec=executor.Spec())])
            after = [getattr(added[up], "after_" + kind)() for kind, up in unit.get("after", [])]
            job = xm_cluster.ArrayJob(exe, executor, env_vars=unit["env_vars"])
            added[wid] = experiment.add(job, dependency=after or None)

    result = {"experiment_id": experiment.experiment_id, "work_units": {
        str(wid): {"arrays": [[a.job_id, a.first_task, a.count] for a in wu.arrays],
                   "job_ids": list(wu.job_ids), "log_directory": wu.log_directory}
        for wid, wu in experiment.work_units.items()}}
    with open(os.path.join(HERE, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
"""


def workspace(cluster_workspaces, scheduler: str) -> ClusterWorkspace:
    return cluster_workspaces(require_testbed(scheduler), scheduler, "ssh")


def unit(ws: ClusterWorkspace, out: str, tasks: int = 1, after=(), **env: str) -> Dict[str, Any]:
    return {"executor": ws.executor(), "after": [list(a) for a in after],
            "env_vars": [{"ECHO_OUT": out, **env}] * tasks}


def launch(ws: ClusterWorkspace, units: List[Dict[str, Any]], check: bool = True):
    argv, env, directory = ws.launch_command(units)
    with open(os.path.join(directory, "launcher.py"), "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(LAUNCHER))
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=WAIT)
    launched = ws.launched(proc.returncode, proc.stdout, proc.stderr, directory, time.monotonic() - started)
    return launched.check() if check else launched


def lxm3_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lxm3", *args], env={**os.environ, "PYTHONPATH": ROOT},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, **kwargs)


def status_json(experiment_id: int) -> Dict[str, Any]:
    proc = lxm3_cli("status", str(experiment_id), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["work_units"]


def wait_for(what: str, condition, describe=lambda: "", timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{describe()}")
        time.sleep(1)


def depends_on(ws: ClusterWorkspace, job: str, upstream: str, each: bool = False) -> bool:
    """Whether the scheduler holds ``job`` for ``upstream`` (asked while ``job`` is pending)."""
    info = ws.job_info(job)
    if ws.scheduler == "pbs":  # qstat -f: "    depend = afterok:16[].server@server"
        line = next(line.strip() for line in info.splitlines() if line.startswith("    depend = "))
        return line.startswith(f"depend = afterok:{upstream}")
    if ws.scheduler == "slurm":
        line = next(line for line in info.split() if line.startswith("Dependency="))
        return line.startswith(f"Dependency={'aftercorr' if each else 'afterok'}:{upstream}")
    key = "ja_ad_predecessor_list:" if each else "jid_predecessor_list:"
    return any(line.startswith(key) and upstream in line.split() for line in info.splitlines())


def reports_of(out: str, count: int, launch_, timeout: float = WAIT) -> Dict[int, dict]:
    return wait_for(f"{count} report(s) in {out}",
                    lambda: (lambda r: r if len(r) >= count else None)(read_reports(out)),
                    launch_.describe, timeout)


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_chained_work_units_start_when_their_dependency_holds(cluster_workspaces, scheduler):
    ws = workspace(cluster_workspaces, scheduler)
    out = {name: ws.out_dir(name) for name in ("pre", "train", "bad", "bad2", "anyway", "never")}
    units = [
        unit(ws, out["pre"], ECHO_SLEEP="6"),  # 1: preprocess (one task: a CPU stays free)
        unit(ws, out["train"], tasks=2, after=[("ok", 1)]),  # 2: train, once 1 succeeded
        unit(ws, out["bad"], ECHO_EXIT="3"),  # 3: fails
        unit(ws, out["bad2"], ECHO_EXIT="4"),  # 4: fails too
        unit(ws, out["anyway"], after=[("any", 4)]),  # 5: runs all the same
        unit(ws, out["never"], after=[("ok", 3)]),  # 6: can never start
    ]
    launched = launch(ws, units)
    xid = launched.experiment_id
    [pre_job], [train_job] = launched.unit(1)["job_ids"], launched.unit(2)["job_ids"]
    assert depends_on(ws, train_job, pre_job)  # as the scheduler has it (while pre runs)
    pre, train = reports_of(out["pre"], 1, launched), reports_of(out["train"], 2, launched)
    assert min(r["start"] for r in train.values()) >= max(r["end"] for r in pre.values())
    reports_of(out["bad"], 1, launched)
    bad2 = reports_of(out["bad2"], 1, launched)
    anyway = reports_of(out["anyway"], 1, launched)
    assert anyway[0]["start"] >= bad2[0]["end"]

    # The never-satisfied dependency: status says so, and its task never ran.
    units_status = wait_for("status to say unit 6 can never start",
                            lambda: (lambda s: s if "dependency_never_met" in s["6"] else None)(status_json(xid)))
    assert "work unit 3" in units_status["6"]["dependency_never_met"]
    assert units_status["6"]["dependencies"] == [{"kind": "ok", "work_units": [3]}]
    assert [t["state"] for t in units_status["6"]["tasks"]] in (["pending"], ["cancelled"])
    assert read_reports(out["never"]) == {}
    text = lxm3_cli("status", str(xid))
    assert "work unit 6" in text.stdout and "dependency can never be met" in text.stdout, text.stdout

    # Cancelling a work unit others wait for: without a terminal or flag, it says so.
    told = lxm3_cli("cancel", str(xid), "1")
    assert told.returncode == 0, told.stderr
    assert "work unit 2 waits for work unit 1" in told.stdout and "--with-dependents" in told.stdout
    # With the flag, the dependents go too.
    [never_job] = launched.unit(6)["job_ids"]
    if scheduler == "pbs":  # PBS deletes a job whose dependency can no longer be met
        wait_for(f"PBS to delete job {never_job}", lambda: not ws.active_jobs([never_job]))
        assert [t["state"] for t in status_json(xid)["6"]["tasks"]] == ["cancelled"]
        return
    assert ws.active_jobs([never_job]), "the unit that waits for ever should still be queued"
    cancelled = lxm3_cli("cancel", str(xid), "3", "--with-dependents")
    assert cancelled.returncode == 0, cancelled.stderr
    assert never_job in cancelled.stdout
    wait_for(f"job {never_job} to leave the queue", lambda: not ws.active_jobs([never_job]))
    assert read_reports(out["never"]) == {}


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_after_each_pairs_tasks_of_arrays_split_by_the_limit(cluster_workspaces, scheduler):
    ws = workspace(cluster_workspaces, scheduler)
    up_out, down_out = ws.out_dir("up"), ws.out_dir("down")
    if scheduler == "pbs":  # PBS has no task-by-task dependency between arrays: refused, nothing submitted
        refused = launch(ws, [unit(ws, up_out, tasks=12), unit(ws, down_out, tasks=12, after=[("each", 1)])],
                         check=False)
        check_error(refused, "PBS cannot make each task wait", "after_ok()")
        ws.assert_nothing_submitted(refused)
        return
    launched = launch(ws, [unit(ws, up_out, tasks=12, ECHO_SLEEP="2"),
                           unit(ws, down_out, tasks=12, after=[("each", 1)])])
    up_arrays, down_arrays = launched.arrays(1), launched.arrays(2)
    assert len(up_arrays) == 2  # 12 tasks: over both schedulers' limits (11, 10)
    assert [(a[1], a[2]) for a in down_arrays] == [(a[1], a[2]) for a in up_arrays]
    for (up_job, _, _), (down_job, _, _) in zip(up_arrays, down_arrays):  # array i waits for array i
        assert depends_on(ws, down_job, up_job, each=True)
    up, down = reports_of(up_out, 12, launched), reports_of(down_out, 12, launched)
    for task in range(12):
        assert down[task]["start"] >= up[task]["end"], task
        assert down[task]["env"]["LXM_TASK_ID"] == str(task)


# --- locally -------------------------------------------------------------------

STAMP_MAIN = """\
    import json, os, sys, time
    start = time.time()
    time.sleep(float(os.environ.get("SLEEP") or 0))
    out, task = os.environ["OUT"], os.environ["LXM_TASK_ID"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "task-%s.json" % task), "w") as f:
        json.dump({"start": start, "end": time.time()}, f)
    fail = os.environ.get("FAIL_TASKS", "").split(",")
    sys.exit(3 if task in fail else 0)
"""


@pytest.fixture
def stamp_project(tmp_path):
    return write_files(tmp_path / "stamp", {
        "pyproject.toml": '[project]\nname = "stamp"\nversion = "0.1"\n'
                          '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n',
        "stamp/__init__.py": "",
        "stamp/main.py": textwrap.dedent(STAMP_MAIN),
    })


def local_sweep(project, add):
    experiment = lxm3.create_experiment("deps", config=lxm3.Config())
    with experiment:
        executor = lxm3.Local()
        [exe] = experiment.package([xm.Packageable(
            lxm3.PythonPackage(entrypoint=xm.ModuleName("stamp.main"), path=str(project)),
            executor_spec=executor.Spec())])
        add(experiment, lambda out, n=1, **env: lxm3.ArrayJob(exe, executor, env_vars=[{"OUT": str(out), **env}] * n))
    return experiment


def test_local_dependencies_start_tasks_when_the_condition_holds(stamp_project, tmp_path):
    out = {name: tmp_path / name for name in ("pre", "train", "bad", "anyway", "never", "each")}

    def add(experiment, job):
        pre = experiment.add(job(out["pre"], 3, SLEEP="1"))
        experiment.add(job(out["train"], 2), dependency=pre.after_ok())
        bad = experiment.add(job(out["bad"], 3, FAIL_TASKS="1"))
        experiment.add(job(out["anyway"]), dependency=bad.after_any())
        experiment.add(job(out["never"]), dependency=[pre.after_ok(), bad.after_ok()])
        experiment.add(job(out["each"], 3), dependency=bad.after_each())

    with pytest.raises(lxm3.TaskFailedError, match=r"work unit 3 task 1: exit code 3(.|\n)*"
                                                   r"work unit 5 task 0: never ran"):
        local_sweep(stamp_project, add)
    pre, train = read_reports(out["pre"]), read_reports(out["train"])
    assert sorted(train) == [0, 1]
    assert min(r["start"] for r in train.values()) >= max(r["end"] for r in pre.values())
    bad, anyway = read_reports(out["bad"]), read_reports(out["anyway"])
    assert anyway[0]["start"] >= max(r["end"] for r in bad.values())
    assert not out["never"].exists()
    each = read_reports(out["each"])
    assert sorted(each) == [0, 2]  # task 1 of the upstream failed: its partner never ran
    for task in each:
        assert each[task]["start"] >= bad[task]["end"]

    [record] = [r for r in lxm3.list_records(5) if r.title == "deps"][:1]
    never, paired = record.unit(5), record.unit(6)
    assert never.dependencies == [{"kind": "ok", "work_units": [1]}, {"kind": "ok", "work_units": [3]}]
    assert never.never_run == [0] and paired.never_run == [1]
    status = lxm3.query_status(record)
    assert [t.state for t in status[5].tasks] == ["cancelled"]
    notes = lxm3.dependency_notes(record, status)
    assert "work unit 3" in notes[5] and set(notes) == {5, 6}


def test_awaited_work_unit_chains_the_same_way(stamp_project, tmp_path):
    import asyncio

    async def main():
        experiment = lxm3.create_experiment("deps-async", config=lxm3.Config())
        async with experiment:
            executor = lxm3.Local()
            [exe] = experiment.package([xm.Packageable(
                lxm3.PythonPackage(entrypoint=xm.ModuleName("stamp.main"), path=str(stamp_project)),
                executor_spec=executor.Spec())])
            first = await experiment.add(xm.Job(exe, executor, env_vars={"OUT": str(tmp_path / "a"), "SLEEP": "1"}))
            assert isinstance(first, lxm3.ClusterWorkUnit)
            await experiment.add(xm.Job(exe, executor, env_vars={"OUT": str(tmp_path / "b")}),
                                 dependency=first.after_ok())

    asyncio.run(main())
    assert read_reports(str(tmp_path / "b"))[0]["start"] >= read_reports(str(tmp_path / "a"))[0]["end"]


# --- without a cluster: what is rendered, what is refused ------------------------


def test_slurm_takes_one_dependency_option_with_every_condition():
    slurm = lxm3.Slurm(max_parallel_tasks=2)
    up = lxm3.plan_submissions(1, slurm, "/s/wu1/job.sh", 12, "/logs", 11)
    down = lxm3.plan_submissions(2, slurm, "/s/wu2/job.sh", 12, "/logs", 11, {1: up, 7: [
        lxm3.ArrayRecord(0, 5, job_id="700")]}, [("each", 1), ("ok", 7)])
    options = [[a for a in sub.argv if a.startswith("--dependency")] for sub in down]
    assert options == [["--dependency=aftercorr:{job:1:0},afterok:700"],
                       ["--dependency=aftercorr:{job:1:11},afterok:700,afterany:{previous}"]]
    any_down = lxm3.plan_submissions(3, lxm3.Slurm(), "/j", 3, "/logs", 11, {1: up}, [("any", 1)])
    assert "--dependency=afterany:{job:1:0}:{job:1:11}" in any_down[0].argv


def test_grid_engine_holds_on_every_array_and_pairs_arrays_task_by_task():
    sge = lxm3.GridEngine(max_parallel_tasks=2)
    up = lxm3.plan_submissions(1, sge, "/s/wu1/job.sh", 12, "/logs", 10)
    down = lxm3.plan_submissions(2, sge, "/s/wu2/job.sh", 12, "/logs", 10, {1: up}, [("each", 1)])
    assert [(s.first_task, s.count) for s in down] == [(0, 10), (10, 2)]
    assert down[0].argv[down[0].argv.index("-hold_jid_ad") + 1] == "{job:1:0}"
    assert down[1].argv[down[1].argv.index("-hold_jid_ad") + 1] == "{job:1:10}"
    assert down[1].argv[down[1].argv.index("-hold_jid") + 1] == "{previous}"
    ok = lxm3.plan_submissions(3, lxm3.GridEngine(), "/j", 1, "/logs", 10, {1: up}, [("ok", 1)])
    assert ok[0].argv[ok[0].argv.index("-hold_jid") + 1] == "{job:1:0},{job:1:10}"


def test_submission_script_submits_dependents_after_the_arrays_they_name():
    slurm = lxm3.Slurm()
    up = lxm3.plan_submissions(1, slurm, "/j1", 12, "/logs", 11)
    down = lxm3.plan_submissions(2, slurm, "/j2", 12, "/logs", 11, {1: up}, [("ok", 1)])
    script = lxm3.submission_script(["/logs"], up + down, "/x", lxm3.SCHEDULERS["slurm"])
    first_wait = script.index("\nwait\n")
    assert script.index("lxm_submit 1:11") < first_wait < script.index("lxm_need 2:0 1:0 1:11")
    assert "'--dependency=afterok:'\"${lxm_known[1:0]}\"':'\"${lxm_known[1:11]}\"''" in script


def test_failed_task_holds_grid_engine_dependents_only_when_some_wait_for_success():
    line = lxm3.SCHEDULERS["sge"].holds_dependents_line
    assert "exit 100" in line and lxm3.SCHEDULERS["slurm"].holds_dependents_line == ""
    script = lxm3.render_job_script(header="", task_id="LXM_TASK_ID=0", experiment_id=1, work_unit_id=1,
                                    num_tasks=1, archive="/a.zip", tasks_file="/t", exit_record=True,
                                    on_exit=line)
    trap = script[script.index("lxm_exit() {"):script.index("trap lxm_exit EXIT")]
    assert trap.index("lxm3-exit") < trap.index("exit 100")  # the real status is logged first


def test_dependency_across_places_or_sizes_is_refused_at_add(echo_project, tmp_path):
    config = lxm3.Config(clusters=[lxm3.ClusterConfig(name="a", server="127.0.0.1"),
                                   lxm3.ClusterConfig(name="b", server="127.0.0.1")])
    experiment = lxm3.create_experiment("refused", config=config)
    with pytest.raises(ValueError, match="cannot wait for work unit 1"):
        with experiment:
            local = lxm3.Local()
            [exe] = experiment.package([xm.Packageable(
                lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project),
                executor_spec=local.Spec())])
            first = experiment.add(lxm3.ArrayJob(exe, lxm3.Slurm(cluster="a"), args=[{}] * 3))
            with pytest.raises(ValueError, match=r"\(on b, Slurm\) cannot wait for work unit 1 \(on a, Slurm\)"):
                experiment.add(xm.Job(exe, lxm3.Slurm(cluster="b")), dependency=first.after_ok())
            with pytest.raises(ValueError, match=r"has 2 tasks and work unit 1 3"):
                experiment.add(lxm3.ArrayJob(exe, lxm3.Slurm(cluster="a"), args=[{}] * 2),
                               dependency=first.after_each())
            with pytest.raises(TypeError, match="after_ok"):
                experiment.add(xm.Job(exe, lxm3.Slurm(cluster="a")), dependency=first)
            with pytest.raises(ValueError, match="on Grid Engine a failed task holds back every job"):
                up = experiment.add(xm.Job(exe, lxm3.GridEngine(cluster="a")))
                experiment.add(xm.Job(exe, lxm3.GridEngine(cluster="a")), dependency=up.after_ok())
                experiment.add(xm.Job(exe, lxm3.GridEngine(cluster="a")), dependency=up.after_any())
            experiment.add(xm.Job(exe, local), dependency=first.after_any())  # local on a cluster's


def test_records_keep_dependencies_and_older_records_still_load():
    unit = lxm3.WorkUnitRecord(id=2, state="submitted", dependencies=[{"kind": "ok", "work_units": [1]}])
    data = unit.to_json()
    assert data["dependencies"] == [{"kind": "ok", "work_units": [1]}]
    assert lxm3.WorkUnitRecord.from_json(data) == unit
    plain = lxm3.WorkUnitRecord(id=1, state="submitted").to_json()
    assert "dependencies" not in plain and "never_run" not in plain  # as older lxm3 wrote them
    assert lxm3.WorkUnitRecord.from_json(plain).dependencies == []
