"""SSH faults a user meets: a server that accepts the connection and never answers,
and a launch interrupted while rsync is copying.

The unresponsive server is a Python listener on 127.0.0.1 (a random port) that
accepts TCP connections and never sends a byte: the real ``ssh`` connects and
waits for the server's banner, which never comes. Host-key checking is never
reached (and never disabled). Every command runs as users run it (``python -m
lxm3 ...`` in a subprocess) with a generous outer timeout: without lxm3's
ConnectTimeout, each of them would hang until that timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, List, Tuple

import pytest
from cluster_helpers import Launch, job_unit

from conftest import (
    experiments_dir,
    lxm3_cli,
    lxm3_popen,
    new_record_id,
    processes_mentioning,
    read_record,
    record_files,
    write_launcher,
)
from testbed_env import require_testbed

OUTER_TIMEOUT = 120  # seconds; lxm3 gives up after ssh_connect_timeout (3 s here)
CONNECT_TIMEOUT = 3


@pytest.fixture
def silent_server() -> Iterator[Tuple[int, List[socket.socket]]]:
    """(port, accepted connections) of a server that accepts and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    accepted: List[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted.append(connection)  # held open, silent

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        server.close()


def silent_config(directory: str, port: int, **settings) -> str:
    lines = ["[[clusters]]", 'name = "silent"', 'server = "127.0.0.1"', f"port = {port}",
             'user = "nobody"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path = os.path.join(directory, "lxm.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def check_timeout_error(proc: subprocess.CompletedProcess, server: str, port: int, cluster: str,
                        seconds: int = CONNECT_TIMEOUT) -> str:
    """Exit code 1, the "connecting to" line, and an error naming the server, the
    cluster and what to check."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"lxm3: connecting to {server} (cluster {cluster!r}) ...\n" in proc.stderr, proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("lxm3: error: ")]
    assert f"cannot connect to {server} (cluster {cluster!r})" in error, error
    assert f"no answer within {seconds} s" in error, error
    assert f"port {port}" in error, error  # ssh's own words say which port did not answer
    assert "server is up" in error and "VPN" in error, error
    assert re.search(rf"`ssh -p {port} (\S+@)?{re.escape(server)}` by hand", error), error
    assert "ssh_connect_timeout" in error, error
    return error


def slurm_unit():
    return {"executor": "Slurm", "args": [{"seed": 0}], "env_vars": [{}]}


def test_launch_to_a_server_that_never_answers_fails_naming_it(tmp_path, task_project,
                                                               silent_server):
    port, accepted = silent_server
    config = silent_config(str(tmp_path), port, ssh_connect_timeout=CONNECT_TIMEOUT)
    launcher = write_launcher(tmp_path / "launch", {"title": "silent", "project": task_project,
                                                     "units": [slurm_unit()]})
    proc = lxm3_cli("launch", launcher, "--lxm_config", config, cwd=str(tmp_path),
                    timeout=OUTER_TIMEOUT)
    check_timeout_error(proc, "127.0.0.1", port, "silent")
    assert accepted, "ssh never reached the listener: the test did not test a silent server"


def write_cluster_record(port: int, connection_settings: dict) -> int:
    """The record a Slurm launch to the silent server would have left (as to_record writes it)."""
    experiment_id = int(time.time() * 1000)
    unit = {
        "id": 1, "state": "submitted", "executor": "Slurm", "scheduler": "slurm",
        "cluster": "silent", "job_name": f"silent_{experiment_id}_1",
        "job_directory": f"/home/nobody/lxm3-staging/experiments/{experiment_id}/wu1",
        "script": f"/home/nobody/lxm3-staging/experiments/{experiment_id}/wu1/job.sh",
        "log_directory": f"/home/nobody/lxm3-staging/experiments/{experiment_id}/wu1/logs",
        "archive": "/home/nobody/lxm3-staging/archives/x-0123456789abcdef.zip", "image": None,
        "arrays": [{"job_id": "4242", "first_task": 0, "count": 1}], "num_tasks": 1,
        "cancelled": False, "tasks": [{"args": ["--seed=0"], "env": {}}],
        "connection": {"server": "127.0.0.1", "user": "nobody", "port": port,
                       "ssh_private_key": None, **connection_settings},
        "custom_output": False,
    }
    record = {"version": 1, "experiment_id": experiment_id, "title": "silent",
              "created": "2026-01-01T00:00:00+00:00", "status": "launched", "error": None,
              "launcher": "/nowhere/launcher.py", "argv": [], "git": None, "work_units": [unit]}
    os.makedirs(experiments_dir(), exist_ok=True)
    with open(os.path.join(experiments_dir(), f"{experiment_id}.json"), "w") as f:
        json.dump(record, f)
    return experiment_id


@pytest.mark.parametrize("command", ["status", "cancel", "logs"])
def test_status_cancel_and_logs_give_up_on_a_silent_server(command, silent_server):
    port, accepted = silent_server
    experiment_id = write_cluster_record(port, {"ssh_connect_timeout": CONNECT_TIMEOUT,
                                                "ssh_keepalive_interval": 5})
    proc = lxm3_cli(command, str(experiment_id), timeout=OUTER_TIMEOUT)
    check_timeout_error(proc, "127.0.0.1", port, "silent")
    assert accepted


def test_environment_sets_the_connect_timeout_over_the_record(silent_server):
    port, _ = silent_server
    experiment_id = write_cluster_record(port, {"ssh_connect_timeout": 600})
    proc = lxm3_cli("status", str(experiment_id), env={"LXM3_SSH_CONNECT_TIMEOUT": "2"},
                    timeout=OUTER_TIMEOUT)
    check_timeout_error(proc, "127.0.0.1", port, "silent", seconds=2)


def test_a_record_without_timeouts_uses_the_defaults(silent_server):
    """Records written before the settings existed: the default applies (20 s)."""
    port, _ = silent_server
    experiment_id = write_cluster_record(port, {})
    proc = lxm3_cli("status", str(experiment_id), timeout=OUTER_TIMEOUT)
    check_timeout_error(proc, "127.0.0.1", port, "silent", seconds=20)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "true"])
def test_a_bad_connect_timeout_in_the_config_is_an_error(tmp_path, value, silent_server):
    port, accepted = silent_server
    path = os.path.join(str(tmp_path), "lxm.toml")
    with open(path, "w") as f:
        f.write(f'[[clusters]]\nname = "silent"\nserver = "127.0.0.1"\nport = {port}\n'
                f"ssh_connect_timeout = {value if value != 'soon' else json.dumps(value)}\n")
    launcher = write_launcher(tmp_path / "launch", {"title": "silent", "project": "/nowhere",
                                                     "units": [slurm_unit()]})
    proc = lxm3_cli("launch", launcher, "--lxm_config", path, cwd=str(tmp_path), timeout=OUTER_TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    assert "'clusters[0].ssh_connect_timeout' (cluster 'silent') must be a number of seconds above 0" \
        in proc.stderr, proc.stderr
    assert not accepted


# --- on the test bed ------------------------------------------------------------


@pytest.mark.testbed
def test_the_record_keeps_the_cluster_timeouts_for_status(cluster_workspaces, silent_server):
    """A real launch with ssh_connect_timeout in the config: the record carries it, a kept
    connection is reused without a "connecting" line, and status on that record, once it
    points at the silent server, gives up after the configured timeout."""
    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    config = ws.write_config(cluster={"ssh_connect_timeout": CONNECT_TIMEOUT,
                                      "ssh_keepalive_interval": 7})
    before = record_files()
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor())], config=config, exe_env={"ECHO_OUT": out}).check()
    assert f"lxm3: connecting to {tb.ssh_host} (cluster {ws.cluster_name!r}) ...\n" in launch.stderr
    experiment_id = new_record_id(before)
    record = read_record(experiment_id)
    [unit] = record["work_units"]
    assert unit["connection"]["ssh_connect_timeout"] == CONNECT_TIMEOUT
    assert unit["connection"]["ssh_keepalive_interval"] == 7

    kept = lxm3_cli("status", str(experiment_id), timeout=OUTER_TIMEOUT)
    assert kept.returncode == 0, kept.stderr
    assert "connecting to" not in kept.stderr, "the kept connection was not reused"

    port, accepted = silent_server
    unit["connection"]["port"] = port
    with open(os.path.join(experiments_dir(), f"{experiment_id}.json"), "w") as f:
        json.dump(record, f)
    proc = lxm3_cli("status", str(experiment_id), timeout=OUTER_TIMEOUT)
    check_timeout_error(proc, tb.ssh_host, port, ws.cluster_name)
    assert accepted
    ws.wait_for_reports(out, 1, launch)


# --- a launch interrupted while copying ---------------------------------------------

# An ``ssh`` first on PATH that, when rsync runs it, waits a long time before
# becoming the real ssh: the copy is under way for as long as the test needs.
SLOW_SSH = """\
#!{python}
import os, sys, time
if "rsync" in sys.argv and "--server" in sys.argv:
    time.sleep(300)
os.execv({ssh!r}, ["ssh"] + sys.argv[1:])
"""


# The same launch in an ``async with`` block, whose deployment runs on a worker thread.
ASYNC_LAUNCHER = """\
import asyncio, json, os
from lxm3 import xm, xm_cluster

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "spec.json")) as f:
    SPEC = json.load(f)

