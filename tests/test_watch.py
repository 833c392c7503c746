"""``lxm3 status --watch``, ``lxm3 wait`` and ``lxm3 launch --wait``.

The drawing (bars) and the pace of the queries (back-off) are checked as plain
functions; everything else on real launches: local ones, and the test bed's
Slurm and Grid Engine reached over SSH (cluster_helpers.ClusterWorkspace, mode
``ssh``), with real tasks that sleep, fail and write logs. Watching on a
terminal runs in a real pseudo-terminal (``pty``), whose output is replayed
through the small screen model below to get what the user sees at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from cluster_helpers import ClusterWorkspace, array_unit, read_reports, workspace_factory

import lxm3

from conftest import (
    ROOT,
    launch_local,
    local_unit,
    lxm3_cli,
    lxm3_popen,
    new_record_id,
    read_record,
    record_files,
    status_json,
    wait_until,
    write_launcher,
)
from testbed_env import require_testbed

DEADLINE = 300  # seconds for a command that waits for a sweep on a busy 2-core test bed


# --- a screen, to read what a terminal shows --------------------------------------


class Screen:
    """The lines a terminal shows after some output: text, ``\\r``, ``\\n``, and the
    sequences ``status --watch`` may use (cursor up, erase down or to the end of
    the line, colours, cursor shown/hidden); any other sequence fails the test."""

    def __init__(self) -> None:
        self.lines: List[str] = [""]
        self.row = self.col = 0
        self.moved_up = 0  # cursor-up sequences seen

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            char = text[i]
            if char == "\x1b":
                match = re.compile(r"\x1b\[(\??)(\d*)([A-Za-z])").match(text, i)
                assert match, f"unexpected escape sequence: {text[i:i + 10]!r}"
                private, number, final = match.groups()
                if private:
                    assert final in "lh" and number == "25", match.group(0)
                elif final == "A":
                    self.row = max(0, self.row - int(number or 1))
                    self.moved_up += 1
                elif final == "J":
                    del self.lines[self.row + 1:]
                    self.lines[self.row] = self.lines[self.row][:self.col]
                elif final == "K":
                    self.lines[self.row] = self.lines[self.row][:self.col]
                else:
                    assert final == "m", match.group(0)
                i = match.end()
                continue
            if char == "\r":
                self.col = 0
            elif char == "\n":
                self.row += 1
                if self.row == len(self.lines):
                    self.lines.append("")
            else:
                line = self.lines[self.row].ljust(self.col)
                self.lines[self.row] = line[:self.col] + char + line[self.col + 1:]
                self.col += 1
            i += 1

    def text(self) -> List[str]:
        lines = list(self.lines)
        while lines and not lines[-1]:
            lines.pop()
        return lines


def run_in_terminal(argv: List[str], columns: int, timeout: float, rows: int = 40,
                    ctrl_c_after: Optional[str] = None) -> Tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal of ``rows`` x ``columns`` as its stdin,
    stdout and stderr, as in a terminal window; type Ctrl-C once its output
    shows ``ctrl_c_after``. Returns (exit status, everything it wrote)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    env.pop("COLUMNS", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    os.kill(pid, signal.SIGWINCH)  # in case it looked before the size was set
    output, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                pytest.fail(f"still running after {timeout} s: {output.decode(errors='replace')[-3000:]}")
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child has ended and closed the terminal
                break
            if not data:
                break
            output += data
            if ctrl_c_after is not None and ctrl_c_after.encode() in output:
                os.write(fd, b"\x03")  # the terminal sends SIGINT to its foreground process group
                ctrl_c_after = None
    finally:
        _, status = os.waitpid(pid, 0) if _alive(pid) else (pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- bars and the pace of the queries -----------------------------------------------


def test_bar_cells_are_proportional_and_every_state_present_shows():
    counts = {"completed": 998, "failed": 1, "running": 1}
    segments = lxm3.bar_segments(counts, 40)
    assert sum(cells for _, cells in segments) == 40
    assert [state for state, _ in segments] == ["completed", "failed", "running"]
    assert dict(segments)["failed"] == 1 and dict(segments)["running"] == 1  # seen, though rare
    assert lxm3.bar_segments({"completed": 1, "pending": 3}, 8) == [("completed", 2), ("pending", 6)]
    assert lxm3.bar_segments({}, 10) == []


def test_bar_is_as_wide_as_asked_with_or_without_colour():
    counts = {"completed": 2, "failed": 1, "cancelled": 1, "unknown": 1, "running": 2, "pending": 3}
    plain = lxm3.render_bar(counts, 20, colour=False)
    assert len(plain) == 20 and "\x1b" not in plain
    assert re.fullmatch(r"#+x+-+\?+>+\.+", plain), plain
    coloured = lxm3.render_bar(counts, 20, colour=True)
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain
    assert "\x1b[31mx" in coloured and "\x1b[32m#" in coloured  # failed red, completed green


def test_unit_line_fits_the_terminal():
    status = lxm3.WorkUnitStatus([lxm3.TaskStatus(i, s) for i, s in enumerate(
        ["completed"] * 5 + ["failed"] * 2 + ["running"] * 3 + ["pending"] * 10)])
    for width in (20, 40, 80, 200):
        line = lxm3.unit_line(7, status, width, colour=True)
        shown = re.sub(r"\x1b\[[0-9;]*m", "", line)
        assert len(shown) <= width - 1, (width, shown)
        assert shown.startswith("work unit 7 [")
    wide = re.sub(r"\x1b\[[0-9;]*m", "", lxm3.unit_line(7, status, 200, colour=False))
    assert wide.endswith("] 7/20 ended: 5 completed, 2 failed, 3 running, 10 pending"), wide


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert lxm3._use_colour(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not lxm3._use_colour(Tty())
    monkeypatch.delenv("NO_COLOR")
    with open(os.devnull, "w") as not_a_terminal:
        assert not lxm3._use_colour(not_a_terminal)


def test_back_off_grows_while_nothing_changes_and_resets_on_change():
    waits, wait = [], None
    for _ in range(12):
        wait = lxm3.next_poll_interval(wait, 30.0, changed=False)
        waits.append(wait)
    assert waits[:4] == [30.0, 45.0, 67.5, 101.25]
    assert waits[-1] == lxm3.WATCH_MAX_INTERVAL == 300.0  # capped
    assert all(a <= b for a, b in zip(waits, waits[1:]))
    assert lxm3.next_poll_interval(300.0, 30.0, changed=True) == 30.0
    assert lxm3.next_poll_interval(None, 600.0, changed=False) == 600.0  # a base above the cap stays


def unit_status(*states: str) -> Dict[int, Any]:
    return {1: lxm3.WorkUnitStatus([lxm3.TaskStatus(i, s) for i, s in enumerate(states)])}


def test_poll_statuses_asks_once_per_wait_until_every_task_ended():
    answers = [unit_status("pending", "pending"), unit_status("pending", "pending"),
               unit_status("pending", "pending"), unit_status("running", "pending"),
               unit_status("running", "pending"), unit_status("completed", "failed")]
    asked = []

    def ask():
        asked.append(1)
        return answers[len(asked) - 1]

    waits = [wait for _, wait in lxm3.poll_statuses(ask, 10.0)]
    assert waits == [10.0, 15.0, 22.5, 10.0, 15.0, None]  # grows, resets on a change, ends
    assert len(asked) == len(answers)  # one query per answer, none after the end


def test_poll_statuses_never_asks_more_often_than_the_minimum():
    ask = lambda: unit_status("running")  # noqa: E731
    polls = lxm3.poll_statuses(ask, 0.1)
    assert [next(polls)[1] for _ in range(2)] == [lxm3.WATCH_MIN_INTERVAL, lxm3.WATCH_MIN_INTERVAL * 1.5]


def test_poll_statuses_asks_again_after_a_lost_connection_then_gives_up(capsys):
    calls = []

    def ask():
        calls.append(1)
        if len(calls) == 1:
            return unit_status("running")
        raise lxm3.ConnectionLost("lost the ssh connection to there while reading job states")

    polls = lxm3.poll_statuses(ask, 5.0)
    assert next(polls)[1] == 5.0
    for _ in range(lxm3.WATCH_FAILED_QUERIES - 1):  # the last answer again, with a longer wait
        statuses, wait = next(polls)
        assert wait is not None and [t.state for t in statuses[1].tasks] == ["running"]
    assert "asking again in" in capsys.readouterr().err
    with pytest.raises(lxm3.ConnectionLost, match="lost the ssh connection"):
        next(polls)
    with pytest.raises(lxm3.ConnectionLost, match="^lost the ssh connection"):  # at once, too
        next(lxm3.poll_statuses(ask, 5.0))


def test_status_script_brings_the_end_of_failed_logs(tmp_path, monkeypatch):
    """The status query's own round trip carries the end of each failed task's log:
    real bash, find, tail and awk on real log files, as on a cluster."""
    logs = tmp_path / "logs"
    logs.mkdir()
    body = "".join(f"line {i}\n" for i in range(9))
    (logs / "job-7_0.log").write_text(body + "\nlxm3-exit: task 0 status 0\n")
    (logs / "job-7_1.log").write_text("== not a section\n" + body + "last words\nlxm3-exit: task 1 status 3\n")
    (logs / "job-7_2.log").write_text("only line\n\nlxm3-exit: task 2 status 137\n")
    (logs / "job-7_3.log").write_text(body)  # still running: no exit record
    (logs / "other-7_4.log").write_text("x\n\nlxm3-exit: task 4 status 1\n")  # another job's
    scheduler = lxm3.scheduler_named("slurm")
    monkeypatch.setattr(scheduler, "status_lines", lambda job_ids: ["echo '== queue'"])  # no queue here
    unit = lxm3.WorkUnitRecord(id=2, state="submitted", scheduler="slurm", cluster="here", num_tasks=4,
                               job_name="job", log_directory=str(logs),
                               arrays=[lxm3.ArrayRecord(0, 4, job_id="7")])
    script = lxm3._status_script([unit], scheduler, tail_lines=5)
    output = subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True, check=True).stdout
    tails = lxm3._failed_log_tails(output, unit)
    assert tails == {(2, 1): ["line 5", "line 6", "line 7", "line 8", "last words"],
                     (2, 2): ["only line"]}
    assert "== not a section" not in output.splitlines()  # task output never starts a section
    assert lxm3._failed_log_tails(lxm3._status_script([unit], scheduler), unit) == {}


# --- local experiments ----------------------------------------------------------------


def test_wait_and_watch_a_local_experiment_that_failed(tmp_path, task_project):
    spec = {"title": "watch local", "project": task_project, "units": [
        local_unit(3, task_env=lambda i: {"CODES": json.dumps({"1": 4}), "LINES": "3", "EVERY": "0"})]}
    _, record = launch_local(tmp_path, "failed", spec, expect_rc=1)  # the launch says so already
    xid = str(record["experiment_id"])

    proc = lxm3_cli("wait", xid)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [f"experiment {xid}: 3 tasks ended: 2 completed, 1 failed",
                                        "  work unit 1: failed task 1"]

    proc = lxm3_cli("status", xid, "--watch")  # stdout is a pipe: plain lines
    assert proc.returncode == 1, proc.stderr
    assert "\x1b" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"\[\w+\] work unit 1: 3/3 ended: 2 completed, 1 failed", lines[0]), lines
    assert re.fullmatch(rf"\[\w+\] work unit 1 task 1: failed, exit 4; lxm3 logs {xid} 1 --task 1",
                        lines[1]), lines
    assert lines[2:7] == ['  | task 1 argv=["--seed=1"]', "  | line 0 of task 1", "  | line 1 of task 1",
                          "  | line 2 of task 1", "  | task 1 done"], lines
    assert lines[-2:] == [f"experiment {xid}: 3 tasks ended: 2 completed, 1 failed",
                          "  work unit 1: failed task 1"]

    assert lxm3_cli("wait", xid, "2").returncode == 2  # no work unit 2: a usage error
    assert lxm3_cli("wait", "12345").returncode == 2
    assert lxm3_cli("wait", xid, "--interval", "1").returncode == 2  # below the minimum


def test_launch_wait_of_local_work_that_completes(tmp_path, task_project):
    spec = {"title": "watch local ok", "project": task_project, "units": [local_unit(2)]}
    launcher = write_launcher(tmp_path / "ok", spec)
    before = record_files()
    proc = lxm3_cli("launch", "--wait", "--interval", "5", launcher, "--seed-extra", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    xid = new_record_id(before)
    assert proc.stdout.splitlines()[-1] == f"experiment {xid}: 2 tasks ended: 2 completed"
    assert read_record(xid)["status"] == "completed"


def started(before: List[str]) -> Optional[Dict[str, Any]]:
    """The record of the launch started after ``before``, once its local tasks have started."""
    names = [name for name in record_files() if name not in before and name.endswith(".json")]
    if len(names) != 1:
        return None
    try:
        record = read_record(names[0][:-5])
    except ValueError:  # claimed, not written yet
        return None
    return record if any(u["log_paths"] for u in record["work_units"]) else None


def test_wait_follows_a_local_launch_that_is_still_running(tmp_path, task_project):
    gate = tmp_path / "gate"
    spec = {"title": "watch local running", "project": task_project,
            "units": [local_unit(2, {"GATE": str(gate), "MAX_WAIT": "240"})]}
    launcher = write_launcher(tmp_path / "running", spec)
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    waiter = None
    try:
        wait_until(lambda: started(before), 240, "the launch to start its tasks")
        xid = str(started(before)["experiment_id"])
        waiter = lxm3_popen("wait", xid, "--interval", "5", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        wait_until(lambda: [t["state"] for t in status_json(xid)["work_units"]["1"]["tasks"]]
                   == ["running", "running"], 120, "both tasks to run")
        assert waiter.poll() is None, waiter.communicate()  # the tasks run: it waits
        gate.touch()
        out, err = waiter.communicate(timeout=DEADLINE)
        assert waiter.returncode == 0, err
        assert out.splitlines()[0] == f"experiment {xid}: 2 tasks ended: 2 completed"
        assert launch.wait(DEADLINE) == 0
    finally:
        gate.touch()
        for proc in (launch, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_watch_on_a_small_terminal_sums_up_the_work_units_it_has_no_room_for(tmp_path, task_project):
    spec = {"title": "watch many", "project": task_project, "units": [local_unit(1) for _ in range(12)]}
    _, record = launch_local(tmp_path, "many", spec)
    xid = str(record["experiment_id"])
    code, output = run_in_terminal([sys.executable, "-m", "lxm3", "status", xid, "--watch"],
                                   columns=60, rows=8, timeout=120)
    assert code == 0, output
    screen = Screen()
    screen.feed(output)
    lines = screen.text()
    bars = [line for line in lines if line.startswith("work unit ")]
    assert [re.sub(r"\[#+\]", "[#]", line) for line in bars] == [
        f"work unit {i} [#] 1/1 ended: 1 completed" for i in range(1, 6)], lines
    assert all(len(line) == 59 for line in bars), bars  # as wide as the terminal allows
    assert "... 7 more work units: 7/7 ended: 7 completed" in lines
    assert lines[-1] == f"experiment {xid}: 12 tasks ended: 12 completed"


@contextlib.contextmanager
def gated_local_launch(tmp_path, task_project, name: str, max_wait: int):
    """A local launch whose one task waits for a gate file: yields (the launch
    process, its experiment id) once the task runs; then opens the gate (the
    task ends, even orphaned) and ends the launch."""
    gate = tmp_path / "gate"
    spec = {"title": f"watch {name}", "project": task_project,
            "units": [local_unit(1, {"GATE": str(gate), "MAX_WAIT": str(max_wait)})]}
    launcher = write_launcher(tmp_path / name, spec)
    before = record_files()
    launch = lxm3_popen("launch", launcher, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: started(before), 240, "the launch to start its task")
        yield launch, str(started(before)["experiment_id"])
    finally:
        gate.touch()
        try:
            launch.wait(DEADLINE)
        finally:
            if launch.poll() is None:
                launch.kill()
                launch.wait()


def test_ctrl_c_ends_watch_with_130_and_the_cursor_shown(tmp_path, task_project):
    with gated_local_launch(tmp_path, task_project, "ctrl-c", max_wait=240) as (launch, xid):
        code, output = run_in_terminal([sys.executable, "-m", "lxm3", "status", xid, "--watch"],
                                       columns=80, timeout=120, ctrl_c_after="1 running")
        assert code == 130, output
        assert output.rindex("\x1b[?25h") > output.rindex("\x1b[?25l"), output  # the cursor is back
        assert "Traceback" not in output, output
        assert launch.poll() is None  # watching stopped; the work did not


def test_wait_ends_when_the_local_launch_was_killed(tmp_path, task_project):
    """Nothing will ever record how the tasks of a killed launch end: wait says
    they are unknown instead of waiting for ever."""
    with gated_local_launch(tmp_path, task_project, "killed", max_wait=60) as (launch, xid):
        os.kill(launch.pid, signal.SIGKILL)  # as the OOM killer would: nothing is saved
        launch.wait()
        assert read_record(xid)["status"] == "launching"
        proc = lxm3_cli("wait", xid, "--timeout", "120")
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        assert "  work unit 1: unknown task 0" in proc.stdout, proc.stdout


# --- Slurm, Grid Engine and PBS ----------------------------------------------------


@pytest.fixture
def cluster(request):
    """``make(scheduler)`` -> a ClusterWorkspace reached over SSH, cleaned up after."""
    with workspace_factory() as make:
        yield lambda scheduler: make(require_testbed(scheduler), scheduler, "ssh")


def sweep(ws: ClusterWorkspace, envs: List[Dict[str, str]]) -> Dict[str, Any]:
    """An array of len(envs) tasks of the echo program, task i with envs[i]."""
    return array_unit(ws.executor(), args=[{"seed": i} for i in range(len(envs))], env_vars=envs)


def launched(ws: ClusterWorkspace, units: List[Dict[str, Any]], *, wait: bool = False,
             timeout: float = DEADLINE):
    """Run ``lxm3 launch [--wait --interval 5]``; the Launch."""
    argv, env, directory = ws.launch_command(units)
    if wait:
        at = argv.index("launch") + 1
        argv[at:at] = ["--wait", "--interval", "5"]
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    return ws.launched(proc.returncode, proc.stdout, proc.stderr, directory, time.monotonic() - started)


def task_states(xid: int) -> List[Tuple[str, Optional[int]]]:
    return [(t["state"], t["exit_code"]) for t in status_json(xid)["work_units"]["1"]["tasks"]]


each_scheduler = pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
# What is drawn does not depend on the scheduler: PBS runs the tests of waiting only.
each_scheduler_but_pbs = pytest.mark.parametrize("scheduler", ["slurm", "sge"])


@pytest.mark.testbed
@each_scheduler
def test_wait_exits_1_once_every_task_ended_when_one_failed(cluster, scheduler):
    ws = cluster(scheduler)
    out = ws.out_dir()
    launch = launched(ws, [sweep(ws, [{"ECHO_OUT": out}, {"ECHO_OUT": out, "ECHO_EXIT": "3"},
                                      {"ECHO_OUT": out, "ECHO_SLEEP": "15"}])])
    assert launch.returncode == 0, launch.describe()
    xid = launch.experiment_id
    proc = lxm3_cli("wait", str(xid), "--interval", "5", timeout=DEADLINE)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.splitlines() == [f"experiment {xid}: 3 tasks ended: 2 completed, 1 failed",
                                        "  work unit 1: failed task 1"]
    # It returned once all had ended: the scheduler has none of them, the slow one completed.
    assert ws.active_jobs(launch.job_ids()) == {}
    assert sorted(read_reports(out)) == [0, 1, 2]
    assert task_states(xid) == [("completed", 0), ("failed", 3), ("completed", 0)]
    assert read_record(xid)["status"] == "failed"  # lxm3 list tells it too


@pytest.mark.testbed
@each_scheduler
def test_launch_wait_exits_0_once_every_task_completed(cluster, scheduler):
    ws = cluster(scheduler)
    out = ws.out_dir()
    launch = launched(ws, [sweep(ws, [{"ECHO_OUT": out, "ECHO_SLEEP": "10"}] * 2)], wait=True)
    assert launch.returncode == 0, launch.describe()
    xid = launch.experiment_id
    assert launch.stdout.splitlines()[-1] == f"experiment {xid}: 2 tasks ended: 2 completed"
    assert sorted(read_reports(out)) == [0, 1]  # the tasks had ended when it returned
    assert ws.active_jobs(launch.job_ids()) == {}
    proc = lxm3_cli("wait", str(xid))  # nothing left to wait for: at once
    assert (proc.returncode, proc.stdout) == (0, f"experiment {xid}: 2 tasks ended: 2 completed\n")

    failing = launched(ws, [sweep(ws, [{"ECHO_EXIT": "2"}])], wait=True)
    assert failing.returncode == 1, failing.describe()
    assert failing.stdout.splitlines()[-1] == "  work unit 1: failed task 0"


@pytest.mark.testbed
@each_scheduler_but_pbs
def test_watch_into_a_pipe_prints_a_line_per_change_and_the_failed_log(cluster, scheduler):
    ws = cluster(scheduler)
    launch = launched(ws, [sweep(ws, [{"ECHO_SLEEP": "12"}, {"ECHO_SLEEP": "3", "ECHO_EXIT": "5"},
                                      {"ECHO_SLEEP": "12"}])])
    assert launch.returncode == 0, launch.describe()
    xid = launch.experiment_id
    proc = lxm3_cli("status", str(xid), "--watch", "--interval", "5", timeout=DEADLINE)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "\x1b" not in proc.stdout
    lines = proc.stdout.splitlines()
    counts = [line for line in lines if re.fullmatch(r"\[\w+\] work unit 1: .*", line)]
    assert counts and counts[-1].endswith("work unit 1: 3/3 ended: 2 completed, 1 failed"), lines
    said = [line.split("] ", 1)[1] for line in counts]
    assert all(a != b for a, b in zip(said, said[1:])), said  # a line per change, not per query
    assert all(re.fullmatch(r"work unit 1: \d/3 ended: .*", text) for text in said), said
    [failure] = [i for i, line in enumerate(lines) if "task 1: failed" in line]
    assert lines[failure].endswith(f"work unit 1 task 1: failed, exit 5; lxm3 logs {xid} 1 --task 1")
    assert lines[failure + 1] == '  | echo task=1 argv=["--seed=1"]', lines
    assert lines[-2:] == [f"experiment {xid}: 3 tasks ended: 2 completed, 1 failed",
                          "  work unit 1: failed task 1"]
    assert ws.active_jobs(launch.job_ids()) == {}


@pytest.mark.testbed
@each_scheduler_but_pbs
def test_watch_on_a_terminal_redraws_its_bars_in_place(cluster, scheduler):
    ws = cluster(scheduler)
    launch = launched(ws, [sweep(ws, [{"ECHO_SLEEP": "12"}, {"ECHO_SLEEP": "2", "ECHO_EXIT": "6"},
                                      {"ECHO_SLEEP": "12"}]), sweep(ws, [{"ECHO_SLEEP": "1"}])])
    assert launch.returncode == 0, launch.describe()
    xid = launch.experiment_id
    code, output = run_in_terminal([sys.executable, "-m", "lxm3", "status", str(xid), "--watch",
                                    "--interval", "5"], columns=90, timeout=DEADLINE)
    assert code == 1, output
    screen = Screen()
    screen.feed(output)
    assert screen.moved_up >= 1, output  # redrawn, not printed again below
    assert "\x1b[31m" in output and "\x1b[?25h" in output  # colour; the cursor shown again
    lines = screen.text()
    assert all(len(line) <= 89 for line in lines), lines
    # Once each on the final screen: the failure with its log, the header, one bar per unit.
    assert sum("work unit 1 task 1: failed, exit 6" in line for line in lines) == 1, lines
    assert '  | echo task=1 argv=["--seed=1"]' in lines
    [header] = [line for line in lines if line.startswith(f"experiment {xid} ")]
    assert "since launch" in header and "next query" not in header, header
    bars = [line for line in lines if line.startswith("work unit ") and " [" in line]
    assert len(bars) == 2, lines
    assert re.fullmatch(r"work unit 1 \[#+x+\] 3/3 ended: 2 completed, 1 failed", bars[0]), bars
    assert re.fullmatch(r"work unit 2 \[#+\] 1/1 ended: 1 completed", bars[1]), bars
    assert lines[-2:] == [f"experiment {xid}: 4 tasks ended: 3 completed, 1 failed",
                          "  work unit 1: failed task 1"]


@pytest.mark.testbed
@each_scheduler_but_pbs
def test_wait_queries_each_cluster_once_per_interval(cluster, scheduler, monkeypatch, capsys):
    """Counted in this process, at the one place a status query goes out."""
    ws = cluster(scheduler)
    launch = launched(ws, [sweep(ws, [{"ECHO_SLEEP": "20"}, {"ECHO_SLEEP": "1"}]),
                           sweep(ws, [{"ECHO_SLEEP": "10"}])])
    assert launch.returncode == 0, launch.describe()
    queries: List[Tuple[float, str]] = []
    run_script = lxm3.Connection.run_script

    def counted(self, script, what):
        if what == "reading job states":
            queries.append((time.monotonic(), script))
        return run_script(self, script, what)

    monkeypatch.setattr(lxm3.Connection, "run_script", counted)
    args = lxm3._parser().parse_args(["wait", str(launch.experiment_id), "--interval", "5"])
    started = time.monotonic()
    assert lxm3._cmd_wait(args) == 0, capsys.readouterr()
    elapsed = time.monotonic() - started
    assert len(queries) >= 2  # the tasks take 20 s: it asked more than once
    assert len(queries) <= 1 + elapsed / lxm3.WATCH_MIN_INTERVAL, (len(queries), elapsed)
    gaps = [b[0] - a[0] for a, b in zip(queries, queries[1:])]
    assert min(gaps) >= lxm3.WATCH_MIN_INTERVAL - 0.05, gaps  # never sooner than the minimum
    # Both work units in each query: one round trip for the cluster.
    assert all("== exits 1" in script and "== exits 2" in script for _, script in queries)


@pytest.mark.testbed
@each_scheduler
def test_wait_timeout_exits_124_and_leaves_the_jobs_alone(cluster, scheduler):
    ws = cluster(scheduler)
    launch = launched(ws, [sweep(ws, [{"ECHO_SLEEP": "240"}])])
    assert launch.returncode == 0, launch.describe()
    xid = launch.experiment_id
    proc = lxm3_cli("wait", str(xid), "--interval", "5", "--timeout", "8", timeout=DEADLINE)
    assert proc.returncode == lxm3.WAIT_TIMEOUT_EXIT == 124, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert re.fullmatch(rf"lxm3: experiment {xid}: timed out after 8s: 1 task still pending or "
                        r"running \(work unit 1: 0/1 ended: 1 (running|pending)\)\n", proc.stderr), proc.stderr
    assert ws.active_jobs(launch.job_ids())  # waiting gave up; the job goes on


@pytest.mark.parametrize("args, error", [
    (["status", "1", "--watch", "--json"], "--watch redraws for people; --json is for scripts"),
    (["status", "1", "--interval", "10"], "--interval goes with --watch"),
    (["wait", "1", "--timeout", "-1"], "argument --timeout: '-1': a number of seconds, at least 0"),
    (["wait", "1", "--interval", "nan"], "argument --interval: 'nan': a number of seconds, at least 5"),
    (["launch", "--timeout", "60", "launcher.py"], "--interval and --timeout go with --wait"),
    (["launch", "--wait", "--dry-run", "launcher.py"], "a dry run launches nothing to wait for"),
])  # fmt: skip
def test_mistakes_with_the_watch_options_are_usage_errors(args, error):
    proc = lxm3_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert error in proc.stderr and "usage: lxm3" in proc.stderr, proc.stderr
