"""``lxm3 clean``: what no experiment still needs goes, on the clusters and here.

On the test bed (Slurm and Grid Engine, over ssh): real launches, some aged
(``touch -d`` on the cluster, the record's ``created`` set back), and files an
experiment launched from another machine would leave (an experiment directory
without a record here, whose submission log names a queued job). The dry run
lists exactly what would go, with sizes, and removes nothing; the real run
removes it and keeps the recent, the referenced and what a queued or running
job uses. Locally: the cache of built archives, and the command line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from cluster_helpers import WAIT_TIMEOUT, ClusterWorkspace, _write_project, job_unit

import lxm3

from conftest import ROOT
from testbed_env import poll, require_testbed

DAY = 86400


def run_clean(*args: str, config: str = "", expect: int = 0) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "lxm3", "clean", *args] + (["--lxm_config", config] if config else [])
    result = subprocess.run(argv, env={**os.environ, "PYTHONPATH": ROOT}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def age_record(experiment_id: int, days: float) -> None:
    """Set the local record's creation time ``days`` back."""
    path = lxm3._record_path(experiment_id)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    when = time.time() - days * DAY
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def launch(ws: ClusterWorkspace, project: str, lxm_project: str, sleep: float, out: str):
    """One work unit of one task, in the given lxm3 project (``$LXM_PROJECT``)."""
    ws.project = project
    argv, env, directory = ws.launch_command([job_unit(ws.executor())], exe_env={"ECHO_OUT": out, "ECHO_SLEEP": str(sleep)})
    env = {**env, "LXM_PROJECT": lxm_project}
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    return ws.launched(proc.returncode, proc.stdout, proc.stderr, directory, time.monotonic() - started).check()


def row(output: str, action: str, path: str) -> str:
    """The line of the listing about ``path``, which must say ``action`` (remove/removed/keep)."""
    lines = [line for line in output.splitlines() if line.split()[2:3] == [path]]
    assert len(lines) == 1, f"{path}: {lines}\n{output}"
    assert lines[0].split()[0] == action, f"{path}: {lines[0]}\n{output}"
    return lines[0]


