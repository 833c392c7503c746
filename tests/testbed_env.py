"""The local Slurm / Grid Engine / OpenPBS / SSH test bed, for the test suite.

``tests/testbed/up.sh`` brings the test bed up and describes it in an env file
(``/var/lib/lxm3-testbed/testbed.env``, or the path in ``$LXM3_TESTBED_ENV``). The test bed
is a guest on the machine: its Slurm, Grid Engine and sshd are its own, beside
any the machine already runs, on ports of their own; its sshd sets the
variables that point the schedulers' commands at it for every ssh session, and
``Testbed.cluster_env()`` gives them for commands run here. Tests call
``require_testbed(kind)`` with kind ``"ssh"``, ``"slurm"``, ``"sge"`` or ``"pbs"``: it
returns a ``Testbed`` when that part answers, and otherwise skips the test, or
fails it when ``LXM3_REQUIRE_TESTBED=1`` (meant for CI, so that a broken test
bed cannot pass as a row of skips). Each kind is probed once per session.

PBS runs in a network namespace of its own with its own sshd (PBS refuses
loopback addresses): reach it with ``scheduler="pbs"`` (``tb.ssh(cmd,
scheduler="pbs")``, ``ssh_argv``, ``ssh_options``, ``destination_for``), and
run its commands by their full path, ``tb.pbs_bin("qsub")``: its ``bin/`` is
not on the PATH, where ``qsub`` may be Grid Engine's.

Call ``require_testbed`` inside the test body so that a required but missing
test bed shows as a failed test. The ``ssh_testbed``, ``slurm_testbed`` and
``sge_testbed`` fixtures are shorthands for use in other modules (import them
there), but a failure raised while a fixture sets up is reported as an error.

Standard library and pytest only.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import pytest

DEFAULT_ENV_FILE = "/var/lib/lxm3-testbed/testbed.env"
ENV_FILE_VAR = "LXM3_TESTBED_ENV"
REQUIRE_VAR = "LXM3_REQUIRE_TESTBED"
KINDS = ("ssh", "slurm", "sge", "pbs")
UP_HINT = "start it with `sudo bash tests/testbed/up.sh`"
PROBE_TIMEOUT = 30  # seconds; a healthy probe takes well under one

T = TypeVar("T")


def env_file_path() -> Path:
    return Path(os.environ.get(ENV_FILE_VAR) or DEFAULT_ENV_FILE)


def read_env_file(path: Optional[Path] = None) -> Dict[str, str]:
    """Parse the ``KEY=VALUE`` lines that up.sh writes (``#`` starts a comment)."""
    values: Dict[str, str] = {}
    text = (path or env_file_path()).read_text()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@dataclass(frozen=True)
class Testbed:
    """What the env file says, plus helpers to run commands as the test user."""

    __test__ = False  # not a test class, whatever pytest's name rules say

    values: Dict[str, str]

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.values.get("LXM3_TESTBED_" + key, default)

    def _required(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(f"LXM3_TESTBED_{key} missing from {env_file_path()}")
        return value

    @property
    def ssh_user(self) -> str:
        return self._required("SSH_USER")

    @property
    def ssh_host(self) -> str:
        return self._required("SSH_HOST")

    @property
    def ssh_port(self) -> int:
        return int(self._required("SSH_PORT"))

    @property
    def ssh_key(self) -> str:
        return self._required("SSH_KEY")

    @property
    def known_hosts(self) -> str:
        return self._required("SSH_KNOWN_HOSTS")

    @property
    def user_home(self) -> str:
        return self._required("USER_HOME")

    @property
    def sshd_log(self) -> str:
        """The log of the test bed's own sshd (root may read it)."""
        return self._required("SSHD_LOG")

    def cluster_env(self) -> Dict[str, str]:
        """SLURM_CONF, SGE_ROOT, SGE_CELL and the SGE ports of the test bed.

        Without them ``squeue``, ``qconf`` and the like run on this machine
        would ask the machine's own (site) clusters, if any, not the test bed's.
        """
        names = ("SLURM_CONF", "SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT")
        return {name: self._required(name) for name in names}

    def local_env(self, **extra: str) -> Dict[str, str]:
        """This process's environment plus ``cluster_env()`` and ``extra``."""
        return {**os.environ, **self.cluster_env(), **extra}

    @property
    def slurm_max_array_size(self) -> int:
        return int(self._required("SLURM_MAX_ARRAY_SIZE"))

    @property
    def slurm_min_job_age(self) -> int:
        return int(self._required("SLURM_MIN_JOB_AGE"))

    @property
    def sge_max_aj_tasks(self) -> int:
        return int(self._required("SGE_MAX_AJ_TASKS"))

    # --- PBS: its own host (an address in its network namespace) and sshd ---

    @property
    def pbs_ssh_host(self) -> str:
        """The address of the PBS sshd (inside the PBS network namespace)."""
        return self._required("PBS_SSH_HOST")

    @property
    def pbs_ssh_port(self) -> int:
        return int(self._required("PBS_SSH_PORT"))

    @property
    def pbs_exec(self) -> str:
        """PBS_EXEC: the directory whose ``bin/`` holds qsub, qstat, ...."""
        return self._required("PBS_EXEC")

    def pbs_bin(self, name: str) -> str:
        """Full path of PBS command ``name`` (its bin/ is not on the PATH)."""
        return f"{self.pbs_exec}/bin/{name}"

    @property
    def pbs_server(self) -> str:
        """The PBS server's name; job ids end in ``.<server>``."""
        return self._required("PBS_SERVER")

    @property
    def pbs_conf_file(self) -> str:
        """The test bed's pbs.conf; PBS sessions get it as PBS_CONF_FILE."""
        return self._required("PBS_CONF_FILE")

    @property
    def pbs_max_array_size(self) -> int:
        """The server's max_array_size: the most subjobs one ``qsub -J`` may have."""
        return int(self._required("PBS_MAX_ARRAY_SIZE"))

    @property
    def pbs_ncpus(self) -> int:
        return int(self._required("PBS_NCPUS"))

    @property
    def pbs_sshd_log(self) -> str:
        return self._required("PBS_SSHD_LOG")

    @property
    def destination(self) -> str:
        return f"{self.ssh_user}@{self.ssh_host}"

    def destination_for(self, scheduler: Optional[str] = None) -> str:
        """``user@host`` of the sshd that reaches ``scheduler`` (None: the main one)."""
        if scheduler == "pbs":
            return f"{self.ssh_user}@{self.pbs_ssh_host}"
        return self.destination

    def ssh_options(self, scheduler: Optional[str] = None) -> List[str]:
        """ssh options for the test bed. Host keys are always checked.

        ``scheduler="pbs"``: for the PBS sshd (its own address, port 22).
        """
        port = self.pbs_ssh_port if scheduler == "pbs" else self.ssh_port
        return [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10",
            "-p", str(port),
            "-i", self.ssh_key,
        ]  # fmt: skip

    def ssh_argv(
        self, command: Union[str, Sequence[str]], scheduler: Optional[str] = None
    ) -> List[str]:
        """argv running ``command`` as the test user.

        A string is one command line for the remote shell; a sequence is an
        argv, quoted with shlex.join because ssh joins its arguments with
        spaces and the remote shell parses them again. ``scheduler="pbs"``
        goes through the PBS sshd.
        """
        line = command if isinstance(command, str) else shlex.join(command)
        return ["ssh", *self.ssh_options(scheduler), self.destination_for(scheduler), line]

    def ssh(
        self,
        command: Union[str, Sequence[str]],
        *,
        check: bool = True,
        timeout: float = 60,
        input: Optional[str] = None,
        scheduler: Optional[str] = None,
    ) -> subprocess.CompletedProcess:
        """Run ``command`` as the test user; text output captured."""
        argv = self.ssh_argv(command, scheduler)
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    @contextlib.contextmanager
    def remote_tempdir(self, prefix: str = "test") -> Iterator[str]:
        """A fresh directory in the test user's home, removed afterwards."""
        path = self.ssh(
            f"mkdir -p ~/.lxm3-tests && mktemp -d ~/.lxm3-tests/{shlex.quote(prefix)}.XXXXXX"
        ).stdout.strip()
        try:
            yield path
        finally:
            self.ssh(["rm", "-rf", path], check=False)


def poll(
    fn: Callable[[], Optional[T]], timeout: float, interval: float = 0.5, what: str = "condition"
) -> T:
    """Call ``fn`` until it returns something other than None; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- probes: None = usable, otherwise why not --------------------------------

_cache: Dict[str, Tuple[Optional[Testbed], Optional[str]]] = {}


def _tail(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or proc.stdout or "").strip()
    return text.splitlines()[-1] if text else f"exit status {proc.returncode}"


def _probe_ssh(tb: Testbed) -> Optional[str]:
    # The session must see the test bed's clusters (sshd's SetEnv), or the
    # schedulers' commands would reach whatever else runs on this machine.
    expected = tb.cluster_env()
    proc = tb.ssh("for v in " + " ".join(expected) + '; do echo "$v=${!v}"; done',
                  check=False, timeout=PROBE_TIMEOUT)
    if proc.returncode != 0:
        return f"`ssh {tb.destination}` failed: {_tail(proc)}"
    seen = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    wrong = [f"{k}={seen.get(k)!r} (the env file says {v!r})" for k, v in expected.items()
             if seen.get(k) != v]
    if wrong:
        return f"ssh sessions of {tb.destination} do not point at the test bed: {', '.join(wrong)}"
    return None


def _probe_slurm(tb: Testbed) -> Optional[str]:
    if tb.get("SLURM") != "1":
        return f"the env file {env_file_path()} does not list Slurm"
    # sinfo asks slurmctld; `scontrol show slurmd` asks the node's slurmd,
    # which slurmctld would take SlurmdTimeout (300 s) to miss.
    proc = tb.ssh(
        "sinfo -h -o %t || exit 10; scontrol show slurmd >/dev/null || exit 11",
        check=False,
        timeout=PROBE_TIMEOUT,
    )
    if proc.returncode == 10:
        return f"`sinfo -h` does not answer: {_tail(proc)}"
    if proc.returncode != 0:
        return f"slurmd does not answer `scontrol show slurmd`: {_tail(proc)}"
    states = proc.stdout.split()
    if not any(s in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no Slurm node can run jobs (sinfo states: {' '.join(states) or 'none'})"
    return None


def _probe_sge(tb: Testbed) -> Optional[str]:
    if tb.get("SGE") != "1":
        return f"the env file {env_file_path()} does not list Grid Engine"
    # qstat asks sge_qmaster; qping asks sge_execd, whose death qmaster only
    # notices minutes later.
    host = shlex.quote(tb._required("SGE_HOST"))
    port = shlex.quote(tb._required("SGE_EXECD_PORT"))
    proc = tb.ssh(
        f"qstat -f || exit 10; qping -info {host} {port} execd 1 >/dev/null || exit 11",
        check=False,
        timeout=PROBE_TIMEOUT,
    )
    if proc.returncode == 10:
        return f"`qstat` does not answer: {_tail(proc)}"
    if proc.returncode != 0:
        return f"sge_execd does not answer qping: {_tail(proc)}"
    # Queue instance lines read "all.q@vm BIP 0/0/2 0.13 lx-amd64 [states]";
    # states such as u (execd unreachable), E or d mean no job would start.
    queue = tb.get("SGE_QUEUE", "all.q")
    usable = [
        f for f in (line.split() for line in proc.stdout.splitlines())
        if f and f[0].startswith(f"{queue}@") and len(f) == 5
    ]  # fmt: skip
    if not usable:
        return f"no usable {queue} queue instance in `qstat -f`:\n{proc.stdout.strip()}"
    return None


def _probe_pbs(tb: Testbed) -> Optional[str]:
    if tb.get("PBS") != "1":
        # up.sh says why in its output and in a comment of the env file.
        return (f"the env file {env_file_path()} does not list PBS (LXM3_TESTBED_PBS="
                f"{tb.get('PBS')}; up.sh left it out, and says why)")
    # Through its own sshd: the session must use the test bed's pbs.conf;
    # `qstat -B` asks pbs_server, `pbsnodes` the node as the MoM reported it.
    qstat = shlex.quote(tb.pbs_bin("qstat"))
    pbsnodes = shlex.quote(tb.pbs_bin("pbsnodes"))
    node = shlex.quote(tb.get("PBS_NODE") or tb.pbs_server)
    proc = tb.ssh(
        f'echo "PBS_CONF_FILE=$PBS_CONF_FILE"; {qstat} -B >/dev/null || exit 10; '
        f"{pbsnodes} {node} || exit 11",
        check=False, timeout=PROBE_TIMEOUT, scheduler="pbs",
    )  # fmt: skip
    if proc.returncode == 255:
        return f"`ssh {tb.destination_for('pbs')}` (the PBS sshd) failed: {_tail(proc)}"
    if proc.returncode == 10:
        return f"`qstat -B` does not answer: {_tail(proc)}"
    if proc.returncode != 0:
        return f"`pbsnodes` does not answer: {_tail(proc)}"
    if f"PBS_CONF_FILE={tb.pbs_conf_file}" not in proc.stdout.splitlines():
        return f"ssh sessions of the PBS sshd do not get PBS_CONF_FILE={tb.pbs_conf_file}"
    states = [line.split("=", 1)[1].strip() for line in proc.stdout.splitlines()
              if line.strip().startswith("state =")]
    if not any(s in ("free", "job-busy") for s in states):
        return f"the PBS node cannot run jobs (pbsnodes state: {' '.join(states) or 'none'})"
    return None


_PROBES = {"ssh": _probe_ssh, "slurm": _probe_slurm, "sge": _probe_sge, "pbs": _probe_pbs}


def probe_testbed(kind: str) -> Tuple[Optional[Testbed], Optional[str]]:
    """(Testbed, None) if ``kind`` is usable, else (Testbed or None, reason). Cached."""
    if kind not in KINDS:
        raise ValueError(f"unknown test bed kind {kind!r}; expected one of {KINDS}")
    if kind in _cache:
        return _cache[kind]
    if kind != "ssh":
        # Every kind is reached through ssh: if that fails, say so once.
        tb, reason = probe_testbed("ssh")
        if reason is not None:
            _cache[kind] = (tb, reason)
            return tb, reason
    path = env_file_path()
    tb = None
    try:
        tb = Testbed(read_env_file(path))
    except FileNotFoundError:
        reason = f"no test bed here: {path} does not exist; {UP_HINT}"
    except OSError as e:
        reason = f"cannot read {path}: {e}"
    else:
        if tb.get("ROOT") is None:
            reason = (f"{path} was written by an up.sh from before the test bed ran its own "
                      f"clusters (no LXM3_TESTBED_ROOT); {UP_HINT} (the current one)")
            _cache[kind] = (tb, reason)
            return tb, reason
        try:
            reason = _PROBES[kind](tb)
        except (OSError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            reason = f"probe failed: {e}"
        if reason is not None:
            reason = f"test bed ({path}) not running: {reason}; {UP_HINT}"
    _cache[kind] = (tb, reason)
    return tb, reason


def require_testbed(kind: str) -> Testbed:
    """The test bed for ``kind`` ("ssh", "slurm", "sge" or "pbs"), or skip / fail the test."""
    tb, reason = probe_testbed(kind)
    if reason is None:
        assert tb is not None
        return tb
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{kind} test bed required ({REQUIRE_VAR}=1) but {reason}", pytrace=False)
    pytest.skip(f"{kind}: {reason}")


@pytest.fixture
def ssh_testbed() -> Testbed:
    return require_testbed("ssh")


@pytest.fixture
def slurm_testbed() -> Testbed:
    return require_testbed("slurm")


@pytest.fixture
def sge_testbed() -> Testbed:
    return require_testbed("sge")


@pytest.fixture
def pbs_testbed() -> Testbed:
    return require_testbed("pbs")
