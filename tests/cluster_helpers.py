"""Shared machinery of the Slurm and Grid Engine integration tests.

Every launch is a real ``python -m lxm3 launch LAUNCHER`` in a subprocess, in
one of two modes:

- ``ssh``: as the client user (root), with a config whose cluster has the
  test bed's ``server``, ``user`` and ``port`` (``localhost``, ``lxm3tb``,
  6922): lxm3 reaches the test bed through its sshd (strict host key
  checking, the client's own ssh config);
- ``login``: as the test user on this machine (``runuser -u lxm3tb``), with
  the system Python, a config without ``server`` and the test bed's cluster
  variables (SLURM_CONF, SGE_ROOT, ...): this machine is the login node,
  ``sbatch``/``qsub`` run locally. Grid Engine needs this mode or ssh,
  because it refuses jobs from root.

The launcher (``LAUNCHER`` below) is driven by a ``spec.json`` beside it and
writes what lxm3 reported about each work unit (arrays, job ids, log
directory) into ``result.json``. Tasks run ``echoapp.main`` (``TASK_MAIN``), a
program that writes what it received (argv, environment, start and end times)
as JSON to ``$ECHO_OUT/task-$LXM_TASK_ID.json``.

Each test gets a ``ClusterWorkspace`` from ``workspace_factory()`` (through the
``cluster_workspaces`` fixture of conftest.py): a world-writable directory under /tmp (tasks run as the test user), a unique
staging directory in the test user's home, and a teardown that cancels the
test's jobs that are still queued, then removes both.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import glob
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from conftest import AWKWARD, PYPROJECT, ROOT, write_files
from testbed_env import Testbed

SCHEDULERS = ("slurm", "sge", "pbs")
MODES = ("ssh", "login")
EXECUTOR_KINDS = {"slurm": "Slurm", "sge": "GridEngine", "pbs": "PBS"}
# PBS job ids are the array's whole id as qsub printed it: 1234[].server.
JOB_ID = r"\d+(?:\[\]\.[\w.-]+)?"


def is_job_id(job_id: str) -> bool:
    return re.fullmatch(JOB_ID, job_id) is not None


def job_number(job_id: str) -> str:
    """The digits that start a job id (PBS's 1234[].server: 1234)."""
    return re.match(r"\d+", job_id).group()
LOGIN_PYTHON = "/usr/bin/python3"
# Seconds for a launch's tasks to finish. They take a few seconds on an idle
# test bed; the margin is for other suites sharing its two CPUs and slots.
WAIT_TIMEOUT = 300

# The program every task runs: the echo program of conftest.ECHO_MAIN, plus an
# optional sleep ($ECHO_SLEEP), start and end times for overlap checks, a line
# on stdout naming the task (to find its log file), and an atomic write so a
# poller never reads half a report.
TASK_MAIN = """\
    import json, os, sys, time
    start = time.time()
    time.sleep(float(os.environ.get("ECHO_SLEEP") or 0))
    task = os.environ.get("LXM_TASK_ID")
    print("echo task=%s argv=%s" % (task, json.dumps(sys.argv[1:])), flush=True)
    report = {
        "argv": sys.argv[1:],
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "start": start,
        "end": time.time(),
    }
    out = os.environ.get("ECHO_OUT")
    if out:
        path = os.path.join(out, "task-%s.json" % task)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(path + ".tmp", path)
    sys.exit(int(os.environ.get("ECHO_EXIT", "0")))
"""

# The launcher every test runs; see the module docstring.
LAUNCHER = """\
    import json
    import os

    import lxm3
    from lxm3 import xm, xm_cluster

    HERE = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(HERE, "spec.json"), encoding="utf-8") as f:
        SPEC = json.load(f)

    transfers = []
    if SPEC.get("record_transfers"):
        # Bytes rsync sent in each deployment (Connection.bytes_sent grows by them).
        original_copy_tree = lxm3.Connection.copy_tree

        def copy_tree(self, local_dir, remote_dir):
            before = self.bytes_sent
            copied = original_copy_tree(self, local_dir, remote_dir)
            transfers.append(self.bytes_sent - before)
            return copied

        lxm3.Connection.copy_tree = copy_tree


    def make_executor(spec):
        spec = dict(spec)
        kind = spec.pop("kind")
        if "requirements" in spec:
            spec["requirements"] = xm.JobRequirements(**spec["requirements"])
        return getattr(xm_cluster, kind)(**spec)


    with xm_cluster.create_experiment(SPEC["title"]) as experiment:
        executables = {}
        for unit in SPEC["units"]:
            executor = make_executor(unit["executor"])
            kind = unit["executor"]["kind"]
            if kind not in executables:
                package = xm_cluster.PythonPackage(
                    path=SPEC["project"], entrypoint=xm_cluster.ModuleName("echoapp.main"))
                [executables[kind]] = experiment.package([xm.Packageable(
                    package, executor_spec=executor.Spec(),
                    args=SPEC["exe_args"], env_vars=SPEC["exe_env"])])
            exe = executables[kind]
            if unit["kind"] == "job":
                experiment.add(xm.Job(exe, executor, args=unit.get("args") or {},
                                      env_vars=unit.get("env_vars") or {}))
            else:
                experiment.add(xm_cluster.ArrayJob(exe, executor, args=unit.get("args") or [],
                                                   env_vars=unit.get("env_vars") or []))

    result = {
        "experiment_id": experiment.experiment_id,
        "transfers": transfers,
        "work_units": {
            str(wid): {
                "arrays": [[a.job_id, a.first_task, a.count]
                           for a in getattr(wu, "arrays", [])],
                "job_ids": list(getattr(wu, "job_ids", [])),
                "log_directory": getattr(wu, "log_directory", None),
                "job_directory": getattr(wu, "job_directory", None),
                "cluster": getattr(wu, "cluster", None),
            }
            for wid, wu in experiment.work_units.items()
        },
    }
    with open(os.path.join(HERE, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
"""


# --- small utilities -------------------------------------------------------


def toml_string(value: str) -> str:
    """A TOML basic string for any text (control characters escaped)."""
    out = ['"']
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def split_points(num_tasks: int, limit: int) -> List[Tuple[int, int]]:
    """Expected (first task, count) of each array for a sweep of ``num_tasks``."""
    return [(first, min(limit, num_tasks - first)) for first in range(0, num_tasks, limit)]


def array_limit(tb: Testbed, scheduler: str) -> int:
    return {"slurm": tb.slurm_max_array_size, "sge": tb.sge_max_aj_tasks,
            "pbs": tb.pbs_max_array_size}[scheduler]


def overlaps(reports: Dict[int, dict]) -> List[Tuple[int, int]]:
    """Pairs of tasks whose [start, end] intervals overlap."""
    spans = sorted((r["start"], r["end"], i) for i, r in reports.items())
    return [(a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]


def sshd_accepted_count(tb: Testbed, source: str, scheduler: str = "") -> int:
    """How many logins of the test user from ``source`` the test bed's sshd (PBS: its
    own sshd) accepted."""
    needle = f"Accepted publickey for {tb.ssh_user} from {source} port "
    with open(tb.pbs_sshd_log if scheduler == "pbs" else tb.sshd_log, errors="replace") as f:
        return sum(1 for line in f if needle in line)


def ssh_from_own_address(tmp_dir: str) -> Tuple[str, str]:
    """(PATH, address): an ``ssh`` first on PATH that connects from an address of
    its own in 127.0.0.0/8 (``BindAddress``), so that the sshd log tells this
    test's logins from those of anyone else using the test bed."""
    rng = random.Random()
    address = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    bindir = os.path.join(tmp_dir, "ssh-from-" + address)
    os.mkdir(bindir)
    real_ssh = shutil.which("ssh")
    assert real_ssh, "ssh is not installed"
    wrapper = os.path.join(bindir, "ssh")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {real_ssh} -o BindAddress={address} "$@"\n')
    os.chmod(wrapper, 0o755)
    os.chmod(bindir, 0o755)
    return f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}", address


# --- the projects tasks run -------------------------------------------------


def _write_project(root: str) -> str:
    # 192 KiB of random text (about 145 KiB compressed): an archive big enough
    # that sending it or not shows clearly in rsync's byte count.
    padding = base64.b64encode(os.urandom(144 * 1024)).decode()
    return write_files(root, {
        "pyproject.toml": PYPROJECT.format(name="echoapp"),
        "echoapp/__init__.py": "",
        "echoapp/main.py": TASK_MAIN,
        "echoapp/padding.py": f"DATA = {padding!r}\n",
    })  # fmt: skip


class Projects:
    """One echo project per mode for the session, so archives are built once.

    The ``login`` one belongs to the test user, because pip builds in the
    source tree and it runs as that user there.
    """

    def __init__(self) -> None:
        self._paths: Dict[str, str] = {}
        self._roots: List[str] = []

    def get(self, mode: str, user: str) -> str:
        """The project for ``mode``; in login mode owned by ``user``, the test user."""
        if mode not in self._paths:
            root = f"/tmp/lxm3-it-project-{mode}-{uuid.uuid4().hex[:10]}"
            os.mkdir(root)
            self._roots.append(root)
            path = _write_project(os.path.join(root, "echo_project"))
            if mode == "login":
                shutil.chown(root, user, user)
                for dirpath, dirnames, filenames in os.walk(root):
                    for name in dirnames + filenames:
                        shutil.chown(os.path.join(dirpath, name), user, user)
            os.chmod(root, 0o755)
            self._paths[mode] = path
        return self._paths[mode]

    def cleanup(self) -> None:
        for root in self._roots:
            shutil.rmtree(root, ignore_errors=True)


_PROJECTS = Projects()
atexit.register(_PROJECTS.cleanup)


# --- a launch and what it reported ------------------------------------------


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    result: Optional[dict]
    title: str
    seconds: float

    def describe(self) -> str:
        return (f"lxm3 exited {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stderr ---\n{self.stderr}\n--- stdout ---\n{self.stdout}")

    def check(self) -> Launch:
        assert self.returncode == 0 and self.result is not None, self.describe()
        return self

    @property
    def experiment_id(self) -> int:
        assert self.result is not None, self.describe()
        return self.result["experiment_id"]

    def unit(self, work_unit_id: int = 1) -> dict:
        assert self.result is not None, self.describe()
        return self.result["work_units"][str(work_unit_id)]

    def arrays(self, work_unit_id: int = 1) -> List[Tuple[str, int, int]]:
        return [tuple(a) for a in self.unit(work_unit_id)["arrays"]]

    def job_ids(self) -> List[str]:
        if not self.result:
            return []
        return [j for wu in self.result["work_units"].values() for j in wu["job_ids"]]


def executor(kind: str, **options: Any) -> Dict[str, Any]:
    """An executor for the spec: ``kind`` is ``"Slurm"`` or ``"GridEngine"``."""
    return {"kind": kind, **options}


def array_unit(executor_spec: Dict[str, Any], args: Sequence[Any] = (),
               env_vars: Sequence[Dict[str, str]] = ()) -> Dict[str, Any]:
    return {"kind": "array", "executor": executor_spec, "args": list(args),
            "env_vars": list(env_vars)}


def job_unit(executor_spec: Dict[str, Any], args: Any = None,
             env_vars: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    return {"kind": "job", "executor": executor_spec, "args": args, "env_vars": env_vars}


@dataclass
class ClusterWorkspace:
    """One test's directories, config and launches on one scheduler, in one mode."""

    tb: Testbed
    scheduler: str  # "slurm", "sge" or "pbs" (PBS: through its own sshd, or in its network namespace)
    mode: str  # "ssh" or "login"
    project: str
    root: str = ""
    staging: str = ""  # relative to the test user's home, as in the config
    job_ids: List[str] = field(default_factory=list)
    _launches: int = 0

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:12]
        self.root = f"/tmp/lxm3-it-{self.scheduler}-{self.mode}-{tag}"
        os.mkdir(self.root)
        os.chmod(self.root, 0o777)  # the launcher writes here as the test user
        self.staging = f"lxm3-it/{self.scheduler}-{self.mode}-{tag}"
        self.title = f"lxm3it {self.scheduler} {tag}"

    @property
    def executor_kind(self) -> str:
        return EXECUTOR_KINDS[self.scheduler]

    @property
    def cluster_name(self) -> str:
        return f"testbed-{self.mode}"

    @property
    def staging_path(self) -> str:
        """The staging directory as an absolute path (the test bed is this machine)."""
        return os.path.join(self.tb.user_home, self.staging)

    def executor(self, **options: Any) -> Dict[str, Any]:
        return executor(self.executor_kind, **options)

    def out_dir(self, name: str = "out") -> str:
        """A fresh directory the tasks (the test user) can write reports into."""
        path = os.path.join(self.root, name)
        os.mkdir(path)
        os.chmod(path, 0o777)
        return path

    # -- config and launch ---------------------------------------------------

    def write_config(self, *, env: Optional[Dict[str, str]] = None,
                     cluster: Optional[Dict[str, Any]] = None,
                     staging: Optional[str] = None, extra: str = "", pbs_bin_dir: bool = True) -> str:
        """The lxm3 config of this test: one cluster, SSH or login node by mode
        (PBS: with its ``bin_dir``, unless ``pbs_bin_dir`` is False)."""
        settings: Dict[str, Any] = {"name": self.cluster_name}
        if self.mode == "ssh" and self.scheduler == "pbs":
            settings.update(server=self.tb.pbs_ssh_host, user=self.tb.ssh_user)
            if self.tb.pbs_ssh_port != 22:
                settings["port"] = self.tb.pbs_ssh_port
        elif self.mode == "ssh":
            settings.update(server=self.tb.ssh_host, user=self.tb.ssh_user)
            if self.tb.ssh_port != 22:
                settings["port"] = self.tb.ssh_port
        settings.update(cluster or {})
        lines = ["[[clusters]]"]
        for key, value in settings.items():
            lines.append(f"{key} = {value if isinstance(value, int) else toml_string(value)}")
        lines += ["[clusters.storage]",
                  f"staging = {toml_string(staging if staging is not None else self.staging)}"]
        if env:
            lines.append("[clusters.env]")
            lines += [f"{key} = {toml_string(value)}" for key, value in env.items()]
        if self.scheduler == "pbs" and pbs_bin_dir:  # its qsub is not the PATH's (Grid Engine's is)
            lines += ["[clusters.pbs]", f"bin_dir = {toml_string(self.tb.pbs_bin(''))}"]
        path = os.path.join(self.root, f"lxm-{self._launches}.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n" + textwrap.dedent(extra))
        os.chmod(path, 0o644)
        return path

    def launch(self, units: Sequence[Dict[str, Any]], *, config: Optional[str] = None,
               exe_args: Optional[Dict[str, Any]] = None,
               exe_env: Optional[Dict[str, str]] = None, record_transfers: bool = False,
               path: Optional[str] = None, timeout: float = 300) -> Launch:
        """Run ``python -m lxm3 launch`` on a launcher adding ``units``."""
        argv, env, directory = self.launch_command(
            units, config=config, exe_args=exe_args, exe_env=exe_env,
            record_transfers=record_transfers, path=path)
        started = time.monotonic()
        proc = subprocess.run(argv, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        return self.launched(proc.returncode, proc.stdout, proc.stderr, directory,
                             time.monotonic() - started)

    def launched(self, returncode: int, stdout: str, stderr: str, directory: str,
                 seconds: float) -> Launch:
        """What a launch in ``directory`` reported; its jobs are cancelled at teardown."""
        result = None
        result_path = os.path.join(directory, "result.json")
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
        launch = Launch(returncode, stdout, stderr, result, self.title, seconds)
        # Everything this launch may have queued is cancelled at teardown:
        # what it reported, and job ids named in an error message.
        self.job_ids += launch.job_ids()
        self.job_ids += re.findall(rf"\(job ({JOB_ID})\)", stderr)
        return launch

    def launch_command(self, units: Sequence[Dict[str, Any]], *, config: Optional[str] = None,
                       exe_args: Optional[Dict[str, Any]] = None,
                       exe_env: Optional[Dict[str, str]] = None, record_transfers: bool = False,
                       path: Optional[str] = None) -> Tuple[List[str], Optional[Dict[str, str]], str]:
        """(argv, env, directory) of a launch of ``units``, to run as the test wishes."""
        self._launches += 1
        directory = os.path.join(self.root, f"launch-{self._launches}")
        os.mkdir(directory)
        os.chmod(directory, 0o777)
        config = config or self.write_config()
        spec = {
            "title": self.title,
            "project": self.project,
            "units": list(units),
            "exe_args": exe_args or {},
            "exe_env": exe_env or {},
            "record_transfers": record_transfers,
        }
        for name, text in (("spec.json", json.dumps(spec)),
                           ("launcher.py", textwrap.dedent(LAUNCHER))):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(directory, name), 0o644)
        launcher = os.path.join(directory, "launcher.py")
        command = ["-m", "lxm3", "launch", launcher, "--lxm_config", config]
        if self.mode == "ssh":
            argv = [sys.executable, *command]
            env = {**os.environ, "PYTHONPATH": ROOT}
            if path is not None:
                env["PATH"] = path
        else:
            # What the test user's login shell on the login node would have,
            # including the variables that point it at the test bed's clusters.
            user = self.tb.ssh_user
            env_vars = [f"HOME={self.tb.user_home}", f"USER={user}", f"LOGNAME={user}",
                        f"PATH={path or '/usr/local/bin:/usr/bin:/bin'}", "LANG=C.UTF-8",
                        f"PYTHONPATH={ROOT}"]
            env_vars += [f"{name}={value}" for name, value in self.tb.cluster_env().items()]
            argv = ["runuser", "-u", self.tb.ssh_user, "--", "env", "-i", *env_vars,
                    LOGIN_PYTHON, *command]
            if self.scheduler == "pbs":  # its login node is inside its network namespace
                argv[-len(command) - 1:-len(command) - 1] = [f"PBS_CONF_FILE={self.tb.pbs_conf_file}"]
                argv = ["ip", "netns", "exec", self.tb.get("PBS_NETNS"), *argv]
            env = None
        return argv, env, directory

    # -- the scheduler's view ------------------------------------------------

    def active_jobs(self, job_ids: Sequence[str]) -> Dict[str, str]:
        """{job id: state} of those jobs that are still queued or running."""
        if not job_ids:
            return {}
        if self.scheduler == "pbs":  # 1234[].server Name User Time S Queue (live jobs only)
            proc = self.tb.ssh([self.tb.pbs_bin("qstat"), *job_ids], check=False, scheduler="pbs")
            return {fields[0]: fields[4] for fields in map(str.split, proc.stdout.splitlines())
                    if len(fields) > 4 and fields[0] in job_ids}
        if self.scheduler == "slurm":
            proc = self.tb.ssh(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%A %T"],
                               check=False)
            lines = proc.stdout.splitlines() if proc.returncode == 0 else []
            return dict(line.split(None, 1) for line in lines if line.strip())
        proc = self.tb.ssh(["qstat", "-u", self.tb.ssh_user], check=False)
        states = {}
        for line in proc.stdout.splitlines()[2:]:
            fields = line.split()
            if len(fields) > 4 and fields[0] in job_ids:
                states[fields[0]] = states.get(fields[0], "") + fields[4]
        return states

    def job_info(self, job_id: str) -> str:
        """``scontrol show job ID``, ``qstat -j ID`` (pending/running SGE jobs only) or
        PBS's ``qstat -x -f ID``."""
        if self.scheduler == "pbs":
            return self.tb.ssh([self.tb.pbs_bin("qstat"), "-x", "-f", job_id], scheduler="pbs").stdout
        argv = (["scontrol", "show", "job", job_id] if self.scheduler == "slurm"
                else ["qstat", "-j", job_id])
        return self.tb.ssh(argv).stdout

    def queued_job_names(self) -> List[str]:
        return scheduler_job_names(self.tb, self.scheduler)

    def assert_nothing_submitted(self, launch: Launch) -> None:
        prefix = re.sub(r"\W", "_", self.title)
        mine = [name for name in self.queued_job_names() if name.startswith(prefix)]
        assert mine == [], f"jobs were submitted: {mine}\n{launch.describe()}"
        assert "submitted to" not in launch.stderr, launch.describe()

    def log_files(self, launch: Launch, work_unit_id: int = 1) -> Dict[str, str]:
        """{file name: content} of the work unit's log directory."""
        directory = launch.unit(work_unit_id)["log_directory"]
        files = {}
        for path in sorted(glob.glob(os.path.join(directory, "*"))):
            with open(path, errors="replace") as f:
                files[os.path.basename(path)] = f.read()
        return files

    def wait_for_reports(self, out_dir: str, count: int, launch: Launch,
                         timeout: float = WAIT_TIMEOUT) -> Dict[int, dict]:
        """Wait until tasks 0..count-1 have written their reports; fail early and
        with the logs when the jobs are gone (or in an error state) without them."""
        job_ids = launch.job_ids()
        deadline = time.monotonic() + timeout
        gone_since = None
        next_check = 0.0
        while True:
            reports = read_reports(out_dir)
            if len(reports) >= count:
                assert sorted(reports) == list(range(count)), sorted(reports)
                return reports
            now = time.monotonic()
            if now > deadline:
                self._fail_waiting(f"timed out after {timeout} s", out_dir, count, launch)
            if now >= next_check:
                next_check = now + 2
                active = self.active_jobs(job_ids)
                if self.scheduler == "sge" and any("E" in s for s in active.values()):
                    info = "\n".join(self.job_info(j) for j in active)
                    self._fail_waiting(f"a job is in an error state: {active}\n{info}",
                                       out_dir, count, launch)
                if active:
                    gone_since = None
                elif gone_since is None:
                    gone_since = now
                elif now - gone_since > 5:  # reports are written before a task ends
                    self._fail_waiting("the jobs ended", out_dir, count, launch)
            time.sleep(0.3)

    def _fail_waiting(self, why: str, out_dir: str, count: int, launch: Launch) -> None:
        have = sorted(read_reports(out_dir))
        logs = ""
        if launch.result:
            for wid in launch.result["work_units"]:
                for name, text in self.log_files(launch, int(wid)).items():
                    logs += f"\n--- {name} ---\n{text[-2000:]}"
        pytest.fail(f"{why}: {len(have)} of {count} task reports ({have})\n"
                    f"{launch.describe()}\nlogs:{logs or ' none'}")

    def cleanup(self) -> None:
        """Cancel this test's jobs that are still queued, then remove its directories."""
        ids = sorted(set(self.job_ids))
        if ids:
            if self.scheduler == "pbs":
                self.tb.ssh([self.tb.pbs_bin("qdel"), *ids], check=False, scheduler="pbs")
            else:
                command = ["scancel", *ids] if self.scheduler == "slurm" else ["qdel", *ids]
                self.tb.ssh(command, check=False)
            # Grid Engine leaves a job whose log directory vanished in Eqw:
            # let the cancelled jobs go before removing the staging directory.
            deadline = time.monotonic() + 30
            while self.active_jobs(ids) and time.monotonic() < deadline:
                time.sleep(0.5)
        self.tb.ssh(["rm", "-rf", "--", self.staging], check=False)
        shutil.rmtree(self.staging_path, ignore_errors=True)  # what the test user could not
        shutil.rmtree(self.root, ignore_errors=True)


def read_reports(out_dir: str) -> Dict[int, dict]:
    reports = {}
    for name in os.listdir(out_dir):
        match = re.fullmatch(r"task-(\d+)\.json", name)
        if match:
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                reports[int(match.group(1))] = json.load(f)
    return reports


@contextlib.contextmanager
def workspace_factory() -> Iterator[Callable[[Testbed, str, str], ClusterWorkspace]]:
    """``make(tb, scheduler, mode)`` -> a ClusterWorkspace, cleaned up on exit.

    Test modules wrap it in a fixture; a factory, so that the test body calls
    ``require_testbed`` first."""
    made: List[ClusterWorkspace] = []

    def make(tb: Testbed, scheduler: str, mode: str) -> ClusterWorkspace:
        workspace = ClusterWorkspace(tb, scheduler, mode, _PROJECTS.get(mode, tb.ssh_user))
        made.append(workspace)
        return workspace

    try:
        yield make
    finally:
        for workspace in made:
            workspace.cleanup()


def path_without(tmp_dir: str, *commands: str) -> str:
    """A PATH with every command of /usr/local/bin, /usr/bin and /bin but ``commands``.

    The directory is made in ``tmp_dir`` (readable by the test user)."""
    bindir = os.path.join(tmp_dir, "bin-without-" + "-".join(commands))
    os.mkdir(bindir)
    for source in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(source):
            continue
        for name in os.listdir(source):
            target = os.path.join(bindir, name)
            if name in commands or os.path.lexists(target):
                continue
            os.symlink(os.path.join(source, name), target)
    os.chmod(bindir, 0o755)
    return bindir


# --- scenarios both schedulers run ------------------------------------------
#
# Each takes a fresh ClusterWorkspace, launches, checks what the user sees,
# and returns what a scheduler-specific test may check further.


def task_log(ws: ClusterWorkspace, launch: Launch, work_unit_id: int,
             task_id: int) -> Tuple[str, str]:
    """(name, content) of the one log file holding the output of that task."""
    files = ws.log_files(launch, work_unit_id)
    marker = f"echo task={task_id} argv="
    found = [(name, text) for name, text in files.items() if marker in text]
    assert len(found) == 1, f"log files with {marker!r}: {[n for n, _ in found]} of {sorted(files)}"
    return found[0]


def check_logs(ws: ClusterWorkspace, launch: Launch, work_unit_id: int, num_tasks: int) -> None:
    """One log file per task in the log directory, named with its array's job id."""
    files = ws.log_files(launch, work_unit_id)
    assert len(files) == num_tasks, sorted(files)
    arrays = launch.arrays(work_unit_id)
    for task_id in range(num_tasks):
        job_id, first, _ = next(a for a in arrays if a[1] <= task_id < a[1] + a[2])
        name, _ = task_log(ws, launch, work_unit_id, task_id)
        assert re.search(rf"(?<!\d){job_number(job_id)}(?!\d)", name), (task_id, job_id, name)


def scheduler_index(ws: ClusterWorkspace, report: dict) -> Tuple[str, int]:
    """(array job id, lxm3 task id relative to that array) as the scheduler ran it."""
    env = report["env"]
    if ws.scheduler == "pbs":
        return env["PBS_ARRAY_ID"], int(env["PBS_ARRAY_INDEX"])
    if ws.scheduler == "slurm":
        return env["SLURM_ARRAY_JOB_ID"], int(env["SLURM_ARRAY_TASK_ID"])
    return env["JOB_ID"], int(env["SGE_TASK_ID"]) - 1


def scenario_single_jobs(ws: ClusterWorkspace) -> Launch:
    """Two xm.Jobs in one launch: each runs once with its own arguments."""
    outs = [ws.out_dir("wu1"), ws.out_dir("wu2")]
    executor_spec = ws.executor(walltime="0:10:00")
    job_args = [{"seed": 7, "name": "it's $HOME", "flag": True}, ["positional arg", "*", ""]]
    launch = ws.launch(
        [job_unit(executor_spec, args=job_args[0], env_vars={"ECHO_OUT": outs[0], "JOB": "one"}),
         job_unit(executor_spec, args=job_args[1], env_vars={"ECHO_OUT": outs[1], "JOB": "two"})],
        exe_args={"exe": "from the executable"},
        exe_env={"ECHO_OUT": "/nonexistent: the job's ECHO_OUT wins", "EXE_ENV": "e x e"},
    ).check()
    expected_argv = [["--exe=from the executable", "--seed=7", "--name=it's $HOME", "--flag"],
                     ["--exe=from the executable", "positional arg", "*", ""]]
    for wid, out in enumerate(outs, start=1):
        unit = launch.unit(wid)
        [(job_id, first, count)] = launch.arrays(wid)
        assert (first, count) == (0, 1) and is_job_id(job_id), unit
        assert unit["cluster"] == ws.cluster_name
        [report] = ws.wait_for_reports(out, 1, launch).values()
        assert report["argv"] == expected_argv[wid - 1]
        env = report["env"]
        assert env["JOB"] == ("one", "two")[wid - 1]
        assert env["EXE_ENV"] == "e x e"
        assert (env["LXM_TASK_ID"], env["LXM_NUM_TASKS"]) == ("0", "1")
        assert env["LXM_WORK_UNIT_ID"] == str(wid)
        assert env["LXM_EXPERIMENT_ID"] == str(launch.experiment_id)
        assert scheduler_index(ws, report) == (job_id, 0)
        # The launch says where each job went and where its logs are.
        assert re.search(rf"work unit {wid}: submitted to {ws.cluster_name} as job {re.escape(job_id)} ",
                         launch.stderr), launch.stderr
        assert unit["log_directory"] in launch.stderr
        check_logs(ws, launch, wid, 1)
    # The staging directory and what is in it are private to the user.
    st = os.stat(ws.staging_path)
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, pwd.getpwnam(ws.tb.ssh_user).pw_uid)
    for path in archive_files(ws):
        assert os.stat(path).st_mode & 0o077 == 0, oct(os.stat(path).st_mode)
    return launch


