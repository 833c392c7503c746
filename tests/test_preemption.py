"""Preemption and time limits: requeue, a warning before the time limit, signals
passed on by the job script, and ``LXM_ATTEMPT``.

The first tests need no test bed: the directives the options give, their
checks, and the job script run by real bash on this machine (a signal sent to
the script as Slurm's ``--signal=B:...`` sends it, the group signals of a cancel).
The rest run on the test bed's Slurm and Grid Engine, over SSH as the test
user, with a task program (``PREEMPT_MAIN``) that appends what happens to it
(start with its attempt, each signal it catches, its end) to an events file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import List

import pytest
from cluster_helpers import ClusterWorkspace, job_unit

import lxm3

from conftest import PYPROJECT, lxm3_cli, make_archive, status_json, write_files
from testbed_env import require_testbed

DEADLINE = 300  # seconds for a task to start, restart or end on a busy 2-core test bed

# Appends "start attempt=N", "got SIG" and "end status" lines to $PREEMPT_OUT/task-<i>.events.
# PREEMPT_CATCH: signals it handles; PREEMPT_EXIT_ON: the ones after which it exits
# ($PREEMPT_EXIT); PREEMPT_DONE_AT: the attempt from which it ends at once (else it sleeps).
PREEMPT_MAIN = """\
    import os, signal, sys, time
    out = os.environ["PREEMPT_OUT"]
    attempt = os.environ.get("LXM_ATTEMPT", "unset")
    path = os.path.join(out, "task-%s.events" % os.environ.get("LXM_TASK_ID"))

    def note(line):
        with open(path, "a") as f:
            f.write(line + "\\n")

    def on_signal(number, frame):
        name = signal.Signals(number).name[3:]
        note("got %s" % name)
        if name in os.environ.get("PREEMPT_EXIT_ON", "").split(","):
            # Grid Engine sends its warning twice (by process group and by the
            # job's group id): one is enough to stop, a second must not kill
            # the program as it exits (Python restores the default handlers).
            signal.signal(number, signal.SIG_IGN)
            note("end %s" % os.environ.get("PREEMPT_EXIT", "0"))
            sys.exit(int(os.environ.get("PREEMPT_EXIT", "0")))

    for name in filter(None, os.environ.get("PREEMPT_CATCH", "").split(",")):
        signal.signal(getattr(signal, "SIG" + name), on_signal)
    note("start attempt=%s" % attempt)
    print("preempt task started, attempt %s" % attempt, flush=True)
    if attempt.isdigit() and int(attempt) >= int(os.environ.get("PREEMPT_DONE_AT", "99")):
        note("end 0")
        sys.exit(0)
    deadline = time.time() + float(os.environ.get("PREEMPT_SLEEP", "600"))
    while time.time() < deadline:
        time.sleep(0.2)
    note("end slept")
