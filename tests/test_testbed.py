"""The test bed itself (tests/testbed/up.sh) works the way lxm3 will use it.

These tests prove the harness: they reach each scheduler exactly as lxm3 does,
by ssh as the unprivileged test user with host key checking on. Skipped when
the test bed is not running, failed instead when LXM3_REQUIRE_TESTBED=1.
"""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from testbed_env import Testbed, poll, require_testbed

pytestmark = pytest.mark.testbed


def test_ssh_as_test_user_with_strict_host_key_checking():
    tb = require_testbed("ssh")
    assert "StrictHostKeyChecking=yes" in tb.ssh_options()
    assert tb.ssh("id -un").stdout.strip() == tb.ssh_user

    # The host key really is checked: with no known_hosts at all, the same
    # connection is refused. (ssh keeps the first value given for an option,
    # so these come first.)
    no_known_hosts = ["-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"]
    proc = subprocess.run(
        ["ssh", *no_known_hosts, *tb.ssh_options(), tb.destination, "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 255, proc.stderr
    assert "Host key verification failed" in proc.stderr


def test_rsync_to_test_user():
    tb = require_testbed("ssh")
    with tempfile.TemporaryDirectory() as local, tb.remote_tempdir("rsync") as remote:
        src = Path(local, "payload.txt")
        src.write_text("payload for the test bed\n")
        rsh = shlex.join(["ssh", *tb.ssh_options()])
        subprocess.run(
            ["rsync", "-a", "-e", rsh, str(src), f"{tb.destination}:{remote}/"],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert tb.ssh(["cat", f"{remote}/payload.txt"]).stdout == src.read_text()


def _slurm_job_state(tb: Testbed, job_id: str) -> Optional[str]:
    """JobState of a job once it has finished (it stays known for MinJobAge s)."""
    out = tb.ssh(["scontrol", "show", "job", "-o", job_id]).stdout
    match = re.search(r"\bJobState=(\S+)", out)
    assert match, out
    state = match.group(1)
    active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED"}
    return None if state in active else state


def test_slurm_sbatch_wrap_through_ssh():
    tb = require_testbed("slurm")
    with tb.remote_tempdir("slurm") as remote:
        out = tb.ssh(
            ["sbatch", "--parsable", f"--chdir={remote}", "--output=out.txt",
             "--wrap", "echo hello from job $SLURM_JOB_ID"]
        ).stdout.strip()  # fmt: skip
        job_id = out.split(";")[0]  # --parsable prints "id" or "id;cluster"
        assert job_id.isdigit(), out
        state = poll(lambda: _slurm_job_state(tb, job_id), timeout=60, what=f"job {job_id}")
        assert state == "COMPLETED"
        assert tb.ssh(["cat", f"{remote}/out.txt"]).stdout == f"hello from job {job_id}\n"


def test_sge_qsub_terse_through_ssh():
    tb = require_testbed("sge")
    script = '#!/bin/bash\necho "hello from job $JOB_ID in $BASH"\n'
    with tb.remote_tempdir("sge") as remote:
        # -S /bin/bash: the queue ignores the #! line (it would run dash).
        out = tb.ssh(
            f"cd {shlex.quote(remote)} && cat > job.sh && "
            "qsub -terse -cwd -S /bin/bash -N probe -j y -o out.txt job.sh",
            input=script,
        ).stdout.strip()
        assert out.isdigit(), out
        job_id = out

        # A finished job leaves qstat: `qstat -j ID` then exits 1.
        def gone() -> Optional[bool]:
            return True if tb.ssh(["qstat", "-j", job_id], check=False).returncode else None

        poll(gone, timeout=60, what=f"SGE job {job_id} to finish")
        assert tb.ssh(["cat", f"{remote}/out.txt"]).stdout == (
            f"hello from job {job_id} in /bin/bash\n"
        )

        # Accounting is flushed at once, so qacct knows the job right away.
        def accounted() -> Optional[str]:
            proc = tb.ssh(["qacct", "-j", job_id], check=False)
            return proc.stdout if proc.returncode == 0 else None

        record = poll(accounted, timeout=30, what=f"qacct -j {job_id}")
        assert re.search(r"^exit_status\s+0\s*$", record, re.M), record


def test_slurm_limits_match_env_file():
    tb = require_testbed("slurm")
    config = tb.ssh(["scontrol", "show", "config"]).stdout
    max_array = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    min_job_age = re.search(r"^MinJobAge\s*=\s*(\d+)", config, re.M)
    assert max_array and min_job_age, config
    assert int(max_array.group(1)) == tb.slurm_max_array_size
    assert int(min_job_age.group(1)) == tb.slurm_min_job_age

    # The largest array index is MaxArraySize - 1. Held, then cancelled: nothing runs.
    n = tb.slurm_max_array_size
    sbatch = ["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap", "true"]
    job_id = tb.ssh([*sbatch, f"--array=0-{n - 1}"]).stdout.strip().split(";")[0]
    tb.ssh(["scancel", job_id])
    too_big = tb.ssh([*sbatch, f"--array=0-{n}"], check=False)
    assert too_big.returncode != 0
    assert "Invalid job array specification" in too_big.stderr


def test_sge_limits_match_env_file():
    tb = require_testbed("sge")
    config = tb.ssh(["qconf", "-sconf"]).stdout
    match = re.search(r"^max_aj_tasks\s+(\d+)", config, re.M)
    assert match, config
    assert int(match.group(1)) == tb.sge_max_aj_tasks

    # An array job may have max_aj_tasks tasks, not one more. Held, then deleted.
    n = tb.sge_max_aj_tasks
    qsub = ["qsub", "-terse", "-h", "-b", "y", "-o", "/dev/null", "-j", "y"]
    out = tb.ssh([*qsub, "-t", f"1-{n}", "true"]).stdout.strip()
    assert out.endswith(f".1-{n}:1"), out
    tb.ssh(["qdel", out.split(".")[0]])
    too_many = tb.ssh([*qsub, "-t", f"1-{n + 1}", "true"], check=False)
    assert too_many.returncode != 0
    assert f"more than {n} tasks" in too_many.stdout + too_many.stderr


# --- the test bed is a guest: its own clusters, reached through its own sshd ---

SHOW_ENV = 'for v in SLURM_CONF SGE_ROOT SGE_CELL SGE_QMASTER_PORT SGE_EXECD_PORT; do echo "$v=${!v}"; done'


def _env_lines(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_commands_and_login_shells_over_ssh_reach_the_test_beds_clusters():
    """What lxm3 runs there (``bash -s``), a login shell (``bash -l``, whose
    /etc/profile.d may name a site's cell) and ``sh -l`` (as Grid Engine starts
    jobs) all point at the test bed's clusters, and the schedulers answer as
    the test bed's."""
    tb = require_testbed("slurm")
    expected = tb.cluster_env()
    assert tb.ssh_port != 22 and expected["SLURM_CONF"] != "/etc/slurm/slurm.conf", expected
    assert _env_lines(tb.ssh("bash -s", input=SHOW_ENV + "\n").stdout) == expected
    assert _env_lines(tb.ssh(["bash", "-l", "-c", SHOW_ENV]).stdout) == expected
    sh_env = 'for v in SLURM_CONF SGE_ROOT SGE_CELL; do eval "echo $v=\\$$v"; done'
    got = _env_lines(tb.ssh(["sh", "-l", "-c", sh_env]).stdout)
    assert got == {k: expected[k] for k in ("SLURM_CONF", "SGE_ROOT", "SGE_CELL")}
    config = tb.ssh(["scontrol", "show", "config"]).stdout
    assert re.search(rf"^ClusterName\s*=\s*{tb.get('SLURM_CLUSTER')}$", config, re.M), config
    assert re.search(rf"^SLURM_CONF\s*=\s*{re.escape(expected['SLURM_CONF'])}$", config, re.M)


def test_grid_engine_jobs_run_in_the_test_beds_cell():
    """A job starts as a login shell, yet sees the test bed's SGE_ROOT and cell."""
    tb = require_testbed("sge")
    with tb.remote_tempdir("sge-env") as remote:
        out = tb.ssh(f"cd {shlex.quote(remote)} && qsub -terse -cwd -b y -N env -j y -o env.txt env"
                     ).stdout.strip()
        assert out.isdigit(), out

        def gone() -> Optional[bool]:
            return True if tb.ssh(["qstat", "-j", out], check=False).returncode else None

        poll(gone, timeout=60, what=f"SGE job {out} to finish")
        env = _env_lines(tb.ssh(["cat", f"{remote}/env.txt"]).stdout)
    assert env["SGE_ROOT"] == tb.cluster_env()["SGE_ROOT"], env
    assert env["SGE_CELL"] == tb.cluster_env()["SGE_CELL"], env


def test_local_commands_reach_the_test_bed_with_its_cluster_env():
    """Run here (as root), the schedulers' commands need ``cluster_env()``."""
    tb = require_testbed("sge")
    require_testbed("slurm")
    env = tb.local_env()
    config = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert re.search(rf"^MaxArraySize\s*=\s*{tb.slurm_max_array_size}$", config, re.M), config
    assert re.search(rf"^ClusterName\s*=\s*{tb.get('SLURM_CLUSTER')}$", config, re.M), config
    sconf = subprocess.run(["qconf", "-sconf"], env=env, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert re.search(rf"^max_aj_tasks\s+{tb.sge_max_aj_tasks}$", sconf, re.M), sconf


def test_the_sshd_log_is_the_test_beds_own():
    """The log the tests count logins in is written by the sshd they connect to."""
    tb = require_testbed("ssh")
    address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    proc = subprocess.run(["ssh", "-o", f"BindAddress={address}", *tb.ssh_options(),
                           tb.destination, "true"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    needle = f"Accepted publickey for {tb.ssh_user} from {address} port "

    def logged() -> Optional[bool]:
        with open(tb.sshd_log, errors="replace") as f:
            return True if needle in f.read() else None

    poll(logged, timeout=30, what=f"'{needle}' in {tb.sshd_log}")


# --- PBS: its own complex and sshd in a network namespace of its own ----------


def _pbs_job_state(tb: Testbed, job_id: str) -> Optional[str]:
    """job_state of a PBS job from ``qstat -x -f`` (history: finished jobs too)."""
    out = tb.ssh([tb.pbs_bin("qstat"), "-x", "-f", job_id], scheduler="pbs").stdout
    match = re.search(r"^\s*job_state = (\S+)", out, re.M)
    assert match, out
    return match.group(1)


def test_pbs_array_through_its_sshd_writes_one_log_per_subjob():
    """``qsub -J`` through the PBS sshd: job ids name the test bed's server,
    each subjob's output lands in its own file, and the finished array stays
    in the history (``qstat -x``). The job runs as the test user's login
    shell, which its ~/.profile must not break."""
    tb = require_testbed("pbs")
    with tb.remote_tempdir("pbs") as remote:
        script = 'echo "subjob $PBS_ARRAY_INDEX of $PBS_ARRAY_ID on $PBS_O_HOST"\n'
        job_id = tb.ssh(
            [tb.pbs_bin("qsub"), "-N", "tbarray", "-J", "0-2", "-j", "oe",
             "-o", f"{remote}/out.^array_index^"],
            input=script, scheduler="pbs",
        ).stdout.strip()  # fmt: skip
        assert re.fullmatch(rf"\d+\[\]\.{re.escape(tb.pbs_server)}", job_id), job_id
        poll(lambda: _pbs_job_state(tb, job_id) == "F" or None, timeout=120,
             what=f"PBS array {job_id} to finish")  # fmt: skip

        def outputs() -> Optional[list]:
            proc = tb.ssh(f"cat {shlex.quote(remote)}/out.[0-2]", check=False)
            lines = proc.stdout.splitlines()
            return lines if len(lines) == 3 else None

        # Output is copied back when each subjob ends, just after it finishes.
        lines = poll(outputs, timeout=60, what=f"the three output files of {job_id}")
        assert lines == [f"subjob {i} of {job_id} on {tb.pbs_server}" for i in range(3)]
        # The array and each subjob, in the history with their final states.
        history = tb.ssh([tb.pbs_bin("qstat"), "-x", "-t", "-f", job_id], scheduler="pbs").stdout
        states = dict(re.findall(r"^Job Id: (\S+)\n(?:.*\n)*?\s*job_state = (\S+)", history, re.M))
        assert states == {job_id: "F", **{job_id.replace("[]", f"[{i}]"): "F" for i in range(3)}}, (
            history
        )


def test_pbs_max_array_size_matches_env_file():
    tb = require_testbed("pbs")
    server = tb.ssh([tb.pbs_bin("qstat"), "-B", "-f"], scheduler="pbs").stdout
    match = re.search(r"^\s*max_array_size = (\d+)$", server, re.M)
    assert match, server
    assert int(match.group(1)) == tb.pbs_max_array_size

    # max_array_size subjobs are accepted, one more is not. Held, then deleted.
    n = tb.pbs_max_array_size
    qsub = [tb.pbs_bin("qsub"), "-h", "-o", "/dev/null", "-j", "oe"]
    job_id = tb.ssh([*qsub, "-J", f"0-{n - 1}", "--", "/bin/true"], scheduler="pbs").stdout.strip()
    assert job_id.endswith(f"[].{tb.pbs_server}"), job_id
    tb.ssh([tb.pbs_bin("qdel"), job_id], scheduler="pbs")
    too_big = tb.ssh([*qsub, "-J", f"0-{n}", "--", "/bin/true"], check=False, scheduler="pbs")
    assert too_big.returncode != 0
    assert "qsub: Array job exceeds server or queue size limit" in too_big.stderr


def test_pbs_commands_are_found_by_their_directory_not_on_path():
    """The PBS sshd's sessions use the test bed's pbs.conf, and its bin/ is
    not on their PATH: a plain ``qsub`` there is not PBS's (Grid Engine's on
    a machine with both), so lxm3 must be told where PBS lives."""
    tb = require_testbed("pbs")
    out = tb.ssh('echo "conf=$PBS_CONF_FILE"; echo "qsub=$(command -v qsub)"',
                 scheduler="pbs").stdout  # fmt: skip
    seen = _env_lines(out)
    assert seen["conf"] == tb.pbs_conf_file
    assert not seen["qsub"].startswith(tb.pbs_exec + "/"), seen
    assert tb.ssh(["test", "-x", tb.pbs_bin("qsub")], check=False, scheduler="pbs").returncode == 0
    if seen["qsub"] == "/usr/bin/qsub":
        # Grid Engine's qsub does not know PBS's -J.
        proc = tb.ssh(["qsub", "-J", "0-1", "--", "/bin/true"], check=False, scheduler="pbs")
        assert proc.returncode != 0


def test_pbs_sshd_checks_its_host_key():
    tb = require_testbed("pbs")
    assert tb.ssh("id -un", scheduler="pbs").stdout.strip() == tb.ssh_user
    no_known_hosts = ["-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"]
    proc = subprocess.run(
        ["ssh", *no_known_hosts, *tb.ssh_options("pbs"), tb.destination_for("pbs"), "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 255, proc.stderr
    assert "Host key verification failed" in proc.stderr
