"""The Local executor end to end: real packaging, real bash, real subprocesses."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

import lxm3
from lxm3 import xm

from conftest import ROOT, echo_reports, interrupt_when, is_gone, lxm3_popen, wait_until


def launch(echo_project, out_dir, add, config=None, **local):
    """Package echo_project and call ``add(experiment, executable, executor)``."""
    experiment = lxm3.create_experiment("test", config=config or lxm3.Config())
    with experiment:
        executor = lxm3.Local(**local)
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
        [exe] = experiment.package([xm.Packageable(
            spec, executor_spec=executor.Spec(), args={"common": "yes"},
            env_vars={"ECHO_OUT": str(out_dir)})])
        add(experiment, exe, executor)
    return experiment


def test_array_job_runs_every_task_with_its_arguments(echo_project, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    args = [{"seed": i, "name": f"it's {i} $HOME"} for i in range(4)]
    experiment = launch(echo_project, out, lambda e, x, ex: e.add(
        lxm3.ArrayJob(x, ex, args=args, env_vars=[{"SHARED": "one for all"}])))
    got = echo_reports(out)
    assert sorted(got) == [0, 1, 2, 3]
    for i, report in got.items():
        assert report["argv"] == ["--common=yes", f"--seed={i}", f"--name=it's {i} $HOME"]
        assert report["env"]["SHARED"] == "one for all"
        assert report["env"]["LXM_WORK_UNIT_ID"] == "1"
        assert report["env"]["LXM_EXPERIMENT_ID"] == str(experiment.experiment_id)
    printed = capfd.readouterr().out
    assert "[1:2] echo argv=" in printed  # each line carries its work unit and task
    [wu] = experiment.work_units.values()
    assert len(wu.log_paths) == 4
    with open(wu.log_paths[3]) as f:
        assert f.read().startswith('echo argv=["--common=yes", "--seed=3"')


def test_single_job_and_work_unit_ids_follow_add_order(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def add(experiment, exe, executor):
        for n in range(3):
            experiment.add(xm.Job(exe, executor, args={"n": n}, env_vars={"N": str(n)}))

    experiment = launch(echo_project, out, add)
    assert sorted(experiment.work_units) == [1, 2, 3]
    logs = {wid: open(wu.log_paths[0]).read() for wid, wu in experiment.work_units.items()}
    for wid, text in logs.items():
        assert f'"--n={wid - 1}"' in text


def test_config_env_is_exported_unless_the_job_sets_it(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = lxm3.Config(local_env={"FROM_CONFIG": "c", "OVERRIDDEN": "config"})
    launch(echo_project, out, lambda e, x, ex: e.add(
        xm.Job(x, ex, env_vars={"OVERRIDDEN": "job"})), config=config)
    [report] = echo_reports(out).values()
    assert report["env"]["FROM_CONFIG"] == "c"
    assert report["env"]["OVERRIDDEN"] == "job"


def test_failing_task_fails_the_launch_with_exit_code_and_log(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(lxm3.TaskFailedError, match=(
            r"^1 of 3 task\(s\) failed:\n  work unit 1 task 1: exit code 7 \(log: \S+/task-1\.log\)$")):
        launch(echo_project, out, lambda e, x, ex: e.add(lxm3.ArrayJob(
            x, ex, args=[{}], env_vars=[{}, {"ECHO_EXIT": "7"}, {}])))
    assert sorted(echo_reports(out)) == [0, 1, 2]  # the others ran to the end


def test_tasks_run_in_parallel_up_to_the_limit(tmp_path):
    root = tmp_path / "sleeper"
    (root / "sleeper").mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "sleeper"
        version = "0"
        [tool.setuptools]
        packages = ["sleeper"]
    """))
    (root / "sleeper" / "__init__.py").write_text("")
    (root / "sleeper" / "main.py").write_text(textwrap.dedent("""\
        import os, time
        out = os.environ["OUT"]
        open(os.path.join(out, "start-" + os.environ["LXM_TASK_ID"]), "w").write(repr(time.time()))
        time.sleep(0.6)
        open(os.path.join(out, "end-" + os.environ["LXM_TASK_ID"]), "w").write(repr(time.time()))
    """))
    out = tmp_path / "out"
    out.mkdir()
    with lxm3.create_experiment("parallel", config=lxm3.Config()) as experiment:
        executor = lxm3.Local(max_parallel_tasks=2)
        spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("sleeper.main"), path=str(root))
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{}] * 5, env_vars=[{"OUT": str(out)}]))
    spans = [(float((out / f"start-{i}").read_text()), float((out / f"end-{i}").read_text()))
             for i in range(5)]
    most_at_once = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most_at_once == 2