def scenario_custom_log_directory(ws: ClusterWorkspace) -> Launch:
    """``log_directory="~/..."``: created if missing, one file per task there."""
    out = ws.out_dir()
    log_dir = f"~/{ws.staging}/custom/logs"
    expected = os.path.join(ws.tb.user_home, ws.staging, "custom", "logs")
    launch = ws.launch([array_unit(ws.executor(log_directory=log_dir),
                                   args=[{"task": i} for i in range(2)])],
                       exe_env={"ECHO_OUT": out}).check()
    assert launch.unit()["log_directory"] == expected
    assert f"logs in {expected}" in launch.stderr, launch.stderr
    ws.wait_for_reports(out, 2, launch)
    check_logs(ws, launch, 1, 2)
    return launch


def sweep_task(i: int) -> Tuple[List[str], Dict[str, str]]:
    """Arguments and environment of task i of the byte-for-byte sweep."""
    shift = i * 5 % len(AWKWARD)
    args = [f"--index={i}", *AWKWARD[shift:], *AWKWARD[:shift]]
    env = {f"LXM_IT_AWK_{k}": value for k, value in enumerate(AWKWARD[shift:] + AWKWARD[:shift])}
    env["OVERRIDDEN"] = f"set by task {i}"
    return args, env


SWEEP_CONFIG_ENV = {
    "FROM_CONFIG": "config's \"value\" $HOME `id` *\n  second line\t✓",
    "OVERRIDDEN": "from the config",
    "EMPTY_FROM_CONFIG": "",
}


