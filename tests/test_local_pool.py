"""Local tasks run in a bounded pool: a sweep of thousands of tasks costs
``max_parallel_tasks`` threads, not one per task (which, under a pid limit, ended in
a misleading "can't start new thread"), and a stopped launch starts nothing more."""

import json
import os
import subprocess
import time

from conftest import interrupt_when, lxm3_cli, lxm3_popen, read_lines, read_record, write_files

MAX_PARALLEL = 4
# Threads besides the pool that a launch may have: the main thread, this test's
# sampler, xm's event loop, the record-save timer, git's background query.
OTHER_THREADS = 6

LAUNCHER = """\
    import json, sys, threading, time
    from lxm3 import xm, xm_cluster

    num_tasks, max_parallel, report = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    peak = [threading.active_count()]
    done = threading.Event()

    def sample():  # the number of threads of this launch, every few milliseconds
        while not done.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    try:
        with xm_cluster.create_experiment("pool") as experiment:
            executor = xm_cluster.Local(max_parallel_tasks=max_parallel)
            spec = xm_cluster.UniversalPackage(
                entrypoint=xm.CommandList(['echo "task $LXM_TASK_ID says $*"', 'sleep "${SLEEP:-0}"', "true"]),
                build_script="build.sh", path="app")
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
            experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{"n": i} for i in range(num_tasks)]))
    finally:
        done.set()
        with open(report, "w") as f:
            json.dump({"peak_threads": peak[0], "experiment_id": experiment.experiment_id}, f)
"""


def write_launcher(tmp_path):
    write_files(tmp_path, {"app/build.sh": "#!/bin/sh\ntrue\n", "launcher.py": LAUNCHER})
    os.chmod(tmp_path / "app" / "build.sh", 0o755)


def test_a_sweep_of_2000_tasks_runs_on_a_bounded_pool(tmp_path):
    write_launcher(tmp_path)
    num_tasks = 2000
    report = tmp_path / "report.json"
    proc = lxm3_cli("launch", "launcher.py", str(num_tasks), str(MAX_PARALLEL), str(report),
                    cwd=str(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert f"all {num_tasks} task(s) of experiment" in proc.stderr
    result = json.loads(report.read_text())
    assert result["peak_threads"] <= MAX_PARALLEL + OTHER_THREADS, result
    # Every task ran once and has its log, ending with its exit record.
    log_dir = next(os.path.join(d, "logs") for d, dirs, _ in os.walk(os.environ["XDG_DATA_HOME"])
                   if "logs" in dirs and d.endswith("wu1"))
    assert len([n for n in os.listdir(log_dir) if n.endswith(".log")]) == num_tasks
    for task in range(num_tasks):
        with open(os.path.join(log_dir, f"task-{task}.log")) as f:
            text = f.read()
        assert text == f"task {task} says --n={task}\n\nlxm3-exit: task {task} status 0\n", (task, text)
    printed = proc.stdout
    assert f"[1:{num_tasks - 1}] task {num_tasks - 1} says --n={num_tasks - 1}" in printed
    assert "lxm3-exit" not in printed  # the exit record is for lxm3, not the terminal


def test_stopping_drops_queued_tasks(tmp_path):
    """Ctrl-C with 2 tasks running and 18 queued: the queued ones never start, and
    status says so; the launch ends without waiting for them."""
    write_launcher(tmp_path)
    report = tmp_path / "report.json"
    proc = lxm3_popen("launch", "launcher.py", "20", "2", str(report), cwd=str(tmp_path),
                      env={"SLEEP": "60"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines(proc, 2, r".* says .*", timeout=120)  # the two running tasks have printed their line
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    _, stderr = interrupt_when(proc, lambda: True, "the launch to run")
    assert proc.returncode == 130, stderr
    xid = json.loads(report.read_text())["experiment_id"]
    status = lxm3_cli("status", str(xid), "1", "--json", timeout=120)
    assert status.returncode == 0, status.stderr
    tasks = json.loads(status.stdout)["work_units"]["1"]["tasks"]
    never = [t["task"] for t in tasks if t["detail"] == "stopped before it started"]
    stopped = [t["task"] for t in tasks if t["state"] == "cancelled" and t["exit_code"] is not None]
    assert sorted(stopped) == [0, 1], tasks
    assert never == list(range(2, 20)), tasks
    time.sleep(2)  # nothing starts after the launch has ended
    log_dir = os.path.dirname(read_record(xid)["work_units"][0]["log_paths"][0])
    started = [n for n in os.listdir(log_dir) if os.path.getsize(os.path.join(log_dir, n))]
    assert sorted(started) == ["task-0.log", "task-1.log"], started