@pytest.mark.testbed
@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_clean_removes_what_no_experiment_needs_and_keeps_the_rest(cluster_workspaces, scheduler):
    tb = require_testbed(scheduler)
    ws = cluster_workspaces(tb, scheduler, "ssh")
    own_project = ws.project
    other_project = _write_project(os.path.join(ws.root, "other_project"))
    config = ws.write_config()
    # old: ended, its own archive; running: a job still running (or queued);
    # done: ended, shares the running one's archive.
    old = launch(ws, other_project, "alpha", 0, ws.out_dir("old"))
    running = launch(ws, own_project, "beta", 900, ws.out_dir("running"))
    done = launch(ws, own_project, "beta", 0, ws.out_dir("done"))
    ws.wait_for_reports(os.path.join(ws.root, "old"), 1, old)
    ws.wait_for_reports(os.path.join(ws.root, "done"), 1, done)
    poll(lambda: None if ws.active_jobs(old.job_ids() + done.job_ids()) else True, timeout=WAIT_TIMEOUT,
         what="the ended jobs to leave the queue")
    staging = os.path.dirname(os.path.dirname(os.path.dirname(old.unit()["job_directory"])))  # as the cluster says
    xdir = {name: f"{staging}/experiments/{launch.experiment_id}"
            for name, launch in (("old", old), ("running", running), ("done", done))}
    archive = {name: lxm3.load_record(launch.experiment_id).work_units[0].archive
               for name, launch in (("old", old), ("running", running))}
    assert archive["old"] != archive["running"]
    assert lxm3.load_record(done.experiment_id).work_units[0].archive == archive["running"]
    [held_job] = running.job_ids()
    # What experiments launched from another machine leave (no record here): 777
    # changed recently and names an image; 778 is old, but its job is queued.
    tb.ssh(["bash", "-c", f"""set -e; cd {ws.staging}
mkdir -p images experiments/777/wu1 experiments/778/wu1
head -c 3000 /dev/zero > archives/orphan-0000000000000000.zip
for name in old-1111 recent-2222 named-3333 held-4444; do head -c 2000 /dev/zero > images/$name.sif; done
echo "singularity exec $HOME/{ws.staging}/images/named-3333.sif" > experiments/777/wu1/job.sh
echo "singularity exec $HOME/{ws.staging}/images/held-4444.sif" > experiments/778/wu1/job.sh
echo "0-0 {held_job}" > experiments/778/submitted
touch -d '40 days ago' archives/orphan-0000000000000000.zip images/old-1111.sif images/named-3333.sif \
  images/held-4444.sif {archive['old']} {archive['running']}
for d in experiments/{old.experiment_id} experiments/{running.experiment_id} experiments/{done.experiment_id} \
    experiments/778; do find $d -exec touch -h -d '40 days ago' {{}} +; done
"""])
    for launched in (old, running, done):
        age_record(launched.experiment_id, 40)

    listed = run_clean("--days", "30", "--dry-run", config=config).stdout
    assert re.search(r"remove\s+job\s+" + re.escape(xdir["old"]) + r"\s+\d+ files\s+\d", listed), listed
    row(listed, "remove", xdir["done"])
    assert f"job {held_job} queued or running" in row(listed, "keep", xdir["running"])
    assert "job " + held_job in row(listed, "keep", f"{staging}/experiments/778")
    assert "changed" in row(listed, "keep", f"{staging}/experiments/777")
    assert re.search(r"remove\s+archive\s+" + re.escape(archive["old"]) + r"\s+1 files\s+\d+(\.\d)? KiB",
                     listed), listed
    assert "2.9 KiB" in row(listed, "remove", f"{staging}/archives/orphan-0000000000000000.zip")
    assert f"experiment {running.experiment_id} uses it" in row(listed, "keep", archive["running"])
    assert "2.0 KiB" in row(listed, "remove", f"{staging}/images/old-1111.sif")
    assert "younger than 30 days" in row(listed, "keep", f"{staging}/images/recent-2222.sif")
    assert "experiment 777 uses it" in row(listed, "keep", f"{staging}/images/named-3333.sif")
    assert "experiment 778 uses it" in row(listed, "keep", f"{staging}/images/held-4444.sif")
    assert re.search(r"total: would remove 5 items, \d", listed), listed  # + the local cache's, if any old
    for path in (xdir["old"], xdir["done"], archive["old"], f"{staging}/images/old-1111.sif"):
        assert os.path.exists(path), f"the dry run removed {path}"

    # --type selects; the 0.4.2 spellings.
    only = run_clean("--type", "container", "--dry_run", "--days", "30", config=config).stdout
    assert "images/old-1111.sif" in only and xdir["old"] not in only and "archives/" not in only, only
    run_clean("--type", "container", "--force", "--days", "30", config=config)
    assert not os.path.exists(f"{staging}/images/old-1111.sif") and os.path.isdir(xdir["old"])
    # --project: only that project's experiments, and what only they used.
    run_clean("--project", "alpha", "--force", "--days", "30", "--type", "job,archive", config=config)
    assert not os.path.exists(xdir["old"]) and not os.path.exists(archive["old"])
    assert os.path.isdir(xdir["done"]) and os.path.exists(f"{staging}/archives/orphan-0000000000000000.zip")
    # Everything else that may go.
    removed = run_clean("--days", "30", "--force", config=config).stdout
    assert not os.path.exists(xdir["done"]) and not os.path.exists(f"{staging}/archives/orphan-0000000000000000.zip")
    row(removed, "removed", xdir["done"])
    for kept in (xdir["running"], f"{staging}/experiments/777", f"{staging}/experiments/778", archive["running"],
                 f"{staging}/images/recent-2222.sif", f"{staging}/images/named-3333.sif",
                 f"{staging}/images/held-4444.sif"):
        assert os.path.exists(kept), f"{kept} was removed\n{removed}"
    logs = running.unit()["log_directory"]
    assert os.listdir(logs), "the running job's log went"  # its log directory and log stay
    assert ws.active_jobs([held_job]), "the held job should still be queued or running"
    # The record of a cleaned experiment stays; its logs are said to be cleaned.
    said = subprocess.run([sys.executable, "-m", "lxm3", "logs", str(done.experiment_id)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert said.returncode == 1 and f"the logs of experiment {done.experiment_id} work unit 1 were removed by " \
        f"lxm3 clean on " in said.stderr, said.stderr


@pytest.mark.testbed
def test_a_launch_during_the_clean_keeps_what_it_uses(cluster_workspaces):
    """Removal re-checks under the lock: an experiment directory changed since the
    listing stays, and an archive a job script written meanwhile names stays."""
    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    config = ws.write_config()
    cluster = lxm3.Config.from_file(config).clusters[0]
    tb.ssh(["bash", "-c", f"set -e; mkdir -p {ws.staging}; cd {ws.staging}; mkdir -p archives experiments/5/wu1 experiments/6/wu1; "
                          "head -c 100 /dev/zero > archives/a-1.zip; echo x > experiments/5/wu1/job.sh; "
                          "echo x > experiments/6/wu1/job.sh; "
                          "touch -d '40 days ago' archives/a-1.zip; "
                          "find experiments -exec touch -h -d '40 days ago' {} +"])
    connection = lxm3.Connection(cluster)
    try:
        listing = lxm3._list_cluster(cluster, connection, ["job", "archive"], list(lxm3.SCHEDULERS.values()))
        items = lxm3._plan_cluster(cluster, listing, [], ["job", "archive"], 30, None)
        doomed = [item for item in items if item.remove]
        assert sorted(item.name for item in doomed) == ["5", "6", "archives/a-1.zip"], items
        # Meanwhile a launch writes experiment 6's job again, and a new experiment naming the archive.
        tb.ssh(["bash", "-c", f"set -e; cd {ws.staging}; sleep 1; echo y > experiments/6/wu1/tasks; "
                              f"mkdir -p experiments/7/wu1; echo \"$HOME/{ws.staging}/archives/a-1.zip\" "
                              "> experiments/7/wu1/job.sh"])
        lxm3._remove_there(cluster, connection, listing, doomed)
    finally:
        connection.close()
    staging = listing.staging
    assert not os.path.exists(f"{staging}/experiments/5")
    assert os.path.isdir(f"{staging}/experiments/6") and os.path.exists(f"{staging}/archives/a-1.zip")
    why = {item.name: (item.remove, item.why) for item in doomed}
    assert why["6"] == (False, "changed since it was listed: kept") and why["5"][0] is True
    assert why["archives/a-1.zip"] == (False, "a job script written meanwhile names it")


# -- here: the archive cache and the command line ------------------------------------


def test_the_local_archive_cache_keeps_what_kept_records_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archives = tmp_path / "cache" / "lxm3" / "archives"
    archives.mkdir(parents=True)
    names = ["old-1.zip", "named-2.zip", "recent-3.zip", "project-4.zip"]
    for name in names:
        (archives / name).write_bytes(b"z" * 1500)
    key = tmp_path / "cache" / "lxm3" / "packages"
    key.mkdir()
    (key / "k.json").write_text(json.dumps({"path": str(archives / "old-1.zip"), "digest": "0"}))
    for name in ("old-1.zip", "named-2.zip", "project-4.zip"):
        os.utime(archives / name, (time.time() - 40 * DAY,) * 2)
    # A recent record names named-2 (on a cluster); an old one of project p, whose
    # local tasks have ended, names project-4.
    for xid, name, project, age in ((11, "named-2.zip", "q", 1), (12, "project-4.zip", "p", 40)):
        unit = lxm3.WorkUnitRecord(1, lxm3.UnitState.SUBMITTED, scheduler="slurm", cluster="far",
                                   archive=f"/s/archives/{name}", job_directory=f"/s/experiments/{xid}/wu1")
        if project == "p":
            unit = lxm3.WorkUnitRecord(1, lxm3.UnitState.COMPLETED, archive=str(archives / name))
        created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - age * DAY))
        lxm3.save_record(lxm3.ExperimentRecord(xid, "t", created, project=project, work_units=[unit]))
    listed = run_clean("--type", "archive", "--dry-run").stdout
    assert "1.5 KiB" in row(listed, "remove", str(archives / "old-1.zip"))
    assert "experiment 11 uses it" in row(listed, "keep", str(archives / "named-2.zip"))
    assert "built or used" in row(listed, "keep", str(archives / "recent-3.zip"))
    row(listed, "remove", str(archives / "project-4.zip"))
    assert "total: would remove 2 items, 2.9 KiB" in listed
    assert sorted(os.listdir(archives)) == sorted(names)
    run_clean("--type", "archive", "--project", "p", "--force")
    assert sorted(os.listdir(archives)) == ["named-2.zip", "old-1.zip", "recent-3.zip"]
    run_clean("--type", "archive", "--force")
    assert sorted(os.listdir(archives)) == ["named-2.zip", "recent-3.zip"]
    assert not (key / "k.json").exists(), "the cache key of a removed archive stays"