def scenario_sweep_byte_for_byte(ws: ClusterWorkspace, num_tasks: int = 3) -> Launch:
    """Every task's arguments and environment arrive exactly, awkward strings included."""
    out = ws.out_dir()
    tasks = [sweep_task(i) for i in range(num_tasks)]
    config = ws.write_config(env=SWEEP_CONFIG_ENV)
    launch = ws.launch(
        [array_unit(ws.executor(), args=[a for a, _ in tasks], env_vars=[e for _, e in tasks])],
        config=config, exe_args={"exe": "it's the executable's"}, exe_env={"ECHO_OUT": out},
    ).check()
    [(job_id, first, count)] = launch.arrays()
    assert (first, count) == (0, num_tasks)
    reports = ws.wait_for_reports(out, num_tasks, launch)
    for i, (args, env) in enumerate(tasks):
        report = reports[i]
        assert report["argv"] == ["--exe=it's the executable's", *args], i
        got = report["env"]
        for name, value in env.items():
            assert got.get(name) == value, (i, name)
        assert got["FROM_CONFIG"] == SWEEP_CONFIG_ENV["FROM_CONFIG"]
        assert got["EMPTY_FROM_CONFIG"] == ""
        assert got["OVERRIDDEN"] == f"set by task {i}"  # the job's value wins
        assert got["LXM_TASK_ID"] == str(i)
        assert got["LXM_NUM_TASKS"] == str(num_tasks)
        assert got["LXM_WORK_UNIT_ID"] == "1"
        assert got["LXM_EXPERIMENT_ID"] == str(launch.experiment_id)
        assert scheduler_index(ws, report) == (job_id, i)
    assert not os.path.exists("/tmp/lxm3-pwned")  # no value was evaluated by a shell
    check_logs(ws, launch, 1, num_tasks)
    return launch