"""


# --- the options and their directives (no test bed) -----------------------------


def slurm_header(**options) -> List[str]:
    cluster = lxm3.ClusterConfig(name="c", raw={})
    return lxm3.SCHEDULERS["slurm"].directives(lxm3.Slurm(**options), cluster, "job")


def sge_header(**options) -> List[str]:
    cluster = lxm3.ClusterConfig(name="c", raw={})
    return lxm3.SCHEDULERS["sge"].directives(lxm3.GridEngine(**options), cluster, "job")


def test_slurm_requeue_and_warning_directives():
    assert "--requeue" not in slurm_header()
    assert not any(d.startswith("--signal") for d in slurm_header(timeout_signal="USR1"))
    header = slurm_header(requeue=True, walltime="1:00:00", timeout_signal_seconds=120)
    assert "--requeue" in header
    assert "--signal=B:USR2@120" in header  # B: the job script, which passes it on
    for given in ("SIGUSR1", "usr1", signal.SIGUSR1, int(signal.SIGUSR1)):
        assert "--signal=B:USR1@60" in slurm_header(timeout_signal=given, timeout_signal_seconds=60)
    # The user's own --signal line replaces the derived one.
    header = slurm_header(timeout_signal_seconds=60, extra_directives=["--signal=B:TERM@30"])
    assert [d for d in header if d.startswith("--signal")] == ["--signal=B:TERM@30"]


def test_grid_engine_requeue_and_notify_directives():
    assert "-r y" not in sge_header() and "-notify" not in sge_header()
    header = sge_header(requeue=True, notify=True)
    assert "-r y" in header and "-notify" in header


@pytest.mark.parametrize("options, message", [
    ({"timeout_signal": "KILL"}, "'KILL' is not a signal the job script can pass on.*USR2"),
    ({"timeout_signal": "SIGNOPE"}, "'SIGNOPE' is not a signal the job script can pass on"),
    ({"timeout_signal": signal.SIGSTOP}, "is not a signal the job script can pass on"),
    ({"timeout_signal_seconds": 0}, r"timeout_signal_seconds=0\): give a whole number of seconds from 1 to 65535"),
    ({"timeout_signal_seconds": 65536}, "from 1 to 65535"),
    ({"timeout_signal_seconds": 1.5}, "give a whole number of seconds"),
    ({"timeout_signal_seconds": True}, "give a whole number of seconds"),
    ({"timeout_signal_seconds": 600, "walltime": "10"}, r"is not less than the walltime \(600 s\)"),
])
def test_slurm_warning_options_are_checked_where_written(options, message):
    with pytest.raises(ValueError, match=message):
        lxm3.Slurm(**options)


def test_requeue_and_notify_must_be_booleans():
    with pytest.raises(TypeError, match=r"Slurm\(requeue=...\) must be True or False"):
        lxm3.Slurm(requeue="yes")
    with pytest.raises(TypeError, match=r"GridEngine\(notify=...\) must be True or False"):
        lxm3.GridEngine(notify=1)


def test_only_slurm_warning_is_passed_on_by_the_script():
    slurm, sge = lxm3.SCHEDULERS["slurm"], lxm3.SCHEDULERS["sge"]
    assert slurm.forwarded_signals(lxm3.Slurm()) == []
    assert slurm.forwarded_signals(lxm3.Slurm(timeout_signal_seconds=30)) == ["USR2"]
    # Grid Engine's -notify signals reach every process of the job by themselves.
    assert sge.forwarded_signals(lxm3.GridEngine(notify=True)) == []


# --- the job script, run by bash here -------------------------------------------


def start_task(tmp_path, env, forwarded=(), restart_count="0"):
    """Start task 0 of a job script running PREEMPT_MAIN, in a session of its own
    (as the local runner and the schedulers start job scripts)."""
    archive = make_archive(str(tmp_path), PREEMPT_MAIN)
    job_dir = os.path.join(str(tmp_path), "job")
    script = lxm3.render_job_script(
        header=lxm3.LOCAL_HEADER, task_id=lxm3.LOCAL_TASK_ID, experiment_id=1, work_unit_id=1,
        num_tasks=1, archive=archive, tasks_file=os.path.join(job_dir, "tasks"),
        exit_record=True, restart_count=restart_count, forwarded_signals=forwarded)
    script_path, _ = lxm3.write_job_files(job_dir, script, [lxm3.Task([], {})], {})
    out = str(tmp_path)
    full_env = {**os.environ, "LXM_TASK_ID": "0", "PREEMPT_OUT": out, **env}
    proc = subprocess.Popen(["bash", script_path], env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, os.path.join(out, "task-0.events")


def events(path: str) -> List[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_warning_sent_to_the_script_alone_reaches_the_program(tmp_path):
    """Slurm's --signal=B:USR2 signals the batch shell only: the script passes it
    on, waits for the program's handler, and ends with the program's status."""
    proc, path = start_task(tmp_path, {"PREEMPT_CATCH": "USR2", "PREEMPT_EXIT_ON": "USR2",
                                       "PREEMPT_EXIT": "3"}, forwarded=["USR2"])
    wait_for(lambda: "start attempt=1" in events(path), "the program to start")
    os.kill(proc.pid, signal.SIGUSR2)  # the script alone, as Slurm's B: does
    output, _ = proc.communicate(timeout=60)
    assert events(path) == ["start attempt=1", "got USR2", "end 3"], output
    assert proc.returncode == 3, output
    assert "lxm3-exit: task 0 status 3" in output


def test_signal_to_the_whole_task_reaches_the_program_once_and_the_script_waits(tmp_path):
    """TERM to the task's process group (a cancel, a time limit, the local runner's
    stop): the program's handler runs once, to its end, before the script ends."""
    proc, path = start_task(tmp_path, {"PREEMPT_CATCH": "TERM,USR2", "PREEMPT_EXIT_ON": "TERM",
                                       "PREEMPT_EXIT": "0"}, forwarded=["USR2"])
    wait_for(lambda: "start attempt=1" in events(path), "the program to start")
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert events(path) == ["start attempt=1", "got TERM", "end 0"], output
    assert proc.returncode == 0 and "lxm3-exit: task 0 status 0" in output, output