def test_lxm3_042_flags_parse_and_removal_asks_or_needs_force(tmp_path):
    for args in (["--project", "p", "--days", "1.5", "--dry_run", "--type", "job,archive,container"],
                 ["--dry-run", "--type", "env"], ["--force", "--days", "0", "--type", "archive"]):
        assert "total:" in run_clean(*args).stdout or "nothing to clean" in run_clean(*args).stdout
    refused = run_clean("--days", "1", expect=1)
    assert "only with --force (stdin is not a terminal): add --force" in refused.stderr
    wrong = run_clean("--type", "jobs", "--dry-run", expect=1)
    assert "--type jobs: the types are job, archive, container, env" in wrong.stderr
    helped = run_clean("--help").stdout
    assert "--dry_run" in helped and "--project PROJECT" in helped and "default: all" in helped


def answer_on_a_terminal(answer: bytes) -> str:
    """Run ``lxm3 clean --type archive`` on a pseudo-terminal and type ``answer``."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: lxm3 on the terminal
        os.environ["PYTHONPATH"] = ROOT
        os.execv(sys.executable, [sys.executable, "-m", "lxm3", "clean", "--type", "archive"])
    seen = b""
    while b"[y/N]" not in seen:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.write(fd, answer)
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child ended
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


def test_without_force_it_asks_once_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archives = tmp_path / "cache" / "lxm3" / "archives"
    archives.mkdir(parents=True)
    for name in ("a-1.zip", "b-2.zip"):
        (archives / name).write_bytes(b"z" * 100)
        os.utime(archives / name, (time.time() - 40 * DAY,) * 2)
    said = answer_on_a_terminal(b"n\n")
    assert said.count("[y/N]") == 1 and "remove 2 items (200 B) listed above?" in said, said
    assert "not confirmed" in said and sorted(os.listdir(archives)) == ["a-1.zip", "b-2.zip"]
    said = answer_on_a_terminal(b"y\n")
    assert said.count("[y/N]") == 1 and "removed 2 of 2" in said and os.listdir(archives) == [], said