def scenario_split_sweep(ws: ClusterWorkspace, num_tasks: int = 25) -> Launch:
    """A sweep above the array limit becomes several arrays; each task gets its own args."""
    limit = array_limit(ws.tb, ws.scheduler)
    assert num_tasks > 2 * limit, "the sweep should need at least three arrays"
    out = ws.out_dir()
    args = [{"task": i, "value": f"value {i}: it's"} for i in range(num_tasks)]
    env_vars = [{"TASK_VALUE": f"${{v}} {i}"} for i in range(num_tasks)]
    launch = ws.launch([array_unit(ws.executor(), args=args, env_vars=env_vars)],
                       exe_env={"ECHO_OUT": out}).check()
    arrays = launch.arrays()
    assert [(first, count) for _, first, count in arrays] == split_points(num_tasks, limit)
    job_ids = [job_id for job_id, _, _ in arrays]
    assert len(set(job_ids)) == len(arrays) and all(is_job_id(j) for j in job_ids), arrays
    for job_id, first, count in arrays:
        last = first + count - 1
        assert re.search(rf"\b{re.escape(job_id)} \(tasks {first}-{last}\)", launch.stderr), launch.stderr
    reports = ws.wait_for_reports(out, num_tasks, launch)
    for i in range(num_tasks):
        report = reports[i]
        assert report["argv"] == [f"--task={i}", f"--value=value {i}: it's"], i
        assert report["env"]["TASK_VALUE"] == f"${{v}} {i}"
        assert report["env"]["LXM_TASK_ID"] == str(i)
        assert report["env"]["LXM_NUM_TASKS"] == str(num_tasks)
        job_id, first, _ = next(a for a in arrays if a[1] <= i < a[1] + a[2])
        assert scheduler_index(ws, report) == (job_id, i - first), i
    check_logs(ws, launch, 1, num_tasks)
    return launch