def test_script_outlives_warnings_it_does_not_pass_on(tmp_path):
    """Grid Engine's -notify sends USR2 (and USR1) to every process: the script
    must not die of it, and the program gets it once, from the scheduler."""
    proc, path = start_task(tmp_path, {"PREEMPT_CATCH": "USR1,USR2", "PREEMPT_EXIT_ON": "USR2"})
    wait_for(lambda: "start attempt=1" in events(path), "the program to start")
    os.killpg(proc.pid, signal.SIGUSR1)
    wait_for(lambda: "got USR1" in events(path), "the program to catch USR1")
    os.killpg(proc.pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=60)
    assert events(path) == ["start attempt=1", "got USR1", "got USR2", "end 0"], output
    assert proc.returncode == 0 and "lxm3-exit: task 0 status 0" in output, output


def test_program_killed_by_a_signal_is_the_task_status(tmp_path):
    proc, path = start_task(tmp_path, {}, forwarded=["USR2"])  # USR2 not caught: it ends the program
    wait_for(lambda: "start attempt=1" in events(path), "the program to start")
    os.kill(proc.pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR2, output
    assert f"lxm3-exit: task 0 status {128 + signal.SIGUSR2}" in output


@pytest.mark.parametrize("env, restart_count, attempt", [
    ({}, "0", "1"),
    ({"LXM_RERUN": "2"}, "0", "3"),
    ({"LXM_RERUN": "1", "RESTARTS": "2"}, "${RESTARTS:-0}", "4"),
    ({"LXM_RERUN": "$(touch /tmp/lxm3-pwned)"}, "0", "1"),  # not a number: not evaluated
])
def test_attempt_counts_reruns_and_restarts(tmp_path, env, restart_count, attempt):
    proc, path = start_task(tmp_path, {**env, "PREEMPT_DONE_AT": "1"}, restart_count=restart_count)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert events(path) == [f"start attempt={attempt}", "end 0"]
    assert not os.path.exists("/tmp/lxm3-pwned")


def test_program_keeps_the_scripts_stdin_and_signal_dispositions(tmp_path):
    """The job script ignores signals while it waits, but its program gets stdin and
    the signal dispositions it would get run directly (defaults, or what the
    caller already ignored: bash in the background starts its jobs with INT ignored)."""
    source = tmp_path / "stdin.txt"
    source.write_text("from stdin\n")
    program = """\
        import json, os, signal, sys
        with open(os.path.join(os.environ["PREEMPT_OUT"], "seen.json"), "w") as f:
            json.dump({"stdin": sys.stdin.read(), "int": str(signal.getsignal(signal.SIGINT)),
                       "quit": int(signal.getsignal(signal.SIGQUIT)),
                       "term": int(signal.getsignal(signal.SIGTERM)),
                       "usr2": int(signal.getsignal(signal.SIGUSR2))}, f)
    """
    archive = make_archive(str(tmp_path), program)
    job_dir = os.path.join(str(tmp_path), "job")
    script = lxm3.render_job_script(
        header=lxm3.LOCAL_HEADER, task_id=lxm3.LOCAL_TASK_ID, experiment_id=1, work_unit_id=1,
        num_tasks=1, archive=archive, tasks_file=os.path.join(job_dir, "tasks"),
        forwarded_signals=["USR2"])
    script_path, _ = lxm3.write_job_files(job_dir, script, [lxm3.Task([], {})], {})
    direct = tmp_path / "direct"
    direct.mkdir()
    for command, out in ((["bash", script_path], tmp_path),
                         ([sys.executable, str(tmp_path / "archive-src" / "echoapp" / "main.py")], direct)):
        with open(source) as stdin:
            subprocess.run(command, stdin=stdin, check=True, timeout=60,
                           env={**os.environ, "LXM_TASK_ID": "0", "PREEMPT_OUT": str(out)})
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == json.loads((direct / "seen.json").read_text())
    assert seen["stdin"] == "from stdin\n"
    assert seen["term"] == seen["usr2"] == int(signal.SIG_DFL)  # the script's own ignoring is undone


# --- on the test bed -------------------------------------------------------------

_PROJECT = {}


def preempt_project() -> str:
    """The echoapp project of the launcher of cluster_helpers, whose main is PREEMPT_MAIN."""
    if "path" not in _PROJECT:
        root = f"/tmp/lxm3-it-preempt-{uuid.uuid4().hex[:10]}"
        os.mkdir(root)
        os.chmod(root, 0o755)
        _PROJECT["path"] = write_files(os.path.join(root, "echo_project"), {
            "pyproject.toml": PYPROJECT.format(name="echoapp"),
            "echoapp/__init__.py": "",
            "echoapp/main.py": PREEMPT_MAIN,
        })
        _PROJECT["root"] = root
    return _PROJECT["path"]


@pytest.fixture(scope="module", autouse=True)
def _remove_project():
    yield
    if "root" in _PROJECT:
        shutil.rmtree(_PROJECT["root"], ignore_errors=True)


@pytest.fixture
def workspace():
    made = []

    def make(scheduler: str) -> ClusterWorkspace:
        require_testbed("ssh")
        ws = ClusterWorkspace(require_testbed(scheduler), scheduler, "ssh", preempt_project())
        made.append(ws)
        return ws

    yield make
    for ws in made:
        ws.cleanup()


def launch_one(ws: ClusterWorkspace, env, **executor):
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor(**executor), env_vars={"PREEMPT_OUT": out, **env})]).check()
    [(job_id, _, _)] = launch.arrays()
    return launch, job_id, os.path.join(out, "task-0.events")


