#!/usr/bin/env python3
"""Benchmark this lxm3 against lxm3 0.4.2 from PyPI, on the project's test bed.

    sudo python3 bench/bench.py            # full run, about 8-12 minutes
    sudo python3 bench/bench.py --quick    # fewer repetitions, about 4-7 minutes
    python3 bench/bench.py --only startup  # start-up alone, merged into the last results

Runs as root on the test-bed machine (tests/testbed/up.sh) and needs PyPI the
first time (lxm3 0.4.2 and its 37 dependencies go into a throwaway virtual
environment under bench/.work/, never into this project). Both tools launch the
same small Python package to the test bed's Slurm over SSH to localhost; runs
alternate (ours, theirs, theirs, ours, ...) and medians are reported with the
ratio ours/theirs. The results go to bench/RESULTS.md (and the raw samples to
bench/.work/results.json). See bench/README.md.

Standard library only, Python 3.9+.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import pwd
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, ".work")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
THEIR_VERSION = "0.4.2"
TITLE = {"ours": "lxm3bench_ours", "theirs": "lxm3bench_theirs"}
JOB_PREFIX = "lxm3bench_"  # every job this benchmark submits has a name starting with it
REMOTE_STAGING = "lxm3bench-staging"  # in the test user's home; removed at the end
BLOB_BYTES = 512 * 1024  # incompressible package data: makes "was the archive sent?" visible
SIDES = ("ours", "theirs")


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(argv: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.STDOUT)
    kwargs.setdefault("text", True)
    proc = subprocess.run(list(argv), **kwargs)
    if check and proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(shlex.quote, argv))} failed "
                         f"(exit {proc.returncode}):\n{proc.stdout or ''}{proc.stderr or ''}")
    return proc


def timed(argv: Sequence[str], **kwargs: Any) -> Tuple[float, int, Any]:
    """Run argv to completion: (wall seconds, exit code, the child's rusage)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.DEVNULL)
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), **kwargs)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, rusage


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def fmt_s(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def fmt_ms(value: Optional[float]) -> str:
    """Start-up times, whose differences are a few milliseconds."""
    return "-" if value is None else f"{value * 1000:.1f} ms"


def fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 1 << 20:
        return f"{value / (1 << 20):.2f} MiB"
    if value >= 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value:.0f} B"


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    if ours is None or not theirs:
        return None
    return ours / theirs


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


# ---------------------------------------------------------------------------
# the test bed
# ---------------------------------------------------------------------------