def scenario_throttled(ws: ClusterWorkspace, num_tasks: int, max_parallel: int = 1,
                       sleep: float = 0.5) -> Tuple[Launch, str]:
    """Launch a throttled array; returns while it runs, so that the caller can read
    the scheduler's view of the throttle before ``finish_throttled`` waits for it."""
    out = ws.out_dir()
    launch = ws.launch(
        [array_unit(ws.executor(max_parallel_tasks=max_parallel),
                    args=[{"task": i} for i in range(num_tasks)])],
        exe_env={"ECHO_OUT": out, "ECHO_SLEEP": str(sleep)}).check()
    return launch, out


def finish_throttled(ws: ClusterWorkspace, launch: Launch, out: str,
                     num_tasks: int) -> Dict[int, dict]:
    reports = ws.wait_for_reports(out, num_tasks, launch)
    for i in range(num_tasks):
        assert reports[i]["argv"] == [f"--task={i}"]
    assert overlaps(reports) == [], {i: (r["start"], r["end"]) for i, r in reports.items()}
    return reports


def archive_files(ws: ClusterWorkspace) -> List[str]:
    return sorted(glob.glob(os.path.join(ws.staging_path, "archives", "*")))


def kill_kept_master() -> None:
    """SIGKILL the SSH master lxm3 kept for the next command, leaving its socket behind."""
    [socket] = glob.glob(os.path.join(os.environ["XDG_RUNTIME_DIR"], "lxm3", "ssh-*"))
    check = subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "check", "kept"],
                           capture_output=True, text=True)
    pid = int(re.search(r"pid=(\d+)", check.stderr).group(1))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert os.path.exists(socket), "the killed master should have left its socket"


