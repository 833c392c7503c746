"""A cluster workspace for tests of ``lxm3 status``/``logs``/``cancel``/``rerun``
on the test bed, reached over SSH, and readers of ``lxm3 status --json``.

A ``Workspace`` is one test's cluster: a config with a private staging
directory in the test user's home, a world-writable directory for the gate
files that hold tasks pending or running, and a cleanup that cancels the
test's jobs. Launches are real ``python -m lxm3 launch`` runs of
conftest.write_launcher's launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from cluster_helpers import scheduler_job_names

import lxm3

from conftest import lxm3_cli, new_record_id, read_record, record_files, status_json, write_launcher
from testbed_env import Testbed, require_testbed

EXECUTORS = {"slurm": "Slurm", "sge": "GridEngine", "pbs": "PBS"}
DEADLINE = 150  # seconds for jobs to start or end on a busy 2-core test bed


class Workspace:
    """One test's cluster: a config, a private staging directory in the test user's
    home, a world-writable directory for gates, and cleanup of its jobs."""

    def __init__(self, tb: Testbed, scheduler: str, project: str):
        self.tb, self.scheduler, self.project = tb, scheduler, project
        tag = uuid.uuid4().hex[:12]
        self.root = f"/tmp/lxm3-status-{scheduler}-{tag}"
        os.mkdir(self.root)
        os.chmod(self.root, 0o777)  # tasks run as the test user and look for gates here
        self.staging = f"lxm3-it/status-{scheduler}-{tag}"
        self.cluster = f"tb-{scheduler}"
        self.title = f"status {scheduler} {tag}"
        self.config = os.path.join(self.root, "lxm.toml")
        with open(self.config, "w") as f:
            f.write(self.config_text())
        self._launches = 0

    @property
    def executor(self) -> str:
        return EXECUTORS[self.scheduler]

    @property
    def staging_path(self) -> str:
        return os.path.join(self.tb.user_home, self.staging)

    def cluster_settings(self) -> Dict[str, Any]:
        pbs = self.scheduler == "pbs"  # its own host and sshd
        settings: Dict[str, Any] = {"name": self.cluster,
                                    "server": self.tb.pbs_ssh_host if pbs else self.tb.ssh_host,
                                    "user": self.tb.ssh_user}
        port = self.tb.pbs_ssh_port if pbs else self.tb.ssh_port
        if port != 22:
            settings["port"] = port
        if pbs:  # Grid Engine's qsub comes first on its PATH
            settings["pbs"] = {"bin_dir": self.tb.pbs_bin("")}
        return settings

    @property
    def server(self) -> str:
        return self.cluster_settings()["server"]

    def config_text(self) -> str:
        lines = ["[[clusters]]"]
        tables = {key: value for key, value in self.cluster_settings().items() if isinstance(value, dict)}
        for key, value in self.cluster_settings().items():
            if key not in tables:
                lines.append(f"{key} = {json.dumps(value)}")
        lines += ["[clusters.storage]", f"staging = {json.dumps(self.staging)}"]
        for name, table in tables.items():
            lines.append(f"[clusters.{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        return "\n".join(lines) + "\n"

    def config_object(self) -> lxm3.Config:
        return lxm3.Config.from_dict({"clusters": [
            {**self.cluster_settings(), "storage": {"staging": self.staging}}]})

    def gate(self, name: str) -> str:
        return os.path.join(self.root, f"gate-{name}")

    def open_gate(self, name: str) -> None:
        open(self.gate(name), "w").close()

    def unit(self, num_tasks: int = 1, env: Optional[Dict[str, str]] = None,
             **options: Any) -> Dict[str, Any]:
        return {"executor": self.executor, "args": [{"seed": i} for i in range(num_tasks)],
                "env_vars": [dict(env or {})], "options": options}

    def launch(self, units: List[Dict[str, Any]], *, dry_run: bool = False,
               env: Optional[Dict[str, str]] = None, expect_rc: int = 0):
        """Run ``lxm3 launch``; returns (process, record or None)."""
        self._launches += 1
        launcher = write_launcher(os.path.join(self.root, f"launch-{self._launches}"), {
            "title": self.title, "project": self.project, "units": units})
        before = record_files()
        proc = lxm3_cli("launch", *(["--dry-run"] if dry_run else []), launcher,
                        "--lxm_config", self.config, env=env, cwd=self.root)
        assert proc.returncode == expect_rc, (
            f"lxm3 launch exited {proc.returncode}\n{proc.stderr}\n{proc.stdout}")
        if dry_run:
            return proc, None
        return proc, read_record(new_record_id(before))

    # -- the scheduler's own view ---------------------------------------------

    def queued(self, job_ids: List[str]) -> Dict[str, str]:
        """{job id: state} of those jobs that are still queued or running."""
        if self.scheduler == "pbs":  # 1234[].server Name User Time S Queue (live jobs only)
            out = self.tb.ssh([self.tb.pbs_bin("qstat"), *job_ids], check=False, scheduler="pbs").stdout
            return {fields[0]: fields[4] for fields in map(str.split, out.splitlines())
                    if len(fields) > 4 and fields[0] in job_ids}
        if self.scheduler == "slurm":
            proc = self.tb.ssh(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%A %T"],
                               check=False)
            lines = proc.stdout.splitlines() if proc.returncode == 0 else []
            return dict(line.split(None, 1) for line in lines if line.strip())
        out = self.tb.ssh(["qstat", "-u", self.tb.ssh_user], check=False).stdout
        found: Dict[str, str] = {}
        for line in out.splitlines()[2:]:
            fields = line.split()
            if len(fields) > 4 and fields[0] in job_ids:
                found[fields[0]] = found.get(fields[0], "") + fields[4]
        return found

    def job_names(self) -> List[str]:
        return scheduler_job_names(self.tb, self.scheduler)

    def wait_gone(self, job_ids: List[str], timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while self.queued(job_ids):
            if time.monotonic() > deadline:
                pytest.fail(f"jobs {self.queued(job_ids)} still queued after {timeout} s")
            time.sleep(0.5)

    def cleanup(self) -> None:
        job_ids = []
        for name in record_files():
            try:
                record = read_record(name[:-5])
            except ValueError:
                continue
            job_ids += [a["job_id"] for u in record["work_units"] for a in u["arrays"]]
        if job_ids and self.scheduler == "pbs":
            self.tb.ssh([self.tb.pbs_bin("qdel"), *job_ids], check=False, scheduler="pbs")
        elif job_ids:
            command = "scancel" if self.scheduler == "slurm" else "qdel"
            self.tb.ssh([command, *job_ids], check=False)
            deadline = time.monotonic() + 30
            while self.queued(job_ids) and time.monotonic() < deadline:
                time.sleep(0.5)  # Grid Engine: let them go before their logs' directory
        self.tb.ssh(["rm", "-rf", "--", self.staging], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def workspaces(project: str) -> Iterator[Callable[[str], Workspace]]:
    """``make(scheduler)`` -> a Workspace of ``project`` (after require_testbed);
    every one made is cleaned up at the end."""
    made: List[Workspace] = []

    def make(scheduler: str) -> Workspace:
        ws = Workspace(require_testbed(scheduler), scheduler, project)
        made.append(ws)
        return ws

    try:
        yield make
    finally:
        for ws in made:
            ws.cleanup()


def job_ids(record: Dict[str, Any], work_unit_id: Optional[int] = None) -> List[str]:
    return [a["job_id"] for u in record["work_units"] for a in u["arrays"]
            if work_unit_id in (None, u["id"])]


def wait_status(xid: int, done, what: str, timeout: float = DEADLINE) -> Dict[str, Any]:
    """Poll ``lxm3 status --json`` until ``done(status)``."""
    deadline = time.monotonic() + timeout
    while True:
        status = status_json(xid)
        if done(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}: {status}")
        time.sleep(1)


def all_tasks(status: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [t for unit in status["work_units"].values() for t in unit["tasks"]]


def settled(status: Dict[str, Any]) -> bool:
    return all(t["state"] not in ("pending", "running") for t in all_tasks(status))


def task_job(scheduler: str, job_id: str, index: int) -> str:
    """How the scheduler names task ``index`` of array ``job_id`` (and lxm3 shows it)."""
    if scheduler == "pbs":
        return job_id.replace("[]", f"[{index}]")
    return f"{job_id}_{index}" if scheduler == "slurm" else f"{job_id}.{index + 1}"