class Testbed:
    """What tests/testbed/up.sh wrote to /var/lib/lxm3-testbed/testbed.env, plus the sshd log."""

    def __init__(self) -> None:
        path = os.environ.get("LXM3_TESTBED_ENV", "/var/lib/lxm3-testbed/testbed.env")
        if not os.path.isfile(path):
            raise SystemExit(f"bench: {path} is missing: bring the test bed up first "
                             "(sudo bash tests/testbed/up.sh)")
        env = {}
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and not key.startswith("#"):
                    env[key] = value
        if env.get("LXM3_TESTBED_SLURM") != "1":
            raise SystemExit("bench: the test bed has no Slurm (LXM3_TESTBED_SLURM != 1)")
        self.env = env
        self.user = env["LXM3_TESTBED_SSH_USER"]
        self.host = env["LXM3_TESTBED_SSH_HOST"]
        self.port = int(env.get("LXM3_TESTBED_SSH_PORT", "22"))
        self.key = env["LXM3_TESTBED_SSH_KEY"]
        self.home = env["LXM3_TESTBED_USER_HOME"]
        self.max_array_size = int(env.get("LXM3_TESTBED_SLURM_MAX_ARRAY_SIZE", "0") or 0)
        # The test bed's own sshd logs there (tests/testbed/up.sh writes the path).
        self.sshd_log = env.get("LXM3_TESTBED_SSHD_LOG", "")
        if not self.sshd_log:
            raise SystemExit(f"bench: {path} names no LXM3_TESTBED_SSHD_LOG: bring the test bed "
                             "up again with tests/testbed/up.sh")

    def ssh(self, command: str, check: bool = True) -> str:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=10", "-p", str(self.port), "-i", self.key,
                f"{self.user}@{self.host}", command]
        return run(argv, check=check, stderr=subprocess.PIPE).stdout

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.sshd_log)
        except OSError:
            return 0

    def accepted_since(self, offset: int) -> List[int]:
        """Client ports of the 'Accepted publickey for <user>' lines written after offset."""
        try:
            with open(self.sshd_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return [int(p) for p in re.findall(
            rf"Accepted publickey for {re.escape(self.user)} from \S+ port (\d+)", text)]

    def cancel_ours(self) -> int:
        """scancel this benchmark's jobs (names starting with JOB_PREFIX) only; how many."""
        script = (f"ids=$(squeue -h -u {self.user} -o '%F %j' | "
                  f"awk '$2 ~ /^{JOB_PREFIX}/ {{print $1}}' | sort -u); "
                  "[ -z \"$ids\" ] || scancel $ids; echo $ids | wc -w")
        out = self.ssh(script, check=False).strip()
        return int(out) if out.isdigit() else 0

    def slurm_records(self) -> Tuple[int, int]:
        """(job records Slurm holds now, counting every array task, all users; MaxJobCount)."""
        out = self.ssh("squeue -h -r -t all | wc -l; scontrol show config | "
                       "awk '$1 == \"MaxJobCount\" {print $3}'", check=False).split()
        nums = [int(x) for x in out if x.isdigit()]
        return (nums[0], nums[1]) if len(nums) == 2 else (0, 10000)

    def wait_for_room(self, tasks: int, share: float = 0.4, timeout: float = 400) -> float:
        """Wait until `tasks` more job records keep Slurm under `share` of MaxJobCount.

        Cancelled array tasks stay in slurmctld for MinJobAge (90 s here) plus
        up to a minute; at MaxJobCount sbatch stalls for everyone on the test
        bed (other test runs included), so 1,000-task launches are paced.
        Returns the seconds waited (not part of any measurement)."""
        start = time.monotonic()
        announced = False
        while True:
            records, max_jobs = self.slurm_records()
            if records + tasks <= share * max_jobs or time.monotonic() - start > timeout:
                return time.monotonic() - start
            if not announced:
                log(f"  waiting for Slurm to purge cancelled jobs ({records} records, "
                    f"MaxJobCount {max_jobs}; keeping this benchmark under {share:.0%} of it)")
                announced = True
            time.sleep(5)

    def count_ours(self) -> int:
        out = self.ssh(f"squeue -h -u {self.user} -o '%F %j' | awk '$2 ~ /^{JOB_PREFIX}/ "
                       "{print $1}' | sort -u | wc -l", check=False).strip()
        return int(out) if out.isdigit() else -1


# ---------------------------------------------------------------------------
# set-up: two virtual environments, the benchmark project, configs, launchers
# ---------------------------------------------------------------------------

def base_python() -> str:
    return os.path.realpath(sys.executable)


def empty_dir() -> str:
    """A directory with nothing importable: the cwd of every start-up measurement
    (``python -c`` puts the cwd first on sys.path; the checkout has lxm3.py)."""
    path = os.path.join(WORK, "empty")
    os.makedirs(path, exist_ok=True)
    return path


def venv_dir(side: str) -> str:
    return os.path.join(WORK, f"venv-{side}")


def venv_bin(side: str, name: str) -> str:
    return os.path.join(venv_dir(side), "bin", name)


def venv_matches(side: str) -> bool:
    """The venv exists and runs the interpreter this script runs with."""
    python = venv_bin(side, "python")
    if not os.path.exists(python):
        return False
    proc = run([python, "-c", "import sys; print(sys.version)"], check=False, cwd=empty_dir())
    return proc.returncode == 0 and proc.stdout.strip() == sys.version.strip()


def create_venv(side: str) -> None:
    shutil.rmtree(venv_dir(side), ignore_errors=True)
    run([base_python(), "-m", "venv", venv_dir(side)])


def setup_theirs() -> str:
    """lxm3 0.4.2 from PyPI in its own venv (reused while it is intact)."""
    python = venv_bin("theirs", "python")
    probe = 'import importlib.metadata as m; print(m.version("lxm3"))'
    if venv_matches("theirs"):
        proc = run([python, "-c", probe], check=False, cwd=empty_dir())
        if proc.returncode == 0 and proc.stdout.strip() == THEIR_VERSION:
            return proc.stdout.strip()
    log(f"installing lxm3=={THEIR_VERSION} from PyPI into {venv_dir('theirs')}")
    create_venv("theirs")
    run([venv_bin("theirs", "pip"), "install", "--disable-pip-version-check", "--quiet",
         f"lxm3=={THEIR_VERSION}"])
    return run([python, "-c", probe], cwd=empty_dir()).stdout.strip()


def setup_ours() -> str:
    """This checkout, installed the way users get it (pip install of a copy of the tree)."""
    src = os.path.join(WORK, "ours-src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    for name in ("lxm3.py", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), src)
    shutil.copytree(os.path.join(ROOT, "xm"), os.path.join(src, "xm"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not venv_matches("ours"):
        create_venv("ours")
    log(f"installing this checkout into {venv_dir('ours')}")
    run([venv_bin("ours", "pip"), "install", "--disable-pip-version-check", "--quiet",
         "--no-deps", "--force-reinstall", src])
    return run([venv_bin("ours", "lxm3"), "version"], cwd=empty_dir()).stdout.strip()


PROJECT_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "benchpkg"
version = "0.1.0"
requires-python = ">=3.9"

[tool.setuptools]
packages = ["benchpkg"]

[tool.setuptools.package-data]
benchpkg = ["*.bin"]
"""

LAUNCHER_OURS = '''\
"""The benchmark sweep, written for this lxm3 (plain argparse launcher)."""
import argparse
import datetime

from lxm3 import xm, xm_cluster

parser = argparse.ArgumentParser()
parser.add_argument("--tasks", type=int, default=11)
parser.add_argument("--title", default="lxm3bench_ours")
args = parser.parse_args()

with xm_cluster.create_experiment(experiment_title=args.title) as experiment:
    # --hold: the tasks never start; the benchmark cancels them right after the launch
    executor = xm_cluster.Slurm(walltime=datetime.timedelta(minutes=10), extra_directives=["--hold"])
    spec = xm_cluster.PythonPackage(path=".", entrypoint=xm_cluster.ModuleName("benchpkg.noop"))
    [executable] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
    experiment.add(xm_cluster.ArrayJob(executable, executor,
                                       args=[{"seed": i} for i in range(args.tasks)]))
'''

LAUNCHER_THEIRS = '''\
"""The benchmark sweep, written the lxm3 0.4.2 way (absl flags, app.run(main))."""
import datetime

from absl import app
from absl import flags

from lxm3 import xm
from lxm3 import xm_cluster

_TASKS = flags.DEFINE_integer("tasks", 11, "number of tasks")
_TITLE = flags.DEFINE_string("title", "lxm3bench_theirs", "experiment title")


def main(_):
    with xm_cluster.create_experiment(experiment_title=_TITLE.value) as experiment:
        # --hold: the tasks never start; the benchmark cancels them right after the launch
        executor = xm_cluster.Slurm(walltime=datetime.timedelta(minutes=10),
                                    extra_directives=["--hold"])
        spec = xm_cluster.PythonPackage(path=".", entrypoint=xm_cluster.ModuleName("benchpkg.noop"))
        [executable] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm_cluster.ArrayJob(executable, executor,
                                           args=[{"seed": i} for i in range(_TASKS.value)]))


if __name__ == "__main__":
    app.run(main)
'''


def config_text(side: str, tb: Testbed) -> str:
    staging = f"{REMOTE_STAGING}/{side}"  # relative: in the test user's home, for both tools
    return f"""\
project = "lxm3bench"

[local]
[local.storage]
staging = "{os.path.join(WORK, 'local-staging', side)}"

[[clusters]]
name = "testbed"
server = "{tb.host}"
user = "{tb.user}"
{f'port = {tb.port}' if side == 'ours' and tb.port != 22 else ''}
ssh_private_key = "{tb.key}"
[clusters.storage]
staging = "{staging}"
"""


class Project:
    """The benchmark's Python project: a no-op module, a stamp file, 512 KiB of data."""

    def __init__(self, tb: Testbed) -> None:
        self.dir = os.path.join(WORK, "benchpkg")
        shutil.rmtree(self.dir, ignore_errors=True)
        pkg = os.path.join(self.dir, "benchpkg")
        os.makedirs(pkg)
        files = {
            "pyproject.toml": PROJECT_PYPROJECT,
            "benchpkg/__init__.py": '"""lxm3 benchmark package."""\n',
            "benchpkg/noop.py": '"""A task that does nothing."""\n',
            "launcher_ours.py": LAUNCHER_OURS,
            "launcher_theirs.py": LAUNCHER_THEIRS,
            "ours.toml": config_text("ours", tb),
            "theirs.toml": config_text("theirs", tb),
        }
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)
        with open(os.path.join(pkg, "data.bin"), "wb") as f:
            f.write(random.Random(7).randbytes(BLOB_BYTES))
        self.stamp_count = 0
        self.new_code()

    def new_code(self) -> None:
        """Change a source file: the next launch has new code (a new archive)."""
        self.stamp_count += 1
        with open(os.path.join(self.dir, "benchpkg", "_stamp.py"), "w") as f:
            f.write(f'STAMP = "{time.time_ns()}-{self.stamp_count}"\n')


def runtime_dir() -> str:
    path = os.path.join(WORK, "run")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def end_kept_connections() -> int:
    """End the SSH masters ours kept from earlier launches, so the next one logs in anew."""
    sockets = glob.glob(os.path.join(runtime_dir(), "lxm3", "ssh-*"))
    for socket in sockets:
        subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "kept"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return len(sockets)


def launch_env(side: str) -> Dict[str, str]:
    """The same environment for both tools: private XDG dirs, the tool's venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LXM_", "LXM3_", "XDG_", "VIRTUAL_ENV", "PYTHON"))}
    xdg = os.path.join(WORK, "xdg")
    env.update(
        PATH=os.path.join(venv_dir(side), "bin") + os.pathsep + env.get("PATH", "/usr/bin:/bin"),
        VIRTUAL_ENV=venv_dir(side),
        XDG_CACHE_HOME=os.path.join(xdg, "cache"),
        XDG_STATE_HOME=os.path.join(xdg, "state"),
        XDG_DATA_HOME=os.path.join(xdg, "data"),
        XDG_CONFIG_HOME=os.path.join(xdg, "config"),
        XDG_RUNTIME_DIR=runtime_dir(),  # where ours keeps its SSH connection between launches
        LC_ALL="C.UTF-8",
        COLUMNS="200",
    )
    return env


# ---------------------------------------------------------------------------
# SSH connections and bytes, from an strace of the launch
# ---------------------------------------------------------------------------

STRACE_SYSCALLS = "connect,write,writev,sendto,sendmsg"
_SOCKET_TO_SSH = re.compile(r"^(write|writev|sendto|sendmsg)\(\d+<TCP(?:v6)?:\[(\S+?):(\d+)->(\S+?):(\d+)\]>")
_CONNECT_22 = re.compile(r"^connect\(\d+<TCP(?:v6)?:\[\d*\]>, \{sa_family=AF_INET6?, sin6?_port=htons\((\d+)\)")
_RESULT = re.compile(r"= (-?\d+)(?: (\w+))?")


def parse_strace(prefix: str, port: int) -> Dict[str, Any]:
    """Connections opened to the sshd port and the bytes written to them, from strace -ff files."""
    connects, sent, ports = 0, 0, set()
    for path in glob.glob(prefix + ".*"):
        with open(path, errors="replace") as f:
            for line in f:
                m = _CONNECT_22.match(line)
                if m and int(m.group(1)) == port:
                    r = _RESULT.search(line[line.rfind(")"):])
                    if r and (r.group(1) == "0" or r.group(2) == "EINPROGRESS"):
                        connects += 1
                    continue
                m = _SOCKET_TO_SSH.match(line)
                if m and int(m.group(5)) == port:
                    r = _RESULT.search(line[line.rfind(")"):])
                    if r and int(r.group(1)) > 0:
                        sent += int(r.group(1))
                        ports.add(int(m.group(3)))
        os.unlink(path)
    return {"connects": connects, "bytes_sent": sent, "client_ports": sorted(ports)}


_EXECVE = re.compile(r'^(\d+\.\d+) execve\("([^"]*)", \[(.*?)\](?:, 0x[0-9a-f]+ /\* \d+ vars \*/)?\) = (-?\d+)')


def parse_timeline(prefix: str) -> Dict[str, Any]:
    """Successful execve()s of a launch, in ms from its start (strace -ttt -ff files)."""
    events, first, last = [], None, None
    for path in glob.glob(prefix + ".*"):
        with open(path, errors="replace") as f:
            for line in f:
                stamp = line.split(" ", 1)[0]
                try:
                    t = float(stamp)
                except ValueError:
                    continue
                last = t if last is None else max(last, t)
                m = _EXECVE.match(line)
                if m and m.group(4) == "0":
                    words = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(3))
                    events.append((t, words))
                    first = t if first is None else min(first, t)
        os.unlink(path)
    events.sort()
    rows = []
    for t, words in events:
        shown = [w for w in words if not w.startswith(("ControlPath=", "-o", "BatchMode"))]
        rows.append((round((t - first) * 1000), " ".join(shown)[:140]))
    return {"events": rows, "total_ms": round(((last or 0) - (first or 0)) * 1000)}


# ---------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------

class Launcher:
    def __init__(self, tb: Testbed, project: Project) -> None:
        self.tb = tb
        self.project = project
        self.count = 0
        self.waited = 0.0
        self.logs = os.path.join(WORK, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def argv(self, side: str, tasks: int, dry_run: bool = False) -> List[str]:
        cfg = os.path.join(self.project.dir, f"{side}.toml")
        if side == "ours":
            return [venv_bin("ours", "lxm3"), "launch", *(["--dry-run"] if dry_run else []),
                    "launcher_ours.py", f"--tasks={tasks}", "--lxm_config", cfg]
        return [venv_bin("theirs", "lxm3"), "launch", "launcher_theirs.py",
                f"--tasks={tasks}", f"--lxm_config={cfg}"]

    def launch(self, side: str, tasks: int, kind: str, trace: bool = False,
               new_code: Optional[bool] = None, timeline: bool = False) -> Dict[str, Any]:
        """One launch, timed; its jobs are cancelled afterwards (outside the timing).

        A cold launch changes the code first, unless new_code=False (the round
        already did, for both tools). Ours keeps its SSH connection for the next
        launch: "warm" uses the kept one; "cold" and "warm-new" start without."""
        self.count += 1
        if new_code if new_code is not None else kind == "cold":
            self.project.new_code()
        env = launch_env(side)
        if side == "ours" and kind in ("cold", "warm-new"):
            end_kept_connections()
            if trace or timeline:
                # strace -f waits for every traced process, and a kept master
                # lives on after the launch: end this one's with the launch.
                env["LXM3_SSH_KEEP"] = "0"
        elif side == "ours" and (trace or timeline) and not glob.glob(
                os.path.join(runtime_dir(), "lxm3", "ssh-*")):
            # A warm launch under strace must find a kept master, or it would
            # start one and strace would wait for it: an untraced launch keeps one.
            self.count += 1
            timed(self.argv(side, tasks), cwd=self.project.dir, env=launch_env(side),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.tb.cancel_ours()
        waited = self.tb.wait_for_room(tasks) if tasks > 100 else 0.0
        self.waited += waited
        argv = self.argv(side, tasks)
        trace_prefix = None
        if trace:
            trace_prefix = os.path.join(WORK, f"strace-{self.count}")
            argv = ["strace", "-f", "-ff", "--seccomp-bpf", "-yy", "-s", "0", "-qq",
                    "-e", f"trace={STRACE_SYSCALLS}", "-o", trace_prefix, *argv]
        elif timeline:
            trace_prefix = os.path.join(WORK, f"timeline-{self.count}")
            argv = ["strace", "-f", "-ff", "--seccomp-bpf", "-ttt", "-s", "200", "-qq",
                    "-e", "trace=execve", "-o", trace_prefix, *argv]
        suffix = "-strace" if trace else ("-timeline" if timeline else "")
        log_path = os.path.join(self.logs, f"{self.count:03d}-{side}-{tasks}-{kind}{suffix}.log")
        offset = self.tb.log_size()
        with open(log_path, "w") as out:
            out.write("$ " + " ".join(map(shlex.quote, argv)) + "\n")
            out.flush()
            wall, rc, rusage = timed(argv, cwd=self.project.dir, env=env,
                                     stdout=out, stderr=subprocess.STDOUT)
        accepted = self.tb.accepted_since(offset)
        arrays = self.tb.cancel_ours()
        result = {"side": side, "tasks": tasks, "kind": kind, "wall": wall, "rc": rc,
                  "cpu": rusage.ru_utime + rusage.ru_stime, "sshd_accepted_raw": len(accepted),
                  "arrays_cancelled": arrays, "log": os.path.relpath(log_path, ROOT)}
        if timeline:
            result["timeline"] = parse_timeline(trace_prefix)
        elif trace_prefix:
            st = parse_strace(trace_prefix, self.tb.port)
            st["sshd_accepted_matched"] = sum(1 for p in accepted if p in st["client_ports"])
            result.update(st)
        if rc != 0:
            with open(log_path, errors="replace") as f:
                tail = [ln.rstrip() for ln in f.readlines()[-60:]]
            interesting = [ln for ln in tail if re.search(r"error|Error|rror:|failed|Invalid", ln)]
            result["error"] = " | ".join((interesting or tail)[-3:])[:500]
        status = "ok" if rc == 0 else f"exit {rc}"
        extra = (f", {result['connects']} connection(s), {fmt_bytes(result['bytes_sent'])} sent"
                 if trace else "")
        log(f"  {side:6} {tasks:5} tasks {kind:4}: {fmt_s(wall)} ({status}, {arrays} array job(s) "
            f"cancelled{extra})")
        return result


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------

# Start-up is judged by what lxm3 adds to the interpreter's own start-up: starting
# Python with nothing to do (about 11 ms here) already takes more than a tenth of
# 0.4.2's `lxm3 version`, so a target on raw wall time could not be met by any
# Python program. Each command's bare interpreter (`python -c pass`, same
# interpreter and flags) runs interleaved with it, so both share the machine's noise.
STARTUP_TARGET = 0.05  # ours' cost above the interpreter <= 0.05 x 0.4.2's
# runs of each command (and as many of its bare interpreter) per tool, by --quick; odd,
# for medians. The differences judged are a few ms, so they get more runs than launches.
STARTUP_REPS = {False: 31, True: 11}
STARTUP_COMMANDS = {
    "lxm3 version": lambda side: [venv_bin(side, "lxm3"), "version"],
    "python -c 'import lxm3'": lambda side: [venv_bin(side, "python"), "-c", "import lxm3"],
    "python -c 'from lxm3 import xm, xm_cluster'":
        lambda side: [venv_bin(side, "python"), "-c", "from lxm3 import xm, xm_cluster"],
}


def bare_interpreter(argv: Sequence[str]) -> List[str]:
    """`python -c pass` with the interpreter and flags argv runs under: those before
    `-c` for a `python ... -c` command, the `#!` line's for a console script."""
    with open(argv[0], "rb") as f:
        first = f.readline(4096)
    if first.startswith(b"#!"):
        return [*shlex.split(first[2:].decode().strip()), "-c", "pass"]
    return [*argv[:list(argv).index("-c")], "-c", "pass"]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pytest_processes() -> int:
    """How many pytest runs (other agents' tests, on the shared test bed) are running now."""
    count = 0
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        count += any(os.path.basename(a) in (b"pytest", b"py.test") for a in args[:3])
    return count


GNU_TIME = "/usr/bin/time"


def peak_rss_kib(argv: Sequence[str], **kwargs: Any) -> Tuple[int, str]:
    """Peak RSS of a command in KiB, and how it was measured.

    Linux keeps a process's RSS high-water mark across fork and exec, so
    ru_maxrss of a child forked from this (20 MB) Python process is at least
    this process's RSS. GNU time forks the command from a small process and
    reports its ru_maxrss (%M); without it, the child's own ru_maxrss is used.
    """
    if os.access(GNU_TIME, os.X_OK):
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
            _, rc, _ = timed([GNU_TIME, "-f", "%M", "-o", out.name, *argv], **kwargs)
            text = out.read().strip().splitlines()
        if rc == 0 and text and text[-1].isdigit():
            return int(text[-1]), "GNU time %M"
    _, _, ru = timed(argv, **kwargs)
    return ru.ru_maxrss, "os.wait4 ru_maxrss (includes the benchmark's own RSS as a floor)"


def measure_startup(reps: int) -> Dict[str, Any]:
    """Each command and its bare interpreter, interleaved: wall times and peak RSS.

    Runs alternate between the tools (ours, theirs, theirs, ours, ...) and, every
    second round, between the command and the bare interpreter, so that the two
    medians subtracted in the report see the same machine noise."""
    log(f"start-up: {len(STARTUP_COMMANDS)} commands, each with its bare interpreter, "
        f"x {reps} alternating runs per tool (load average {loadavg()})")
    results: Dict[str, Any] = {"reps": reps, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "load": [loadavg()], "pytest_processes": [pytest_processes()],
                               "commands": {}, "interpreter_maxrss_kib": {}}
    opts = dict(env=None, cwd=empty_dir())
    for name, make in STARTUP_COMMANDS.items():
        samples = {s: {"argv": make(s), "interpreter_argv": bare_interpreter(make(s)),
                       "wall": [], "interpreter_wall": [], "maxrss_kib": []} for s in SIDES}
        for side in SIDES:  # warm-up: page cache, .pyc files
            opts["env"] = launch_env(side)
            for _ in range(2):
                timed(samples[side]["argv"], **opts)
                timed(samples[side]["interpreter_argv"], **opts)
        for i in range(reps):
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                opts["env"] = launch_env(side)
                pair = (("wall", "argv"), ("interpreter_wall", "interpreter_argv"))
                for key, which in (pair if (i // 2) % 2 == 0 else pair[::-1]):
                    wall, rc, _ = timed(samples[side][which], **opts)
                    if rc != 0:
                        raise SystemExit(f"bench: {samples[side][which]} failed (exit {rc})")
                    samples[side][key].append(wall)
        for i in range(max(3, reps // 5)):  # peak RSS, in runs of their own
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                kib, how = peak_rss_kib(samples[side]["argv"], env=launch_env(side), cwd=empty_dir())
                samples[side]["maxrss_kib"].append(kib)
                results["rss_method"] = how
        results["commands"][name] = samples
        results["load"].append(loadavg())
        results["pytest_processes"].append(pytest_processes())
        log(f"  {name}: ours {fmt_ms(above_interpreter(samples['ours']))} above the interpreter "
            f"({fmt_ms(median(samples['ours']['wall']))} in all), theirs "
            f"{fmt_ms(above_interpreter(samples['theirs']))} "
            f"({fmt_ms(median(samples['theirs']['wall']))}); load average {results['load'][-1]}")
    for side in SIDES:  # the interpreter alone, for the peak-RSS table
        argv = [venv_bin(side, "python"), "-c", "pass"]
        results["interpreter_maxrss_kib"][side] = [
            peak_rss_kib(argv, env=launch_env(side), cwd=empty_dir())[0] for _ in range(3)]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["revision"] = source_revision()
    results["python"] = f"{platform.python_version()} ({base_python()})"
    return results


def above_interpreter(side_samples: Dict[str, Any]) -> Optional[float]:
    """Median wall time of the command minus the median of its bare interpreter."""
    cmd, bare = median(side_samples["wall"]), median(side_samples["interpreter_wall"])
    return None if cmd is None or bare is None else cmd - bare


def count_modules(side: str, statement: str) -> Dict[str, Any]:
    """Modules and distributions an import statement loads (for the report)."""
    code = (f"import sys; before = set(sys.modules); {statement}; "
            "new = set(sys.modules) - before; "
            "print(len(new), len({m.split('.')[0] for m in new}))")
    out = run([venv_bin(side, "python"), "-c", code], env=launch_env(side),
              cwd=empty_dir()).stdout.split()
    dists = run([venv_bin(side, "python"), "-m", "pip", "list", "--format=freeze",
                 "--disable-pip-version-check"], env=launch_env(side), cwd=empty_dir()).stdout.split()
    size = 0
    for dirpath, _, filenames in os.walk(os.path.join(venv_dir(side), "lib")):
        for name in filenames:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return {"modules": int(out[0]), "top_level_packages": int(out[1]),
            "installed_distributions": len(dists), "venv_lib_bytes": size}


def measure_launches(launcher: Launcher, reps: int, reps1000: int, tb: Testbed) -> Dict[str, Any]:
    # 0.4.2 numbers array tasks 1..N and Slurm's largest index is MaxArraySize - 1
    small = (tb.max_array_size - 1) if tb.max_array_size else 10
    res: Dict[str, Any] = {"small_tasks": small, "runs": []}
    runs = res["runs"]

    log("launch warm-up (not measured): builds pip caches, ours' build environment, remote dirs")
    for side in SIDES:
        r = launcher.launch(side, small, "cold")
        if r["rc"] != 0:
            raise SystemExit(f"bench: the warm-up launch of {side} failed; see {r['log']}: "
                             f"{r.get('error')}")

    log(f"launch: {small}-task sweep, {reps} x (cold, warm) per tool, alternating")
    for i in range(reps):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        launcher.project.new_code()  # new code for this round: each tool's first launch is cold
        for side in order:
            runs.append(launcher.launch(side, small, "cold", new_code=False))
        for side in order:
            runs.append(launcher.launch(side, small, "warm"))
        runs.append(launcher.launch("ours", small, "warm-new"))

    log(f"launch: {small}-task sweep under strace (connections, bytes sent), once per tool and kind")
    for side in SIDES:
        runs.append(launcher.launch(side, small, "cold", trace=True))
        runs.append(launcher.launch(side, small, "warm", trace=True))
        if side == "ours":  # before the other tool's cold launch changes the code
            runs.append(launcher.launch("ours", small, "warm-new", trace=True))

    log(f"launch: 1000-task sweep, {reps1000} x (cold, warm) per tool, alternating; lxm3 "
        f"{THEIR_VERSION}'s fail at sbatch (array too large): their time is a lower bound")
    for i in range(reps1000):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        launcher.project.new_code()
        for side in order:
            runs.append(launcher.launch(side, 1000, "cold", new_code=False))
        for side in order:
            runs.append(launcher.launch(side, 1000, "warm"))
        runs.append(launcher.launch("ours", 1000, "warm-new"))
    runs.append(launcher.launch("ours", 1000, "cold", trace=True))
    runs.append(launcher.launch("ours", 1000, "warm", trace=True))
    runs.append(launcher.launch("ours", 1000, "warm-new", trace=True))
    runs.append(launcher.launch("theirs", 1000, "cold", trace=True))
    runs.append(launcher.launch("theirs", 1000, "warm", trace=True))
    log("launch: where the time goes (execve timeline under strace -e execve)")
    for side, tasks, kind in (("ours", small, "cold"), ("ours", small, "warm"),
                              ("theirs", small, "warm"), ("ours", 1000, "warm"),
                              ("ours", 1000, "warm-new")):
        r = launcher.launch(side, tasks, kind, timeline=True)
        r["kind"] = f"{kind}-timeline"
        runs.append(r)
    res["waited_for_slurm_purge_s"] = launcher.waited
    return res


def archive_size() -> Tuple[Optional[str], Optional[int]]:
    """Our newest archive of the benchmark project (in our private cache)."""
    paths = glob.glob(os.path.join(WORK, "xdg", "cache", "lxm3", "archives", "*.zip"))
    if not paths:
        return None, None
    newest = max(paths, key=os.path.getmtime)
    return newest, os.path.getsize(newest)


def their_archive_size(tb: Testbed) -> Optional[int]:
    paths = glob.glob(os.path.join(tb.home, REMOTE_STAGING, "theirs", "projects", "lxm3bench",
                                   "archives", "*.zip"))
    return os.path.getsize(max(paths, key=os.path.getmtime)) if paths else None


# -- per-task overhead ------------------------------------------------------

def _latest(pattern: str) -> Optional[str]:
    paths = glob.glob(pattern)
    return max(paths, key=os.path.getmtime) if paths else None


def _script_job(tb: Testbed, side: str, tasks: int) -> Optional[str]:
    """The newest job.sh of a launch of `tasks` tasks by `side` in the remote staging dir."""
    if side == "ours":
        pattern = os.path.join(tb.home, REMOTE_STAGING, "ours", "experiments", "*", "wu1", "job.sh")
    else:
        pattern = os.path.join(tb.home, REMOTE_STAGING, "theirs", "projects", "lxm3bench", "jobs",
                               "*", "job.sh")
    candidates = []
    for path in glob.glob(pattern):
        with open(path, errors="replace") as f:
            text = f.read()
        if side == "ours":
            n = re.search(r"^LXM_NUM_TASKS=(\d+)", text, re.M)
        else:
            n = re.search(r'^NUM_TASKS="(\d+)"', text, re.M)
        if n and int(n.group(1)) == tasks:
            candidates.append(path)
    return max(candidates, key=os.path.getmtime) if candidates else None


def _shebang_argv(script: str) -> List[str]:
    with open(script, errors="replace") as f:
        first = f.readline().strip()
    if not first.startswith("#!"):
        return ["/bin/sh", script]
    return [*first[2:].split(), script]


def measure_task_overhead(tb: Testbed, reps: int) -> Dict[str, Any]:
    """A no-op task through each job script vs. the program run directly, as the test user."""
    log(f"per-task overhead: {reps} alternating runs of each job script and of the program itself")
    user = pwd.getpwnam(tb.user)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": tb.user,
           "LOGNAME": tb.user, "SHELL": "/bin/bash", "LANG": "C.UTF-8",
           "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4242"}
    as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=user.pw_dir)
    archive, _ = archive_size()
    if archive is None:
        return {"error": "no archive of ours found"}
    direct_dir = tempfile.mkdtemp(prefix="lxm3bench-direct-")
    run(["unzip", "-q", archive, "-d", direct_dir])
    for dirpath, _, filenames in os.walk(direct_dir):
        os.chown(dirpath, user.pw_uid, user.pw_gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
    cases: Dict[str, Tuple[List[str], Dict[str, str], Dict[str, Any]]] = {}
    small = (tb.max_array_size - 1) if tb.max_array_size else 10
    task = small // 2  # a task in the middle of the small sweep
    cases[f"direct: python3 -m benchpkg.noop --seed={task}"] = (
        ["python3", "-m", "benchpkg.noop", f"--seed={task}"],
        {**env, "PYTHONPATH": direct_dir}, {**as_user, "cwd": direct_dir})
    scripts = {}
    for side in SIDES:
        for tasks, index in ((small, small // 2), (1000, 999)):
            script = _script_job(tb, side, tasks)
            if script is None:
                continue
            scripts[f"{side}-{tasks}"] = script
            if side == "ours":  # arrays of up to MaxArraySize tasks, $1 = the array's first task
                size = tb.max_array_size or tasks
                first = index - index % size
                argv = [*_shebang_argv(script), str(first)]
                task_env = {**env, "SLURM_ARRAY_TASK_ID": str(index - first)}
            else:  # 0.4.2: one array 1-N, LXM_TASK_ID = SLURM_ARRAY_TASK_ID - 1
                argv = _shebang_argv(script)
                task_env = {**env, "SLURM_ARRAY_TASK_ID": str(index + 1)}
            label = f"{side}: job script of a {tasks}-task work unit, task {index}"
            cases[label] = (argv, task_env, as_user)
    # check each once (exit code 0) before timing
    checks = {}
    for label, (argv, case_env, kwargs) in cases.items():
        proc = subprocess.run(argv, env=case_env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", **kwargs)
        checks[label] = proc.returncode
        if proc.returncode != 0:
            log(f"  {label}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}")
    samples: Dict[str, List[float]] = {label: [] for label in cases}
    labels = [label for label in cases if checks[label] == 0]
    for i in range(reps):
        for label in (labels if i % 2 == 0 else labels[::-1]):
            argv, case_env, kwargs = cases[label]
            wall, rc, _ = timed(argv, env=case_env, **kwargs)
            samples[label].append(wall)
    shutil.rmtree(direct_dir, ignore_errors=True)
    for label in labels:
        log(f"  {label}: {fmt_s(median(samples[label]))}")
    return {"samples": samples, "exit_codes": checks, "scripts": scripts}


# -- scale ------------------------------------------------------------------

SCALE_HELPER = r'''
"""Prepare a 100,000-task sweep in-process with every cluster call faked.

probe_cluster answers like the test bed (MaxArraySize from argv), rsync and the
submission script are not run (the script is parsed and each array gets a fake
job id), so what is timed is packaging (cached), experiment.add, the job script,
the tasks file, splitting into arrays, the submission script and the record.
"""
import cProfile, json, os, pstats, re, sys, time
import lxm3

tasks, limit, launcher, config, profile_to = sys.argv[1:6]
phases = {}

def timer(name, fn):
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    return wrapped

home = "/home/lxm3test"
lxm3.probe_cluster = lambda connection, scheduler: lxm3.ClusterInfo(
    staging=home + "/lxm3bench-staging/ours", home=home, max_array_size=int(limit))
lxm3.Connection.open = lambda self: None
lxm3.Connection.close = lambda self: None
tree_bytes = {}
def copy_tree(self, local_dir, remote_dir):
    total = 0
    for d, _, files in os.walk(local_dir):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    tree_bytes["job_files"] = total
    return []
lxm3.Connection.copy_tree = timer("copy_tree (fake: sums the job files)", copy_tree)
def run_script(self, script, what):
    out = []
    # Every "lxm_submit KEY ..." call (several to a line when arrays are chained).
    for n, key in enumerate(re.findall(r"lxm_submit (\d+:\d+) ", script)):
        out.append(f"OK {key} {1000000 + n}")
    # The staged-file check: every archive is there and good.
    out += [f"ok {n}" for n in re.findall(r"^check (\d+) ", script, re.M)]
    return "\n".join(out) + "\n"
lxm3.Connection.run_script = timer("run_script (fake sbatch)", run_script)
for name in ("build_archive", "prepare_cluster_launch", "submission_script",
             "parse_submission_output", "save_record"):
    setattr(lxm3, name, timer(name, getattr(lxm3, name)))
lxm3.ClusterExperiment.add = timer("experiment.add", lxm3.ClusterExperiment.add)
argv = ["launch", launcher, f"--tasks={tasks}", "--lxm_config", config]
start = time.perf_counter()
if profile_to != "-":
    prof = cProfile.Profile()
    rc = prof.runcall(lxm3.main, argv)
else:
    rc = lxm3.main(argv)
total = time.perf_counter() - start
if profile_to != "-":
    with open(profile_to, "w") as f:
        pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(30)
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(20)
records = sorted(os.listdir(lxm3.state_dir() + "/experiments"))
record = lxm3.state_dir() + "/experiments/" + records[-1]
print(json.dumps({"rc": rc, "total": total, "phases": phases, "tree_bytes": tree_bytes,
                  "record_bytes": os.path.getsize(record)}))
'''


def measure_scale(launcher: Launcher, tb: Testbed, reps: int) -> Dict[str, Any]:
    n = 100_000
    limit = tb.max_array_size or 11
    res: Dict[str, Any] = {"tasks": n, "limit": limit, "dry_run": [], "inproc": [],
                           "max_job_count": tb.slurm_records()[1]}
    log(f"scale: {n}-task sweep prepared by ours ({reps} x dry run, {reps} x in-process "
        f"with arrays split by {limit})")
    env = launch_env("ours")
    # packaging is cached: the last launch built the current code
    for _ in range(reps):
        argv = launcher.argv("ours", n, dry_run=True)
        log_path = os.path.join(launcher.logs, f"scale-dry-run-{len(res['dry_run'])}.log")
        with open(log_path, "w") as out:
            wall, rc, ru = timed(argv, cwd=launcher.project.dir, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
        with open(log_path, errors="replace") as f:
            text = f.read()
        m = re.search(r"job scripts are written to (\S+?);", text)
        dry_dir = m.group(1) if m else None
        size = 0
        if dry_dir and os.path.isdir(dry_dir):
            for dirpath, _, files in os.walk(dry_dir):
                for name in files:
                    p = os.path.join(dirpath, name)
                    if not os.path.islink(p):
                        size += os.path.getsize(p)
            shutil.rmtree(dry_dir, ignore_errors=True)
        res["dry_run"].append({"wall": wall, "rc": rc,
                               "written_bytes": size, "arrays_printed": text.count("sbatch --parsable")})
        log(f"  dry run: {fmt_s(wall)} (exit {rc}, {fmt_bytes(size)} written)")
    helper = os.path.join(WORK, "scale_helper.py")
    with open(helper, "w") as f:
        f.write(SCALE_HELPER)
    cfg = os.path.join(launcher.project.dir, "ours.toml")

    def inproc(profile_to: str) -> Dict[str, Any]:
        proc = run([venv_bin("ours", "python"), helper, str(n), str(limit), "launcher_ours.py", cfg,
                    profile_to], cwd=launcher.project.dir, env=env, stderr=subprocess.PIPE,
                   check=False)
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"rc": proc.returncode, "error": (proc.stderr or "")[-500:]}

    for _ in range(reps):
        r = inproc("-")
        res["inproc"].append(r)
        log(f"  in-process: {fmt_s(r.get('total'))} (exit {r.get('rc')})")
    profile = os.path.join(WORK, "scale-profile.txt")
    inproc(profile)
    res["profile"] = os.path.relpath(profile, ROOT)
    # drop the in-process runs' records: nothing was launched
    return res


# ---------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------

def machine(tb: Testbed) -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            models = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        info["CPU"] = models[0] if models else platform.processor()
    except OSError:
        info["CPU"] = platform.processor()
    info["Cores (os.cpu_count)"] = str(os.cpu_count())
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        info["Memory"] = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, AttributeError):
        pass
    try:
        with open("/etc/os-release") as f:
            info["OS"] = re.search(r'^PRETTY_NAME="?([^"\n]+)', f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    info["Kernel"] = platform.release()
    info["Python (both venvs)"] = f"{platform.python_version()} ({base_python()})"
    info["Slurm"] = run(["sinfo", "--version"], check=False).stdout.strip() or "?"
    info["OpenSSH"] = run(["ssh", "-V"], check=False).stdout.strip() or "?"
    info["rsync"] = (run(["rsync", "--version"], check=False).stdout.splitlines() or ["?"])[0]
    info["pip"] = run([venv_bin("ours", "pip"), "--version", "--disable-pip-version-check"],
                      check=False).stdout.split(" from ")[0]
    info["Test bed"] = (f"{tb.user}@{tb.host}:{tb.port}, Slurm MaxArraySize="
                        f"{tb.env.get('LXM3_TESTBED_SLURM_MAX_ARRAY_SIZE')}, "
                        f"{tb.env.get('LXM3_TESTBED_SLURM_CPUS')} CPUs")
    with open("/proc/loadavg") as f:
        info["Load average at start"] = " ".join(f.read().split()[:3])
    return info


def source_revision() -> str:
    head = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--", "lxm3.py", "xm"],
                check=False).stdout.strip()
    return f"{head or '?'}{' + uncommitted changes to lxm3.py/xm' if dirty else ''}"


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def _runs(res: Dict[str, Any], side: str, tasks: int, kind: str, traced: bool = False) -> List[Dict]:
    return [r for r in res["runs"] if r["side"] == side and r["tasks"] == tasks
            and r["kind"] == kind and ("connects" in r) == traced]


def _walls(runs: List[Dict]) -> List[float]:
    return [r["wall"] for r in runs if r["rc"] == 0]


def _their_1000(runs: List[Dict]) -> List[float]:
    """0.4.2's 1,000-task launches that got as far as the (rejected) sbatch."""
    return [r["wall"] for r in runs if "Invalid job array" in r.get("error", "")]


# (our kind, target ratio, 0.4.2's runs to compare with): 0.4.2 opens new
# connections every time, so its warm launch is the match for both of ours.
KEPT_BYTES = "(sent by the kept master, outside the traced launch: see warm-new)"
LAUNCH_KINDS = (("cold", 0.5, "cold"), ("warm", 0.2, "warm"), ("warm-new", 0.2, "warm"))
KIND_LABELS = {
    "cold": "cold launch (new code, new connection)",
    "warm": "warm launch (same code, SSH connection kept from the last launch)",
    "warm-new": "warm launch, new connection (same code, first launch in 5 min)",
}


def startup_rerun_line(data: Dict[str, Any]) -> str:
    st = data["startup"]
    return (f"{STARTUP_RERUN} {st['finished'][:16]} with checkout {st['revision']} (`python3 bench/bench.py "
            "--only startup`); the other sections are from the run above.\n")


STARTUP_RERUN = "The start-up section was measured again on"


def startup_section(data: Dict[str, Any]) -> Tuple[List[str], List[Tuple[str, str, str, str]]]:
    """The start-up section of RESULTS.md and its target lines."""
    st = data["startup"]
    cmds = st["commands"]
    out: List[str] = []
    targets: List[Tuple[str, str, str, str]] = []
    w = out.append
    version = cmds["lxm3 version"]
    bare = median(version["theirs"]["interpreter_wall"])
    w("## Start-up\n")
    tenth = 0.1 * median(version["theirs"]["wall"])
    w("Judged by the cost **above the bare interpreter**: a command's median wall time minus the "
      "median wall time of `python -c pass` run with the same interpreter and flags (for "
      "`lxm3 version`, those of the console script's `#!` line). Starting the interpreter with "
      f"nothing to do takes {fmt_ms(bare)} here, and a tenth of 0.4.2's whole `lxm3 version` is "
      f"{fmt_ms(tenth)}: " + ("no Python program could meet a target on raw wall time, so "
                             if bare >= tenth else "a target on raw wall time would mostly "
                             "measure the interpreter, so ") +
      "what lxm3 adds to the interpreter is what is judged. Target: ours' cost above the "
      f"interpreter <= {STARTUP_TARGET} x 0.4.2's.\n")
    w("Wall time from fork to exit (`time.perf_counter` around `Popen` + `os.wait4`) of each "
      "command, run with each tool's virtual-environment interpreter / console script from an "
      f"empty directory: {st['reps']} runs of the command and {st['reps']} of its bare interpreter "
      "per tool, interleaved (the tools alternate every round, the command and its interpreter "
      "every second round, so both medians of a difference share the machine's noise), after two "
      f"unmeasured warm-up runs of each. Measured on {st['started'][:10]} from {st['started'][11:]} "
      f"to {st['finished'][11:]}, checkout {st['revision']}, Python {st['python']}.\n")
    loads = [float(x.split()[0]) for x in st["load"]]
    busy = max(st.get("pytest_processes") or [0])
    cores = os.cpu_count() or 1
    if max(loads) >= 0.5 or busy:
        w(f"Other work was running on this {cores}-core machine during the measurement: 1-minute "
          f"load average {', '.join(x.split()[0] for x in st['load'])} (at the start and after each "
          "command)" + (f", up to {busy} pytest process(es) (other agents' test runs) seen at "
                        "those times" if busy else "") +
          ". It slows the command and its bare interpreter alike, which the subtraction takes out "
          "on average, but widens the spread of both (raw times below).\n")
    else:
        w(f"The {cores}-core machine was otherwise quiet during the measurement (1-minute load "
          f"average at most {max(loads):.2f}, no pytest process seen).\n")
    w("| command | ours: in all | ours: interpreter | ours: above it | 0.4.2: in all | "
      "0.4.2: interpreter | 0.4.2: above it | ratio (above) | target | |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in cmds.items():
        o, t = above_interpreter(s["ours"]), above_interpreter(s["theirs"])
        r = ratio(o, t)
        ok = r is not None and r <= STARTUP_TARGET
        raw = [fmt_ms(median(s[side][key])) for side in SIDES for key in ("wall", "interpreter_wall")]
        w(f"| `{name}` | {raw[0]} | {raw[1]} | **{fmt_ms(o)}** | {raw[2]} | {raw[3]} | "
          f"**{fmt_ms(t)}** | {fmt_ratio(r)} | <= {STARTUP_TARGET} | {verdict(ok)} |")
        targets.append((f"start-up above the interpreter (`{name}`) <= {STARTUP_TARGET} x 0.4.2",
                        f"{fmt_ms(o)} vs {fmt_ms(t)} = {fmt_ratio(r)} (in all {raw[0]} vs {raw[2]}; "
                        f"interpreter alone {raw[1]} / {raw[3]})", f"<= {STARTUP_TARGET}", verdict(ok)))
    w("")
    w("0.4.2's `lxm3` package and its `version` command do not load its launch API "
      "(`lxm3.xm_cluster`), so they are cheap for it; ours is one module, `lxm3.py`, which "
      "defines the launch API as it is imported. The last row is the import every launcher "
      "does, which loads the launch API in both.\n")
    w(f"Peak RSS, in separate runs ({len(version['ours']['maxrss_kib'])} per command and tool), "
      f"measured with {st.get('rss_method')}: Linux keeps a process's RSS high-water mark across "
      "fork and exec, so `ru_maxrss` of a child of the benchmark's own Python process would never "
      "read below that process's RSS (about 20 MiB).\n")
    w("| command | ours | theirs (0.4.2) | ratio |")
    w("| --- | --- | --- | --- |")
    rss = [("python -c pass", st["interpreter_maxrss_kib"]["ours"], st["interpreter_maxrss_kib"]["theirs"])]
    rss += [(name, s["ours"]["maxrss_kib"], s["theirs"]["maxrss_kib"]) for name, s in cmds.items()]
    for name, ours, theirs in rss:
        om, tm = median(ours), median(theirs)
        w(f"| `{name}` peak RSS | {om / 1024:.1f} MiB | {tm / 1024:.1f} MiB | {fmt_ratio(ratio(om, tm))} |")
    w("")
    mods = data["modules"]
    w("What `from lxm3 import xm, xm_cluster` loads: ours "
      f"{mods['ours']['modules']} modules ({mods['ours']['top_level_packages']} top-level), "
      f"{mods['ours']['installed_distributions']} distributions installed in the venv "
      f"({fmt_bytes(mods['ours']['venv_lib_bytes'])} incl. pip); theirs {mods['theirs']['modules']} "
      f"modules ({mods['theirs']['top_level_packages']} top-level), "
      f"{mods['theirs']['installed_distributions']} distributions "
      f"({fmt_bytes(mods['theirs']['venv_lib_bytes'])}).\n")
    w("<details><summary>Raw wall times (ms), in the order run</summary>\n")
    for name, s in cmds.items():
        for side in SIDES:
            w(f"- `{name}`, {'ours' if side == 'ours' else '0.4.2'}: command "
              f"{[round(x * 1000, 1) for x in s[side]['wall']]}; interpreter "
              f"{[round(x * 1000, 1) for x in s[side]['interpreter_wall']]}")
    w("\n</details>\n")
    return out, targets


def splice_startup(text: str, data: Dict[str, Any]) -> Tuple[str, List[Tuple[str, str, str, str]]]:
    """RESULTS.md text with only the start-up section, its target lines and the line that
    dates them replaced: for `--only startup` without the other sections' raw results."""
    lines, targets = startup_section(data)
    a = text.find("\n## Start-up\n")
    b = text.find("\n## ", a + 1)
    if a < 0 or b < 0:
        raise SystemExit(f"bench: {RESULTS_MD} has no start-up section to replace and "
                         f"{WORK}/results.json has no other results: run the whole benchmark")
    text = text[:a + 1] + "\n".join(lines) + "\n" + text[b + 1:]
    rows = text.split("\n")
    at = next(i for i, row in enumerate(rows) if row.startswith("| start-up "))
    rows = [row for row in rows if not row.startswith("| start-up ")]
    rows[at:at] = [f"| {n} | {m} | {g} | {v} |" for n, m, g, v in targets]
    first_blank = rows.index("", rows.index("") + 1)  # after the title and the paragraph under it
    if rows[first_blank + 1].startswith(STARTUP_RERUN):  # from an earlier --only startup
        del rows[first_blank + 1:first_blank + 3]
    rows[first_blank:first_blank] = ["", startup_rerun_line(data).rstrip("\n")]
    return "\n".join(rows), targets


def build_report(data: Dict[str, Any]) -> Tuple[str, List[Tuple[str, str, str, str]]]:
    """RESULTS.md text and the target lines (name, measured, target, verdict)."""
    out: List[str] = []
    targets: List[Tuple[str, str, str, str]] = []
    w = out.append
    ln, ov, sc = data["launches"], data["overhead"], data["scale"]
    small = ln["small_tasks"]
    mas = small + 1  # Slurm's MaxArraySize on the test bed

    w("# Benchmark: lxm3 (this project) vs lxm3 0.4.2\n")
    w(f"Written by `python3 bench/bench.py{' --quick' if data['quick'] else ''}` on "
      f"{data['finished']} ({data['duration']:.0f} s). Ours: `{data['ours_version']}`, checkout "
      f"{data['revision']}; theirs: `lxm3 {data['their_version']}` from PyPI. Each figure is the "
      "median of the runs listed; runs of the two tools alternate.\n")
    if data.get("startup_separate"):
        w(startup_rerun_line(data))

    w("## Machine\n")
    w("| | |\n| --- | --- |")
    for k, v in data["machine"].items():
        w(f"| {k} | {v} |")
    w("")

    # -- targets (filled below, printed first)
    target_at = len(out)

    # -- start-up
    lines, startup_targets = startup_section(data)
    out += lines
    targets += startup_targets

    # -- launches
    w("## Launching a sweep to Slurm over SSH\n")
    arch_name, arch = data["archive"]
    w(f"The project: a package `benchpkg` with a no-op module, a stamp file and {BLOB_BYTES // 1024} "
      f"KiB of random (incompressible) package data; our archive is {fmt_bytes(arch)}, 0.4.2's "
      f"{fmt_bytes(data['their_archive'])}. Each tool launches it with its own launcher "
      "(`bench/.work/benchpkg/launcher_ours.py`: `xm_cluster.Slurm` + `--lxm_config` TOML; "
      "`launcher_theirs.py`: absl flags, `app.run(main)`, 0.4.2's config format) as one "
      f"`ArrayJob` to `{data['machine']['Test bed'].split(',')[0]}`. Jobs are submitted with "
      "`--hold` (so nothing runs on the shared test bed) and cancelled right after each launch, "
      "outside the timing, by name (`lxm3bench_*`).\n")
    w("- **cold**: a source file (`benchpkg/_stamp.py`) was changed before the round, so the "
      "tool launches new code (a new archive), and ours starts without a kept SSH connection "
      "(it keeps one for 5 minutes after each command). **warm**: the same code launched "
      "again; ours reuses the connection the previous launch kept. **warm-new** (ours only): "
      "the same code, with the kept connection ended first: a re-launch after a break. 0.4.2 "
      "opens new connections on every launch, so its warm runs are the comparison for both.")
    w("- Each round: new code, cold launch of each tool, then warm launch of each, then ours' "
      "warm-new; the order of the tools alternates between rounds. One unmeasured launch per tool comes first (pip "
      "caches, ours' one-time build environment, remote directories).")
    w("- Wall time: fork to exit of `lxm3 launch ...` on the client (packaging, connecting, "
      "copying, submitting).\n")
    w(f"### {small} tasks (the largest sweep 0.4.2 can submit here: it writes `--array=1-N` and "
      f"Slurm's largest index is MaxArraySize - 1 = {small})\n")
    w("| measurement | ours | theirs (0.4.2) | ratio | target | |")
    w("| --- | --- | --- | --- | --- | --- |")
    for kind, limit, theirs in LAUNCH_KINDS:
        o, t = median(_walls(_runs(ln, "ours", small, kind))), median(_walls(_runs(ln, "theirs", small, theirs)))
        r = ratio(o, t)
        ok = None if r is None else r <= limit
        w(f"| {KIND_LABELS[kind]} wall time | {fmt_s(o)} | {fmt_s(t)} | {fmt_ratio(r)} | <= {limit} | {verdict(ok)} |")
        targets.append((f"{KIND_LABELS[kind]} ({small} tasks) <= {limit} x 0.4.2",
                        f"{fmt_s(o)} vs {fmt_s(t)} = {fmt_ratio(r)}", f"<= {limit}", verdict(ok)))
    for kind, _, theirs in LAUNCH_KINDS:
        [o] = _runs(ln, "ours", small, kind, traced=True) or [None]
        [t] = _runs(ln, "theirs", small, theirs, traced=True) or [None]
        if o and t:
            w(f"| {kind}: SSH connections opened (strace) | {o['connects']} | {t['connects']} | "
              f"| ours <= 1 | {verdict(o['connects'] <= 1)} |")
            w(f"| {kind}: ... of them in sshd's log (`Accepted publickey`, same client port) | "
              f"{o['sshd_accepted_matched']} | {t['sshd_accepted_matched']} | | | |")
            if kind == "warm":
                w(f"| {kind}: bytes sent to sshd | {KEPT_BYTES} | {fmt_bytes(t['bytes_sent'])} | | | |")
                continue
            w(f"| {kind}: bytes sent to sshd (strace) | {fmt_bytes(o['bytes_sent'])} | "
              f"{fmt_bytes(t['bytes_sent'])} | {fmt_ratio(ratio(o['bytes_sent'], t['bytes_sent']))} | "
              f"{'ours < archive' if kind != 'cold' else ''} | "
              f"{verdict(o['bytes_sent'] < arch) if kind != 'cold' and arch else ''} |")
    w("")
    w("Raw wall times (s): " + "; ".join(
        f"{side} {kind} {[round(x, 2) for x in _walls(_runs(ln, side, small, kind))]}"
        for kind in ("cold", "warm", "warm-new") for side in SIDES
        if _runs(ln, side, small, kind)) + "\n")
    raw_acc = {side: [r["sshd_accepted_raw"] for r in ln["runs"] if r["side"] == side
                      and r["tasks"] == small and r["kind"] in ("cold", "warm")
                      and "connects" not in r] for side in SIDES}
    w(f"New `Accepted publickey` lines in the sshd log during each untraced launch (includes other "
      f"users of the test bed, so an upper bound): ours {raw_acc['ours']}, theirs "
      f"{raw_acc['theirs']}.\n")

    w("### 1,000 tasks\n")
    w(f"lxm3 0.4.2 cannot launch this sweep here: it writes one `#SBATCH --array=1-1000` and "
      f"Slurm rejects it (`Invalid job array specification`) after 0.4.2 has packaged, uploaded "
      f"and written everything. Its figures below are the time to that rejected `sbatch`: a lower "
      f"bound of what its launch would take (a successful `sbatch` of one array costs about the "
      f"same as a rejected one), so the ratios are, if anything, in 0.4.2's favour. Ours splits "
      f"the sweep into {-(-1000 // max(1, mas))} arrays of at most {mas} tasks (`sbatch` runs "
      f"{-(-1000 // max(1, mas))} times).\n")
    w("| measurement | ours | theirs (0.4.2, to the rejected sbatch) | ratio | target | |")
    w("| --- | --- | --- | --- | --- | --- |")
    for kind, limit, theirs in LAUNCH_KINDS:
        o = median(_walls(_runs(ln, "ours", 1000, kind)))
        t = median(_their_1000(_runs(ln, "theirs", 1000, theirs)))
        r = ratio(o, t)
        ok = None if r is None else r <= limit
        w(f"| {KIND_LABELS[kind]} wall time | {fmt_s(o)} | {fmt_s(t)} | {fmt_ratio(r)} | <= {limit} | "
          f"{verdict(ok)} |")
        targets.append((f"{KIND_LABELS[kind]} (1,000 tasks; 0.4.2: to its rejected sbatch) <= {limit} x",
                        f"{fmt_s(o)} vs {fmt_s(t)} = {fmt_ratio(r)}", f"<= {limit}", verdict(ok)))
    for kind, _, theirs in LAUNCH_KINDS:
        [o] = _runs(ln, "ours", 1000, kind, traced=True) or [None]
        [t] = _runs(ln, "theirs", 1000, theirs, traced=True) or [None]
        if o:
            tc = t["connects"] if t else ""
            tb_ = fmt_bytes(t["bytes_sent"]) if t else ""
            w(f"| {kind}: SSH connections opened (strace) | {o['connects']} | {tc} | | ours <= 1 | "
              f"{verdict(o['connects'] <= 1)} |")
            if kind == "warm":
                w(f"| {kind}: bytes sent to sshd | {KEPT_BYTES} | {tb_} | | | |")
            else:
                w(f"| {kind}: bytes sent to sshd (strace) | {fmt_bytes(o['bytes_sent'])} | {tb_} | | "
                  f"{'ours < archive' if kind != 'cold' else ''} | "
                  f"{verdict(o['bytes_sent'] < arch) if kind != 'cold' and arch else ''} |")
            w(f"| {kind}: Slurm array jobs submitted (then cancelled) | {o['arrays_cancelled']} | "
              f"{t['arrays_cancelled'] if t else ''} | | | |")
    w("")
    errors = sorted({r.get("error", "") for r in ln["runs"] if r["side"] == "theirs"
                     and r["tasks"] == 1000})
    w(f"0.4.2's 1,000-task launches: exit codes "
      f"{sorted({r['rc'] for r in ln['runs'] if r['side'] == 'theirs' and r['tasks'] == 1000})}; "
      f"last error line(s): {'; '.join(f'`{e}`' for e in errors)}\n")
    w("Raw wall times (s): " + "; ".join(
        f"{side} {kind} {[round(x, 2) for x in (_walls if side == 'ours' else _their_1000)(_runs(ln, side, 1000, kind))]}"
        for kind in ("cold", "warm", "warm-new") for side in SIDES
        if _runs(ln, side, 1000, kind)) + "\n")

    timelines = [r for r in ln["runs"] if r["kind"].endswith("-timeline") and r.get("timeline")]
    if timelines:
        w("### Where the time goes: programs started during a launch\n")
        w(f"{len(timelines)} extra launches under `strace -f --seccomp-bpf -ttt -e trace=execve` (stops only "
          "at `execve`, so it barely slows the launch; not used for the medians above): each "
          "successful `execve` of the launch's process tree, in ms from the start. A step lasts "
          "until the next one starts; the last line is the end of the launch.\n")
        for r in timelines:
            tl = r["timeline"]
            w(f"<details><summary>{r['side']}, {r['tasks']} tasks, {r['kind'][:-len('-timeline')]}: "
              f"{tl['total_ms']} ms in all, exit {r['rc']}</summary>\n")
            w("| ms | program |\n| ---: | --- |")
            for ms, cmd in tl["events"]:
                w(f"| {ms} | `{cmd.replace('|', '/')}` |")
            w(f"| {tl['total_ms']} | (end) |")
            w("\n</details>\n")
    if ln.get("waited_for_slurm_purge_s"):
        w(f"Between 1,000-task launches the benchmark waited {ln['waited_for_slurm_purge_s']:.0f} s "
          "in all (not measured) for Slurm to purge cancelled array tasks, keeping its job records "
          "under 40 % of MaxJobCount so that other users of the test bed are not refused.\n")

    traced = [r for r in ln["runs"] if r["side"] == "ours" and "connects" in r]
    conns = {kind: [r["connects"] for r in traced if r["kind"] == kind] for kind in KIND_LABELS}
    ssh_ok = all(n <= 1 for r in traced for n in [r["connects"]])
    targets.append(("one SSH connection per launch (ours)",
                    ", ".join(f"{kind} {n}" for kind, n in conns.items()) + " (traced launches)",
                    "<= 1", verdict(ssh_ok if traced else None)))
    # Judged where the whole SSH stream is in the traced process tree: with a
    # kept connection the bytes go through a master started by an earlier launch.
    warm_bytes = [r["bytes_sent"] for r in traced if r["kind"] == "warm-new"]
    warm_ok = bool(warm_bytes) and arch is not None and all(b < arch for b in warm_bytes)
    targets.append(("no archive bytes sent on a warm launch (ours, warm-new)",
                    f"{', '.join(fmt_bytes(b) for b in warm_bytes)} sent; archive {fmt_bytes(arch)}",
                    "< archive size", verdict(warm_ok if warm_bytes else None)))

    # -- per-task overhead
    w("## Per-task overhead on the node\n")
    if "samples" in ov:
        w("A no-op task (`python3 -m benchpkg.noop`) run on this machine as the test user "
          f"({len(next(iter(ov['samples'].values())))} alternating runs each), as Slurm would start "
          "it: the job script from a launch's staging directory executed through its `#!` line "
          "with `SLURM_ARRAY_TASK_ID` set (and, for ours, the array's first task as `$1`), "
          "versus the program run directly from an unpacked copy of the archive. Wall time from "
          "fork to exit. 0.4.2's 1,000-task script is the one its failed launch left behind.\n")
        w("| run | median | overhead vs direct | overhead ratio ours/theirs |")
        w("| --- | --- | --- | --- |")
        direct_label = next(label for label in ov["samples"] if label.startswith("direct"))
        d = median(ov["samples"][direct_label])
        for label, samples in ov["samples"].items():
            m = median(samples)
            if m is None:
                w(f"| {label} | failed (exit {ov['exit_codes'][label]}) | | |")
                continue
            cmp = ""
            if label.startswith("ours"):
                other = label.replace("ours:", "theirs:")
                tm = median(ov["samples"].get(other, []))
                cmp = fmt_ratio(ratio(m - d, tm - d) if tm is not None else None)
            w(f"| {label} | {fmt_s(m)} | {'' if label == direct_label else fmt_s(m - d)} | {cmp} |")
        w("")
    else:
        w(f"Not measured: {ov.get('error')}\n")

    # -- scale
    w("## Scale: a 100,000-task sweep\n")
    dr = [r["wall"] for r in sc["dry_run"] if r["rc"] == 0]
    ip = [r["total"] for r in sc["inproc"] if r.get("rc") == 0]
    w("Ours only (0.4.2 cannot submit more than MaxArraySize tasks). Packaging is cached (the "
      "code was launched just before).\n")
    w("| measurement | ours | target | |")
    w("| --- | --- | --- | --- |")
    ok_dr = bool(dr) and median(dr) < 5
    w(f"| `lxm3 launch --dry-run` of a 100,000-task launcher, whole command (start-up, packaging "
      f"cached, experiment.add, job script, tasks file; arrays not split: a dry run does not ask "
      f"the cluster its limit) | {fmt_s(median(dr))} | < 5 s | {verdict(ok_dr if dr else None)} |")
    ok_ip = bool(ip) and median(ip) < 5
    w(f"| in-process `lxm3.main(['launch', ...])` with the cluster faked (limit {sc['limit']}: "
      f"{-(-sc['tasks'] // sc['limit'])} arrays), incl. submission script and record | "
      f"{fmt_s(median(ip))} | < 5 s | {verdict(ok_ip if ip else None)} |")
    w("")
    if sc["inproc"] and sc["inproc"][0].get("phases"):
        first = sc["inproc"][-1]
        w("In-process phases (last run; nested phases overlap: `experiment.add` contains nothing "
          "below, `prepare_cluster_launch` contains the job files):\n")
        w("| phase | time |\n| --- | --- |")
        for name, secs in sorted(first["phases"].items(), key=lambda kv: -kv[1]):
            w(f"| {name} | {fmt_s(secs)} |")
        w(f"| job files written (job.sh + tasks) | {fmt_bytes(first['tree_bytes'].get('job_files'))} |")
        w(f"| record written | {fmt_bytes(first['record_bytes'])} |")
        w("")
    w(f"cProfile of one in-process run: `{sc['profile']}`. Raw: dry run {[round(x, 2) for x in dr]} s, "
      f"in-process {[round(x, 2) for x in ip]} s.\n")
    w(f"Real submission of the 100,000 tasks was not run: every array task counts toward "
      f"Slurm's MaxJobCount, which is {sc.get('max_job_count', '?')} on the test bed (fixed in "
      "tests/testbed/up.sh), so Slurm refuses (and `sbatch` stalls retrying) long before "
      "100,000 tasks, whatever MaxArraySize is; the test bed is also shared with other test "
      "runs. The 1,000-task launches above (91 arrays) are the largest real submissions "
      "measured.\n")
    scale_ok = (ok_dr and ok_ip) if (dr and ip) else None
    targets.append(("100,000-task sweep prepared in < 5 s",
                    f"dry run {fmt_s(median(dr))}, in-process {fmt_s(median(ip))}", "< 5 s",
                    verdict(scale_ok)))

    # -- method
    w("## Method and caveats\n")
    w("- Both tools run from their own virtual environment made with the same interpreter: "
      f"0.4.2 with `pip install lxm3=={THEIR_VERSION}` (from PyPI), ours with `pip install` of a copy "
      "of this checkout (`lxm3.py`, `xm/`). Both get private `XDG_*_HOME` directories under "
      "`bench/.work/xdg` (caches, records) and their venv first on `PATH` (0.4.2 runs `pip` "
      "from `PATH`).")
    w("- **SSH connections and bytes** are counted in separate runs under `strace -f "
      "--seccomp-bpf -yy` (tracing slows a launch, so those runs are not timed): a connection is a "
      "`connect()` to the sshd port that succeeds (or is in progress, for paramiko's non-blocking "
      "socket); bytes sent are the return values of `write`/`writev`/`sendto`/`sendmsg` on TCP "
      "sockets whose peer is the sshd port, summed over every process and thread of the launch "
      "(ssh, the control master, rsync's ssh, paramiko). That is the SSH stream the client "
      "writes (handshake, encryption and padding included; TCP/IP headers and the server's "
      "replies excluded), exactly for this launch: other users of the test bed's sshd do not "
      "count, which loopback counters (`/proc/net/dev`, `ss`) could not separate. The client "
      "ports found are matched against sshd's own `Accepted publickey` lines as a cross-check.")
    w("- \"No archive bytes on a warm launch\" is judged by the whole SSH stream of the warm "
      "launch being smaller than the archive, which holds 512 KiB of incompressible data.")
    w("- 0.4.2's \"cold\" and \"warm\" do the same work: it rebuilds (pip with build isolation) "
      "and uploads a new timestamped archive on every launch.")
    w("- Other helpers ran tests against the same test bed during the benchmark; that adds "
      "noise to wall times (medians, alternation). Launch times include real `sbatch` calls.")
    w("- Per-task overhead runs the job scripts locally rather than through slurmd (the time "
      "slurmd itself takes is the same for both tools).")
    w("")

    # -- targets at the top
    tl = ["## Targets\n", "| target | measured (ours vs 0.4.2) | goal | |", "| --- | --- | --- | --- |"]
    tl += [f"| {n} | {m} | {g} | {v} |" for n, m, g, v in targets]
    tl.append("")
    out[target_at:target_at] = tl
    text = "\n".join(out) + "\n"
    if "environments" in data:
        text, env_targets = splice_environments(text, data)
        targets += env_targets
    return text, targets


# -- managed environments -------------------------------------------------------------
#
# Ours only (0.4.2 has none). A project declaring absl-py and numpy launched warm
# (environment there, archive cached, SSH connection kept) with and without a
# managed environment, alternating; the cold creation of an environment (nothing
# cached here, nothing there) for a small pure-Python set (absl-py) and for numpy,
# with pip's own cache off; and the alternative lxm3 did not choose, a venv made on
# the login node with the cluster's pip, timed over SSH. Both resolve from PyPI only
# (this machine's pip.conf and PIP_* variables, which name local mirrors, are set
# aside) so that they fetch the same files the same way.

ENV_SETS = {"absl-py": ["absl-py"], "numpy": ["numpy"], "absl-py + numpy": ["absl-py", "numpy"]}
ENV_STAGING = f"{REMOTE_STAGING}/envs-bench"

LAUNCHER_ENVS = '''\
"""The benchmark sweep of a project with dependencies, with or without a managed environment."""
import argparse
import datetime

from lxm3 import xm, xm_cluster

parser = argparse.ArgumentParser()
parser.add_argument("--tasks", type=int, default=10)
parser.add_argument("--environment", default="none")
args = parser.parse_args()

with xm_cluster.create_experiment(experiment_title="lxm3bench_envs") as experiment:
    # --hold: the tasks never start; the benchmark cancels them right after the launch
    executor = xm_cluster.Slurm(walltime=datetime.timedelta(minutes=10), extra_directives=["--hold"])
    spec = xm_cluster.PythonPackage(path=".", entrypoint=xm_cluster.ModuleName("benchenv.noop"),
                                    environment=args.environment)
    [executable] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
    experiment.add(xm_cluster.ArrayJob(executable, executor, args=[{"seed": i} for i in range(args.tasks)]))
'''


def env_project(tb: Testbed, name: str, dependencies: List[str]) -> str:
    directory = os.path.join(WORK, "envs", re.sub(r"\W+", "_", name))
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(os.path.join(directory, "benchenv"))
    files = {
        "pyproject.toml": PROJECT_PYPROJECT.replace('name = "benchpkg"', 'name = "benchenv"')
        .replace('packages = ["benchpkg"]', 'packages = ["benchenv"]')
        .replace('requires-python = ">=3.9"', f"dependencies = {json.dumps(dependencies)}")
        .split("[tool.setuptools.package-data]")[0],
        "benchenv/__init__.py": "",
        "benchenv/noop.py": '"""A task that does nothing."""\n',
        "launcher.py": LAUNCHER_ENVS,
        "lxm.toml": config_text("ours", tb).replace(f'staging = "{REMOTE_STAGING}/ours"',
                                                    f'staging = "{ENV_STAGING}"'),
    }
    for rel, text in files.items():
        with open(os.path.join(directory, rel), "w") as f:
            f.write(text)
    return directory


def env_launch_env(cold_pip: bool) -> Dict[str, str]:
    """launch_env, with pip resolving from PyPI only; ``cold_pip``: and without its cache."""
    env = {k: v for k, v in launch_env("ours").items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    if cold_pip:
        env["PIP_NO_CACHE_DIR"] = "1"
    return env


_CREATED = re.compile(r"environment (\w+) created: ([\d,]+) files, ([\d.]+ \w+) .*unpacked and compiled in "
                      r"([\d.]+) s")
_RESOLVED = re.compile(r"resolved and packed in ([\d.]+) s: ([\d,]+) files, ([\d.]+ \w+), ([\d.]+ \w+) to send")


def env_launch(tb: Testbed, directory: str, environment: str, label: str, cold_pip: bool = False,
               tasks: int = 10) -> Dict[str, Any]:
    log_path = os.path.join(WORK, "logs", f"env-{label}-{time.time_ns()}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    argv = [venv_bin("ours", "lxm3"), "launch", "launcher.py", f"--tasks={tasks}",
            f"--environment={environment}", "--lxm_config", "lxm.toml"]
    with open(log_path, "w") as out:
        wall, rc, _ = timed(argv, cwd=directory, env=env_launch_env(cold_pip), stdout=out,
                            stderr=subprocess.STDOUT)
    tb.cancel_ours()
    with open(log_path, errors="replace") as f:
        text = f.read()
    result: Dict[str, Any] = {"label": label, "wall": wall, "rc": rc, "log": os.path.relpath(log_path, ROOT)}
    created, resolved = _CREATED.search(text), _RESOLVED.search(text)
    if created:
        result.update(unpack_s=float(created.group(4)), files_there=int(created.group(2).replace(",", "")),
                      size_there=created.group(3))
    if resolved:
        result.update(resolve_s=float(resolved.group(1)), files=int(resolved.group(2).replace(",", "")),
                      size=resolved.group(3), archive=resolved.group(4))
    if rc != 0:
        raise SystemExit(f"bench: an environment launch failed ({label}); see {log_path}:\n{text[-2000:]}")
    log(f"  {label}: {fmt_s(wall)}" + (f" (resolved and packed {result['resolve_s']} s, unpacked "
                                        f"{result.get('unpack_s')} s)" if resolved else ""))
    return result


def login_node_venv(tb: Testbed, dependencies: List[str], with_pip: bool) -> Dict[str, Any]:
    """The alternative: a venv made on the login node, filled by the cluster's pip."""
    venv = f"{ENV_STAGING}/alternative-venv"
    make = (f"python3 -m venv {venv} && {venv}/bin/pip install" if with_pip else
            f"python3 -m venv --without-pip {venv} && python3 -m pip --python {venv}/bin/python install")
    script = (f"rm -rf {venv}; s=$(date +%s.%N); {make} --quiet --no-cache-dir --disable-pip-version-check "
              f"{' '.join(dependencies)} >/dev/null 2>&1 || echo FAILED; e=$(date +%s.%N); "
              f"echo \"$s $e $(find {venv} -type f | wc -l) $(du -sb {venv} | cut -f1)\"; rm -rf {venv}")
    out = tb.ssh(script).split()
    if "FAILED" in out:
        raise SystemExit(f"bench: making a venv on the login node failed: {out}")
    start, end, files, size = out[-4:]
    return {"wall": float(end) - float(start), "files": int(files), "bytes": int(size)}


def measure_environments(tb: Testbed, reps: int) -> Dict[str, Any]:
    cache = os.path.join(WORK, "xdg", "cache", "lxm3", "envs")
    remote_envs = f"~/{ENV_STAGING}/envs"
    res: Dict[str, Any] = {"reps": reps, "warm": [], "cold": {}, "alternative": {}}
    both = env_project(tb, "absl-py + numpy", ENV_SETS["absl-py + numpy"])
    log("managed environments: warm-up (the environment and the archive, not measured)")
    env_launch(tb, both, "managed", "warm-up")
    env_launch(tb, both, "none", "warm-up")
    log(f"managed environments: warm launches of absl-py + numpy, {reps} x (with, without), alternating")
    for i in range(reps):
        for environment in (("managed", "none") if i % 2 == 0 else ("none", "managed")):
            res["warm"].append({**env_launch(tb, both, environment, f"warm-{environment}"),
                                "environment": environment})
    for name in ("absl-py", "numpy"):
        directory = env_project(tb, name, ENV_SETS[name])
        log(f"managed environments: cold creation of {name} ({reps} x; nothing cached here or there, "
            "pip's cache off)")
        runs = []
        for _ in range(reps):
            shutil.rmtree(cache, ignore_errors=True)
            tb.ssh(f"rm -rf {remote_envs}")
            runs.append(env_launch(tb, directory, "managed", f"cold-{name}", cold_pip=True))
        res["cold"][name] = runs
        log(f"managed environments: the alternative for {name}, a venv on the login node ({reps} x each)")
        res["alternative"][name] = {
            "without_pip": [login_node_venv(tb, ENV_SETS[name], False) for _ in range(reps)],
            "with_pip": [login_node_venv(tb, ENV_SETS[name], True) for _ in range(reps)]}
    tb.ssh(f"rm -rf ~/{ENV_STAGING}", check=False)
    return res


ENV_TARGET = 1.1  # a warm launch with a managed environment costs no more than one without (noise: 10 %)
ENV_SECTION = "## Managed environments"


def environments_section(data: Dict[str, Any]) -> Tuple[List[str], List[Tuple[str, str, str, str]]]:
    en = data["environments"]
    out: List[str] = []
    w = out.append
    warm = {e: [r["wall"] for r in en["warm"] if r["environment"] == e] for e in ("managed", "none")}
    managed, plain = median(warm["managed"]), median(warm["none"])
    r = ratio(managed, plain)
    ok = r is not None and r <= ENV_TARGET
    w(f"{ENV_SECTION}\n")
    w(f"Ours only (0.4.2 has none). Measured on {en['finished']}, checkout {en['revision']}. A project "
      "declaring `absl-py` and `numpy` in `pyproject.toml`, launched as a 10-task `ArrayJob` to the "
      "test bed's Slurm over SSH (`--hold`, cancelled after each launch), warm: code unchanged, "
      "environment already on the cluster, SSH connection kept. With a managed environment the "
      "launch checks it there inside the probe it makes anyway (its key is known here from the "
      "inputs, so pip does not run), and the job script checks the task's Python against it; "
      f"without, the same project runs with `environment=\"none\"`. {en['reps']} launches of each, "
      "alternating; medians.\n")
    w("| warm launch, 10 tasks | median | runs |")
    w("| --- | --- | --- |")
    w(f"| with a managed environment (absl-py + numpy, there already) | **{fmt_s(managed)}** | "
      f"{', '.join(fmt_s(x) for x in warm['managed'])} |")
    w(f"| without | **{fmt_s(plain)}** | {', '.join(fmt_s(x) for x in warm['none'])} |")
    w(f"| ratio | {fmt_ratio(r)} | target <= {ENV_TARGET} (no more than without, within noise) {verdict(ok)} |")
    w("")
    w("Cold creation: nothing cached on this machine (`~/.cache/lxm3/envs` removed), nothing on the "
      "cluster (its `envs/` removed), pip's own cache off (`PIP_NO_CACHE_DIR=1`), packages from PyPI. "
      "The launch's total, and its parts as its progress lines report them: resolving with pip and "
      "packing here, and unpacking, compiling (`compileall`) and checking there.\n")
    w("| environment | launch (cold) | resolve + pack here | unpack + compile there | files (there) | "
      "size (there) | archive sent |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in en["cold"].items():
        w(f"| {name} | **{fmt_s(median([x['wall'] for x in runs]))}** | "
          f"{fmt_s(median([x['resolve_s'] for x in runs if 'resolve_s' in x]))} | "
          f"{fmt_s(median([x['unpack_s'] for x in runs if 'unpack_s' in x]))} | "
          f"{runs[-1].get('files_there', 0):,} ({runs[-1].get('files', 0):,} without `__pycache__`) | "
          f"{runs[-1].get('size_there')} | {runs[-1].get('archive')} |")
    w("")
    w("The alternative, measured but not built: a virtual environment made on the login node over "
      "SSH and filled there by the cluster's pip from PyPI (`python3 -m venv`, then `pip install "
      "--no-cache-dir`), timed on the login node. It needs the index reachable from the cluster, "
      "compiles nothing either, and leaves pip's choice to each login node.\n")
    w("| environment | venv --without-pip + pip --python | files | venv with its own pip | files |")
    w("| --- | --- | --- | --- | --- |")
    for name, alt in en["alternative"].items():
        w(f"| {name} | {fmt_s(median([x['wall'] for x in alt['without_pip']]))} | "
          f"{alt['without_pip'][-1]['files']:,} | {fmt_s(median([x['wall'] for x in alt['with_pip']]))} | "
          f"{alt['with_pip'][-1]['files']:,} |")
    w("")
    target = ("a warm launch with a managed environment costs no more than one without",
              f"{fmt_s(managed)} vs {fmt_s(plain)} = {fmt_ratio(r)}", f"<= {ENV_TARGET}", verdict(ok))
    return out, [target]


def splice_environments(text: str, data: Dict[str, Any]) -> Tuple[str, List[Tuple[str, str, str, str]]]:
    """RESULTS.md with its managed-environments section (and target row) replaced or added."""
    lines, targets = environments_section(data)
    a = text.find(f"\n{ENV_SECTION}\n")
    if a >= 0:
        b = text.find("\n## ", a + 1)
        text = text[:a + 1] + "\n".join(lines) + "\n" + (text[b + 1:] if b >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    rows = text.split("\n")
    rows = [row for row in rows if not row.startswith(f"| {targets[0][0]} ")]
    if "## Targets" in rows:
        at = rows.index("## Targets") + 3
        while at < len(rows) and rows[at].startswith("| "):
            at += 1
        rows[at:at] = [f"| {n} | {m} | {g} | {v} |" for n, m, g, v in targets]
    return "\n".join(rows), targets


def environments_only(quick: bool, results_json: str) -> int:
    """`--only envs`: measure managed environments and merge them into the last results."""
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root on the test-bed machine (it submits to the test bed)")
    tb = Testbed()
    tb.ssh("true")
    os.makedirs(WORK, exist_ok=True)
    log(f"ours: {setup_ours()}")
    shutil.rmtree(os.path.join(WORK, "xdg"), ignore_errors=True)
    data: Dict[str, Any] = {}
    if os.path.exists(results_json):
        with open(results_json) as f:
            data = json.load(f)
    try:
        data["environments"] = measure_environments(tb, 3 if quick else 5)
    finally:
        end_kept_connections()
        tb.cancel_ours()
    data["environments"].update(finished=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                                revision=source_revision())
    with open(results_json, "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(RESULTS_MD) as f:
        text, targets = splice_environments(f.read(), data)
    with open(RESULTS_MD, "w") as f:
        f.write(text)
    for name, measured, goal, result in targets:
        print(f"{result:4}  {name}  {measured} (goal {goal})")
    return 0


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 4-7 minutes)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the remote staging directory (~lxm3test/lxm3bench-staging)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite RESULTS.md from bench/.work/results.json")
    parser.add_argument("--only", choices=["startup", "envs"],
                        help="measure only this part (start-up needs neither root nor the test "
                             "bed; envs: managed environments) and merge it into "
                             "bench/.work/results.json and RESULTS.md")
    args = parser.parse_args()
    results_json = os.path.join(WORK, "results.json")
    if args.report_only:
        with open(results_json) as f:
            return write_report(json.load(f))
    if args.only == "startup":
        return startup_only(args.quick, results_json)
    if args.only == "envs":
        return environments_only(args.quick, results_json)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root on the test-bed machine (it runs job scripts as the "
                         "test user and reads the test bed's sshd log)")
    for tool in ("strace", "rsync", "ssh", "unzip", "sinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed")
    # 1,000-task launches are fewer: each leaves 1,000 cancelled job records in Slurm for
    # 1.5-2.5 minutes, and the benchmark waits for them to go (see Testbed.wait_for_room)
    reps = {"launch": 3, "launch1000": 2, "overhead": 7, "scale": 1} if args.quick \
        else {"launch": 5, "launch1000": 3, "overhead": 21, "scale": 3}
    reps["startup"] = STARTUP_REPS[args.quick]
    started = time.time()
    tb = Testbed()
    tb.ssh("true")
    os.makedirs(WORK, exist_ok=True)
    their_version = setup_theirs()
    ours_version = setup_ours()
    log(f"ours: {ours_version}; theirs: {their_version}")
    shutil.rmtree(os.path.join(WORK, "xdg"), ignore_errors=True)
    shutil.rmtree(os.path.join(WORK, "logs"), ignore_errors=True)
    tb.cancel_ours()
    tb.ssh(f"rm -rf ~/{REMOTE_STAGING}")
    project = Project(tb)
    data: Dict[str, Any] = {"quick": args.quick, "reps": reps, "machine": machine(tb),
                            "ours_version": ours_version, "their_version": their_version,
                            "revision": source_revision()}
    try:
        data["startup"] = measure_startup(reps["startup"])
        data["modules"] = {side: count_modules(side, "from lxm3 import xm, xm_cluster") for side in SIDES}
        launcher = Launcher(tb, project)
        data["launches"] = measure_launches(launcher, reps["launch"], reps["launch1000"], tb)
        name, size = archive_size()
        data["archive"] = (name and os.path.basename(name), size)
        data["their_archive"] = their_archive_size(tb)
        data["overhead"] = measure_task_overhead(tb, reps["overhead"])
        data["scale"] = measure_scale(launcher, tb, reps["scale"])
        data["environments"] = measure_environments(tb, reps["launch"])
        data["environments"].update(finished=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                                    revision=data["revision"])
    finally:
        end_kept_connections()
        left = tb.cancel_ours()
        if left:
            log(f"cancelled {left} leftover job(s)")
        if not args.keep:
            tb.ssh(f"rm -rf ~/{REMOTE_STAGING}", check=False)
    data["finished"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    data["duration"] = time.time() - started
    with open("/proc/loadavg") as f:
        data["machine"]["Load average at end"] = " ".join(f.read().split()[:3])
    with open(results_json, "w") as f:
        json.dump(data, f, indent=1, default=str)
    return write_report(data)


def startup_only(quick: bool, results_json: str) -> int:
    """`--only startup`: measure start-up and merge it into the last run's results."""
    os.makedirs(WORK, exist_ok=True)
    their_version = setup_theirs()
    ours_version = setup_ours()
    log(f"ours: {ours_version}; theirs: {their_version}")
    data: Dict[str, Any] = {}
    if os.path.exists(results_json):
        with open(results_json) as f:
            data = json.load(f)
    data["startup"] = measure_startup(STARTUP_REPS[quick])
    data["startup"].update(ours_version=ours_version, their_version=their_version, quick=quick)
    data["modules"] = {side: count_modules(side, "from lxm3 import xm, xm_cluster") for side in SIDES}
    data["startup_separate"] = True
    with open(results_json, "w") as f:
        json.dump(data, f, indent=1, default=str)
    return write_report(data)


def write_report(data: Dict[str, Any]) -> int:
    if "launches" in data:
        text, targets = build_report(data)
    else:  # start-up alone: the other sections stay as the last full run wrote them
        with open(RESULTS_MD) as f:
            text, targets = splice_startup(f.read(), data)
    with open(RESULTS_MD, "w") as f:
        f.write(text)
    print()
    width = max(len(t[0]) for t in targets)
    for name, measured, goal, result in targets:
        print(f"{result:4}  {name:{width}}  {measured} (goal {goal})")
    print(f"\nwrote {os.path.relpath(RESULTS_MD)} and {os.path.relpath(os.path.join(WORK, 'results.json'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