def scenario_second_launch(ws: ClusterWorkspace) -> Tuple[Launch, Launch]:
    """A second launch of unchanged code reuses the archive already on the cluster,
    and (over SSH) the connection the first launch kept; a third, after that
    connection was killed, logs in again."""
    launches = []
    stats = []
    logins = []
    path, address = ssh_from_own_address(ws.root) if ws.mode == "ssh" else (None, "")
    if ws.mode == "ssh" and ws.scheduler == "pbs":
        # PBS's sshd is reached over a veth pair whose near end has one address:
        # logins are told apart by it, and by the tests running one at a time.
        host = ws.tb.pbs_ssh_host.rsplit(".", 1)
        path, address = None, f"{host[0]}.{int(host[1]) - 1}"
    for n in range(3):
        if n == 2 and ws.mode == "ssh":
            kill_kept_master()
        out = ws.out_dir(f"out{n}")
        before = sshd_accepted_count(ws.tb, address, ws.scheduler) if ws.mode == "ssh" else 0
        launch = ws.launch([job_unit(ws.executor(), args={"launch": n})],
                           exe_env={"ECHO_OUT": out}, record_transfers=True, path=path).check()
        logins.append(sshd_accepted_count(ws.tb, address, ws.scheduler) - before if ws.mode == "ssh" else None)
        [archive] = archive_files(ws)  # one content-addressed archive, not one per launch
        st = os.stat(archive)
        stats.append((archive, st.st_ino, st.st_mtime_ns, st.st_size))
        launches.append((launch, out))
    for n, (launch, out) in enumerate(launches):  # every job runs, all on the same archive
        [report] = ws.wait_for_reports(out, 1, launch).values()
        assert report["argv"] == [f"--launch={n}"]
    assert stats[1] == stats[0] == stats[2], "the archive on the cluster was replaced or rewritten"
    if ws.mode == "ssh":
        # One ssh connection (TCP login) for the first launch, not one per file
        # or command; none for the second, which finds it kept; one again once
        # it is gone. Counted in the sshd log, from this test's own address.
        assert logins == [1, 0, 1], f"sshd accepted {logins} logins for the three launches"
        size = stats[0][3]
        first, second, third = (sum(launch.result["transfers"]) for launch, _ in launches)
        assert first > size, (first, size)  # the first launch sent the archive...
        assert second < size // 4 and third < size // 4, (second, third, size)  # ...the others only job files
    return launches[0][0], launches[1][0]


