"""Submission that cannot lose a job: faults injected while the arrays are submitted.

On the test bed, over SSH, with a fault-injecting ``ssh`` first on PATH
(``FaultySsh``): it slows the scheduler's submit command down (so that a fault
lands while arrays are being submitted), and on the launch's submission session
it kills its own ssh (the mux client), or the connection's master, or fills the
disk that holds lxm3's records. The scheduler, sshd and the remote shell are
real; only the timing is arranged.

Each test checks what a user relies on: every array is submitted exactly once
(the slow submit command logs every call), the record holds every job that
exists, and ``status``/``cancel`` see them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Dict, List, Optional, Tuple

import pytest
from cluster_helpers import array_limit

from conftest import lxm3_cli, read_record
from testbed_env import require_testbed

pytestmark = pytest.mark.testbed

SLOW_SUBMIT_SECONDS = 3  # each sbatch/qsub call: long enough for a fault to land in it

# The fault-injecting ssh. Sessions that run "bash -s" get the slow submit
# commands first on PATH; the first session whose script submits (it holds
# "lxm_submit") while the fault is armed gets the fault.
FAULTY_SSH = """\
import json, os, re, signal, subprocess, sys, time

with open({config!r}) as f:
    config = json.load(f)
REAL = config["real_ssh"]
args = sys.argv[1:]
if not args or args[-1] != "bash -s":
    os.execv(REAL, [REAL, *args])