def test_job_group_of_several_jobs_is_refused(echo_project, tmp_path):
    with pytest.raises(ValueError, match="lxm3 launches one job per work unit"):
        launch(echo_project, tmp_path, lambda e, x, ex: e.add(
            xm.JobGroup(a=xm.Job(x, ex), b=xm.Job(x, ex))))


def test_nested_job_group_is_refused(echo_project, tmp_path):
    with pytest.raises(ValueError, match="not a JobGroup inside a JobGroup"):
        launch(echo_project, tmp_path, lambda e, x, ex: e.add(
            xm.JobGroup(outer=xm.JobGroup(inner=xm.Job(x, ex)))))


def test_job_group_from_a_generator_is_checked_too(echo_project, tmp_path):
    def add(experiment, exe, executor):
        async def generator(work_unit):
            await work_unit.add(xm.JobGroup(a=xm.Job(exe, executor), b=xm.Job(exe, executor)))

        experiment.add(generator)

    with pytest.raises(ValueError, match="this JobGroup has 2 jobs: a, b"):
        launch(echo_project, tmp_path, add)


def test_auxiliary_units_are_refused(echo_project, tmp_path):
    with pytest.raises(ValueError, match="auxiliary units are not supported"):
        launch(echo_project, tmp_path, lambda e, x, ex: e.add(
            xm.Job(x, ex), role=xm.AuxiliaryUnitRole(termination_delay_secs=0)))


def test_job_generator_adds_jobs(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def add(experiment, exe, executor):
        async def generator(work_unit, seed):
            work_unit.add(xm.Job(exe, executor, args={"seed": seed}))

        experiment.add(generator, args={"seed": 42})

    launch(echo_project, out, add)
    [report] = echo_reports(out).values()
    assert report["argv"] == ["--common=yes", "--seed=42"]


def test_ctrl_c_stops_every_task(echo_project, tmp_path):
    launcher = tmp_path / "launcher.py"
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "echo_project" / "echoapp" / "main.py").write_text(textwrap.dedent("""\
        import os, time
        open(os.path.join(os.environ["OUT"], str(os.getpid())), "w").close()
        time.sleep(120)
    """))
    launcher.write_text(textwrap.dedent(f"""\
        from lxm3 import xm, xm_cluster
        with xm_cluster.create_experiment("ctrl-c") as experiment:
            executor = xm_cluster.Local(max_parallel_tasks=3)
            spec = xm_cluster.PythonPackage(xm_cluster.ModuleName("echoapp.main"), path="echo_project")
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
            experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{{}}] * 3,
                                               env_vars=[{{"OUT": {str(out)!r}}}]))
    """))
    proc = lxm3_popen("launch", str(launcher), cwd=ROOT, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    _, stderr = interrupt_when(proc, lambda: len(os.listdir(out)) == 3, "the 3 tasks to start")
    pids = [int(p) for p in os.listdir(out)]  # each task wrote its pid as it started
    assert proc.returncode == 130, stderr
    assert "lxm3: interrupted; local tasks were stopped" in stderr, stderr
    wait_until(lambda: all(is_gone(pid) for pid in pids), 60, f"the tasks {pids} to end")


def test_array_job_broadcasting_and_errors():
    exe, executor = object(), lxm3.Local()
    job = lxm3.ArrayJob(exe, executor, args=[{"a": 1}, {"a": 2}], env_vars=[{"E": "x"}])
    assert job.env_vars == [{"E": "x"}, {"E": "x"}]
    job = lxm3.ArrayJob(exe, executor, env_vars=[{"E": "1"}, {"E": "2"}, {"E": "3"}])
    assert job.args == [{}, {}, {}]
    with pytest.raises(ValueError, match="args has 2 entries and env_vars 3"):
        lxm3.ArrayJob(exe, executor, args=[{}, {}], env_vars=[{}, {}, {}])
    with pytest.raises(ValueError, match="needs at least one task"):
        lxm3.ArrayJob(exe, executor)
    with pytest.raises(ValueError, match="must be a list with one entry per task"):
        lxm3.ArrayJob(exe, executor, args={"a": 1})
    with pytest.raises(ValueError, match=re.escape(
            "Tried to construct xm.SequentialArgs from a string: '--a=1'. "
            "Wrap it in a list: ['--a=1'] to make it a single argument.")):
        lxm3.ArrayJob(exe, executor, args=["--a=1"])


def test_sys_exit_zero_inside_the_experiment_is_a_normal_end(echo_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit, match="^0$"):
        with lxm3.create_experiment("exits", config=lxm3.Config()) as experiment:
            executor = lxm3.Local()
            spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(),
                                                       env_vars={"ECHO_OUT": str(out)})])
            experiment.add(xm.Job(exe, executor))
            sys.exit(0)
    assert sorted(echo_reports(out)) == [0]  # the task ran to the end, as without the exit
    assert lxm3.load_record(experiment.experiment_id).status == "completed"