# --- failures ------------------------------------------------------------------


def check_error(launch: Launch, *needles: str) -> str:
    """The launch failed with exit code 1 and one ``lxm3: error:`` message containing
    every needle, without a traceback."""
    assert launch.returncode == 1, launch.describe()
    assert "Traceback" not in launch.stderr, launch.describe()
    assert "lxm3: error:" in launch.stderr, launch.describe()
    message = launch.stderr[launch.stderr.index("lxm3: error:"):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error:\n{launch.describe()}"
    return message


def scenario_rejected(ws: ClusterWorkspace, executor_options: Dict[str, Any],
                      *needles: str) -> Launch:
    """The scheduler refuses the only work unit: its message is quoted, nothing submitted."""
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor(**executor_options))],
                       exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "20"})
    command = "sbatch" if ws.scheduler == "slurm" else "qsub"
    check_error(launch, command, *needles, "Nothing was submitted")
    ws.assert_nothing_submitted(launch)
    return launch


def scenario_half_failed(ws: ClusterWorkspace, bad_options: Dict[str, Any],
                         *needles: str) -> str:
    """Work unit 1 is accepted, work unit 2 rejected: the error names what was submitted,
    and that job really is queued."""
    out = ws.out_dir()
    launch = ws.launch(
        [job_unit(ws.executor(), args={"unit": 1}),
         job_unit(ws.executor(**bad_options), args={"unit": 2})],
        exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "60"})
    message = check_error(launch, "work unit 2", *needles, "Already submitted: work unit 1")
    match = re.search(rf"Already submitted: work unit 1 task 0 \(job ({JOB_ID})\)", message)
    assert match, launch.describe()
    job_id = match.group(1)
    assert job_id in ws.active_jobs([job_id]), f"job {job_id} is not in the queue"
    assert "work unit 2: submitted" not in launch.stderr, launch.describe()
    return job_id