async def main():
    async with xm_cluster.create_experiment(SPEC["title"]) as experiment:
        [executable] = experiment.package([xm.Packageable(
            xm_cluster.PythonPackage(path=SPEC["project"], entrypoint=xm_cluster.ModuleName("lxmtask.main")),
            executor_spec=xm_cluster.Slurm.Spec())])
        await experiment.add(xm.Job(executable, xm_cluster.Slurm()))

asyncio.run(main())
"""


@pytest.mark.testbed
@pytest.mark.parametrize("how, block", [(signal.SIGTERM, "with"), (signal.SIGHUP, "with"),
                                        (signal.SIGTERM, "async with")])
def test_an_interrupted_launch_leaves_no_rsync_or_ssh_running(cluster_workspaces,
                                                              task_project, how, block):
    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    bindir = os.path.join(ws.root, "slow-ssh-bin")
    os.mkdir(bindir)
    wrapper = os.path.join(bindir, "ssh")
    with open(wrapper, "w") as f:
        f.write(SLOW_SSH.format(python=sys.executable, ssh=shutil.which("ssh")))
    os.chmod(wrapper, 0o755)
    launcher = write_launcher(os.path.join(ws.root, "launch"), {
        "title": ws.title, "project": task_project, "units": [slurm_unit()]})
    if block == "async with":
        with open(launcher, "w") as f:
            f.write(ASYNC_LAUNCHER)
    proc = lxm3_popen("launch", launcher, "--lxm_config", ws.write_config(),
                      env={"PATH": f"{bindir}:{os.environ['PATH']}"}, cwd=ws.root,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: List[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    needles = (bindir, ws.staging_path)
    try:
        deadline = time.monotonic() + OUTER_TIMEOUT
        # The copy is under way: the line before it was printed and rsync runs the slow ssh.
        while not (any(re.search(r": (sending|copying) ", line) for line in stderr)
                   and any("rsync" in cmd for cmd in processes_mentioning(wrapper).values())):
            assert proc.poll() is None, "".join(stderr)
            assert time.monotonic() < deadline, "".join(stderr)
            time.sleep(0.1)
        proc.send_signal(how)
        proc.wait(OUTER_TIMEOUT)
        reader.join(10)
        output = "".join(stderr)
        assert proc.returncode != 0, output
        assert "interrupted" in output, output
        assert "submitted to" not in output, output
        ws.assert_nothing_submitted(Launch(proc.returncode, "", output, None, ws.title, 0))
        deadline = time.monotonic() + 30
        while processes_mentioning(*needles) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_mentioning(*needles)
        assert left == {}, f"left running after the launch ended: {left}\n{output}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in processes_mentioning(*needles):  # what this test started, if it failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