data = sys.stdin.buffer.read()
args[-1] = "PATH=%s:$PATH bash -s" % config["slow_bin"]
armed = b"lxm_submit" in data and os.path.exists(config["armed"])
if armed:
    os.unlink(config["armed"])
    if config["mode"] == "fill-disk":
        with open(os.path.join(config["fill"], "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 65536)
            except OSError:
                pass
proc = subprocess.Popen([REAL, *args], stdin=subprocess.PIPE)
proc.stdin.write(data)
proc.stdin.close()
if armed and config["mode"] in ("kill-client", "kill-master"):
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.getsize(config["calls"]):
        time.sleep(0.05)  # the remote script has started submitting
    if config["mode"] == "kill-master":
        path = next(a.split("=", 1)[1] for a in args if a.startswith("ControlPath="))
        check = subprocess.run([REAL, "-o", "ControlPath=" + path, "-O", "check", "x"],
                               capture_output=True, text=True)
        pid = re.search(r"pid=(\\d+)", check.stderr)
        if pid:
            os.kill(int(pid.group(1)), signal.SIGKILL)
    proc.kill()
    sys.exit(255)
sys.exit(proc.wait())
"""

# Only submissions (of a job.sh) are slow and counted: not the launch's question
# of whose submit command it is (qsub -help / --version, sbatch --version).
SLOW_SUBMIT = """\
#!/bin/bash
case " $* " in
  *job.sh\\ *) echo "$*" >> {calls}; sleep {seconds} ;;
esac
exec {real} "$@"
"""


class FaultySsh:
    """An ``ssh`` wrapper and slow submit commands in a directory of their own.

    ``pbs_bin``: PBS's commands' directory: the slow ``qsub`` wraps that one, and
    the others are linked beside it, so that the cluster's ``bin_dir`` can be
    ``slow_bin`` (lxm3 puts bin_dir first on the PATH, before the wrapper's)."""

    def __init__(self, root: str, mode: str = "none", fill: str = "", pbs_bin: str = ""):
        self.dir = os.path.join(root, f"faulty-ssh-{uuid.uuid4().hex[:8]}")
        bindir, slow_bin = os.path.join(self.dir, "bin"), os.path.join(self.dir, "slow")
        os.makedirs(bindir)
        os.makedirs(slow_bin)
        self.calls = os.path.join(self.dir, "calls")
        open(self.calls, "w").close()
        os.chmod(self.calls, 0o666)  # the slow commands run as the test user
        self.armed = os.path.join(self.dir, "armed")
        config = os.path.join(self.dir, "config.json")
        with open(config, "w") as f:
            json.dump({"real_ssh": shutil.which("ssh"), "slow_bin": slow_bin, "mode": mode,
                       "armed": self.armed, "calls": self.calls, "fill": fill}, f)
        wrapper = os.path.join(bindir, "ssh")
        with open(wrapper, "w") as f:
            f.write(f"#!{sys.executable}\n" + FAULTY_SSH.format(config=config))
        self.slow_bin = slow_bin
        for name in ("sbatch", "qsub"):
            real = os.path.join(pbs_bin, name) if pbs_bin else shutil.which(name)
            if pbs_bin and name == "sbatch":
                continue
            if real:
                with open(os.path.join(slow_bin, name), "w") as f:
                    f.write(SLOW_SUBMIT.format(calls=self.calls, seconds=SLOW_SUBMIT_SECONDS,
                                               real=real))
        for path in (wrapper, *(os.path.join(slow_bin, n) for n in os.listdir(slow_bin))):
            os.chmod(path, 0o755)
        for name in os.listdir(pbs_bin) if pbs_bin else ():
            if name != "qsub":
                os.symlink(os.path.join(pbs_bin, name), os.path.join(slow_bin, name))
        for path in (self.dir, bindir, slow_bin):
            os.chmod(path, 0o755)
        self.path = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def arm(self) -> None:
        open(self.armed, "w").close()

    def submitted_arrays(self) -> List[str]:
        """The first task of each array the submit command was called for, in call order."""
        with open(self.calls) as f:  # its $1; on PBS, -v ...LXM_FIRST_TASK=N
            return [next((m for m in re.findall(r"LXM_FIRST_TASK=(\d+)", line)), line.split()[-1])
                    for line in f.read().splitlines()]


def recorded_arrays(record: dict) -> Dict[int, str]:
    return {a["first_task"]: a["job_id"] for u in record["work_units"] for a in u["arrays"]}


def sweep(ws, num_tasks: int, **executor_options) -> dict:
    return {"kind": "array", "executor": ws.executor(**executor_options),
            "args": [{"seed": i} for i in range(num_tasks)], "env_vars": []}


def experiment_id_from(stderr: str) -> int:
    ids = re.findall(r"(?:experiment|lxm3 status) (\d{13,})", stderr)
    assert ids, stderr
    return int(ids[0])


def faulty_ssh(ws, mode: str = "none") -> Tuple[FaultySsh, Optional[str]]:
    """(FaultySsh, config): PBS's qsub is found by the config's bin_dir, the slow one's."""
    if ws.scheduler != "pbs":
        return FaultySsh(ws.root, mode), None
    ssh = FaultySsh(ws.root, mode, pbs_bin=ws.tb.pbs_bin("").rstrip("/"))
    return ssh, ws.write_config(pbs_bin_dir=False, extra=f"[clusters.pbs]\nbin_dir = {json.dumps(ssh.slow_bin)}\n")


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
@pytest.mark.parametrize("mode", ["kill-client", "kill-master"])
def test_a_connection_lost_while_submitting_submits_each_array_once(
        cluster_workspaces, scheduler, mode, tmp_path):
    tb = require_testbed(scheduler)
    ws = cluster_workspaces(tb, scheduler, "ssh")
    limit = array_limit(tb, scheduler)
    num_tasks = 2 * limit + 3  # three arrays, submitted at once
    ssh, config = faulty_ssh(ws, mode)
    ssh.arm()
    launch = ws.launch([sweep(ws, num_tasks)], path=ssh.path, config=config)

    assert launch.returncode == 0, launch.describe()
    assert "lost the ssh connection" in launch.stderr, launch.describe()
    assert "arrays already submitted are not submitted twice" in launch.stderr
    firsts = ssh.submitted_arrays()
    assert sorted(firsts, key=int) == ["0", str(limit), str(2 * limit)], (
        f"each array must be submitted exactly once: calls {firsts}")
    record = read_record(launch.experiment_id)
    arrays = recorded_arrays(record)
    assert sorted(arrays) == [0, limit, 2 * limit], record["work_units"]
    assert record["status"] == "launched" and record["work_units"][0]["state"] == "submitted"
    status = lxm3_cli("status", str(launch.experiment_id), "--json")
    assert status.returncode == 0, status.stderr
    tasks = json.loads(status.stdout)["work_units"]["1"]["tasks"]
    assert [t["task"] for t in tasks] == list(range(num_tasks))
    assert {re.sub(r"\[\d+\]", "[]", t["job"]) if scheduler == "pbs" else t["job"].split("_")[0].split(".")[0]
            for t in tasks} == set(arrays.values())


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_ctrl_c_while_submitting_records_what_was_submitted(cluster_workspaces, scheduler):
    tb = require_testbed(scheduler)
    ws = cluster_workspaces(tb, scheduler, "ssh")
    limit = array_limit(tb, scheduler)
    num_tasks = 2 * limit + 3
    ssh, config = faulty_ssh(ws)
    # Throttled: the three arrays are a chain, submitted one after another.
    argv, env, directory = ws.launch_command(
        [sweep(ws, num_tasks, max_parallel_tasks=1)], path=ssh.path, config=config)
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not ssh.submitted_arrays():  # the first sbatch/qsub call has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches lxm3 and its ssh
    stdout, stderr = proc.communicate(timeout=300)
    launch = ws.launched(proc.returncode, stdout, stderr, directory, time.monotonic() - started)

    assert launch.returncode == 130, launch.describe()
    xid = experiment_id_from(stderr)
    record = read_record(xid)
    [unit] = record["work_units"]
    # The array being submitted went through; no array was started after Ctrl-C.
    assert ssh.submitted_arrays() == ["0"]
    assert recorded_arrays(record).keys() == {0}, unit
    [job] = recorded_arrays(record).values()
    ws.job_ids.append(job)
    assert unit["state"] == "partially submitted" and record["status"] == "interrupted"
    assert f"work unit 1 tasks 0-{limit - 1} (job {job})" in stderr, launch.describe()
    assert f"Not submitted: work unit 1 tasks {limit}-{num_tasks - 1}" in stderr
    assert "local tasks" not in stderr

    shown = lxm3_cli("status", str(xid))
    assert shown.returncode == 0, shown.stderr
    assert f"not submitted: tasks {limit}-{num_tasks - 1}" in shown.stdout, shown.stdout
    assert re.search(rf"jobs {re.escape(job)}: partially submitted; {num_tasks} task\(s\)", shown.stdout)
    cancelled = lxm3_cli("cancel", str(xid))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancelled job(s) {job}" in cancelled.stdout or f"job(s) {job} had already ended" \
        in cancelled.stdout, cancelled.stdout


def test_a_full_disk_after_submission_loses_no_job(cluster_workspaces, tmp_path, monkeypatch):
    """The record cannot be saved once the jobs are submitted: the error says so,
    and once there is space again, status finds every job from the cluster's log."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the records needs root")
    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    try:
        monkeypatch.setenv("XDG_STATE_HOME", str(state))
        ssh = FaultySsh(ws.root, "fill-disk", fill=str(state))
        ssh.arm()
        limit = array_limit(tb, "slurm")
        launch = ws.launch([sweep(ws, limit + 2)], path=ssh.path)
        assert launch.returncode == 1, launch.describe()
        assert "the jobs were submitted, but the record of experiment" in launch.stderr
        assert "No space left on device" in launch.stderr, launch.describe()
        xid = experiment_id_from(launch.stderr)
        submitted = re.findall(r"\(job (\d+)\)", launch.stderr)
        assert len(submitted) == 2, launch.describe()
        assert read_record(xid)["work_units"][0]["arrays"] == []  # the save before submitting

        os.unlink(state / "filler")
        shown = lxm3_cli("status", str(xid), "--json")
        assert shown.returncode == 0, shown.stderr
        tasks = json.loads(shown.stdout)["work_units"]["1"]["tasks"]
        assert len(tasks) == limit + 2 and all(t["job"] for t in tasks), tasks
        assert sorted(recorded_arrays(read_record(xid)).values()) == sorted(submitted)
        assert read_record(xid)["work_units"][0]["state"] == "submitted"
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_cancel_names_jobs_that_had_already_ended(cluster_workspaces, scheduler, tmp_path):
    tb = require_testbed(scheduler)
    ws = cluster_workspaces(tb, scheduler, "ssh")
    out = ws.out_dir()
    launch = ws.launch([
        {"kind": "array", "executor": ws.executor(), "args": [{"seed": 0}],
         "env_vars": [{"ECHO_OUT": out}]},
        {"kind": "array", "executor": ws.executor(), "args": [{"seed": 1}],
         "env_vars": [{"ECHO_SLEEP": "600"}]},
    ]).check()
    ended, running = launch.unit(1)["job_ids"][0], launch.unit(2)["job_ids"][0]
    ws.wait_for_reports(out, 1, launch)
    deadline = time.monotonic() + 120
    while ended in ws.active_jobs([ended]):
        assert time.monotonic() < deadline, "the first job did not leave the queue"
        time.sleep(0.5)

    proc = lxm3_cli("cancel", str(launch.experiment_id))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"cancelled job(s) {running}",
                                        f"job(s) {ended} had already ended"], proc.stdout
    units = {u["id"]: u for u in read_record(launch.experiment_id)["work_units"]}
    assert not units[1]["cancelled"] and units[2]["cancelled"]
    again = lxm3_cli("cancel", str(launch.experiment_id), "1")
    assert again.stdout.strip() == f"nothing to cancel: job(s) {ended} had already ended"


def run_script(script: str, bindir: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    return subprocess.run(["bash", "-s"], input=script, env=env, capture_output=True, text=True,
                          timeout=120)


def fake_sbatch(tmp_path, body: str = 'echo "$*" >> "$CALLS"; echo $((100 + $(wc -l < "$CALLS")))'):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "sbatch").write_text("#!/bin/bash\n" + textwrap.dedent(body) + "\n")
    (bindir / "sbatch").chmod(0o755)
    return str(bindir)


def plan(num_tasks: int, limit: int, **options):
    import lxm3

    return lxm3.plan_submissions(1, lxm3.Slurm(**options), "/s/job.sh", num_tasks, "/tmp/l", limit)


def test_a_second_run_of_the_submission_submits_only_what_is_missing(tmp_path):
    import lxm3

    bindir = fake_sbatch(tmp_path)
    subs = plan(25, 11, max_parallel_tasks=2)  # a chain: each array waits for the previous
    experiment_dir = str(tmp_path / "exp")
    script = lxm3.submission_script([str(tmp_path / "logs")], subs, experiment_dir, lxm3.SCHEDULERS["slurm"])
    first = run_script(script, bindir, tmp_path)
    assert lxm3.parse_submission_output(first.stdout, subs) is None, first.stderr
    ids = [s.job_id for s in subs]
    log = (tmp_path / "exp" / lxm3.SUBMISSION_LOG).read_text().splitlines()
    assert log == [f"{s.key} {s.job_id}" for s in subs]

    again = lxm3.plan_submissions(1, lxm3.Slurm(max_parallel_tasks=2), "/s/job.sh", 25, "/tmp/l", 11)
    # The log loses its last line, as if the third array had never been submitted.
    (tmp_path / "exp" / lxm3.SUBMISSION_LOG).write_text("\n".join(log[:2]) + "\n")
    second = run_script(lxm3.submission_script([str(tmp_path / "logs")], again, experiment_dir, lxm3.SCHEDULERS["slurm"]),
                        bindir, tmp_path)
    assert lxm3.parse_submission_output(second.stdout, again) is None, second.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 4, calls  # three, then only the missing one
    assert calls[3].endswith("/s/job.sh 22") and f"afterany:{ids[1]}" in calls[3]
    assert [s.job_id for s in again][:2] == ids[:2] and again[2].job_id == "104"


def test_a_stop_request_ends_the_submission_between_arrays(tmp_path):
    import lxm3

    bindir = fake_sbatch(tmp_path, """\
        echo "$*" >> "$CALLS"
        : > "$STOP"
        echo 7""")
    subs = plan(25, 11, max_parallel_tasks=1)
    experiment_dir = tmp_path / "exp"
    experiment_dir.mkdir()
    script = lxm3.submission_script([str(tmp_path / "logs")], subs, str(experiment_dir), lxm3.SCHEDULERS["slurm"])
    env_stop = {"STOP": str(experiment_dir / lxm3.SUBMISSION_STOP)}
    proc = subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True,
                          env={**os.environ, **env_stop, "PATH": f"{bindir}:{os.environ['PATH']}",
                               "CALLS": str(tmp_path / "calls")})
    assert proc.returncode == 0, proc.stderr
    lxm3.parse_submission_output(proc.stdout, subs)
    assert [s.job_id for s in subs] == ["7", None, None]
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
    read = subprocess.run(["bash", "-s"], input=lxm3.submission_log_script(str(experiment_dir), stop=True),
                          capture_output=True, text=True)
    assert read.stdout.split() == ["OK", "1:0", "7"]
    assert not (experiment_dir / lxm3.SUBMISSION_STOP).exists()  # the next run is not stopped


def test_a_submission_script_cut_short_runs_nothing(tmp_path):
    import lxm3

    bindir = fake_sbatch(tmp_path)
    script = lxm3.submission_script([str(tmp_path / "logs")], plan(25, 11), str(tmp_path / "exp"), lxm3.SCHEDULERS["slurm"])
    for cut in (len(script) // 3, len(script) - len("lxm_main\n")):
        proc = run_script(script[:cut], bindir, tmp_path)
        assert not (tmp_path / "calls").exists(), (cut, proc.stdout)
        assert not (tmp_path / "exp").exists() and not (tmp_path / "logs").exists()


def dry_run(ws, units) -> subprocess.CompletedProcess:
    argv, env, directory = ws.launch_command(units)
    argv.insert(argv.index("launch") + 1, "--dry-run")
    return subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_dry_run_splits_as_the_launch_will(cluster_workspaces, scheduler):
    tb = require_testbed(scheduler)
    ws = cluster_workspaces(tb, scheduler, "ssh")
    limit = array_limit(tb, scheduler)
    units = [sweep(ws, limit + 2)]

    # Before any launch, the cluster is not asked: its home is ~, unquoted.
    before = dry_run(ws, units)
    assert before.returncode == 0, before.stderr
    assert "was not asked: ~ is its home directory" in before.stdout, before.stdout
    submit = [line for line in before.stdout.splitlines() if "job.sh" in line]
    assert len(submit) == 1 and f" ~/{ws.staging}/experiments/" in submit[0], submit
    assert "'~" not in before.stdout and "'$HOME" not in before.stdout, before.stdout

    ws.launch([sweep(ws, 1)]).check()  # a launch tells lxm3 the cluster's paths and limit

    after = dry_run(ws, units)
    assert after.returncode == 0, after.stderr
    assert "as testbed-ssh reported them at the last launch" in after.stdout, after.stdout
    submit = [line for line in after.stdout.splitlines() if "job.sh" in line]
    expected = {"slurm": [f"--array=0-{limit - 1} ", "--array=0-1 "], "sge": [f"-t 1-{limit} ", "-t 1-2 "],
                "pbs": [f"-J 0-{limit - 1} ", "-J 0-1 "]}[scheduler]
    assert [e in line for e, line in zip(expected, submit)] == [True, True], submit
    assert len(submit) == 2
    assert all(f"{ws.staging_path}/experiments/" in line for line in submit), submit
    assert "~" not in after.stdout.split("would create", 1)[1], after.stdout


def test_a_full_staging_directory_is_a_clear_error_and_leaves_nothing_half_written(
        cluster_workspaces):
    """The cluster's disk fills up: the copy fails with the reason, nothing is
    submitted, and once there is space the next launch runs the right code."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the staging directory needs root")
    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    staging = ws.staging_path
    os.makedirs(staging)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=700", "tmpfs", staging], check=True)
    try:
        shutil.chown(staging, tb.ssh_user, tb.ssh_user)
        filler = os.path.join(staging, "filler")
        with open(filler, "wb", buffering=0) as f:  # leaves less than the archive needs
            try:
                while True:
                    f.write(b"x" * 65536)
            except OSError:
                pass
        os.truncate(filler, os.path.getsize(filler) - 64 * 1024)
        out = ws.out_dir()
        units = [{"kind": "array", "executor": ws.executor(), "args": [{"seed": 0}, {"seed": 1}],
                  "env_vars": [{"ECHO_OUT": out}]}]
        full = ws.launch(units)
        assert full.returncode == 1, full.describe()
        assert "No space left on device" in full.stderr and "rsync" in full.stderr, full.describe()
        ws.assert_nothing_submitted(full)
        archives = os.path.join(staging, "archives")
        assert not os.path.isdir(archives) or [n for n in os.listdir(archives)
                                               if n.endswith(".zip")] == [], os.listdir(archives)

        os.unlink(filler)
        launch = ws.launch(units).check()
        reports = ws.wait_for_reports(out, 2, launch)
        assert [reports[i]["argv"] for i in range(2)] == [["--seed=0"], ["--seed=1"]]
    finally:
        subprocess.run(["umount", "-l", staging], check=False)


def test_a_submission_log_that_cannot_be_written_does_not_lose_the_job_ids(tmp_path):
    import lxm3

    bindir = fake_sbatch(tmp_path)
    subs = plan(12, 11)
    (tmp_path / "exp" / lxm3.SUBMISSION_LOG).mkdir(parents=True)  # appending to it fails
    proc = run_script(lxm3.submission_script([str(tmp_path / "logs")], subs, str(tmp_path / "exp"), lxm3.SCHEDULERS["slurm"]),
                      bindir, tmp_path)
    assert lxm3.parse_submission_output(proc.stdout, subs) is None, proc.stdout
    assert all(s.job_id and s.job_id.isdigit() for s in subs), subs
    assert proc.stdout.count(f"WARN could not write {tmp_path}/exp/{lxm3.SUBMISSION_LOG}") == 2