def scenario_unwritable_archives(ws: ClusterWorkspace) -> Launch:
    """The transfer breaks: the staging directory's archives/ belongs to someone else
    (here root), so the archive cannot be written there."""
    ws.tb.ssh(["mkdir", "-p", "--", ws.staging])
    archives = os.path.join(ws.staging_path, "archives")
    os.mkdir(archives, 0o755)  # owned by root: the test user cannot write or chmod it
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor())], exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "20"})
    check_error(launch, "Permission denied", archives)
    ws.assert_nothing_submitted(launch)
    return launch


def scenario_forbidden_staging(ws: ClusterWorkspace) -> Launch:
    """A staging directory the user may not create: a clear error, nothing submitted."""
    config = ws.write_config(staging="/root/lxm3-forbidden/staging")
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor())], config=config,
                       exe_env={"ECHO_OUT": out, "ECHO_SLEEP": "20"})
    check_error(launch, "staging directory", "/root", "Permission denied")
    ws.assert_nothing_submitted(launch)
    return launch


def scheduler_job_names(tb, scheduler: str) -> List[str]:
    """Names of the test user's jobs the scheduler knows (Slurm, PBS: also recently ended)."""
    if scheduler == "pbs":  # the newest 40 (tests run one at a time; history keeps hundreds)
        ids = tb.ssh([tb.pbs_bin("qselect"), "-x", "-u", tb.ssh_user], scheduler="pbs").stdout.split()
        ids = sorted(ids, key=lambda job_id: int(job_number(job_id)))[-40:]
        if not ids:
            return []
        out = tb.ssh([tb.pbs_bin("qstat"), "-x", "-f", *ids], check=False, scheduler="pbs").stdout
        return re.findall(r"^    Job_Name = (.*)$", out, re.M)
    if scheduler == "slurm":
        out = tb.ssh(["squeue", "-h", "-u", tb.ssh_user, "-t", "all", "-o", "%j"]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    out = tb.ssh(["qstat", "-u", tb.ssh_user, "-r"]).stdout
    return [line.split(":", 1)[1].strip() for line in out.splitlines()
            if line.strip().startswith("Full jobname:")]