def wait_events(ws, launch, path, condition, what, timeout=DEADLINE) -> List[str]:
    deadline = time.monotonic() + timeout
    while True:
        seen = events(path)
        if condition(seen):
            return seen
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {n} ---\n{t[-2000:]}" for n, t in ws.log_files(launch).items())
            pytest.fail(f"timed out after {timeout} s waiting for {what}; events {seen}\n"
                        f"{launch.describe()}\nlogs:{logs}")
        time.sleep(0.5)


def final_state(launch, timeout=DEADLINE):
    """The task's (state, exit code) once ``lxm3 status`` says it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        [task] = status_json(launch.experiment_id)["work_units"]["1"]["tasks"]
        if task["state"] not in ("pending", "running"):
            return task["state"], task["exit_code"]
        if time.monotonic() > deadline:
            pytest.fail(f"the task did not end in {timeout} s: {task}")
        time.sleep(2)


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_requeued_task_runs_again_with_its_attempt(workspace, scheduler):
    """A running task requeued by the scheduler (``scontrol requeue`` as a
    preemption does; Grid Engine ``qmod -rj`` of a rerunnable job; PBS ``qrerun``,
    by its manager, root on its server) runs anew with LXM_ATTEMPT=2, which lets
    the program end, and the work unit completes."""
    ws = workspace(scheduler)
    launch, job_id, path = launch_one(ws, {"PREEMPT_DONE_AT": "2"}, requeue=True)
    wait_events(ws, launch, path, lambda e: "start attempt=1" in e, "the first run")
    if scheduler == "pbs":
        task = job_id.replace("[]", "[0]")
        subprocess.run(["ip", "netns", "exec", ws.tb.get("PBS_NETNS"), "env",
                        f"PBS_CONF_FILE={ws.tb.pbs_conf_file}", ws.tb.pbs_bin("qrerun"), task], check=True)
    else:
        task = f"{job_id}_0" if scheduler == "slurm" else f"{job_id}.1"
        command = ["scontrol", "requeue", task] if scheduler == "slurm" else ["qmod", "-rj", task]
        ws.tb.ssh(command)
    seen = wait_events(ws, launch, path, lambda e: "start attempt=2" in e, "the second run")
    seen = wait_events(ws, launch, path, lambda e: "end 0" in e, "the second run to end")
    assert seen[0] == "start attempt=1" and seen[-2:] == ["start attempt=2", "end 0"], seen
    assert final_state(launch) == ("completed", 0)


@pytest.mark.testbed
def test_slurm_warns_the_program_before_its_time_limit(workspace):
    """--time=1 (minute) with the warning 50 s before: the program catches USR2,
    writes its checkpoint (here a line) and exits 0 before Slurm's TERM; the task
    completes. Slurm checks time limits about once a minute, so the warning comes
    within a minute or so of the start; the program would sleep ten minutes."""
    ws = workspace("slurm")
    launch, _, path = launch_one(
        ws, {"PREEMPT_CATCH": "USR2", "PREEMPT_EXIT_ON": "USR2", "PREEMPT_EXIT": "0"},
        walltime=60, timeout_signal_seconds=50)
    assert "--signal=B:USR2@50" in open(os.path.join(launch.unit()["job_directory"], "job.sh")).read()
    seen = wait_events(ws, launch, path, lambda e: "end 0" in e, "the warning")
    assert seen == ["start attempt=1", "got USR2", "end 0"]
    assert final_state(launch) == ("completed", 0)


@pytest.mark.testbed
def test_grid_engine_notify_warns_the_program_at_its_time_limit(workspace):
    """-notify with h_rt=20 s: at the limit Grid Engine sends USR2 to the task's
    processes and kills them the queue's notify time later (60 s on the test
    bed). The program catches USR2 and exits 0, which the exit record shows;
    Grid Engine 8.1.9 still counts a task that reached its h_rt as failed
    (qacct: failed 37, "qmaster enforced h_rt ... limit", exit_status 0), and
    so does lxm3 status."""
    ws = workspace("sge")
    launch, _, path = launch_one(
        ws, {"PREEMPT_CATCH": "USR1,USR2", "PREEMPT_EXIT_ON": "USR2", "PREEMPT_EXIT": "0"},
        walltime=20, notify=True)
    seen = wait_events(ws, launch, path, lambda e: "end 0" in e, "the warning")
    assert seen[0] == "start attempt=1" and seen[-1] == "end 0" and "got USR2" in seen, seen
    assert final_state(launch) == ("failed", 0), ws.log_files(launch)
    [log] = ws.log_files(launch).values()
    assert log.rstrip().endswith("lxm3-exit: task 0 status 0"), log


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_cancel_lets_the_program_handle_its_signal(workspace, scheduler):
    """``lxm3 cancel``: Slurm and PBS send TERM to every process of the task (KILL
    KillWait / kill_delay later), Grid Engine with -notify USR2 (KILL notify later). The
    program's handler runs once and to its end, and the script, which waits
    for it, writes the exit record with the program's status."""
    ws = workspace(scheduler)
    catch = "USR2" if scheduler == "sge" else "TERM"
    options = {"notify": True} if scheduler == "sge" else {}
    launch, job_id, path = launch_one(
        ws, {"PREEMPT_CATCH": catch, "PREEMPT_EXIT_ON": catch, "PREEMPT_EXIT": "7"}, **options)
    wait_events(ws, launch, path, lambda e: "start attempt=1" in e, "the task to start")
    proc = lxm3_cli("cancel", str(launch.experiment_id))
    assert proc.returncode == 0, proc.stderr
    seen = wait_events(ws, launch, path, lambda e: "end 7" in e, f"the {catch} handler")
    assert seen == ["start attempt=1", f"got {catch}", "end 7"]
    deadline = time.monotonic() + DEADLINE
    while not re.search(r"lxm3-exit: task 0 status 7\b", "".join(ws.log_files(launch).values())):
        assert time.monotonic() < deadline, ws.log_files(launch)
        time.sleep(1)
