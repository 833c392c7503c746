"""lxm3: launch experiments and sweeps on HPC clusters through XManager's API.

A launcher script describes *what* to run with the ``xm`` API (executables,
jobs, arguments) and *where* with an executor from this module (``Local``,
``Slurm``, ``GridEngine``). lxm3 packages the code as one zip archive, writes
one bash job script per work unit, and runs or submits it.

The file reads top-down: what everything else uses first, then each stage
of a launch in the order data flows through it, then the command line:

    errors, constants and states; helpers used everywhere
    configuration; executable specs; executors
    packaging (specs -> one zip); deployment (one SSH connection per launch)
    managed environments (dependencies resolved here for the cluster's Python)
    job scripts; schedulers (one block each: Slurm, Grid Engine); submission
    records; running locally; jobs and experiments (the ``xm`` API)
    status, logs and cancel; lxm3 0.4.2's module names; cleaning up
    the command line
    appendix: a TOML reader for Pythons without tomllib

Only the standard library is used, so this file and the ``xm`` package can be
copied onto a login node and run with the system Python.
"""

from __future__ import annotations

import os
import re
import string
import sys
import threading
import time
from collections.abc import Mapping

import xm
from xm.utils import ValueObject

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    import datetime
    from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

    Entrypoint = Union[xm.ModuleName, xm.CommandList]
    Walltime = Union[None, int, float, datetime.timedelta, str]

__version__ = "0.5.0.dev0"

# ``from lxm3 import xm_cluster`` is how launchers written for lxm3 0.4.2
# import the cluster API; here it is this very module.
xm_cluster = sys.modules[__name__]
sys.modules.setdefault(__name__ + ".xm_cluster", xm_cluster)

JobRequirements = xm.JobRequirements
ModuleName = xm.ModuleName
CommandList = xm.CommandList


# ---------------------------------------------------------------------------
# Errors: what went wrong, in words the user can act on
# ---------------------------------------------------------------------------


class LaunchError(Exception):
    """A problem the user can fix; shown as a message, without our traceback."""


class ConfigError(LaunchError):
    """The config is missing, unreadable or wrong: the message names the file and key."""


class BuildError(LaunchError):
    """Packaging failed: the message names the spec and the step (pip, build script, ...)."""


class ClusterError(LaunchError):
    """A cluster could not be reached, or refused something: names the server and cluster."""


class ConnectionLost(ClusterError):
    """The SSH connection ended while a command ran: it may have run, in part or whole."""


class TaskFailedError(LaunchError):
    """A local task ended with a non-zero status (a launch waits for its local tasks)."""


# ---------------------------------------------------------------------------
# Constants and states: the knobs, file names and state names in one place
# ---------------------------------------------------------------------------


SSH_KEEP_SECONDS = 300  # an idle connection is kept this long for the next command
# A server that accepts the connection but never answers must not hang a
# command: ssh gives up after SSH_CONNECT_TIMEOUT seconds without an answer
# (OpenSSH counts the banner exchange in), and a connection whose server stops
# answering ends after SSH_KEEPALIVE_INTERVAL x SSH_KEEPALIVE_COUNT seconds.
SSH_CONNECT_TIMEOUT = 20
SSH_KEEPALIVE_INTERVAL = 15
SSH_KEEPALIVE_COUNT = 3

# Linux refuses (E2BIG) to exec a program one of whose argument or environment
# strings ("NAME=value") is longer than MAX_ARG_STRLEN: 32 pages, 131072 bytes
# counting the terminating NUL.
MAX_ARG_STRLEN = 131072
# All strings of one exec, with their NULs and the 8-byte pointers to them,
# must fit in ARG_MAX, usually 2 MiB (a quarter of an 8 MiB stack limit). A
# task may use half: the node's own environment (PATH, the scheduler's
# SLURM_*/SGE_* variables, the module system's) needs the rest.
TASK_INPUT_BUDGET = 1 << 20
_POINTER_SIZE = 8

# The submission script runs on the cluster (or the login node) and must not
# lose a job whatever happens to the client: the connection may drop or the
# user press Ctrl-C while it runs, and it then goes on by itself. So every job
# id is appended to the experiment's submission log (SUBMISSION_LOG) as soon as
# the scheduler returns it, before anything else; a run of the script skips
# the arrays its log already holds (a retry submits only what is missing); runs
# for one experiment take turns under a lock; and a stop file ends a run
# between two submissions. The whole script is one function, called on its
# last line: bash runs nothing of a script cut short in transit.
SUBMISSION_LOG = "submitted"  # in the experiment's directory: "KEY JOB_ID" lines
SUBMISSION_LOCK = "submit.lock"
SUBMISSION_STOP = "submit.stop"
SUBMISSION_LOCK_WAIT = 20  # seconds a reader of the log waits for a running submission
SUBMISSION_STILL_RUNNING = "WARN a submission is still running"

SUBMIT_PARALLELISM = 8  # scheduler calls at once: a split sweep is many calls
JOB_NAME_MAX = 200  # characters of a job name (PBS refuses more than 236)

RECORD_VERSION = 1  # written into each record; a record of a later version is refused
RECORD_SAVE_INTERVAL = 1.0  # seconds between saves while local work units start

LOG_WRITER_LOCK = ".lxm3-writing"  # in a local log directory: held while tasks may write there

FOLLOW_POLL_SECONDS = 0.2  # how often ``lxm3 logs -f`` looks for more of a local log

# ``lxm3 status --watch`` and ``lxm3 wait`` ask each cluster once per interval
# (one round trip): every WATCH_INTERVAL seconds at first, WATCH_BACKOFF times
# less often after each query that saw no change, up to WATCH_MAX_INTERVAL, and
# back to the interval after a change. Schedulers' admins count the queries
# tools make: no interval is shorter than WATCH_MIN_INTERVAL.
WATCH_INTERVAL = 30.0
WATCH_MIN_INTERVAL = 5.0
WATCH_MAX_INTERVAL = 300.0
WATCH_BACKOFF = 1.5
WATCH_LOG_LINES = 5  # lines shown of a newly failed task's log
WATCH_FAILED_QUERIES = 5  # queries failing in a row (connection lost, ...) before a watch gives up
WAIT_TIMEOUT_EXIT = 124  # ``lxm3 wait --timeout``: what timeout(1) exits with


class UnitState:
    """A work unit's ``state``, and the moves allowed between states (NEXT)."""

    ADDING = "adding"  # experiment.add() is making it
    QUEUED = "queued"  # cluster work: waits for the end of the ``with`` block
    SUBMITTING = "submitting"  # being submitted, or the outcome was not seen: the cluster's log knows
    SUBMITTED = "submitted"
    PARTIALLY_SUBMITTED = "partially submitted"  # some arrays were, then the scheduler refused one
    NOT_SUBMITTED = "not submitted"
    RUNNING = "running"  # local tasks (a launch's, or lxm3 rerun's)
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"  # local tasks stopped by Ctrl-C or a failing launcher
    DRY_RUN = "dry run"

    NEXT = {
        ADDING: {QUEUED, RUNNING, DRY_RUN},
        QUEUED: {SUBMITTING, NOT_SUBMITTED, DRY_RUN},
        SUBMITTING: {SUBMITTING, SUBMITTED, PARTIALLY_SUBMITTED, NOT_SUBMITTED},
        SUBMITTED: {SUBMITTING},  # lxm3 rerun submits some of its tasks again
        PARTIALLY_SUBMITTED: {SUBMITTING},
        RUNNING: {COMPLETED, FAILED, STOPPED, RUNNING},  # running again: lxm3 rerun after a lost launch
        COMPLETED: {RUNNING},  # lxm3 rerun runs local tasks again
        FAILED: {RUNNING},
        STOPPED: {RUNNING},
    }

    @classmethod
    def move(cls, old: str, new: str, what: str) -> str:
        """``new``, if a unit in state ``old`` may move to it (else lxm3 has a bug: say so)."""
        if new not in cls.NEXT.get(old, ()):
            raise RuntimeError(f"lxm3 bug: {what} cannot go from {old!r} to {new!r}; please report it")
        return new


class ExperimentStatus:
    """An experiment's ``status``: how its launch went, then how its work ended."""

    LAUNCHING = "launching"
    LAUNCHED = "launched"  # submitted to clusters; ``lxm3 status`` says how it went
    PARTIAL = "partial"  # some work units were submitted, then the launch failed
    INTERRUPTED = "interrupted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskState:
    """A task's state as ``lxm3 status`` reports it, in the order it lists them (ORDER)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # left the queue without an exit record
    NOT_SUBMITTED = "not submitted"

    ORDER = (COMPLETED, RUNNING, PENDING, FAILED, CANCELLED, UNKNOWN, NOT_SUBMITTED)
    ACTIVE = (PENDING, RUNNING)
    RERUN = (FAILED, CANCELLED, UNKNOWN)  # what ``lxm3 rerun --failed`` submits again


# ---------------------------------------------------------------------------
# Helpers used everywhere: progress lines, private files, paths, quoting
# ---------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"lxm3: {message}", file=sys.stderr, flush=True)


def _xdg_dir(variable: str, default: str) -> str:
    value = os.environ.get(variable)
    if value and os.path.isabs(value):
        return value
    return os.path.join(os.path.expanduser("~"), default)


def cache_dir() -> str:
    """Where built archives and build environments are kept between launches."""
    return os.path.join(_xdg_dir("XDG_CACHE_HOME", ".cache"), "lxm3")


def data_dir() -> str:
    """Default home of local job scripts and logs."""
    return os.path.join(_xdg_dir("XDG_DATA_HOME", os.path.join(".local", "share")), "lxm3")


def state_dir() -> str:
    return os.path.join(_xdg_dir("XDG_STATE_HOME", os.path.join(".local", "state")), "lxm3")


def make_private_dirs(path: str) -> None:
    """Make ``path`` and its missing parents 0700, whatever the umask.

    What lxm3 keeps (records with task environments such as API keys, logs,
    archives) is the user's alone. Directories that exist are left as they are.
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another launch
            continue
        os.chmod(directory, 0o700)  # an unusual umask may have taken bits from 0700


def create_private(path: str, mode: int = 0o600) -> int:
    """A descriptor for writing a new file ``path`` made with ``mode`` from the start
    (never readable by others, even for a moment); a file left there by an
    interrupted run is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, mode)
    os.fchmod(fd, mode)  # the umask may have taken the owner's bits; it never adds any
    return fd


def _write_json_atomic(path: str, data: Any) -> None:
    """Replace ``path`` (0600) with ``data``: readers see the old or the new file, whole."""
    import json

    make_private_dirs(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(create_private(tmp), "w", encoding="utf-8") as f:
            # dumps without indent uses the C encoder: a 100,000-task record in
            # 0.1 s instead of 0.8 s.
            f.write(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:  # a full disk: the previous version stays whole
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_json(path: str) -> Optional[Any]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{1 if size < 10 * scale else 0}f} {unit}"
    return f"{size} B"


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _task_ranges(tasks: Iterable[int]) -> str:
    """``0-10, 12, 14-20``: task indices as ranges."""
    ranges: List[List[int]] = []
    for task in sorted(tasks):
        if ranges and task == ranges[-1][1] + 1:
            ranges[-1][1] = task
        else:
            ranges.append([task, task])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


class ClusterConfig(ValueObject):
    """One ``[[clusters]]`` entry of the config file: where a cluster is, how to reach it.

    ``Config.from_file`` makes these from the checked tables (CLUSTER_SCHEMA);
    each entry below names its TOML key. A job picks one with
    ``Slurm(cluster=...)``/``GridEngine(cluster=...)``/``PBS(cluster=...)``, else ``$LXM_CLUSTER``,
    else the first ``[[clusters]]``.

    Args:
      name: ``name``: what ``cluster=...`` and ``$LXM_CLUSTER`` refer to.
        Required: a table without one is a ConfigError.
      server: ``server``: the login node's host name, or a ``Host`` alias of
        your ssh config, reached with the system ``ssh`` over one kept,
        multiplexed connection. Default None: this machine is the login node
        (``sbatch``/``qsub`` run here, no ssh).
      user: ``user``: ``ssh -l USER``. Default None: ssh's own choice (your ssh
        config, else your user name here).
      port: ``port``: ``ssh -p PORT``, 1-65535. Default None: ssh's own.
      ssh_private_key: ``ssh_private_key``: ``ssh -i KEY`` (``~`` expanded).
        Default None: ssh's keys and agent.
      staging: ``[clusters.storage] staging``: the directory on the cluster
        that holds archives, images, job scripts and logs
        (``archives/``, ``images/``, ``experiments/<id>/``); a relative path or
        ``~/...`` starts at your home directory there. Created private (0700)
        at each launch. Default None: ``~/lxm3-staging``.
      env: ``[clusters.env]``: variables exported into every task on this
        cluster unless its job sets them (numbers and booleans in the file are
        written as text). A reserved or invalid name (``LXM_TASK_ID``,
        ``lxm_*``, ``PWD``...) is a ValueError (ConfigError from the file).
        Default: none.
      singularity_binds: ``[[clusters.singularity.binds]]`` as ``(src, dest)``
        pairs (``dest`` defaults to ``src``): bound into every Singularity/
        Apptainer container on this cluster, before ``SingularityOptions.bind``.
        Default: none.
      raw: the whole table as read. The scheduler settings are read from it as
        directives are written: ``[clusters.slurm] gpu_types`` (the site's
        ``--gres`` type names, e.g. ``{A100 = "a100_80g"}``);
        ``[clusters.sge]`` ``gpu_types``, ``parallel_environment`` (default
        ``smp``), ``memory_resource`` (default ``h_vmem``), ``gpu_resource``
        (default ``gpu``) and ``gpu_type_resource`` (no default: a GPU model
        on Grid Engine needs it); ``[clusters.pbs]`` ``gpu_types``,
        ``cpu_resource`` (default ``ncpus``), ``memory_resource`` (``mem``),
        ``gpu_resource`` (``ngpus``), ``gpu_type_resource`` (no default). In
        each of the three, ``bin_dir``: the directory of the scheduler's
        commands there, put first on the PATH of everything lxm3 runs there,
        for a cluster where another scheduler's ``qsub`` comes first (e.g.
        ``bin_dir = "/opt/pbs/bin"``; ``~/`` starts at your home). Default: empty.
      ssh_connect_timeout: ``ssh_connect_timeout``: seconds without an answer
        before ssh gives up (``ConnectTimeout``). Default None: 20
        (SSH_CONNECT_TIMEOUT). ``$LXM3_SSH_CONNECT_TIMEOUT`` overrides both.
      ssh_keepalive_interval: ``ssh_keepalive_interval``: seconds between
        keep-alives (``ServerAliveInterval``); 3 unanswered end the connection.
        Default None: 15 (SSH_KEEPALIVE_INTERVAL).
        ``$LXM3_SSH_KEEPALIVE_INTERVAL`` overrides both.
      ssh_config: ``ssh_config``: an ssh config file read instead of
        ``~/.ssh/config`` (``ssh -F FILE``), for every ssh and rsync lxm3 runs;
        in the file, a relative path is relative to the config file's directory.
        A missing file is a ConfigError when lxm3 connects. Default None.
      proxycommand: ``proxycommand``: ``ssh -o ProxyCommand=...``, as lxm3
        0.4.2 read it. Default None.
      python: ``python``: the Python tasks run there without a container: a
        command found on the PATH after the executor's ``modules`` are loaded
        (``"python3.11"``) or an absolute path. Each launch asks it for its
        version and platform (shown by ``--dry-run``, kept in the record), and
        the job script sets ``LXM_PYTHON`` to it unless the task sets
        ``LXM_PYTHON`` itself. A configured one that is missing is a
        ClusterError naming this key. Default None: ``python3``.
      environment: ``environment``: ``"managed"`` gives every ``PythonPackage``
        launched here that does not say otherwise a managed environment of
        its declared dependencies (see ``PythonPackage(environment=...)``);
        ``"none"``: no managed environment. Default None: ``"none"``.
      environments: ``environments``: the directory on the cluster that holds
        managed environments, e.g. a scratch file system with a larger
        file-count quota; ``~/...`` or a relative path starts at your home
        directory there. Default None: ``<staging>/envs``.
    """

    _repr_hidden = ("raw",)

    def __init__(
        self,
        name: str,
        server: Optional[str] = None,
        user: Optional[str] = None,
        port: Optional[int] = None,
        ssh_private_key: Optional[str] = None,
        staging: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        singularity_binds: Optional[List[Tuple[str, str]]] = None,
        raw: Optional[Dict[str, Any]] = None,
        ssh_connect_timeout: Optional[float] = None,  # seconds; None: SSH_CONNECT_TIMEOUT
        ssh_keepalive_interval: Optional[float] = None,  # seconds; None: SSH_KEEPALIVE_INTERVAL
        ssh_config: Optional[str] = None,  # an ssh config file to read instead of ~/.ssh/config
        proxycommand: Optional[str] = None,  # ssh's ProxyCommand
        python: Optional[str] = None,  # the interpreter tasks run; None: python3
        environment: Optional[str] = None,  # "managed" or "none"; None: "none"
        environments: Optional[str] = None,  # where managed environments live; None: <staging>/envs
    ):
        self.name = name
        self.server = server
        self.user = user
        self.port = port
        self.ssh_private_key = ssh_private_key
        self.staging = staging
        self.env = {} if env is None else env
        check_env(self.env, f"[clusters.env] of cluster {name!r}")
        self.singularity_binds = [] if singularity_binds is None else singularity_binds
        self.raw = {} if raw is None else raw
        self.ssh_connect_timeout = ssh_connect_timeout
        self.ssh_keepalive_interval = ssh_keepalive_interval
        self.ssh_config = ssh_config
        self.proxycommand = proxycommand
        for key, value, check in (("python", python, _python_command),
                                  ("environment", environment, _environment_choice)):
            problem = None if value is None else check(value)
            if problem:
                raise ValueError(f"'{key}' of cluster {name!r} {problem}, not {_kind(value)}")
        self.python = python
        self.environment = environment
        self.environments = environments

    @property
    def python_command(self) -> str:
        """The interpreter tasks run: the configured ``python``, else ``python3``."""
        return self.python or "python3"

    def scheduler_bin(self, scheduler: str) -> Optional[str]:
        """``[clusters.<scheduler>] bin_dir``: the directory of that scheduler's
        commands there (None: the PATH finds them)."""
        settings = self.raw.get(scheduler)
        return settings.get("bin_dir") or None if isinstance(settings, Mapping) else None

    def path_line(self) -> str:
        """Bash putting the configured ``bin_dir`` directories first on the PATH."""
        dirs = [d for d in (self.scheduler_bin(name) for name in SCHEDULERS) if d]
        words = [f'"$HOME"{shell_quote(d[1:])}' if d.startswith("~/") else shell_quote(d) for d in dirs]
        return f'PATH={":".join(words)}:"$PATH"\n' if words else ""


class Config(ValueObject):
    """The user's lxm3 configuration (the format of lxm3 0.4.2).

    Usually read for you: ``load_config()`` takes the first file found of
    ``--lxm_config PATH``, ``$LXM_CONFIG``, ``./lxm.toml`` and
    ``$XDG_CONFIG_HOME/lxm3/config.toml`` (``~/.config/lxm3/config.toml``),
    or an empty Config when there is none (local runs need none). Every key
    of the file is checked against CONFIG_SCHEMA by ``from_file``/
    ``from_dict``: an unknown key or a wrong type is a ConfigError naming the
    file, the key and the valid keys. Make one yourself to pass as
    ``create_experiment(config=...)``. Each entry below names its TOML key.

    Args:
      project: ``project``: a name kept in each launch's record; not part of
        any path. ``$LXM_PROJECT`` overrides it (in ``from_dict``, and again in
        ``create_experiment``). Default None.
      local_staging: ``[local.storage] staging``: where local job scripts,
        tasks files and logs go (``experiments/<id>/wu<n>/``); in the file a
        relative path is relative to the current directory, as in lxm3 0.4.2.
        Default None: ``$XDG_DATA_HOME/lxm3`` (``~/.local/share/lxm3``).
      local_env: ``[local.env]``: variables exported into every local task
        unless its job sets them. A reserved or invalid name is a ValueError
        (ConfigError from the file). Default: none.
      clusters: ``[[clusters]]``: ``ClusterConfig`` objects. ``Slurm`` and
        ``GridEngine`` jobs need at least one: without, packaging for them
        stops with a ConfigError before anything is built. Default: none.
      path: the file this was read from, named in messages. Default None.
      local_singularity_binds: ``[[local.singularity.binds]]`` as
        ``(src, dest)`` pairs, bound into containers of ``Local`` tasks before
        ``SingularityOptions.bind``. Default: none.
    """

    def __init__(
        self,
        project: Optional[str] = None,
        local_staging: Optional[str] = None,
        local_env: Optional[Dict[str, str]] = None,
        clusters: Optional[List[ClusterConfig]] = None,
        path: Optional[str] = None,
        local_singularity_binds: Optional[List[Tuple[str, str]]] = None,
    ):
        self.project = project
        self.local_staging = local_staging
        self.local_env = {} if local_env is None else local_env
        check_env(self.local_env, "[local.env]")
        self.clusters = [] if clusters is None else clusters
        self.path = path
        self.local_singularity_binds = [] if local_singularity_binds is None else local_singularity_binds

    @classmethod
    def from_file(cls, path: str) -> Config:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the lxm3 config {path}: {e.strerror}") from None
        try:
            data = _toml_loads(text)
        except ValueError as e:  # tomllib, tomli and our reader all raise ValueError subclasses
            raise ConfigError(f"{path}: {e}") from None
        return cls.from_dict(data, path=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Optional[str] = None) -> Config:
        """Check ``data`` against CONFIG_SCHEMA, then read it; ConfigError names
        ``path``, the key and what it may be."""
        try:
            _check_table(data, CONFIG_SCHEMA, "")
            _check_required(data)
            local = data.get("local", {})
            staging = local.get("storage", {}).get("staging")
            return cls(
                project=os.environ.get("LXM_PROJECT") or data.get("project") or None,
                # lxm3 0.4.2 resolved a relative local staging path against the
                # current directory; keep that so existing configs mean the same.
                local_staging=os.path.abspath(os.path.expanduser(staging)) if staging else None,
                local_env=_str_dict(local.get("env", {})),
                clusters=[_cluster_config(c, os.path.dirname(os.path.abspath(path)) if path else None)
                          for c in data.get("clusters", [])],
                path=path,
                local_singularity_binds=_binds(local),
            )
        except ValueError as e:  # the schema, or an env the job script cannot deliver
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None

    def require_clusters(self) -> None:
        """Refuse to go on without a cluster: Slurm and GridEngine need one."""
        if not self.clusters:
            where = self.path or "no config file was found"
            raise ConfigError(
                f"no [[clusters]] in the lxm3 config ({where}); add one, or see "
                "'lxm3 launch --help' for where the config is looked for"
            )

    def cluster(self, name: Optional[str] = None) -> ClusterConfig:
        """Pick a cluster: by name, else ``$LXM_CLUSTER``, else the first one."""
        name = name or os.environ.get("LXM_CLUSTER")
        self.require_clusters()
        if name is None:
            return self.clusters[0]
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        known = ", ".join(repr(c.name) for c in self.clusters)
        raise ConfigError(f"no cluster named {name!r} in {self.path}; known: {known}")

    def default_cluster(self) -> str:
        """The name of the cluster launches go to (lxm3 0.4.2's method)."""
        return self.cluster().name


# -- What a config may hold ---------------------------------------------------
#
# One schema per table: key -> what its value must be: str, a check that
# returns what is wrong, a dict (a table of its own; key "*" stands for any
# name), or a one-item list (an array of such tables). Every other key is
# refused, with the valid ones: a misspelt key read as absent could send a
# launch elsewhere (``servr``: to this machine). Every key lxm3 0.4.2 read is
# honoured, or refused (_Refused) with what to do instead.


def _text(value: Any) -> Optional[str]:
    """An env value: a string; numbers and booleans are written as text."""
    return None if isinstance(value, (str, int, float)) else "must be a string"


def _port(value: Any) -> Optional[str]:
    ok = type(value) is int and 1 <= value <= 65535
    return None if ok else "must be a port number from 1 to 65535"


def _seconds(value: Any) -> Optional[str]:
    ok = type(value) in (int, float) and value > 0
    return None if ok else "must be a number of seconds above 0"


def _python_command(value: Any) -> Optional[str]:
    """A command (``python3.11``) or an absolute path: one word, as ``"$LXM_PYTHON"`` runs it."""
    if not isinstance(value, str) or not value or re.search(r"[\s\x00-\x1f]", value) \
            or ("/" in value and not value.startswith("/")):
        return "must be a command name such as \"python3.11\" or an absolute path, one word"
    return None


def _environment_choice(value: Any) -> Optional[str]:
    return None if value in ENVIRONMENT_CHOICES else f"must be one of {', '.join(map(repr, ENVIRONMENT_CHOICES))}"


ENVIRONMENT_CHOICES = ("managed", "none")


class _Refused:
    """A key lxm3 0.4.2 read that lxm3 does not: refused, with what to do instead."""

    def __init__(self, advice: str):
        self.advice = advice


_SINGULARITY = {
    "binds": [{"src": str, "dest": str}],
    "env": _Refused("lxm3 does not read singularity.env (lxm3 0.4.2 ignored it too): put the "
                    "variables in the env table beside it; tasks get them in containers too"),
}
CLUSTER_SCHEMA = {
    "name": str,
    "server": str,
    "user": str,
    "port": _port,
    "ssh_private_key": str,
    "ssh_connect_timeout": _seconds,
    "ssh_keepalive_interval": _seconds,
    "storage": {"staging": str},
    "env": {"*": _text},
    "singularity": _SINGULARITY,
    "slurm": {"bin_dir": str, "gpu_types": {"*": str}},
    "sge": {"bin_dir": str, "gpu_types": {"*": str}, "parallel_environment": str, "memory_resource": str,
            "gpu_resource": str, "gpu_type_resource": str},
    "pbs": {"bin_dir": str, "gpu_types": {"*": str}, "cpu_resource": str, "memory_resource": str,
            "gpu_resource": str, "gpu_type_resource": str},
    "password": _Refused(
        "lxm3 takes no passwords: it logs in with your ssh keys or ssh-agent, and when a "
        "password or 2FA code is needed ssh asks for it itself, once per kept connection; "
        "remove the key (ssh-copy-id installs a key for logins without one)"),
    "proxycommand": str,  # as lxm3 0.4.2: ssh -o ProxyCommand=...
    "ssh_config": str,  # ssh -F FILE
    "python": _python_command,
    "environment": _environment_choice,
    "environments": str,
}
CONFIG_SCHEMA = {
    "project": str,
    "local": {"storage": {"staging": str}, "env": {"*": _text}, "singularity": _SINGULARITY},
    "clusters": [CLUSTER_SCHEMA],
}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    kind = {str: "a string", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})"


def _toml_header(where: str) -> str:
    """``clusters[0].storage`` -> ``[clusters.storage]``; ``clusters[0]`` -> ``[[clusters]]``."""
    name = re.sub(r"\[\d+\]", "", where)
    return f"[[{name}]]" if where.endswith("]") else f"[{name}]" if where else "the top level"


def _check_table(data: Mapping[str, Any], schema: Mapping[str, Any], where: str,
                 cluster: str = "") -> None:
    """Raise ValueError for the first value of ``data`` that ``schema`` does not allow.

    ``where`` is the table's dotted path; ``cluster`` names the cluster it belongs to.
    """
    of_cluster = f" (cluster {cluster!r})" if cluster else ""
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        rule = schema.get(key, schema.get("*"))
        if rule is None:
            import difflib

            valid = [k for k, r in schema.items() if not isinstance(r, _Refused)]
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) or [
                f"{k}.{key}" for k, r in schema.items() if isinstance(r, dict) and key in r]
            raise ValueError(f"unknown key '{path}'{of_cluster}"
                             f"{f'; did you mean {close[0]!r}?' if close else '.'} "
                             f"The keys of {_toml_header(where)} are: {', '.join(valid)}")
        problem = None
        if isinstance(rule, _Refused):
            problem = f"is not supported: {rule.advice}"
        elif isinstance(rule, dict):
            if isinstance(value, Mapping):
                _check_table(value, rule, path, cluster)
            else:
                problem = f"must be a table ({_toml_header(path)})"
        elif isinstance(rule, list):
            if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
                for i, item in enumerate(value):
                    name = item.get("name") if path == "clusters" else cluster
                    _check_table(item, rule[0], f"{path}[{i}]", name if isinstance(name, str) else "")
            else:
                problem = f"must be an array of tables: write [[{_toml_header(path)[1:-1]}]]"
        elif rule is str:
            problem = None if isinstance(value, str) else "must be a string"
        else:
            problem = rule(value)
        if problem:
            raise ValueError(f"'{path}'{of_cluster} {problem}"
                             f"{'' if isinstance(rule, _Refused) else ', not ' + _kind(value)}")


def _check_required(data: Mapping[str, Any]) -> None:
    """Every cluster has a name, every bind a ``src``."""
    sections = [("local", "", data.get("local", {}))]
    for i, cluster in enumerate(data.get("clusters", [])):
        if not cluster.get("name"):
            raise ValueError(f"clusters[{i}] has no 'name': add name = \"...\" to that [[clusters]] table")
        sections.append((f"clusters[{i}]", f" (cluster {cluster['name']!r})", cluster))
    for where, of_cluster, section in sections:
        for j, bind in enumerate(section.get("singularity", {}).get("binds", [])):
            if "src" not in bind:
                raise ValueError(f"'{where}.singularity.binds[{j}]'{of_cluster} has no 'src' "
                                 "(the path on the host)")


def _str_dict(data: Mapping[str, Any]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in data.items()}


def _binds(section: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """``[[...singularity.binds]]``: (host path, container path); ``dest`` defaults to ``src``."""
    binds = section.get("singularity", {}).get("binds", [])
    return [(b["src"], b.get("dest", b["src"])) for b in binds]


def _cluster_config(data: Mapping[str, Any], config_dir: Optional[str] = None) -> ClusterConfig:
    """A checked ``[[clusters]]`` table; a relative ``ssh_config`` path is relative
    to ``config_dir``, the config file's directory."""
    ssh_config = data.get("ssh_config") or None
    if ssh_config:
        ssh_config = os.path.join(config_dir or os.getcwd(), os.path.expanduser(ssh_config))
    return ClusterConfig(
        name=data["name"],
        server=data.get("server") or None,
        user=data.get("user") or None,
        port=data.get("port"),
        ssh_private_key=data.get("ssh_private_key") or None,
        staging=data.get("storage", {}).get("staging"),
        env=_str_dict(data.get("env", {})),
        singularity_binds=_binds(data),
        raw=dict(data),
        ssh_connect_timeout=data.get("ssh_connect_timeout"),
        ssh_keepalive_interval=data.get("ssh_keepalive_interval"),
        ssh_config=ssh_config,
        proxycommand=data.get("proxycommand") or None,
        python=data.get("python"),
        environment=data.get("environment"),
        environments=data.get("environments") or None,
    )


class LaunchOptions(ValueObject):
    """What ``lxm3 launch`` was told, for the experiments its launcher creates.

    A launcher calls ``create_experiment()`` and ``load_config()`` without
    them, so ``lxm3 launch`` makes its options current while the launcher
    runs (``with options.applied():``); nothing outlives that launch.

    Args:
      config_path: the config file given as ``--lxm_config`` (None: the
        usual search, see ``find_config_file``).
      dry_run_directory: ``--dry-run``: where job scripts are written instead
        of being copied, submitted or run (None: a real launch).
    """

    def __init__(self, config_path: Optional[str] = None, dry_run_directory: Optional[str] = None):
        self.config_path = config_path
        self.dry_run_directory = dry_run_directory
        self._experiments_created = 0  # tells lxm3 launch whether the launcher ran its main
        self._experiment_ids: List[int] = []  # recorded experiments it created, for lxm3 launch --wait

    def applied(self):
        """A context in which ``current_launch()`` is this one."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            _launch_stack.append(self)
            try:
                yield self
            finally:
                _launch_stack.remove(self)

        return scope()


_launch_stack: List[LaunchOptions] = []  # the launches lxm3 launch is running (one, or none)


def current_launch() -> LaunchOptions:
    """The options of the running ``lxm3 launch``; defaults when a launcher runs by itself."""
    return _launch_stack[-1] if _launch_stack else LaunchOptions()


def find_config_file(explicit: Optional[str] = None) -> Optional[str]:
    """``explicit``, ``--lxm_config``, ``$LXM_CONFIG``, ``./lxm.toml``, then the user's config."""
    explicit = explicit or current_launch().config_path or os.environ.get("LXM_CONFIG")
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"lxm3 config {explicit} does not exist")
        return explicit
    candidates = [
        os.path.abspath("lxm.toml"),
        os.path.join(_xdg_dir("XDG_CONFIG_HOME", ".config"), "lxm3", "config.toml"),
    ]
    return next((p for p in candidates if os.path.isfile(p)), None)


def load_config(path: Optional[str] = None) -> Config:
    """The config in force (or the file ``path``); an empty one when there is no
    file (local runs need none)."""
    path = find_config_file(path)
    return Config.from_file(path) if path else Config()


# ---------------------------------------------------------------------------
# Paths relative to the launcher
# ---------------------------------------------------------------------------

def resolve_path(path: str) -> str:
    """Relative paths in a launcher mean its own directory, wherever it runs from."""
    return xm.utils.resolve_path_relative_to_launcher(os.path.expanduser(os.fspath(path)))


# ---------------------------------------------------------------------------
# Executable specs
# ---------------------------------------------------------------------------


class Fileset:
    """Extra files to ship in the archive: ``{local path: path in the archive}``.

    Given to ``PythonPackage(resources=[...])`` (or ``PDMProject``,
    ``PythonContainer``). Tasks run in the unpacked archive, so a file shipped
    at ``"data/vocab.txt"`` is opened as ``data/vocab.txt``;
    ``fileset.get_path("data/vocab.txt", executor_spec)`` returns just that
    (a name that is not a destination is a ValueError). ``add_path(src, dst)``
    adds one more, with the same rules as ``files``.

    Args:
      files: ``{src: dst}``, e.g. ``{"configs": "configs",
        "~/vocab.txt": "data/vocab.txt"}``. ``src`` is a file or a directory
        (shipped whole, without ``__pycache__``) on this machine; relative
        paths mean the launcher's directory, ``~`` is expanded; a missing one
        is a BuildError at packaging. ``dst`` is relative to the archive's
        root: an absolute path or one that leaves it (``../x``) is a
        ValueError at once. A file where the build already put one is fine
        with the same content; with other content it is a BuildError naming
        both (lxm3 0.4.2 refused every overlap). Default: none.
    """

    def __init__(self, files: Optional[Mapping[str, str]] = None):
        self.files: Dict[str, str] = {}
        for src, dst in (files or {}).items():
            self.add_path(src, dst)

    def add_path(self, src: str, dst: str) -> None:
        dst = os.path.normpath(dst)
        if os.path.isabs(dst) or dst.split(os.sep)[0] == "..":
            raise ValueError(f"Fileset destination {dst!r} must be a relative path inside the archive")
        self.files[resolve_path(src)] = dst

    def get_path(self, name: str, executor_spec: Optional[xm.ExecutorSpec] = None) -> str:
        """Where ``name`` is found from a task: tasks run in the unpacked archive."""
        del executor_spec
        if name not in self.files.values():
            raise ValueError(f"{name!r} is not a destination in this Fileset")
        return name


class PythonPackage(xm.ExecutableSpec, ValueObject):
    """A Python project installed with ``pip install --target`` into the archive.

    At packaging, the launching interpreter runs ``python -m pip install
    --target DIR <pip_args> <path> <extra_packages>``; the result, the
    ``resources`` and an ``entrypoint.sh`` become one reproducible zip, kept
    in ``~/.cache/lxm3/archives`` under its content hash: an unchanged
    project is neither rebuilt nor sent again. Each task unpacks it into a
    new temporary directory (``$TMPDIR``), runs there with it first on
    ``PYTHONPATH``, and removes it at exit.

    Args:
      entrypoint: what a task runs. ``xm_cluster.ModuleName("pkg.main")``
        runs ``python3 -m pkg.main <task args>`` (``$LXM_PYTHON`` instead of
        ``python3`` if a task sets it; local tasks without a container use the
        launching interpreter). After the build the module must be in the
        archive, else a BuildError (only a warning when its top-level package
        is not there at all: the node's Python or the image may have it).
        ``xm_cluster.CommandList(["cd data", "python3 -m pkg.main"])`` is a
        shell script, one command per line; the task's arguments go to the
        last one unless it ends with ``"$@"``. Anything else is a TypeError,
        and an invalid module name or an empty CommandList a ValueError, at
        once.
      path: the project directory, with a ``pyproject.toml`` or ``setup.py``
        (else a BuildError). Default ``"."``; a relative path means the
        launcher's directory, wherever ``lxm3 launch`` runs from. Its name,
        non-word characters as ``_``, names the archive.
      resources: ``Fileset`` objects: more files to ship. Default: none.
      extra_packages: more arguments of the same ``pip install``: other
        projects' paths (an item starting with ``.``, ``/`` or ``~``, or
        holding a ``/``, is a path; relative to the launcher's directory) or
        requirement strings such as ``"einops==0.8.0"``. Default: none.
      pip_args: the options of that ``pip install``; given, they replace the
        default ``["--no-deps", "--no-compile"]``. With ``--no-deps``
        dependencies are not shipped: the node's Python or the container
        image must have them; without it they are installed into the archive
        too, by this machine's pip for this machine's Python. The build
        requirements (``[build-system] requires``) are installed once into a
        cached environment used with ``--no-build-isolation``, unless
        ``pip_args`` holds ``--no-build-isolation`` or ``--use-pep517``.
      environment: where tasks on a cluster find the project's dependencies.
        ``"managed"``: in a managed environment lxm3 makes on the cluster for
        the cluster's Python (config ``python``): the dependencies are
        resolved on this machine, as wheels for that Python and platform, by
        this machine's pip, from the pins beside the project (``pylock.toml``,
        else ``requirements.txt``) or else ``[project] dependencies`` of its
        ``pyproject.toml`` (and those of ``extra_packages`` paths); the
        environment is sent once, unpacked under its content hash (config
        ``environments``, default ``<staging>/envs``), shared by every task
        and later launch with the same key, and put on ``PYTHONPATH`` after
        the code. ``"none"``: no managed environment (the node's Python or
        the image must have them). Default None: the cluster's
        ``environment`` setting, else ``"none"``. Containers and ``Local``
        tasks never use one. Anything else is a ValueError, at once.
    """

    def __init__(
        self,
        entrypoint: Entrypoint,
        path: str = ".",
        resources: Optional[List[Fileset]] = None,
        extra_packages: Optional[List[str]] = None,
        pip_args: Optional[List[str]] = None,
        environment: Optional[str] = None,
    ):
        _check_entrypoint(entrypoint)
        if environment is not None and environment not in ENVIRONMENT_CHOICES:
            raise ValueError(f"PythonPackage(environment={environment!r}) must be one of "
                             f"{', '.join(map(repr, ENVIRONMENT_CHOICES))} or None (the cluster's setting)")
        self.entrypoint = entrypoint
        self.path = resolve_path(path)
        self.resources = [] if resources is None else resources
        self.extra_packages = [_resolve_if_local(p) for p in extra_packages or []]
        self.pip_args = ["--no-deps", "--no-compile"] if pip_args is None else pip_args
        self.environment = environment

    @property
    def name(self) -> str:
        return _name_from_path(self.path)


class UniversalPackage(xm.ExecutableSpec, ValueObject):
    """Anything a build script writes into ``$BUILDDIR``, run with one command line.

    ``entrypoint`` holds its words, joined with spaces as lxm3 0.4.2 did.

    At packaging, ``build_script`` runs on this machine with ``path`` as its
    working directory and ``$BUILDDIR`` an empty directory; what it writes
    there is zipped with an ``entrypoint.sh`` into the archive, cached under
    its content hash like ``PythonPackage``'s. Tasks run ``entrypoint`` in
    the unpacked archive. The cache is keyed by the files under ``path``
    (their sizes and times, without ``.git``, caches and the top-level
    ``build/`` and ``dist/``), the script and its arguments: a change
    elsewhere that the script reads does not rebuild.

    Args:
      entrypoint: the words of one command line: ``["python3", "main.py"]``
        runs ``python3 main.py <task args>``. They are joined with spaces, so
        they are shell words: quote a path with spaces inside its item. (An
        ``xm.CommandList`` is one command per line instead.) A string or an
        empty list is a ValueError, at once.
      build_script: the program that builds, relative to ``path``; it must
        exist and be executable (``chmod +x``), else a BuildError at
        packaging. A non-zero exit is a BuildError with its output.
      build_args: arguments of ``build_script``. Default: none.
      path: the project directory. Default ``"."``; a relative path means
        the launcher's directory. Its name, non-word characters as ``_``,
        names the archive.
    """

    def __init__(
        self,
        entrypoint: List[str],
        build_script: str,
        build_args: Optional[List[str]] = None,
        path: str = ".",
    ):
        if isinstance(entrypoint, str) or not entrypoint:
            raise ValueError("UniversalPackage entrypoint must be a non-empty list: the words of "
                             "one command line, e.g. ['python3', 'main.py']")
        self.entrypoint = entrypoint
        self.path = resolve_path(path)
        self.build_script = os.path.normpath(os.path.join(self.path, build_script))
        self.build_args = [] if build_args is None else build_args

    @property
    def name(self) -> str:
        return _name_from_path(self.path)


class SingularityContainer(xm.ExecutableSpec, ValueObject):
    """A packaged executable run inside a Singularity/Apptainer image.

    The task's archive is unpacked on the node as usual and bound into the
    container at its own path, which is the working directory; the image
    supplies the rest (Python, libraries). The executor's
    ``singularity_options`` say how it runs (binds, ``--nv``, the runtime).
    Works on ``Local``, ``Slurm`` and ``GridEngine``.

    Args:
      entrypoint: a ``PythonPackage`` or ``UniversalPackage``: what runs
        inside the image (anything else is a TypeError at packaging).
      image_path: the image, one of: a ``.sif`` file here (a relative path
        means the launcher's directory), sent to the cluster's staging
        directory once, under its content hash; a URI the runtime fetches on
        the node (``docker://python:3.11``, ``library://``, ``oras://``,
        ``http(s)://``); or an image only this machine has,
        ``docker-daemon:name:tag`` (the local Docker daemon) or
        ``docker-archive:image.tar`` (``docker save`` output; ``//`` after
        the colon is optional), converted here to a ``.sif`` by apptainer or
        singularity once per image id (kept in ``~/.cache/lxm3/sif``) and
        sent like a file.
    """

    def __init__(self, entrypoint: Union[PythonPackage, UniversalPackage], image_path: str):
        self.entrypoint = entrypoint
        docker_image = docker_transport(image_path)
        if docker_image and docker_image[0] == "docker-archive":
            image_path = f"docker-archive:{resolve_path(docker_image[1])}"
        elif not docker_image and not is_image_uri(image_path):
            image_path = resolve_path(image_path)
        self.image_path = image_path

    @property
    def name(self) -> str:
        return self.entrypoint.name


class DockerContainer(xm.ExecutableSpec, ValueObject):
    """A packaged executable run inside a Docker image (``Local`` only).

    Tasks run ``docker run --rm --init --user $(id -u):$(id -g)`` with the
    unpacked archive bound at its own path as the working directory and the
    task's variables passed with ``-e``; ``Local(docker_options=...)`` adds
    volumes and options. A job on ``Slurm`` or ``GridEngine`` is refused
    when added (use ``SingularityContainer("docker://...")`` there).

    Args:
      entrypoint: a ``PythonPackage`` or ``UniversalPackage``: what runs
        inside the image (anything else is a TypeError at packaging).
      image: an image reference as ``docker run`` takes it, e.g.
        ``"python:3.11-slim"`` (pulled by Docker if missing); used as given,
        not read as a path.
    """

    def __init__(self, entrypoint: Union[PythonPackage, UniversalPackage], image: str):
        self.entrypoint = entrypoint
        self.image = image

    @property
    def name(self) -> str:
        return self.entrypoint.name


class _DockerBuiltProject(xm.ExecutableSpec, ValueObject):
    """What PDMProject and PythonContainer share: an image built by ``docker
    build`` from ``base_image`` with the project's dependencies, and the
    project's code packaged as a ``PythonPackage`` run inside it."""

    def _init_project(self, entrypoint, base_image, path, resources, extra_packages, pip_args) -> None:
        _check_entrypoint(entrypoint)
        self.entrypoint = entrypoint
        self.base_image = base_image
        self.path = resolve_path(path)
        self.resources = [] if resources is None else list(resources)
        self.extra_packages = [_resolve_if_local(p) for p in extra_packages or []]
        self.pip_args = ["--no-deps", "--no-compile"] if pip_args is None else list(pip_args)

    @property
    def name(self) -> str:
        return _name_from_path(self.path)


class PDMProject(_DockerBuiltProject):
    """A PDM project whose locked dependencies are built into a Docker image.

    As in lxm3 0.4.2: ``docker build`` makes ``<name>:latest`` (``name``:
    the project directory's name, lower-cased) from ``base_image`` with the
    dependencies ``pdm export`` lists from the lock file, installed by pip;
    the project's own code is packaged as a ``PythonPackage`` and unpacked
    when a task starts, so a code change needs no new image. Packaged with
    ``Local.Spec()`` the image runs with Docker (``Local(docker_options=...)``);
    with ``Slurm.Spec()``/``GridEngine.Spec()`` it runs as a ``.sif``
    converted here (with apptainer or singularity) once per image id and
    sent once (``singularity_options=...``). Needs ``docker`` here.

    Args:
      entrypoint: ``ModuleName("pkg.main")`` (``python3 -m pkg.main``) or
        ``CommandList([...])`` (shell commands; the last gets the task's
        arguments), run inside the image; checked as for ``PythonPackage``.
      base_image: the Docker image to build on, e.g. ``"python:3.11-slim"``;
        it must have ``python3`` and ``pip`` (``pdm`` is installed into a
        build stage).
      lock_file: the PDM lock file, relative to ``path`` and inside it (else
        a BuildError); ``pyproject.toml`` must be there too. Default
        ``"pdm.lock"``.
      path: the project directory (``pyproject.toml``); also the Docker build
        context and the ``PythonPackage`` of the code. Default ``"."``;
        relative paths mean the launcher's directory.
      resources: ``Fileset`` objects: extra files shipped with the code.
        Default: none.
      extra_packages: more projects (paths) or requirements installed with the
        code, as for ``PythonPackage``. Default: none.
      pip_args: options of the ``pip install`` that packages the code, as for
        ``PythonPackage``. Default ``["--no-deps", "--no-compile"]``: the
        dependencies come from the image.
    """

    def __init__(
        self,
        entrypoint: Entrypoint,
        base_image: str,
        lock_file: str = "pdm.lock",
        path: str = ".",
        resources: Optional[List[Fileset]] = None,
        extra_packages: Optional[List[str]] = None,
        pip_args: Optional[List[str]] = None,
    ):
        self._init_project(entrypoint, base_image, path, resources, extra_packages, pip_args)
        self.lock_file = lock_file


class PythonContainer(_DockerBuiltProject):
    """A Python project whose ``requirements.txt`` is built into a Docker image.

    As ``PDMProject``, with the image's dependencies installed by ``pip
    install -r requirements``: ``docker build`` makes ``<name>:latest``; the
    code is packaged as a ``PythonPackage``; ``Local`` runs the image with
    Docker, clusters as a ``.sif`` converted here once per image id.

    Args:
      entrypoint: ``ModuleName("pkg.main")`` or ``CommandList([...])``, run
        inside the image; checked as for ``PythonPackage``.
      base_image: the Docker image to build on, e.g. ``"python:3.11-slim"``;
        it must have ``python3`` and ``pip``.
      requirements: the requirements file, relative to ``path`` and inside
        it (else a BuildError). Default ``"requirements.txt"``.
      path: the project directory; also the Docker build context and the
        ``PythonPackage`` of the code. Default ``"."``; relative paths mean
        the launcher's directory.
      resources: ``Fileset`` objects: extra files shipped with the code.
        Default: none.
      extra_packages: more projects (paths) or requirements installed with the
        code, as for ``PythonPackage``. Default: none.
      pip_args: options of the ``pip install`` that packages the code, as for
        ``PythonPackage``. Default ``["--no-deps", "--no-compile"]``: the
        dependencies come from the image.
    """

    def __init__(
        self,
        entrypoint: Entrypoint,
        base_image: str,
        requirements: str = "requirements.txt",
        path: str = ".",
        resources: Optional[List[Fileset]] = None,
        extra_packages: Optional[List[str]] = None,
        pip_args: Optional[List[str]] = None,
    ):
        self._init_project(entrypoint, base_image, path, resources, extra_packages, pip_args)
        self.requirements = requirements


def docker_transport(image: str) -> Optional[Tuple[str, str]]:
    """``("docker-daemon", reference)`` or ``("docker-archive", path)`` for an
    image only this machine can read (``docker-daemon:ref`` or
    ``docker-daemon://ref``, likewise ``docker-archive:``); else None."""
    for transport in ("docker-daemon", "docker-archive"):
        if image.startswith(transport + ":"):
            ref = image[len(transport) + 1:]
            return transport, ref[2:] if ref.startswith("//") else ref
    return None


def is_image_uri(image: str) -> bool:
    """``docker://``, ``library://``, ``oras://``, ``http(s)://``...: the runtime fetches these."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", image) is not None


def _name_from_path(path: str) -> str:
    return re.sub(r"\W", "_", os.path.basename(path.rstrip(os.sep)))


def _resolve_if_local(requirement: str) -> str:
    """Extra packages may be paths (relative to the launcher) or requirement strings."""
    looks_like_path = requirement.startswith((".", "/", "~")) or os.sep in requirement
    return resolve_path(requirement) if looks_like_path else requirement


_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _check_entrypoint(entrypoint: Any) -> None:
    if isinstance(entrypoint, xm.ModuleName):
        if not _MODULE_NAME.match(entrypoint.module_name):
            raise ValueError(
                f"ModuleName({entrypoint.module_name!r}) is not a Python module name "
                "such as 'mypackage.main'"
            )
    elif isinstance(entrypoint, xm.CommandList):
        if isinstance(entrypoint.commands, str) or not entrypoint.commands:
            raise ValueError("CommandList needs a non-empty list of shell commands")
    else:
        raise TypeError(
            f"entrypoint must be xm_cluster.ModuleName(...) or xm_cluster.CommandList([...]), "
            f"not {type(entrypoint).__name__}"
        )


# ---------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------


class SingularityOptions(ValueObject):
    """How a ``SingularityContainer`` runs: ``executor(singularity_options=...)``.

    A task runs ``<runtime> exec --bind <archive dir> --pwd <archive dir>
    [--nv] [--bind src:dest ...] <extra_options> <image> bash
    ./entrypoint.sh``, the unpacked archive bound at its own path. The task's
    variables (and CUDA_VISIBLE_DEVICES) are also exported as
    ``APPTAINERENV_``/``SINGULARITYENV_`` ones, so ``--cleanenv`` keeps them.

    Args:
      bind: ``{host path: container path}``, e.g. ``{"/scratch": "/scratch"}``:
        ``--bind /scratch:/scratch``, after the config's
        ``[[clusters.singularity.binds]]`` (``[[local.singularity.binds]]`` on
        ``Local``). Default: none.
      extra_options: more options of ``exec``, each item one word passed as it
        is (quoted for the shell): ``["--cleanenv", "--env", "A=1"]``, not
        ``["--env A=1"]``. Default: none.
      runtime: the command to run, e.g. ``"apptainer"``, ``"singularity"`` or
        a full path. Default None: ``apptainer`` if the node has it, else
        ``singularity``; neither fails the task with a message.
      nv: pass ``--nv`` (the host's NVIDIA driver and GPUs). Default None:
        when the job asks for a GPU (in ``requirements``, or a GPU request,
        partition or queue of ``Slurm``/``GridEngine``: see their docs);
        True: always; False: never. lxm3 0.4.2 passed it to every Slurm job.
    """

    def __init__(
        self,
        bind: Optional[Dict[str, str]] = None,
        extra_options: Optional[List[str]] = None,
        runtime: Optional[str] = None,
        nv: Optional[bool] = None,
    ):
        self.bind = {} if bind is None else bind
        self.extra_options = [] if extra_options is None else extra_options
        self.runtime = runtime
        self.nv = nv


class DockerOptions(ValueObject):
    """How a Docker image runs on ``Local``: ``Local(docker_options=...)``.

    For ``DockerContainer``, and ``PDMProject``/``PythonContainer`` images
    packaged for ``Local``. A task runs ``docker run --rm --init --user
    $(id -u):$(id -g) -v <archive dir>:<archive dir> -w <archive dir>
    -e NAME... [--gpus ...] [-v src:dest ...] <extra_options> <image> bash
    ./entrypoint.sh``. (``Slurm``/``GridEngine`` take a ``docker_options``
    for lxm3 0.4.2's signature, but Docker runs on ``Local`` only.)

    Args:
      volumes: ``{host path: container path}``, each ``-v host:container``.
        Default: none.
      extra_options: more ``docker run`` options, each item one word passed as
        it is: ``["--shm-size=8g"]``, ``["--network", "host"]``. Default: none.
      gpus: pass ``--gpus``: the devices ``Local`` gave the task (its
        CUDA_VISIBLE_DEVICES), else ``all``. Default None: when the executor's
        ``requirements`` ask for a GPU; True: always; False: never.
    """

    def __init__(
        self,
        volumes: Optional[Dict[str, str]] = None,
        extra_options: Optional[List[str]] = None,
        gpus: Optional[bool] = None,
    ):
        self.volumes = {} if volumes is None else volumes
        self.extra_options = [] if extra_options is None else extra_options
        self.gpus = gpus


class LocalSpec(xm.ExecutorSpec, ValueObject):
    """``Local.Spec()``: the ``executor_spec`` of an ``xm.Packageable`` for a local run.

    ``PDMProject``/``PythonContainer`` images packaged for it run with Docker.
    """

    pass


class Local(xm.Executor, ValueObject):
    """Run tasks on this machine, several at once, with their output streamed.

    A work unit's job script and tasks file are written to
    ``<local staging>/experiments/<id>/wu<n>/`` (config ``[local.storage]
    staging``, default ``~/.local/share/lxm3``), each task's output to
    ``logs/task-<i>.log`` there and to the terminal, prefixed
    ``[<work unit>:<task>]`` (``[<work unit>]`` for a one-task unit). Tasks start as their job is added; the
    experiment's ``with`` block waits for them at its end and raises
    TaskFailedError if any failed. Ctrl-C stops them all; queued tasks never
    start. The config's ``[local.env]`` is exported into every task unless
    its job sets the variable.

    Args:
      requirements: ``xm.JobRequirements``; locally only GPUs count. A task
        asking for N (``gpu=N``, ``local_gpu=N``, ``a100=N``...) gets N
        devices of its own in CUDA_VISIBLE_DEVICES, given back when it ends:
        the devices listed in CUDA_VISIBLE_DEVICES at launch, else by
        ``nvidia-smi -L``. Asking for more than there are is a LaunchError;
        when neither tells, GPU tasks run one at a time with the GPUs
        unassigned (unless ``max_parallel_tasks`` is given), as in lxm3 0.4.2.
        A GPU request also gives containers ``--nv``/``--gpus``. CPU, memory
        and the rest are neither reserved nor enforced. Default: nothing.
      singularity_options: ``SingularityOptions`` for ``SingularityContainer``
        tasks. Default None: ``SingularityOptions()``.
      docker_options: ``DockerOptions`` for ``DockerContainer``, ``PDMProject``
        and ``PythonContainer`` tasks. Default None: ``DockerOptions()``.
      max_parallel_tasks: how many tasks run at once, at least 1 (else a
        ValueError); the rest wait in a queue. Default None: the number of
        cores, raised for GPU tasks to as many as the GPUs allow. One pool
        runs every local task of an experiment, sized by the first ``Local``
        whose job starts. lxm3 0.4.2 ran one task at a time.
    """

    def __init__(
        self,
        requirements: Optional[xm.JobRequirements] = None,
        singularity_options: Optional[SingularityOptions] = None,
        docker_options: Optional[DockerOptions] = None,
        max_parallel_tasks: Optional[int] = None,
    ):
        if max_parallel_tasks is not None and max_parallel_tasks < 1:
            raise ValueError("Local(max_parallel_tasks=...) must be at least 1")
        self.requirements = xm.JobRequirements() if requirements is None else requirements
        self.singularity_options = singularity_options
        self.docker_options = docker_options
        self.max_parallel_tasks = max_parallel_tasks

    @classmethod
    def Spec(cls) -> LocalSpec:  # noqa: N802 (the xm API's name)
        return LocalSpec()


def hms_time(seconds: int) -> str:
    """``HH:MM:SS``, the hours past 99 if need be (Grid Engine's h_rt, PBS's walltime)."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def parse_walltime(value: Walltime) -> Optional[int]:
    """Seconds from a timedelta, a number of seconds, or a Slurm-style string.

    Strings: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` or
    ``D-HH:MM:SS``, as ``sbatch --time`` reads them.
    """
    if value is None:
        return None
    if hasattr(value, "total_seconds"):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str):
        seconds = _parse_walltime_string(value)
    else:
        raise TypeError(f"walltime must be a timedelta, seconds or a string like '2:00:00', not {value!r}")
    if seconds <= 0:
        raise ValueError(f"walltime must be positive, got {value!r}")
    return int(-(-seconds // 1))  # whole seconds, rounded up


def _parse_walltime_string(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"walltime {text!r} is not like '30', '2:00:00' or '1-00:00:00'")
    days, first, second, third = match.groups()
    parts = [int(p) for p in (first, second, third) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    minutes, seconds = (parts + [0])[:2]  # MM or MM:SS
    return minutes * 60 + seconds


# Signals a job script can catch and pass on to its program as a warning;
# KILL and STOP cannot be caught, the rest end or stop programs as errors do.
WARNING_SIGNALS = ("USR2", "USR1", "TERM", "INT", "HUP", "QUIT", "ALRM", "URG")


def _warning_signal_name(value: Any, what: str) -> str:
    """``"USR2"`` from ``"USR2"``, ``"SIGUSR2"``, ``signal.SIGUSR2`` or its number."""
    name = getattr(value, "name", value)  # a signal.Signals
    if isinstance(name, int) and not isinstance(name, bool):
        import signal

        try:
            name = signal.Signals(name).name
        except ValueError:
            name = str(name)
    text = str(name).upper()
    text = text[3:] if text.startswith("SIG") else text
    if text not in WARNING_SIGNALS:
        raise ValueError(f"{what}: {value!r} is not a signal the job script can pass on to the "
                         f"program; use one of {', '.join(WARNING_SIGNALS)} (USR2, the default, "
                         "is free in PyTorch jobs, whose NCCL takes USR1)")
    return text


def _check_warning_seconds(seconds: Any, walltime: Walltime, name: str, most: int) -> None:
    """A warning's lead time: whole seconds, within the scheduler's range and the time limit."""
    if seconds is None:
        return
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 1 <= seconds <= most:
        raise ValueError(f"{name}(timeout_signal_seconds={seconds!r}): give a whole number of seconds "
                         f"from 1 to {most} ({name}'s limit), or None for no warning")
    limit = parse_walltime(walltime)
    if limit is not None and seconds >= limit:
        raise ValueError(f"{name}(timeout_signal_seconds={seconds}) is not less than the walltime "
                         f"({limit} s): the warning would come as the task starts; give fewer "
                         "seconds or a longer walltime")


class ClusterExecutorSpec(xm.ExecutorSpec, ValueObject):
    """What ``package`` needs to know of a cluster executor: nothing but its kind.

    ``Slurm.Spec()``/``GridEngine.Spec()``/``PBS.Spec()``: packaging for one needs a
    ``[[clusters]]`` in the config, and ``PDMProject``/``PythonContainer``
    images become ``.sif`` files.
    """


class ClusterExecutor(xm.Executor, ValueObject):
    """What the batch-scheduler executors (``Slurm``, ``GridEngine``, ``PBS``) share.

    Each scheduler's executor lists its parameters in lxm3 0.4.2's positional
    order, then calls ``_init_common`` for the fields below, which mean the
    same on every scheduler, and sets its own. ``scheduler`` names its entry
    in SCHEDULERS: everything scheduler-specific is found there.

    A work unit on a cluster is one bash job script submitted as one array
    job, a single ``xm.Job`` too (an array of one); a sweep larger than the
    cluster's array limit is split into several arrays. Each task gets
    ``LXM_TASK_ID`` (0-based across the work unit), ``LXM_NUM_TASKS``,
    ``LXM_EXPERIMENT_ID`` and ``LXM_WORK_UNIT_ID``. The job name is
    ``<title>_<experiment id>_<work unit id>`` (non-word characters as
    ``_``). Jobs are submitted when the experiment's ``with`` block ends, one
    batch per cluster, and recorded for ``lxm3 status``/``logs``/``cancel``.

    Directives are derived from the options and ``requirements``; an
    explicit ``resources`` item or ``extra_directives`` line replaces a
    derived one that sets the same option, and ``skip_directives`` drops
    lines. Options are checked twice: their form (types, a walltime that
    parses, one line of printable text each, since a newline would end the
    directive and run the rest as a command) when the executor is made; what
    the scheduler can express (``requirements`` with the cluster's settings)
    as the job is added, an error that then ends the ``with`` block before
    anything is submitted.

    Args:
      requirements: ``xm.JobRequirements``: what each task needs, e.g.
        ``xm.JobRequirements(cpu=4, ram=16 * xm.GiB, gpu=1)``, turned into the
        scheduler's directives (see ``Slurm``/``GridEngine``); ``location`` is
        a node name. A request the scheduler cannot express (a TPU, a service
        tier other than PROD, ...) is a ValueError, never dropped. A GPU
        request also gives containers ``--nv``. Default: nothing asked (the
        cluster's defaults). Not an ``xm.JobRequirements``: TypeError.
      resources: ``{name: value}`` written as directives (Slurm
        ``--name=value``, Grid Engine and PBS ``-l name=value``); items whose value
        is false (``None``, ``False``, ``0``, ``""``) are left out. Default:
        none.
      walltime: each task's time limit: a ``datetime.timedelta``, a number
        of seconds (``3600``; rounded up to whole seconds), or a string as
        ``sbatch --time`` reads it: ``"MM"`` (``"90"`` is 90 minutes),
        ``"MM:SS"``, ``"HH:MM:SS"``, ``"D-HH"``, ``"D-HH:MM"``,
        ``"D-HH:MM:SS"``. Zero, negative or unreadable: a ValueError (a bool
        or other type: TypeError), at once. Default None: no limit asked
        (the partition's or queue's default applies).
      log_directory: where the tasks' output files go on the cluster; ``~``
        and a relative path start at your home directory there. Created at
        submission. Default None: ``<staging>/experiments/<id>/wu<n>/logs``.
        ``lxm3 logs`` finds the files in either.
      modules: environment modules loaded with ``module load`` before each
        task, in order, e.g. ``["cuda/12.1", "python/3.11"]``; a failed load
        fails the task before its program runs (``module load X failed``).
        When the job's shell has no ``module``, the login profile is read
        for it as ``bash -l`` does (lxm3 0.4.2 ran Slurm jobs as ``bash
        -l``). Default: none.
      extra_directives: more directive lines, as they are, with or without
        the ``#SBATCH``/``#$``/``#PBS`` prefix; a line replaces a derived one that sets
        the same option. Default: none. Must be a list (a str is a TypeError).
      skip_directives: drop every generated directive line that contains one
        of these strings, the prefix included (a plain substring:
        ``"--mem"`` also drops ``--mem-per-cpu``). The ``sbatch``/``qsub``
        arguments lxm3 adds (array, log path) are not directives and stay.
        Default: none.
      max_parallel_tasks: at most this many tasks of the work unit run at
        once; at least 1 (else a ValueError). When the sweep is split into
        several arrays, each waits for the previous one to end, so the limit
        holds for the whole work unit. Default None: no limit.
      singularity_options: ``SingularityOptions`` for ``SingularityContainer``
        tasks; the cluster's ``[[clusters.singularity.binds]]`` are bound
        too. Default None: ``SingularityOptions()``.
      docker_options: accepted for lxm3 0.4.2's signature and unused: Docker
        runs on ``Local`` only (a ``DockerContainer`` job here is refused
        when added). Default None.
      cluster: the ``name`` of a ``[[clusters]]`` entry of the config to
        submit to. Default None: ``$LXM_CLUSTER``, else the first
        ``[[clusters]]``. An unknown name is a ConfigError as the job is
        added.
      requeue: True: a task the scheduler stops before it ends (preempted,
        its node failed, requeued by hand) is queued again and runs anew
        from the start (Slurm ``--requeue``, Grid Engine and PBS ``-r y``). Each run
        gets ``LXM_ATTEMPT`` (1 for the first, 2 for the first restart, ...),
        so the program can tell it should resume from its checkpoint.
        Default False: the site's default (Slurm's ``JobRequeue``; Grid
        Engine's queue ``rerun``).

    Signals: the program runs as a child of the job script, which passes on
    the time-limit warning (``Slurm(timeout_signal_seconds=...)``) and, on a
    signal that ends the task (TERM on cancel, preemption or time limit,
    sent by the scheduler to every process of the job), waits for the
    program to end before it ends itself; the task's exit status is the
    program's.
    """

    scheduler = ""

    def _init_common(self, *, requirements, resources, walltime, log_directory, modules,
                     extra_directives, skip_directives, max_parallel_tasks, singularity_options,
                     docker_options, cluster, requeue=False) -> None:
        self.requirements = xm.JobRequirements() if requirements is None else requirements
        self.resources = {} if resources is None else resources
        self.walltime = walltime
        self.log_directory = log_directory
        self.modules = [] if modules is None else modules
        self.extra_directives = [] if extra_directives is None else extra_directives
        self.skip_directives = [] if skip_directives is None else skip_directives
        self.max_parallel_tasks = max_parallel_tasks
        self.singularity_options = singularity_options
        self.docker_options = docker_options
        self.cluster = cluster
        self.requeue = requeue

    def _check(self) -> None:
        """Catch mistakes where the executor is written, not at submission."""
        name = type(self).__name__
        parse_walltime(self.walltime)
        if self.max_parallel_tasks is not None and self.max_parallel_tasks < 1:
            raise ValueError(f"{name}(max_parallel_tasks=...) must be at least 1")
        if not isinstance(self.requirements, xm.JobRequirements):
            raise TypeError(f"{name}(requirements=...) must be an xm.JobRequirements")
        if not isinstance(self.requeue, bool):
            raise TypeError(f"{name}(requeue=...) must be True or False, not {self.requeue!r}")
        for what in ("modules", "extra_directives", "skip_directives"):
            if isinstance(getattr(self, what), str):
                raise TypeError(f"{name}({what}=...) must be a list of strings")
        # Each of these becomes (part of) a directive line or a scheduler argument:
        # a newline would end the line and make the rest a command of the job script.
        for what in ("partition", "account", "qos", "queue", "project", "shell", "log_directory"):
            value = getattr(self, what, None)
            if value is not None:
                _directive_value(value, f"{name}({what}=...)")
        for what in ("modules", "extra_directives", "skip_directives"):
            for item in getattr(self, what):
                _directive_value(item, f"{name}({what}=...)")
        for key, value in self.resources.items():
            _directive_value(key, f"{name}(resources=...) key")
            _directive_value(value, f"{name}(resources={{{key!r}: ...}})")
        for pe in getattr(self, "parallel_environments", {}):
            _directive_value(pe, f"{name}(parallel_environments=...) name")
        if self.requirements.location is not None:
            _directive_value(self.requirements.location,
                             f"{name}(requirements=xm.JobRequirements(location=...))")


class SlurmSpec(ClusterExecutorSpec):
    """``Slurm.Spec()``: see ``ClusterExecutorSpec``."""

    pass


class Slurm(ClusterExecutor):
    """Submit work units as Slurm array jobs.

    The positional order is lxm3 0.4.2's; ``account``, ``qos``,
    ``max_parallel_tasks`` (the ``%K`` array throttle) and ``cluster`` (a
    name from the config) are new. What the options share with
    ``GridEngine`` is in ``ClusterExecutor``'s documentation.

    A work unit is ``sbatch --parsable --array=0-<N-1>[%K]
    --output=<log_directory>/%x-%A_%a.log job.sh``, so task logs are
    ``<job name>-<job id>_<index in its array>.log``. Its ``#SBATCH`` lines
    start with ``--job-name=<title>_<experiment id>_<work unit id>``, then
    what the options below give, e.g. ``Slurm(xm.JobRequirements(cpu=4,
    ram=8 * xm.GiB), walltime="2:00:00", partition="gpu",
    resources={"gres": "gpu:1"})``::

        #SBATCH --cpus-per-task=4
        #SBATCH --mem=8192M
        #SBATCH --time=02:00:00
        #SBATCH --partition=gpu
        #SBATCH --gres=gpu:1

    Args:
      requirements: ``xm.JobRequirements`` per task: ``cpu=N`` ->
        ``--cpus-per-task=N``; ``ram``/``memory`` -> ``--mem=<MiB>M`` and
        ``disk``/``ephemeral_storage`` -> ``--tmp=<MiB>M`` (rounded up);
        ``gpu=N`` -> ``--gres=gpu:N``; a model, ``a100=N`` ->
        ``--gres=gpu:a100:N`` (the site's name from ``[clusters.slurm]
        gpu_types``, e.g. ``{A100 = "a100_80g"}``); ``replicas=N`` ->
        ``--ntasks=N``; ``location`` -> ``--nodelist=...``. A TPU or a
        service tier other than PROD is a ValueError (use ``qos``). lxm3
        0.4.2 ignored requirements on Slurm. Default: nothing asked.
      resources: ``{name: value}`` -> ``#SBATCH --name=value``, ``True`` a
        bare flag: ``{"gres": "gpu:1"}`` -> ``#SBATCH --gres=gpu:1``,
        ``{"requeue": True}`` -> ``#SBATCH --requeue``; false values are left
        out. ``{"output": ...}`` replaces lxm3's log path (``lxm3 logs`` then
        cannot find the logs). Default: none.
      walltime: each task's time limit -> ``--time=[D-]HH:MM:SS``: a
        ``timedelta``, seconds (``3600``) or a string as sbatch reads it
        (``"2:00:00"``, ``"1-12:00:00"``; ``"90"`` is 90 minutes). Default
        None: the partition's default. See ``ClusterExecutor``.
      singularity_options: ``SingularityOptions`` for ``SingularityContainer``
        tasks. Default None.
      docker_options: unused (Docker runs on ``Local`` only). Default None.
      log_directory: where task logs go on the cluster; ``~`` and relative
        paths start at your home there. Default None:
        ``<staging>/experiments/<id>/wu<n>/logs``.
      modules: environment modules to ``module load`` before each task, e.g.
        ``["cuda/12.1"]``. Default: none. See ``ClusterExecutor``.
      exclusive: True -> ``--exclusive`` (whole nodes). Default False.
      partition: -> ``--partition=...``. Default None: the cluster's default
        partition. A name containing ``gpu`` counts as a GPU request (``--nv``).
      extra_directives: ``#SBATCH`` lines as they are, the prefix optional:
        ``["--mail-type=END", "#SBATCH --constraint=a100"]``. A line replaces
        the derived one of the same option, short forms and families
        included: ``"-c 8"`` replaces ``--cpus-per-task``, ``--mem-per-cpu``
        replaces ``--mem``, ``--gpus``/``--gres=gpu...`` the derived
        ``--gres=gpu...``. ``--output``/``-o`` replaces lxm3's log path.
        ``--gres=gpu...``, ``--gpus*``, ``-G`` or ``--tres-per-*=gres/gpu...``
        here or in ``resources`` count as a GPU request (``--nv``).
      skip_directives: drop every generated ``#SBATCH`` line that contains one
        of these strings (``"--mem"`` also drops ``--mem-per-cpu``). Default:
        none.
      account: -> ``--account=...``. Default None.
      qos: -> ``--qos=...``. Default None.
      max_parallel_tasks: at most K tasks of the work unit at once ->
        ``--array=0-<N-1>%K``; a split sweep's arrays wait for each other
        (``--dependency=afterany``). Default None: no limit.
      cluster: the ``name`` of the ``[[clusters]]`` entry to submit to.
        Default None: ``$LXM_CLUSTER``, else the config's first.
      requeue: True -> ``--requeue``: a preempted task, or one whose node
        failed, is queued again and runs anew with ``LXM_ATTEMPT`` one
        higher. Default False: the cluster's ``JobRequeue``. See
        ``ClusterExecutor``.
      timeout_signal: the signal that warns the program of its time limit:
        a name (``"USR2"``, ``"SIGUSR2"``) or a ``signal.Signals``; one of
        USR2, USR1, TERM, INT, HUP, QUIT, ALRM, URG (else a ValueError).
        Used with ``timeout_signal_seconds``. Default ``"USR2"``: USR1 is
        taken by NCCL in PyTorch jobs.
      timeout_signal_seconds: warn the program this many seconds before its
        time limit -> ``--signal=B:<timeout_signal>@<seconds>``: Slurm
        signals the job script, which passes the signal on to the program
        (whose handler can save a checkpoint and exit; unhandled, USR2 ends
        it). A whole number from 1 to 65535, less than ``walltime`` (else a
        ValueError). Slurm checks every minute or so, so the signal may come
        up to a minute earlier. After the limit Slurm sends TERM, then KILL
        (``KillWait`` seconds later). The signal goes to the entrypoint's
        process: an ``xm.CommandList`` entrypoint should ``exec`` its last
        command, so that it is the program's. Default None: no warning.
    """

    scheduler = "slurm"

    def __init__(
        self,
        requirements: Optional[xm.JobRequirements] = None,
        resources: Optional[Dict[str, Any]] = None,
        walltime: Walltime = None,
        singularity_options: Optional[SingularityOptions] = None,
        docker_options: Optional[DockerOptions] = None,
        log_directory: Optional[str] = None,
        modules: Optional[List[str]] = None,
        exclusive: bool = False,
        partition: Optional[str] = None,
        extra_directives: Optional[List[str]] = None,
        skip_directives: Optional[List[str]] = None,
        account: Optional[str] = None,
        qos: Optional[str] = None,
        max_parallel_tasks: Optional[int] = None,
        cluster: Optional[str] = None,
        requeue: bool = False,
        timeout_signal: Union[str, int] = "USR2",
        timeout_signal_seconds: Optional[int] = None,
    ):
        self._init_common(requirements=requirements, resources=resources, walltime=walltime,
                          log_directory=log_directory, modules=modules,
                          extra_directives=extra_directives, skip_directives=skip_directives,
                          max_parallel_tasks=max_parallel_tasks, singularity_options=singularity_options,
                          docker_options=docker_options, cluster=cluster, requeue=requeue)
        self.exclusive = exclusive
        self.partition = partition
        self.account = account
        self.qos = qos
        self.timeout_signal = _warning_signal_name(timeout_signal, "Slurm(timeout_signal=...)")
        self.timeout_signal_seconds = timeout_signal_seconds
        self._check()
        _check_warning_seconds(timeout_signal_seconds, self.walltime, "Slurm",
                               scheduler_of(self).max_warning_seconds)

    @classmethod
    def Spec(cls) -> SlurmSpec:  # noqa: N802 (the xm API's name)
        return SlurmSpec()


class GridEngineSpec(ClusterExecutorSpec):
    """``GridEngine.Spec()``: see ``ClusterExecutorSpec``."""

    pass


class GridEngine(ClusterExecutor):
    """Submit work units as (Son of / Sun) Grid Engine array jobs.

    The positional order is lxm3 0.4.2's; ``cluster`` (a name from the
    config) is new. What the options share with ``Slurm`` is in
    ``ClusterExecutor``'s documentation.

    A work unit is ``qsub -terse -t 1-<N> [-tc K] -o
    <log_directory>/$JOB_NAME-$JOB_ID.$TASK_ID.log job.sh``, so task logs are
    ``<job name>-<job id>.<SGE_TASK_ID>.log`` (SGE_TASK_ID counts from 1 in
    each array; ``LXM_TASK_ID`` from 0 across the work unit). Its ``#$``
    lines start with ``-N <title>_<experiment id>_<work unit id>`` and
    ``-S /bin/bash``, then what the options below give, e.g.
    ``GridEngine(xm.JobRequirements(cpu=4, ram=8 * xm.GiB),
    walltime="2:00:00", queue="all.q")``::

        #$ -pe smp 4
        #$ -l h_vmem=2048M
        #$ -l h_rt=02:00:00
        #$ -q all.q
        #$ -R y
        #$ -j y

    Args:
      requirements: ``xm.JobRequirements`` per task: ``cpu=N`` (N > 1) ->
        ``-pe smp N`` (the name from ``[clusters.sge] parallel_environment``);
        ``ram``/``memory`` -> ``-l h_vmem=<MiB>M`` per slot, as Grid Engine
        counts it: the total divided by the slots (``memory_resource``);
        ``gpu=N`` -> ``-l gpu=N`` (``gpu_resource``); a model (``a100=N``)
        also ``-l <gpu_type_resource>=a100`` (the site's name from
        ``gpu_types``; without ``gpu_type_resource`` configured, a
        ValueError); ``location`` -> ``-l hostname=...``. Disk, TPUs,
        ``replicas`` > 1 (use ``parallel_environments``) and service tiers
        other than PROD are a ValueError. Default: nothing asked.
      resources: ``{name: value}`` -> ``#$ -l name=value``: ``{"h_vmem":
        "4G"}`` -> ``#$ -l h_vmem=4G``. Values are written with ``str()``
        (``True`` is ``True``: write a boolean as the site spells it,
        ``"true"``); false values are left out. A name replaces the derived
        ``-l`` of that name. A name containing ``gpu`` counts as a GPU
        request (``--nv``) unless its value is 0 or false. Default: none.
      parallel_environments: ``{name: slots}`` -> ``#$ -pe name slots``:
        ``{"mpi": 8}`` -> ``#$ -pe mpi 8``. Replaces the ``-pe`` derived from
        ``cpu``; memory is divided by the largest slot count. Give one: a job
        runs in one parallel environment. A name containing ``gpu`` counts as
        a GPU request.
        Default: none.
      walltime: each task's time limit -> ``-l h_rt=HH:MM:SS`` (hours may
        pass 99): a ``timedelta``, seconds (``3600``) or a string as sbatch
        reads it (``"2:00:00"``, ``"1-12:00:00"``; ``"90"`` is 90 minutes).
        Default None: the queue's default. See ``ClusterExecutor``.
      queue: -> ``-q ...``. Default None: the scheduler's choice. A name
        containing ``gpu`` counts as a GPU request.
      reserved: resource reservation: True -> ``-R y``, False -> ``-R n``.
        Default None: ``-R y`` when the job has a parallel environment
        (derived or given) or asks for a GPU, as lxm3 0.4.2 did, else no
        ``-R`` (0.4.2 wrote a bare ``-R``, which Grid Engine rejects).
      log_directory: where task logs go on the cluster; ``~`` and relative
        paths start at your home there. Default None:
        ``<staging>/experiments/<id>/wu<n>/logs``.
      merge_output: True -> ``-j y``: stderr in the same log. False -> ``-j
        n`` and ``qsub -e <log_directory>/$JOB_NAME-$JOB_ID.$TASK_ID.err``.
        Default True.
      shell: -> ``-S shell``, the interpreter Grid Engine runs the job script
        with. Default ``"/bin/bash"``; the job script is written for bash, so
        this must be a bash.
      project: -> ``-P ...``. Default None.
      account: -> ``-A ...``. Default None.
      modules: environment modules to ``module load`` before each task, e.g.
        ``["cuda/12.1"]``. Default: none. See ``ClusterExecutor``.
      max_parallel_tasks: at most K tasks of the work unit at once -> ``qsub
        -tc K``; a split sweep's arrays wait for each other (``-hold_jid``).
        Default None: no limit.
      extra_directives: ``#$`` lines as they are, the prefix optional:
        ``["-m ea", "#$ -M me@example.com"]``. A line replaces the derived
        one of the same option (``-l`` per resource name, any ``-pe``);
        ``-o`` replaces lxm3's log path, ``-e`` its error log. ``-l``/``-pe``/
        ``-q`` lines that name a GPU resource count as a GPU request.
      skip_directives: drop every generated ``#$`` line that contains one of
        these strings (``"-R"`` drops the ``-R y`` line). Default: none.
      singularity_options: ``SingularityOptions`` for ``SingularityContainer``
        tasks. Default None.
      docker_options: unused (Docker runs on ``Local`` only). Default None.
      cluster: the ``name`` of the ``[[clusters]]`` entry to submit to.
        Default None: ``$LXM_CLUSTER``, else the config's first.
      requeue: True -> ``-r y``: the job is rerunnable: a task stopped by a
        failed node or rescheduled (``qmod -rj``) runs anew with
        ``LXM_ATTEMPT`` one higher (Grid Engine says only whether a task was
        restarted: a second restart is attempt 2 again). Default False: the
        queue's ``rerun``. See ``ClusterExecutor``.
      notify: True -> ``-notify``: before it kills a task (at its ``h_rt``
        time limit, on ``qdel``/``lxm3 cancel``, on preemption) Grid Engine
        sends every process of the task USR2, and USR1 before it suspends
        one; the kill (or stop) follows after the queue's ``notify`` time
        (``qconf -sq <queue>``, e.g. ``00:00:60``), which a job cannot
        choose: a time limit of ``walltime`` is then ``walltime`` plus that
        time, with the warning at ``walltime`` (and Grid Engine counts a
        task that reached ``h_rt`` as failed, however it ended: for a clean
        end, stop on the warning of ``s_rt``, ``resources={"s_rt": ...}``,
        which is USR1). The program should catch
        USR2 (unhandled, it ends the program) and USR1, and expect it more
        than once (Grid Engine signals the process group and the job's group
        id): ignore it once it has begun to stop, or a second one ends the
        program as Python exits. An ``xm.CommandList`` entrypoint should
        ``exec`` its last command, or the shell running it dies of USR2.
        Default False.
    """

    scheduler = "sge"

    def __init__(
        self,
        requirements: Optional[xm.JobRequirements] = None,
        resources: Optional[Dict[str, Any]] = None,
        parallel_environments: Optional[Dict[str, int]] = None,
        walltime: Walltime = None,
        queue: Optional[str] = None,
        reserved: Optional[bool] = None,
        log_directory: Optional[str] = None,
        merge_output: bool = True,
        shell: str = "/bin/bash",
        project: Optional[str] = None,
        account: Optional[str] = None,
        modules: Optional[List[str]] = None,
        max_parallel_tasks: Optional[int] = None,
        extra_directives: Optional[List[str]] = None,
        skip_directives: Optional[List[str]] = None,
        singularity_options: Optional[SingularityOptions] = None,
        docker_options: Optional[DockerOptions] = None,
        cluster: Optional[str] = None,
        requeue: bool = False,
        notify: bool = False,
    ):
        self._init_common(requirements=requirements, resources=resources, walltime=walltime,
                          log_directory=log_directory, modules=modules,
                          extra_directives=extra_directives, skip_directives=skip_directives,
                          max_parallel_tasks=max_parallel_tasks, singularity_options=singularity_options,
                          docker_options=docker_options, cluster=cluster, requeue=requeue)
        if not isinstance(notify, bool):
            raise TypeError(f"GridEngine(notify=...) must be True or False, not {notify!r}")
        self.notify = notify
        self.parallel_environments = {} if parallel_environments is None else parallel_environments
        self.queue = queue
        self.reserved = reserved
        self.merge_output = merge_output
        self.shell = shell
        self.project = project
        self.account = account
        self._check()

    @classmethod
    def Spec(cls) -> GridEngineSpec:  # noqa: N802 (the xm API's name)
        return GridEngineSpec()


class PBSSpec(ClusterExecutorSpec):
    """``PBS.Spec()``: see ``ClusterExecutorSpec``."""

    pass


class PBS(ClusterExecutor):
    """Submit work units as PBS Professional / OpenPBS array jobs.

    New in this lxm3 (0.4.2 had no PBS executor). What the options share
    with ``Slurm`` and ``GridEngine`` is in ``ClusterExecutor``'s
    documentation.

    A work unit is ``qsub -J 0-<N-1>[%K] -k oed -o <log_directory>/ -v
    LXM_FIRST_TASK=<first> job.sh`` (one task: ``-J 0-1:2``, since PBS
    refuses ``-J 0-0``). ``-k oed`` makes PBS write each task's output
    straight into the log directory while it runs (without it PBS copies
    the output there only when the task ends), as
    ``<job id with the index>.OU``, e.g. ``1234[7].pbs01.OU``. Its ``#PBS``
    lines start with ``-N <title>_<experiment id>_<work unit id>`` and ``-j
    oe``, then what the options below give, e.g.
    ``PBS(xm.JobRequirements(cpu=4, ram=8 * xm.GiB, gpu=1),
    walltime="2:00:00", queue="gpu", project="p123")``::

        #PBS -l select=1:ncpus=4:mem=8192mb:ngpus=1
        #PBS -l walltime=02:00:00
        #PBS -q gpu
        #PBS -P p123

    PBS finds its commands by the ``PATH``; where another scheduler's
    ``qsub`` comes first there (Grid Engine installs one), name PBS's
    directory in the cluster's config: ``[clusters.pbs] bin_dir =
    "/opt/pbs/bin"``. A launch checks which scheduler's ``qsub`` answered.

    Args:
      requirements: ``xm.JobRequirements`` per task, one chunk of ``-l
        select=1:...``: ``cpu=N`` -> ``ncpus=N``; ``ram``/``memory`` ->
        ``mem=<MiB>mb`` (rounded up); ``gpu=N`` -> ``ngpus=N``; a model
        (``a100=N``) also ``<gpu_type_resource>=a100`` (the site's name from
        ``gpu_types``; without ``gpu_type_resource`` configured, a
        ValueError); ``replicas=N`` -> ``select=N`` (N such chunks);
        ``location`` -> ``host=...``. The names are the cluster's
        ``[clusters.pbs]`` ``cpu_resource`` (default ``ncpus``),
        ``memory_resource`` (``mem``), ``gpu_resource`` (``ngpus``). Disk,
        TPUs and service tiers other than PROD are a ValueError. Default:
        nothing asked (the queue's defaults).
      resources: ``{name: value}`` -> ``#PBS -l name=value``: ``{"place":
        "excl"}`` -> ``#PBS -l place=excl``; false values are left out. A
        ``select``, ``ncpus``, ``mem``, ``ngpus`` or ``nodes`` item replaces
        the derived ``select`` (PBS refuses both at once). A name containing
        ``gpu`` counts as a GPU request (``--nv``) unless its value is 0.
        Default: none.
      walltime: each task's time limit -> ``-l walltime=HH:MM:SS`` (hours may
        pass 99): a ``timedelta``, seconds (``3600``) or a string as sbatch
        reads it (``"2:00:00"``, ``"1-12:00:00"``; ``"90"`` is 90 minutes).
        At the limit PBS sends TERM to every process of the task, then KILL
        (after the server's ``kill_delay``); it gives no earlier warning.
        Default None: the queue's default.
      queue: -> ``-q ...``. Default None: the server's default queue. A name
        containing ``gpu`` counts as a GPU request.
      account: -> ``-A ...`` (the accounting string). Default None.
      project: -> ``-P ...``. Default None.
      log_directory: where task logs go on the cluster; ``~`` and relative
        paths start at your home there. Default None:
        ``<staging>/experiments/<id>/wu<n>/logs``.
      modules: environment modules to ``module load`` before each task, e.g.
        ``["cuda/12.1"]``. Default: none. See ``ClusterExecutor``.
      max_parallel_tasks: at most K tasks of the work unit at once -> ``-J
        0-<N-1>%K``; a split sweep's arrays wait for each other (``-W
        depend=afterany:...``). Default None: no limit.
      extra_directives: ``#PBS`` lines as they are, the prefix optional:
        ``["-m ae", "#PBS -M me@example.com"]``. A line replaces the derived
        one of the same option (``-l`` per resource name, the ``select``
        family as under ``resources``); ``-o`` replaces lxm3's log path
        (``lxm3 logs`` then cannot find the logs). ``-l`` lines that ask for
        ``ngpus`` count as a GPU request.
      skip_directives: drop every generated ``#PBS`` line that contains one
        of these strings (``"-j"`` drops the ``-j oe`` line). Default: none.
      singularity_options: ``SingularityOptions`` for ``SingularityContainer``
        tasks. Default None.
      docker_options: unused (Docker runs on ``Local`` only). Default None.
      cluster: the ``name`` of the ``[[clusters]]`` entry to submit to.
        Default None: ``$LXM_CLUSTER``, else the config's first.
      requeue: True -> ``-r y``: a task stopped by a failed node or requeued
        by hand (``qrerun``) runs anew from the start, with ``LXM_ATTEMPT`` one
        higher (PBS does not tell a job how often it ran: the job script
        counts its runs in the job directory's ``runs/``). Default False:
        PBS's own default (``-r y``; array jobs are always rerunnable). See
        ``ClusterExecutor``.
    """

    scheduler = "pbs"

    def __init__(
        self,
        requirements: Optional[xm.JobRequirements] = None,
        resources: Optional[Dict[str, Any]] = None,
        walltime: Walltime = None,
        queue: Optional[str] = None,
        account: Optional[str] = None,
        project: Optional[str] = None,
        log_directory: Optional[str] = None,
        modules: Optional[List[str]] = None,
        max_parallel_tasks: Optional[int] = None,
        extra_directives: Optional[List[str]] = None,
        skip_directives: Optional[List[str]] = None,
        singularity_options: Optional[SingularityOptions] = None,
        docker_options: Optional[DockerOptions] = None,
        cluster: Optional[str] = None,
        requeue: bool = False,
    ):
        self._init_common(requirements=requirements, resources=resources, walltime=walltime,
                          log_directory=log_directory, modules=modules,
                          extra_directives=extra_directives, skip_directives=skip_directives,
                          max_parallel_tasks=max_parallel_tasks, singularity_options=singularity_options,
                          docker_options=docker_options, cluster=cluster, requeue=requeue)
        self.queue = queue
        self.account = account
        self.project = project
        self._check()

    @classmethod
    def Spec(cls) -> PBSSpec:  # noqa: N802 (the xm API's name)
        return PBSSpec()


# ---------------------------------------------------------------------------
# Packaging: one reproducible, content-addressed zip per executable
# ---------------------------------------------------------------------------


class Archive(ValueObject):
    """A built archive on the local disk, named after its content hash."""

    def __init__(self, path: str, digest: str):
        self.path = path
        self.digest = digest  # sha256 of the zip's bytes

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


class ClusterExecutable(xm.Executable):
    """What packaging produces: an archive whose ``entrypoint.sh`` runs the program."""

    def __init__(
        self,
        name: str,
        archive: Optional[Archive] = None,
        args: Optional[xm.SequentialArgs] = None,
        env_vars: Optional[Dict[str, str]] = None,
        image: Optional[str] = None,  # Singularity image path/URI, or Docker image
        container: Optional[str] = None,  # "singularity" or "docker"
        environment: Optional[str] = None,  # PythonPackage(environment=...): "managed", "none", None
        requirements: Optional[Requirements] = None,  # the project's declared dependencies
    ):
        super().__init__(name)
        self.archive = archive
        self.args = xm.SequentialArgs() if args is None else args
        self.env_vars = {} if env_vars is None else env_vars
        self.image = image
        self.container = container
        self.environment = environment
        self.requirements = requirements


# Directories that never belong to a build's input: VCS data, caches, and what
# pip/setuptools write into the source tree while building.
_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache",
              ".ruff_cache", ".tox", ".nox", ".venv", "venv", "node_modules", ".cache"}
_SKIP_TOP_DIRS = {"build", "dist"}


def tree_fingerprint(root: str) -> List[Tuple[str, int, int]]:
    """(path, size, mtime) of every file a build could read: cheap, no file is read."""
    entries = []
    if os.path.isfile(root):
        st = os.stat(root)
        return [(os.path.basename(root), st.st_size, st.st_mtime_ns)]
    for dirpath, dirnames, filenames in os.walk(root):
        top = dirpath == root
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and not d.endswith(".egg-info")
            and not (top and d in _SKIP_TOP_DIRS)
        )
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: the build fails or skips it, either way
                continue
            entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return entries


def _cache_key(*parts: Any) -> str:
    import hashlib
    import json

    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _run_build_step(argv: Sequence[str], what: str, **kwargs: Any) -> str:
    """Run a build command; its output becomes the error message if it fails."""
    import subprocess

    try:
        proc = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", **kwargs,
        )
    except OSError as e:
        raise BuildError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        output = proc.stdout.strip()
        raise BuildError(f"{what} failed (exit code {proc.returncode}):\n{output}")
    return proc.stdout


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_reproducible_zip(zip_path: str, files: Iterable[Tuple[str, str]]) -> str:
    """Zip ``(source path, archive name)`` pairs so equal inputs give equal bytes.

    Entries are sorted, dated 1980-01-01 and carry only the executable bit of
    their mode. Returns the sha256 of the written file.
    """
    import hashlib
    import zipfile

    digest = hashlib.sha256()
    previous = None
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for src, arcname in sorted(files, key=lambda item: item[1].replace(os.sep, "/")):
            arcname = arcname.replace(os.sep, "/")
            if arcname == previous:  # unzip would stop at the second one
                raise ValueError(f"{arcname} is given twice for the zip {zip_path}")
            previous = arcname
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
            info.create_system = 3  # unix, so the mode below is honoured by unzip
            mode = 0o755 if os.access(src, os.X_OK) else 0o644
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(src, "rb") as f:
                zf.writestr(info, f.read(), compresslevel=6)
    with open(zip_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(root: str) -> List[Tuple[str, str]]:
    pairs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            pairs.append((path, os.path.relpath(path, root)))
    return pairs


def entrypoint_script(entrypoint: Union[Entrypoint, Sequence[str]]) -> str:
    """The archive's ``entrypoint.sh``: the program, with the task's args as "$@".

    As in XManager and lxm3 0.4.2, an ``xm.CommandList`` is one shell command
    per line, and a plain list (``UniversalPackage``'s entrypoint) is the words
    of one command line, joined with spaces: ``["python3", "main.py"]`` runs
    ``python3 main.py``. The task's arguments go to the last command, unless
    it passes ``$@`` on itself.
    """
    if isinstance(entrypoint, xm.ModuleName):
        run = f'exec "${{LXM_PYTHON:-python3}}" -m {entrypoint.module_name} "$@"'
    else:
        if isinstance(entrypoint, xm.CommandList):
            commands = list(entrypoint.commands)
        else:
            commands = [" ".join(entrypoint)]
        if not commands[-1].rstrip().endswith(("$@", '"$@"')):
            commands[-1] = f'{commands[-1]} "$@"'
        run = "\n".join(commands)
    return f"#!/bin/sh\n# Written by lxm3: runs the task's program with its arguments.\n{run}\n"


def _archive_files_from(staging: str, spec_files: Iterable[Fileset], entrypoint,
                        built_by: str) -> List[Tuple[str, str]]:
    """The build output, the Fileset files and ``entrypoint.sh`` as zip entries.

    Every name is in the archive once: two entries of one name would make
    every task fail to unpack it. A Fileset file may land where the build
    (``built_by`` says what made ``staging``) or another Fileset put a file
    only with the same content.
    """
    import filecmp

    entries: Dict[str, Tuple[str, str]] = {}  # name in the archive -> (source, what it is)

    def add(src: str, name: str, origin: str) -> None:
        name = os.path.normpath(name).replace(os.sep, "/")
        if name not in entries:
            entries[name] = (src, origin)
        elif not filecmp.cmp(entries[name][0], src, shallow=False):
            raise BuildError(
                f"two different files would be {name} in the archive: {entries[name][1]}, and "
                f"{origin}; give the Fileset file another destination (Fileset.get_path tells "
                "the program where it is), or remove one of them")

    for path, rel in _files_under(staging):
        add(path, rel, f"the file {built_by}")
    for fileset in spec_files:
        for src, dst in fileset.files.items():
            if not os.path.exists(src):
                raise BuildError(f"Fileset path {src} does not exist")
            if os.path.isdir(src):
                for path, rel in _files_under(src):
                    add(path, os.path.join(dst, rel), f"{path} of the Fileset directory {src}")
            else:
                add(src, dst, f"the Fileset file {src}")
    if "entrypoint.sh" in entries:
        raise BuildError(f"entrypoint.sh is the name of the script lxm3 writes into the archive to "
                         f"start the program, but {entries['entrypoint.sh'][1]} is there too; give "
                         "it another name")
    _check_no_file_is_a_directory(entries)
    entry = os.path.join(staging, ".lxm3-entrypoint.sh")
    with open(entry, "w") as f:
        f.write(entrypoint_script(entrypoint))
    os.chmod(entry, 0o755)
    return [(src, name) for name, (src, _) in entries.items()] + [(entry, "entrypoint.sh")]


def _check_no_file_is_a_directory(entries: Mapping[str, Tuple[str, str]]) -> None:
    """A file and a directory of one name cannot both be unpacked."""
    for name in entries:
        parent = name.rpartition("/")[0]
        while parent:
            if parent in entries:
                raise BuildError(
                    f"{parent} would be both a file and a directory in the archive: it is "
                    f"{entries[parent][1]}, and {name} is {entries[name][1]}; give one of them "
                    "another name")
            parent = parent.rpartition("/")[0]


# -- Python packages --------------------------------------------------------

_DEFAULT_BUILD_REQUIRES = ["setuptools>=40.8.0"]


def _build_requires(project: str) -> Optional[List[str]]:
    """The project's PEP 518 build requirements, or None when they can't be read."""
    pyproject = os.path.join(project, "pyproject.toml")
    if not os.path.exists(pyproject):
        return list(_DEFAULT_BUILD_REQUIRES) if os.path.exists(os.path.join(project, "setup.py")) else None
    try:
        with open(pyproject, encoding="utf-8") as f:
            build_system = _toml_loads(f.read()).get("build-system", {})
    except (OSError, ValueError):
        return None  # pip reports a broken pyproject.toml better than we would
    requires = build_system.get("requires")
    if requires is None:
        return list(_DEFAULT_BUILD_REQUIRES)
    return [str(r) for r in requires]


def _build_environment(requires: List[str]) -> str:
    """A cached directory with the build requirements installed, made once.

    pip's isolated build installs them anew for every build (~2 s here); a
    build that reuses this directory with ``--no-build-isolation`` runs the
    same backend at the versions pip picked the first time. Setuptools
    releases before 70.1 also need ``wheel``, so it is added for them.
    """
    if any(re.match(r"^setuptools\b", r) for r in requires):
        requires = [*requires, "wheel"]
    import shutil
    import tempfile

    key = _cache_key(sys.version, sorted(requires))[:20]
    parent = os.path.join(cache_dir(), "build-env")
    env_dir = os.path.join(parent, key)
    if os.path.isdir(env_dir):
        return env_dir
    # Made beside its final name, so that the rename below never crosses filesystems.
    make_private_dirs(parent)
    tmp = tempfile.mkdtemp(prefix=f".{key}-", suffix=".tmp", dir=parent)
    _progress(f"preparing a build environment ({', '.join(requires)}); this is done once")
    try:
        _run_build_step(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-input", "--target", tmp, *requires],
            "installing the build requirements",
        )
        os.replace(tmp, env_dir)
    except OSError:  # another launch made it first
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already, unless something failed
    return env_dir


def _pip_install(spec: PythonPackage, target: str) -> None:
    base = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--target", target, *spec.pip_args, spec.path, *spec.extra_packages]
    what = f"pip install of {spec.path}"
    wants_isolation_choice = any(a.startswith("--no-build-isolation") or a == "--use-pep517"
                                 for a in spec.pip_args)
    requires = None if wants_isolation_choice else _build_requires(spec.path)
    if requires is not None:
        env = dict(os.environ)
        env_dir = _build_environment(requires)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env_dir, env.get("PYTHONPATH")]))
        try:
            _run_build_step([*base[:4], "--no-build-isolation", *base[4:]], what, env=env)
            return
        except BuildError:
            # The backend may need more than it declares (dynamic build
            # requirements): let pip's isolated build decide, and report it.
            import shutil

            shutil.rmtree(target, ignore_errors=True)
    _run_build_step(base, what)


def _package_python(spec: PythonPackage, workdir: str) -> List[Tuple[str, str]]:
    if not os.path.isdir(spec.path):
        raise BuildError(f"PythonPackage path {spec.path} is not a directory")
    if not any(os.path.exists(os.path.join(spec.path, f)) for f in ("pyproject.toml", "setup.py")):
        raise BuildError(
            f"{spec.path} is not a Python project: it has neither pyproject.toml nor setup.py"
        )
    target = os.path.join(workdir, "site")
    _pip_install(spec, target)
    extras = " or its extra_packages" if spec.extra_packages else ""
    files = _archive_files_from(target, spec.resources, spec.entrypoint,
                                f"pip installed from {spec.path}{extras}")
    if isinstance(spec.entrypoint, xm.ModuleName):
        check_entrypoint_module(spec.entrypoint.module_name, files, spec.name)
    return files


def _is_module_file(base: str, paths: Set[str]) -> bool:
    """Whether ``base`` (``pkg/mod``) is a module in the archive: source, bytecode or extension."""
    if f"{base}.py" in paths or f"{base}.pyc" in paths:
        return True
    return any(p.startswith(f"{base}.") and p.endswith((".so", ".pyd")) and "/" not in p[len(base):]
               for p in paths)


def check_entrypoint_module(module: str, files: Sequence[Tuple[str, str]], name: str) -> None:
    """Find the entrypoint ``python -m module`` will run in the archive's files,
    so that a typo fails the build, not every task on the cluster.

    A top-level package that is not in the archive may come from the node's
    Python or the container image (``torch.distributed.run``): only a warning.
    """
    sources = {arcname.replace(os.sep, "/"): src for src, arcname in files}
    paths = set(sources)
    dirs: Set[str] = set()
    for path in paths:
        end = path.rfind("/")
        while end > 0 and path[:end] not in dirs:
            dirs.add(path[:end])
            end = path.rfind("/", 0, end)
    parts = module.split(".")
    if parts[0] not in dirs and not _is_module_file(parts[0], paths):
        _progress(f"{name}: warning: the entrypoint module {module} is not in the archive "
                  f"(it has no {parts[0]}/ or {parts[0]}.py); tasks will look for it in the "
                  "Python or container image that runs them")
        return
    package = ""  # the directory of the package reached so far
    for depth, part in enumerate(parts):
        base = f"{package}/{part}" if package else part
        last = depth == len(parts) - 1
        if last and (_is_module_file(base, paths)
                     or base in dirs and _is_module_file(f"{base}/__main__", paths)):
            return
        if last and base in dirs:
            raise BuildError(
                f"{name}: the entrypoint {module} is a package without a __main__.py, which "
                f"python -m cannot run; name the module to run: {_contents(base, part, paths, dirs)}")
        if not last and base in dirs:
            package = base
            continue
        if not last and _is_module_file(base, paths):
            raise BuildError(f"{name}: the entrypoint {module} cannot exist: "
                             f"{'.'.join(parts[:depth + 1])} is a module, not a package")
        if _is_namespace_package(package, sources):
            _progress(f"{name}: warning: the entrypoint module {module} is not in the archive "
                      f"({package}/ has no {part}); it must come from another part of the "
                      f"namespace package {package.replace('/', '.')} on the node")
            return
        raise BuildError(
            f"{name}: the entrypoint module {module} is not in the archive: {package}/ has no "
            f"{part}.py or {part}/. {_contents(package, part, paths, dirs)}")


def _contents(package: str, missing: str, paths: Set[str], dirs: Set[str]) -> str:
    """What ``package`` holds, with the names closest to ``missing`` first."""
    import difflib

    names = set()
    for path in paths | dirs:
        parent, _, child = path.rpartition("/")
        if parent == package and not child.startswith((".", "__")):
            stem = child.split(".")[0]
            if path in dirs or child.endswith((".py", ".pyc", ".so", ".pyd")):
                names.add(stem)
    dotted = package.replace("/", ".")
    close = difflib.get_close_matches(missing, sorted(names), n=3)
    hint = f"did you mean {' or '.join(f'{dotted}.{c}' for c in close)}? " if close else ""
    listed = ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "")
    return f"{hint}{dotted} contains: {listed or 'nothing'}"


def _is_namespace_package(package: str, sources: Mapping[str, str]) -> bool:
    """A package other directories may add to: no __init__.py, or a pkgutil/pkg_resources one."""
    init = sources.get(f"{package}/__init__.py")
    if init is None:
        return True
    try:
        with open(init, encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return False
    return "extend_path" in text or "declare_namespace" in text


def _package_universal(spec: UniversalPackage, workdir: str) -> List[Tuple[str, str]]:
    script = spec.build_script
    if not os.path.isfile(script):
        raise BuildError(f"build script {script} does not exist")
    if not os.access(script, os.X_OK):
        raise BuildError(f"build script {script} is not executable; run: chmod +x {script}")
    builddir = os.path.join(workdir, "build")
    os.makedirs(builddir)
    env = {**os.environ, "BUILDDIR": builddir}
    _run_build_step([script, *spec.build_args], f"build script {script}", cwd=spec.path, env=env)
    return _archive_files_from(builddir, [], spec.entrypoint, f"the build script {script} wrote")


def _package_inputs(spec: Union[PythonPackage, UniversalPackage]) -> List[Any]:
    """Everything a build depends on, for the cache key."""
    common = [__version__, type(spec).__name__, tree_fingerprint(spec.path),
              entrypoint_script(spec.entrypoint)]
    if isinstance(spec, PythonPackage):
        local_extras = [tree_fingerprint(p) for p in spec.extra_packages if os.path.exists(p)]
        files = [(src, dst, tree_fingerprint(src)) for fs in spec.resources for src, dst in fs.files.items()]
        return [*common, sys.version, repr(spec.entrypoint), spec.pip_args, spec.extra_packages,
                local_extras, files]
    return [*common, spec.entrypoint, spec.build_script, spec.build_args]


def build_archive(spec: Union[PythonPackage, UniversalPackage], use_cache: bool = True) -> Archive:
    """Build (or find in the cache) the archive of a spec."""

    archives = os.path.join(cache_dir(), "archives")
    key_file = os.path.join(cache_dir(), "packages", _cache_key(_package_inputs(spec)) + ".json")
    cached = _cached_archive(spec, key_file) if use_cache else None
    if cached:
        return cached
    # pip and setuptools build in the project's own build/ directory: two
    # launches building one project at once would take files from each other.
    with _project_lock(spec.path):
        cached = _cached_archive(spec, key_file) if use_cache else None  # built meanwhile?
        return cached or _build_archive(spec, archives, key_file)


def _cached_archive(spec: Union[PythonPackage, UniversalPackage], key_file: str) -> Optional[Archive]:
    """The archive built before from the same inputs, if it is still there."""
    cached = _read_json(key_file)
    if not (cached and os.path.isfile(cached.get("path", ""))):
        return None
    _progress(f"{spec.name}: unchanged, using {cached['path']}")
    try:
        os.utime(cached["path"])  # used now: lxm3 clean keeps what was used in the last --days
    except OSError:
        pass
    return Archive(cached["path"], cached["digest"])


def _project_lock(path: str):
    """Hold an exclusive lock for the project directory ``path`` (other lxm3
    processes building it wait), as a context manager."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        locks = os.path.join(cache_dir(), "locks")
        make_private_dirs(locks)
        lock = os.path.join(locks, _cache_key(os.path.realpath(path)) + ".lock")
        with open(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:  # never replaced: one inode
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    return held()


def _build_archive(spec: Union[PythonPackage, UniversalPackage], archives: str, key_file: str) -> Archive:
    import shutil
    import tempfile

    start = time.monotonic()
    _progress(f"{spec.name}: packaging {spec.path}")
    make_private_dirs(archives)
    workdir = tempfile.mkdtemp(prefix="lxm3-build-")  # in $TMPDIR: may be another filesystem
    tmp_zip = None
    try:
        if isinstance(spec, PythonPackage):
            files = _package_python(spec, workdir)
        else:
            files = _package_universal(spec, workdir)
        # The zip is written beside its final name (a rename never crosses
        # filesystems, and no reader sees half an archive under that name).
        fd, tmp_zip = tempfile.mkstemp(prefix=f".{spec.name}-", suffix=".zip.tmp", dir=archives)
        os.close(fd)
        digest = write_reproducible_zip(tmp_zip, files)
        path = os.path.join(archives, f"{spec.name}-{digest[:16]}.zip")
        if not os.path.exists(path):  # same digest, same bytes: keep the first
            os.replace(tmp_zip, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if tmp_zip is not None and os.path.exists(tmp_zip):
            os.unlink(tmp_zip)
    _write_json_atomic(key_file, {"path": path, "digest": digest})
    size = os.path.getsize(path)
    _progress(f"{spec.name}: built {os.path.basename(path)} ({size / 1024:.0f} KiB) "
              f"in {time.monotonic() - start:.1f} s")
    return Archive(path, digest)


# -- Container images built or converted on this machine ------------------------
#
# PDMProject and PythonContainer build a Docker image of the project's
# dependencies (as lxm3 0.4.2 did); Local runs it with Docker. Clusters get a
# .sif: apptainer/singularity converts docker-daemon: and docker-archive:
# images here, once per image id (cached under ~/.cache/lxm3/sif/<id>/), and
# the .sif is then staged like any image file, under its content hash.


def _docker_repository(name: str) -> str:
    """A Docker repository name from a project name: lower case, ``[a-z0-9._-]``."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("._-") or "lxm3-project"


def dockerfile(spec: _DockerBuiltProject) -> str:
    """The Dockerfile of a ``PDMProject`` or ``PythonContainer`` image.

    The build context is the project: the lock or requirements file is
    copied from there. The image holds the dependencies only; the code
    comes with each task's archive, so a code change needs no new image.
    """
    import json

    user = "RUN id 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 docker || true"
    if isinstance(spec, PDMProject):
        return "\n".join([
            "# Written by lxm3 for a PDMProject: the project's locked dependencies.",
            f"FROM {spec.base_image} AS lxm3-lock",
            "RUN pip install --no-cache-dir pdm",
            "WORKDIR /lxm3-project",
            f"COPY {json.dumps([spec.lock_file, 'pdm.lock'])}",
            'COPY ["pyproject.toml", "pyproject.toml"]',
            "RUN pdm export > /requirements.txt",
            "",
            f"FROM {spec.base_image}",
            user,
            "COPY --from=lxm3-lock /requirements.txt /requirements.txt",
            "RUN pip install --no-cache-dir -r /requirements.txt",
            "",
        ])
    return "\n".join([
        "# Written by lxm3 for a PythonContainer: the project's requirements.",
        f"FROM {spec.base_image}",
        user,
        f"COPY {json.dumps([spec.requirements, '/requirements.txt'])}",
        "RUN pip install --no-cache-dir -r /requirements.txt",
        "",
    ])


def _which_or_fail(names: Sequence[str], what: str) -> str:
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise BuildError(f"{what} needs {' or '.join(names)} on this machine, and none is on the PATH")


def build_docker_image(spec: _DockerBuiltProject) -> Tuple[str, str]:
    """``docker build`` the image of ``spec``: returns its tag (``<name>:latest``) and id."""
    import tempfile

    kind = type(spec).__name__
    if not os.path.isdir(spec.path):
        raise BuildError(f"{kind} path {spec.path} is not a directory")
    copied = ({"lock_file": spec.lock_file, "path": "pyproject.toml"} if isinstance(spec, PDMProject)
              else {"requirements": spec.requirements})
    for what, rel in copied.items():  # what the Dockerfile copies from the build context
        inside = os.path.normpath(os.path.join(spec.path, rel))
        if os.path.isabs(rel) or not inside.startswith(spec.path.rstrip(os.sep) + os.sep):
            raise BuildError(f"{kind}({what}={rel!r}) must be a path inside {spec.path}, the "
                             "Docker build context")
        if not os.path.isfile(inside):
            raise BuildError(f"{kind}: {inside} does not exist; the image is built from it")
    docker = _which_or_fail(["docker"], f"{kind} (its image is built with docker build)")
    tag = f"{_docker_repository(spec.name)}:latest"
    with tempfile.TemporaryDirectory(prefix="lxm3-docker-") as tmp:
        dockerfile_path = os.path.join(tmp, "Dockerfile")
        id_file = os.path.join(tmp, "image-id")
        with open(dockerfile_path, "w") as f:
            f.write(dockerfile(spec))
        _progress(f"{spec.name}: docker build -t {tag} {spec.path} (on {spec.base_image})")
        _run_build_step([docker, "build", "-t", tag, "-f", dockerfile_path, "--iidfile", id_file,
                         spec.path], f"docker build of {tag} from {spec.path}")
        with open(id_file) as f:
            image_id = f.read().strip()
    _progress(f"{spec.name}: image {tag} is {image_id[:19]}")
    return tag, image_id


def docker_image_id(reference: str) -> str:
    """The id of an image in the local Docker daemon (``docker image inspect``)."""
    docker = _which_or_fail(["docker"], f"docker-daemon:{reference} (read from the local Docker daemon)")
    output = _run_build_step([docker, "image", "inspect", "--format", "{{.Id}}", reference],
                             f"docker image inspect {reference} (is the image built or pulled here?)")
    return output.strip().splitlines()[-1]


def _sif_stem(transport: str, ref: str) -> str:
    """``name_tag`` for ``registry/name:tag``, the archive's name for a file."""
    if transport == "docker-archive":
        stem = re.sub(r"(\.tar(\.gz)?|\.tgz)$", "", os.path.basename(ref))
    else:
        last = ref.split("@")[0].rstrip("/").rsplit("/", 1)[-1]
        name, _, tag = last.partition(":")
        stem = f"{name}_{tag or 'latest'}"
    return re.sub(r"[^\w.-]", "_", stem) or "image"


def sif_from_docker(image: str, image_id: Optional[str] = None) -> str:
    """The ``.sif`` of a ``docker-daemon:`` or ``docker-archive:`` image, converted
    here by apptainer/singularity the first time this image id is seen.

    The id is Docker's for a daemon image (``image_id`` if the caller has just
    built it) and the sha256 of the file for an archive.
    """
    import shutil
    import tempfile

    transport, ref = docker_transport(image) or ("", "")
    if transport == "docker-daemon":
        image_id = image_id or docker_image_id(ref)
    elif transport == "docker-archive":
        if not os.path.isfile(ref):
            raise BuildError(f"{image}: {ref} does not exist (a docker-archive: image is a file "
                             "written by docker save)")
        image_id = f"sha256:{image_digest(ref)}"
    else:
        raise ValueError(f"{image} is not a docker-daemon: or docker-archive: image")
    directory = os.path.join(cache_dir(), "sif", image_id.rpartition(":")[2][:32])
    path = os.path.join(directory, _sif_stem(transport, ref) + ".sif")
    if os.path.isfile(path):
        _progress(f"{image}: unchanged (image {image_id[:19]}), using {path}")
        return path
    runtime = _which_or_fail(["apptainer", "singularity"],
                             f"{image} (converted to a .sif here, then sent to the cluster)")
    _progress(f"{image}: converting image {image_id[:19]} to a .sif with {os.path.basename(runtime)}; "
              "once per image")
    make_private_dirs(directory)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=directory)
    try:
        built = os.path.join(tmp, "image.sif")
        _run_build_step([runtime, "build", built, f"{transport}:{ref}"],
                        f"{os.path.basename(runtime)} build of {image}")
        os.replace(built, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def package(packageable: xm.Packageable) -> ClusterExecutable:
    """Turn one ``xm.Packageable`` into a ``ClusterExecutable``."""
    spec = packageable.executable_spec
    container, image = None, None
    if isinstance(spec, _DockerBuiltProject):
        tag, image_id = build_docker_image(spec)
        if isinstance(packageable.executor_spec, LocalSpec):
            container, image = "docker", image_id
        else:
            container, image = "singularity", sif_from_docker(f"docker-daemon:{tag}", image_id)
        spec = PythonPackage(spec.entrypoint, spec.path, spec.resources, spec.extra_packages, spec.pip_args)
    elif isinstance(spec, (SingularityContainer, DockerContainer)):
        container = "singularity" if isinstance(spec, SingularityContainer) else "docker"
        image = spec.image_path if isinstance(spec, SingularityContainer) else spec.image
        if container == "singularity" and docker_transport(image):
            image = sif_from_docker(image)
        spec = spec.entrypoint
        if getattr(spec, "environment", None) == "managed":
            raise BuildError(f"{spec.name}: PythonPackage(environment='managed') runs in a container "
                             f"({image}), whose Python brings its own packages: a managed environment "
                             "is made for the cluster's Python. Install the dependencies into the "
                             "image, or run the PythonPackage without a container")
    if not isinstance(spec, (PythonPackage, UniversalPackage)):
        raise TypeError(
            f"lxm3 cannot package {type(spec).__name__}: use xm_cluster.PythonPackage, "
            "UniversalPackage, SingularityContainer, DockerContainer, PDMProject or PythonContainer"
        )
    python = isinstance(spec, PythonPackage) and container is None
    return ClusterExecutable(
        name=spec.name,
        archive=build_archive(spec),
        args=xm.SequentialArgs.from_collection(packageable.args),
        env_vars=dict(packageable.env_vars),
        image=image,
        container=container,
        environment=spec.environment if python else None,
        requirements=_requirements_of(spec) if python else None,
    )


def _requirements_of(spec: PythonPackage) -> Optional[Requirements]:
    """declared_requirements, whose failure matters only to a managed environment."""
    try:
        return declared_requirements(spec)
    except BuildError as e:
        if spec.environment == "managed":
            raise
        return Requirements([], spec.path, spec.path, [], {}, error=str(e))


def _package_all(packageables: Sequence[xm.Packageable]) -> List[ClusterExecutable]:
    if any(isinstance(p.executor_spec, ClusterExecutorSpec) for p in packageables):
        # Before anything is built: without a cluster to run on, the build is wasted.
        experiment = xm.core._current_experiment.get(None)
        config = experiment.config if isinstance(experiment, ClusterExperiment) else load_config()
        config.require_clusters()
    return [package(p) for p in packageables]


# ---------------------------------------------------------------------------
# Deployment: one connection per launch, content-addressed staging
# ---------------------------------------------------------------------------


def ssh_keep_seconds() -> int:
    """``$LXM3_SSH_KEEP`` (seconds; 0: end each command's connection with it), else 300."""
    value = os.environ.get("LXM3_SSH_KEEP", "").strip()
    if not value:
        return SSH_KEEP_SECONDS
    if not value.isdigit():
        raise LaunchError(f"LXM3_SSH_KEEP={value!r} is not a number of seconds (0: keep none)")
    return int(value)


def _ssh_seconds(variable: str, configured: Optional[float], default: int) -> int:
    """``$variable``, else the cluster's setting, else ``default``; whole seconds, as ssh takes them."""
    value = os.environ.get(variable, "").strip()
    seconds = configured if isinstance(configured, (int, float)) and 0 < configured < 1e9 else None
    if value:
        try:
            seconds = float(value)
        except ValueError:
            seconds = 0
        if not 0 < seconds < 1e9:
            raise LaunchError(f"{variable}={value!r} is not a number of seconds > 0")
    return max(1, int(-(-(seconds or default) // 1)))


def _kept_connections_dir() -> Optional[str]:
    """Where control sockets that outlive one command live, or None if nowhere safe.

    ``$XDG_RUNTIME_DIR/lxm3`` (the per-user runtime directory), else
    ``/tmp/lxm3-<uid>``. Anyone who can reach a socket can use the
    connection, so the directory must be ours and closed to everyone else.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):  # not ours to create
        base = os.path.join(runtime, "lxm3")
    else:
        base = f"/tmp/lxm3-{os.getuid()}"
    if len(base) > 60:  # a socket's path may not exceed ~100 bytes; ssh adds a suffix while binding
        return None
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError:
        return None
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return base


class Connection:
    """Runs shell scripts and copies files on a cluster.

    A cluster with a ``server`` is reached with the system ``ssh`` over one
    multiplexed connection (an OpenSSH control master with a private socket),
    so ``~/.ssh/config``, ProxyJump, agents and 2FA work and the password or
    code is asked once. The connection is kept for ``ssh_keep_seconds()``
    after the command, so the next launch, ``status`` or ``logs`` starts at once.
    A cluster without a server is this machine.
    """

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster
        self.remote = bool(cluster.server)
        self._socket: Optional[str] = None
        self._private_dir: Optional[str] = None  # set when the socket is only this command's
        self._copying: Any = None  # the rsync under way
        self._interrupted = False
        self.bytes_sent = 0

    @property
    def target(self) -> str:
        return self.cluster.server or "this machine"

    @property
    def connect_timeout(self) -> int:
        return _ssh_seconds("LXM3_SSH_CONNECT_TIMEOUT", self.cluster.ssh_connect_timeout, SSH_CONNECT_TIMEOUT)

    @property
    def keepalive_interval(self) -> int:
        return _ssh_seconds("LXM3_SSH_KEEPALIVE_INTERVAL", self.cluster.ssh_keepalive_interval,
                            SSH_KEEPALIVE_INTERVAL)

    def _ssh_options(self) -> List[str]:
        # Only what lxm3 needs; everything else comes from the user's ssh config.
        # Options given with -o win over ssh_config, so the timeouts are lxm3's
        # settings (ssh_connect_timeout, ssh_keepalive_interval), not ssh's.
        options = ["-o", f"ControlPath={self._socket}", "-o", f"ConnectTimeout={self.connect_timeout}",
                   "-o", f"ServerAliveInterval={self.keepalive_interval}",
                   "-o", f"ServerAliveCountMax={SSH_KEEPALIVE_COUNT}"]
        if self.cluster.user:
            options += ["-l", self.cluster.user]
        if self.cluster.port:
            options += ["-p", str(self.cluster.port)]
        if self.cluster.ssh_private_key:
            options += ["-i", os.path.expanduser(self.cluster.ssh_private_key)]
        options += self._route_options()
        if not sys.stdin.isatty():  # nobody could answer a prompt: fail instead of hanging
            options += ["-o", "BatchMode=yes"]
        return options

    def _route_options(self) -> List[str]:
        """The cluster's ``ssh_config`` (``-F``) and ``proxycommand``, as lxm3 0.4.2 read them."""
        options = []
        if self.cluster.ssh_config:
            if not os.path.isfile(self.cluster.ssh_config):
                raise ConfigError(f"the ssh_config of cluster {self.cluster.name!r}, "
                                  f"{self.cluster.ssh_config}, does not exist")
            options += ["-F", self.cluster.ssh_config]
        if self.cluster.proxycommand:
            options += ["-o", f"ProxyCommand={self.cluster.proxycommand}"]
        return options

    def open(self) -> None:
        """Reuse the kept control master, or start one: the only SSH login."""
        if not self.remote or self._socket:
            return
        keep = ssh_keep_seconds()
        shared = _kept_connections_dir() if keep else None
        if shared is None:
            self._open_private()
            return
        import fcntl

        identity = self._identity()
        self._socket = os.path.join(shared, "ssh-" + identity)
        # Locked, so that two launches at once share one master rather than race.
        with open(os.path.join(shared, "lock-" + identity), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(self._socket):
                if self._control("check"):
                    return
                try:
                    os.unlink(self._socket)  # left behind by a master that was killed
                except FileNotFoundError:
                    pass
            self._start_master(keep=keep)

    def _identity(self) -> str:
        """Names the kept connection: one per server, user, port, key and route."""
        import hashlib

        c = self.cluster
        key = "\0".join(str(v) for v in (c.server, c.user, c.port, c.ssh_private_key,
                                         c.ssh_config, c.proxycommand))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _open_private(self) -> None:
        import tempfile

        # Private (mode 0700), and short: a socket path may not exceed ~100 bytes.
        short = "/tmp" if os.access("/tmp", os.W_OK) else None
        self._private_dir = tempfile.mkdtemp(prefix="lxm3-ssh-", dir=short)
        self._socket = os.path.join(self._private_dir, "master")
        self._start_master(keep=600)  # close() ends it; this lets an abandoned one expire

    def _start_master(self, keep: int) -> None:
        import subprocess
        import tempfile

        _progress(f"connecting to {self.target} (cluster {self.cluster.name!r}) ...")
        # stderr goes to a file: the master lives on in the background and
        # would hold a pipe open.
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.run(
                ["ssh", *self._ssh_options(), "-o", "ControlMaster=yes", "-o", f"ControlPersist={keep}",
                 "-f", "-N", self.cluster.server],
                stdout=subprocess.DEVNULL, stderr=errors,
            )
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
        if proc.returncode != 0:
            self.close()
            by_hand = " ".join(shell_quote(a) for a in [
                "ssh", *(["-p", str(self.cluster.port)] if self.cluster.port else []),
                *(["-i", self.cluster.ssh_private_key] if self.cluster.ssh_private_key else []),
                *self._route_options(),
                f"{self.cluster.user + '@' if self.cluster.user else ''}{self.cluster.server}"])
            where = f"{self.target} (cluster {self.cluster.name!r})"
            if "timed out" in message:
                raise ClusterError(
                    f"cannot connect to {where}: no answer within {self.connect_timeout} s "
                    f"(ssh: {'; '.join(message.splitlines())}). Check that the server is up and reachable "
                    f"from here (a VPN?), and try `{by_hand}` by hand; if it is only slow to answer, "
                    "raise ssh_connect_timeout for this cluster in the lxm3 config "
                    "(or set LXM3_SSH_CONNECT_TIMEOUT)")
            raise ClusterError(f"cannot connect to {where} with ssh: "
                               f"{message or 'exit code ' + str(proc.returncode)}\n"
                               f"Try `{by_hand}` by hand to see why.")

    def _control(self, command: str) -> bool:
        """Send ``ssh -O command`` to the master; whether it answered."""
        import subprocess

        proc = subprocess.run(["ssh", *self._ssh_options(), "-O", command, self.cluster.server],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc.returncode == 0

    def close(self) -> None:
        """End this command's use; a kept master stays for the next command."""
        if self._private_dir:
            import shutil

            self._control("exit")
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        self._socket = None

    def reconnect(self) -> None:
        """After a lost connection: end the old master, which may be stale, and start anew."""
        if not self.remote:
            return
        if self._socket:
            self._control("exit")
        self.close()
        self.open()

    def interrupt(self) -> None:
        """Stop the copy under way and start nothing more: for a launch interrupted
        while it deploys on another thread (``async with``)."""
        import signal

        self._interrupted = True
        if self._copying is not None:
            _signal_group(self._copying, signal.SIGTERM)

    def _check_interrupted(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    def run_script(self, script: str, what: str) -> str:
        """Run a bash script there; its stdout, or ClusterError with its stderr."""
        import subprocess

        self._check_interrupted()
        if self.remote:
            self.open()
            argv = ["ssh", *self._ssh_options(), self.cluster.server, "bash -s"]
        else:
            argv = ["bash", "-s"]
        script = self.cluster.path_line() + script
        proc = subprocess.run(argv, input=script.encode(), capture_output=True)
        stdout = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            if self.remote and (proc.returncode == 255 or proc.returncode < 0):  # or ssh was killed
                raise ConnectionLost(f"lost the ssh connection to {self.target} while {what}"
                                     f"{': ' + stderr if stderr else ''}")
            raise ClusterError(f"{what} on {self.target} failed: {stderr or stdout.strip()}")
        return stdout

    def run_streaming(self, command: str) -> int:
        """Run a shell command there with its output passed straight through."""
        import subprocess

        if not self.remote:
            return subprocess.call(["bash", "-c", command])
        self.open()
        # stdin: a pipe held open until the call ends, so that the command there
        # sees EOF when lxm3 ends (see _follow_command), and reads no keystrokes.
        return subprocess.call(["ssh", *self._ssh_options(), self.cluster.server, command],
                               stdin=subprocess.PIPE)

    def copy_tree(self, local_dir: str, remote_dir: str) -> List[Tuple[str, int]]:
        """Copy ``local_dir``'s contents into ``remote_dir``; existing files are kept.

        Only content-addressed archives and new job files are sent, so a file
        that exists already is identical (``verify_staged_files`` makes sure)
        and costs nothing. Returns (relative path, size) of each file copied.
        """
        self._check_interrupted()
        if not self.remote:
            try:
                return _copy_tree_locally(local_dir, remote_dir)
            except OSError as e:
                raise ClusterError(f"copying files to {remote_dir} on this machine failed: "
                                   f"{e.strerror}: {e.filename}") from None
        import subprocess
        import tempfile

        self.open()
        ssh = " ".join(shell_quote(a) for a in ["ssh", *self._ssh_options()])
        show_progress = sys.stderr.isatty()  # images are gigabytes: show how it goes
        argv = ["rsync", "--recursive", "--copy-links", "--times", "--ignore-existing",
                "--protect-args", "--perms", "--chmod=D700,F600", "--stats",
                "--out-format=lxm3-sent %i %l %n",  # a line per item rsync really sends
                *(["--info=progress2"] if show_progress else []),
                "-e", ssh, local_dir.rstrip("/") + "/", f"{self.cluster.server}:{remote_dir}/"]
        with tempfile.TemporaryFile() as errors:
            try:
                # Its own process group, so that an interrupted launch ends rsync
                # and its ssh together (SIGTERM reaches lxm3 alone).
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors,
                                        start_new_session=True)
            except FileNotFoundError:
                raise ClusterError("rsync is not installed on this machine; install it "
                                   "(e.g. apt install rsync) to launch on remote clusters") from None
            self._copying = proc
            try:
                output = _relay_progress(proc.stdout) if show_progress else proc.stdout.read().decode()
                returncode = proc.wait()
            except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: leave no transfer running
                _end_process_group(proc)
                raise
            finally:
                self._copying = None
                proc.stdout.close()
            self._check_interrupted()
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
        if returncode != 0:
            raise ClusterError(f"copying files to {self.target}:{remote_dir} failed "
                               f"(rsync exit code {returncode}): {message}")
        sent = re.search(r"Total bytes sent: ([\d,.]+)", output)
        self.bytes_sent += int(re.sub(r"[,.]", "", sent.group(1))) if sent else 0
        return [(name, int(size)) for size, name in re.findall(r"lxm3-sent [<>]f\S* (\d+) ([^\r\n]+)", output)]


def _end_process_group(proc: Any, grace: float = 5.0) -> None:
    """Terminate a child started with ``start_new_session`` and all it started, and reap it."""
    import signal
    import subprocess

    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _relay_progress(stream) -> str:
    """Show rsync's ``--info=progress2`` line as it changes; return all its output."""
    output, pending = [], b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        output.append(chunk)
        *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
        progress = [p for p in pieces if b"%" in p and b"lxm3-sent " not in p]
        if progress:
            sys.stderr.write("\r" + progress[-1].decode(errors="replace").strip().ljust(60))
            sys.stderr.flush()
    sys.stderr.write("\n")
    return b"".join(output).decode(errors="replace")


def _copy_tree_locally(src: str, dst: str) -> List[Tuple[str, int]]:
    """The login-node version of ``rsync --ignore-existing --copy-links``; returns
    (relative path, size) of each file it copied."""
    import shutil

    copied = []
    for dirpath, _, filenames in os.walk(src, followlinks=True):
        relative_dir = os.path.relpath(dirpath, src)
        target_dir = os.path.join(dst, relative_dir)
        os.makedirs(target_dir, mode=0o700, exist_ok=True)
        for name in filenames:
            target = os.path.join(target_dir, name)
            if not os.path.exists(target):
                tmp = f"{target}.{os.getpid()}.tmp"
                shutil.copyfile(os.path.join(dirpath, name), tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, target)
                copied.append((os.path.normpath(os.path.join(relative_dir, name)), os.path.getsize(target)))
    return copied


def _hash_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def image_digest(path: str) -> str:
    """The sha256 of an image file, hashed once while its path, size and mtime stay the same."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LaunchError(f"container image {path} cannot be read: {e.strerror}") from None
    key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = os.path.join(cache_dir(), "image-digests.json")
    cache = _read_json(cache_file) or {}
    if key not in cache:
        _progress(f"hashing {path} ({st.st_size / 2**20:.0f} MiB); not again while it is unchanged")
        cache[key] = _hash_file(path)
        _write_json_atomic(cache_file, cache)
    return cache[key]


def deployed_image_name(path: str) -> str:
    """``<stem>-<hash><ext>``: same-name images with other contents never collide."""
    stem, ext = os.path.splitext(os.path.basename(path))
    return f"{stem}-{image_digest(path)[:16]}{ext}"


class ClusterInfo(ValueObject):
    """What a launch needs to know about a cluster, asked once per launch."""

    def __init__(
        self,
        staging: str,  # absolute path of the staging directory there
        home: str,
        max_array_size: Optional[int] = None,  # Slurm: tasks 0..N-1 per array
        max_array_tasks: Optional[int] = None,  # Grid Engine's max_aj_tasks (0: no limit)
        umask: Optional[str] = None,  # of the user's own commands there, e.g. "0022"
        python: Optional[Dict[str, Any]] = None,  # the config's python as it reported itself (PYTHON_INFO_CODE)
        module_pythons: Optional[Dict[str, Dict[str, Any]]] = None,  # the same after module loads, by modules
        environments: Optional[str] = None,  # absolute path of the managed environments' directory
        scheduler: Optional[str] = None,  # which answered: "PBS 23.06.06 (/opt/pbs/bin/qsub)"
    ):
        self.scheduler = scheduler
        self.staging = staging
        self.home = home
        self.max_array_size = max_array_size
        self.max_array_tasks = max_array_tasks
        self.umask = umask
        self.python = python
        self.module_pythons = {} if module_pythons is None else module_pythons
        self.environments = environments
        self._environment_states: Dict[str, Tuple[str, str]] = {}  # this probe's, of the keys it was given
        self._module_errors: Dict[str, str] = {}  # modules the login node could not load, by modules


def _staging_path(cluster: ClusterConfig) -> str:
    """The staging path as the remote shell should see it, relative to $HOME if not absolute."""
    staging = cluster.staging or "lxm3-staging"
    if staging == "~" or staging.startswith("~/"):
        staging = staging[2:] or "."
    return staging


def probe_cluster(connection: Connection, scheduler: Scheduler, module_sets: Sequence[Sequence[str]] = (),
                  environments: bool = False, candidates: Sequence[str] = ()) -> ClusterInfo:
    """Create the private staging directory, read the user's umask, the
    scheduler's array limit and what the cluster's Python is.

    One round trip. The umask is read before lxm3 sets its own: tasks get it
    (see render_job_script). The Python (config ``python``) is asked in the
    shell submissions run in, as is, and after loading each of
    ``module_sets``, as tasks load them. With ``environments``, the managed
    environments' directory is made (a ClusterError if it cannot be written)
    and ``candidates``, keys this machine expects, are checked there.
    """
    command = scheduler.submit_command
    staging = _staging_path(connection.cluster)
    script = f"""
set -e
command -v {command} >/dev/null 2>&1 || {{ echo "lxm3-missing {command}"; exit 0; }}
cd "$HOME"
echo "umask $(umask)"
umask 077
mkdir -p -- {shell_quote(staging)}
cd -- {shell_quote(staging)}
chmod 700 .
echo "staging $(pwd -P)"
echo "home $HOME"
"""
    script += f'echo "submit_path $(command -v {command})"\n'
    for other in SCHEDULERS.values():  # whose is it? (another scheduler's may come first on the PATH)
        if other.submit_command == command:
            script += (f'echo "version_{other.name} $( {{ {other.version_command}; }} 2>&1 </dev/null '
                       "| head -n 3 | tr '\\n' ' ')\"\n")
    script += scheduler.probe_lines()
    script += _python_probe_lines(connection.cluster, module_sets)
    if environments:
        script += _environments_probe_lines(connection.cluster, candidates)
    output = connection.run_script(script, "preparing the staging directory")
    values = {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        values[key] = value.strip()
    if "lxm3-missing" in values:
        raise ClusterError(
            f"{command} was not found on {connection.target} (cluster {connection.cluster.name!r}): "
            f"is it a {scheduler.title} login node, "
            "and does a login shell there have the scheduler on its PATH?"
        )
    answered = {name: match.group(1) for name, other in SCHEDULERS.items()
                for match in [re.search(other.version_pattern, values.get(f"version_{name}", ""), re.I | re.M)]
                if match}
    path = values.get("submit_path", "")
    if scheduler.name not in answered and answered:
        other = SCHEDULERS[next(iter(answered))]
        raise ClusterError(
            f"{command} on {connection.target} (cluster {connection.cluster.name!r}) is {path}, which is "
            f"{other.title}'s ({answered[other.name]}), not {scheduler.title}'s: name the directory of "
            f"{scheduler.title}'s commands there in the cluster's config, [clusters.{scheduler.name}] "
            f"bin_dir = \"/its/bin\"; nothing was submitted")
    version = answered.get(scheduler.name)
    identity = f"{scheduler.title} {version} ({path})" if version else f"{scheduler.title}? ({path})"
    limits = {key: int(values[key]) for key in ("max_array_size", "max_array_tasks")
              if values.get(key, "").isdigit()}
    umask = values.get("umask", "")
    if not UMASK_PATTERN.match(umask):
        raise ClusterError(f"'umask' in a shell on {connection.target} (cluster {connection.cluster.name!r}) "
                           f"printed {umask!r}, not an octal mask such as 0022; tasks would not know "
                           "which permissions their files should get")
    info = ClusterInfo(staging=values["staging"], home=values["home"], umask=umask, scheduler=identity, **limits)
    info.python = _read_python(values.get("python", ""), connection, ())
    for index, modules in enumerate(module_sets):
        value = values.get(f"python_m{index}", "")
        try:
            info.module_pythons["\n".join(modules)] = _read_python(value, connection, modules)
        except ClusterError as e:  # fatal only for a managed environment: see _check_python
            if not value.startswith("module-error"):
                raise
            info._module_errors["\n".join(modules)] = str(e)
    if environments:
        if "envs-error" in values or "envs" not in values:
            raise ClusterError(
                f"cannot use {_environments_path(connection.cluster)} on {connection.target} (cluster "
                f"{connection.cluster.name!r}) for managed environments: "
                f"{values.get('envs-error') or 'no answer'}. Set environments = \"/a/writable/path\" in "
                "the cluster's config, or fix the directory's permissions; nothing was submitted")
        info.environments = values["envs"]
        info._environment_states = _read_environment_states(output)
    return info


def _python_probe_lines(cluster: ClusterConfig, module_sets: Sequence[Sequence[str]]) -> str:
    """Bash printing ``python <json>`` (or ``python missing``) for the configured
    interpreter, and ``python_m<i> ...`` for it after each set of modules."""
    lines = [f"lxm_python={shell_quote(cluster.python_command)}",
             "lxm_python_info() {",
             '  command -v -- "$lxm_python" >/dev/null 2>&1 || { echo "$1 missing"; return 0; }',
             f'  echo "$1 $("$lxm_python" -c {shell_quote(PYTHON_INFO_CODE)} 2>&1 | tr \'\\n\' \' \')"',
             "}",
             "lxm_python_info python"]
    for index, modules in enumerate(module_sets):
        fail = f'echo "python_m{index} module-error $*"; exit 0'
        lines += ["(", "lxm_env_names=()", f"lxm_fail() {{ {fail}; }}", module_lines(modules),
                  f"lxm_python_info python_m{index}",
                  f") 2>/dev/null || echo 'python_m{index} module-error setting up the modules failed'"]
    return "\n".join(lines) + "\n"


def _environments_probe_lines(cluster: ClusterConfig, candidates: Sequence[str]) -> str:
    """Bash making the environments' directory (``envs PATH`` or ``envs-error WHY``)
    and checking the candidate keys there (ENVIRONMENT_CHECK): builtins but for
    what must run, since every launch with an environment runs it."""
    path = shell_quote(_environments_path(cluster))
    return "\n".join([
        'cd "$HOME"',
        f"[ -d {path} ] || mkdir -p -- {path} 2>/dev/null || true",
        f"if [ -d {path} ] && [ -w {path} ] && cd -P -- {path}; then",
        '  lxm_envs=$PWD; cd "$HOME"; echo "envs $lxm_envs"',
        ENVIRONMENT_CHECK,
        *[f'  lxm_env_check "$lxm_envs" {key}' for key in candidates],
        "else",
        f"  lxm_err=$({{ mkdir -p -- {path} && cd -- {path} && : >.lxm3-writable && rm -f .lxm3-writable; }} 2>&1) || true",
        '  echo "envs-error $(echo ${lxm_err:-it is not a writable directory})"',
        "fi",
    ]) + "\n"


def _read_python(value: str, connection: Connection, modules: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The probe's line about an interpreter: its facts, or None when it is missing.
    Output that is not ours (a crash, a Python that cannot run the probe) is a ClusterError."""
    import json

    if not value or value == "missing":
        return None
    after = f" after module load {' '.join(modules)}" if modules else ""
    where = f"{connection.target} (cluster {connection.cluster.name!r})"
    if value.startswith("module-error"):
        raise ClusterError(f"on {where}: {value[len('module-error'):].strip()} (loading the modules of "
                           "a job to ask its Python what it is)")
    try:
        python = json.loads(value)
        if not isinstance(python, dict):
            raise ValueError(value)
    except ValueError:
        raise ClusterError(f"the Python of {where}, {connection.cluster.python_command!r}{after} (config key "
                           f"python), could not say what it is: {value[:500]}") from None
    python["command"] = connection.cluster.python_command
    return python


UMASK_PATTERN = re.compile(r"^[0-7]{3,4}$")


def process_umask() -> str:
    """This process's umask as ``umask`` prints it, e.g. ``0022``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # reading it changes nothing
            for line in f:
                if line.startswith("Umask:"):
                    return line.split()[1]
    except (OSError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: set and restore (the stricter value meanwhile)
    os.umask(mask)
    return f"{mask:04o}"


def _copied_text(copied: Sequence[Tuple[str, int]], tree: str) -> str:
    """What a copy really sent, as rsync (or the local copy) reported it."""
    sent, there = [], []
    for noun, folder in (("archive", "archives"), ("image", "images"),
                         ("environment archive", ENVIRONMENT_INCOMING)):
        sizes = [size for path, size in copied if path.startswith(folder + "/")]
        if sizes:
            sent.append(f"{_counted(len(sizes), noun)} ({_size_text(sum(sizes))})")
        elif os.path.isdir(os.path.join(tree, folder)) and os.listdir(os.path.join(tree, folder)):
            there.append(folder)
    scripts = sum(1 for path, _ in copied if path.startswith("experiments/") and path.endswith("/job.sh"))
    if scripts:
        sent.append(_counted(scripts, "job script"))
    text = f"{' and '.join(there)} already there" if there else ""
    if sent:
        listed = sent[0] if len(sent) == 1 else ", ".join(sent[:-1]) + " and " + sent[-1]
        text += f"{'; ' if text else ''}copied {listed}"
    return text or "nothing to copy: everything was there already"


def send_staging_tree(connection: Connection, info: ClusterInfo, tree: str) -> List[Tuple[str, int]]:
    """Copy ``tree`` into the staging directory, saying what is sent and what was."""
    images = " and images" if os.path.isdir(os.path.join(tree, "images")) else ""
    _progress(f"{connection.cluster.name}: sending job scripts and any archives{images} not there yet "
              f"to {connection.target}:{info.staging} ...")
    copied = connection.copy_tree(tree, info.staging)
    _progress(f"{connection.cluster.name}: {_copied_text(copied, tree)}")
    return copied


def staged_digests(launches: Sequence[PendingLaunch]) -> Dict[str, str]:
    """{path in the staging directory: full sha256} of the content-named files the launches use."""
    digests = {}
    for launch in launches:
        executable = launch.executable
        digests[f"archives/{executable.archive.name}"] = executable.archive.digest
        if executable.container == "singularity" and not is_image_uri(executable.image):
            digests[f"images/{deployed_image_name(executable.image)}"] = image_digest(executable.image)
    return digests


# Checks each file against its sha256 there, in one round trip. A file whose
# stamp (.<file>.verified beside it: digest, size, inode, mtime, ctime) still
# describes it is not hashed again: images are gigabytes. Any write changes the
# ctime, which no one can set back. A file that does not match is deleted, so
# that the next copy replaces it.
_VERIFY_SCRIPT = """
umask 077
cd -- {staging} || exit 1
if command -v sha256sum >/dev/null 2>&1; then
    digest_of() {{ sha256sum < "$1" | cut -c1-64; }}
elif command -v python3 >/dev/null 2>&1; then
    digest_of() {{ python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"; }}
else
    echo lxm3-cannot-hash
    exit 0
fi
stat_of() {{  # size, inode, mtime and ctime (to the nanosecond where the file system keeps it)
    stat -c '%s %i %y %z' -- "$1" 2>/dev/null || python3 -c 'import os, sys
s = os.stat(sys.argv[1])
print(s.st_size, s.st_ino, s.st_mtime_ns, s.st_ctime_ns)' "$1"
}}
check() {{  # index, folder, name, expected digest
    file="$2/$3" verified="$2/.$3.verified"
    if [ ! -f "$file" ]; then echo "missing $1"; return; fi
    stamp="$4 $(stat_of "$file")"
    if [ -f "$verified" ] && [ "$(cat -- "$verified" 2>/dev/null)" = "$stamp" ]; then
        echo "ok $1"
        return
    fi
    actual=$(digest_of "$file")
    if [ "$actual" = "$4" ]; then
        printf '%s\\n' "$stamp" > "$verified.$$" && mv -f -- "$verified.$$" "$verified"
        echo "hashed $1"
    else
        rm -f -- "$file" "$verified"
        echo "bad $1 $actual"
    fi
}}
"""


def _check_staged_files(connection: Connection, staging: str, digests: Mapping[str, str]) -> Dict[str, str]:
    """{path: what its sha256 is there ("" if missing)} of the files that do not match; deletes them."""
    paths = sorted(digests)
    script = _VERIFY_SCRIPT.format(staging=shell_quote(staging)) + "".join(
        f"check {i} {' '.join(shell_quote(part) for part in path.split('/', 1))} {digests[path]}\n"
        for i, path in enumerate(paths))
    output = connection.run_script(script, "checking the staged archives and images")
    if "lxm3-cannot-hash" in output.split():
        _progress(f"{connection.cluster.name}: cannot check the staged files on {connection.target}: "
                  "neither sha256sum nor python3 is there; they are trusted by their names")
        return {}
    seen, bad = set(), {}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        index, _, actual = rest.partition(" ")
        if word in ("ok", "hashed", "bad", "missing") and index.isdigit() and int(index) < len(paths):
            seen.add(int(index))
            if word in ("bad", "missing"):
                bad[paths[int(index)]] = actual.strip()
    for index in set(range(len(paths))) - seen:
        bad[paths[index]] = "?"  # not checked: treat as not there
    return bad


def verify_staged_files(connection: Connection, info: ClusterInfo, tree: str,
                        digests: Mapping[str, str]) -> None:
    """Make sure each content-named file (``staged_digests``) there has the content its name says.

    Files are sent with ``--ignore-existing``, so a truncated or substituted
    archive would otherwise be trusted for good: jobs would fail at unzip, or
    run the wrong code. A bad file is deleted and sent again, then checked again.
    """
    if not digests:
        return
    bad = _check_staged_files(connection, info.staging, digests)
    if not bad:
        return
    for path, actual in sorted(bad.items()):
        found = f"its sha256 is {actual[:16]}..." if len(actual) == 64 else "it was missing"
        _progress(f"{connection.cluster.name}: {info.staging}/{path} did not match its content hash "
                  f"({found}); sending it again")
    send_staging_tree(connection, info, tree)
    still_bad = _check_staged_files(connection, info.staging, {p: digests[p] for p in bad})
    if still_bad:
        path = sorted(still_bad)[0]
        local = os.path.join(tree, path)
        if os.path.exists(local) and _hash_file(local) != digests[path]:
            hint = (f"the local file {os.path.realpath(local)} does not match its digest either: "
                    "delete it and launch again")
        else:
            hint = (f"check the disk there (full? quota?) and that nothing else writes to "
                    f"{info.staging}")
        raise ClusterError(f"{info.staging}/{path} on {connection.target} (cluster "
                           f"{connection.cluster.name!r}) still does not match its sha256 "
                           f"{digests[path]} after sending it again; {hint}")


# ---------------------------------------------------------------------------
# Managed environments: a project's dependencies, made for the cluster's Python
# ---------------------------------------------------------------------------
#
# ``PythonPackage(environment="managed")`` (or a cluster's ``environment =
# "managed"``) gives tasks the project's declared dependencies without a
# container. They are resolved HERE, by this machine's pip, as wheels for the
# cluster's interpreter and platform (probed over the launch's connection):
# ``pip install --target DIR --only-binary=:all: --python-version X.Y
# --implementation cp --abi cpXY --platform manylinux_2_N_<machine> ...
# --report``, with pip's environment markers set to the cluster's (pip
# evaluates markers for the Python it runs on, whatever --python-version says:
# resolving from 3.13 for 3.11 dropped ``typing_extensions; python_version <
# "3.13"``). DIR becomes one reproducible .tar.gz, cached here under the key
# of what it holds (the resolved pins with their hashes, the Python and the
# platform), and found again from the inputs (requirements, target, pip's index
# settings) without resolving. On the cluster each key is one directory,
# ``<environments>/<key>``, unpacked under a temporary name, checked, marked
# complete and renamed: a half-built one is never used, one lock per key makes
# two launches build it once, and a complete one is never modified. Tasks get
# it on PYTHONPATH after their code. README: "Dependencies: container,
# managed environment, or your own" says why this way, with measurements.

ENVIRONMENT_FORMAT = 1  # in every key: a change of what lxm3 writes into an environment makes new ones
ENVIRONMENT_MARKER = ".lxm3-complete"  # in a complete environment: key, python, files, bytes
ENVIRONMENT_INCOMING = "incoming"  # in the staging directory: environment archives on their way in


class Requirements(ValueObject):
    """A project's declared dependencies, as packaging read them.

    ``lines`` is a requirements file's text for pip, run in ``directory``;
    ``names`` the top-level distributions; ``inputs`` the contents of the
    files read (part of the cache key); ``note`` something the user should
    know (a lock file lxm3 does not read, dependencies it cannot see).
    """

    def __init__(self, lines: List[str], source: str, directory: str, names: List[str],
                 inputs: Dict[str, str], bundled: bool = False, note: Optional[str] = None,
                 error: Optional[str] = None):
        self.lines = lines
        self.source = source
        self.directory = directory
        self.names = names
        self.inputs = inputs
        self.bundled = bundled  # pip_args without --no-deps: the archive holds them already
        self.note = note
        self.error = error  # they could not be read: a BuildError if a managed environment needs them


_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_UNREAD_LOCKS = {"uv.lock": "uv export --format requirements-txt -o requirements.txt",
                 "pdm.lock": "pdm export -o requirements.txt",
                 "poetry.lock": "poetry export -o requirements.txt"}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _requirement_names(lines: Iterable[str]) -> List[str]:
    names = []
    for line in lines:
        line = line.split(" #")[0].strip()
        match = _REQUIREMENT_NAME.match(line) if line and not line.startswith(("-", "#")) else None
        if match and "/" not in line.split(";")[0] and not line.startswith("."):
            names.append(match.group(1))
    return names


def _requirements_file_inputs(path: str, seen: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The text of a requirements file and of the files it includes (``-r``, ``-c``)."""
    seen = {} if seen is None else seen
    if path in seen:
        return seen
    seen[path] = _read_text(path)
    for line in seen[path].splitlines():
        match = re.match(r"^\s*(?:-r|-c|--requirement|--constraint)[\s=]+(\S+)", line)
        if match and "://" not in match.group(1):
            included = os.path.join(os.path.dirname(path), os.path.expanduser(match.group(1)))
            if os.path.isfile(included):
                _requirements_file_inputs(included, seen)
    return seen


def _pylock_lines(path: str) -> List[str]:
    """``name==version ; marker`` for each package of a PEP 751 lock (its sources are
    left to the index: the pins are what is honoured); the project itself and
    packages from a directory or VCS are left out."""
    try:
        packages = _toml_loads(_read_text(path)).get("packages", [])
    except ValueError as e:
        raise BuildError(f"{path} is not a readable lock file: {e}") from None
    lines = []
    for package in packages:
        if not isinstance(package, Mapping) or not package.get("name") or not package.get("version") \
                or "directory" in package or "vcs" in package:
            continue
        marker = package.get("marker")
        lines.append(f"{package['name']}=={package['version']}{' ; ' + marker if marker else ''}")
    return lines


def _pyproject_dependencies(project: str) -> Tuple[Optional[List[str]], str]:
    """``[project] dependencies`` of a project, or None and why they cannot be read."""
    path = os.path.join(project, "pyproject.toml")
    if not os.path.isfile(path):
        return None, f"{project} has no pyproject.toml to read its dependencies from"
    try:
        data = _toml_loads(_read_text(path))
    except ValueError as e:
        return None, f"{path} cannot be read: {e}"
    section = data.get("project")
    if not isinstance(section, Mapping):
        return None, f"{path} has no [project] table"
    if "dependencies" in (section.get("dynamic") or []):
        return None, f"{path} declares its dependencies dynamic (from setup.py or a plug-in)"
    return [str(d) for d in section.get("dependencies") or []], path


def declared_requirements(spec: PythonPackage) -> Requirements:
    """What a PythonPackage's tasks need besides its code: the pins beside the
    project (``pylock.toml``, else ``requirements.txt``), else ``[project]
    dependencies`` of its pyproject.toml and of its ``extra_packages`` paths;
    with none of these (dynamic dependencies, setup.py only), none and a note saying why."""
    bundled = "--no-deps" not in spec.pip_args
    for name in ("pylock.toml", "requirements.txt"):
        path = os.path.join(spec.path, name)
        if os.path.isfile(path):
            if name == "pylock.toml":
                lines = _pylock_lines(path)
                inputs = {path: _read_text(path)}
            else:
                inputs = _requirements_file_inputs(path)
                lines = [f"-r {shell_quote(path)}"]  # pip reads its options as shell words
            names = _requirement_names(lines if name == "pylock.toml" else inputs[path].splitlines())
            return Requirements(lines, path, spec.path, names, inputs, bundled)
    dependencies, where = _pyproject_dependencies(spec.path)
    if dependencies is None:
        return Requirements([], spec.path, spec.path, [], {}, bundled, note=(
            f"{where}: list the dependencies in requirements.txt beside it for a managed environment"))
    lines, inputs = list(dependencies), {where: _read_text(where)}
    for extra in spec.extra_packages:
        if os.path.isdir(extra):
            more, extra_where = _pyproject_dependencies(extra)
            if more:
                lines += more
                inputs[extra_where] = _read_text(extra_where)
    locks = [name for name in _UNREAD_LOCKS if os.path.isfile(os.path.join(spec.path, name))]
    note = (f"{os.path.join(spec.path, locks[0])} is not read (lxm3 reads pylock.toml and "
            f"requirements.txt): the dependencies of pyproject.toml are resolved afresh; "
            f"`{_UNREAD_LOCKS[locks[0]]}` pins them" if locks else None)
    return Requirements(lines, where, spec.path, _requirement_names(lines), inputs, bundled, note)


def wants_environment(executable: ClusterExecutable, cluster: ClusterConfig) -> bool:
    """Whether a job of ``executable`` on ``cluster`` gets a managed environment."""
    if executable.container is not None or executable.requirements is None:
        return False
    return (executable.environment or cluster.environment or "none") == "managed"


def warn_missing_dependencies(executable: ClusterExecutable, cluster: ClusterConfig) -> None:
    """Say so when the project declares dependencies its tasks on ``cluster`` will
    not have: no managed environment, no container, not bundled (--no-deps)."""
    requirements = executable.requirements
    if requirements is None or not requirements.names or requirements.bundled \
            or wants_environment(executable, cluster):
        return
    names = ", ".join(requirements.names[:8]) + (", ..." if len(requirements.names) > 8 else "")
    _progress(f"{executable.name}: warning: {requirements.source} declares dependencies ({names}) "
              f"that tasks on {cluster.name} will not get: the archive holds the code only "
              "(pip_args has --no-deps), and no managed environment or container brings them. "
              "Unless the cluster's Python has them, give PythonPackage(environment=\"managed\") "
              f"(or environment = \"managed\" in the config of cluster {cluster.name!r}), or run "
              "in a container (SingularityContainer)")


# -- The cluster's Python, as a target for wheels ------------------------------

# Run by the cluster's interpreter in the probe; one JSON line. Python 2 can run
# it too, so that an old interpreter is named rather than a SyntaxError shown.
PYTHON_INFO_CODE = r'''
import json, os, platform, sys
impl = getattr(sys, "implementation", None)
def full(v):
    text = "%d.%d.%d" % (v[0], v[1], v[2])
    return text if v[3] == "final" else text + v[3][0] + str(v[4])
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (AttributeError, ValueError, OSError):
    libc = ""
print(json.dumps({
    "executable": sys.executable, "version": platform.python_version(),
    "implementation": impl.name if impl else platform.python_implementation().lower(),
    "cache_tag": impl.cache_tag if impl else None, "abiflags": getattr(sys, "abiflags", ""),
    "machine": platform.machine(), "libc": libc,
    "markers": {
        "implementation_name": impl.name if impl else "",
        "implementation_version": full(impl.version) if impl else "0",
        "os_name": os.name, "platform_machine": platform.machine(),
        "platform_release": platform.release(), "platform_system": platform.system(),
        "platform_version": platform.version(), "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform}}))
'''


def python_text(python: Optional[Mapping[str, Any]]) -> str:
    """``CPython 3.11.2 (cpython-311, x86_64, glibc 2.36) at /usr/bin/python3``."""
    if not python:
        return "not known"
    name = {"cpython": "CPython", "pypy": "PyPy"}.get(python.get("implementation"), python.get("implementation"))
    details = ", ".join(filter(None, [python_tag(python), python.get("machine"), python.get("libc")]))
    return f"{name} {python.get('version')} ({details}) at {python.get('executable')}"


def python_tag(python: Mapping[str, Any]) -> str:
    """``cpython-311``: what an environment's compiled files must match (with ABI flags)."""
    return f"{python.get('cache_tag') or '?'}{python.get('abiflags') or ''}"


def manylinux_platforms(machine: str, glibc: Tuple[int, int]) -> List[str]:
    """Every manylinux tag a glibc ``glibc`` on ``machine`` runs, newest first.

    pip takes ``--platform`` literally (it expands only manylinux2014/2010), so
    each is given: ``manylinux_2_36_x86_64``, ..., ``manylinux_2_17_x86_64``,
    ``manylinux2014_x86_64``, ... down to 2.5 (``manylinux1``) on x86, 2.17
    elsewhere, as the ``packaging`` library lists what a Python supports.
    """
    major, minor = glibc
    oldest = 5 if machine in ("x86_64", "i686") else 17
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags: List[str] = []
    if major != 2:  # no glibc 3 yet: what it would run is not known
        return tags
    for version in range(minor, oldest - 1, -1):
        tags.append(f"manylinux_2_{version}_{machine}")
        if version in legacy:
            tags.append(f"{legacy[version]}_{machine}")
    return tags


class PythonTarget(ValueObject):
    """The cluster's interpreter as pip's target: version, ABI and platform tags."""

    def __init__(self, python: Mapping[str, Any], where: str):
        self.python = dict(python)
        implementation, version = python.get("implementation"), str(python.get("version", ""))
        match = re.match(r"^(\d+)\.(\d+)", version)
        libc = re.match(r"^glibc (\d+)\.(\d+)", python.get("libc") or "")
        if implementation != "cpython" or not match or int(match.group(1)) < 3:
            raise ClusterError(f"a managed environment needs CPython 3, but the Python of {where} is "
                               f"{python_text(python)}: set python in the cluster's config to a "
                               "CPython 3 interpreter, or use a container")
        if not libc:
            raise ClusterError(f"a managed environment needs a Linux with glibc (manylinux wheels), "
                               f"but the Python of {where} reports libc {python.get('libc')!r}: use a "
                               "container there")
        self.version = f"{match.group(1)}.{match.group(2)}"
        self.abi = f"cp{match.group(1)}{match.group(2)}{python.get('abiflags') or ''}"
        self.tag = python_tag(python)
        self.machine = str(python.get("machine"))
        self.platforms = manylinux_platforms(self.machine, (int(libc.group(1)), int(libc.group(2))))
        if not self.platforms:
            raise ClusterError(f"the Python of {where} runs on {python.get('libc')} ({self.machine}), "
                               "which no manylinux wheel targets: use a container there")
        self.markers = dict(python.get("markers") or {})

    def key_parts(self) -> List[Any]:
        """What of the target decides which wheels fit (the micro version does not)."""
        return ["cp", self.version, self.abi, self.tag, self.platforms]

    def describe(self) -> str:
        return f"CPython {self.version} ({self.abi}) on {self.platforms[0] if self.platforms else self.machine}"


# -- Resolving and packing, on this machine -----------------------------------


class Environment(ValueObject):
    """A managed environment built here: its key and its archive in the cache."""

    def __init__(self, key: str, archive: str, digest: str, files: int, bytes: int,  # noqa: A002
                 pins: List[List[str]], tag: str):
        self.key = key  # sha256 of the pins (with hashes), the Python and the platform
        self.archive = archive  # ~/.cache/lxm3/envs/<key>.tar.gz
        self.digest = digest  # sha256 of the archive
        self.files = files  # files in it (none in __pycache__)
        self.bytes = bytes
        self.pins = pins  # [name, version] of every distribution, sorted
        self.tag = tag  # the python_tag its compiled files are for
        self._resolved_now = False  # made by this call: say how long it took

    @property
    def short(self) -> str:
        return self.key[:12]

    def pins_text(self, most: int = 6) -> str:
        shown = ", ".join(f"{name} {version}" for name, version in self.pins[:most])
        return shown + (f" and {len(self.pins) - most} more" if len(self.pins) > most else "") or "nothing"


def _environments_cache() -> str:
    return os.path.join(cache_dir(), "envs")


def _pip_settings() -> List[Any]:
    """What, besides the requirements, decides what pip resolves: its PIP_*
    variables and config files (index URLs, find-links, constraints)."""
    paths = [os.environ.get("PIP_CONFIG_FILE") or "", "/etc/pip.conf",
             os.path.join(_xdg_dir("XDG_CONFIG_HOME", ".config"), "pip", "pip.conf"),
             os.path.join(os.path.expanduser("~"), ".pip", "pip.conf"), os.path.join(sys.prefix, "pip.conf")]
    paths += [os.path.join(d, "pip", "pip.conf")
              for d in (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if d]
    files = []
    for path in paths:
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    files.append((path, f.read()))
            except OSError:
                pass
    variables = sorted((k, v) for k, v in os.environ.items() if k.startswith("PIP_"))
    return [variables, files]


# pip, with the environment markers of the cluster's Python: pip evaluates
# markers for the interpreter it runs on even with --python-version, so that
# ``typing_extensions; python_version < "3.13"`` is dropped when resolving from
# 3.13 for 3.11. pip's vendored ``packaging`` asks default_environment() on
# every evaluation; the report's "environment" shows the values used, and
# resolve_environment checks it.
_PIP_FOR_TARGET = """\
import json, runpy, sys
with open(sys.argv.pop(1)) as f:
    environment = json.load(f)
try:
    from pip._vendor.packaging import markers
except ImportError:
    sys.exit("lxm3-no-pip")
markers.default_environment = lambda: dict(environment)
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""

_NETWORK_ERRORS = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure "
                             r"in name resolution|Name or service not known|Network is unreachable|"
                             r"ConnectTimeoutError|Max retries exceeded|Could not fetch URL|"
                             r"ProxyError|SSLError|Connection refused|timed out", re.I)


def _environment_failure(output: str, requirements: Requirements, target: PythonTarget,
                         what: str) -> BuildError:
    """pip's failure as what to do: no wheel for the target, no index, an old pip."""
    tail = "\n".join(line for line in output.strip().splitlines()
                     if not line.startswith(("WARNING: Running pip as", "[notice]")))[-3000:]
    if "lxm3-no-pip" in output:
        return BuildError(f"{what}: a managed environment is resolved with this Python's pip "
                          f"({sys.executable}), which has none: {sys.executable} -m ensurepip")
    if re.search(r"no such option: --(report|python-version)", output):
        return BuildError(f"{what}: the pip of {sys.executable} is too old for managed environments "
                          f"(it needs --report, pip 22.2 or later): {sys.executable} -m pip install -U pip")
    missing = re.findall(r"No matching distribution found for (\S+)", output)
    index = re.findall(r"Looking in (?:indexes|links): (.+)", output)
    where = f" (pip looked in {'; '.join(index)})" if index else ""
    if _NETWORK_ERRORS.search(output):
        return BuildError(
            f"{what}: this machine cannot reach the package index{where}, so the environment cannot be "
            f"resolved for {target.describe()}. Check the network, proxy (HTTPS_PROXY) and index "
            f"settings (PIP_INDEX_URL, pip.conf) here; pip said:\n{tail}")
    if missing:
        name = missing[0]
        platform = target.platforms[0] if target.platforms else target.machine
        return BuildError(
            f"{what}: no wheel of {name} for the cluster's {target.describe()} "
            f"({target.abi}-{target.abi}-{platform} or older manylinux, abi3 or pure Python){where}. "
            "lxm3 installs only wheels, resolved here: no compiler runs for the cluster. Options: pin a "
            f"version of {name} that has such a wheel in {requirements.source} (`pip download "
            f"{name} --only-binary=:all: --python-version {target.version} --platform {platform} "
            "--no-deps -d /tmp/w` shows which do), use a pure-Python alternative, or run in a "
            "container (SingularityContainer) that has it. If this machine cannot reach the index, "
            f"pip says the same: check its network. pip said:\n{tail}")
    return BuildError(f"{what}: pip could not resolve the environment for {target.describe()} "
                      f"from {requirements.source}:\n{tail}")


def _fix_scripts(target_dir: str) -> None:
    """Console scripts pip wrote start with this machine's interpreter: make them
    start the task's (``$LXM_PYTHON``), whatever its path on the node."""
    bindir = os.path.join(target_dir, "bin")
    if not os.path.isdir(bindir):
        return
    trampoline = (b"#!/bin/sh\n'''exec' \"${LXM_PYTHON:-python3}\" \"$0\" \"$@\"\n' '''\n"
                  b"# The line above: lxm3 made this script run the task's Python.\n")
    for name in sorted(os.listdir(bindir)):
        path = os.path.join(bindir, name)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            text = f.read()
        first, _, rest = text.partition(b"\n")
        if first.startswith(b"#!") and b"python" in first:
            with open(path, "wb") as f:
                f.write(trampoline + rest)


# Written into an environment that holds .pth files: a PYTHONPATH entry is not
# a site directory, so Python would not read them. It runs the sitecustomize it
# hides (the interpreter's own, if any) too.
SITECUSTOMIZE = '''\
# Written by lxm3: makes Python read this managed environment's .pth files,
# which it does for site directories but not for PYTHONPATH entries, then runs
# the sitecustomize module this one hides, if there is one.
import os
import site
import sys

_here = os.path.dirname(os.path.abspath(__file__))
site.addsitedir(_here)
try:
    import importlib.machinery
    import importlib.util

    _later = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _later)
    if _spec is not None and _spec.origin and os.path.dirname(os.path.abspath(_spec.origin)) != _here:
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
except Exception as _error:  # as Python treats a failing sitecustomize: a warning
    sys.stderr.write("lxm3: the sitecustomize hidden by the managed environment failed: %r\\n" % (_error,))
'''


def _add_sitecustomize(target_dir: str) -> bool:
    """Whether the environment holds .pth files (and so got lxm3's sitecustomize)."""
    if not any(name.endswith(".pth") for name in os.listdir(target_dir)):
        return False
    path = os.path.join(target_dir, "sitecustomize.py")
    if os.path.exists(path):
        raise BuildError("a package of the managed environment installs sitecustomize.py, and the "
                         "environment holds .pth files, which lxm3 makes Python read with a "
                         "sitecustomize of its own; install that package in a container instead")
    with open(path, "w") as f:
        f.write(SITECUSTOMIZE)
    return True


def pack_environment(directory: str, archive: str) -> Tuple[str, int, int]:
    """A reproducible .tar.gz of ``directory``: equal files give equal bytes.
    Returns its sha256, the number of files and their bytes."""
    import gzip
    import tarfile

    entries = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in dirnames + filenames:
            entries.append(os.path.join(dirpath, name))
    files = size = 0
    # Level 3: numpy's 56 MiB in 1.2 s to 17.3 MiB; level 6 took 3.2 s for 15.9 MiB.
    with open(archive, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                   compresslevel=3) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries, key=lambda p: os.path.relpath(p, directory).split(os.sep)):
            st = os.lstat(path)
            info = tarfile.TarInfo(os.path.relpath(path, directory).replace(os.sep, "/"))
            info.mtime = 315532800  # 1980-01-01, as the code archives' entries
            if os.path.isdir(path) and not os.path.islink(path):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif os.path.isfile(path) and not os.path.islink(path):
                info.size, info.mode = st.st_size, 0o755 if st.st_mode & 0o111 else 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
                files, size = files + 1, size + st.st_size
            else:
                raise BuildError(f"{path} is a link or a special file: a managed environment holds "
                                 "files and directories only")
    return _hash_file(archive), files, size


def _environment_inputs_file(requirements: Requirements, target: PythonTarget) -> str:
    """Where the key resolved from these inputs is kept: the requirements (and the
    files they come from), the target, and pip's index settings."""
    # Not the kernel's release and version: login nodes behind one name may differ in them,
    # and a kernel update is no reason to resolve again.
    markers = {k: v for k, v in target.markers.items() if k not in ("platform_release", "platform_version")}
    inputs = _cache_key("lxm3-env-inputs", ENVIRONMENT_FORMAT, requirements.lines,
                        sorted(requirements.inputs.items()), target.key_parts(), markers, _pip_settings())
    return os.path.join(_environments_cache(), "inputs", inputs + ".json")


def resolve_environment(requirements: Requirements, target: PythonTarget, what: str) -> Environment:
    """The environment of ``requirements`` for ``target``: from the cache when the
    same inputs were resolved before (no pip, no network), else resolved and packed."""
    import json
    import shutil
    import tempfile

    cache = _environments_cache()
    index = _environment_inputs_file(requirements, target)
    known = _read_json(index)
    if isinstance(known, dict):
        manifest = _read_json(os.path.join(cache, f"{known.get('key')}.json"))
        if isinstance(manifest, dict) and os.path.isfile(manifest.get("archive", "")):
            try:
                return Environment(**manifest)
            except TypeError:  # written by another version of lxm3: resolve again
                pass
    start = time.monotonic()
    _progress(f"{what}: resolving its environment ({_counted(len(requirements.names), 'requirement')} "
              f"from {requirements.source}) for {target.describe()} ...")
    make_private_dirs(os.path.join(cache, "inputs"))
    workdir = tempfile.mkdtemp(prefix="lxm3-env-")
    tmp_archive = None
    try:
        site_dir, report_path = os.path.join(workdir, "site"), os.path.join(workdir, "report.json")
        requirements_path, markers_path = os.path.join(workdir, "requirements.txt"), os.path.join(workdir, "markers.json")
        with open(requirements_path, "w", encoding="utf-8") as f:
            f.write("\n".join(requirements.lines) + "\n")
        with open(markers_path, "w", encoding="utf-8") as f:
            json.dump(target.markers, f)
        argv = [sys.executable, "-c", _PIP_FOR_TARGET, markers_path, "install",
                "--disable-pip-version-check", "--no-input", "--target", site_dir,
                "--only-binary=:all:", "--python-version", target.version, "--implementation", "cp",
                "--abi", target.abi, *[a for p in target.platforms for a in ("--platform", p)],
                "--no-compile", "--report", report_path, "-r", requirements_path]
        try:
            _run_build_step(argv, what, cwd=requirements.directory)
        except BuildError as e:
            raise _environment_failure(str(e), requirements, target, what) from None
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        used = report.get("environment", {}).get("python_version")
        if used != target.markers.get("python_version"):
            raise BuildError(f"{what}: pip resolved with the environment markers of Python {used}, not "
                             f"the cluster's {target.markers.get('python_version')}: this pip "
                             f"({report.get('pip_version')}) cannot be told the cluster's markers; "
                             "please report it")
        pins = []
        for item in report.get("install", []):
            info = item.get("download_info", {})
            hashes = (info.get("archive_info") or {}).get("hashes") or {}
            pins.append([str(item["metadata"]["name"]), str(item["metadata"]["version"]),
                         hashes.get("sha256") or (info.get("archive_info") or {}).get("hash") or info.get("url")])
        pins.sort(key=lambda pin: re.sub(r"[-_.]+", "-", pin[0]).lower())
        os.makedirs(site_dir, exist_ok=True)  # no dependencies: an empty environment
        _fix_scripts(site_dir)
        _add_sitecustomize(site_dir)
        key = _cache_key("lxm3-env", ENVIRONMENT_FORMAT, pins, target.key_parts())
        fd, tmp_archive = tempfile.mkstemp(prefix=f".{key[:12]}-", suffix=".tar.gz.tmp", dir=cache)
        os.close(fd)
        digest, files, size = pack_environment(site_dir, tmp_archive)
        archive = os.path.join(cache, f"{key}.tar.gz")
        os.replace(tmp_archive, archive)
        environment = Environment(key, archive, digest, files, size,
                                  [[name, version] for name, version, _ in pins], target.tag)
        _write_json_atomic(os.path.join(cache, f"{key}.json"), environment._fields())
        _write_json_atomic(index, {"key": key})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if tmp_archive is not None and os.path.exists(tmp_archive):
            os.unlink(tmp_archive)
    environment._resolved_now = True
    _progress(f"{what}: environment {environment.short}: {environment.pins_text()} (resolved and packed "
              f"in {time.monotonic() - start:.1f} s: {environment.files:,} files, "
              f"{_size_text(environment.bytes)}, {_size_text(os.path.getsize(archive))} to send)")
    return environment


# -- On the cluster: check, create, use ----------------------------------------

# Bash: is the environment $2 in directory $1 complete? A marker, and as many
# files (outside __pycache__) as it says: a scratch purge that took some is seen.
# Prints "env KEY ok FILES BYTES", "env KEY missing" or "env KEY broken WHY";
# marks one found whole as used now (for lxm3 clean). It runs in every warm
# launch's probe, so find is its only program: the rest are bash builtins.
ENVIRONMENT_CHECK = f"""lxm_env_check() {{
  local d="$1/$2" k v want='' files='' bytes='' have
  if [ ! -e "$d" ]; then echo "env $2 missing"; return 0; fi
  if [ ! -f "$d/{ENVIRONMENT_MARKER}" ]; then echo "env $2 broken: it has no completion marker"; return 0; fi
  while read -r k v; do
    case $k in checked_files) want=$v ;; files) files=$v ;; bytes) bytes=$v ;; esac
  done <"$d/{ENVIRONMENT_MARKER}" || true
  # A dot per file, read as one word (bash reads a pipe line by line, byte by byte:
  # 80 ms for numpy's 1,078 paths); a find without -printf counts lines with wc.
  if have=$(find "$d" -name __pycache__ -prune -o -type f ! -name {ENVIRONMENT_MARKER} -printf . 2>/dev/null); then
    have=${{#have}}
  else
    have=$(find "$d" -name __pycache__ -prune -o -type f ! -name {ENVIRONMENT_MARKER} -print | wc -l) || true
  fi
  if [ -n "$want" ] && [ "$want" = "$((have))" ]; then
    : >"$1/.$2.used" 2>/dev/null || true  # truncating sets its time: used now
    echo "env $2 ok $files $bytes"
  else
    echo "env $2 broken: it has $((have)) of its ${{want:-?}} files"
  fi
}}
"""


def _environments_path(cluster: ClusterConfig) -> str:
    """The environments directory as the remote shell in $HOME should see it."""
    if cluster.environments:
        path = cluster.environments
        return path[2:] or "." if path == "~" or path.startswith("~/") else path
    return f"{_staging_path(cluster).rstrip('/')}/envs"


def _read_environment_states(output: str) -> Dict[str, Tuple[str, str]]:
    """{key: (ok|missing|broken, the rest of the line)} from ENVIRONMENT_CHECK lines."""
    states = {}
    for line in output.splitlines():
        word, key, rest = (line.split(None, 2) + ["", "", ""])[:3]
        if word == "env" and key:
            state, _, detail = rest.partition(" ")
            states[key] = (state.rstrip(":"), detail.strip())
    return states


def check_environments(connection: Connection, envs: str, keys: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """Which of ``keys`` are complete in ``envs`` there: one round trip."""
    script = ENVIRONMENT_CHECK + "".join(f"lxm_env_check {shell_quote(envs)} {k}\n" for k in keys)
    return _read_environment_states(connection.run_script(script, "checking the managed environments"))


# Run on the cluster by its Python, under the environment's lock: unpacks the
# archive into <key>.tmp-*, checks it, compiles it, marks it complete and
# renames it to <key>. Prints one "env-<what> KEY ..." line. Python 3.6+.
CREATE_ENVIRONMENT_CODE = r'''
import errno, fcntl, hashlib, os, random, shutil, sys, tarfile, tempfile, time
envs, key, archive, digest, tag, expected, version, MARKER = sys.argv[1:9]
final = os.path.join(envs, key)


def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def counted(root):
    """Files outside __pycache__ (what the marker's check counts), all files, their bytes."""
    checked = files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        cached = "__pycache__" in os.path.relpath(dirpath, root).split(os.sep)
        for name in filenames:
            if name == MARKER and dirpath == root:
                continue
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
            checked += 0 if cached else 1
    return checked, files, size


def marker(root):
    try:
        with open(os.path.join(root, MARKER)) as f:
            return dict(line.rstrip("\n").split(" ", 1) for line in f if " " in line)
    except (IOError, OSError):
        return None


def complete(root):
    found = marker(root)
    return found is not None and found.get("key") == key and found.get("checked_files") == str(counted(root)[0])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def build():
    if complete(final):
        remove(archive)
        return "exists"
    if os.path.lexists(final):
        aside = "%s.broken-%06d" % (final, random.randrange(10 ** 6))
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
        say("env-note", key, "moved-aside")
    for name in os.listdir(envs):  # left by builds that were interrupted: this one holds the lock
        if name.startswith(key + ".tmp-"):
            shutil.rmtree(os.path.join(envs, name), ignore_errors=True)
    if not os.path.isfile(archive):
        return "missing-archive"
    if sha256(archive) != digest:
        remove(archive)
        return "bad-archive"
    start = time.time()
    tmp = tempfile.mkdtemp(prefix=key + ".tmp-", dir=envs)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise ValueError("unsafe-member " + member.name)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members, filter="data")
            else:
                tar.extractall(tmp, members)
        import compileall
        compileall.compile_dir(tmp, maxlevels=64, quiet=2, ddir=final, workers=min(8, os.cpu_count() or 1))
        checked, files, size = counted(tmp)
        if str(checked) != expected:
            raise ValueError("incomplete %d of %s files" % (checked, expected))
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("lxm3-environment 1\nkey %s\npython %s\nfiles %d\nchecked_files %d\nbytes %d\n"
                    "created %s\nlxm3 %s\n" % (key, tag, files, checked, size,
                                               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), version))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove(archive)
    return "created %d %d %.1f" % (files, size, time.time() - start)


def locked():
    """Take the environment's lock: whether another launch held it (and built it meanwhile)."""
    lock = open(os.path.join(envs, "." + key + ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock, "no"
    except (IOError, OSError):
        fcntl.flock(lock, fcntl.LOCK_EX)  # another launch builds it: wait, then use it
        return lock, "yes"


try:
    lock, waited = locked()
    outcome = build()
except EnvironmentError as e:  # CODE|what it means|the file (the file last: it may hold anything)
    say("env-failed", key, "os", "%s|%s|%s" % (errno.errorcode.get(e.errno, "?"), e.strerror, e.filename or envs))
except Exception as e:  # a damaged archive (ValueError: ours; tarfile's errors)
    say("env-failed", key, "archive", "%s: %s" % (type(e).__name__, e))
else:
    if outcome == "exists":
        found = marker(final) or {}
        say("env-exists", key, waited, found.get("files", "?"), found.get("bytes", "?"))
    else:
        say("env-" + outcome.split()[0], key, *outcome.split()[1:])
    try:
        os.utime(os.path.join(envs, "." + key + ".used"), None)
    except OSError:
        open(os.path.join(envs, "." + key + ".used"), "a").close()
'''


class EnvironmentPlan(ValueObject):
    """A work unit's managed environment: built here, and where it is (or goes) there."""

    def __init__(self, environment: Environment, path: str, modules: List[str], state: str = "unknown",
                 detail: str = ""):
        self.environment = environment
        self.path = path  # <environments>/<key> on the cluster
        self.modules = modules  # loaded before its Python runs (the executor's)
        self.state = state  # ok, missing, broken (ENVIRONMENT_CHECK), unknown
        self.detail = detail


def _python_for(info: ClusterInfo, modules: Sequence[str]) -> Optional[Dict[str, Any]]:
    """What the probe learnt of the interpreter tasks with ``modules`` run."""
    if modules:
        return (info.module_pythons or {}).get("\n".join(modules))
    return info.python


def plan_environments(cluster: ClusterConfig, launches: Sequence[PendingLaunch], info: ClusterInfo,
                      states: Mapping[str, Tuple[str, str]]) -> List[EnvironmentPlan]:
    """Resolve (or find in the cache) the environment of each launch that has one,
    and say where it is there; ``states``: what the probe found of the keys."""
    plans: Dict[str, EnvironmentPlan] = {}
    for launch in launches:
        executable = launch.executable
        if not wants_environment(executable, cluster):
            continue
        requirements = executable.requirements
        if requirements.error:
            raise BuildError(f"{executable.name}: its managed environment: {requirements.error}")
        if requirements.note:
            _progress(f"{executable.name}: note: {requirements.note}")
        if not requirements.lines:
            _progress(f"{executable.name}: no dependencies declared in {requirements.source}: "
                      "no managed environment is needed")
            continue
        modules = list(launch.executor.modules)
        python = _python_for(info, modules)
        where = f"{cluster.name} (config key python = {cluster.python_command!r}" + (
            f", after module load {' '.join(modules)})" if modules else ")")
        if not python:
            raise ClusterError(f"{executable.name} has a managed environment, but the Python of {where} "
                               "is not known: run a real launch (not --dry-run) once")
        environment = resolve_environment(requirements, PythonTarget(python, where),
                                          f"{cluster.name}: {executable.name}")
        plan = plans.get(environment.key)
        if plan is None:
            state, detail = states.get(environment.key, ("unknown", ""))
            plan = plans[environment.key] = EnvironmentPlan(
                environment, f"{info.environments}/{environment.key}", modules, state, detail)
        launch.environment = plan
    return list(plans.values())


def _create_script(cluster: ClusterConfig, info: ClusterInfo, plans: Sequence[EnvironmentPlan]) -> str:
    """One bash script that creates each environment with its own interpreter."""
    lines = ["umask 077", 'lxm_code=$(mktemp) || exit 1', 'trap \'rm -f "$lxm_code" "$lxm_code.err"\' EXIT',
             "cat >\"$lxm_code\" <<'LXM3_CREATE_ENVIRONMENT'", CREATE_ENVIRONMENT_CODE.strip("\n"),
             "LXM3_CREATE_ENVIRONMENT", f"lxm_python={shell_quote(cluster.python_command)}"]
    for plan in plans:
        env = plan.environment
        archive = f"{info.staging}/{ENVIRONMENT_INCOMING}/{env.key}.tar.gz"
        args = [info.environments, env.key, archive, env.digest, env.tag, str(env.files), __version__,
                ENVIRONMENT_MARKER]
        fail = f"echo {shell_quote('env-failed ' + env.key + ' modules')} \"$*\"; exit 0"
        lines += ["(", "lxm_env_names=()", f"lxm_fail() {{ {fail}; }}", module_lines(plan.modules),
                  '"$lxm_python" "$lxm_code" ' + " ".join(shell_quote(a) for a in args) +
                  ' 2>"$lxm_code.err" ||',
                  f"  echo {shell_quote('env-failed ' + env.key + ' python')} $? \"$(tail -c 1000 \"$lxm_code.err\" | tr '\\n' ' ')\"",
                  ")"]
    return "\n".join(lines) + "\n"


def create_environments(connection: Connection, cluster: ClusterConfig, info: ClusterInfo,
                        plans: Sequence[EnvironmentPlan], tree: str) -> None:
    """Unpack the environments the cluster does not have (their archives came with
    the launch's files): one round trip; the archive of one that came damaged or
    went missing is sent again, once."""
    pending, resent = list(plans), False
    while pending:
        output = connection.run_script(_create_script(cluster, info, pending),
                                       "creating the managed environments")
        retry = []
        for plan in pending:
            env = plan.environment
            lines = [line for line in output.splitlines() if line.split()[1:2] == [env.key]]
            outcome = next((line.split() for line in lines if not line.startswith("env-note ")), None)
            what = f"{cluster.name}: environment {env.short}"
            if any(line.startswith("env-note ") for line in lines):
                _progress(f"{what} on {connection.target} was incomplete ({plan.detail or 'no marker'}): "
                          "rebuilt it")
            if outcome is None:
                raise ClusterError(f"creating the managed environment {plan.path} on {connection.target} "
                                   f"said nothing about it; its output was: {output.strip()[-2000:]!r}")
            if outcome[0] == "env-created":
                files, size, seconds = int(outcome[2]), int(outcome[3]), outcome[4]
                _progress(f"{what} created: {files:,} files, {_size_text(size)} ({env.pins_text(4)}; "
                          f"unpacked and compiled in {seconds} s) in {info.environments}")
            elif outcome[0] == "env-exists":
                by = "made meanwhile by another launch" if outcome[2] == "yes" else "already there"
                _progress(f"{what} {by}: using it")
            elif outcome[0] in ("env-missing-archive", "env-bad-archive") and not resent:
                _progress(f"{what}: its archive did not arrive whole; sending it again")
                retry.append(plan)
            else:
                failed = next(line for line in lines if line.split()[0] == outcome[0])
                raise _environment_error(failed, plan, connection, cluster, info)
        if retry:
            send_staging_tree(connection, info, tree)
            resent = True
        pending = retry


def _environment_error(line: str, plan: EnvironmentPlan, connection: Connection,
                       cluster: ClusterConfig, info: ClusterInfo) -> ClusterError:
    """A failed creation (``env-failed KEY KIND DETAIL``), as what happened where, and what to do."""
    where = f"{plan.path} on {connection.target} (cluster {cluster.name!r})"
    words = line.split(" ", 3) + ["", "", "", ""]
    kind, detail = words[2], words[3].strip()
    if words[0] == "env-failed" and kind == "os":
        code, reason, path = (detail.split("|", 2) + ["", ""])[:3]
        if code in ("ENOSPC", "EDQUOT"):
            space = "no space is left" if code == "ENOSPC" else "your disk quota is exceeded"
            return ClusterError(
                f"cannot create the managed environment {where}: {space} in {info.environments} "
                f"({reason}: {path}); nothing was submitted. Free some space there, or keep "
                f"environments on a larger file system: environments = \"/scratch/...\" in the "
                f"config of cluster {cluster.name!r} (lxm3 clean --type env removes unused ones)")
        return ClusterError(f"cannot create the managed environment {where}: {reason}: {path} "
                            f"({code}); nothing was submitted")
    if words[0] == "env-failed" and kind in ("modules", "python"):
        what = "loading its modules" if kind == "modules" else f"{cluster.python_command} failed there (exit"
        return ClusterError(f"cannot create the managed environment {where}: {what} {detail}"
                            f"{')' if kind == 'python' else ''}; nothing was submitted")
    return ClusterError(f"cannot create the managed environment {where}: {line.split(' ', 2)[-1]}; "
                        "nothing was submitted")


def environment_lines(python_command: str, plan: Optional[EnvironmentPlan]) -> str:
    """Job-script lines: the cluster's Python as LXM_PYTHON (a task's own wins), and
    the managed environment on PYTHONPATH after the code, checked first."""
    lines = ["# The cluster's Python (config: python); a task's own LXM_PYTHON wins.",
             f"export LXM_PYTHON=\"${{LXM_PYTHON:-{python_command}}}\""]
    if plan is None:
        return "\n".join(lines)
    path, tag = shell_quote(plan.path), plan.environment.tag
    check = "import sys; print(sys.implementation.cache_tag + getattr(sys, \"abiflags\", \"\"))"
    lines += [
        f"# The managed environment {plan.environment.short}: the project's dependencies, for {tag}.",
        f"lxm_env={path}",
        f'[[ -f $lxm_env/{ENVIRONMENT_MARKER} ]] || lxm_fail "the managed environment $lxm_env is '
        'missing or incomplete on $(hostname) (removed by lxm3 clean?): launch again to make it again"',
        f"lxm_tag=$(\"$LXM_PYTHON\" -c {shell_quote(check)} 2>&1) ||",
        '  lxm_fail "cannot run $LXM_PYTHON on $(hostname) to check it against the managed '
        'environment: $lxm_tag"',
        f'[[ $lxm_tag == {tag} ]] || lxm_fail "$LXM_PYTHON on $(hostname) is $lxm_tag, but the managed '
        f'environment $lxm_env was made for {tag}: set python in the cluster\'s config (or the '
        "task's LXM_PYTHON, or its modules) to that Python\"",
        'export PYTHONPATH="$lxm_workdir:$lxm_env${PYTHONPATH#"$lxm_workdir"}"',
        '[[ ! -d $lxm_env/bin ]] || export PATH="$lxm_env/bin:$PATH"',
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Job scripts
# ---------------------------------------------------------------------------
#
# One bash script per work unit, plus a tasks file beside it. Line 1 of the
# tasks file holds what every task shares (the config's env), line 2 + i the
# arguments and environment of task i. Each value is written as a token of
# safe characters and \xHH escapes, and decoded with ``printf %b`` into a bash
# array: the shell never parses or expands a user's value, and a task finds
# its line with one ``sed`` however large the sweep is.


class ShellWords(str):
    """An argument from ``xm.ShellSafeArg``: shell text the job script expands on
    the node, in the task's environment, as a shell expands an unquoted word
    (``$VAR``, ``$(...)``, globs; word splitting may make it several arguments,
    or none). Every other argument arrives exactly as written."""

    __slots__ = ()


class Task(ValueObject):
    """One task of a work unit: its command-line arguments and environment.

    An argument that is a ``ShellWords`` is expanded by the shell on the node.
    """

    def __init__(self, args: List[str], env: Dict[str, str]):
        self.args = args
        self.env = env
        self._size: Optional[int] = None  # exec bytes, once checked


_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.,/:=+@%^")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- What a task may be given -------------------------------------------------
#
# A task's arguments and environment reach its program through execve(), so
# they are checked where tasks are built, before anything is submitted or run:
# a value that cannot arrive exactly is refused rather than cut or mangled.

# Names a task's environment may not set. The job script's own variables are
# lxm_* and LXM_TASK_ID...: a task that set lxm_archive would run another
# archive. Bash refuses to export its read-only variables (UID, EUID, PPID,
# SHELLOPTS, BASHOPTS, BASH_VERSINFO) and drops or replaces its special ones
# (PWD, SHLVL, RANDOM, ...) before the program starts; IFS would change how
# the script reads the tasks file. LXM_PYTHON is the user's to set.
RESERVED_ENV_PREFIX = "lxm_"
RESERVED_ENV_NAMES = frozenset({
    "LXM_TASK_ID", "LXM_EXPERIMENT_ID", "LXM_WORK_UNIT_ID", "LXM_NUM_TASKS", "LXM_ATTEMPT",
    "IFS", "UID", "EUID", "PPID", "SHELLOPTS", "BASHOPTS", "BASH_VERSINFO", "BASHPID",
    "BASH", "BASH_ALIASES", "BASH_ARGC", "BASH_ARGV", "BASH_ARGV0", "BASH_CMDS",
    "BASH_COMMAND", "BASH_LINENO", "BASH_REMATCH", "BASH_SOURCE", "BASH_SUBSHELL",
    "BASH_VERSION", "DIRSTACK", "EPOCHREALTIME", "EPOCHSECONDS", "FUNCNAME", "GROUPS",
    "HISTCMD", "LINENO", "OLDPWD", "OPTERR", "OPTIND", "PIPESTATUS", "PS1", "PS2", "PS4",
    "PWD", "RANDOM", "SECONDS", "SHLVL", "SRANDOM", "_",
})


def check_env_name(name: Any, what: str) -> None:
    """Refuse a name that is not a variable name, or that the job script reserves."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ValueError(f"{what}: {name!r} is not a valid environment variable name "
                         "(letters, digits and _, not starting with a digit)")
    if name.startswith(RESERVED_ENV_PREFIX) or name in RESERVED_ENV_NAMES:
        why = ("is set by the job script" if name.startswith(("lxm_", "LXM_"))
               else "is a variable of bash that a task cannot set")
        raise ValueError(f"{what}: environment variable {name} {why}; choose another name "
                         "(reserved: lxm_*, LXM_TASK_ID, LXM_EXPERIMENT_ID, LXM_WORK_UNIT_ID, "
                         "LXM_NUM_TASKS and bash's own variables such as IFS, PWD, UID)")


def _exec_size(text: str, what: str) -> int:
    """Bytes ``text`` takes in an exec: its UTF-8, its NUL and the pointer to it."""
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL byte, which no program can receive "
                         "(the value would be cut short there)")
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} cannot be encoded as UTF-8: {e.reason} at "
                         f"position {e.start}") from None
    if size + 1 > MAX_ARG_STRLEN:
        raise ValueError(f"{what} is {size + 1} bytes; Linux passes at most MAX_ARG_STRLEN = "
                         f"{MAX_ARG_STRLEN} bytes per argument or NAME=value: pass large data "
                         "in a file (a Fileset, or a path to it)")
    return size + 1 + _POINTER_SIZE


def check_env(env: Mapping[str, Any], what: str) -> int:
    """Check names and values of an environment; returns its exec size."""
    total = 0
    for name, value in env.items():
        check_env_name(name, what)
        total += _exec_size(f"{name}={value}", f"{what}: environment variable {name}")
    return total


_checked_env_names: Set[str] = set()  # names seen valid: a sweep repeats the same ones


def _check_task(task: Task, where: str) -> Task:
    """Refuse a task whose arguments or environment cannot reach its program exactly."""
    for name in task.env:
        if name not in _checked_env_names:
            check_env_name(name, where)
            _checked_env_names.add(name)
    strings = [*task.args, *(f"{name}={value}" for name, value in task.env.items())]
    joined = "".join(strings)
    if joined.isascii() and "\0" not in joined and len(joined) < MAX_ARG_STRLEN:
        # The common case, checked at once: no string can be too long.
        total = len(joined) + len(strings) * (1 + _POINTER_SIZE)
    else:  # look at each string, to say which one is wrong
        total = check_env(task.env, where)
        for index, arg in enumerate(task.args):
            flag = arg.split("=", 1)[0] if arg.startswith("--") else ""
            field = f"argument {flag}" if flag else f"argument {index + 1}"
            total += _exec_size(arg, f"{where}: {field}")
    if total > TASK_INPUT_BUDGET:
        raise _over_budget(where, total, "its arguments and environment")
    task._size = total
    return task


def _over_budget(where: str, total: int, what: str) -> ValueError:
    return ValueError(
        f"{where}: {what} take {total} bytes; a task may use at most TASK_INPUT_BUDGET = "
        f"{TASK_INPUT_BUDGET} (half of Linux's usual 2 MiB ARG_MAX, the rest is the node's "
        "own environment): pass large data in a file")


def check_tasks_with_common_env(tasks: Sequence[Task], common_env: Mapping[str, str],
                                where: str) -> None:
    """The config's env is exported into every task too: the budget holds for both."""
    if not common_env or not tasks:
        return
    sizes = [t._size if t._size is not None else _check_task(t, where)._size for t in tasks]
    if max(sizes) + check_env(common_env, "the config's env") <= TASK_INPUT_BUDGET:
        return
    for index, (task, size) in enumerate(zip(tasks, sizes)):
        size += sum(_exec_size(f"{name}={value}", name) for name, value in common_env.items()
                    if name not in task.env)
        if size > TASK_INPUT_BUDGET:
            raise _over_budget(f"{where} task {index}", size,
                               "its arguments and environment with the config's env")


def encode_value(value: str) -> str:
    """A whitespace-free, shell-inert spelling of ``value`` that ``printf %b`` restores."""
    data = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _SAFE_BYTES else f"\\x{b:02x}" for b in data)


def _encode_env(env: Mapping[str, str]) -> List[str]:
    tokens = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")
        tokens.append("e" + encode_value(f"{name}={value}"))
    return tokens


def tasks_file_lines(tasks: Sequence[Task], common_env: Mapping[str, str]) -> Iterable[str]:
    """Tokens: ``e`` an environment entry, ``a`` an argument, ``s`` an argument
    the shell expands (``ShellWords``)."""
    yield " ".join(["#common", *_encode_env(common_env)]) + "\n"
    for index, task in enumerate(tasks):
        tokens = [f"#{index}", *_encode_env(task.env),
                  *(("s" if isinstance(a, ShellWords) else "a") + encode_value(a) for a in task.args)]
        yield " ".join(tokens) + "\n"


class _NoTextForm(TypeError):
    def __init__(self, value: Any, kind: str):
        super().__init__(kind)
        self.value, self.kind = value, kind


# The text Python gives objects that define none: <foo.Bar object at 0x7f...>.
_DEFAULT_REPR = re.compile(r"<[^<>]* at 0x[0-9A-Fa-f]+>")


def _arg_value(value: Any) -> str:
    """The text of one argument value; raises _NoTextForm for objects that have none
    (``--obj=<object object at 0x7f...>`` would reach the program otherwise)."""
    import enum

    if type(value) is str:
        return value
    if type(value) in (int, float):
        return str(value)
    if isinstance(value, xm.ShellSafeArg):
        if not isinstance(value.arg, str):
            raise _NoTextForm(value, f"an xm.ShellSafeArg of {type(value.arg).__name__}, not of "
                                     "shell text (a str)")
        return ShellWords(value.arg)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, os.PathLike):
        return os.fsdecode(os.fspath(value))
    return _checked_text(value)


def _checked_text(value: Any) -> str:
    """``str(value)``, unless that means nothing (raises _NoTextForm)."""
    kind = _no_text_form(value)
    if kind is not None:
        raise _NoTextForm(value, kind)
    text = str(value)
    if _DEFAULT_REPR.search(text):
        raise _NoTextForm(value, "an object whose text is Python's default <... at 0x...>")
    return text


def _no_text_form(value: Any) -> Optional[str]:
    """What ``value`` (or an item of it) is, when its text would mean nothing."""
    import types

    if isinstance(value, (str, int, float, os.PathLike)):
        return None
    if isinstance(value, xm.ShellSafeArg):  # inside a list or dict, or an environment value
        return ("an xm.ShellSafeArg where only text can go: the shell expands a ShellSafeArg "
                "that is a whole argument or a flag's value, not one in a list, dict or "
                "environment variable")
    if isinstance(value, (list, tuple, set, frozenset)):
        return next(filter(None, map(_no_text_form, value)), None)
    if isinstance(value, Mapping):
        return next(filter(None, map(_no_text_form, [*value.keys(), *value.values()])), None)
    kinds = (
        (type, "a class"), (types.ModuleType, "a module"),
        ((types.FunctionType, types.BuiltinFunctionType, types.MethodType), "a function or method"),
        ((types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType), "a generator"),
    )
    for types_of_kind, kind in kinds:
        if isinstance(value, types_of_kind):
            return kind
    cls = type(value)
    if cls.__str__ is object.__str__ and cls.__repr__ is object.__repr__:
        return f"an instance of {cls.__qualname__}, which defines neither __str__ nor __repr__"
    return None


def render_args(args: xm.SequentialArgs, where: str = "an argument") -> List[str]:
    """Arguments as the program receives them: ``--key=value``, unquoted.

    Values are str, numbers, bools, enums (their name), paths, or objects with
    their own ``__str__``/``__repr__``; anything else is refused, naming its flag.
    """
    try:
        return args.to_list(escaper=_arg_value, kwargs_joiner=_join_flag)
    except _NoTextForm as e:
        field, verb = "a positional argument", "is"
        for name, value in args.to_dict(kwargs_only=True).items():
            if _holds(value, e.value):
                field, verb = f"argument --{name}", "is" if value is e.value else "holds"
                break
        if isinstance(e.value, (list, tuple, set, frozenset, Mapping)):
            verb = "holds"
        raise TypeError(
            f"{where}: {field} {verb} {e.kind}: it has no text form to pass on the command line "
            f"(it would arrive as {_short_repr(e.value)}); pass a str, number, bool, enum or "
            "path, or an object whose class defines __str__") from None


def _join_flag(flag: str, value: str) -> str:
    """``--flag=value``; with a ShellSafeArg value, shell text whose flag part is quoted."""
    if isinstance(value, ShellWords):
        return ShellWords(f"{shell_quote(flag)}={value}")
    return f"{flag}={value}"


def _holds(container: Any, item: Any) -> bool:
    """Whether ``item`` is ``container`` or inside it (lists, tuples, sets, dicts)."""
    if container is item:
        return True
    if isinstance(container, (list, tuple, set, frozenset)):
        return any(_holds(c, item) for c in container)
    if isinstance(container, Mapping):
        return any(_holds(c, item) for c in [*container.keys(), *container.values()])
    return False


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _ScriptTemplate(string.Template):
    delimiter = "@@"  # bash uses $ everywhere; @@ never occurs in the script


JOB_SCRIPT = _ScriptTemplate("""\
#!/usr/bin/env bash
@@{header}
# Written by lxm3 @@{version}: experiment @@{experiment_id}, work unit @@{work_unit_id}.
# The arguments and environment of task i are line i + 2 of the tasks file,
# decoded below without the shell evaluating any of them.
LXM_EXPERIMENT_ID=@@{experiment_id}
LXM_WORK_UNIT_ID=@@{work_unit_id}
LXM_NUM_TASKS=@@{num_tasks}
@@{task_id}
lxm_archive=@@{archive}
lxm_tasks=@@{tasks_file}

lxm_fail() { printf 'lxm3: %s\\n' "$*" >&2; exit 125; }

# xm.ShellSafeArg arguments are shell text: expand each as the shell expands an
# unquoted word of a command line (variables, $(...), globs, word splitting:
# it may become several arguments, or none). Run after the task's environment,
# modules and directory are in place, so $SLURM_JOB_ID, the task's own
# variables and globs of the archive's files all work.
lxm_expand_shell_words() {
  local -a lxm_expanded=() lxm_words
  local lxm_i
  for lxm_i in "${!lxm_args[@]}"; do
    if [[ -z ${lxm_shell_words[lxm_i]:-} ]]; then
      lxm_expanded+=("${lxm_args[lxm_i]}")
      continue
    fi
    lxm_words=()  # a newline before ")": a "#" in the text starts a comment, as on a command line
    eval "lxm_words=(${lxm_args[lxm_i]}"$'\\n'")" ||
      lxm_fail "cannot expand the ShellSafeArg ${lxm_args[lxm_i]} (argument $((lxm_i + 1))) with bash"
    lxm_expanded+=(${lxm_words[@]+"${lxm_words[@]}"})
  done
  lxm_args=(${lxm_expanded[@]+"${lxm_expanded[@]}"})
}

# Apply line $1 of the tasks file: export its variables, collect its arguments.
# (Its locals are lxm_* too: exporting a task's "value=..." would set a local.)
lxm_load() {
  local lxm_line lxm_value lxm_token
  local -a lxm_tokens
  lxm_line=$(sed -n "$1{p;q;}" "$lxm_tasks") || lxm_fail "cannot read $lxm_tasks"
  read -r -a lxm_tokens <<<"$lxm_line"
  [[ ${lxm_tokens[0]:-} == "$2" ]] || lxm_fail "line $1 of $lxm_tasks is not for task $2"
  for lxm_token in "${lxm_tokens[@]:1}"; do
    printf -v lxm_value '%b' "${lxm_token:1}"
    case $lxm_token in
      a*) lxm_args+=("$lxm_value") ;;
      s*) lxm_shell_words[${#lxm_args[@]}]=1; lxm_args+=("$lxm_value") ;;
      e*) export "$lxm_value"; lxm_env_names+=("${lxm_value%%=*}") ;;
    esac
  done
}

[[ $LXM_TASK_ID =~ ^[0-9]+$ && $LXM_TASK_ID -lt $LXM_NUM_TASKS ]] ||
  lxm_fail "task index '$LXM_TASK_ID' is not in 0..$((LXM_NUM_TASKS - 1))"
lxm_workdir=
lxm_exit() {  # on every exit: remove the unpacked archive@@{exit_record_comment}
  local status=$?
  [[ -z $lxm_workdir ]] || rm -rf -- "$lxm_workdir"
  @@{exit_record}
}
trap lxm_exit EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
lxm_args=()
lxm_shell_words=()  # indices of lxm_args that are shell text (xm.ShellSafeArg)
lxm_env_names=(LXM_EXPERIMENT_ID LXM_WORK_UNIT_ID LXM_NUM_TASKS LXM_TASK_ID PYTHONPATH)
lxm_load 1 '#common'
lxm_load $((LXM_TASK_ID + 2)) "#$LXM_TASK_ID"
# Which run of the task this is: 1, plus its earlier submissions (LXM_RERUN,
# from lxm3 rerun), plus the scheduler's restarts of this one (requeue).
lxm_reruns=${LXM_RERUN:-0} lxm_restarts=@@{restart_count}
[[ $lxm_reruns =~ ^[0-9]{1,9}$ ]] || lxm_reruns=0
[[ $lxm_restarts =~ ^[0-9]{1,9}$ ]] || lxm_restarts=0
LXM_ATTEMPT=$((1 + 10#$lxm_reruns + 10#$lxm_restarts))
lxm_env_names+=(LXM_ATTEMPT)
export LXM_EXPERIMENT_ID LXM_WORK_UNIT_ID LXM_NUM_TASKS LXM_TASK_ID LXM_ATTEMPT

# Named before it is made, so that the EXIT trap knows it whenever a signal lands.
lxm_workdir=${TMPDIR:-/tmp}/lxm3-$LXM_EXPERIMENT_ID-$LXM_WORK_UNIT_ID-$LXM_TASK_ID-$$-$RANDOM$RANDOM
mkdir -m 700 -- "$lxm_workdir" || {
  lxm_workdir=  # not ours to remove
  lxm_fail "cannot create a temporary directory in ${TMPDIR:-/tmp}"
}
if command -v unzip >/dev/null 2>&1; then
  unzip -q "$lxm_archive" -d "$lxm_workdir"
else  # Python's zipfile drops file modes: restore them
  python3 - "$lxm_archive" "$lxm_workdir" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive:
    for info in archive.infolist():
        mode = info.external_attr >> 16 & 0o777
        path = archive.extract(info, sys.argv[2])
        if mode:
            os.chmod(path, mode)
PY
fi || lxm_fail "cannot unpack $lxm_archive"
cd "$lxm_workdir" || lxm_fail "cannot enter $lxm_workdir"
export PYTHONPATH="$lxm_workdir${PYTHONPATH:+:$PYTHONPATH}"
umask @@{umask}  # @@{umask_note}
@@{setup}
[[ ${#lxm_shell_words[@]} -eq 0 ]] || lxm_expand_shell_words
@@{run_setup}
# The program runs in the background and the script waits for it: bash runs a
# trap only once the foreground command has ended, and a signal must be passed
# on while the program runs. The signals that end a task (TERM on cancel,
# preemption or time limit) reach every process of the job, the program
# included: the script ignores them meanwhile, waits for the program and ends
# with its exit status.@@{forward_comment}
lxm_program= lxm_interrupted= lxm_pending=
lxm_on_signal() {  # pass signal $1 on to the program
  lxm_interrupted=1
  if [[ -n $lxm_program ]]; then kill -s "$1" "$lxm_program" 2>/dev/null; else lxm_pending+=" $1"; fi
}
@@{traps}
# The program gets the signal dispositions the script had (bash ignores INT and
# QUIT in background commands) and its stdin (bash would give it /dev/null).
( trap - INT QUIT @@{trapped}; exec @@{run} ${lxm_args[@]+"${lxm_args[@]}"} ) <&0 &
lxm_program=$!
for lxm_signal in $lxm_pending; do kill -s "$lxm_signal" "$lxm_program" 2>/dev/null; done
while :; do
  lxm_interrupted=
  wait "$lxm_program"
  lxm_status=$?
  # A trapped signal ends `wait` early with a status above 128: wait on while
  # the program runs. If it ended meanwhile, its own status is the one bash
  # kept, unless bash lost it (-1 or 127): then it most likely died of that signal.
  [[ -n $lxm_interrupted && $lxm_status -gt 128 ]] || break
  kill -0 "$lxm_program" 2>/dev/null && continue
  wait "$lxm_program"
  lxm_signal=$?
  [[ $lxm_signal -eq 127 || $lxm_signal -eq 255 ]] || lxm_status=$lxm_signal
  break
done
exit "$lxm_status"
""")

# While the program runs, the job script ignores these (so that it can wait for
# the program and write the exit record; a trap would end `wait` early, and
# bash may then lose the program's status): the ones that end a task, and the
# Grid Engine -notify warnings, which would otherwise end the script first.
PROGRAM_IGNORED_SIGNALS = ("TERM", "INT", "HUP", "USR1", "USR2")


EXIT_RECORD = "printf '\\nlxm3-exit: task %s status %s\\n' \"$LXM_TASK_ID\" \"$status\""
EXIT_RECORD_PATTERN = re.compile(r"lxm3-exit: task (\d+) status (\d+)\s*$")


def render_job_script(
    *,
    header: str,
    task_id: str,
    experiment_id: int,
    work_unit_id: int,
    num_tasks: int,
    archive: str,
    tasks_file: str,
    setup: str = "",
    run: str = "bash ./entrypoint.sh",
    exit_record: bool = False,
    umask: Optional[str] = None,
    umask_note: str = "the umask lxm3 was launched with",
    on_exit: str = "",
    restart_count: str = "0",
    forwarded_signals: Sequence[str] = (),
) -> str:
    """The job script of one work unit; executors supply ``header`` and ``task_id``.

    ``task_id`` is bash that sets LXM_TASK_ID (0-based) from the scheduler's
    own task variable; ``setup`` runs before the program (``module load``);
    ``run`` is the command line that runs the entrypoint. With ``exit_record``
    the task's last log line is ``lxm3-exit: task I status S``: the truth of
    last resort for ``lxm3 status`` and ``lxm3 logs -f``.

    The program runs with ``umask`` (the user's own commands' umask on the
    cluster; None: this process's), whatever the scheduler would give it
    (sbatch passes on the submitting shell's, Grid Engine its daemon's), so
    a task makes files as the user would by running it there themselves.
    ``umask_note`` says where the value came from, in a comment. ``on_exit``:
    a last line for the exit trap (``$status`` is the task's exit status).

    The program runs as the script's child, which waits for it and exits
    with its status. ``forwarded_signals`` (names from WARNING_SIGNALS) are
    passed on to it: those the scheduler sends to the script alone.
    ``restart_count`` is bash giving how many times the scheduler restarted
    the task, for ``LXM_ATTEMPT``.
    """
    umask = umask or process_umask()
    if not UMASK_PATTERN.match(umask):
        raise ValueError(f"umask {umask!r} is not an octal mask such as 0022")
    for name in forwarded_signals:
        _warning_signal_name(name, "a signal to pass on")
    run_setup, _, run = run.rpartition("\n")  # the last line runs the program
    ignored = [name for name in PROGRAM_IGNORED_SIGNALS if name not in forwarded_signals]
    traps = [f"trap '' {' '.join(ignored)}"] if ignored else []
    traps += [f"trap 'lxm_on_signal {name}' {name}" for name in forwarded_signals]
    return JOB_SCRIPT.substitute(
        header=header,
        version=__version__,
        experiment_id=int(experiment_id),
        work_unit_id=int(work_unit_id),
        num_tasks=int(num_tasks),
        task_id=task_id,
        archive=shell_quote(archive),
        tasks_file=shell_quote(tasks_file),
        setup=setup,
        run_setup=run_setup,
        run=run,
        restart_count=restart_count,
        traps="\n".join(traps),
        trapped=" ".join(name for name in [*ignored, *forwarded_signals] if name not in ("INT", "QUIT")),
        forward_comment=(f" {' and '.join(forwarded_signals)} come to the script alone: "
                         "it passes them on." if forwarded_signals else ""),
        exit_record=(EXIT_RECORD if exit_record else ":") + (f"\n  {on_exit}" if on_exit else ""),
        exit_record_comment=", and say how the task ended" if exit_record else "",
        umask=umask,
        umask_note=umask_note,
    )


def write_job_files(directory: str, script: str, tasks: Sequence[Task],
                    common_env: Mapping[str, str]) -> Tuple[str, str]:
    """Write ``job.sh`` (0700) and ``tasks`` (0600: task environments may hold
    secrets) into ``directory`` (made private), atomically."""
    make_private_dirs(directory)
    script_path = os.path.join(directory, "job.sh")
    tasks_path = os.path.join(directory, "tasks")
    for path, lines in ((tasks_path, tasks_file_lines(tasks, common_env)), (script_path, [script])):
        tmp = path + ".tmp"
        fd = create_private(tmp, 0o700 if path == script_path else 0o600)
        with open(fd, "w", encoding="ascii" if path == tasks_path else "utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    return script_path, tasks_path


# -- Scheduler directives ---------------------------------------------------
#
# Directives are derived from the executor's options and ``requirements``;
# the user's ``resources`` and ``extra_directives`` replace derived ones that
# set the same option, and ``skip_directives`` drops lines containing a text.


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _directive_value(value: Any, what: str) -> str:
    """``value`` as text for a directive: one line, no control characters."""
    text = str(value)
    match = _CONTROL_CHARACTER.search(text)
    if match:
        char = {"\n": "a newline", "\r": "a carriage return"}.get(
            match.group(), f"the control character {match.group()!r}")
        raise ValueError(f"{what}: {text!r} contains {char}; scheduler directives and "
                         "arguments are single lines of printable text")
    return text


def _strip_prefix(directive: str, prefix: str) -> str:
    directive = directive.strip()
    return directive[len(prefix):].strip() if directive.startswith(prefix) else directive


def _merge_directives(derived: List[str], explicit: List[str], key: Callable[[str], str]) -> List[str]:
    """The user's directives win over derived ones that set the same option."""
    overridden = {key(d) for d in explicit}
    return [d for d in derived if key(d) not in overridden] + explicit


def _whole(amount: float) -> int:
    return int(-(-amount // 1))


def _mebibytes(amount: float) -> int:
    return int(-(-amount // (1 << 20)))


def _gpu_type_name(accelerator: xm.ResourceType, site_names: Mapping[str, str]) -> Optional[str]:
    """The site's name for a GPU model (config), else its lower-case name; None for any GPU."""
    if accelerator in (xm.ResourceType.GPU, xm.ResourceType.LOCAL_GPU):
        return None
    name = str(accelerator)
    return str(site_names.get(name, site_names.get(name.lower(), name.lower())))


def _scheduler_settings(cluster: ClusterConfig, scheduler: str) -> Mapping[str, Any]:
    """``[clusters.slurm]`` / ``[clusters.sge]``: site-specific names."""
    settings = cluster.raw.get(scheduler, {})
    if not isinstance(settings, Mapping):
        raise ConfigError(f"clusters.{scheduler} of cluster {cluster.name!r} must be a table")
    return settings


def _unsupported(scheduler: str, what: str, hint: str = "") -> ValueError:
    return ValueError(f"{scheduler} cannot express the requirement {what}{'; ' + hint if hint else ''}")


def _requirements_gpus(requirements: xm.JobRequirements) -> int:
    """How many GPUs ``requirements`` asks for per task (0: none)."""
    accelerator = requirements.accelerator
    if accelerator is None or not (accelerator in xm.GpuType or accelerator == xm.ResourceType.LOCAL_GPU):
        return 0
    return _whole(requirements.task_requirements.get(accelerator, 1) or 1)


def _no_amount(value: str) -> bool:
    """``0``, ``gpu:0``, ``a100:0``, ``false``, ``no``: a request for nothing."""
    last = value.strip().rsplit(":", 1)[-1].lower()
    return last in ("0", "false", "no", "n", "f", "none") or (last.isdigit() and int(last) == 0)


def _named_for_gpus(name: str) -> bool:
    return "gpu" in name.lower()


def _wants_gpu(executor: xm.Executor) -> bool:
    """Whether the job asks for GPUs, so that its container gets them (``--nv``,
    ``--gpus``): in ``requirements``, or in what lxm3 0.4.2 read for it on
    clusters (``resources``, ``extra_directives``, a parallel environment; also
    a partition or queue named for GPUs). ``skip_directives`` does not change
    the answer: a skipped line is often one the site grants otherwise."""
    if _requirements_gpus(executor.requirements):
        return True
    return isinstance(executor, ClusterExecutor) and scheduler_of(executor).asks_for_gpus(executor)


def singularity_run(image: str, options: Optional[SingularityOptions],
                    binds: Sequence[Tuple[str, str]], gpu: bool) -> str:
    """Bash that runs the entrypoint inside ``image`` with apptainer or singularity.

    The unpacked archive is bound at its own path, so PYTHONPATH holds. The
    task's variables are also exported as APPTAINERENV_/SINGULARITYENV_ ones
    (by indirect expansion, nothing evaluated), so ``--cleanenv`` keeps them;
    so is CUDA_VISIBLE_DEVICES, the GPUs the scheduler (or lxm3's local
    runner) gave the task.
    """
    options = options or SingularityOptions()
    if options.runtime:
        find = f"lxm_runtime={shell_quote(options.runtime)}"
    else:
        find = ('lxm_runtime=$(command -v apptainer || command -v singularity) ||\n'
                '  lxm_fail "neither apptainer nor singularity is on the PATH of $(hostname)"')
    argv = ['"$lxm_runtime"', "exec", "--bind", '"$lxm_workdir"', "--pwd", '"$lxm_workdir"']
    if options.nv if options.nv is not None else gpu:
        argv.append("--nv")
    for src, dst in binds:
        argv += ["--bind", shell_quote(f"{src}:{dst}")]
    argv += [shell_quote(o) for o in options.extra_options]
    argv += [shell_quote(image), "bash", "./entrypoint.sh"]
    return "\n".join([
        find,
        'case ${lxm_runtime##*/} in apptainer*) lxm_prefix=APPTAINERENV_ ;; *) lxm_prefix=SINGULARITYENV_ ;; esac',
        'for lxm_name in "${lxm_env_names[@]}"; do export "$lxm_prefix$lxm_name=${!lxm_name}"; done',
        '[[ -z ${CUDA_VISIBLE_DEVICES+set} ]] || export "${lxm_prefix}CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"',
        " ".join(argv),
    ])


def docker_run(image: str, options: Optional[DockerOptions], gpu: bool) -> str:
    """Bash that runs the entrypoint in a Docker container as the calling user.

    ``-e NAME`` without a value passes each task variable from the environment.
    GPU tasks get the devices in CUDA_VISIBLE_DEVICES (set by lxm3's local
    runner), else all; inside, they are numbered from 0.
    """
    options = options or DockerOptions()
    argv = ["docker", "run", "--rm", "--init", "--user", '"$(id -u):$(id -g)"',
            "-v", '"$lxm_workdir:$lxm_workdir"', "-w", '"$lxm_workdir"', '"${lxm_docker_env[@]}"']
    gpus = options.gpus if options.gpus is not None else gpu
    if gpus:
        argv += ["--gpus", '"$lxm_gpus"']
    for src, dst in options.volumes.items():
        argv += ["-v", shell_quote(f"{src}:{dst}")]
    argv += [shell_quote(o) for o in options.extra_options]
    argv += [shell_quote(image), "bash", "./entrypoint.sh"]
    return "\n".join([
        "lxm_docker_env=()",
        'for lxm_name in "${lxm_env_names[@]}"; do lxm_docker_env+=(-e "$lxm_name"); done',
        *(['lxm_gpus=all',  # docker reads a list of devices as CSV: hence the inner quotes
           '[[ -z ${CUDA_VISIBLE_DEVICES:-} ]] || lxm_gpus="\\"device=$CUDA_VISIBLE_DEVICES\\""']
          if gpus else []),
        " ".join(argv),
    ])


def run_line(executable: ClusterExecutable, executor: xm.Executor, image: Optional[str],
             config_binds: Sequence[Tuple[str, str]] = ()) -> str:
    """The job script's command for the entrypoint: directly, or in a container."""
    if executable.container is None:
        return "bash ./entrypoint.sh"
    gpu = _wants_gpu(executor)
    if executable.container == "docker":
        return docker_run(image, executor.docker_options, gpu)
    options = executor.singularity_options
    binds = [*config_binds, *(options.bind.items() if options else [])]
    return singularity_run(image, options, binds, gpu)


# ``module`` is a shell function that Lmod and Environment Modules define in the
# login profile (/etc/profile.d/*.sh). A batch job's shell is not a login shell
# (lxm3 0.4.2 ran its Slurm scripts with ``bash -l``), so when ``module`` is
# missing the profile is read as a login shell reads it, in a child bash whose
# output, ``exit`` or ``exec`` cannot touch the job. The job takes what the
# profile left: its exported variables and new functions, as ``bash -l`` would
# have them, except the task's own variables (env_vars, the config's env,
# LXM_*, PYTHONPATH), which keep their values.
LOGIN_PROFILE = r"""# `module` comes from the login profile: read it as a login shell would.
lxm_login_profile() {
  local lxm_code
  lxm_code=$(lxm_keep=" ${lxm_env_names[*]} $(compgen -A function | tr '\n' ' ') " bash -l -c '
    for lxm_name in $(compgen -e); do
      case $lxm_keep in *" $lxm_name "*) continue ;; esac
      case $lxm_name in BASH*|SHLVL|PWD|OLDPWD|_|lxm_*) continue ;; esac
      printf "export %s=%q\n" "$lxm_name" "${!lxm_name}"
    done >&3
    for lxm_name in $(compgen -A function); do
      case $lxm_keep in *" $lxm_name "*) ;; *) declare -f "$lxm_name" ;; esac
    done >&3' 3>&1 >/dev/null 2>&1 </dev/null)
  eval "$lxm_code" 2>/dev/null
}
type module >/dev/null 2>&1 || lxm_login_profile
type module >/dev/null 2>&1 ||
  lxm_fail "module: command not found: is Lmod/Environment Modules installed on $(hostname)? \
Neither the job's environment nor the login profile (bash -l) defines it"
"""


def module_lines(modules: Sequence[str]) -> str:
    """``module load`` commands run before the task; a failure stops it."""
    if not modules:
        return ""
    return LOGIN_PROFILE + "\n".join(
        f"module load {shell_quote(m)} || lxm_fail {shell_quote('module load ' + m + ' failed')}"
        for m in modules
    )


# ---------------------------------------------------------------------------
# Schedulers: everything Slurm- or Grid-Engine-specific, one block each
# ---------------------------------------------------------------------------
#
# The rest of lxm3 asks a Scheduler, never "which scheduler is this?". Adding
# one (PBS, LSF) is one more block filling in the same names, an executor
# class naming it, and its tests; the README's development section lists them.


class Scheduler:
    """One batch scheduler as lxm3 uses it: directives, submission, status, cancel.

    Task numbers: lxm3 numbers a work unit's tasks from 0; each array's own
    indices start at ``index_base`` (Grid Engine's are 1-based), and the job
    script adds the array's first task (its ``$1``) to get the task number.
    """

    name = ""  # in records and config tables: [clusters.<name>]
    title = ""  # for people
    submit_command = ""
    cancel_command = ""
    directive_prefix = ""  # "#SBATCH": the job script's header lines
    output_option = ""  # the directive that sets where output goes
    index_base = 0  # the first index of an array
    job_id_end = ""  # characters that end the job id in the submit command's output
    task_id_line = ""  # bash setting LXM_TASK_ID from the array index and $1
    benign_cancel = re.compile(r"$^")  # cancel messages for jobs that had just ended
    restart_count = "0"  # bash: how many times the scheduler restarted this task (LXM_ATTEMPT)
    max_warning_seconds = 0  # the longest time-limit warning it can give
    # Bash printing what the submit command says of itself, and the pattern
    # whose group 1 is its version: tells which scheduler's command answered.
    # It runs whichever scheduler's command of that name comes first, so it
    # must submit nothing, whoever answers.
    version_command = ""
    version_pattern = r"$^"

    def forwarded_signals(self, executor: ClusterExecutor) -> List[str]:
        """Signals the scheduler sends to the job script alone, which the script
        passes on to the program (those it sends to every process of the job,
        the program gets itself)."""
        return []

    # -- directives ------------------------------------------------------

    def directives(self, executor: ClusterExecutor, cluster: ClusterConfig, job_name: str) -> List[str]:
        """A work unit's header options, without the prefix; the user's win."""
        raise NotImplementedError

    def explicit_directives(self, executor: ClusterExecutor) -> List[str]:
        """The options the user wrote (resources, extra_directives), without the prefix."""
        raise NotImplementedError

    def directive_key(self, directive: str) -> str:
        """What option a directive sets: two with the same key are one request."""
        raise NotImplementedError

    def header(self, executor: ClusterExecutor, cluster: ClusterConfig, job_name: str) -> str:
        """The job script's header lines, less those the executor skips."""
        lines = [f"{self.directive_prefix} {_directive_value(d, 'directive')}"
                 for d in self.directives(executor, cluster, job_name)]
        return "\n".join(line for line in lines if not any(text in line for text in executor.skip_directives))

    def user_sets(self, executor: ClusterExecutor, option: str) -> bool:
        """Whether the user's own directives set ``option`` (e.g. the output path)."""
        return any(self.directive_key(d) == option for d in self.explicit_directives(executor))

    def asks_for_gpus(self, executor: ClusterExecutor) -> bool:
        """Whether the user's directives, partition or queue give the job GPUs."""
        raise NotImplementedError

    # -- the cluster -----------------------------------------------------

    def probe_lines(self) -> str:
        """Bash printing ``max_array_size N`` / ``max_array_tasks N`` for ClusterInfo."""
        raise NotImplementedError

    def array_limit(self, info: ClusterInfo) -> Optional[int]:
        """The most tasks one array may hold (None: no limit known)."""
        raise NotImplementedError

    # -- submission ------------------------------------------------------

    def submit_argv(self, executor: ClusterExecutor, script: str, count: int, log_dir: str,
                    chained: bool, after: Sequence[Tuple[str, Sequence[str]]] = ()) -> List[str]:
        """The submit command of one array of ``count`` tasks, without the script.
        ``chained``: wait for the job whose id replaces ``{previous}``.
        ``after``: (kind, job ids) of other work units' arrays to wait for, all
        of them: kind ``ok`` (every task succeeded), ``any`` (ended) or ``each``
        (task by task, same indices; exactly one job id)."""
        raise NotImplementedError

    def command_line(self, options: Sequence[str], script: str, first_task: int) -> List[str]:
        """The whole submit command of one array: ``options`` (``submit_argv``,
        ``rerun_argv``), the job script, and the array's first task, which the
        script adds to each index (``task_id_line``): here its ``$1``."""
        return [*options, script, str(int(first_task))]

    def options_of(self, command: Sequence[str]) -> List[str]:
        """``command_line``'s ``options`` again, for the record (``lxm3 rerun``)."""
        return list(command[:-2])

    index_lists = False  # one array may hold any indices (else one contiguous run: rerun_argv)

    def rerun_limits(self, info: ClusterInfo) -> Tuple[Optional[int], Optional[int]]:
        """For ``lxm3 rerun``: (every index of an array is below this, an array holds
        at most this many tasks); None: no limit known."""
        raise NotImplementedError

    def rerun_argv(self, argv: Sequence[str], indices: Sequence[int], rerun: int,
                   after_previous: bool) -> List[str]:
        """``argv``, the submit command a launch used (``submit_argv``), changed to submit
        the array indices ``indices`` (0-based, sorted) with ``LXM_RERUN=rerun`` in the
        tasks' environment, and without the launch's dependencies. ``after_previous``:
        a later array of the rerun, which waits for ``{previous}`` if tasks are throttled."""
        raise NotImplementedError

    # A line for the job script's exit trap (``$status``: the task's exit
    # status) that makes a failed task hold back the work units that wait for
    # its success, where the scheduler needs the job's help for that.
    holds_dependents_line = ""

    def log_path_pattern(self, log_dir: str) -> str:
        """The output option's value: one file per task, named by job id and index."""
        raise NotImplementedError

    def task_log_name(self, job_name: str, job_id: str, index: int) -> str:
        """The file ``log_path_pattern`` names for array index ``index`` (0-based)."""
        raise NotImplementedError

    def log_name_patterns(self, job_name: str, job_ids: Sequence[str]) -> List[str]:
        """``find -name`` patterns that match the logs of these jobs in a log directory
        (which other work units may share)."""
        return [f"{job_name}-*"]

    def task_job(self, job_id: str, index: int) -> str:
        """The scheduler's own name for a task, e.g. ``16_3``, for people to use."""
        raise NotImplementedError

    # -- status and cancel -----------------------------------------------

    def status_lines(self, job_ids: Sequence[str]) -> List[str]:
        """Bash printing the queue after ``== queue`` and finished jobs after ``== accounting``."""
        raise NotImplementedError

    def read_status(self, queue: Sequence[str], accounting: Sequence[str], job_ids: Set[str]
                    ) -> Tuple[Dict[Tuple[str, int], str], Dict[Tuple[str, int], Tuple[str, str]]]:
        """From the two sections: {(job, index): state} queued, and
        {(job, index): (state, exit code)} finished (indices 0-based)."""
        raise NotImplementedError

    def active_jobs_command(self) -> str:
        """Bash printing the ids of the user's jobs still queued or running, one a line."""
        raise NotImplementedError


# -- Slurm -------------------------------------------------------------------

_SLURM_SHORT_OPTIONS = {
    "-A": "--account", "-a": "--array", "-c": "--cpus-per-task", "-e": "--error",
    "-G": "--gpus", "-J": "--job-name", "-N": "--nodes", "-n": "--ntasks", "-o": "--output",
    "-p": "--partition", "-q": "--qos", "-t": "--time", "-w": "--nodelist",
}

# Options Slurm treats as one request: giving one replaces the others
# (sbatch rejects --mem with --mem-per-cpu, --cpus-per-task with --cpus-per-gpu).
_SLURM_FAMILIES = {
    "--mem": "memory", "--mem-per-cpu": "memory", "--mem-per-gpu": "memory",
    "--cpus-per-task": "cpus", "--cpus-per-gpu": "cpus",
    "--gpus": "gpus", "--gpus-per-node": "gpus", "--gpus-per-task": "gpus",
    "--gpus-per-socket": "gpus",
}

_SLURM_STATES = {
    **dict.fromkeys(("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"), TaskState.PENDING),
    **dict.fromkeys(("CONFIGURING", "RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING",
                     "SUSPENDED", "STOPPED"), TaskState.RUNNING),
    "COMPLETED": TaskState.COMPLETED, "CANCELLED": TaskState.CANCELLED, "REVOKED": TaskState.CANCELLED,
}


def slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


class SlurmScheduler(Scheduler):
    """Slurm: ``sbatch --array``, ``squeue``/``sacct``, ``scancel``."""

    name, title = "slurm", "Slurm"
    submit_command, cancel_command = "sbatch", "scancel"
    directive_prefix, output_option = "#SBATCH", "--output"
    index_base = 0
    job_id_end = ";"  # sbatch --parsable: ID[;CLUSTER]
    task_id_line = "LXM_TASK_ID=$(( ${SLURM_ARRAY_TASK_ID:-0} + ${1:-0} ))  # $1: the array's first task"
    benign_cancel = re.compile(r"Invalid job id", re.I)
    restart_count = "${SLURM_RESTART_COUNT:-0}"  # set from the first requeue on
    version_command, version_pattern = "sbatch --version", r"^slurm(?:-wlm)?\s+(\S+)"
    max_warning_seconds = 65535  # --signal=...@<0..65535>

    def forwarded_signals(self, executor: ClusterExecutor) -> List[str]:
        # --signal=B:... signals the batch shell only; TERM (cancel, time limit,
        # preemption) goes to every process of the job.
        return [executor.timeout_signal] if executor.timeout_signal_seconds else []

    def directive_key(self, directive: str) -> str:
        option, _, value = _strip_prefix(directive, "#SBATCH").replace(" ", "=", 1).partition("=")
        option = _SLURM_SHORT_OPTIONS.get(option, option)
        if option == "--gres" and value.startswith("gpu"):
            return "gpus"
        return _SLURM_FAMILIES.get(option, option)

    def requirement_directives(self, requirements: xm.JobRequirements, cluster: ClusterConfig) -> List[str]:
        directives = []
        gpu_names = _scheduler_settings(cluster, self.name).get("gpu_types", {})
        for resource, amount in requirements.task_requirements.items():
            if resource == xm.ResourceType.CPU:
                directives.append(f"--cpus-per-task={_whole(amount)}")
            elif resource == xm.ResourceType.MEMORY:
                directives.append(f"--mem={_mebibytes(amount)}M")
            elif resource == xm.ResourceType.EPHEMERAL_STORAGE:
                directives.append(f"--tmp={_mebibytes(amount)}M")
            elif resource in xm.GpuType or resource == xm.ResourceType.LOCAL_GPU:
                gpu_type = _gpu_type_name(resource, gpu_names)
                if gpu_type:
                    _directive_value(gpu_type, "[clusters.slurm] gpu_types")
                directives.append(f"--gres=gpu:{gpu_type + ':' if gpu_type else ''}{_whole(amount)}")
            else:
                raise _unsupported(self.title, f"{resource}={amount:g}")
        if requirements.replicas > 1:
            directives.append(f"--ntasks={requirements.replicas}")
        if requirements.location:
            directives.append(f"--nodelist={_directive_value(requirements.location, 'location')}")
        if requirements.service_tier != xm.ServiceTier.PROD:
            raise _unsupported(self.title, f"service_tier={requirements.service_tier}", "use qos=... instead")
        return directives

    def explicit_directives(self, executor: ClusterExecutor) -> List[str]:
        explicit = [f"--{key}" if value is True else f"--{key}={_directive_value(value, key)}"
                    for key, value in executor.resources.items() if value]
        return explicit + [_strip_prefix(d, "#SBATCH") for d in executor.extra_directives]

    def directives(self, executor: ClusterExecutor, cluster: ClusterConfig, job_name: str) -> List[str]:
        derived = [f"--job-name={job_name}", *self.requirement_directives(executor.requirements, cluster)]
        seconds = parse_walltime(executor.walltime)
        if seconds:
            derived.append(f"--time={slurm_time(seconds)}")
        for option, value in (("partition", executor.partition), ("account", executor.account),
                              ("qos", executor.qos)):
            if value:
                derived.append(f"--{option}={_directive_value(value, option)}")
        if executor.exclusive:
            derived.append("--exclusive")
        if executor.requeue:
            derived.append("--requeue")
        if executor.timeout_signal_seconds:  # B: the job script, which passes it on
            derived.append(f"--signal=B:{executor.timeout_signal}@{executor.timeout_signal_seconds}")
        return _merge_directives(derived, self.explicit_directives(executor), self.directive_key)

    @staticmethod
    def _gives_gpus(directive: str) -> bool:
        """``--gres=gpu:1``, ``-G 2``, ``--gpus-per-task=1``, ``--partition=gpu``, ..."""
        option, _, value = _strip_prefix(directive, "#SBATCH").replace(" ", "=", 1).partition("=")
        option = _SLURM_SHORT_OPTIONS.get(option, option)
        if option in ("--gpus", "--gpus-per-node", "--gpus-per-task", "--gpus-per-socket"):
            return not _no_amount(value)
        if option in ("--gres", "--tres-per-task", "--tres-per-job", "--tres-per-node"):
            items = [item.strip() for item in value.split(",")]
            return any(re.sub(r"^gres/", "", item).split(":")[0] == "gpu" and not _no_amount(item)
                       for item in items)
        if option == "--partition":
            return any(_named_for_gpus(p) for p in value.split(","))
        return False

    def asks_for_gpus(self, executor: ClusterExecutor) -> bool:
        directives = [f"--{key}" if value is True else f"--{key}={value}"
                      for key, value in executor.resources.items() if value]
        directives += list(executor.extra_directives)
        if executor.partition:
            directives.append(f"--partition={executor.partition}")
        return any(self._gives_gpus(d) for d in directives)

    def probe_lines(self) -> str:
        return """config=$(scontrol show config 2>/dev/null || true)
echo "max_array_size $(awk -F' = ' '$1 ~ /^MaxArraySize/ {print $2}' <<<"$config")"
echo "max_array_tasks $(grep -o 'max_array_tasks=[0-9]*' <<<"$config" | cut -d= -f2)"
"""

    def array_limit(self, info: ClusterInfo) -> Optional[int]:
        """MaxArraySize caps the largest index (so the count, from 0); max_array_tasks the count."""
        limits = [n for n in (info.max_array_size, info.max_array_tasks) if n]
        return min(limits) if limits else None

    def submit_argv(self, executor: ClusterExecutor, script: str, count: int, log_dir: str,
                    chained: bool, after: Sequence[Tuple[str, Sequence[str]]] = ()) -> List[str]:
        throttle = executor.max_parallel_tasks
        argv = ["sbatch", "--parsable", f"--array=0-{count - 1}{f'%{throttle}' if throttle else ''}"]
        if not self.user_sets(executor, self.output_option):
            argv.append(f"--output={self.log_path_pattern(log_dir)}")
        # One --dependency (a second replaces the first): its parts, joined by
        # ",", must all hold. aftercorr: task i after task i succeeded.
        parts = [f"{self._dependency_kinds[kind]}:{':'.join(job_ids)}" for kind, job_ids in after]
        if chained:
            parts.append("afterany:{previous}")
        if parts:
            argv.append(f"--dependency={','.join(parts)}")
        return argv

    _dependency_kinds = {"ok": "afterok", "any": "afterany", "each": "aftercorr"}

    index_lists = True  # --array=3,7,12-20

    def rerun_limits(self, info: ClusterInfo) -> Tuple[Optional[int], Optional[int]]:
        """MaxArraySize bounds the largest index; max_array_tasks the count."""
        return info.max_array_size or None, info.max_array_tasks or None

    def rerun_argv(self, argv: Sequence[str], indices: Sequence[int], rerun: int,
                   after_previous: bool) -> List[str]:
        words, throttled = [], False
        for word in argv:
            if word.startswith("--array="):
                throttle = word.partition("%")[2]  # max_parallel_tasks
                throttled = bool(throttle)
                word = f"--array={_task_ranges(indices).replace(' ', '')}{'%' + throttle if throttle else ''}"
            elif word.startswith(("--dependency=", "--export=")):
                continue
            words.append(word)
        words.append(f"--export=ALL,LXM_RERUN={int(rerun)}")
        if after_previous and throttled:
            words.append("--dependency=afterany:{previous}")
        return words

    def log_path_pattern(self, log_dir: str) -> str:
        return os.path.join(log_dir, "%x-%A_%a.log")  # job name, array job id, index

    def task_log_name(self, job_name: str, job_id: str, index: int) -> str:
        return f"{job_name}-{job_id}_{index}.log"

    def task_job(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    @staticmethod
    def _state(name: str) -> str:
        return _SLURM_STATES.get(name.split()[0].rstrip("+"), TaskState.FAILED)  # TIMEOUT, OUT_OF_MEMORY, ...

    def status_lines(self, job_ids: Sequence[str]) -> List[str]:
        return ["echo '== queue'",
                "squeue -h -r -t all -u \"$(id -un)\" -o '%i|%T' 2>/dev/null",
                "echo '== accounting'",
                f"sacct -n -P -X -j {','.join(job_ids)} --format=JobID,State,ExitCode 2>/dev/null "
                "|| echo lxm3-no-accounting"]

    def read_status(self, queue, accounting, job_ids):
        queued, finished = {}, {}
        for line in queue:  # 16_3|RUNNING
            name, _, state = line.partition("|")
            job_id, _, index = name.partition("_")
            if state and job_id in job_ids and index.isdigit():
                queued[(job_id, int(index))] = self._state(state)
        for line in accounting:  # 16_3|COMPLETED|0:0
            name, state, code = (line.split("|") + ["", ""])[:3]
            job_id, _, index = name.partition("_")
            if state and job_id in job_ids and index.isdigit():
                finished[(job_id, int(index))] = (self._state(state), code.split(":")[0])
        return queued, finished

    def active_jobs_command(self) -> str:
        return 'squeue -h -u "$(id -un)" -o %F'


# -- Grid Engine -------------------------------------------------------------


class GridEngineScheduler(Scheduler):
    """(Son of / Sun) Grid Engine: ``qsub -t``, ``qstat``/``qacct``, ``qdel``.

    Its array indices start at 1 (``-t 1-N``, ``$SGE_TASK_ID``, ``qstat``'s
    ja-task-ID, ``qacct``'s taskid, the log file name): ``index_base``.
    """

    name, title = "sge", "Grid Engine"
    submit_command, cancel_command = "qsub", "qdel"
    directive_prefix, output_option = "#$", "-o"
    index_base = 1
    job_id_end = "."  # qsub -terse: ID[.1-N:1]
    task_id_line = "LXM_TASK_ID=$(( ${SGE_TASK_ID:-1} - 1 + ${1:-0} ))  # $1: the array's first task"
    benign_cancel = re.compile(r"does not exist|registered the job|has deleted", re.I)
    # RESTARTED is 1 on any rerun (-r y, qmod -rj), 0 on the first run: no count.
    restart_count = "${RESTARTED:-0}"
    # qsub -help's first line: "SGE 8.1.9", "OGS/GE 2011.11", "UGE 8.6.4". Only a qsub
    # that refuses --version as Grid Engine's does is asked: another scheduler's
    # may read "-help" as options and submit a job (PBS's: -h -e lp, held).
    version_command = ("case $(qsub --version 2>&1 </dev/null) in "
                       "*'invalid option argument'*) qsub -help ;; *) qsub --version ;; esac")
    version_pattern = r"^((?:SGE|GE|OGS/GE|UGE|Univa Grid Engine|Altair Grid Engine)\s*[0-9]\S*)"
    # -notify's USR2/USR1 go to every process of the job (its process group),
    # after the queue's notify time: nothing to pass on, nothing to choose.
    max_warning_seconds = 0

    def directive_key(self, directive: str) -> str:
        parts = _strip_prefix(directive, "#$").split()
        if parts and parts[0] in ("-l", "-pe") and len(parts) > 1:
            return f"{parts[0]} {parts[1].split('=')[0]}" if parts[0] == "-l" else "-pe"
        return parts[0] if parts else directive

    def requirement_directives(self, requirements: xm.JobRequirements, cluster: ClusterConfig,
                               parallel_environments: Mapping[str, int]) -> List[str]:
        settings = _scheduler_settings(cluster, self.name)
        resources = dict(requirements.task_requirements.items())
        directives = []
        slots = _whole(resources.pop(xm.ResourceType.CPU, 1))
        if parallel_environments:
            slots = max(int(n) for n in parallel_environments.values())
        elif slots > 1:
            pe = settings.get("parallel_environment", "smp")
            directives.append(f"-pe {_directive_value(pe, '[clusters.sge] parallel_environment')} {slots}")
        if xm.ResourceType.MEMORY in resources:
            memory = resources.pop(xm.ResourceType.MEMORY)
            complex_name = _directive_value(settings.get("memory_resource", "h_vmem"),
                                            "[clusters.sge] memory_resource")
            # Grid Engine counts memory complexes per slot.
            directives.append(f"-l {complex_name}={_mebibytes(memory / slots)}M")
        for resource, amount in resources.items():
            if resource in xm.GpuType or resource == xm.ResourceType.LOCAL_GPU:
                gpu_complex = _directive_value(settings.get("gpu_resource", "gpu"),
                                               "[clusters.sge] gpu_resource")
                directives.append(f"-l {gpu_complex}={_whole(amount)}")
                gpu_type = _gpu_type_name(resource, settings.get("gpu_types", {}))
                if gpu_type:
                    type_complex = settings.get("gpu_type_resource")
                    if not type_complex:
                        raise _unsupported(self.title, f"{resource}={amount:g}",
                                           "name the GPU type complex as gpu_type_resource in the "
                                           "cluster's [clusters.sge] config, or ask for gpu=N")
                    type_complex = _directive_value(type_complex, "[clusters.sge] gpu_type_resource")
                    gpu_type = _directive_value(gpu_type, "[clusters.sge] gpu_types")
                    directives.append(f"-l {type_complex}={gpu_type}")
            else:
                raise _unsupported(self.title, f"{resource}={amount:g}")
        if requirements.replicas > 1:
            raise _unsupported(self.title, f"replicas={requirements.replicas}",
                               "use a parallel environment (parallel_environments={'mpi': N})")
        if requirements.location:
            directives.append(f"-l hostname={_directive_value(requirements.location, 'location')}")
        if requirements.service_tier != xm.ServiceTier.PROD:
            raise _unsupported(self.title, f"service_tier={requirements.service_tier}")
        return directives

    def explicit_directives(self, executor: ClusterExecutor) -> List[str]:
        explicit = [f"-pe {_directive_value(name, 'parallel environment')} {int(n)}"
                    for name, n in executor.parallel_environments.items()]
        explicit += [f"-l {key}={_directive_value(value, key)}"
                     for key, value in executor.resources.items() if value]
        return explicit + [_strip_prefix(d, "#$") for d in executor.extra_directives]

    def directives(self, executor: ClusterExecutor, cluster: ClusterConfig, job_name: str) -> List[str]:
        derived = [f"-N {job_name}", f"-S {_directive_value(executor.shell, 'shell')}"]
        derived += self.requirement_directives(executor.requirements, cluster, executor.parallel_environments)
        seconds = parse_walltime(executor.walltime)
        if seconds:
            derived.append(f"-l h_rt={hms_time(seconds)}")
        for option, value in (("-q", executor.queue), ("-P", executor.project), ("-A", executor.account)):
            if value:
                derived.append(f"{option} {_directive_value(value, option)}")
        explicit = self.explicit_directives(executor)
        # Reservation keeps a job that needs several slots or a GPU from waiting
        # behind a stream of small ones; lxm3 0.4.2 asked for it in those cases
        # unless told otherwise (a bare -R, though, is rejected by Grid Engine).
        reserved = executor.reserved
        if reserved is None and (any(self.directive_key(d) == "-pe" for d in derived + explicit)
                                 or _wants_gpu(executor)):
            reserved = True
        if reserved is not None:
            derived.append(f"-R {'y' if reserved else 'n'}")
        derived.append(f"-j {'y' if executor.merge_output else 'n'}")
        if executor.requeue:
            derived.append("-r y")
        if executor.notify:
            derived.append("-notify")
        return _merge_directives(derived, explicit, self.directive_key)

    @staticmethod
    def _gives_gpus(directive: str) -> bool:
        """``-l gpu=1``, ``-l h_vmem=2G,ngpus=2``, ``-pe gpu 2``, ``-q gpu.q``."""
        option, _, rest = _strip_prefix(directive, "#$").partition(" ")
        rest = rest.strip()
        if option == "-l":
            for item in rest.split(","):
                name, has_value, value = item.partition("=")
                if _named_for_gpus(name) and not (has_value and _no_amount(value)):
                    return True
        elif option == "-pe":
            name, _, slots = rest.partition(" ")
            return _named_for_gpus(name) and not _no_amount(slots or "1")
        elif option == "-q":
            return _named_for_gpus(rest)
        return False

    def asks_for_gpus(self, executor: ClusterExecutor) -> bool:
        directives = [f"-l {key}={value}" for key, value in executor.resources.items() if value]
        directives += [f"-pe {name} {slots}" for name, slots in executor.parallel_environments.items()]
        directives += list(executor.extra_directives)
        if executor.queue:
            directives.append(f"-q {executor.queue}")
        return any(self._gives_gpus(d) for d in directives)

    def probe_lines(self) -> str:
        return """echo "max_array_tasks $(qconf -sconf 2>/dev/null | awk '$1 == "max_aj_tasks" {print $2}')"
"""

    def array_limit(self, info: ClusterInfo) -> Optional[int]:
        """max_aj_tasks caps the count (0: no limit)."""
        return info.max_array_tasks or None

    def submit_argv(self, executor: ClusterExecutor, script: str, count: int, log_dir: str,
                    chained: bool, after: Sequence[Tuple[str, Sequence[str]]] = ()) -> List[str]:
        base = self.index_base
        argv = ["qsub", "-terse", "-t", f"{base}-{base + count - 1}"]
        if executor.max_parallel_tasks:
            argv += ["-tc", str(executor.max_parallel_tasks)]
        log_path = self.log_path_pattern(log_dir)
        if not self.user_sets(executor, self.output_option):
            argv += ["-o", log_path]
        if not executor.merge_output and not self.user_sets(executor, "-e"):
            argv += ["-e", log_path[: -len(".log")] + ".err"]
        # -hold_jid waits for the jobs to end, whatever their outcome; a job that
        # exits with 100 holds it for good (holds_dependents_line), so "ok" is
        # -hold_jid too. -hold_jid_ad: task i after task i, arrays of one size.
        hold = [job_id for kind, job_ids in after if kind != "each" for job_id in job_ids]
        if chained:
            hold.append("{previous}")
        if hold:
            argv += ["-hold_jid", ",".join(hold)]
        each = [job_id for kind, job_ids in after if kind == "each" for job_id in job_ids]
        if each:
            argv += ["-hold_jid_ad", ",".join(each)]
        return argv

    holds_dependents_line = ("[[ $status -eq 0 ]] || exit 100  "
                             "# Grid Engine: jobs waiting for this one (-hold_jid) stay held for good")

    def rerun_limits(self, info: ClusterInfo) -> Tuple[Optional[int], Optional[int]]:
        """max_aj_tasks bounds the count; -t takes one range, so each array is one run."""
        return None, info.max_array_tasks or None

    def rerun_argv(self, argv: Sequence[str], indices: Sequence[int], rerun: int,
                   after_previous: bool) -> List[str]:
        first, last = indices[0] + self.index_base, indices[-1] + self.index_base
        if last - first + 1 != len(indices):
            raise ValueError(f"lxm3 bug: qsub -t takes one range, not indices {list(indices)}")
        words: List[str] = []
        throttled, skip = False, False
        for word in argv:
            if skip:
                skip = False
            elif word in ("-hold_jid", "-hold_jid_ad"):  # the launch's dependencies
                skip = True
            elif word == "-t":
                words += ["-t", f"{first}-{last}"]
                skip = True
            else:
                throttled = throttled or word == "-tc"  # max_parallel_tasks
                words.append(word)
        words += ["-v", f"LXM_RERUN={int(rerun)}"]
        if after_previous and throttled:
            words += ["-hold_jid", "{previous}"]
        return words

    def log_path_pattern(self, log_dir: str) -> str:
        return os.path.join(log_dir, "$JOB_NAME-$JOB_ID.$TASK_ID.log")  # qsub expands these

    def task_log_name(self, job_name: str, job_id: str, index: int) -> str:
        return f"{job_name}-{job_id}.{index + self.index_base}.log"

    def task_job(self, job_id: str, index: int) -> str:
        return f"{job_id}.{index + self.index_base}"

    @staticmethod
    def _state(code: str) -> str:
        if "E" in code:
            return TaskState.FAILED  # Eqw: an error state that never resolves by itself
        if "d" in code:
            return TaskState.CANCELLED
        return TaskState.RUNNING if ("r" in code or "t" in code) else TaskState.PENDING

    def status_lines(self, job_ids: Sequence[str]) -> List[str]:
        lines = ["echo '== queue'", "qstat -g d 2>/dev/null", "echo '== accounting'"]
        # Grid Engine forgets finished jobs at once: ask its accounting about those.
        lines += [f"qstat -j {job_id} >/dev/null 2>&1 || qacct -j {job_id} 2>/dev/null" for job_id in job_ids]
        return lines

    def read_status(self, queue, accounting, job_ids):
        queued, finished = {}, {}
        for line in queue:  # job-ID prior name user state submit/start at queue slots ja-task-ID
            fields = line.split()
            if len(fields) >= 5 and fields[0] in job_ids and fields[-1].isdigit():
                queued[(fields[0], int(fields[-1]) - self.index_base)] = self._state(fields[4])
        entry: Dict[str, str] = {}
        for line in accounting:  # qacct -j: a block of "key value" lines per task, fenced by =====
            if line.startswith("====="):
                entry.clear()
                continue
            key, _, value = line.partition(" ")
            entry[key] = value.strip()
            if key == "exit_status" and entry.get("jobnumber") in job_ids and entry.get("taskid", "").isdigit():
                failed = entry.get("failed", "0").split()[0] != "0"
                code = value.strip().split()[0]
                index = int(entry["taskid"]) - self.index_base
                state = TaskState.FAILED if failed or code != "0" else TaskState.COMPLETED
                finished[(entry["jobnumber"], index)] = (state, code)
        return queued, finished

    def active_jobs_command(self) -> str:
        return 'qstat -u "$(id -un)" | awk \'NR > 2 {print $1}\''


# -- PBS Professional / OpenPBS ----------------------------------------------

# Chunk resources of "-l select=...": a job-wide "-l ncpus=..." beside a select
# is refused by PBS, so any of these the user gives replaces the derived select.
_PBS_SELECT_FAMILY = ("select", "nodes", "ncpus", "mem", "ngpus", "vmem", "mpiprocs", "ompthreads")

# job_state letters (qstat -f); X: a subjob that ended while its array runs,
# F: a finished job (history). B: an array that has begun (the parent only).
_PBS_STATES = {
    **dict.fromkeys("QHWTM", TaskState.PENDING),
    **dict.fromkeys("RESUB", TaskState.RUNNING),
}
_PBS_DELETED = "91"  # substate of a finished job that was deleted (qdel)


class PBSScheduler(Scheduler):
    """PBS Professional / OpenPBS: ``qsub -J``, ``qstat -x -t -f``, ``qdel``.

    Job ids are PBS's whole ids, ``1234[].server`` for an array and
    ``1234[7].server`` for its task 7; qsub passes a job script no arguments,
    so the array's first task goes in ``-v LXM_FIRST_TASK=N``.
    """

    name, title = "pbs", "PBS"
    submit_command, cancel_command = "qsub", "qdel"
    directive_prefix, output_option = "#PBS", "-o"
    index_base = 0
    job_id_end = " "  # qsub prints the id alone: 1234[].server
    task_id_line = ("LXM_TASK_ID=$(( ${PBS_ARRAY_INDEX:-0} + ${LXM_FIRST_TASK:-0} ))  "
                    "# LXM_FIRST_TASK: the array's first task (qsub -v)")
    # qdel of a job that had just ended; its history purged or expired.
    benign_cancel = re.compile(r"Job has finished|Unknown Job Id", re.I)
    # PBS does not tell a job how often it ran (qrerun, a failed node): each run
    # adds a line to a file named after its job id, beside the tasks file.
    restart_count = ('$(lxm_runs="${lxm_tasks%/*}/runs"; mkdir -p "$lxm_runs" 2>/dev/null; '
                     'echo >>"$lxm_runs/${PBS_JOBID:-none}" 2>/dev/null; '
                     'echo $(( $(wc -l <"$lxm_runs/${PBS_JOBID:-none}" 2>/dev/null || echo 1) - 1 )))')
    version_command, version_pattern = "qsub --version", r"pbs_version\s*=\s*(\S+)"
    max_warning_seconds = 0  # no warning before the walltime: TERM to every process, then KILL

    def directive_key(self, directive: str) -> str:
        option, _, rest = _strip_prefix(directive, "#PBS").partition(" ")
        if option != "-l":
            return option
        name = rest.strip().split("=")[0].strip()
        return "-l select" if name in _PBS_SELECT_FAMILY else f"-l {name}"

    def select_directive(self, requirements: xm.JobRequirements, cluster: ClusterConfig) -> Optional[str]:
        """``-l select=N:ncpus=..:mem=..:ngpus=..``: one chunk per replica."""
        settings = _scheduler_settings(cluster, self.name)
        names = {what: _directive_value(settings.get(f"{what}_resource", default), f"[clusters.pbs] {what}_resource")
                 for what, default in (("cpu", "ncpus"), ("memory", "mem"), ("gpu", "ngpus"))}
        chunk = []
        for resource, amount in requirements.task_requirements.items():
            if resource == xm.ResourceType.CPU:
                chunk.append(f"{names['cpu']}={_whole(amount)}")
            elif resource == xm.ResourceType.MEMORY:
                chunk.append(f"{names['memory']}={_mebibytes(amount)}mb")
            elif resource in xm.GpuType or resource == xm.ResourceType.LOCAL_GPU:
                chunk.append(f"{names['gpu']}={_whole(amount)}")
                gpu_type = _gpu_type_name(resource, settings.get("gpu_types", {}))
                if gpu_type:
                    type_name = settings.get("gpu_type_resource")
                    if not type_name:
                        raise _unsupported(self.title, f"{resource}={amount:g}",
                                           "name the chunk resource that holds the GPU model as "
                                           "gpu_type_resource in the cluster's [clusters.pbs] config "
                                           "(e.g. \"gpu_model\"), or ask for gpu=N")
                    type_name = _directive_value(type_name, "[clusters.pbs] gpu_type_resource")
                    chunk.append(f"{type_name}={_directive_value(gpu_type, '[clusters.pbs] gpu_types')}")
            else:
                raise _unsupported(self.title, f"{resource}={amount:g}",
                                   "ask for it with resources={...} as your site names it")
        if requirements.location:
            chunk.append(f"host={_directive_value(requirements.location, 'location')}")
        if requirements.service_tier != xm.ServiceTier.PROD:
            raise _unsupported(self.title, f"service_tier={requirements.service_tier}")
        if not chunk and requirements.replicas <= 1:
            return None
        return f"-l select={requirements.replicas}{''.join(':' + c for c in chunk)}"

    def explicit_directives(self, executor: ClusterExecutor) -> List[str]:
        explicit = [f"-l {key}={_directive_value(value, key)}"
                    for key, value in executor.resources.items() if value]
        return explicit + [_strip_prefix(d, "#PBS") for d in executor.extra_directives]

    def directives(self, executor: ClusterExecutor, cluster: ClusterConfig, job_name: str) -> List[str]:
        derived = [f"-N {job_name}", "-j oe"]
        select = self.select_directive(executor.requirements, cluster)
        if select:
            derived.append(select)
        seconds = parse_walltime(executor.walltime)
        if seconds:
            derived.append(f"-l walltime={hms_time(seconds)}")
        for option, value in (("-q", executor.queue), ("-A", executor.account), ("-P", executor.project)):
            if value:
                derived.append(f"{option} {_directive_value(value, option)}")
        if executor.requeue:
            derived.append("-r y")
        return _merge_directives(derived, self.explicit_directives(executor), self.directive_key)

    @staticmethod
    def _gives_gpus(directive: str) -> bool:
        """``-l select=1:ngpus=1``, ``-l ngpus=2``, ``-q gpu``."""
        option, _, rest = _strip_prefix(directive, "#PBS").partition(" ")
        rest = rest.strip()
        if option == "-l":
            for item in re.split(r"[:,+]", rest.partition("=")[2] if rest.startswith("select=") else rest):
                name, has_value, value = item.partition("=")
                if _named_for_gpus(name) and not (has_value and _no_amount(value)):
                    return True
        elif option == "-q":
            return _named_for_gpus(rest)
        return False

    def asks_for_gpus(self, executor: ClusterExecutor) -> bool:
        directives = [f"-l {key}={value}" for key, value in executor.resources.items() if value]
        directives += list(executor.extra_directives)
        if executor.queue:
            directives.append(f"-q {executor.queue}")
        return any(self._gives_gpus(d) for d in directives)

    def probe_lines(self) -> str:
        # max_array_size: the most subjobs an array may have (server, or queue).
        return """echo "max_array_tasks $(qstat -B -f 2>/dev/null | awk '$1 == "max_array_size" {print $3}')"
"""

    def array_limit(self, info: ClusterInfo) -> Optional[int]:
        """max_array_size caps the count (indices may be larger)."""
        return info.max_array_tasks or None

    @staticmethod
    def _indices(first: int, last: int) -> str:
        """-J's range: PBS refuses start == end, so one index is ``i-(i+1):2``."""
        return f"{first}-{last}" if last > first else f"{first}-{first + 1}:2"

    def submit_argv(self, executor: ClusterExecutor, script: str, count: int, log_dir: str,
                    chained: bool, after: Sequence[Tuple[str, Sequence[str]]] = ()) -> List[str]:
        throttle = executor.max_parallel_tasks
        argv = ["qsub", "-J", self._indices(0, count - 1) + (f"%{throttle}" if throttle else "")]
        if not self.user_sets(executor, self.output_option):
            argv += ["-k", "oed", "-o", self.log_path_pattern(log_dir)]
        variables = [_strip_prefix(d, "-v") for d in self.explicit_directives(executor) if d.startswith("-v ")]
        if variables:  # a -v of the command line replaces the script's: keep the user's
            argv += ["-v", ",".join(variables)]
        parts = []
        for kind, job_ids in after:
            if kind == "each":
                raise LaunchError("PBS cannot make each task wait for the same task of another array "
                                  "(after_each): use after_ok() or after_any(), which wait for the whole "
                                  "work unit")
            parts.append(f"{self._dependency_kinds[kind]}:{':'.join(job_ids)}")
        if chained:
            parts.append("afterany:{previous}")
        if parts:
            argv += ["-W", f"depend={','.join(parts)}"]
        return argv

    _dependency_kinds = {"ok": "afterok", "any": "afterany"}

    def command_line(self, options: Sequence[str], script: str, first_task: int) -> List[str]:
        # One -v: a second replaces the first.
        options, variables = list(options), []
        while "-v" in options:
            at = options.index("-v")
            variables.append(options[at + 1])
            del options[at:at + 2]
        variables.append(f"LXM_FIRST_TASK={int(first_task)}")
        return [*options, "-v", ",".join(variables), script]

    def options_of(self, command: Sequence[str]) -> List[str]:
        *options, _, variables, _ = command
        kept = [v for v in variables.split(",") if not v.startswith("LXM_FIRST_TASK=")]
        return options + (["-v", ",".join(kept)] if kept else [])

    def rerun_limits(self, info: ClusterInfo) -> Tuple[Optional[int], Optional[int]]:
        """max_array_size bounds the count; -J takes one range, so each array is one run."""
        return None, info.max_array_tasks or None

    def rerun_argv(self, argv: Sequence[str], indices: Sequence[int], rerun: int,
                   after_previous: bool) -> List[str]:
        first, last = indices[0], indices[-1]
        if last - first + 1 != len(indices):
            raise ValueError(f"lxm3 bug: qsub -J takes one range, not indices {list(indices)}")
        words: List[str] = []
        throttled, skip = False, False
        for at, word in enumerate(argv):
            if skip:
                skip = False
            elif word == "-W" and argv[at + 1].startswith("depend="):  # the launch's dependencies
                skip = True
            elif word == "-J":
                throttle = argv[at + 1].partition("%")[2]  # max_parallel_tasks
                throttled = bool(throttle)
                words += ["-J", self._indices(first, last) + (f"%{throttle}" if throttle else "")]
                skip = True
            else:
                words.append(word)
        words += ["-v", f"LXM_RERUN={int(rerun)}"]
        if after_previous and throttled:
            words += ["-W", "depend=afterany:{previous}"]
        return words

    def log_path_pattern(self, log_dir: str) -> str:
        return log_dir.rstrip("/") + "/"  # a directory: PBS names each file <job id>.OU

    def task_log_name(self, job_name: str, job_id: str, index: int) -> str:
        return f"{self.task_job(job_id, index)}.OU"

    def log_name_patterns(self, job_name: str, job_ids: Sequence[str]) -> List[str]:
        return [f"{job_id.partition('[')[0]}\\[*.OU" for job_id in job_ids if job_id.partition("[")[0].isdigit()]

    def task_job(self, job_id: str, index: int) -> str:
        return job_id.replace("[]", f"[{index + self.index_base}]", 1)

    def status_lines(self, job_ids: Sequence[str]) -> List[str]:
        # -x: finished jobs too (while the server keeps their history); -t: each task.
        # Plain -f, not -F json: given several jobs, qstat 23.06 prints only the first's JSON.
        fields = "job_state|substate|Exit_status"
        return ["echo '== queue'",
                f"qstat -x -t -f {' '.join(shell_quote(j) for j in job_ids)} 2>/dev/null "
                f"| grep -E '^Job Id: |^    ({fields}) = '",
                "echo '== accounting'"]

    @staticmethod
    def _exit_code(status: str) -> str:
        """Exit_status: the job's own (0-255); 256 + N: killed by signal N (given as
        128 + N, as a shell says it); below 0: PBS could not run it, or ended it
        (-29: its walltime): no exit status of its own."""
        if not re.fullmatch(r"-?[0-9]+", status):
            return ""
        code = int(status)
        return str(code - 256 + 128) if code >= 256 else str(code) if code >= 0 else ""

    def read_status(self, queue, accounting, job_ids):
        queued, finished = {}, {}
        jobs: List[Dict[str, str]] = []
        for line in queue:  # "Job Id: 1234[7].server", then "    job_state = R" ...
            if line.startswith("Job Id: "):
                jobs.append({"id": line[len("Job Id: "):].strip()})
            elif jobs:
                key, _, value = line.strip().partition(" = ")
                jobs[-1][key] = value.strip()
        for job in jobs:  # (a queued task has no array_id/array_index yet: read its id)
            match = re.fullmatch(r"([0-9]+)\[([0-9]+)\](.*)", job["id"])
            if not match or f"{match.group(1)}[]{match.group(3)}" not in job_ids:
                continue  # the array itself, or another's
            key = (f"{match.group(1)}[]{match.group(3)}", int(match.group(2)) - self.index_base)
            state = job.get("job_state", "")
            if state in _PBS_STATES:
                queued[key] = _PBS_STATES[state]
            elif state in ("X", "F"):
                code = self._exit_code(job.get("Exit_status", ""))
                if "Exit_status" not in job:  # it never ran: deleted, or its dependency failed
                    finished[key] = (TaskState.CANCELLED, "")
                elif job.get("substate") == _PBS_DELETED and code in ("1", "143", "137"):
                    finished[key] = (TaskState.CANCELLED, code)  # qdel
                else:
                    finished[key] = (TaskState.COMPLETED if code == "0" else TaskState.FAILED, code)
        return queued, finished

    def active_jobs_command(self) -> str:
        return 'qselect -u "$(id -un)"'  # ids as qsub printed them: 1234[].server


SCHEDULERS = {s.name: s for s in (SlurmScheduler(), GridEngineScheduler(), PBSScheduler())}


def scheduler_of(executor: ClusterExecutor) -> Scheduler:
    """The Scheduler that runs ``executor``'s jobs."""
    return scheduler_named(executor.scheduler)


def scheduler_named(name: str) -> Scheduler:
    """The Scheduler a record or config names; an error naming the known ones otherwise."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise LaunchError(f"scheduler {name!r} is not one this lxm3 knows ({', '.join(SCHEDULERS)}); "
                          "was the record written by a newer lxm3?") from None


# ---------------------------------------------------------------------------
# Submission: one scheduler call per array, arrays split by the cluster's limit
# ---------------------------------------------------------------------------


def split_array(num_tasks: int, limit: Optional[int]) -> List[Tuple[int, int]]:
    """(first task, count) of each array; every array is indexed from its start."""
    size = limit if limit and limit > 0 else num_tasks
    return [(first, min(size, num_tasks - first)) for first in range(0, num_tasks, size)]


class ArraySubmission(ValueObject):
    """One scheduler call: tasks ``first_task .. first_task + count - 1`` of a work unit."""

    def __init__(
        self,
        work_unit_id: int,
        first_task: int,
        count: int,
        argv: List[str],  # the scheduler command; "{previous}" stands for the previous array's id
        job_id: Optional[str] = None,
    ):
        self.work_unit_id = work_unit_id
        self.first_task = first_task
        self.count = count
        self.argv = argv
        self.job_id = job_id

    @property
    def key(self) -> str:
        return f"{self.work_unit_id}:{self.first_task}"

    @property
    def task_range(self) -> str:
        last = self.first_task + self.count - 1
        return f"task {last}" if self.count == 1 else f"tasks {self.first_task}-{last}"


def submission_argv(executor: ClusterExecutor, script: str, first_task: int, count: int,
                    log_dir: str, chained: bool, after: Sequence[Tuple[str, Sequence[str]]] = ()) -> List[str]:
    """The sbatch/qsub command of one array; the script gets its first task as ``$1``.

    With ``max_parallel_tasks`` and several arrays, each array waits for the
    previous one, so the throttle holds for the whole work unit.
    """
    scheduler = scheduler_of(executor)
    return scheduler.command_line(scheduler.submit_argv(executor, script, count, log_dir, chained, after),
                                  script, first_task)


def plan_submissions(work_unit_id: int, executor: ClusterExecutor, script: str,
                     num_tasks: int, log_dir: str, limit: Optional[int],
                     upstream: Optional[Mapping[int, Sequence[Any]]] = None,
                     after: Sequence[Tuple[str, int]] = ()) -> List[ArraySubmission]:
    """The arrays of a work unit, split by ``limit``.

    ``after``: (kind, work unit) it waits for; ``upstream``: those units'
    arrays (ArraySubmissions of this submission, whose ids the script fills in
    as ``{job:KEY}``, or ones submitted before). ok/any wait for every array;
    after_each pairs arrays, so the unit is split as its upstream was.
    """
    chunks = split_array(num_tasks, limit)
    upstream = upstream or {}
    each = [w for kind, w in after if kind == "each"]
    if each:
        chunks = [(a.first_task, a.count) for a in upstream.get(each[0], [])]
    submissions = []
    for i, (first, count) in enumerate(chunks):
        waits = []
        for kind, wid in after:
            arrays = upstream.get(wid, [])
            if not arrays:
                raise LaunchError(f"work unit {work_unit_id} waits for work unit {wid}, which was not "
                                  "submitted: launch them again together")
            if kind == "each":
                arrays = [a for a in arrays if (a.first_task, a.count) == (first, count)]
                if not arrays:
                    raise LaunchError(
                        f"work unit {work_unit_id} pairs its tasks with work unit {wid}'s (after_each), "
                        f"but {wid} has no array of exactly tasks {first}-{first + count - 1}: pair work "
                        "units on one cluster (split alike), or use after_ok()")
            waits.append((kind, [a.job_id or f"{{job:{a.key}}}" for a in arrays]))
        argv = submission_argv(executor, script, first, count, log_dir,
                               chained=i > 0 and executor.max_parallel_tasks is not None, after=waits)
        submissions.append(ArraySubmission(work_unit_id, first, count, argv))
    return submissions


def split_index_lists(tasks: Iterable[int], max_index: Optional[int], max_count: Optional[int],
                      contiguous: bool) -> List[Tuple[int, List[int]]]:
    """(offset, indices) of each array that submits ``tasks`` again (task = offset + index).

    Each array starts at its first task, index 0, so tasks above the cluster's
    limit fit; its indices stay below ``max_index`` (Slurm's MaxArraySize bounds
    the largest index, not the count) and number at most ``max_count``. With
    ``contiguous``, each array is one run of consecutive tasks (Grid Engine's -t a-b).
    """
    chunks: List[Tuple[int, List[int]]] = []
    for task in sorted(set(tasks)):
        if chunks:
            offset, indices = chunks[-1]
            index = task - offset
            if ((max_index is None or index < max_index) and (max_count is None or len(indices) < max_count)
                    and (not contiguous or index == indices[-1] + 1)):
                indices.append(index)
                continue
        chunks.append((task, [0]))
    return chunks


def parse_task_list(text: str) -> List[int]:
    """``3,7,12-20`` (``lxm3 rerun --tasks``, a rerun array's record): the task ids, sorted."""
    tasks: Set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise LaunchError(f"{text!r} is not a list of task ids such as 3,7,12-20 (ids from 0; "
                              "a range a-b with a <= b)")
        tasks.update(range(int(first), int(last if dash else first) + 1))
    return sorted(tasks)


_SUBMIT_PRELUDE = """\
lxm_main() {
trap '' HUP PIPE  # a dropped connection must not stop a submission half way
lxm_out=$(mktemp -d) || exit 1
trap 'rm -rf "$lxm_out"' EXIT
mkdir -p -- "$lxm_dir" || exit 1
exec 9>>"$lxm_dir/@@{lock}" || exit 1
if command -v flock >/dev/null 2>&1; then flock 9; fi
declare -A lxm_known=()
if [ -f "$lxm_dir/@@{log}" ]; then
  while read -r lxm_key lxm_id; do lxm_known[$lxm_key]=$lxm_id; done <"$lxm_dir/@@{log}"
fi
lxm_previous=
# lxm_need KEY AWAITED_KEY...: array KEY waits for those arrays; without
# their job ids (not submitted) it cannot be submitted.
lxm_need() {
  local key=$1 up
  shift
  for up in "$@"; do
    [ -n "${lxm_known[$up]:-}" ] && continue
    [ -e "$lxm_out/rejected" ] || [ -e "$lxm_dir/@@{stop}" ] && exit 0
    : >"$lxm_out/rejected"
    echo "FAIL $key"
    echo "it waits for array $up of this launch, which has no job id (not submitted)"
    exit 0
  done
}
# lxm_submit KEY COMMAND...: prints "OK KEY ID", or "FAIL KEY" and the error. An
# array the log holds is not submitted again. After a rejection (here or in
# another worker) or a stop request, it ends its worker, the subshell it runs in.
lxm_submit() {
  local key=$1 out err="$lxm_out/err.$1"
  shift
  if [ -n "${lxm_known[$key]:-}" ]; then
    lxm_previous=${lxm_known[$key]}
    echo "OK $key $lxm_previous"
    return
  fi
  [ -e "$lxm_out/rejected" ] || [ -e "$lxm_dir/@@{stop}" ] && exit 0
  if ! out=$("$@" 9>&- 2>"$err"); then  # the lock is this script's, not the scheduler's
    : >"$lxm_out/rejected"
    echo "FAIL $key"
    cat "$err"
    exit 0
  fi
  out=${out%%$'\\n'*}
  lxm_previous=${out%%[@@{id_end}]*}  # the scheduler's job_id_end: sbatch's ID;CLUSTER
  printf '%s %s\\n' "$key" "$lxm_previous" >>"$lxm_dir/@@{log}" ||
    echo "WARN could not write $lxm_dir/@@{log}"
  echo "OK $key $lxm_previous"
}
"""

def _chains(submissions: Sequence[ArraySubmission]) -> List[List[ArraySubmission]]:
    """Arrays that wait for the previous one (a throttled, split work unit) stay together."""
    chains: List[List[ArraySubmission]] = []
    for sub in submissions:
        if chains and "{previous}" in " ".join(sub.argv):
            chains[-1].append(sub)
        else:
            chains.append([sub])
    return chains


def submission_script(log_dirs: Iterable[str], submissions: Sequence[ArraySubmission],
                      experiment_dir: str, scheduler: Scheduler) -> str:
    """One bash script that makes the log directories and submits every array.

    Independent arrays are submitted by SUBMIT_PARALLELISM workers at once,
    each taking every n-th chain; after a rejection no worker starts another
    submission. (Workers rather than ``wait -n``, which bash 4.2 lacks.)
    Job ids go to ``experiment_dir``'s submission log as they come.
    """
    prelude = _ScriptTemplate(_SUBMIT_PRELUDE).substitute(
        lock=SUBMISSION_LOCK, log=SUBMISSION_LOG, stop=SUBMISSION_STOP, id_end=scheduler.job_id_end)
    lines = [f"lxm_dir={shell_quote(experiment_dir)}", prelude, "umask 077"]
    lines += [f"mkdir -p -- {shell_quote(d)} || exit 1" for d in sorted(set(log_dirs))]
    stages = _stages(_chains(submissions))
    workers = 0
    for stage, chains in enumerate(stages):
        if stage:  # the job ids the previous stages got, for those that wait for them
            lines += ["wait", _READ_SUBMISSION_LOG]
        count = min(SUBMIT_PARALLELISM, len(chains))
        for worker in range(count):
            calls = []
            for chain in chains[worker::count]:
                for sub in chain:
                    needs = _awaited_keys(sub)
                    if needs:
                        calls.append(f"lxm_need {sub.key} {' '.join(needs)}")
                    words = [_JOB_PLACEHOLDER.sub(lambda m: f"'\"${{lxm_known[{m.group(1)}]}}\"'",
                                                  shell_quote(a).replace("{previous}", "'\"$lxm_previous\"'"))
                             for a in sub.argv]
                    calls.append(f"lxm_submit {sub.key} {' '.join(words)}")
            lines.append("(\n" + "\n".join(calls) + f"\n) >\"$lxm_out/{workers}\" 2>&1 &")
            workers += 1
    lines += ["wait", 'cat "$lxm_out"/[0-9]*' if workers else ":", "}", "lxm_main"]
    return "\n".join(lines) + "\n"


_JOB_PLACEHOLDER = re.compile(r"\{job:([0-9]+:[0-9]+)\}")  # the job id of the array with that key
_READ_SUBMISSION_LOG = f"""if [ -f "$lxm_dir/{SUBMISSION_LOG}" ]; then
  while read -r lxm_key lxm_id; do lxm_known[$lxm_key]=$lxm_id; done <"$lxm_dir/{SUBMISSION_LOG}"
fi"""


def _awaited_keys(sub: ArraySubmission) -> List[str]:
    """The keys of arrays of this submission that ``sub`` waits for (``{job:KEY}``)."""
    return list(dict.fromkeys(_JOB_PLACEHOLDER.findall(" ".join(sub.argv))))


def _stages(chains: List[List[ArraySubmission]]) -> List[List[List[ArraySubmission]]]:
    """Chains in rounds: one that waits for another's job is submitted in a later round."""
    stage_of: Dict[str, int] = {}
    stages: List[List[List[ArraySubmission]]] = []
    for chain in chains:  # a work unit waits only for units added before it: already placed
        stage = max((stage_of.get(key, -1) + 1 for sub in chain for key in _awaited_keys(sub)), default=0)
        stage_of.update((sub.key, stage) for sub in chain)
        stages += [[] for _ in range(stage + 1 - len(stages))]
        stages[stage].append(chain)
    return stages


def submission_log_script(experiment_dir: str, stop: bool = False) -> str:
    """Read an experiment's submission log, after any submission still running.

    ``stop``: ask a running submission to start no more arrays first (the
    user pressed Ctrl-C). Prints the log as ``OK KEY ID`` lines.
    """
    d = shell_quote(experiment_dir)
    return "\n".join([
        f"[ -d {d} ] || exit 0",
        f": >{d}/{SUBMISSION_STOP}" if stop else ":",
        f"if command -v flock >/dev/null 2>&1 && [ -e {d}/{SUBMISSION_LOCK} ]; then",
        f"  flock -w {SUBMISSION_LOCK_WAIT} {d}/{SUBMISSION_LOCK} true || echo {shell_quote(SUBMISSION_STILL_RUNNING)}",
        "fi",
        f"rm -f {d}/{SUBMISSION_STOP}" if stop else ":",
        f"[ ! -f {d}/{SUBMISSION_LOG} ] || sed 's/^/OK /' {d}/{SUBMISSION_LOG}",
    ]) + "\n"


# What a submit command prints as a job id: digits (Slurm, Grid Engine), or
# PBS's array id with its server's name (1234[].server). Anything else is not one.
JOB_ID_PATTERN = re.compile(r"[0-9]+(?:\[\](?:\.[A-Za-z0-9_.-]+)?)?")


def parse_submission_output(output: str, submissions: Sequence[ArraySubmission]) -> Optional[str]:
    """Fill in job ids; returns the scheduler's error when a submission failed."""
    by_key = {s.key: s for s in submissions}
    error: Optional[List[str]] = None
    in_failure = False
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word == "OK":
            in_failure = False
            key, _, job_id = rest.partition(" ")
            if key in by_key and JOB_ID_PATTERN.fullmatch(job_id.strip()):
                by_key[key].job_id = job_id.strip()
        elif word == "FAIL":
            in_failure = error is None  # the first rejection's message is reported
            error = [] if error is None else error
        elif in_failure:
            error.append(line)
    if error is not None:
        return "\n".join(error).strip() or "no message"
    missing = [s for s in submissions if s.job_id is None]
    if missing:
        return f"no job id was printed for {missing[0].task_range} (output: {output.strip()!r})"
    return None


def unit_submission_state(num_tasks: int, arrays: Sequence[Any]) -> str:
    """Submitted, partially submitted or not submitted, by the tasks the arrays hold."""
    if not arrays:
        return UnitState.NOT_SUBMITTED
    return UnitState.PARTIALLY_SUBMITTED if _unsubmitted_tasks(num_tasks, arrays) else UnitState.SUBMITTED


# ---------------------------------------------------------------------------
# Records: what was launched, kept in the user's state directory
# ---------------------------------------------------------------------------
#
# One JSON file per experiment, <state>/experiments/<id>.json, replaced
# atomically on every update; ids are claimed with O_EXCL so that launches
# started in the same millisecond still get their own. The classes below are
# the file's whole format: they write it (to_json) and read it (from_json).


def _parameters(cls: type) -> Tuple[str, ...]:
    """The names ``cls(...)`` takes: a record's keys that mean something to this lxm3."""
    code = cls.__init__.__code__
    return code.co_varnames[1:code.co_argcount]


class ArrayRecord(ValueObject):
    """Tasks ``first_task .. first_task + count - 1`` of a work unit, as one array:
    submitted (its ``job_id``), or planned (its ``key`` in the cluster's submission log).

    An array of ``lxm3 rerun`` holds ``tasks`` (``3,7,12-20``; None: the range
    above), each at array index task - ``first_task``, for its ``attempt``-th
    submission (1: the launch's).
    """

    def __init__(self, first_task: int, count: int, job_id: Optional[str] = None, key: Optional[str] = None,
                 tasks: Optional[str] = None, attempt: int = 1):
        self.first_task = first_task
        self.count = count
        self.job_id = job_id
        self.key = key
        self.tasks = tasks
        self.attempt = attempt

    def task_ids(self) -> List[int]:
        """Its tasks, in the order of their array indices."""
        if self.tasks is None:
            return list(range(self.first_task, self.first_task + self.count))
        return parse_task_list(self.tasks)

    def to_json(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and (k != "attempt" or v != 1)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ArrayRecord:
        job_id, key, tasks = data.get("job_id"), data.get("key"), data.get("tasks")
        return cls(int(data["first_task"]), int(data["count"]), None if job_id is None else str(job_id),
                   None if key is None else str(key), None if tasks is None else str(tasks),
                   int(data.get("attempt", 1)))


class WorkUnitRecord(ValueObject):
    """What ``lxm3 status``, ``logs`` and ``cancel`` need to find a work unit again.

    Args:
      id: the work unit's id (1, 2, ...).
      state: a UnitState.
      executor: the executor's class name (``Slurm``, ``GridEngine``, ``Local``).
      scheduler: a SCHEDULERS name, or ``local``.
      cluster: the config's cluster name (None for local work).
      num_tasks: how many tasks the unit has.
      tasks: each task's arguments and environment, as launched
        (``{"args": [...], "env": {...}}``, ``shell_args``: indices of
        arguments the node's shell expands).
      job_name, job_directory, script, log_directory, archive, image: where
        its files are, as the machine that runs it sees them.
      arrays: the submitted ArrayRecords; planned: those the launch meant to submit.
      submission_log: the cluster's log of submitted job ids.
      cancelled: whether ``lxm3 cancel`` cancelled a job of it.
      connection: how to reach the cluster again (server, user, port, key,
        timeouts, ssh_config, proxycommand; scheduler_bin: the bin_dir of its
        scheduler, if set), so that status works without the
        config that launched it.
      custom_output: the user set the output path, so lxm3 cannot find the logs.
      log_paths: local tasks' logs, by task; exit_codes: local tasks that ended.
      python: the cluster's Python its tasks run, as it reported itself at
        launch (``command``, ``executable``, ``version``, ``implementation``,
        ``cache_tag``, ``machine``, ``libc``, ...); None without a probe or
        in a container.
      environment: its managed environment's directory on the cluster (None:
        none), which ``lxm3 clean`` keeps while the record is recent or its
        jobs are queued or running.
      cleaned: when ``lxm3 clean`` removed its directory (job script, tasks
        file, logs) on the cluster (None: not removed).
      submit_argv: the submit command of its first array, without the script
        and its argument: what ``lxm3 rerun`` submits again (Scheduler.rerun_argv).
      dependencies: what it waits for, ``[{"kind": "ok"|"any"|"each",
        "work_units": [ids]}]`` (see Dependency); empty: nothing.
      never_run: local tasks that never started because what they waited
        for can no longer happen (an upstream task failed).
      attempts: local tasks run more than once (lxm3 rerun), with how many
        times; log_paths and exit_codes are their latest attempt's.
      gpus_per_task, max_parallel_tasks: the Local executor's, so that
        ``lxm3 rerun`` runs local tasks again as the launch ran them.
    """

    def __init__(self, id: int, state: str, executor: Optional[str] = None,  # noqa: A002
                 scheduler: str = "local", cluster: Optional[str] = None, num_tasks: int = 0,
                 tasks: Optional[List[Dict[str, Any]]] = None, job_name: Optional[str] = None,
                 job_directory: Optional[str] = None, script: Optional[str] = None,
                 log_directory: Optional[str] = None, archive: Optional[str] = None,
                 image: Optional[str] = None, arrays: Optional[List[ArrayRecord]] = None,
                 planned: Optional[List[ArrayRecord]] = None, submission_log: Optional[str] = None,
                 cancelled: bool = False, connection: Optional[Dict[str, Any]] = None,
                 custom_output: bool = False, log_paths: Optional[List[str]] = None,
                 exit_codes: Optional[Dict[int, int]] = None, python: Optional[Dict[str, Any]] = None,
                 environment: Optional[str] = None, cleaned: Optional[str] = None,
                 submit_argv: Optional[List[str]] = None,
                 dependencies: Optional[List[Dict[str, Any]]] = None,
                 never_run: Optional[List[int]] = None, attempts: Optional[Dict[int, int]] = None,
                 gpus_per_task: int = 0, max_parallel_tasks: Optional[int] = None):
        self.id = id
        self.state = state
        self.executor = executor
        self.scheduler = scheduler
        self.cluster = cluster
        self.num_tasks = num_tasks
        self.tasks = [] if tasks is None else tasks
        self.job_name = job_name
        self.job_directory = job_directory
        self.script = script
        self.log_directory = log_directory
        self.archive = archive
        self.image = image
        self.arrays = [] if arrays is None else arrays
        self.planned = [] if planned is None else planned
        self.submission_log = submission_log
        self.cancelled = cancelled
        self.connection = connection
        self.custom_output = custom_output
        self.log_paths = [] if log_paths is None else log_paths
        self.exit_codes = {} if exit_codes is None else exit_codes
        self.python = python
        self.environment = environment
        self.cleaned = cleaned
        self.submit_argv = submit_argv
        self.dependencies = [] if dependencies is None else dependencies
        self.never_run = [] if never_run is None else never_run
        self.attempts = {} if attempts is None else attempts
        self.gpus_per_task = gpus_per_task
        self.max_parallel_tasks = max_parallel_tasks

    @property
    def is_local(self) -> bool:
        return self.scheduler == "local"

    @property
    def job_ids(self) -> List[str]:
        return [a.job_id for a in self.arrays]

    def set_state(self, state: str) -> None:
        self.state = UnitState.move(self.state, state, f"work unit {self.id}")

    def to_json(self) -> Dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k not in ("arrays", "planned", "exit_codes")
                and not (k in ("cleaned", "submit_argv", "max_parallel_tasks") and v is None)
                and not (k == "gpus_per_task" and v == 0)}  # absent until set: older records stay as they were
        data["arrays"] = [a.to_json() for a in self.arrays]
        data["planned"] = [p.to_json() for p in self.planned]
        data["exit_codes"] = {str(k): v for k, v in sorted(self.exit_codes.items())}
        data["attempts"] = {str(k): v for k, v in sorted(self.attempts.items())}
        for name in ("dependencies", "never_run", "attempts"):  # newer than the format: left out when empty
            if not data[name]:
                del data[name]
        return data

    def upstream_ids(self) -> List[int]:
        """The work units this one waits for."""
        return list(dict.fromkeys(w for d in self.dependencies for w in d.get("work_units", ())))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkUnitRecord:
        """Fields a record of an earlier lxm3 lacks get their defaults."""
        fields = {k: v for k, v in data.items() if k in _parameters(cls)}
        fields["arrays"] = [ArrayRecord.from_json(a) for a in data.get("arrays") or []]
        fields["planned"] = [ArrayRecord.from_json(p) for p in data.get("planned") or []]
        fields["exit_codes"] = {int(k): v for k, v in (data.get("exit_codes") or {}).items()}
        fields["log_paths"] = data.get("log_paths") or []
        fields["dependencies"] = [dict(d) for d in data.get("dependencies") or []]
        fields["never_run"] = [int(t) for t in data.get("never_run") or []]
        fields["attempts"] = {int(k): int(v) for k, v in (data.get("attempts") or {}).items()}
        return cls(**fields)


class ExperimentRecord(ValueObject):
    """An experiment as launched: ``lxm3 list`` and ``status`` read it back.

    Args:
      experiment_id: milliseconds since the epoch at launch, as in lxm3 0.4.2.
      title, project: as given to ``create_experiment`` (project: also the
        config's or ``$LXM_PROJECT``).
      created: when, in UTC (ISO 8601).
      launcher, argv, cwd: the launcher file, its arguments and the directory
        it ran in, so that the launch can be told again.
      git: the launcher's repository: ``commit``, ``dirty``, ``root`` (None outside git).
      config: the config file in force (None: none).
      status: an ExperimentStatus; error: why it failed, if it did.
      work_units: the WorkUnitRecords.
      version: the format's version (RECORD_VERSION).
    """

    def __init__(self, experiment_id: int, title: str, created: str, project: Optional[str] = None,
                 launcher: Optional[str] = None, argv: Optional[List[str]] = None,
                 cwd: Optional[str] = None, git: Optional[Dict[str, Any]] = None,
                 config: Optional[str] = None, status: str = ExperimentStatus.LAUNCHING,
                 error: Optional[str] = None, work_units: Optional[List[WorkUnitRecord]] = None,
                 version: int = RECORD_VERSION):
        self.version = version
        self.experiment_id = experiment_id
        self.title = title
        self.project = project
        self.created = created
        self.launcher = launcher
        self.argv = [] if argv is None else argv
        self.cwd = cwd
        self.git = git
        self.config = config
        self.status = status
        self.error = error
        self.work_units = [] if work_units is None else work_units

    def unit(self, work_unit_id: int) -> WorkUnitRecord:
        """The work unit with this id; an error naming those there are otherwise."""
        for unit in self.work_units:
            if unit.id == work_unit_id:
                return unit
        raise LaunchError(f"experiment {self.experiment_id} has no work unit {work_unit_id} "
                          f"(it has {', '.join(str(u.id) for u in self.work_units) or 'none'})")

    def to_json(self) -> Dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "work_units"}
        data["work_units"] = [u.to_json() for u in self.work_units]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "the record") -> ExperimentRecord:
        """Read a record; one written by a later lxm3 (a higher version) is refused."""
        version = data.get("version", 1)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise LaunchError(f"{where} was written by a newer lxm3 (record version {version}; this "
                              f"lxm3 {__version__} reads versions up to {RECORD_VERSION}): upgrade lxm3 "
                              "to read it")
        try:
            fields = {k: v for k, v in data.items() if k in _parameters(cls)}
            fields["work_units"] = [WorkUnitRecord.from_json(u) for u in data.get("work_units") or []]
            return cls(**fields)
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise LaunchError(f"{where} is not an lxm3 record ({type(e).__name__}: {e})") from None


def _record_path(experiment_id: int) -> str:
    return os.path.join(state_dir(), "experiments", f"{experiment_id}.json")


def claim_experiment_id() -> int:
    """A new id (milliseconds since the epoch, as lxm3 0.4.2), unique on this machine."""
    make_private_dirs(os.path.dirname(_record_path(0)))
    experiment_id = int(time.time() * 1000)
    while True:
        try:
            fd = os.open(_record_path(experiment_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            experiment_id += 1
            continue
        os.close(fd)
        return experiment_id


def save_record(record: ExperimentRecord) -> None:
    _write_json_atomic(_record_path(record.experiment_id), record.to_json())


def load_record(experiment_id: Union[int, str]) -> ExperimentRecord:
    """The record of a past launch; ``lxm3 list`` shows the ids."""
    if not str(experiment_id).isdigit():
        raise LaunchError(f"{experiment_id!r} is not an experiment id; 'lxm3 list' shows them")
    path = _record_path(int(experiment_id))
    data = _read_json(path)
    if not data:
        raise LaunchError(f"no record of experiment {experiment_id} in {os.path.dirname(_record_path(0))}; "
                          "'lxm3 list' shows the experiments launched from this machine")
    return ExperimentRecord.from_json(data, where=path)


def list_records(limit: Optional[int] = None) -> List[ExperimentRecord]:
    """Records, newest first; files still being claimed (empty) are skipped, and
    unreadable ones named on stderr."""
    directory = os.path.dirname(_record_path(0))
    try:
        ids = sorted((int(n[:-5]) for n in os.listdir(directory)
                      if n.endswith(".json") and n[:-5].isdigit()), reverse=True)
    except FileNotFoundError:
        return []
    records = []
    for experiment_id in ids:
        path = _record_path(experiment_id)
        data = _read_json(path)
        if not data:
            continue
        try:
            records.append(ExperimentRecord.from_json(data, where=path))
        except LaunchError as e:
            _progress(f"skipped: {e}")
            continue
        if limit and len(records) >= limit:
            break
    return records


def _in_background(function: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """Call ``function(*args)`` on a thread; returns ``result(wait)``: its value,
    or None while it is still running and ``wait`` is false."""
    box: List[Any] = []
    thread = threading.Thread(target=lambda: box.append(function(*args)), daemon=True)
    thread.start()

    def result(wait: bool = True) -> Any:
        if wait:
            thread.join()
        return box[0] if box else None

    return result


def git_state(directory: str) -> Optional[Dict[str, Any]]:
    """The commit and dirtiness of the repository holding ``directory``, if any."""
    import subprocess

    def git(*args: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    where = git("rev-parse", "--show-toplevel", "HEAD")
    if where is None or len(where.splitlines()) != 2:
        return None
    root, commit = where.splitlines()
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changes), "root": root}


# ---------------------------------------------------------------------------
# Running on the local machine
# ---------------------------------------------------------------------------


class TaskResult(ValueObject):
    def __init__(self, work_unit_id: int, task_id: int, returncode: int, log_path: str):
        self.work_unit_id = work_unit_id
        self.task_id = task_id
        self.returncode = returncode
        self.log_path = log_path


NEVER_RUN_DETAIL = "never ran: a work unit it waited for did not succeed"

LOCAL_HEADER = "# Run by lxm3's local executor, which sets LXM_TASK_ID for each task."
LOCAL_TASK_ID = 'LXM_TASK_ID=${LXM_TASK_ID:?"is set by the lxm3 local runner"}'


def local_log_name(task_id: int, attempt: int = 1) -> str:
    """A local task's log for its ``attempt``-th run: ``task-3.log``, then
    ``task-3.attempt-2.log``, ... (lxm3 rerun keeps every attempt's)."""
    return f"task-{task_id}.log" if attempt == 1 else f"task-{task_id}.attempt-{attempt}.log"


def local_gpus() -> Tuple[Optional[List[str]], str]:
    """The GPUs local tasks may share out, and where that list comes from.

    CUDA_VISIBLE_DEVICES of the launching environment, if set: it is the
    user's choice of devices (others may use the rest), and what CUDA itself
    would allow. Else the GPUs ``nvidia-smi -L`` lists. None: cannot tell.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices: List[str] = []
        for device in visible.split(","):
            device = device.strip()
            if not device or device.startswith("-"):
                break  # CUDA ignores an invalid entry and all that follow it
            if device not in devices:
                devices.append(device)
        return devices, f"CUDA_VISIBLE_DEVICES={visible}"
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi is not on the PATH and CUDA_VISIBLE_DEVICES is not set"
    try:
        proc = subprocess.run([smi, "-L"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{smi} -L failed: {e}"
    if proc.returncode != 0:
        return None, f"{smi} -L failed (exit code {proc.returncode}): {proc.stdout.strip()[:300]}"
    devices = re.findall(r"^GPU (\d+):", proc.stdout, re.MULTILINE)
    return devices, f"nvidia-smi -L lists {_counted(len(devices), 'GPU')}"


class LocalRunner:
    """Runs local tasks in a bounded pool, streaming their output with a prefix.

    ``max_parallel`` worker threads take tasks from one queue, so a sweep of
    thousands of tasks costs that many threads, not one per task. A task that
    needs N GPUs waits for N free devices (see ``local_gpus``) and runs with
    them alone in its CUDA_VISIBLE_DEVICES; they are free again when it ends.
    A work unit's tasks may wait for another's (``after``, see Dependency):
    a worker takes the first queued task free to start, and drops those whose
    dependency can no longer be met (``never_run``).
    """

    def __init__(self, max_parallel: Optional[int] = None, out=None):
        import collections

        self.max_parallel = max_parallel or os.cpu_count() or 1
        self._max_parallel_given = max_parallel is not None
        self._out = out or sys.stdout
        self._lock = threading.Lock()
        self._queue: Any = collections.deque()  # (script, work unit, task, log, prefix, env, gpus)
        self._gpus: Optional[List[str]] = None  # every device tasks may have; None: not assigned
        self._gpu_source: Optional[str] = None  # where the list came from; None: not looked yet
        self._gpus_unassigned = False  # GPUs not countable: GPU tasks run one at a time
        self._free_gpus: List[str] = []
        self._gpus_freed = threading.Condition(self._lock)
        self._workers: List[threading.Thread] = []
        self._procs: Dict[Tuple[int, int], Any] = {}
        self._stopping = False
        self.results: List[TaskResult] = []
        self.not_started: List[Tuple[int, int]] = []  # (work unit, task) dropped by stop()
        self.never_run: List[Tuple[int, int]] = []  # (work unit, task): its dependency cannot be met
        self._units: Dict[int, int] = {}  # work unit -> its number of tasks
        self._ended: Dict[Tuple[int, int], Optional[int]] = {}  # return code; None: never started
        self._task_ended = threading.Condition(self._lock)
        self._writing: List[int] = []  # locks on the log directories (see follow_log)

    def submit(self, script: str, work_unit_id: int, num_tasks: int, log_dir: str,
               env: Optional[Mapping[str, str]] = None, gpus_per_task: int = 0,
               after: Sequence[Tuple[str, int]] = (), task_ids: Optional[Sequence[int]] = None,
               attempt: int = 1) -> List[str]:
        """Queue the tasks of a work unit (``task_ids``: only these; None: every
        one); returns their log paths, in that order. ``after``: (kind, work
        unit) pairs its tasks wait for (see Dependency). ``attempt``: which run
        of these tasks this is (lxm3 rerun): above 1, they get
        LXM_RERUN=attempt-1 and a log of their own (local_log_name)."""
        if gpus_per_task:
            self._plan_gpus(work_unit_id, gpus_per_task)
        make_private_dirs(log_dir)
        task_ids = list(range(num_tasks)) if task_ids is None else list(task_ids)
        logs = [os.path.join(log_dir, local_log_name(task_id, attempt)) for task_id in task_ids]
        env = dict(env or {}, **({"LXM_RERUN": str(attempt - 1)} if attempt > 1 else {}))
        self._writing += _hold_writer_lock(log_dir)
        with self._lock:
            self._units[work_unit_id] = num_tasks
            if self._stopping:
                self.not_started += [(work_unit_id, t) for t in task_ids]
                return logs
            for task_id, log_path in zip(task_ids, logs):
                prefix = f"[{work_unit_id}]" if num_tasks == 1 else f"[{work_unit_id}:{task_id}]"
                self._queue.append((script, work_unit_id, task_id, log_path, prefix, env, gpus_per_task,
                                    tuple(after)))
            for _ in range(min(self.max_parallel - len(self._workers), len(self._queue))):
                worker = threading.Thread(target=self._work, name="lxm3-local-worker", daemon=True)
                self._workers.append(worker)
                worker.start()
        return logs

    def note_earlier(self, work_unit_id: int, num_tasks: int, ended: Mapping[int, Optional[int]]) -> None:
        """How tasks that ran before this runner ended (lxm3 rerun; None: not
        well, without an exit code), for the tasks it runs that wait for them."""
        with self._lock:
            self._units.setdefault(work_unit_id, num_tasks)
            self._ended.update(((work_unit_id, task), code) for task, code in ended.items())

    def _plan_gpus(self, work_unit_id: int, gpus_per_task: int) -> None:
        """Find the GPUs (once), check a task's share fits, and let as many
        workers run as the devices allow, unless ``max_parallel`` was given."""
        if self._gpu_source is None:
            self._gpus, self._gpu_source = local_gpus()
            self._free_gpus = list(self._gpus or [])
        asks = f"work unit {work_unit_id} asks for {_counted(gpus_per_task, 'GPU')} per task"
        if self._gpus is None or self._gpus_unassigned:
            if self._max_parallel_given:
                return  # the user bounds the parallelism; devices are theirs to assign
            if not self._gpus_unassigned:
                _progress(
                    f"{asks}, but lxm3 cannot tell which GPUs this machine has ({self._gpu_source}): "
                    "such tasks run one at a time, as lxm3 0.4.2 ran them, with the machine's GPUs "
                    "unassigned. Set CUDA_VISIBLE_DEVICES to the GPUs tasks may use (e.g. "
                    "CUDA_VISIBLE_DEVICES=0,1) to share them out, or give "
                    "Local(max_parallel_tasks=K) to run K at once")
            # One stand-in device, taken whole by each GPU task: one such task at a time.
            self._gpus, self._free_gpus, self._gpus_unassigned = [""], [""], True
            return
        if gpus_per_task > len(self._gpus):
            raise LaunchError(
                f"{asks}, but tasks here may use {_counted(len(self._gpus), 'GPU')} "
                f"({self._gpu_source}): ask for fewer, or list more in CUDA_VISIBLE_DEVICES")
        if not self._max_parallel_given:
            self.max_parallel = max(self.max_parallel, len(self._gpus) // gpus_per_task)

    def _take_gpus(self, count: int) -> Optional[List[str]]:
        """Wait for ``count`` free devices and take them; None if stop() came first."""
        with self._lock:
            while not self._stopping and len(self._free_gpus) < count:
                self._gpus_freed.wait()
            if self._stopping:
                return None
            taken, self._free_gpus = self._free_gpus[:count], self._free_gpus[count:]
            return taken

    def _give_back_gpus(self, devices: List[str]) -> None:
        with self._lock:
            free = set(self._free_gpus) | set(devices)
            self._free_gpus = [d for d in self._gpus or [] if d in free]
            self._gpus_freed.notify_all()

    def _work(self) -> None:
        """Run queued tasks until the queue is empty (or stop() emptied it)."""
        while True:
            with self._lock:
                task = self._next_task()
                while task is None and self._queue and not self._stopping:
                    self._task_ended.wait()  # every queued task waits for one still running
                    task = self._next_task()
                if task is None:
                    self._workers.remove(threading.current_thread())
                    return
            self._run_task(*task)

    def _next_task(self) -> Optional[Tuple[Any, ...]]:
        """(Under the lock) take the first queued task free to start; drop, as
        never run, those whose dependency can no longer be met."""
        if self._queue and not self._queue[0][-1]:
            return self._queue.popleft()  # the common case: nothing to wait for
        for task in list(self._queue):
            verdict = self._dependency_verdict(task[-1], task[2])
            if verdict == "wait":
                continue
            self._queue.remove(task)
            if verdict == "run":
                return task
            work_unit_id, task_id, log_path = task[1], task[2], task[3]
            self.never_run.append((work_unit_id, task_id))
            self._ended[(work_unit_id, task_id)] = None
            self._task_ended.notify_all()
            try:
                with open(create_private(log_path), "w") as log:
                    log.write(f"lxm3: {NEVER_RUN_DETAIL}\n")
            except OSError:
                pass
        return None

    def _dependency_verdict(self, after: Sequence[Tuple[str, int]], task_id: int) -> str:
        """"run", "wait" or "never" for a task that waits for ``after``."""
        verdict = "run"
        for kind, upstream in after:
            if upstream not in self._units:  # its launch failed: none of its tasks will run
                if kind != "any":
                    return "never"
                continue
            for t in [task_id] if kind == "each" else range(self._units[upstream]):
                if (upstream, t) not in self._ended:
                    verdict = "wait"
                elif kind != "any" and self._ended[(upstream, t)] != 0:
                    return "never"
        return verdict

    def _run_task(self, script, work_unit_id, task_id, log_path, prefix, env, gpus, after=()) -> None:
        del after  # met: the task was free to start
        devices = None
        if gpus and self._gpus is not None:
            devices = self._take_gpus(1 if self._gpus_unassigned else gpus)
            if devices is None:
                with self._lock:
                    self.not_started.append((work_unit_id, task_id))
                    self._ended[(work_unit_id, task_id)] = None
                    self._task_ended.notify_all()
                return
            if not self._gpus_unassigned:
                env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(devices)}
        try:
            self._run_process(script, work_unit_id, task_id, log_path, prefix, env)
        finally:
            if devices:
                self._give_back_gpus(devices)

    def _run_process(self, script, work_unit_id, task_id, log_path, prefix, env) -> None:
        import subprocess

        full_env = {**os.environ, **env, "LXM_TASK_ID": str(task_id)}
        with open(create_private(log_path), "wb") as log:  # 0600: output may hold secrets
            with self._lock:  # stop() must see every process it has to stop
                if self._stopping:
                    self.not_started.append((work_unit_id, task_id))
                    self._ended[(work_unit_id, task_id)] = None
                    self._task_ended.notify_all()
                    return
                proc = subprocess.Popen(
                    ["bash", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                )
                self._procs[(work_unit_id, task_id)] = proc
            ended = self._stream(proc.stdout, log, prefix, task_id)
            returncode = proc.wait()
            if not ended:  # killed before its EXIT trap could say so: say it for it
                status = returncode if returncode >= 0 else 128 - returncode
                log.write(f"\nlxm3-exit: task {task_id} status {status}\n".encode())
        with self._lock:
            self._procs.pop((work_unit_id, task_id), None)
            self.results.append(TaskResult(work_unit_id, task_id, returncode, log_path))
            self._ended[(work_unit_id, task_id)] = returncode
            self._task_ended.notify_all()

    def _stream(self, stream, log, prefix: str, task_id: int) -> bool:
        """Copy a task's output to its log and, with ``prefix``, to the terminal;
        whether it ended with its exit record, which is kept out of the terminal
        (with the blank line the job script writes before it)."""
        held = b""  # a blank line, shown unless the exit record follows it
        ended = False
        for line in stream:
            log.write(line)
            log.flush()
            record = EXIT_RECORD_PATTERN.match(line.decode("utf-8", "replace"))
            ended = bool(record) and record.group(1) == str(task_id)
            if ended:
                held = b""
                continue
            if held:
                self._echo(prefix, held)
            held = b"" if line.strip() else line
            if not held:
                self._echo(prefix, line)
        if held:
            self._echo(prefix, held)
        return ended

    def _echo(self, prefix: str, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\n")
        with self._lock:
            self._out.write(f"{prefix} {text}\n")
            self._out.flush()

    def _join_workers(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                workers = list(self._workers)
            if not workers or (deadline is not None and time.monotonic() > deadline):
                return
            for worker in workers:
                worker.join(0.2)

    def wait(self) -> List[TaskResult]:
        """Wait for every task; Ctrl-C stops them all and is re-raised."""
        try:
            self._join_workers()
        except KeyboardInterrupt:
            self.stop()
            raise
        self._release_logs()
        return sorted(self.results, key=lambda r: (r.work_unit_id, r.task_id))

    def _release_logs(self) -> None:
        """No task writes its log any more: followers may stop."""
        for fd in self._writing:
            os.close(fd)
        self._writing = []

    def stop(self, grace: float = 5.0) -> None:
        """Drop the queued tasks (they never start), terminate every running
        task's process group, then kill what is left."""
        import signal

        with self._lock:
            self._stopping = True
            self.not_started += [(task[1], task[2]) for task in self._queue]
            self._ended.update(((task[1], task[2]), None) for task in self._queue)
            self._queue.clear()
            self._gpus_freed.notify_all()  # tasks waiting for GPUs never start
            self._task_ended.notify_all()  # nor tasks waiting for other tasks
            procs = list(self._procs.values())
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                _signal_group(proc, signal.SIGKILL)
        self._join_workers(timeout=grace)
        self._release_logs()


def _hold_writer_lock(log_dir: str) -> List[int]:
    """Lock LOG_WRITER_LOCK for as long as this process may write logs there
    (the kernel lets go if it dies): ``lxm3 logs -f`` stops following when
    nobody holds it. Returns the descriptor to keep open, if locking works here."""
    import fcntl

    fd = os.open(os.path.join(log_dir, LOG_WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # already ours, or no locks on this filesystem
        os.close(fd)
        return []
    return [fd]


def _log_writer_alive(log_dir: str) -> bool:
    """Whether an lxm3 process may still write the logs in ``log_dir``."""
    import fcntl

    try:
        fd = os.open(os.path.join(log_dir, LOG_WRITER_LOCK), os.O_RDONLY)
    except OSError:
        return False  # launched before there were such locks, or never started
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return True  # cannot tell: keep following
    finally:
        os.close(fd)


def _signal_group(proc: Any, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------
# Jobs and experiments
# ---------------------------------------------------------------------------


class ArrayJob(xm.JobConfig, ValueObject):
    """One work unit that runs ``executable`` once per element of ``args``/``env_vars``.

    A one-element list is broadcast against the other list.
    ``experiment.add(ArrayJob(executable, executor, args=[{"seed": s} for s in
    range(10)]))`` adds one work unit of 10 tasks: one array job on a
    cluster, 10 tasks in parallel on ``Local``. Task i (``LXM_TASK_ID=i``)
    gets ``args[i]`` and ``env_vars[i]``.

    Args:
      executable: what ``experiment.package`` returned (anything else is a
        TypeError when the job is added).
      executor: ``Local``, ``Slurm`` or ``GridEngine``, the same for every task.
      name: a label for messages (and kept by ``configure_wandb``'s wrapper);
        the scheduler's job name is ``<title>_<experiment id>_<work unit id>``
        whatever it is. Default None.
      args: one entry per task: a dict (``{"lr": 0.1}`` -> ``--lr=0.1``), a
        list (``["train", "--fast"]``) or ``xm.SequentialArgs``, merged over
        the executable's args (``xm.merge_args``: a task's flag overrides the
        packaged one). Values arrive exactly as written: no shell expands
        them, except an ``xm.ShellSafeArg``, expanded on the node. Default:
        none.
      env_vars: one ``{name: value}`` per task, over the executable's
        ``env_vars`` and the config's ``env``; values are written with
        ``str()``. Default: none.

    A one-entry ``args`` or ``env_vars`` is shared by every task; two lists of
    different lengths (neither of one entry), neither list, or a str/dict in
    place of a list, is a ValueError at once. With a packaged executable each
    task is checked here too, naming it: a reserved or invalid variable name
    (``lxm_*``, ``LXM_TASK_ID``, ``PWD``...), a value without a text form, a
    NUL byte, or arguments and environment too large for Linux to exec.
    """

    def __init__(
        self,
        executable: xm.Executable,
        executor: xm.Executor,
        name: Optional[str] = None,
        args: Optional[Sequence[Any]] = None,
        env_vars: Optional[Sequence[Mapping[str, str]]] = None,
    ):
        self.executable = executable
        self.executor = executor
        self.name = name
        for what, value in (("args", args), ("env_vars", env_vars)):
            if isinstance(value, (str, Mapping)):
                raise ValueError(f"ArrayJob {what} must be a list with one entry per task")
        args, env_vars = list(args or []), list(env_vars or [])
        if not args and not env_vars:
            raise ValueError("ArrayJob needs at least one task: pass args=[...] or env_vars=[...]")
        if len(args) > 1 and len(env_vars) > 1 and len(args) != len(env_vars):
            raise ValueError(
                f"ArrayJob args has {len(args)} entries and env_vars {len(env_vars)}: "
                "they must have the same length, or one of them a single entry to share"
            )
        count = max(len(args), len(env_vars))
        self.args = args * count if len(args) == 1 else (args or [{}] * count)
        self.env_vars = env_vars * count if len(env_vars) == 1 else (env_vars or [{}] * count)
        # Convert and check now so a bad entry is reported where the sweep is written.
        self._task_args = [xm.SequentialArgs.from_collection(a) for a in self.args]
        self._task_env = [dict(e) for e in self.env_vars]
        self._tasks: Optional[List[Task]] = None
        if isinstance(executable, ClusterExecutable):
            where = f"ArrayJob {name!r}" if name else "ArrayJob"
            self._tasks = _tasks_for(executable, self._task_args, self._task_env, where)


def _tasks_for(executable: ClusterExecutable, job_args: Sequence[xm.SequentialArgs],
               job_env: Sequence[Mapping[str, Any]], where: str) -> List[Task]:
    """The tasks of a work unit, each checked (see MAX_ARG_STRLEN); ``where``
    ("work unit 3", "ArrayJob") starts the message of a refused one."""
    tasks = []
    for index, (args, env) in enumerate(zip(job_args, job_env)):
        at = f"{where} task {index}"
        env = _env_text({**executable.env_vars, **env}, at)
        tasks.append(_check_task(Task(render_args(xm.merge_args(executable.args, args), at), env), at))
    return tasks


def _env_text(env: Mapping[str, Any], where: str) -> Dict[str, str]:
    """Environment values as text: numbers and the like are written with str()."""
    if all(type(value) is str for value in env.values()):
        return dict(env)
    text = {}
    for name, value in env.items():
        try:
            text[name] = value if isinstance(value, str) else _checked_text(value)
        except _NoTextForm as e:
            verb = "is" if value is e.value else "holds"
            raise TypeError(f"{where}: environment variable {name} {verb} {e.kind}: it has no text "
                            f"form (it would arrive as {_short_repr(value)}); pass a str") from None
    return text


def _check_launchable(executable: Any, executor: Any) -> None:
    if not isinstance(executable, ClusterExecutable):
        raise TypeError(
            f"the executable {executable!r} was not packaged by lxm3: "
            "use experiment.package([xm.Packageable(xm_cluster.PythonPackage(...), ...)])"
        )
    if not isinstance(executor, (Local, ClusterExecutor)):
        raise TypeError(
            f"lxm3 cannot launch on {type(executor).__name__}: use xm_cluster.Local(), "
            "xm_cluster.Slurm() or xm_cluster.GridEngine()"
        )
    if executable.container == "docker" and not isinstance(executor, Local):
        raise LaunchError(
            f"{executable.name}: DockerContainer runs only on the Local executor; on clusters use "
            "SingularityContainer (apptainer/singularity can run docker:// images). A PDMProject "
            "or PythonContainer packaged for Local runs with Docker too: package it with the "
            "cluster executor's Spec() to get a .sif"
        )


def _check_job_shape(job: Any) -> None:
    """One job per work unit: an xm.Job, an ArrayJob, a one-job group or a generator."""
    if isinstance(job, xm.JobGroup):
        if len(job.jobs) != 1:
            raise ValueError(
                "lxm3 launches one job per work unit: add an xm.Job or an xm_cluster.ArrayJob "
                f"(this JobGroup has {len(job.jobs)} jobs: {', '.join(job.jobs)})"
            )
        [job] = job.jobs.values()
        if isinstance(job, xm.JobGroup):
            raise ValueError("lxm3 launches one job per work unit: add the xm.Job itself, "
                             "not a JobGroup inside a JobGroup")
    if isinstance(job, (xm.Job, ArrayJob)):
        _check_launchable(job.executable, job.executor)


def _ready(value: Any):
    """An awaitable that is already resolved (unit creation needs no I/O)."""

    async def resolved():
        return value

    return resolved()


class Dependency(ValueObject):
    """What a work unit waits for (an lxm3 extension to ``experiment.add``).

    ``wu = experiment.add(job)`` returns an awaitable whose ``after_ok()``,
    ``after_any()`` and ``after_each()`` (the work unit's own, once awaited)
    make one; ``experiment.add(job2, dependency=wu.after_ok())`` adds a work
    unit that starts:

    - ``after_ok()``: once every task of ``wu`` succeeded (never, if one fails);
    - ``after_any()``: once every task of ``wu`` ended, whatever the outcome;
    - ``after_each()``: task by task: task i once task i of ``wu`` succeeded
      (both work units must have as many tasks).

    A list of them must all hold. Both work units run on one cluster (or
    both locally); Slurm ``--dependency=afterok|afterany|aftercorr``, Grid
    Engine ``-hold_jid`` / ``-hold_jid_ad``, arrays split by the array limit
    included. The record keeps it (``WorkUnitRecord.dependencies``).
    """

    KINDS = {"ok": "after_ok", "any": "after_any", "each": "after_each"}

    def __init__(self, kind: str, work_unit: ClusterWorkUnit):
        if kind not in self.KINDS:
            raise ValueError(f"a dependency's kind is one of {', '.join(self.KINDS)}, not {kind!r}")
        self.kind = kind
        self.work_unit_id = work_unit.work_unit_id
        self._unit = work_unit

    def to_record(self) -> Dict[str, Any]:
        return {"kind": self.kind, "work_units": [self.work_unit_id]}


def _dependencies(value: Any) -> List[Dependency]:
    """``dependency=``: one Dependency, a list of them, or None."""
    items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, Dependency):
            raise TypeError(
                f"dependency= takes what a work unit's after_ok(), after_any() or after_each() "
                f"returns (or a list of them), not {_short_repr(item)}: e.g. "
                "experiment.add(job, dependency=wu.after_ok()) with wu = experiment.add(...)")
    return items


def _job_executor(job: Any) -> Optional[xm.Executor]:
    """The executor of what ``experiment.add`` got (None: a generator, known when it runs)."""
    if isinstance(job, xm.JobGroup) and len(job.jobs) == 1:
        [job] = job.jobs.values()
    return job.executor if isinstance(job, (xm.Job, ArrayJob)) else None


def _job_task_count(job: Any) -> Optional[int]:
    if isinstance(job, ArrayJob):
        return len(job.args)
    return 1 if isinstance(job, (xm.Job, xm.JobGroup)) else None


class PendingLaunch(ValueObject):
    """A work unit's job, waiting to be submitted with the rest of its cluster's."""

    def __init__(
        self,
        work_unit: ClusterWorkUnit,
        executable: ClusterExecutable,
        executor: ClusterExecutor,
        tasks: List[Task],
    ):
        self.work_unit = work_unit
        self.executable = executable
        self.executor = executor
        self.tasks = tasks
        self.environment: Optional[EnvironmentPlan] = None  # its managed environment, once planned


def _path_there(info: ClusterInfo, path: str) -> str:
    """A path as the cluster sees it: ``~`` and relative paths start at the home directory."""
    if path == "~" or path.startswith("~/"):
        path = path[2:]
    return os.path.normpath(os.path.join(info.home, path))


def _job_name(title: str, experiment_id: int, work_unit_id: int) -> str:
    """``<title>_<experiment id>_<work unit id>`` in ASCII letters, digits and ``_``
    (PBS refuses other characters, Grid Engine fails on non-ASCII ones), the title
    cut so that the whole stays within JOB_NAME_MAX (PBS refuses more)."""
    suffix = f"_{experiment_id}_{work_unit_id}"
    return re.sub(r"[^A-Za-z0-9_]", "_", title)[:JOB_NAME_MAX - len(suffix)] + suffix


def prepare_cluster_launch(experiment: ClusterExperiment, cluster: ClusterConfig, scheduler: Scheduler,
                           launches: Sequence[PendingLaunch], info: ClusterInfo,
                           tree: str) -> Tuple[List[ArraySubmission], List[str]]:
    """Write into ``tree`` what goes to the staging directory (archives as links,
    job scripts, tasks files); return the submissions and log directories."""
    limit = scheduler.array_limit(info)
    xid = experiment.experiment_id
    experiment_dir = f"{info.staging}/experiments/{xid}"
    submissions: List[ArraySubmission] = []
    log_dirs = []
    upstream: Dict[int, Sequence[Any]] = {}  # work unit -> its arrays, for those that wait for it
    os.makedirs(os.path.join(tree, "archives"), exist_ok=True)
    for launch in launches:
        archive, wid = launch.executable.archive, launch.work_unit.work_unit_id
        link = os.path.join(tree, "archives", archive.name)
        if not os.path.lexists(link):
            os.symlink(archive.path, link)
        unit_dir, job_name = f"{experiment_dir}/wu{wid}", _job_name(experiment.experiment_title, xid, wid)
        image = launch.executable.image
        if launch.executable.container == "singularity" and not is_image_uri(image):
            name = deployed_image_name(image)
            os.makedirs(os.path.join(tree, "images"), exist_ok=True)
            if not os.path.lexists(os.path.join(tree, "images", name)):
                os.symlink(image, os.path.join(tree, "images", name))
            image = f"{info.staging}/images/{name}"
        log_dir = (_path_there(info, launch.executor.log_directory)
                   if launch.executor.log_directory else f"{unit_dir}/logs")
        setup = module_lines(launch.executor.modules)
        if launch.executable.container is None:
            setup = "\n".join(filter(None, [setup, environment_lines(cluster.python_command,
                                                                     launch.environment)]))
        script = render_job_script(
            header=scheduler.header(launch.executor, cluster, job_name),
            task_id=scheduler.task_id_line, restart_count=scheduler.restart_count,
            forwarded_signals=scheduler.forwarded_signals(launch.executor),
            experiment_id=xid, work_unit_id=wid, num_tasks=len(launch.tasks),
            archive=f"{info.staging}/archives/{archive.name}", tasks_file=f"{unit_dir}/tasks",
            setup=setup, exit_record=True,
            run=run_line(launch.executable, launch.executor, image, cluster.singularity_binds),
            umask=info.umask, umask_note="the umask of your own commands on the cluster"
            if info.umask else "this machine's umask: a dry run does not ask the cluster for its own",
            on_exit=scheduler.holds_dependents_line if experiment._holds_dependents(launch.work_unit) else "",
        )
        write_job_files(os.path.join(tree, "experiments", str(xid), f"wu{wid}"), script,
                        launch.tasks, cluster.env)
        after = [(d.kind, d.work_unit_id) for d in launch.work_unit._after]
        for _, up in after:  # submitted before (the launcher waited for it), or planned just now
            upstream.setdefault(up, [s for s in experiment.work_units[up].arrays if s.job_id])
        planned = plan_submissions(wid, launch.executor, f"{unit_dir}/job.sh",
                                   len(launch.tasks), log_dir, limit, upstream, after)
        upstream[wid] = planned
        submissions += planned
        log_dirs.append(log_dir)
        python = None if launch.executable.container else _python_for(info, launch.executor.modules)
        python = {k: v for k, v in python.items() if k != "markers"} if python else None  # record: the facts
        launch.work_unit._deployed(job_name, unit_dir, log_dir, f"{info.staging}/archives/{archive.name}",
                                   image, python, launch.environment.path if launch.environment else None)
    for plan in {id(launch.environment): launch.environment for launch in launches if launch.environment}.values():
        if plan.state != "ok":  # sent with the rest, unpacked by create_environments
            os.makedirs(os.path.join(tree, ENVIRONMENT_INCOMING), exist_ok=True)
            link = os.path.join(tree, ENVIRONMENT_INCOMING, f"{plan.environment.key}.tar.gz")
            if not os.path.lexists(link):
                os.symlink(plan.environment.archive, link)
    return submissions, log_dirs


def submit_to_cluster(experiment: ClusterExperiment, cluster: ClusterConfig, scheduler: Scheduler,
                      launches: Sequence[PendingLaunch], connection: Connection) -> None:
    """Deploy and submit every queued work unit of one cluster.

    One probe, one rsync with every new archive and all job files, one check
    of the staged archives and images, one submission script: four sessions
    over the launch's one connection.
    """
    import tempfile

    managed = [launch for launch in launches if wants_environment(launch.executable, cluster)]
    info = probe_cluster(connection, scheduler, _module_sets(launches), environments=bool(managed),
                         candidates=_expected_environments(cluster, scheduler, managed))
    remember_cluster_info(cluster, scheduler.name, info)
    _check_python(cluster, connection, launches, info)
    plans = plan_environments(cluster, managed, info, info._environment_states)
    unchecked = [plan.environment.key for plan in plans if plan.state == "unknown"]
    if unchecked:  # resolved now, for a key the probe could not guess: is it there already?
        states = check_environments(connection, info.environments, unchecked)
        for plan in plans:
            plan.state, plan.detail = states.get(plan.environment.key, (plan.state, plan.detail))
    for plan in plans:
        if plan.state == "ok":
            _progress(f"{cluster.name}: environment {plan.environment.short} is there "
                      f"({plan.environment.pins_text(3)}): using it")
    with tempfile.TemporaryDirectory(prefix="lxm3-deploy-") as tree:
        submissions, log_dirs = prepare_cluster_launch(experiment, cluster, scheduler, launches, info, tree)
        send_staging_tree(connection, info, tree)
        missing = [plan for plan in plans if plan.state != "ok"]
        if missing:
            create_environments(connection, cluster, info, missing, tree)
        verify_staged_files(connection, info, tree, staged_digests(launches))
    experiment_dir = f"{info.staging}/experiments/{experiment.experiment_id}"
    for launch in launches:
        wid = launch.work_unit.work_unit_id
        launch.work_unit._submitting([s for s in submissions if s.work_unit_id == wid],
                                     f"{experiment_dir}/{SUBMISSION_LOG}")
    try:  # what is about to be submitted, and where its log will be, is on disk first
        experiment.save_record()
    except OSError as e:
        raise LaunchError(f"cannot save the record of experiment {experiment.experiment_id} "
                          f"({e.strerror}: {e.filename}), so nothing was submitted; free some "
                          "space and launch again") from None
    output, interrupted = _run_submission(
        connection, submission_script(log_dirs, submissions, experiment_dir, scheduler), experiment_dir)
    error = parse_submission_output(output, submissions)
    still_running = SUBMISSION_STILL_RUNNING in output  # (after Ctrl-C) the log may yet grow
    for line in sorted({line[5:] for line in output.splitlines() if line.startswith("WARN ")}):
        if line != SUBMISSION_STILL_RUNNING[5:]:
            _progress(f"{cluster.name}: warning: {line} (the job ids are in the record all the same)")
    for launch in launches:
        launch.work_unit._submitted([s for s in submissions if s.job_id is not None
                                     and s.work_unit_id == launch.work_unit.work_unit_id],
                                    confirmed=not still_running)
    done = [s for s in submissions if s.job_id is not None]
    submitted = ("Submitted: " + ", ".join(
        f"work unit {s.work_unit_id} {s.task_range} (job {s.job_id})" for s in done) + "."
        if done else "Nothing was submitted.")
    missing = _not_submitted_summary(launches)
    try:
        experiment.save_record()
    except OSError as e:
        raise LaunchError(
            f"the jobs were submitted, but the record of experiment {experiment.experiment_id} "
            f"could not be saved ({e.strerror}: {e.filename}). {submitted} The cluster keeps "
            f"them in {connection.target}:{experiment_dir}/{SUBMISSION_LOG}: once there is "
            f"space, 'lxm3 status {experiment.experiment_id}' reads them from it") from None
    if interrupted and still_running:
        command = scheduler.submit_command
        _progress(f"{cluster.name}: submission interrupted, but a {command} call was still under way "
                  f"after {SUBMISSION_LOCK_WAIT} s. {submitted} 'lxm3 status {experiment.experiment_id}' "
                  "reads what else it submitted from the cluster's submission log.")
    elif interrupted:
        _progress(f"{cluster.name}: submission interrupted. {submitted}"
                  + (f" Not submitted: {missing}." if missing else "")
                  + f" See 'lxm3 status {experiment.experiment_id}'.")
    if interrupted:
        raise KeyboardInterrupt
    if error:
        failed = next(s for s in submissions if s.job_id is None)
        command = scheduler.submit_command
        summary = submitted.replace("Submitted:", "Already submitted:")
        raise ClusterError(f"{command} on {cluster.name} rejected work unit {failed.work_unit_id} "
                           f"({failed.task_range}): {error}\n{summary}\nNot submitted: {missing}.")


def _module_sets(launches: Sequence[PendingLaunch]) -> List[List[str]]:
    """The distinct ``modules`` of the launches that run the cluster's Python."""
    sets: List[List[str]] = []
    for launch in launches:
        modules = list(launch.executor.modules)
        if modules and launch.executable.container is None and modules not in sets:
            sets.append(modules)
    return sets


def _expected_environments(cluster: ClusterConfig, scheduler: Scheduler,
                           launches: Sequence[PendingLaunch]) -> List[str]:
    """The keys the launches' environments had for the Python this cluster reported
    last time, if this machine resolved them: the probe checks them, so that a
    launch whose environments are there sends and resolves nothing."""
    known = known_cluster_info(cluster, scheduler.name)
    if not known:
        return []
    info, keys = known[0], []
    for launch in launches:
        requirements = launch.executable.requirements
        python = _python_for(info, launch.executor.modules)
        if not python or not requirements.lines:
            continue
        try:
            target = PythonTarget(python, cluster.name)
        except ClusterError:
            continue
        found = _read_json(_environment_inputs_file(requirements, target))
        if isinstance(found, dict) and re.fullmatch(r"[0-9a-f]{64}", str(found.get("key"))):
            keys.append(found["key"])
    return sorted(set(keys))


def _check_python(cluster: ClusterConfig, connection: Connection, launches: Sequence[PendingLaunch],
                  info: ClusterInfo) -> None:
    """A Python the config names (or a managed environment needs) must be there."""
    for launch in launches:
        if launch.executable.container is not None:
            continue
        modules = launch.executor.modules
        module_error = info._module_errors.get("\n".join(modules)) if modules else None
        if module_error and wants_environment(launch.executable, cluster):
            raise ClusterError(f"{module_error}; its managed environment needs to know it: nothing was submitted")
        if module_error:
            continue  # the login node cannot load them; the job script loads them on the node, or says why
        if _python_for(info, modules) is None and (cluster.python or wants_environment(launch.executable, cluster)):
            after = f" after module load {' '.join(modules)}" if modules else ""
            raise ClusterError(
                f"{cluster.python_command} (config key python of cluster {cluster.name!r}) is not on the "
                f"PATH of {connection.target}{after}: set python to the interpreter tasks should run "
                "there (a command such as \"python3.11\", or an absolute path); nothing was submitted")
        if _python_for(info, modules) is None:
            _progress(f"{cluster.name}: warning: {cluster.python_command} is not on the PATH of "
                      f"{connection.target}; tasks that run it need the nodes to have it (config key python)")
            return


def _run_submission(connection: Connection, script: str, experiment_dir: str) -> Tuple[str, bool]:
    """Run the submission script; returns its output and whether the user interrupted it.

    Ctrl-C (or SIGTERM) leaves the script running there: it is asked to start
    no more arrays, and the submission log says what it did submit. A lost
    connection is made again and the script run again: it submits only what
    its log does not hold, after the first run has ended.
    """
    try:
        return connection.run_script(script, "submitting jobs"), False
    except KeyboardInterrupt:
        _progress("interrupted: stopping the submission and reading what was submitted "
                  "(press Ctrl-C again to leave that to 'lxm3 status')")
        return connection.run_script(submission_log_script(experiment_dir, stop=True),
                                     "reading the submission log"), True
    except ConnectionLost as e:
        _progress(f"{e}; connecting again to finish the submission (arrays already "
                  "submitted are not submitted twice)")
        connection.reconnect()
        return connection.run_script(script, "finishing the submission"), False


def _unsubmitted_tasks(num_tasks: int, arrays: Iterable[Any]) -> List[int]:
    """Tasks of a work unit that no submitted array holds (arrays: records or submissions)."""
    covered = set()
    for a in arrays:
        covered.update(a.task_ids() if isinstance(a, ArrayRecord) else range(a.first_task, a.first_task + a.count))
    return [t for t in range(num_tasks) if t not in covered]


def _not_submitted_summary(launches: Sequence[PendingLaunch]) -> str:
    parts = []
    for launch in launches:
        unit = launch.work_unit
        missing = _unsubmitted_tasks(len(launch.tasks), unit.arrays)
        if missing:
            parts.append(f"work unit {unit.work_unit_id} task{'s' if len(missing) > 1 else ''} "
                         f"{_task_ranges(missing)}")
    return ", ".join(parts)


def dry_run_cluster(experiment: ClusterExperiment, cluster: ClusterConfig, scheduler: Scheduler,
                    launches: Sequence[PendingLaunch], directory: str) -> None:
    """Write what a launch would copy into ``directory`` and print what it would run.

    Nothing is copied or submitted and the cluster is not contacted: its
    paths and array limit are those it reported at the last launch from this
    machine, if any; otherwise its home directory is written ``~`` and arrays
    are not split.
    """
    known = known_cluster_info(cluster, scheduler.name)
    if known:
        info, when = known
        note = f"paths and array limit as {cluster.name} reported them at the last launch ({when})"
        if info.scheduler:
            note += f"; its scheduler then: {info.scheduler}"
    else:
        info = ClusterInfo(staging=_path_there(ClusterInfo(staging="", home="~"), _staging_path(cluster)),
                           home="~")
        note = (f"{cluster.name} was not asked: ~ is its home directory, and arrays larger than "
                "its limit are split at launch (a launch remembers the limit for the next dry run)")
    tree = os.path.join(directory, cluster.name)
    notes = [note, _dry_run_python(cluster, info, launches, when if known else None)]
    managed = [launch for launch in launches if wants_environment(launch.executable, cluster)]
    if managed and all(_python_for(info, launch.executor.modules) for launch in managed):
        info.environments = info.environments or _path_there(info, _environments_path(cluster))
        for plan in plan_environments(cluster, managed, info, {}):
            notes.append(f"managed environment {plan.environment.short} ({plan.environment.pins_text(4)}) "
                         f"at {plan.path}: unpacked there at launch unless it is there already")
    elif managed:
        notes.append("the managed environments are resolved at launch, for the Python the cluster "
                     "reports then; the job scripts here leave them out")
    submissions, log_dirs = prepare_cluster_launch(experiment, cluster, scheduler, launches, info, tree)
    for launch in launches:
        launch.work_unit._dry_run()
    target = f"{cluster.user + '@' if cluster.user else ''}{cluster.server or 'this machine'}"
    for line in filter(None, notes):
        print(f"[dry run] {cluster.name}: {line}")
    print(f"[dry run] {cluster.name}: would copy {tree}/ to {target}:{info.staging}/ "
          "(archives that are there already are not sent)")
    for folder in ("archives", ENVIRONMENT_INCOMING):
        names = sorted(os.listdir(os.path.join(tree, folder))) if os.path.isdir(os.path.join(tree, folder)) else []
        for name in names:
            print(f"[dry run]   {folder}/{name} ({os.path.getsize(os.path.join(tree, folder, name)) // 1024} KiB)")
    print(f"[dry run] {cluster.name}: would create "
          f"{', '.join(_shell_word(d) for d in sorted(set(log_dirs)))} and run:")
    for sub in submissions:
        line = " ".join(_shell_word(a) for a in sub.argv).replace("{previous}", "<previous job>")
        print("[dry run]   " + _JOB_PLACEHOLDER.sub(lambda m: f"<job of array {m.group(1)}>", line))


def _dry_run_python(cluster: ClusterConfig, info: ClusterInfo, launches: Sequence[PendingLaunch],
                    when: Optional[str]) -> Optional[str]:
    """What a dry run knows of the cluster's Python: as the last launch's probe found it."""
    if all(launch.executable.container for launch in launches):
        return None
    if when is None or (info.python is None and not info.module_pythons):
        return (f"{cluster.python_command} (config key python) was not asked what it is: a launch asks "
                "and remembers it for the next dry run")
    facts = [f"{cluster.python_command} is {python_text(info.python)}" if info.python else
             f"{cluster.python_command} was not on the PATH"]
    for modules, python in sorted(info.module_pythons.items()):
        facts.append(f"after module load {' '.join(modules.splitlines())}, {python_text(python)}")
    return "; ".join(facts) + f" (at the last launch, {when})"


def _shell_word(word: str) -> str:
    """``word`` quoted for a shell, a ``~/`` in it still the home directory."""
    if "~/" not in word:
        return shell_quote(word)
    before, _, after = word.partition("~/")
    home = '"$HOME"/' if before else "~/"  # bash expands ~ only at the start of a word
    return (shell_quote(before) if before else "") + home + (shell_quote(after) if after else "")


def _cluster_info_file() -> str:
    return os.path.join(cache_dir(), "clusters.json")


def _cluster_info_key(cluster: ClusterConfig, scheduler: str) -> str:
    return "|".join(str(v) for v in (cluster.name, cluster.server, cluster.user, cluster.port,
                                     _staging_path(cluster), scheduler))


def remember_cluster_info(cluster: ClusterConfig, scheduler: str, info: ClusterInfo) -> None:
    """Keep what a launch's probe learnt, for dry runs that do not contact the cluster
    and for the next launch's guess of its environments' keys."""
    try:
        known = _read_json(_cluster_info_file()) or {}
        known[_cluster_info_key(cluster, scheduler)] = {"info": info._fields(), "when": _utc_now()}
        _write_json_atomic(_cluster_info_file(), known)
    except OSError:
        pass  # a convenience for dry runs: never a reason for a launch to fail


def known_cluster_info(cluster: ClusterConfig, scheduler: str) -> Optional[Tuple[ClusterInfo, str]]:
    entry = (_read_json(_cluster_info_file()) or {}).get(_cluster_info_key(cluster, scheduler))
    try:
        return ClusterInfo(**entry["info"]), entry["when"]
    except (TypeError, KeyError):  # none, or written by another version of lxm3
        return None


class ClusterWorkUnit(xm.WorkUnit):
    """A work unit of an lxm3 experiment: one job script, one or many tasks."""

    def __init__(self, experiment: ClusterExperiment, create_task, args, role, work_unit_id: int,
                 identity: str = ""):
        super().__init__(experiment, create_task, args, role, identity=identity)
        self._work_unit_id = work_unit_id
        self._executor: Optional[xm.Executor] = None
        self._executable: Optional[ClusterExecutable] = None
        self._tasks: List[Task] = []
        self.state = UnitState.ADDING  # moves only by _set_state

        self.job_directory: Optional[str] = None
        self.log_paths: List[str] = []
        self.cluster: Optional[str] = None
        self.job_name: Optional[str] = None
        self.log_directory: Optional[str] = None
        self.archive_path: Optional[str] = None
        self.image_path: Optional[str] = None  # as the node sees it
        self.python: Optional[Dict[str, Any]] = None  # the cluster's Python its tasks run
        self.environment: Optional[str] = None  # its managed environment there
        self.arrays: List[ArraySubmission] = []  # on a cluster: the submitted arrays
        self.planned: List[ArraySubmission] = []  # on a cluster: every array to submit
        self.submission_log: Optional[str] = None  # where the cluster logs the job ids
        self.exit_codes: Dict[int, int] = {}  # local tasks that ended
        self.never_run: List[int] = []  # local tasks whose dependency can no longer be met
        self.cancelled = False
        self._launch_done = threading.Event()  # add() returns before the launch has run
        self._after: List[Dependency] = []  # what it waits for (experiment.add's dependency=)
        self._placement: Optional[Tuple[str, str]] = None  # (cluster or "", scheduler or "local")
        self._planned_tasks: Optional[int] = None  # its task count, when add() can tell

    def after_ok(self) -> Dependency:
        """Start a work unit once every task of this one succeeded (see Dependency)."""
        return Dependency("ok", self)

    def after_any(self) -> Dependency:
        """Start a work unit once every task of this one ended, whatever the outcome."""
        return Dependency("any", self)

    def after_each(self) -> Dependency:
        """Start task i of a work unit (of as many tasks) once task i of this one succeeded."""
        return Dependency("each", self)

    def _check_after(self, placement: Optional[Tuple[str, str]], num_tasks: Optional[int]) -> None:
        _check_dependencies(self.experiment, f"work unit {self._work_unit_id}", self._after,
                            placement, num_tasks)

    @property
    def work_unit_id(self) -> int:
        return self._work_unit_id

    @property
    def experiment_unit_name(self) -> str:
        return f"{self.experiment_id}_{self._work_unit_id}"

    def _set_state(self, state: str) -> None:
        self.state = UnitState.move(self.state, state, f"work unit {self._work_unit_id}")

    async def _launch_job_group(self, job_group, args_view, identity) -> None:
        del args_view, identity
        _check_job_shape(job_group)  # again: generators add jobs without experiment.add
        [job] = job_group.jobs.values()
        tasks = _tasks_for(job.executable, [job.args], [job.env_vars], f"work unit {self._work_unit_id}")
        self._start_tasks(job.executable, job.executor, tasks)

    async def _launch_job_config(self, job_config, args, identity) -> None:
        del args, identity
        if not isinstance(job_config, ArrayJob):
            raise TypeError(f"lxm3 cannot launch {type(job_config).__name__}: use ArrayJob or xm.Job")
        _check_job_shape(job_config)
        tasks = job_config._tasks  # made and checked with the ArrayJob
        if tasks is None:
            tasks = _tasks_for(job_config.executable, job_config._task_args, job_config._task_env,
                               f"work unit {self._work_unit_id}")
        self._start_tasks(job_config.executable, job_config.executor, tasks)

    def _start_tasks(self, executable: ClusterExecutable, executor: xm.Executor,
                     tasks: List[Task]) -> None:
        if self._executor is not None:
            raise ValueError("lxm3 launches one job per work unit; this one already has a job")
        self._placement = self.experiment._placement(executor)
        self._planned_tasks = len(tasks)
        self._check_after(self._placement, len(tasks))  # again: a generator's job is known only now
        self._executor, self._executable, self._tasks = executor, executable, tasks
        where = f"work unit {self._work_unit_id}"
        if isinstance(executor, Local):
            check_tasks_with_common_env(tasks, self.experiment.config.local_env, where)
            self._start_locally(executable, executor, tasks)
        else:  # submitted in one batch per cluster when the experiment ends
            cluster = self.experiment.config.cluster(executor.cluster)
            check_tasks_with_common_env(tasks, cluster.env, where)
            scheduler_of(executor).header(executor, cluster, "check")  # an impossible request fails here
            self.experiment._warn_missing_dependencies(executable, cluster)
            self.cluster = cluster.name
            self._set_state(UnitState.QUEUED)
            self.experiment._queue(PendingLaunch(self, executable, executor, tasks))

    def _start_locally(self, executable: ClusterExecutable, executor: Local, tasks: List[Task]) -> None:
        experiment = self.experiment
        directory = os.path.join(experiment.local_directory, f"wu{self._work_unit_id}")
        self.job_directory, self.log_directory = directory, os.path.join(directory, "logs")
        self.archive_path = executable.archive.path
        if executable.container == "singularity" and not is_image_uri(executable.image) \
                and not os.path.isfile(executable.image):
            raise LaunchError(f"container image {executable.image} does not exist")
        script = render_job_script(
            header=LOCAL_HEADER, task_id=LOCAL_TASK_ID,
            experiment_id=experiment.experiment_id, work_unit_id=self._work_unit_id,
            num_tasks=len(tasks), archive=executable.archive.path, exit_record=True,
            tasks_file=os.path.join(directory, "tasks"),
            run=run_line(executable, executor, executable.image, experiment.config.local_singularity_binds),
        )
        script_path, _ = write_job_files(directory, script, tasks, experiment.config.local_env)
        if experiment.dry_run_directory:
            print(f"[dry run] would run {len(tasks)} task(s) locally: LXM_TASK_ID=<0..{len(tasks) - 1}> "
                  f"bash {shell_quote(script_path)}")
            self._set_state(UnitState.DRY_RUN)
            return
        runner = experiment.local_runner(executor)
        # Without a container, tasks use the launching interpreter, as users expect locally.
        env = {} if executable.container else {"LXM_PYTHON": sys.executable}
        self.log_paths = runner.submit(script_path, self._work_unit_id, len(tasks),
                                       self.log_directory, env, _requirements_gpus(executor.requirements),
                                       after=[(d.kind, d.work_unit_id) for d in self._after])
        self._set_state(UnitState.RUNNING)
        experiment.save_record_soon()
        _progress(f"work unit {self._work_unit_id}: {len(tasks)} task(s) started locally; "
                  f"logs in {self.log_directory}")

    def _deployed(self, job_name: str, job_directory: str, log_directory: str, archive: str,
                  image: Optional[str], python: Optional[Dict[str, Any]] = None,
                  environment: Optional[str] = None) -> None:
        self.job_name, self.job_directory, self.log_directory = job_name, job_directory, log_directory
        self.archive_path, self.image_path = archive, image
        self.python, self.environment = python, environment

    def _submitting(self, planned: List[ArraySubmission], submission_log: str) -> None:
        """About to submit: until the outcome is known, the cluster's log is the truth."""
        self.planned, self.submission_log = planned, submission_log
        self._set_state(UnitState.SUBMITTING)

    def _submitted(self, arrays: List[ArraySubmission], confirmed: bool = True) -> None:
        """``confirmed``: the arrays are all there will be (else the log is read again later)."""
        self.arrays = arrays
        self._set_state(unit_submission_state(len(self._tasks), arrays) if confirmed else UnitState.SUBMITTING)
        if arrays:
            jobs = ", ".join(f"{s.job_id} ({s.task_range})" for s in arrays)
            _progress(f"work unit {self._work_unit_id}: submitted to {self.cluster} as job {jobs}; "
                      f"logs in {self.log_directory}")

    def _dry_run(self) -> None:
        self._set_state(UnitState.DRY_RUN)

    def _not_submitted(self) -> None:
        """Queued, but the launch ended before its turn (interrupted, or a failure)."""
        if self.state == UnitState.QUEUED:
            self._set_state(UnitState.NOT_SUBMITTED)

    def _local_tasks_ended(self, stopped: bool) -> None:
        """Its local tasks ended (``stopped``: by lxm3): completed, failed or stopped
        (also: tasks that never ran, their dependency not met, and none failed)."""
        if self.state == UnitState.RUNNING:
            ended_well = len(self.exit_codes) == len(self._tasks) and not any(self.exit_codes.values())
            held_back = self.never_run and not any(self.exit_codes.values())
            self._set_state(UnitState.COMPLETED if ended_well else
                            UnitState.STOPPED if stopped or held_back else UnitState.FAILED)

    @property
    def job_ids(self) -> List[str]:
        return [s.job_id for s in self.arrays if s.job_id]

    def to_record(self) -> WorkUnitRecord:
        """What ``lxm3 status``/``logs``/``cancel`` need to find this unit again."""
        executor = self._executor
        record = WorkUnitRecord(
            id=self._work_unit_id, state=self.state,
            executor=type(executor).__name__ if executor else None,
            scheduler=executor.scheduler if isinstance(executor, ClusterExecutor) else "local",
            cluster=self.cluster, num_tasks=len(self._tasks), tasks=[_task_record(t) for t in self._tasks],
            job_name=self.job_name, job_directory=self.job_directory,
            script=os.path.join(self.job_directory, "job.sh") if self.job_directory else None,
            log_directory=self.log_directory, archive=self.archive_path,
            image=self.image_path or (self._executable.image if self._executable else None),
            arrays=[ArrayRecord(s.first_task, s.count, job_id=s.job_id) for s in self.arrays],
            planned=[ArrayRecord(s.first_task, s.count, key=s.key) for s in self.planned],
            submission_log=self.submission_log, cancelled=self.cancelled,
            python=self.python, environment=self.environment,
            submit_argv=(scheduler_of(executor).options_of(self.planned[0].argv)
                         if self.planned and isinstance(executor, ClusterExecutor) else None),
            dependencies=[d.to_record() for d in self._after], never_run=sorted(self.never_run),
        )
        if isinstance(executor, Local):
            record.log_paths, record.exit_codes = list(self.log_paths), dict(self.exit_codes)
            record.gpus_per_task = _requirements_gpus(executor.requirements)
            record.max_parallel_tasks = executor.max_parallel_tasks
        elif isinstance(executor, ClusterExecutor):
            cluster = self.experiment.config.cluster(self.cluster)
            record.connection = {"server": cluster.server, "user": cluster.user,
                                 "port": cluster.port, "ssh_private_key": cluster.ssh_private_key,
                                 "ssh_connect_timeout": cluster.ssh_connect_timeout,
                                 "ssh_keepalive_interval": cluster.ssh_keepalive_interval,
                                 "ssh_config": cluster.ssh_config,
                                 "proxycommand": cluster.proxycommand}
            bin_dir = cluster.scheduler_bin(executor.scheduler)
            if bin_dir:
                record.connection["scheduler_bin"] = bin_dir
            scheduler = scheduler_of(executor)
            record.custom_output = scheduler.user_sets(executor, scheduler.output_option)
        return record

    def _wait_for_launch(self) -> None:
        """Let a launch that add() started finish, unless we are on its own loop."""
        import asyncio

        try:
            on_loop = asyncio.get_running_loop() is self.experiment._event_loop
        except RuntimeError:
            on_loop = False
        if not on_loop:
            self._launch_done.wait()

    def get_status(self) -> WorkUnitStatus:
        """The state of each task (asks the scheduler, once)."""
        self._wait_for_launch()
        if self.state == UnitState.QUEUED:  # submitted when the experiment block ends
            return WorkUnitStatus([TaskStatus(t, TaskState.PENDING, detail="not submitted yet")
                                   for t in range(len(self._tasks))])
        if isinstance(self._executor, Local):
            codes = {r.task_id: r.returncode for r in self.experiment.local_results(self._work_unit_id)}
            never = set(self.experiment.local_never_run(self._work_unit_id))
            return WorkUnitStatus([
                TaskStatus(t, TaskState.CANCELLED, detail=NEVER_RUN_DETAIL) if t in never else
                TaskStatus(t, TaskState.RUNNING if t not in codes else
                           TaskState.COMPLETED if codes[t] == 0 else TaskState.FAILED,
                           codes.get(t)) for t in range(len(self._tasks))])
        return query_status(self.experiment.record(), [self._work_unit_id])[self._work_unit_id]

    def stop(self, *args, **kwargs) -> None:
        """Stop the unit's tasks: terminate local ones, cancel submitted jobs."""
        del args, kwargs
        if isinstance(self._executor, Local):
            self.experiment._stop_local()
        elif self.arrays:
            result = cancel(self.experiment.record(), [self._work_unit_id])
            self.cancelled = self.cancelled or bool(result.cancelled)

    @property
    def launched_jobs(self) -> List[xm.LaunchedJob]:
        return _launched_jobs(self.to_record())

    async def _wait_until_complete(self):
        if self.state == UnitState.QUEUED:  # waiting for it means submitting now what is queued
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, self.experiment.submit_pending)
        await _poll_until_done(self.get_status, self)
        return self


def _task_record(task: Task) -> Dict[str, Any]:
    """A task as recorded: ShellSafeArg arguments as written, with their indices."""
    record: Dict[str, Any] = {"args": task.args, "env": task.env}
    shell_words = [i for i, arg in enumerate(task.args) if isinstance(arg, ShellWords)]
    if shell_words:
        record["shell_args"] = shell_words  # expanded by the shell on the node
    return record


def _launched_jobs(unit: WorkUnitRecord) -> List[xm.LaunchedJob]:
    where = unit.cluster or "local"
    return [xm.LaunchedJob(name=unit.job_name or str(unit.id), address=f"{where}:{a.job_id}",
                           logs=unit.log_directory) for a in unit.arrays]


async def _poll_until_done(get_status: Callable[[], WorkUnitStatus], unit: Any) -> None:
    """Ask for the status gently (every $LXM_POLL_INTERVAL s at first, default 10,
    then less often while nothing changes: poll_statuses) until no task is active."""
    import asyncio

    interval = float(os.environ.get("LXM_POLL_INTERVAL", "10"))
    loop = asyncio.get_running_loop()
    polls = poll_statuses(lambda: {0: get_status()}, interval, minimum=0.0)
    while True:  # each query on a thread, the waits here: the event loop goes on meanwhile
        statuses, wait = await loop.run_in_executor(None, next, polls)
        if wait is None:
            break
        await asyncio.sleep(wait)
    status = statuses[0]
    if status.is_failed:
        raise xm.ExperimentUnitFailedError(status.message, work_unit=unit)
    if not status.is_completed:
        raise xm.ExperimentUnitNotCompletedError(status.message, work_unit=unit)


def _check_dependencies(experiment: ClusterExperiment, me: str, after: Sequence[Dependency],
                        placement: Optional[Tuple[str, str]], num_tasks: Optional[int]) -> None:
    """Refuse what cannot wait for what: other experiment, other cluster, other size."""
    for dep in after:
        up, name = dep._unit, f"work unit {dep.work_unit_id}"
        if up.experiment is not experiment:
            raise ValueError(f"{me} cannot wait for {name} of experiment {up.experiment.experiment_id}: "
                             "dependencies link work units of one experiment")
        if placement and up._placement and placement != up._placement:
            raise ValueError(
                f"{me} ({_placement_text(placement)}) cannot wait for {name} "
                f"({_placement_text(up._placement)}): dependencies link work units of one cluster "
                "and scheduler, or local ones; run both in one place, or wait for the first "
                "in the launcher (await it) before adding the second")
        if dep.kind == "each" and num_tasks is not None and up._planned_tasks is not None \
                and num_tasks != up._planned_tasks:
            raise ValueError(f"{me} has {_counted(num_tasks, 'task')} and {name} "
                             f"{up._planned_tasks}: after_each() pairs task i with task i, so "
                             "both need as many tasks (use after_ok() to wait for all of them)")
        # A scheduler that holds a job back after a failure only if the failing job
        # says so (holds_dependents_line) holds every job that waits for it, or none.
        scheduler = scheduler_named(placement[1]) if placement and placement[1] != "local" else None
        if scheduler is None or not scheduler.holds_dependents_line:
            continue
        others = {d.kind == "any" for wu in experiment._work_units for d in wu._after if d._unit is up}
        if (dep.kind != "any") in others:
            raise ValueError(
                f"{me} cannot wait for {name} with {Dependency.KINDS[dep.kind]}(), as another work unit "
                f"waits for it with {'after_any' if dep.kind != 'any' else 'after_ok/after_each'}(): on "
                f"{scheduler.title} a failed task holds back every job that waits for it, or none; use "
                "one kind of dependency on a work unit")
        if dep.kind != "any" and up.state not in (UnitState.ADDING, UnitState.QUEUED):
            raise ValueError(
                f"{me} cannot wait for the success of {name}, which was already submitted: "
                f"{scheduler.title} holds a job back after a failure only if the failing job says "
                "so, which lxm3 arranges when both are submitted together; do not wait for "
                f"{name} before adding {me}, or use after_any()")



def _placement_text(placement: Tuple[str, str]) -> str:
    cluster, scheduler = placement
    return "local" if scheduler == "local" else f"on {cluster}, {scheduler_named(scheduler).title}"


class LoadedWorkUnit:
    """A work unit of a past launch, with the xm unit methods that still make sense."""

    def __init__(self, experiment: LoadedExperiment, record: WorkUnitRecord):
        self.experiment, self.record = experiment, record

    @property
    def work_unit_id(self) -> int:
        return self.record.id

    @property
    def experiment_id(self) -> int:
        return self.experiment.experiment_id

    @property
    def launched_jobs(self) -> List[xm.LaunchedJob]:
        return _launched_jobs(self.record)

    def get_status(self) -> WorkUnitStatus:
        reconcile_submissions(self.experiment.record)
        return query_status(self.experiment.record, [self.work_unit_id])[self.work_unit_id]

    def stop(self) -> None:
        cancel(self.experiment.record, [self.work_unit_id])

    def rerun(self, failed: Optional[bool] = None, tasks: Optional[Sequence[int]] = None) -> List[Any]:
        """Run tasks of this work unit again, as ``lxm3 rerun`` does:
        ``rerun(failed=True)`` (the default) those whose latest attempt failed, was
        cancelled or was lost; ``rerun(tasks=[3, 7])`` those. A cluster unit's are
        submitted: returns the arrays (ArrayRecord: ``job_id``, ``task_ids()``,
        ``attempt``). A local unit's run here, in the foreground: returns how each
        ended (TaskResult: ``task_id``, ``returncode``, ``log_path``). Empty if
        nothing failed."""
        if tasks is not None and failed:
            raise ValueError("rerun takes failed=True or tasks=[...], not both")
        if tasks is None and failed is False:
            raise ValueError("say what to rerun: failed=True, or tasks=[3, 7]")
        return rerun_tasks(self.experiment.record, [self.work_unit_id],
                           None if tasks is None else [int(t) for t in tasks]).get(self.work_unit_id, [])

    async def wait_until_complete(self) -> LoadedWorkUnit:
        await _poll_until_done(self.get_status, self)
        return self


class LoadedExperiment:
    """A past launch, read back from its record: ``xm_cluster.get_experiment(id)``."""

    def __init__(self, record: ExperimentRecord):
        self.record = record

    @property
    def experiment_id(self) -> int:
        return self.record.experiment_id

    @property
    def experiment_title(self) -> str:
        return self.record.title

    @property
    def work_units(self) -> Dict[int, LoadedWorkUnit]:
        return {u.id: LoadedWorkUnit(self, u) for u in self.record.work_units}


def get_experiment(experiment_id: Union[int, str]) -> LoadedExperiment:
    """Load a past launch by id (``lxm3 list`` shows them).

    Returns a LoadedExperiment read from the record in
    ``$XDG_STATE_HOME/lxm3/experiments/`` (``~/.local/state``): its
    ``experiment_id``, ``experiment_title`` and ``work_units`` (``{id:
    unit}``), whose units have ``get_status()``, ``stop()``, ``rerun()``,
    ``launched_jobs`` and ``await wait_until_complete()``.

    Args:
      experiment_id: the id, an int or a string of digits. Another string, or
        an id without a record on this machine, is a LaunchError.
    """
    return LoadedExperiment(load_record(experiment_id))


class ClusterExperiment(xm.Experiment):
    """An experiment launched by lxm3; its record is kept in ``lxm3 list``."""

    _async_packager = xm.async_packager.AsyncPackager(_package_all)

    def __init__(self, experiment_title: str, config: Optional[Config] = None,
                 project: Optional[str] = None, dry_run_directory: Optional[str] = None):
        super().__init__()
        self._title = experiment_title
        self.config = config if config is not None else load_config()
        # As upstream lxm3: $LXM_PROJECT, else the project given here, else the config's.
        self.project = os.environ.get("LXM_PROJECT") or project or self.config.project
        self.dry_run_directory = dry_run_directory
        self._id = int(time.time() * 1000) if self.dry_run_directory else claim_experiment_id()
        self._work_units: List[ClusterWorkUnit] = []
        self._runner: Optional[LocalRunner] = None
        self._pending: List[PendingLaunch] = []
        self._connections: Dict[str, Connection] = {}
        self._warned: Set[Tuple[int, str]] = set()  # (executable, cluster) told of missing dependencies
        self._adding = threading.local()  # the dependency= of the add() call under way, for its unit
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._last_save = 0.0
        self._save_timer: Optional[threading.Timer] = None
        launcher = xm.utils.find_launch_script_path()
        # git is filled in when it has answered (it runs while the launch goes on)
        self._record = ExperimentRecord(
            experiment_id=self._id, title=experiment_title, project=self.project, created=_utc_now(),
            launcher=launcher, argv=sys.argv[1:], cwd=os.getcwd(), config=self.config.path)
        self._git = _in_background(git_state, os.path.dirname(launcher) if launcher else os.getcwd())
        self.save_record()

    @property
    def experiment_id(self) -> int:
        return self._id

    @property
    def experiment_title(self) -> str:
        return self._title

    @property
    def work_unit_count(self) -> int:
        return len(self._work_units)

    @property
    def work_units(self) -> Dict[int, ClusterWorkUnit]:
        return {wu.work_unit_id: wu for wu in self._work_units}

    @property
    def local_directory(self) -> str:
        root = self.config.local_staging or data_dir()
        if self.dry_run_directory:
            root = os.path.join(self.dry_run_directory, "local")
        return os.path.join(root, "experiments", str(self._id))

    def record(self, final: bool = False) -> ExperimentRecord:
        """What was launched, as ``lxm3 list``/``status`` read it back.

        ``final``: wait for git's answer rather than record it later.
        """
        git = self._git(wait=final)
        with self._lock:
            if git is not None:
                self._record.git = git
            units = [wu.to_record() for wu in self._work_units]
            return ExperimentRecord(**{**vars(self._record), "work_units": units})

    def save_record(self, status: Optional[str] = None, error: Optional[str] = None) -> None:
        if self.dry_run_directory:
            return  # a dry run leaves no record: nothing was launched
        if status:
            with self._lock:
                self._record.status, self._record.error = status, error
        with self._save_lock:  # the state is read under the lock: the last write is the newest
            if status and self._save_timer is not None:
                self._save_timer.cancel()  # the outcome is being saved: nothing left for it
                self._save_timer = None
            save_record(self.record(final=bool(status)))

    def save_record_soon(self) -> None:
        """Save now, or RECORD_SAVE_INTERVAL after the last such save.

        A local work unit saves the record as it starts, so that ``status``
        sees it running; a save per unit of a thousand would be quadratic.
        The first unit's save is immediate.
        """
        with self._save_lock:
            if self._save_timer is not None:
                return  # a save is already on its way
            wait = self._last_save + RECORD_SAVE_INTERVAL - time.monotonic()
            if wait > 0:
                self._save_timer = threading.Timer(wait, self._save_from_timer)
                self._save_timer.daemon = True
                self._save_timer.start()
                return
            self._last_save = time.monotonic()
        self.save_record()

    def _save_from_timer(self) -> None:
        with self._save_lock:
            self._save_timer = None
            self._last_save = time.monotonic()
        self.save_record()

    def local_results(self, work_unit_id: int) -> List[TaskResult]:
        with self._lock:
            runner = self._runner
        return [r for r in (runner.results if runner else []) if r.work_unit_id == work_unit_id]

    def local_never_run(self, work_unit_id: int) -> List[int]:
        """Local tasks dropped because what they waited for can no longer happen."""
        with self._lock:
            runner = self._runner
        return [t for w, t in (runner.never_run if runner else []) if w == work_unit_id]

    def local_runner(self, executor: Local) -> LocalRunner:
        with self._lock:
            if self._runner is None:
                self._runner = LocalRunner(executor.max_parallel_tasks)
            return self._runner

    def add(self, job, args=None, *, role=xm.WorkUnitRole(), identity: str = "",  # noqa: B008
            dependency=None):
        """As ``xm.Experiment.add``; a job lxm3 cannot launch is refused here, at the call.

        ``dependency`` (an lxm3 extension): what the new work unit waits for,
        ``wu.after_ok()``, ``wu.after_any()``, ``wu.after_each()`` or a list of
        them (see Dependency). The awaitable returned has those methods too, so
        a launcher need not await it to chain work units.
        """
        _check_job_shape(job)
        if isinstance(job, xm.Job):  # its task is checked again as it starts: cheap, one task
            overrides = args if isinstance(args, Mapping) else {}
            _tasks_for(job.executable, [xm.merge_args(job.args, overrides.get("args") or {})],
                       [{**job.env_vars, **(overrides.get("env_vars") or {})}],
                       f"work unit {self.work_unit_count + 1}")
        after = _dependencies(dependency)
        executor = _job_executor(job)
        placement = self._placement(executor) if executor is not None else None
        _check_dependencies(self, f"work unit {self.work_unit_count + 1}", after, placement,
                            _job_task_count(job))
        self._adding.unit = (after, placement, _job_task_count(job))
        try:
            future = super().add(job, args, role=role, identity=identity)
        finally:
            self._adding.unit = None
        unit = self._work_units[-1]  # created synchronously by the call above
        self._event_loop.call_soon_threadsafe(future.add_done_callback,
                                              lambda _: unit._launch_done.set())
        future.work_unit_id = unit.work_unit_id  # so that it chains without being awaited
        future.after_ok, future.after_any, future.after_each = unit.after_ok, unit.after_any, unit.after_each
        return future

    def _create_experiment_unit(self, args, role, identity: str = ""):
        if not isinstance(role, xm.WorkUnitRole):
            raise ValueError(
                "lxm3 supports work units only (experiment.add(job)); auxiliary units are not supported"
            )
        after, placement, num_tasks = getattr(self._adding, "unit", None) or ([], None, None)
        with self._lock:
            unit = ClusterWorkUnit(self, self._create_task, args, role,
                                   self._work_unit_id_predictor.reserve_id(), identity=identity)
            unit._after, unit._placement, unit._planned_tasks = after, placement, num_tasks
            self._work_units.append(unit)
        return _ready(unit)

    def _placement(self, executor: xm.Executor) -> Tuple[str, str]:
        """Where a work unit runs, for dependencies: (cluster name, scheduler), or ("", "local")."""
        if isinstance(executor, ClusterExecutor):
            return self.config.cluster(executor.cluster).name, executor.scheduler
        return "", "local"

    def _holds_dependents(self, unit: ClusterWorkUnit) -> bool:
        """Whether a work unit waits for ``unit``'s success (after_ok, after_each)."""
        return any(d._unit is unit and d.kind != "any" for wu in self._work_units for d in wu._after)

    def _queue(self, launch: PendingLaunch) -> None:
        with self._lock:
            self._pending.append(launch)

    def _warn_missing_dependencies(self, executable: ClusterExecutable, cluster: ClusterConfig) -> None:
        """warn_missing_dependencies, once per executable and cluster."""
        with self._lock:
            if (id(executable), cluster.name) in self._warned:
                return
            self._warned.add((id(executable), cluster.name))
        warn_missing_dependencies(executable, cluster)

    def submit_pending(self) -> None:
        """Deploy and submit the queued cluster work units, one batch per cluster."""
        with self._submit_lock:
            self._submit_queued()

    def _submit_queued(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        groups: Dict[Tuple[str, str], List[PendingLaunch]] = {}
        for launch in pending:
            groups.setdefault((launch.work_unit.cluster, launch.executor.scheduler), []).append(launch)
        try:
            for (name, scheduler_name), launches in groups.items():
                cluster, scheduler = self.config.cluster(name), scheduler_named(scheduler_name)
                if self.dry_run_directory:
                    dry_run_cluster(self, cluster, scheduler, launches, self.dry_run_directory)
                    continue
                if name not in self._connections:
                    self._connections[name] = Connection(cluster)
                submit_to_cluster(self, cluster, scheduler, launches, self._connections[name])
        finally:
            for launch in pending:
                launch.work_unit._not_submitted()

    def _close_connections(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def _abandon_pending(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for launch in pending:
            launch.work_unit._not_submitted()
        if pending:
            why = "the launch was interrupted" if isinstance(error, KeyboardInterrupt) else "the launcher failed"
            _progress(f"{len(pending)} work unit(s) for clusters were not submitted because {why}")

    def _conclude(self, error: Optional[BaseException]) -> None:
        """End the launch: submit what is queued, wait for local tasks, record the outcome.

        After a failure in the launcher nothing more is submitted and local
        tasks are stopped. A KeyboardInterrupt leaves with ``lxm3_outcome``:
        what had been launched when it came, for the message the user sees.
        """
        submitting = False
        try:
            if error is None:
                submitting = True
                self.submit_pending()
                submitting = False
                self._finish_local()
            else:
                self._abandon_pending(error)
                self._stop_local()
        except BaseException as e:
            error = e
            self._stop_local()
            raise
        finally:
            self._close_connections()
            try:
                self.save_record(*self._outcome(error))
            except OSError as e:
                message = (f"could not save the record of experiment {self._id} "
                           f"({e.strerror}: {e.filename})")
                if error is None:
                    raise LaunchError(message) from None
                _progress(message)
            if isinstance(error, KeyboardInterrupt):
                error.lxm3_outcome = self._interrupted_outcome(submitting)

    def _interrupted_outcome(self, submitting: bool) -> str:
        """What an interruption left (nothing launched, jobs submitted, local tasks
        stopped), worded to follow "lxm3: interrupted"."""
        submitted = ", ".join(str(wu.work_unit_id) for wu in self._work_units if wu.arrays)
        parts = []
        unread = any(wu.state == UnitState.SUBMITTING for wu in self._work_units)
        if submitting:
            parts.append(" while submitting to clusters: " + (
                "which arrays were submitted is in the cluster's submission log, which "
                "'lxm3 status' reads" if unread else
                f"work unit(s) {submitted} were submitted, in whole or in part" if submitted
                else "nothing was submitted"))
        elif submitted:
            parts.append(f"; work unit(s) {submitted} were submitted to clusters and keep running "
                         f"(lxm3 cancel {self._id} stops them)")
        if self._runner is not None:
            parts.append("; local tasks were stopped")
        if not parts:
            return " before anything was launched: nothing was submitted or run"
        return "".join(parts) + ("" if self.dry_run_directory else f" (lxm3 status {self._id})")

    def _outcome(self, error: Optional[BaseException]) -> Tuple[str, Optional[str]]:
        units = self._work_units
        if error is None:
            on_clusters = any(wu.cluster for wu in units)
            return (ExperimentStatus.LAUNCHED if on_clusters else ExperimentStatus.COMPLETED), None
        if isinstance(error, KeyboardInterrupt):
            jobs = [j for wu in units for j in wu.job_ids]
            return ExperimentStatus.INTERRUPTED, "interrupted by the user" + (
                f"; jobs submitted before that: {', '.join(jobs)}" if jobs else "")
        if isinstance(error, TaskFailedError):
            return ExperimentStatus.FAILED, str(error)
        submitted = any(wu.arrays for wu in units)
        return (ExperimentStatus.PARTIAL if submitted else ExperimentStatus.FAILED), f"{type(error).__name__}: {error}"

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            super().__exit__(exc_type, exc_value, traceback)
        except BaseException as error:
            self._conclude(error)
            raise
        self._conclude(_failure(exc_value))

    async def __aexit__(self, exc_type, exc_value, traceback):
        import asyncio

        conclude = asyncio.get_running_loop().run_in_executor
        try:
            try:
                await super().__aexit__(exc_type, exc_value, traceback)
            except BaseException as error:
                await conclude(None, self._conclude, error)
                raise
            await conclude(None, self._conclude, _failure(exc_value))
        except (KeyboardInterrupt, asyncio.CancelledError):  # the deployment's thread goes on unless stopped
            for connection in list(self._connections.values()):
                connection.interrupt()
            raise

    def _stop_local(self) -> None:
        """Terminate local tasks (Ctrl-C, or the launcher failed) and record how they ended."""
        if self._runner is not None:
            self._runner.stop()
            self._note_local_results(self._runner.results, stopped=True)

    def _note_local_results(self, results: Sequence[TaskResult], stopped: bool = False) -> None:
        units = self.work_units
        for r in results:
            units[r.work_unit_id].exit_codes[r.task_id] = r.returncode
        for work_unit_id, task_id in self._runner.never_run if self._runner else []:
            if task_id not in units[work_unit_id].never_run:
                units[work_unit_id].never_run.append(task_id)
        for wu in units.values():
            wu._local_tasks_ended(stopped)

    def _finish_local(self) -> None:
        """Wait for local tasks; a failed task makes the launch fail."""
        if self._runner is None:
            return
        results = self._runner.wait()
        self._note_local_results(results)
        failed = [r for r in results if r.returncode != 0]
        if failed:
            lines = [f"  work unit {r.work_unit_id} task {r.task_id}: exit code {r.returncode} "
                     f"(log: {r.log_path})" for r in failed]
            for wu in self._work_units:
                if wu.never_run:
                    lines.append(f"  work unit {wu.work_unit_id} task{'s' if len(wu.never_run) > 1 else ''} "
                                 f"{_task_ranges(wu.never_run)}: never ran (what they waited for failed)")
            raise TaskFailedError(f"{len(failed)} of {len(results)} task(s) failed:\n" + "\n".join(lines))
        _progress(f"all {len(results)} task(s) of experiment {self._id} succeeded")


def _failure(error: Optional[BaseException]) -> Optional[BaseException]:
    """The error that ended a ``with`` block; ``sys.exit(0)`` inside it is a normal end."""
    if isinstance(error, SystemExit) and error.code in (0, None):
        return None
    return error


def create_experiment(experiment_title: Optional[str] = None, project: Optional[str] = None,
                      config: Optional[Config] = None) -> ClusterExperiment:
    """Create an experiment; use it as ``with create_experiment(...) as experiment:``.

    ``experiment_title`` is optional, as in XManager: without one, the
    launcher's file name (``launcher`` for ``launcher.py``) is the title.
    ``project`` (upstream lxm3's argument, in its place) is kept in the record
    instead of the config's; ``$LXM_PROJECT`` still wins, as upstream.

    In the block, ``experiment.package([...])`` builds executables and
    ``experiment.add(job)`` adds work units (ids from 1). Local tasks start as
    they are added; cluster jobs are submitted together when the block ends,
    one batch per cluster, and the block then waits for local tasks. The
    experiment id is the time in milliseconds (as in lxm3 0.4.2), unique on
    this machine; its record is saved at once, for ``lxm3 list``/``status``/
    ``logs``/``cancel`` and ``get_experiment``. (``lxm3 launch --dry-run``
    writes the job scripts and keeps no record.)

    Args:
      experiment_title: the title, in every job name
        (``<title>_<id>_<work unit id>``, non-word characters as ``_``).
        Default None: the launcher's file name without ``.py``
        (``"experiment"`` when there is no launcher file).
      project: a project name kept in the record; not part of any path.
        ``$LXM_PROJECT`` wins over it, and it over the config's ``project``.
        Default None. A non-string is a TypeError (a Config goes in
        ``config=``).
      config: the ``Config`` to use, e.g. ``Config.from_file(path)``. Default
        None: the config file in force (``--lxm_config``, ``$LXM_CONFIG``,
        ``./lxm.toml``, ``~/.config/lxm3/config.toml``), or none.
    """
    if project is not None and not isinstance(project, str):
        raise TypeError(f"create_experiment(project=...) is the project's name, not a "
                        f"{type(project).__name__}; pass a Config as config=...")
    if experiment_title is None:
        launcher = xm.utils.find_launch_script_path()
        experiment_title = os.path.splitext(os.path.basename(launcher))[0] if launcher else "experiment"
    launch = current_launch()
    launch._experiments_created += 1
    experiment = ClusterExperiment(experiment_title, config=config, project=project,
                                   dry_run_directory=launch.dry_run_directory)
    if not experiment.dry_run_directory:
        launch._experiment_ids.append(experiment.experiment_id)
    return experiment


def get_current_experiment() -> ClusterExperiment:
    """The experiment whose ``with`` block is running (upstream lxm3's helper).

    Takes no arguments. Outside such a block (and the job generators it
    runs), a RuntimeError.
    """
    try:
        return xm.core._current_experiment.get()
    except LookupError:
        raise RuntimeError(
            "get_current_experiment() is called outside an experiment: call it inside "
            "'with xm_cluster.create_experiment(...) as experiment:' (or a job generator "
            "that experiment runs)"
        ) from None


# ---------------------------------------------------------------------------
# Status, logs and cancel, from the records
# ---------------------------------------------------------------------------


class TaskStatus(ValueObject):
    def __init__(
        self,
        task: int,
        state: str,  # a TaskState: its latest attempt's
        exit_code: Optional[int] = None,
        job: Optional[str] = None,  # the scheduler's name for it, e.g. "16_3"
        detail: str = "",
        attempts: int = 1,  # how many times lxm3 submitted or ran it (lxm3 rerun)
    ):
        self.task = task
        self.state = state
        self.exit_code = exit_code
        self.job = job
        self.detail = detail
        self.attempts = attempts


class WorkUnitStatus(xm.ExperimentUnitStatus):
    """The states of a work unit's tasks, as ``xm.ExperimentUnitStatus``."""

    def __init__(self, tasks: List[TaskStatus]):
        self.tasks = tasks

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for t in self.tasks:
            counts[t.state] = counts.get(t.state, 0) + 1
        return counts

    @property
    def is_active(self) -> bool:
        return any(t.state in TaskState.ACTIVE for t in self.tasks)

    @property
    def is_completed(self) -> bool:
        return bool(self.tasks) and all(t.state == TaskState.COMPLETED for t in self.tasks)

    @property
    def is_failed(self) -> bool:
        """A task failed, or ended in a way nobody can tell; cancelled alone is not failed."""
        return not self.is_active and any(t.state in (TaskState.FAILED, TaskState.UNKNOWN) for t in self.tasks)

    @property
    def message(self) -> str:
        counts = self.counts()
        parts = [f"{counts[s]} {s}" for s in TaskState.ORDER if s in counts]
        return f"{len(self.tasks)} task(s): " + ", ".join(parts)


def _unit_connection(unit: WorkUnitRecord) -> Connection:
    info = unit.connection or {}
    return Connection(ClusterConfig(name=unit.cluster, server=info.get("server"), user=info.get("user"),
                                    port=info.get("port"), ssh_private_key=info.get("ssh_private_key"),
                                    ssh_connect_timeout=info.get("ssh_connect_timeout"),
                                    ssh_keepalive_interval=info.get("ssh_keepalive_interval"),
                                    ssh_config=info.get("ssh_config"),
                                    proxycommand=info.get("proxycommand"),
                                    raw={unit.scheduler: {"bin_dir": info.get("scheduler_bin")}}))


def task_log_path(unit: WorkUnitRecord, task: int) -> Optional[str]:
    """Where task ``task`` of a recorded work unit writes its output."""
    if unit.is_local:
        return unit.log_paths[task] if task < len(unit.log_paths) else None
    if unit.custom_output:
        return None
    for array in reversed(unit.arrays):  # its latest attempt's (lxm3 rerun appends arrays)
        if task in array.task_ids():
            name = scheduler_named(unit.scheduler).task_log_name(unit.job_name, array.job_id,
                                                                 task - array.first_task)
            return f"{unit.log_directory}/{name}"
    return None


def _status_script(units: Sequence[WorkUnitRecord], scheduler: Scheduler, tail_lines: int = 0) -> str:
    """One round trip: the queue, accounting (if any) and the tasks' exit records;
    with ``tail_lines``, also the end of each failed task's log (_FAILED_LOGS_AWK)."""
    lines = scheduler.status_lines([job_id for u in units for job_id in u.job_ids])

    def find_logs(unit: WorkUnitRecord) -> str:
        names = " -o ".join(f"-name {shell_quote(p)}" for p in scheduler.log_name_patterns(unit.job_name,
                                                                                           unit.job_ids))
        return f"find {shell_quote(unit.log_directory or '')} -maxdepth 1 -type f \\( {names or '-false'} \\)"

    for u in units:  # each unit's own section: task numbers repeat across units
        lines.append(f"echo '== exits {u.id}'")
        if u.log_directory and not u.custom_output:  # "==> path <==" before each: attempts have their own
            lines.append(f"{find_logs(u)} -exec tail -v -n 1 {{}} + 2>/dev/null")
    for u in units:
        if tail_lines > 0 and u.log_directory and not u.custom_output:
            lines.append(f"echo '== failed logs {u.id}'")
            # + 2: the exit record and the empty line before it
            lines.append(f"{find_logs(u)} -exec tail -v -n {int(tail_lines) + 2} {{}} + "
                         f"2>/dev/null | awk -v keep={int(tail_lines)} {shell_quote(_FAILED_LOGS_AWK)}")
    return "\n".join(lines) + "\ntrue\n"


# Reads ``tail -v`` of many logs; prints ``task I LOG`` and the last ``keep`` lines
# before the exit record, each as ``| line`` (never a ``== `` section line), of
# each log that ends with an exit record of a non-zero status.
_FAILED_LOGS_AWK = """
function flush(  f, i, first, last) {
  if (n > 0 && buf[n] == "") n--
  if (n > 0 && split(buf[n], f, " ") >= 5 && f[1] == "lxm3-exit:" && f[2] == "task" && f[4] == "status" \\
      && f[5] != "0") {
    print "task " f[3] " " name
    last = n - 1
    if (last > 0 && buf[last] == "") last--
    first = last - keep + 1
    for (i = first < 1 ? 1 : first; i <= last; i++) print "| " buf[i]
  }
  n = 0
}
/^==> .* <==$/ { flush(); name = substr($0, 5, length($0) - 8); sub(/.*\\//, "", name); next }
{ buf[++n] = $0 }
END { flush() }
"""


def _failed_log_tails(output: str, unit: WorkUnitRecord) -> Dict[Tuple[int, int], List[str]]:
    """{(unit, task): the last lines of its log} from a status script's output:
    its latest attempt's log only (an earlier attempt's may have failed too)."""
    tails: Dict[Tuple[int, int], List[str]] = {}
    lines: List[str] = []
    for line in _sections(output).get(f"failed logs {unit.id}", []):
        words = line.split(" ", 2)
        if line.startswith("| "):
            lines.append(line[2:])
        elif len(words) == 3 and words[0] == "task" and words[1].isdigit():
            task = int(words[1])
            path = task_log_path(unit, task)
            lines = []  # kept only for the latest attempt's log
            if path and os.path.basename(path) == words[2]:
                tails[(unit.id, task)] = lines
    return tails


def _sections(output: str) -> Dict[str, List[str]]:
    """The lines under each ``== name`` line of a script's output."""
    sections: Dict[str, List[str]] = {}
    lines = sections.setdefault("", [])
    for line in output.splitlines():
        if line.startswith("== "):
            lines = sections.setdefault(line[3:].strip(), [])
        else:
            lines.append(line)
    return sections


def _parse_status(output: str, unit: WorkUnitRecord, scheduler: Scheduler) -> List[TaskStatus]:
    sections = _sections(output)
    job_ids = set(unit.job_ids)
    queue, accounting = scheduler.read_status(sections.get("queue", []), sections.get("accounting", []),
                                              job_ids)
    exits: Dict[str, int] = {}  # by log file name
    log_name = ""
    for line in sections.get(f"exits {unit.id}", []):
        header = re.match(r"==> (.*) <==$", line)
        match = EXIT_RECORD_PATTERN.search(line)
        if header:
            log_name = os.path.basename(header.group(1))
        elif match and log_name:
            exits[log_name] = int(match.group(2))
    latest: Dict[int, Tuple[ArrayRecord, int]] = {}  # each task's latest attempt: its array, index
    attempts: Dict[int, int] = {}
    for array in unit.arrays:
        for task in array.task_ids():
            latest[task] = (array, task - array.first_task)
            attempts[task] = attempts.get(task, 0) + 1
    statuses = []
    for task, (array, index) in sorted(latest.items()):
        key, job = (array.job_id, index), scheduler.task_job(array.job_id, index)
        code = exits.get(scheduler.task_log_name(unit.job_name, array.job_id, index))
        state = queue.get(key)
        if state is None and key in accounting:
            state, recorded = accounting[key]
            code = code if code is not None else (int(recorded) if recorded.isdigit() else None)
        if state in TaskState.ACTIVE:
            status = TaskStatus(task, state, None, job)
        elif code is not None:
            state = state or (TaskState.COMPLETED if code == 0 else TaskState.FAILED)
            if state == TaskState.COMPLETED and code != 0:
                state = TaskState.FAILED
            if unit.cancelled and code in (129, 130, 137, 143):
                state = TaskState.CANCELLED
            status = TaskStatus(task, state, code, job)
        elif state is not None:
            status = TaskStatus(task, state, None, job)
        else:
            status = TaskStatus(task, TaskState.CANCELLED if unit.cancelled else TaskState.UNKNOWN,
                                None, job, "left the queue without an exit record")
        status.attempts = attempts[task]
        statuses.append(status)
    return statuses


def query_status(record: ExperimentRecord, work_unit_ids: Optional[Sequence[int]] = None,
                 log_tails: Optional[Dict[Tuple[int, int], List[str]]] = None) -> Dict[int, WorkUnitStatus]:
    """The state of every task, with one scheduler query per cluster.

    ``log_tails``: filled, in the same round trips, with the last
    WATCH_LOG_LINES lines of each cluster task that failed with an exit
    record, by (work unit, task).
    """
    units = [u for u in record.work_units if work_unit_ids is None or u.id in work_unit_ids]
    result: Dict[int, WorkUnitStatus] = {}
    groups: Dict[Tuple[str, str], List[WorkUnitRecord]] = {}
    for unit in units:
        if unit.is_local:
            result[unit.id] = WorkUnitStatus(_local_statuses(unit, record))
        elif unit.arrays:
            groups.setdefault((unit.cluster, unit.scheduler), []).append(unit)
        else:
            result[unit.id] = WorkUnitStatus(_unsubmitted_statuses(unit))
    for (_, scheduler_name), group in groups.items():
        scheduler = scheduler_named(scheduler_name)
        connection = _unit_connection(group[0])
        try:
            output = connection.run_script(_status_script(group, scheduler,
                                                          WATCH_LOG_LINES if log_tails is not None else 0),
                                           "reading job states")
        finally:
            connection.close()
        for unit in group:
            if log_tails is not None:
                log_tails.update(_failed_log_tails(output, unit))
            statuses = _parse_status(output, unit, scheduler) + _unsubmitted_statuses(unit)
            result[unit.id] = WorkUnitStatus(sorted(statuses, key=lambda t: t.task))
    return result


def dependency_notes(record: ExperimentRecord, statuses: Mapping[int, WorkUnitStatus]) -> Dict[int, str]:
    """Work units whose dependency can never be met, and why (by work unit).

    A task waiting for the success of a work unit that has a task failed,
    cancelled, lost or never submitted would wait for ever (Slurm's squeue
    says DependencyNeverSatisfied; Grid Engine keeps it held; PBS deletes it,
    which lxm3 sees as cancelled by no one): lxm3 infers it from the upstream's
    tasks, the same way for every scheduler.
    """
    notes = {}
    for unit in record.work_units:
        status = statuses.get(unit.id)
        if status is None:
            continue
        waiting = [t for t in status.tasks if t.state == TaskState.PENDING]
        removed = not waiting and not unit.cancelled and not unit.is_local
        if removed:  # the scheduler took it out of the queue itself
            waiting = [t for t in status.tasks if t.state == TaskState.CANCELLED and t.exit_code is None]
        if unit.never_run:
            removed, waiting = False, [t for t in status.tasks if t.task in unit.never_run]
        for dep in unit.dependencies:
            if dep.get("kind") == "any" or not waiting:
                continue
            for up in dep.get("work_units", []):
                upstream = statuses.get(up)
                bad = [t for t in upstream.tasks if t.state not in TaskState.ACTIVE
                       and t.state != TaskState.COMPLETED] if upstream else []
                if dep.get("kind") == "each":
                    pending = {t.task for t in waiting}
                    bad = [t for t in bad if t.task in pending]
                if bad:
                    kind = Dependency.KINDS.get(dep.get("kind"), dep.get("kind"))
                    notes[unit.id] = (f"dependency can never be met: it waits for work unit {up} "
                                      f"({kind}), whose task{'s' if len(bad) > 1 else ''} "
                                      f"{_task_ranges(t.task for t in bad)} did not succeed"
                                      + ("; the scheduler removed it from the queue" if removed else
                                         "" if unit.is_local else f"; 'lxm3 cancel {record.experiment_id} "
                                         f"{unit.id}' removes it from the queue"))
    return notes


def dependents(record: ExperimentRecord, work_unit_ids: Iterable[int]) -> List[int]:
    """The work units that wait, directly or not, for any of ``work_unit_ids``."""
    found: List[int] = []
    wanted = set(work_unit_ids)
    for unit in record.work_units:  # a unit waits only for units added before it
        if unit.id not in wanted and wanted.intersection(unit.upstream_ids()):
            found.append(unit.id)
            wanted.add(unit.id)
    return found


def _unsubmitted_statuses(unit: WorkUnitRecord) -> List[TaskStatus]:
    """Tasks no submitted array holds: never submitted, or not known to be."""
    if unit.state == UnitState.SUBMITTING:  # the cluster could not be asked
        state, detail = TaskState.UNKNOWN, "not known to be submitted; the cluster's submission log was not read"
    elif unit.state in (UnitState.QUEUED, UnitState.ADDING):
        state, detail = TaskState.PENDING, "not submitted yet"
    else:
        state, detail = TaskState.NOT_SUBMITTED, ""
    return [TaskStatus(t, state, detail=detail, attempts=0) for t in _unsubmitted_tasks(unit.num_tasks, unit.arrays)]


def reconcile_submissions(record: ExperimentRecord) -> bool:
    """Complete a record whose submission's outcome was never seen, from the cluster.

    A launch interrupted, cut off or crashed while it submitted leaves units
    in state ``submitting``; the submission log on the cluster names every job
    that was submitted. Reads it (one round trip per cluster, after any
    submission still running), fills in the arrays and saves the record.
    Returns whether the record changed.
    """
    units = [u for u in record.work_units if u.state == UnitState.SUBMITTING and u.submission_log]
    groups: Dict[str, List[WorkUnitRecord]] = {}
    for unit in units:
        groups.setdefault(unit.cluster, []).append(unit)
    for group in groups.values():
        directories = sorted({os.path.dirname(u.submission_log) for u in group})
        connection = _unit_connection(group[0])
        try:
            output = connection.run_script("".join(submission_log_script(d) for d in directories),
                                           "reading the submission log")
        finally:
            connection.close()
        known = {}
        for line in output.splitlines():
            word, key, job_id = (line.split() + ["", "", ""])[:3]
            if word == "OK" and JOB_ID_PATTERN.fullmatch(job_id):
                known[key] = job_id
        for unit in group:  # the planned arrays are the last (a rerun's follow the launch's)
            planned = {(p.first_task, p.count, p.tasks, p.attempt) for p in unit.planned}
            unit.arrays = [a for a in unit.arrays if (a.first_task, a.count, a.tasks, a.attempt) not in planned]
            unit.arrays += [ArrayRecord(p.first_task, p.count, job_id=known[p.key], tasks=p.tasks,
                                        attempt=p.attempt) for p in unit.planned if p.key in known]
            unit.set_state(unit_submission_state(unit.num_tasks, unit.arrays))
    if units:
        save_record(record)
    return bool(units)


def _local_statuses(unit: WorkUnitRecord, record: ExperimentRecord) -> List[TaskStatus]:
    """Each local task's latest attempt, from the record and, while a launch
    or an lxm3 rerun runs them, their logs."""
    statuses = []
    for task in range(unit.num_tasks):
        code = unit.exit_codes.get(task)
        stopped = unit.state == UnitState.STOPPED
        if task in unit.never_run:
            statuses.append(TaskStatus(task, TaskState.CANCELLED, detail=NEVER_RUN_DETAIL))
            continue
        if code is not None and stopped and code in (-15, -9, -2, 130, 143):
            statuses.append(TaskStatus(task, TaskState.CANCELLED, code, detail="stopped by lxm3"))
        elif code is not None:
            statuses.append(TaskStatus(task, TaskState.COMPLETED if code == 0 else TaskState.FAILED, code))
        elif stopped:
            statuses.append(TaskStatus(task, TaskState.CANCELLED, detail="stopped before it started"))
        elif record.status == ExperimentStatus.LAUNCHING or unit.state == UnitState.RUNNING:
            # a launch or a rerun runs it: has the task ended?
            code = _logged_exit(unit.log_paths[task]) if task < len(unit.log_paths) else None
            if code is None and task < len(unit.log_paths) and not _log_writer_alive(
                    os.path.dirname(unit.log_paths[task])):  # nothing runs it any more
                statuses.append(TaskStatus(task, TaskState.UNKNOWN,
                                           detail="its launch ended without recording how it ended"))
                continue
            statuses.append(TaskStatus(task, TaskState.RUNNING) if code is None else
                            TaskStatus(task, TaskState.COMPLETED if code == 0 else TaskState.FAILED, code))
        else:
            interrupted = record.status == ExperimentStatus.INTERRUPTED
            statuses.append(TaskStatus(task, TaskState.CANCELLED if interrupted else TaskState.UNKNOWN))
    for status in statuses:
        status.attempts = unit.attempts.get(status.task, 1)
    return statuses


def _logged_exit(log_path: str) -> Optional[int]:
    """The status in a local task's exit record, if its log ends with one."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 128))
            last = f.read().decode("utf-8", "replace").splitlines()[-1:]
    except OSError:
        return None
    match = EXIT_RECORD_PATTERN.match(last[0]) if last else None
    return int(match.group(2)) if match else None


def _cancel_script(scheduler: Scheduler, job_ids: Sequence[str]) -> str:
    """Cancel those of ``job_ids`` still queued; say which were and which had ended.

    Prints ``ACTIVE ID`` / ``ENDED ID`` lines (``UNKNOWN`` for all when the
    queue cannot be read: they are then all cancelled), the command's output,
    and ``lxm3-status N``.
    """
    return f"""set -o pipefail
lxm_ids=({' '.join(shell_quote(j) for j in job_ids)})
lxm_cancel=()
if lxm_queue=$({{ {scheduler.active_jobs_command()}; }} 2>/dev/null); then
  lxm_queue=" $(echo $lxm_queue) "
  for lxm_id in "${{lxm_ids[@]}}"; do
    case $lxm_queue in
      *" $lxm_id "*) lxm_cancel+=("$lxm_id"); echo "ACTIVE $lxm_id" ;;
      *) echo "ENDED $lxm_id" ;;
    esac
  done
else
  lxm_cancel=("${{lxm_ids[@]}}")
  printf 'UNKNOWN %s\\n' "${{lxm_ids[@]}}"
fi
if [ ${{#lxm_cancel[@]}} -gt 0 ]; then
  {scheduler.cancel_command} "${{lxm_cancel[@]}}" 2>&1
  echo "lxm3-status $?"
else
  echo "lxm3-status 0"
fi
"""


class CancelResult(ValueObject):
    """What ``cancel`` did: jobs it cancelled, and jobs that had already ended."""

    def __init__(self, cancelled: List[str], ended: List[str]):
        self.cancelled = cancelled
        self.ended = ended


def cancel(record: ExperimentRecord, work_unit_ids: Optional[Sequence[int]] = None) -> CancelResult:
    """Cancel the recorded jobs still queued: one ``scancel``/``qdel`` call per cluster.

    Jobs that had ended are left alone and reported as such; a unit is
    marked cancelled only if one of its jobs was.
    """
    reconcile_submissions(record)
    units = [u for u in record.work_units if u.arrays and (work_unit_ids is None or u.id in work_unit_ids)]
    groups: Dict[Tuple[str, str], List[WorkUnitRecord]] = {}
    for unit in units:
        groups.setdefault((unit.cluster, unit.scheduler), []).append(unit)
    result = CancelResult([], [])
    for (_, scheduler_name), group in groups.items():
        scheduler = scheduler_named(scheduler_name)
        # Dependents (added later) first: Grid Engine starts a held job once what it waits for is gone.
        job_ids = list(dict.fromkeys(job_id for u in reversed(group) for job_id in u.job_ids))
        command = scheduler.cancel_command
        connection = _unit_connection(group[0])
        try:
            output = connection.run_script(_cancel_script(scheduler, job_ids),
                                           f"cancelling jobs with {command}")
        finally:
            connection.close()
        active, lines = [], []
        for line in output.strip().splitlines():
            word, _, job_id = line.partition(" ")
            if word in ("ACTIVE", "UNKNOWN"):
                active.append(job_id)
            elif word == "ENDED":
                result.ended.append(job_id)
            else:
                lines.append(line)
        last = lines.pop() if lines else "lxm3-status 0"
        # A job that ended since the queue was read is not an error (qdel: "does not exist").
        problems = [line for line in lines if not scheduler.benign_cancel.search(line)]
        if last != "lxm3-status 0" and problems:
            raise ClusterError(f"{command} on {group[0].cluster} failed: " + "\n".join(problems))
        for unit in group:
            if any(job_id in active for job_id in unit.job_ids):
                unit.cancelled = True
        result.cancelled += active
    save_record(record)
    return result



# -- lxm3 rerun --------------------------------------------------------------


class RerunSubmission(ArraySubmission):
    """One array of ``lxm3 rerun``: ``tasks`` (task = first_task + index) for their ``attempt``-th run."""

    def __init__(self, work_unit_id: int, first_task: int, indices: List[int], argv: List[str],
                 attempt: int, key: str):
        super().__init__(work_unit_id, first_task, len(indices), argv)
        self.tasks = _task_ranges(first_task + i for i in indices).replace(" ", "")
        self.attempt = attempt
        self._key = key

    @property
    def key(self) -> str:
        return self._key

    @property
    def task_range(self) -> str:
        return f"task{'s' if self.count > 1 else ''} {self.tasks.replace(',', ', ')}"

    def to_record(self, **fields: Any) -> ArrayRecord:
        return ArrayRecord(self.first_task, self.count, tasks=self.tasks, attempt=self.attempt, **fields)


def task_attempts(unit: WorkUnitRecord) -> Dict[int, int]:
    """How many times each task was submitted, or run here (tasks never submitted: absent)."""
    if unit.is_local:
        return {task: unit.attempts.get(task, 1) for task in range(unit.num_tasks)}
    attempts: Dict[int, int] = {}
    for array in unit.arrays:
        for task in array.task_ids():
            attempts[task] = attempts.get(task, 0) + 1
    return attempts


def _why_not_rerun(record: ExperimentRecord, unit: WorkUnitRecord) -> Optional[str]:
    """Why ``lxm3 rerun`` cannot run this unit's tasks again (None: it can)."""
    xid, wid = record.experiment_id, unit.id
    if unit.state == UnitState.DRY_RUN:
        return (f"work unit {wid} of experiment {xid} is a dry run (lxm3 launch --dry-run): nothing was "
                "submitted or staged, so there is nothing to rerun; launch it without --dry-run")
    if unit.is_local:
        if not unit.script or not unit.job_directory or not _local_log_dir(unit):
            return (f"work unit {wid} of experiment {xid} was launched by an lxm3 that did not record its "
                    "job script, which lxm3 rerun needs: launch it again")
        if _log_writer_alive(_local_log_dir(unit)):
            return _still_running_here(xid, wid)
        return None
    if not unit.arrays and unit.state != UnitState.SUBMITTING:
        return f"work unit {wid} of experiment {xid} was never submitted ({unit.state}): launch it again"
    if not unit.submit_argv or not unit.script or not unit.submission_log:
        return (f"work unit {wid} of experiment {xid} was launched by an lxm3 that did not record its "
                "submit command, which lxm3 rerun needs: launch it again")
    return None


def _local_log_dir(unit: WorkUnitRecord) -> str:
    """Where a local work unit's logs are (records older than log_directory: its first log's directory)."""
    return unit.log_directory or (os.path.dirname(unit.log_paths[0]) if unit.log_paths else "")


def _still_running_here(xid: int, wid: int) -> str:
    return (f"work unit {wid} of experiment {xid} is still running on this machine (its launch, or another "
            "lxm3 rerun, is writing its logs): nothing was run. Wait for it to end, or stop it (Ctrl-C where "
            f"it runs), then rerun; 'lxm3 status {xid} {wid}' shows its tasks")


def _rerun_check_script(units: Sequence[WorkUnitRecord], scheduler: Scheduler) -> str:
    """The cluster's array limits, and which of the files the units' launch staged are gone."""
    lines = [scheduler.probe_lines()]
    for unit in units:
        paths = [unit.script, f"{unit.job_directory}/tasks", unit.archive]
        paths += [path for path in (unit.image, unit.environment) if path and path.startswith("/")]
        lines += [f"[ -e {shell_quote(path)} ] || echo missing {unit.id} {shell_quote(path)}"
                  for path in paths if path]
    return "\n".join(lines) + "\ntrue\n"


def _plan_rerun(unit: WorkUnitRecord, tasks: Sequence[int], scheduler: Scheduler, info: ClusterInfo,
                stamp: int) -> List[RerunSubmission]:
    """The arrays that submit ``tasks`` again: one set per attempt number (each gets its own
    LXM_RERUN), split as the cluster's limits require; chained if the launch throttled them."""
    attempts = task_attempts(unit)
    by_attempt: Dict[int, List[int]] = {}
    for task in tasks:
        by_attempt.setdefault(attempts.get(task, 0) + 1, []).append(task)
    max_index, max_count = scheduler.rerun_limits(info)
    submissions: List[RerunSubmission] = []
    for attempt, group in sorted(by_attempt.items()):
        for offset, indices in split_index_lists(group, max_index, max_count, not scheduler.index_lists):
            argv = scheduler.rerun_argv(unit.submit_argv or [], indices, attempt - 1,
                                        after_previous=bool(submissions))
            submissions.append(RerunSubmission(unit.id, offset, indices,
                                               scheduler.command_line(argv, unit.script or "", offset),
                                               attempt, key=f"{unit.id}:r{stamp}.{len(submissions)}"))
    return submissions


def rerun_tasks(record: ExperimentRecord, work_unit_ids: Optional[Sequence[int]] = None,
                tasks: Optional[Sequence[int]] = None) -> Dict[int, List[Any]]:
    """Submit some tasks of work units again, with their original arguments.

    ``tasks``: these task ids of each unit; None: every task whose latest
    attempt failed, was cancelled or was lost, as ``lxm3 status`` tells. The
    job script, tasks file and archive the launch staged are used again:
    nothing is packaged or copied. Tasks still pending or running are refused.
    Every attempt stays in the record; the new arrays are saved before they are
    submitted (the cluster's submission log knows the outcome if lxm3 is cut
    off). Local work units' tasks run here, in the foreground, after the
    clusters' are submitted (see _rerun_locally). Returns, by work unit, the
    arrays submitted (ArrayRecord) or the local tasks run (TaskResult).
    """
    units = [u for u in record.work_units if work_unit_ids is None or u.id in work_unit_ids]
    reasons = {u.id: _why_not_rerun(record, u) for u in units}
    if work_unit_ids is not None or all(reasons.values()):
        for unit in units:
            if reasons[unit.id]:
                raise LaunchError(reasons[unit.id])
    for unit in units:
        if reasons[unit.id]:
            _progress(f"skipped: {reasons[unit.id]}")
    units = [u for u in units if not reasons[u.id]]
    reconcile_submissions(record)
    statuses = query_status(record, [u.id for u in units])
    chosen: Dict[int, List[int]] = {}
    for unit in units:
        states = {t.task: t for t in statuses[unit.id].tasks}
        if tasks is None:
            picked = sorted(t for t, status in states.items() if status.state in TaskState.RERUN)
        else:
            outside = sorted({t for t in tasks if not 0 <= t < unit.num_tasks})
            if outside:
                raise LaunchError(f"work unit {unit.id} has tasks 0-{unit.num_tasks - 1}; "
                                  f"{_task_ranges(outside)} {'is' if len(outside) == 1 else 'are'} not among "
                                  "them: nothing was submitted")
            picked = sorted(set(tasks))
        active = [states[t] for t in picked if states[t].state in TaskState.ACTIVE]
        if active and unit.is_local:
            raise LaunchError(_still_running_here(record.experiment_id, unit.id))
        if active:
            cancel_command = scheduler_named(unit.scheduler).cancel_command
            raise LaunchError(
                f"work unit {unit.id}: {'task' if len(active) == 1 else 'tasks'} "
                f"{_task_ranges(t.task for t in active)} {'is' if len(active) == 1 else 'are'} still pending "
                f"or running ({', '.join(f'{t.task}: {t.state}' for t in active[:5])}"
                f"{', ...' if len(active) > 5 else ''}): nothing was submitted. Wait for them to end, "
                f"or cancel them first (`{cancel_command} {' '.join(t.job or '' for t in active[:5])}` "
                f"on the cluster, or 'lxm3 cancel {record.experiment_id} {unit.id}' for the whole "
                "work unit), then rerun")
        if picked:
            chosen[unit.id] = picked
    submitted: Dict[int, List[Any]] = {}
    groups: Dict[Tuple[str, str], List[WorkUnitRecord]] = {}
    for unit in units:
        if unit.id in chosen and not unit.is_local:
            groups.setdefault((unit.cluster, unit.scheduler), []).append(unit)
    for group in groups.values():
        submitted.update(_rerun_on_cluster(record, group, chosen))
    here = [u for u in units if u.id in chosen and u.is_local]
    if here:
        submitted.update(_rerun_locally(record, here, chosen))
    return submitted


def _rerun_locally(record: ExperimentRecord, units: List[WorkUnitRecord],
                   chosen: Mapping[int, List[int]]) -> Dict[int, List[TaskResult]]:
    """The local part of ``rerun_tasks``: run the chosen tasks again here, in
    the foreground, as the launch ran them (its job script and tasks file, its
    GPUs per task and parallelism, streaming their output), each with
    LXM_RERUN=<its earlier attempts> and a log of its own. The record is saved
    before (running) and after (completed, failed; stopped on Ctrl-C, which is
    re-raised). Dependencies between work units hold, on the tasks' latest attempts.
    """
    xid = record.experiment_id
    held: List[int] = []  # our locks on the log directories: no launch or rerun may start there now
    try:
        for unit in units:
            for path in (unit.script or "", os.path.join(unit.job_directory or "", "tasks")):
                if not os.path.isfile(path):
                    raise LaunchError(f"work unit {unit.id} of experiment {xid}: {path}, which its launch "
                                      "wrote, is gone: nothing was run; launch it again")
            log_dir = _local_log_dir(unit)
            make_private_dirs(log_dir)
            locked = _hold_writer_lock(log_dir)
            if not locked and _log_writer_alive(log_dir):
                raise LaunchError(_still_running_here(xid, unit.id))
            held += locked
        runner = LocalRunner(units[0].max_parallel_tasks)
        rerun_ids = {u.id for u in units}
        for other in record.work_units:  # what tasks that wait for others may start after
            if other.is_local and other.state != UnitState.DRY_RUN:
                again = set(chosen[other.id]) if other.id in rerun_ids else set()
                runner.note_earlier(other.id, other.num_tasks, {
                    t.task: 0 if t.state == TaskState.COMPLETED else t.exit_code or None
                    for t in _local_statuses(other, record) if t.task not in again})
        started: List[WorkUnitRecord] = []
        try:
            for unit in units:
                started.append(unit)
                _start_rerun_here(unit, chosen[unit.id], runner)
            try:
                save_record(record)
            except OSError as e:
                raise LaunchError(f"cannot save the record of experiment {xid} ({e.strerror}: {e.filename}), "
                                  "so the rerun was stopped; free some space and rerun") from None
            runner.wait()
        except BaseException:  # Ctrl-C (or an error): no task goes on without us
            runner.stop()
            if started:
                _note_rerun_ended(record, started, runner, stopped=True)
            raise
        _note_rerun_ended(record, units, runner, stopped=False)
    finally:
        for fd in held:
            os.close(fd)
    return {u.id: sorted((r for r in runner.results if r.work_unit_id == u.id), key=lambda r: r.task_id)
            for u in units}


def _start_rerun_here(unit: WorkUnitRecord, tasks: List[int], runner: LocalRunner) -> None:
    """Queue ``tasks`` of a local unit, each for its next attempt, and record
    their new logs (their exit codes are gone until they end)."""
    unit.set_state(UnitState.RUNNING)
    attempts = task_attempts(unit)
    by_attempt: Dict[int, List[int]] = {}
    for task in tasks:
        by_attempt.setdefault(attempts[task] + 1, []).append(task)
    # As at launch: without a container, tasks use this interpreter.
    env = {} if unit.image else {"LXM_PYTHON": sys.executable}
    after = [(d["kind"], w) for d in unit.dependencies for w in d.get("work_units", ())]
    unit.log_paths += [""] * (unit.num_tasks - len(unit.log_paths))
    for attempt, group in sorted(by_attempt.items()):
        logs = runner.submit(unit.script or "", unit.id, unit.num_tasks, _local_log_dir(unit), env,
                             unit.gpus_per_task, after=after, task_ids=group, attempt=attempt)
        for task, log in zip(group, logs):
            unit.log_paths[task], unit.attempts[task] = log, attempt
            unit.exit_codes.pop(task, None)
            if task in unit.never_run:
                unit.never_run.remove(task)
    _progress(f"work unit {unit.id}: rerunning {_counted(len(tasks), 'task')} ({_task_ranges(tasks)}; "
              f"attempt {', '.join(map(str, sorted(by_attempt)))}) here, with the job script its launch "
              f"wrote; logs in {_local_log_dir(unit)}")


def _note_rerun_ended(record: ExperimentRecord, units: List[WorkUnitRecord], runner: LocalRunner,
                      stopped: bool) -> None:
    """Record how a local rerun's tasks ended, each unit's state and, once
    every task ended, the experiment's (as ``lxm3 list`` shows it)."""
    by_id = {u.id: u for u in units}
    for r in runner.results:
        by_id[r.work_unit_id].exit_codes[r.task_id] = r.returncode
    for wid, task in runner.never_run:
        if task not in by_id[wid].never_run:
            by_id[wid].never_run.append(task)
    for unit in units:
        codes = unit.exit_codes
        ended_well = all(codes.get(t) == 0 for t in range(unit.num_tasks))
        held_back = unit.never_run and not any(codes.values())
        unit.set_state(UnitState.COMPLETED if ended_well else
                       UnitState.STOPPED if stopped or held_back else UnitState.FAILED)
    if any(not u.is_local and u.state != UnitState.DRY_RUN for u in record.work_units):
        if record.status in (ExperimentStatus.COMPLETED, ExperimentStatus.FAILED, ExperimentStatus.CANCELLED):
            record.status = ExperimentStatus.LAUNCHED  # 'lxm3 status' concludes again, with the clusters'
    elif record.status != ExperimentStatus.LAUNCHING:
        concluded = _concluded_status({u.id: WorkUnitStatus(_local_statuses(u, record))
                                       for u in record.work_units if u.state != UnitState.DRY_RUN})
        if concluded == ExperimentStatus.COMPLETED:
            record.status, record.error = concluded, None  # the failures the launch reported are behind it
        elif concluded and record.status != ExperimentStatus.INTERRUPTED:
            record.status = concluded
    try:
        save_record(record)
    except OSError as e:
        _progress(f"the record of experiment {record.experiment_id} could not be saved ({e.strerror}: "
                  f"{e.filename}): 'lxm3 status' shows the tasks that ran before this rerun")


def _rerun_on_cluster(record: ExperimentRecord, units: List[WorkUnitRecord],
                      chosen: Mapping[int, List[int]]) -> Dict[int, List[ArrayRecord]]:
    """One cluster's part of ``rerun_tasks``: check what is staged, plan, record, submit."""
    xid, cluster = record.experiment_id, units[0].cluster
    scheduler = scheduler_named(units[0].scheduler)
    connection = _unit_connection(units[0])
    try:
        output = connection.run_script(_rerun_check_script(units, scheduler), "checking the staged files")
        values: Dict[str, str] = {}
        missing: List[str] = []
        for line in output.splitlines():
            key, _, value = line.partition(" ")
            if key == "missing":
                missing.append(value)
            else:
                values[key] = value.strip()
        if missing:
            gone = "; ".join(f"work unit {m.split(' ', 1)[0]}: {m.split(' ', 1)[1]}" for m in missing[:5])
            raise ClusterError(f"what the launch of experiment {xid} staged on {cluster} is gone ({gone}), "
                               "removed by lxm3 clean or by hand: nothing was submitted; launch it again")
        limits = {key: int(values[key]) for key in ("max_array_size", "max_array_tasks")
                  if values.get(key, "").isdigit()}
        info = ClusterInfo(staging="", home="", **limits)
        stamp = int(time.time() * 1000)
        submissions: List[RerunSubmission] = []
        for unit in units:
            planned = _plan_rerun(unit, chosen[unit.id], scheduler, info, stamp)
            submissions += planned
            unit.planned = [s.to_record(key=s.key) for s in planned]
            unit.set_state(UnitState.SUBMITTING)
            attempts = sorted({s.attempt for s in planned})
            _progress(f"work unit {unit.id}: rerunning {_counted(len(chosen[unit.id]), 'task')} "
                      f"({_task_ranges(chosen[unit.id])}; attempt {', '.join(map(str, attempts))}) on {cluster} "
                      f"as {_counted(len(planned), 'array')}, with the job script and archive staged at launch")
        if record.status in (ExperimentStatus.COMPLETED, ExperimentStatus.FAILED, ExperimentStatus.CANCELLED):
            record.status = ExperimentStatus.LAUNCHED  # 'lxm3 status' concludes again
        try:  # what is about to be submitted is on disk first, as at launch
            save_record(record)
        except OSError as e:
            raise LaunchError(f"cannot save the record of experiment {xid} ({e.strerror}: {e.filename}), "
                              "so nothing was submitted; free some space and rerun") from None
        experiment_dir = os.path.dirname(units[0].submission_log or "")
        script = submission_script([u.log_directory for u in units if u.log_directory], submissions,
                                   experiment_dir, scheduler)
        output, interrupted = _run_submission(connection, script, experiment_dir)
    finally:
        connection.close()
    error = parse_submission_output(output, submissions)
    still_running = SUBMISSION_STILL_RUNNING in output
    result: Dict[int, List[ArrayRecord]] = {}
    for unit in units:
        done = [s for s in submissions if s.work_unit_id == unit.id and s.job_id is not None]
        result[unit.id] = [s.to_record(job_id=s.job_id) for s in done]
        unit.arrays += result[unit.id]
        if not still_running:
            unit.set_state(unit_submission_state(unit.num_tasks, unit.arrays))
        if done:
            jobs = ", ".join(f"{s.job_id} ({s.task_range}, attempt {s.attempt})" for s in done)
            _progress(f"work unit {unit.id}: resubmitted to {cluster} as job {jobs}; logs in {unit.log_directory}")
    try:
        save_record(record)
    except OSError as e:
        raise LaunchError(f"the tasks were resubmitted, but the record of experiment {xid} could not be "
                          f"saved ({e.strerror}: {e.filename}); once there is space, 'lxm3 status {xid}' "
                          "reads the job ids from the cluster's submission log") from None
    if interrupted:
        _progress(f"rerun interrupted; see 'lxm3 status {xid}' for what was resubmitted")
        raise KeyboardInterrupt
    if error:
        failed = next(s for s in submissions if s.job_id is None)
        raise ClusterError(f"{scheduler.submit_command} on {cluster} rejected the rerun of work unit "
                           f"{failed.work_unit_id} ({failed.task_range}): {error}")
    return result


def follow_log(unit: WorkUnitRecord, task: int, lines: int, follow: bool) -> int:
    """Show a task's log, there or here; with ``follow``, print what is added
    until the task's exit record (``lxm3-exit: task I status S``)."""
    import subprocess

    path = task_log_path(unit, task)
    if path is None:
        raise LaunchError(f"lxm3 does not know where task {task} of work unit {unit.id} writes its "
                          "log (not submitted, or its output option was set by the launcher)")
    if unit.is_local:
        if follow:
            return _follow_local(path, lines)
        return _exit_status(subprocess.call(["tail", "-n", str(lines), "--", path]))
    connection = _unit_connection(unit)
    try:
        return _exit_status(connection.run_streaming(_follow_command(path, lines, follow)))
    finally:
        connection.close()


def _exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


_EXIT_LINE = r"^lxm3-exit: task [0-9]+ status [0-9]+"  # EXIT_RECORD_PATTERN, for grep and bash


def _follow_command(path: str, lines: int, follow: bool) -> str:
    """One shell line for the cluster: ``tail``, or ``tail -F`` read until the exit
    record, then ended. ``bash -c``, whatever the user's login shell is."""
    quoted = shell_quote(path)
    if not follow:
        return f"tail -n {int(lines)} -- {quoted}"
    script = (
        # Ended already: show its end and stop (also with -n 0).
        f"if tail -n 1 -- {quoted} 2>/dev/null | grep -qE '{_EXIT_LINE}'; then "
        f"tail -n {int(lines)} -- {quoted}; exit; fi; "
        f"coproc lxm_tail {{ exec tail -n {int(lines)} -F -- {quoted}; }}; "
        # lxm3 holds our stdin open: when it ends (Ctrl-C, killed, connection
        # lost) the watcher sees EOF and ends tail, which on a quiet log would
        # otherwise wait for its next write to find nobody reading.
        'exec 3<&0; { cat <&3 >/dev/null 2>&1; kill "$lxm_tail_PID" 2>/dev/null; } 2>/dev/null & '
        'lxm_watch=$!; '
        'while IFS= read -r lxm_line <&"${lxm_tail[0]}" || [[ -n $lxm_line ]]; do '
        'printf "%s\\n" "$lxm_line"; '
        f"[[ $lxm_line =~ {_EXIT_LINE.replace(' ', '[[:space:]]')} ]] && break; done; "
        'kill "$lxm_tail_PID" "$lxm_watch" 2>/dev/null; exit 0'
    )
    return "bash -c " + shell_quote(script)


def _follow_local(path: str, lines: int) -> int:
    """``tail -n LINES -F`` for a local task, which ends after the task's exit
    record, or once no lxm3 process writes its log any more (the task, or the
    launch that ran it, was killed: nothing more will be written)."""
    out = sys.stdout.buffer
    log_dir = os.path.dirname(path)
    position, partial, opened, waiting = 0, b"", False, False
    while True:
        writing = _log_writer_alive(log_dir)  # asked first: a last write lands before we read
        try:
            with open(path, "rb") as f:
                if not opened:  # the last lines of what is there; then everything added
                    position, opened = _start_of_last_lines(f, lines), True
                f.seek(position)
                data = f.read()
        except FileNotFoundError:
            if not writing:
                raise LaunchError(f"{path} does not exist: the task never started") from None
            if not waiting:
                _progress(f"waiting for the task to start ({path} does not exist yet)")
                waiting = opened = True  # all it writes is new: shown from its start
            data = b""
        position += len(data)
        chunk = partial + data
        complete, _, partial = chunk.rpartition(b"\n")
        if complete:
            out.write(complete + b"\n")
            out.flush()
            if any(EXIT_RECORD_PATTERN.match(line.decode("utf-8", "replace"))
                   for line in complete.split(b"\n")):
                return 0
        if not writing:
            if partial:
                out.write(partial + b"\n")
                out.flush()
            return 0
        time.sleep(FOLLOW_POLL_SECONDS)


def _start_of_last_lines(f, lines: int) -> int:
    """The offset where the last ``lines`` lines of the open file ``f`` begin."""
    end = position = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    data = b""
    while position > 0 and data.count(b"\n", 0, len(data) - 1) < lines:
        size = min(65536, position)
        position -= size
        f.seek(position)
        data = f.read(size) + data
    index = len(data) - 1 if data.endswith(b"\n") else len(data)  # the last line's own newline
    for _ in range(lines):
        index = data.rfind(b"\n", 0, index)
        if index < 0:
            return position  # the whole file has fewer lines
    return position + index + 1


# ---------------------------------------------------------------------------
# Watch and wait: one polling loop for status --watch, wait and launch --wait
# ---------------------------------------------------------------------------


def next_poll_interval(previous: Optional[float], base: float, changed: bool) -> float:
    """Seconds until the next query: ``base`` at first and after a change; else
    WATCH_BACKOFF times the previous wait, up to WATCH_MAX_INTERVAL (or ``base``
    if that is longer)."""
    if previous is None or changed:
        return base
    return min(previous * WATCH_BACKOFF, max(WATCH_MAX_INTERVAL, base))


def _states_seen(statuses: Mapping[int, WorkUnitStatus]) -> Tuple[Any, ...]:
    return tuple((wid, tuple((t.task, t.state) for t in s.tasks)) for wid, s in sorted(statuses.items()))


def poll_statuses(ask: Callable[[], Dict[int, WorkUnitStatus]], interval: float,
                  minimum: float = WATCH_MIN_INTERVAL
                  ) -> Iterable[Tuple[Dict[int, WorkUnitStatus], Optional[float]]]:
    """Ask ``ask()`` ({work unit: WorkUnitStatus}) until no task is pending or running.

    Yields each answer with the seconds to wait before the next query (None
    after the last answer); the caller waits (or awaits), so that it can redraw
    meanwhile. The wait is ``interval`` (at least ``minimum``) at first and
    after a change, and grows while nothing changes (next_poll_interval). A
    query that fails with a ClusterError after a first answer is tried again,
    as if nothing had changed; WATCH_FAILED_QUERIES in a row end it with the error.
    """
    base = max(float(interval), minimum)
    wait: Optional[float] = None
    seen: Optional[Tuple[Any, ...]] = None
    statuses: Optional[Dict[int, WorkUnitStatus]] = None
    failures = 0
    while True:
        try:
            answer = ask()
        except ClusterError as e:
            failures += 1
            if statuses is None or failures >= WATCH_FAILED_QUERIES:
                raise
            wait = next_poll_interval(wait, base, changed=False)
            _progress(f"{e}; asking again in {wait:.0f} s")
            yield statuses, wait
            continue
        statuses, failures = answer, 0
        if not any(s.is_active for s in statuses.values()):
            yield statuses, None
            return
        states = _states_seen(statuses)
        wait = next_poll_interval(wait, base, changed=states != seen)
        seen = states
        yield statuses, wait


class WaitTimeout(LaunchError):
    """Tasks were still pending or running when ``--timeout`` ran out."""

    def __init__(self, message: str, statuses: Dict[int, WorkUnitStatus]):
        super().__init__(message)
        self.statuses = statuses


def follow_experiment(experiment_id: Union[int, str], work_unit: Optional[int] = None,
                      interval: float = WATCH_INTERVAL, timeout: Optional[float] = None,
                      on_answer: Optional[Callable[..., None]] = None,
                      on_wait: Optional[Callable[[float], None]] = None,
                      log_tails: bool = False) -> Tuple[ExperimentRecord, Dict[int, WorkUnitStatus]]:
    """Poll an experiment (or one work unit) until every task has ended.

    Each round reads the record again (a launch still running, local tasks
    included, writes it), completes it from the clusters' submission logs if
    needed, and queries each cluster once (query_status), at poll_statuses'
    pace. ``on_answer(record, statuses, tails)`` sees each answer (tails: see
    query_status; with ``log_tails``); ``on_wait(seconds_left)`` is called
    about once a second between queries. Returns the last (record, statuses);
    WaitTimeout when ``timeout`` seconds pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    latest: Dict[str, Any] = {}

    def ask() -> Dict[int, WorkUnitStatus]:
        record = load_record(experiment_id)
        reconcile_submissions(record)
        tails: Dict[Tuple[int, int], List[str]] = {}
        statuses = query_status(record, _selected_units(record, work_unit), tails if log_tails else None)
        latest.update(record=record, tails=tails)
        return statuses

    for statuses, wait in poll_statuses(ask, interval):
        if on_answer:
            on_answer(latest["record"], statuses, latest["tails"])
        if wait is None:
            return latest["record"], statuses
        until = time.monotonic() + wait
        if deadline is not None and until >= deadline:
            _wait_until(deadline, on_wait)
            active = sum(1 for s in statuses.values() for t in s.tasks if t.state in TaskState.ACTIVE)
            raise WaitTimeout(f"{_counted(active, 'task')} still pending or running", statuses)
        _wait_until(until, on_wait)
    raise AssertionError("unreachable: poll_statuses ends with an answer")


def _wait_until(until: float, on_wait: Optional[Callable[[float], None]]) -> None:
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        if on_wait:
            on_wait(left)
        time.sleep(min(left, 1.0) if on_wait else left)


def _duration_text(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h03m``, ``1d02h``."""
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _since_launch(record: ExperimentRecord) -> float:
    import datetime

    try:
        created = datetime.datetime.fromisoformat(record.created)
    except ValueError:
        return 0.0
    return (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()


def _use_colour(stream: Any) -> bool:
    """Colour only on a terminal, and never with $NO_COLOR set (no-color.org) or TERM=dumb."""
    return _is_terminal(stream) and not os.environ.get("NO_COLOR")


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _terminal_width(stream: Any) -> int:
    """The terminal's columns (read again at each redraw: it may be resized); else $COLUMNS, else 80."""
    return _terminal_size(stream, 0, "COLUMNS", 80)


def _terminal_size(stream: Any, index: int, variable: str, default: int) -> int:
    try:
        size = os.get_terminal_size(stream.fileno())[index]
    except (AttributeError, ValueError, OSError):
        size = 0
    if size <= 0:  # a terminal that does not say
        text = os.environ.get(variable, "")
        size = int(text) if text.isdigit() else default
    return max(20 if index == 0 else 5, size)


# How each state looks in a bar: its character, and its colour (an SGR code).
BAR_STYLE = {
    TaskState.COMPLETED: ("#", "32"),
    TaskState.FAILED: ("x", "31"),
    TaskState.CANCELLED: ("-", "33"),
    TaskState.UNKNOWN: ("?", "35"),
    TaskState.RUNNING: (">", "36"),
    TaskState.PENDING: (".", "2"),
    TaskState.NOT_SUBMITTED: (" ", "0"),
}


def bar_segments(counts: Mapping[str, int], width: int) -> List[Tuple[str, int]]:
    """[(state, cells)] of a bar ``width`` cells wide, in BAR_STYLE's order: cells
    in proportion to the counts, and at least one for every state that has a task
    (one failure in a thousand tasks is seen), as long as the width allows."""
    states = [s for s in BAR_STYLE if counts.get(s, 0) > 0]
    total = sum(counts[s] for s in states)
    if not states or width <= 0:
        return []
    shares = {s: counts[s] * width / total for s in states}
    cells = {s: max(1, int(shares[s])) for s in states}
    while sum(cells.values()) > width and any(c > 1 for c in cells.values()):
        widest = max((s for s in states if cells[s] > 1), key=lambda s: cells[s] - shares[s])
        cells[widest] -= 1
    while sum(cells.values()) < width:
        cells[max(states, key=lambda s: shares[s] - cells[s])] += 1
    return [(s, cells[s]) for s in states]


def render_bar(counts: Mapping[str, int], width: int, colour: bool) -> str:
    """A progress bar of the task states (BAR_STYLE), ``width`` characters wide on screen."""
    parts, used = [], 0
    for state, cells in bar_segments(counts, width):
        char, sgr = BAR_STYLE[state]
        cells = min(cells, width - used)
        used += cells
        parts.append(f"\x1b[{sgr}m{char * cells}\x1b[0m" if colour and cells else char * cells)
    return "".join(parts) + " " * (width - used)


def _counts_text(status: WorkUnitStatus) -> str:
    """``4/10 ended: 3 completed, 1 failed, 2 running, 4 pending``."""
    counts = status.counts()
    ended = sum(n for s, n in counts.items() if s not in TaskState.ACTIVE)
    return f"{ended}/{len(status.tasks)} ended: " + ", ".join(
        f"{counts[s]} {s}" for s in BAR_STYLE if counts.get(s))


def unit_line(work_unit_id: int, status: WorkUnitStatus, width: int, colour: bool) -> str:
    """One work unit's line of ``status --watch``, at most ``width - 1`` characters on screen."""
    label, text = f"work unit {work_unit_id} [", "] " + _counts_text(status)
    room = width - 1 - len(label)
    bar_width = max(1, min(40, room - len(text), room - 2))
    text = text[:max(0, room - bar_width)]
    return label + render_bar(status.counts(), bar_width, colour) + text


def _log_tail_here(path: Optional[str], lines: int) -> List[str]:
    """The last ``lines`` lines of a local task's log before its exit record."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(_start_of_last_lines(f, lines + 2))
            text = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    if text and EXIT_RECORD_PATTERN.match(text[-1]):
        text.pop()
        if text and not text[-1]:
            text.pop()
    return text[-lines:] if lines > 0 else []


def _failure_lines(record: ExperimentRecord, wid: int, task: TaskStatus,
                   tails: Mapping[Tuple[int, int], List[str]]) -> List[str]:
    """A newly failed task, where to read its log, and the end of that log."""
    unit = record.unit(wid)
    how = task.state + ("" if task.exit_code is None else f", exit {task.exit_code}")
    how += f" ({task.detail})" if task.detail else ""
    tail = tails.get((wid, task.task))
    if tail is None and unit.is_local:
        tail = _log_tail_here(task_log_path(unit, task.task), WATCH_LOG_LINES)
    lines = [f"work unit {wid} task {task.task}: {how}; "
             f"lxm3 logs {record.experiment_id} {wid} --task {task.task}"]
    return lines + [f"  | {line}" for line in tail or []]


def _summary_lines(record: ExperimentRecord, statuses: Mapping[int, WorkUnitStatus]) -> List[str]:
    """The end of a wait: how many tasks ended how, and which did not complete."""
    tasks = [t for s in statuses.values() for t in s.tasks]
    counts = WorkUnitStatus(tasks).counts()
    lines = [f"experiment {record.experiment_id}: {_counted(len(tasks), 'task')} ended: " + ", ".join(
        f"{counts[s]} {s}" for s in BAR_STYLE if counts.get(s))]
    for wid, status in statuses.items():
        bad = [(s, [t.task for t in status.tasks if t.state == s]) for s in BAR_STYLE
               if s != TaskState.COMPLETED]
        bad = [(s, tasks) for s, tasks in bad if tasks]
        if bad:
            lines.append(f"  work unit {wid}: " + "; ".join(
                f"{s} task{'s' if len(ts) > 1 else ''} {_task_ranges(ts)}" for s, ts in bad))
    return lines


def _all_completed(statuses: Mapping[int, WorkUnitStatus]) -> bool:
    return all(t.state == TaskState.COMPLETED for s in statuses.values() for t in s.tasks)


def _remember_conclusion(record: ExperimentRecord, statuses: Mapping[int, WorkUnitStatus],
                         work_unit: Optional[int]) -> None:
    """As ``lxm3 status`` does: once every task ended, ``lxm3 list`` says how."""
    concluded = _concluded_status(statuses) if work_unit is None else None
    if concluded and record.status == ExperimentStatus.LAUNCHED:
        record.status = concluded
        save_record(record)


class _WatchView:
    """What ``lxm3 status --watch`` shows. On a terminal: a header and one bar per
    work unit, redrawn in place (cursor up, erase), with the end of each newly
    failed task's log printed once above them, where it stays. Elsewhere: a line
    per work unit whose counts changed, and the newly failed tasks."""

    MAX_FAILURES_SHOWN = 10  # a round's new failures shown with their logs; the rest are counted

    def __init__(self, experiment_id: Union[int, str], out: Any):
        self.experiment_id, self.out = experiment_id, out
        self.terminal, self.colour = _is_terminal(out), _use_colour(out)
        self.drawn = 0  # lines of the redrawn block on the screen
        self.shown: Set[Tuple[int, int]] = set()  # (unit, task) failures already shown
        self.said: Dict[int, str] = {}  # plain lines: each unit's last counts
        self.record: Optional[ExperimentRecord] = None
        self.statuses: Dict[int, WorkUnitStatus] = {}
        if self.terminal:
            self.out.write("\x1b[?25l")  # no cursor blinking over the bars

    def answer(self, record: ExperimentRecord, statuses: Dict[int, WorkUnitStatus],
               tails: Mapping[Tuple[int, int], List[str]]) -> None:
        self.record, self.statuses = record, statuses
        failed = [(wid, t) for wid, s in statuses.items() for t in s.tasks
                  if t.state in (TaskState.FAILED, TaskState.UNKNOWN) and (wid, t.task) not in self.shown]
        self.shown.update((wid, t.task) for wid, t in failed)
        lines = [line for wid, t in failed[:self.MAX_FAILURES_SHOWN]
                 for line in _failure_lines(record, wid, t, tails)]
        if len(failed) > self.MAX_FAILURES_SHOWN:
            lines.append(f"... and {len(failed) - self.MAX_FAILURES_SHOWN} more; "
                         f"lxm3 status {record.experiment_id} WID lists them")
        if self.terminal:
            self._erase()
            width = _terminal_width(self.out)
            self.out.write("".join(line[:width - 1] + "\n" for line in lines))
            self._draw(None)
            return
        stamp = f"[{_duration_text(_since_launch(record))}]"
        for wid, status in statuses.items():
            text = _counts_text(status)
            if self.said.get(wid) != text:
                self.said[wid] = text
                self.out.write(f"{stamp} work unit {wid}: {text}\n")
        self.out.write("".join(f"{line}\n" if line.startswith("  |") else f"{stamp} {line}\n"
                               for line in lines))
        self.out.flush()

    def tick(self, seconds_left: float) -> None:
        if self.terminal and self.record is not None:
            self._erase()
            self._draw(seconds_left)

    def close(self) -> None:
        if self.terminal:
            self.out.write("\x1b[?25h")
            self.out.flush()

    def _erase(self) -> None:
        if self.drawn:
            self.out.write(f"\r\x1b[{self.drawn}A\x1b[J")
            self.drawn = 0

    def _draw(self, seconds_left: Optional[float]) -> None:
        record, width = self.record, _terminal_width(self.out)
        assert record is not None
        active = any(s.is_active for s in self.statuses.values())
        header = f"experiment {record.experiment_id} {record.title!r}: {_duration_text(_since_launch(record))} since launch"
        if active:
            header += "" if seconds_left is None else f"; next query in {_duration_text(seconds_left)}"
        lines = [header[:width - 1]]
        units = list(self.statuses.items())
        room = _terminal_size(self.out, 1, "LINES", 24) - 2  # lines above the screen cannot be redrawn
        shown = units if len(units) <= room else units[:room - 1]
        lines += [unit_line(wid, status, width, self.colour) for wid, status in shown]
        if len(shown) < len(units):
            rest = WorkUnitStatus([t for _, s in units[len(shown):] for t in s.tasks])
            lines.append(f"... {len(units) - len(shown)} more work units: {_counts_text(rest)}"[:width - 1])
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)


def watch(experiment_id: Union[int, str], work_unit: Optional[int] = None,
          interval: float = WATCH_INTERVAL) -> int:
    """``lxm3 status --watch``: show the tasks' progress until every one has ended.
    Exit status 0 if all completed, else 1."""
    view = _WatchView(experiment_id, sys.stdout)
    try:
        record, statuses = follow_experiment(experiment_id, work_unit, interval, on_answer=view.answer,
                                             on_wait=view.tick, log_tails=True)
    finally:
        view.close()
    _remember_conclusion(record, statuses, work_unit)
    print("\n".join(_summary_lines(record, statuses)))
    return 0 if _all_completed(statuses) else 1


def wait_for(experiment_ids: Sequence[Union[int, str]], work_unit: Optional[int] = None,
             interval: float = WATCH_INTERVAL, timeout: Optional[float] = None) -> int:
    """``lxm3 wait``: block until every task of the experiments has ended; print a
    summary. Exit status 0 if all completed, 1 if not, WAIT_TIMEOUT_EXIT after
    ``timeout`` seconds; on a terminal, a progress line on stderr meanwhile."""
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    for experiment_id in experiment_ids:
        progress = _WaitProgress(experiment_id) if _is_terminal(sys.stderr) else None
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            record, statuses = follow_experiment(experiment_id, work_unit, interval, left,
                                                 on_answer=progress.answer if progress else None)
        except WaitTimeout as e:
            if progress:
                progress.clear()
            counts = [f"work unit {wid}: {_counts_text(s)}" for wid, s in e.statuses.items() if s.is_active]
            print(f"lxm3: experiment {experiment_id}: timed out after {_duration_text(timeout or 0)}: "
                  f"{e} ({'; '.join(counts)})", file=sys.stderr)
            return WAIT_TIMEOUT_EXIT
        finally:
            if progress:
                progress.clear()
        _remember_conclusion(record, statuses, work_unit)
        print("\n".join(_summary_lines(record, statuses)))
        code = max(code, 0 if _all_completed(statuses) else 1)
    return code


class _WaitProgress:
    """``lxm3 wait`` on a terminal: one line on stderr, rewritten after each query."""

    def __init__(self, experiment_id: Union[int, str]):
        self.experiment_id, self.shown = experiment_id, False

    def answer(self, record: ExperimentRecord, statuses: Mapping[int, WorkUnitStatus], tails: Any) -> None:
        tasks = WorkUnitStatus([t for s in statuses.values() for t in s.tasks])
        text = (f"lxm3: waiting for experiment {self.experiment_id}: {_counts_text(tasks)} "
                f"({_duration_text(_since_launch(record))} since launch)")
        sys.stderr.write("\r\x1b[K" + text[:_terminal_width(sys.stderr) - 1])
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


# ---------------------------------------------------------------------------
# lxm3 0.4.2's modules: xm_cluster.executors, contrib.ucl, contrib.wandb, ...
# ---------------------------------------------------------------------------
#
# Launchers written for lxm3 0.4.2 import its submodules (``from lxm3.contrib
# import ucl``, ``from lxm3.xm_cluster.executors import Slurm``). This one file
# serves them the way ``six`` serves ``six.moves``: ``__path__`` lets Python
# import submodules of ``lxm3``, and a finder on ``sys.meta_path`` makes each
# module the first time it is imported. Their names are looked up here when
# used, so ``lxm3.xm_cluster.executors.Slurm is lxm3.Slurm``.

Command = ClusterExecutable  # lxm3 0.4.2's name for a packaged executable


def flatten_array_job(job: ArrayJob) -> List[xm.Job]:
    """One ``xm.Job`` per task of ``job`` (lxm3 0.4.2's helper)."""
    return [xm.Job(job.executable, job.executor, args=args, env_vars=env)
            for args, env in zip(job.args, job.env_vars)]


# -- contrib.ucl: GridEngine for UCL's clusters --------------------------------

UCL_CLUSTERS = ("cs", "myriad")


def _ucl_resources(requirements: xm.JobRequirements, cluster: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The ``-l`` resources and ``-pe`` parallel environments that ``cluster``
    wants for cpu, ram and gpu requirements, by lxm3 0.4.2's rules."""
    resources: Dict[str, Any] = {}
    parallel_environments: Dict[str, Any] = {}
    for resource, amount in requirements.task_requirements.items():
        # Amounts are kept as floats; Grid Engine reads 8000000000, not 8000000000.0.
        amount = int(amount) if float(amount).is_integer() else amount
        if resource == xm.ResourceType.RAM:
            if cluster == "cs":
                resources.update(h_vmem=amount, tmem=amount)
            else:
                resources["mem"] = amount
        elif resource == xm.ResourceType.GPU:
            if amount > 0 and cluster == "cs":
                resources["gpu"] = "true"  # a GPU node; several GPUs are a parallel environment
                if amount > 1:
                    parallel_environments["gpu"] = amount
            elif amount > 0:
                resources["gpu"] = amount
        elif resource == xm.ResourceType.CPU:
            if amount > 1:
                parallel_environments["smp"] = amount
        else:
            raise ValueError(
                f"UclGridEngine turns cpu, ram and gpu into UCL's resources; {resource}={amount} "
                "has no rule: ask for gpu=N, or pass resources={...} for what else you need"
            )
    if cluster == "cs" and "gpu" in resources:
        resources.pop("h_vmem", None)  # GPU jobs on cs ask for tmem only
    return resources, parallel_environments


def UclGridEngine(requirements: xm.JobRequirements, walltime: Walltime = None,  # noqa: N802
                  **kwargs: Any) -> GridEngine:
    """A GridEngine for UCL's clusters "cs" and "myriad" (lxm3 0.4.2's ``lxm3.contrib.ucl``).

    Made from cpu, ram and gpu requirements by lxm3 0.4.2's rules. On cs, ram is ``tmem`` (and ``h_vmem`` without a GPU), a GPU is
    ``gpu=true`` and more than one a ``gpu`` parallel environment; on myriad,
    ram is ``mem``, GPUs are ``gpu=N`` and the ``singularity-env`` module is
    loaded. More than one CPU is the ``smp`` parallel environment on both.
    The cluster is ``cluster=...``, else ``$LXM_CLUSTER``, else the config's
    first; other keyword arguments are GridEngine's (``resources`` and
    ``parallel_environments`` given here are added to the derived ones).

    Args:
      requirements: ``xm.JobRequirements`` with ``cpu``, ``ram`` and ``gpu``
        only (anything else, a GPU model included, is a ValueError; so is a
        ``location``). Amounts are passed as Grid Engine numbers: ``ram=8 *
        xm.GiB`` is ``-l mem=8589934592`` (bytes) on myriad. They become
        ``resources``/``parallel_environments``, not the GridEngine's
        ``requirements``.
      walltime: as ``GridEngine``'s: ``-l h_rt=HH:MM:SS``.
      **kwargs: any other ``GridEngine`` parameter by name: ``cluster``
        (``"cs"`` or ``"myriad"``; another name is a ConfigError; default
        ``$LXM_CLUSTER``, else the first cluster of the config file in force,
        read when this is called), ``resources`` and
        ``parallel_environments`` (merged over the derived ones), ``modules``
        (after ``singularity-env`` on myriad), ``queue``, ...
    """
    if requirements.location is not None:
        raise ValueError("UclGridEngine does not take requirements.location: the cluster is "
                         "cluster=..., else $LXM_CLUSTER, else the first in the config")
    cluster = kwargs.get("cluster") or load_config().default_cluster()
    if cluster not in UCL_CLUSTERS:
        raise ConfigError(
            f"UclGridEngine has rules for UCL's clusters 'cs' and 'myriad', not {cluster!r}: "
            "name your UCL cluster cs or myriad in the config, or use GridEngine"
        )
    resources, parallel_environments = _ucl_resources(requirements, cluster)
    resources.update(kwargs.pop("resources", None) or {})
    parallel_environments.update(kwargs.pop("parallel_environments", None) or {})
    if cluster == "myriad":
        kwargs["modules"] = ["singularity-env", *(kwargs.get("modules") or [])]
    return GridEngine(resources=resources, parallel_environments=parallel_environments,
                      walltime=walltime, **kwargs)


# -- contrib.wandb: Weights & Biases settings per work unit --------------------


def _git_env_for_wandb() -> Dict[str, str]:
    """The launcher's repository as W&B records it: origin's URL and HEAD."""
    import subprocess

    launcher = xm.utils.find_launch_script_path()
    directory = os.path.dirname(launcher) if launcher else os.getcwd()
    env = {}
    for name, command in (("WANDB_GIT_REMOTE_URL", ["config", "--get", "remote.origin.url"]),
                          ("WANDB_GIT_COMMIT", ["rev-parse", "HEAD"])):
        try:
            proc = subprocess.run(["git", "-C", directory, *command], capture_output=True, text=True)
        except OSError:  # no git here
            return {}
        if proc.returncode == 0 and proc.stdout.strip():
            env[name] = proc.stdout.strip()
    return env


def configure_wandb(project: str, entity: str, group: str = "{title}_{xid}_{wid}",
                    mode: str = "online") -> Callable[[Any], Any]:
    """Weights & Biases variables for every work unit (lxm3 0.4.2's ``lxm3.contrib.wandb``).

    ``log_to_wandb = configure_wandb("project", "entity")``, then
    ``experiment.add(log_to_wandb(job))`` for an ``xm.Job`` or an ``ArrayJob``:
    its tasks get WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_RUN_GROUP
    (``group`` with the title, experiment id and work unit id), WANDB_NAME
    (``{title}_{xid}_{wid}``; ``_{task + 1}`` is added for each ArrayJob task)
    and, from the launcher's git repository, WANDB_GIT_REMOTE_URL and
    WANDB_GIT_COMMIT. wandb itself is not needed: the tasks' wandb reads these.

    These override the job's own ``env_vars`` of the same names. The git
    values are read once, when ``configure_wandb`` is called. The wrapper
    refuses anything but an ``xm.Job`` or ``ArrayJob`` (TypeError), and an
    ArrayJob's work unit takes no ``experiment.add(..., args=...)``
    (ValueError: give its tasks' args in the ArrayJob).

    Args:
      project: WANDB_PROJECT.
      entity: WANDB_ENTITY (a W&B user or team).
      group: WANDB_RUN_GROUP, a ``str.format`` template of ``{title}`` (the
        experiment's), ``{xid}`` (its id) and ``{wid}`` (the work unit's).
        Default ``"{title}_{xid}_{wid}"``.
      mode: WANDB_MODE: ``"online"``, ``"offline"`` or ``"disabled"``.
        Default ``"online"``.
    """
    shared = {"WANDB_PROJECT": project, "WANDB_ENTITY": entity, "WANDB_MODE": mode,
              **_git_env_for_wandb()}

    def add_wandb_env_vars(job: Union[xm.Job, ArrayJob]) -> Callable[..., Any]:
        if not isinstance(job, (xm.Job, ArrayJob)):
            raise TypeError(f"configure_wandb's wrapper takes an xm.Job or an ArrayJob, "
                            f"not {type(job).__name__}")

        async def add_with_wandb_env(work_unit: ClusterWorkUnit, **args: Any) -> None:
            title, xid, wid = (work_unit.experiment.experiment_title, work_unit.experiment_id,
                               work_unit.work_unit_id)
            run = {**shared, "WANDB_RUN_GROUP": group.format(title=title, xid=xid, wid=wid)}
            name = f"{title}_{xid}_{wid}"
            if isinstance(job, ArrayJob):
                if args:
                    raise ValueError("an ArrayJob takes its tasks' arguments as ArrayJob(args=[...]), "
                                     "not experiment.add(..., args=...)")
                env = [{**task_env, **run, "WANDB_NAME": f"{name}_{task + 1}"}
                       for task, task_env in enumerate(job.env_vars)]
                await work_unit.add(ArrayJob(job.executable, job.executor, job.name, job.args, env))
            else:
                env = {**job.env_vars, **run, "WANDB_NAME": name}
                await work_unit.add(xm.Job(job.executable, job.executor, job.name, job.args, env),
                                    args=args or None)

        return add_with_wandb_env

    return add_wandb_env_vars


# -- singularity: image URIs ----------------------------------------------------

_IMAGE_TRANSPORTS = frozenset({"library", "shub", "docker", "docker-archive", "docker-daemon", "oci",
                               "oci-archive", "http", "https", "oras"})


def _image_uri_is_valid(uri: str) -> Tuple[bool, str]:
    """``(True, "")`` for ``transport:ref`` with a transport Singularity knows."""
    parts = uri.split(":")
    if len(parts) == 2 and parts[0] in _IMAGE_TRANSPORTS:
        return True, ""
    return False, f"invalid uri {uri}"


def _image_uri_split(uri: str) -> Tuple[str, str]:
    """``docker://ubuntu`` -> ``("docker", "//ubuntu")``; a file path -> ``("", path)``."""
    transport, colon, ref = uri.partition(":")
    if colon and (ref.startswith("//") or _image_uri_is_valid(uri)[0]):
        return transport, ref
    return "", uri


def _image_uri_filename(uri: str, suffix: str) -> str:
    """The file Singularity pulls ``uri`` into: ``docker://a/lolcow:v1`` -> ``lolcow_v1.<suffix>``;
    "" for a file path."""
    transport, ref = _image_uri_split(uri)
    if not transport:
        return ""
    last = ref.lstrip("/").split("/")[-1]
    if transport in ("http", "https"):
        return last
    image, _, tags = last.partition(":")
    return f"{image}_{tags.split(',')[0] if tags else 'latest'}.{suffix}"


def _build_singularity_image(image_path: str, build_spec: str, force: bool = True) -> None:
    """``singularity build [--force] IMAGE SPEC`` (lxm3 0.4.2's helper)."""
    import shutil
    import subprocess

    runtime = shutil.which("singularity") or shutil.which("apptainer")
    if runtime is None:
        raise BuildError("building a Singularity image needs singularity or apptainer on the PATH")
    os.makedirs(os.path.dirname(os.path.abspath(image_path)), exist_ok=True)
    subprocess.run([runtime, "build", *(["--force"] if force else []), os.fspath(image_path),
                    build_spec], check=True)


# -- the module names -----------------------------------------------------------

# Each module of lxm3 0.4.2 that launchers import, and the public names it has:
# "Name" is this module's Name, "name=source" another of its names (``xm.X``: the
# xm package's X) and "name=.child" a submodule. The modules of xm_cluster are
# also lxm3.<name>: xm_cluster is this module.
_MODULES_042 = {
    "xm_cluster.array_job": "ArrayJob flatten_array_job",
    "xm_cluster.config": "Config default=load_config",
    "xm_cluster.executable_specs": "CommandList DockerContainer Fileset ModuleName PDMProject "
                                   "PythonContainer PythonPackage SingularityContainer "
                                   "UniversalPackage name_from_path=_name_from_path",
    "xm_cluster.executables": "Command",
    "xm_cluster.executors": "DockerOptions GridEngine GridEngineSpec JobRequirements Local "
                            "LocalSpec PBS PBSSpec SingularityOptions Slurm SlurmSpec",
    "xm_cluster.experiment": "ClusterExperiment ClusterWorkUnit create_experiment "
                             "get_current_experiment",
    "xm_cluster.requirements": "JobRequirements ResourceDict=xm.ResourceDict "
                               "ResourceQuantity=xm.ResourceQuantity ResourceType=xm.ResourceType",
    "contrib": "ucl=.ucl wandb=.wandb",
    "contrib.ucl": "UclGridEngine",
    "contrib.wandb": "configure_wandb",
    "singularity": "images=.images uri=.uri",
    "singularity.images": "build_singularity_image=_build_singularity_image",
    "singularity.uri": "filename=_image_uri_filename is_valid=_image_uri_is_valid "
                       "split=_image_uri_split",
}


def _key_042(name: str) -> Optional[str]:
    """The entry of _MODULES_042 for ``lxm3.<name>`` (``executors``: ``xm_cluster.executors``)."""
    for key in (name, "xm_cluster." + name):
        if key in _MODULES_042:
            return key
    return None


_modules_made_042: Dict[str, Any] = {}


def _module_042(key: str) -> Any:
    """The module ``lxm3.<key>``, made on first use."""
    module = _modules_made_042.get(key)
    if module is not None:
        return module
    full_name = f"{__name__}.{key}"
    exports = {}
    for item in _MODULES_042[key].split():
        name, _, source = item.partition("=")
        exports[name] = source or name

    def __getattr__(name: str) -> Any:
        source = exports.get(name)
        if source is not None and source.startswith("."):
            import importlib

            return importlib.import_module(full_name + source)
        head, *rest = (source or "").split(".")
        if head not in globals():  # not one of its names, or (PDMProject...) not defined here
            raise AttributeError(f"module {full_name!r} has no attribute {name!r}")
        value = globals()[head]
        for part in rest:
            value = getattr(value, part)
        return value

    module = type(sys)(full_name, f"lxm3 0.4.2's {full_name}, served by {__name__}.py.")
    module.__all__ = sorted(exports)
    module.__getattr__ = __getattr__
    module.__dir__ = lambda: sorted({*vars(module), *exports})
    if any(source.startswith(".") for source in exports.values()):
        module.__path__ = []  # its submodules can be imported
    return _modules_made_042.setdefault(key, module)  # one module, imported by either name


class _ModuleFinder042:
    """Finds ``lxm3.xm_cluster.executors``, ``lxm3.contrib.ucl``... (the modules
    above) and ``lxm3.xm.<module>`` (the ``xm`` package's own modules)."""

    _lxm3_042 = True  # a reloaded lxm3 replaces the finder of the old one

    def __init__(self, prefix: str):
        self.prefix = prefix  # "lxm3."

    def _xm_module(self, name: str) -> Optional[str]:
        """``xm.utils`` for ``lxm3.xm.utils`` if there is such a module; else None."""
        if name != "xm" and not name.startswith("xm."):
            return None
        import importlib.util

        real = "xm" + name[2:]
        return real if name == "xm" or importlib.util.find_spec(real) is not None else None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith(self.prefix):
            return None
        name = fullname[len(self.prefix):]
        if _key_042(name) is None and self._xm_module(name) is None:
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: Any) -> None:
        return None  # a placeholder, replaced by exec_module

    def exec_module(self, placeholder: Any) -> None:
        # The import statement returns what sys.modules holds for the name once
        # this returns: the module itself, never a copy (xm is not loaded twice).
        name = placeholder.__name__[len(self.prefix):]
        real = self._xm_module(name)
        if real is not None:
            import importlib

            sys.modules[placeholder.__name__] = importlib.import_module(real)
        else:
            sys.modules[placeholder.__name__] = _module_042(_key_042(name))


def __getattr__(name: str) -> Any:
    """``xm_cluster.executors`` and lxm3 0.4.2's other modules, made on first use."""
    if _key_042(name) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


if __name__ != "__main__":  # ``python -m lxm3`` imports lxm3 again, which does this
    __path__ = []  # read by the import system: lxm3 has submodules
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_lxm3_042", False)]
    sys.meta_path.insert(0, _ModuleFinder042(__name__ + "."))


# ---------------------------------------------------------------------------
# Cleaning up: what no experiment still needs
# ---------------------------------------------------------------------------
#
# ``lxm3 clean`` removes, on each cluster of the config, what no kept
# experiment needs, by type (lxm3 0.4.2's words, and env):
#   job        experiment directories, <staging>/experiments/<id>: job scripts,
#              tasks files, the submission log and the logs written there;
#   archive    <staging>/archives/*, and here the cache of built archives;
#   container  <staging>/images/*: the .sif files launches sent;
#   env        managed environments (and what interrupted builds left).
# An experiment directory stays while a job its submission log names is queued
# or running (the scheduler is asked: this covers launches from other machines
# too), while a submission holds its lock, while anything in it changed in the
# last --days and, whatever --days says, in the last hour (a launch from
# another machine may be between copying and submitting it). What a kept
# directory's job scripts name (archive, image, environment) stays.
#
# Per cluster: one round trip lists everything with sizes and times (and the
# queue), one removes. The removal holds a lock (one clean at a time) and checks
# each item again: a directory changed since the listing, a submission under
# way, a job queued meanwhile, or a file that a job script written meanwhile
# names, stays. A launch that finds an archive gone when it checks the staged
# files sends it again (see verify_staged_files).

CLEAN_TYPES = ("job", "archive", "container", "env")  # lxm3 0.4.2's --type words, and env
CLEAN_DEFAULT_DAYS = 30
CLEAN_GRACE_SECONDS = 3600  # what changed this recently may belong to a launch under way: kept
CLEAN_LOCK = ".lxm3-clean.lock"  # in the staging directory: one removal at a time
LOCAL_CLUSTER = "(this machine)"  # CleanItem.cluster of the local archive cache


class CleanItem(ValueObject):
    """One thing a cleaner found: removed (or, in a dry run, to remove) or kept, and why."""

    def __init__(self, cluster: str, kind: str, path: str, files: Optional[int], size: Optional[int],
                 remove: bool, why: str, name: str = ""):
        self.cluster = cluster
        self.kind = kind  # a CLEAN_TYPES word
        self.path = path
        self.files = files
        self.size = size
        self.remove = remove
        self.why = why
        self.name = name  # how the removal script names it: the experiment id, archives/NAME, ...


# Bash: the user's queued and running jobs on each of ``schedulers`` installed there:
# "queue NAME" then "active ID" lines, or "noqueue NAME" when it cannot be read.
def _queue_lines(schedulers: Sequence[Scheduler]) -> str:
    return "".join(
        f"if command -v {s.submit_command} >/dev/null 2>&1; then\n"
        f"  if lxm_q=$(set -o pipefail; {{ {s.active_jobs_command()}; }} 2>/dev/null </dev/null); then\n"
        f"    echo 'queue {s.name}'; printf '%s\\n' \"$lxm_q\" | sed -n 's/^ *\\([^ ][^ ]*\\).*/active \\1/p'\n"
        f"  else echo 'noqueue {s.name}'; fi\nfi\n" for s in schedulers)


def _cluster_schedulers(cluster: ClusterConfig, records: Sequence[ExperimentRecord]) -> List[Scheduler]:
    """The schedulers whose queue tells whether a cluster's staged files are in use:
    those its records (or its config's ``bin_dir``) name; all, if none does. (A
    login node may have other schedulers' commands, unconfigured, whose queue
    cannot be read: asking them would keep everything, for ever.)"""
    names = {u.scheduler for r in records for u in r.work_units if u.cluster == cluster.name}
    names |= {name for name in SCHEDULERS if cluster.scheduler_bin(name)}
    return [s for name, s in SCHEDULERS.items() if name in names] or list(SCHEDULERS.values())


_LOCKED_FUNCTION = """
lxm_locked() {  # 1 when someone holds the lock file $1 (a launch, a submission)
  [ -e "$1" ] && command -v flock >/dev/null 2>&1 || { echo 0; return; }
  if flock -n "$1" true 2>/dev/null; then echo 0; else echo 1; fi
}
"""

# Bash: what the staging directory $1 holds, one line each: "now EPOCH",
# "staging ABSOLUTE_PATH", "exp NEWEST_EPOCH BYTES FILES LOCKED XID", "jobid ID
# XID" (its submission log), "ref XID WORD" (archives/NAME, images/NAME,
# lxm_env=PATH named by its job scripts), "file EPOCH BYTES archives/NAME".
_LIST_STAGING = _LOCKED_FUNCTION + f"""
echo "now $(date +%s)"
cd "$HOME"
if [ -d "$1" ] && cd -- "$1"; then
  echo "staging $(pwd -P)"
  for lxm_e in experiments/*; do
    [ -d "$lxm_e" ] || continue
    lxm_x=${{lxm_e#experiments/}}
    read -r lxm_t lxm_s lxm_n < <(find "$lxm_e" -printf '%T@ %s %y\\n' 2>/dev/null |
      awk '{{ t = int($1); if (t > m) m = t; if ($3 == "f") {{ s += $2; n++ }} }} END {{ printf "%d %d %d\\n", m, s, n }}')
    echo "exp $lxm_t $lxm_s $lxm_n $(lxm_locked "$lxm_e/{SUBMISSION_LOCK}") $lxm_x"
    [ ! -f "$lxm_e/{SUBMISSION_LOG}" ] || awk -v x="$lxm_x" 'NF >= 2 {{ print "jobid", $2, x }}' "$lxm_e/{SUBMISSION_LOG}"
    for lxm_j in "$lxm_e"/*/job.sh; do
      [ -f "$lxm_j" ] && grep -oE "(archives|images)/[^/'\\" ]+|^lxm_env=.*" -- "$lxm_j"
    done | sort -u | while IFS= read -r lxm_r; do echo "ref $lxm_x $lxm_r"; done
  done
  for lxm_f in archives/* images/*; do
    [ -f "$lxm_f" ] && echo "file $(stat -c '%Y %s' -- "$lxm_f") $lxm_f"
  done
fi
true
"""

# Bash: the removal's functions, run in the staging directory under CLEAN_LOCK.
# Each prints "removed KIND NAME" or why not ("busy", "changed", "active", "used", "gone").
_REMOVE_STAGED = f"""
lxm_gone() {{  # move $1 aside, then delete it: a half-deleted directory is never under its name
  mv -- "$1" "$2" && chmod -R u+rwX -- "$2" 2>/dev/null; rm -rf -- "$2"
}}
lxm_job() {{  # XID LISTED_AT: an experiment directory, unless it changed or is in use
  local d="experiments/$1"
  [ -d "$d" ] || {{ echo "gone job $1"; return; }}
  if [ -n "$(find "$d" -mindepth 1 -newermt "@$2" ! -name {SUBMISSION_LOCK} -print -quit 2>/dev/null)" ]; then
    echo "changed job $1"; return
  fi
  case $lxm_active in *" NOQUEUE "*) [ ! -s "$d/{SUBMISSION_LOG}" ] || {{ echo "active job $1"; return; }} ;; esac
  for lxm_id in $(awk '{{ print $2 }}' "$d/{SUBMISSION_LOG}" 2>/dev/null); do
    case $lxm_active in *" $lxm_id "*) echo "active job $1"; return ;; esac
  done
  exec 8>>"$d/{SUBMISSION_LOCK}"
  if command -v flock >/dev/null 2>&1 && ! flock -n 8; then echo "busy job $1"; exec 8>&-; return; fi
  lxm_gone "$d" "experiments/$1.removing-$$" && echo "removed job $1" || echo "failed job $1"
  exec 8>&-
}}
lxm_named() {{  # WORD: a job script of an experiment directory there names it
  grep -qsF -- "$1" experiments/*/*/job.sh </dev/null
}}
lxm_file() {{  # KIND FOLDER/NAME LISTED_MTIME: an archive or image no job script names
  [ -f "$2" ] || {{ echo "gone $1 $2"; return; }}
  [ "$(stat -c %Y -- "$2")" = "$3" ] || {{ echo "changed $1 $2"; return; }}
  if lxm_named "$2"; then echo "used $1 $2"; return; fi
  rm -f -- "$2" "${{2%/*}}/.${{2##*/}}.verified" && echo "removed $1 $2" || echo "failed $1 $2"
}}
"""


def _record_time(record: ExperimentRecord, now: float) -> float:
    import datetime

    try:
        return datetime.datetime.fromisoformat(record.created).timestamp()
    except ValueError:
        return now  # unreadable: as if new, to be safe


def _ago(now: float, then: float) -> str:
    days = max(0.0, now - then) / 86400
    return f"{days:.1f} days ago" if days >= 0.1 else f"{max(0.0, now - then) / 60:.0f} minutes ago"


class _Listing:
    """What the listing round trip printed about one cluster."""

    def __init__(self, output: str):
        self.now = time.time()
        self.staging: Optional[str] = None
        self.experiments: Dict[str, Tuple[int, int, int, bool]] = {}  # xid: newest, bytes, files, locked
        self.job_ids: Dict[str, Set[str]] = {}
        self.refs: Dict[str, Set[str]] = {}  # xid: archives/NAME, images/NAME, env:KEY
        self.files: List[Tuple[str, int, int]] = []  # (archives/NAME, mtime, bytes)
        self.active: Optional[Set[str]] = set()  # None: a queue could not be read
        self.schedulers: Sequence[Scheduler] = list(SCHEDULERS.values())  # whose queues were asked
        self.env_lines: List[str] = []
        queues = 0
        for line in output.splitlines():
            word, _, rest = line.partition(" ")
            if word == "now" and rest.strip().isdigit():
                self.now = int(rest)
            elif word == "staging":
                self.staging = rest.strip()
            elif word == "exp":
                parts = rest.split(" ", 4)
                if len(parts) == 5 and all(p.isdigit() for p in parts[:3]):
                    self.experiments[parts[4]] = (int(parts[0]), int(parts[1]), int(parts[2]), parts[3] == "1")
            elif word == "jobid":
                job_id, _, xid = rest.partition(" ")
                self.job_ids.setdefault(xid, set()).add(job_id)
            elif word == "ref":
                xid, _, ref = rest.partition(" ")
                if ref.startswith("lxm_env="):
                    ref = "env:" + os.path.basename(ref[8:].strip("'\" ").rstrip("/"))
                self.refs.setdefault(xid, set()).add(ref)
            elif word == "file":
                parts = rest.split(" ", 2)
                if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                    self.files.append((parts[2], int(parts[0]), int(parts[1])))
            elif word == "active" and self.active is not None:
                self.active.add(rest.strip())
            elif word == "queue":
                queues += 1
            elif word == "noqueue":
                self.active = None
            elif word == "E":
                self.env_lines.append(rest)
        if not queues:  # no scheduler answered: nothing tells which jobs still run
            self.active = None


def _list_cluster(cluster: ClusterConfig, connection: Connection, types: Sequence[str],
                  schedulers: Sequence[Scheduler]) -> _Listing:
    """One round trip: the staging directory, the queue and (for env) the managed environments."""
    staging = _staging_path(cluster)
    script = f"( set -- {shell_quote(staging)}\n{_LIST_STAGING}\n)\n" + _queue_lines(schedulers)
    if "env" in types:
        incoming = shell_quote(staging + "/" + ENVIRONMENT_INCOMING)
        script += (f"( set -- {shell_quote(_environments_path(cluster))} {incoming}\n{_LIST_ENVIRONMENTS}\n)"
                   " | sed 's/^/E /'\n")
    listing = _Listing(connection.run_script(script, "listing what lxm3 left there"))
    listing.schedulers = list(schedulers)  # the removal asks the same queues again
    return listing


def _plan_cluster(cluster: ClusterConfig, listing: _Listing, records: Sequence[ExperimentRecord],
                  types: Sequence[str], days: float, project: Optional[str]) -> List[CleanItem]:
    """Decide, for everything listed, whether it goes and why (see the section's comment)."""
    now, staging = listing.now, listing.staging
    if staging is None:
        return []
    cutoff = now - days * 86400
    recent_cutoff = min(cutoff, now - CLEAN_GRACE_SECONDS)
    prefix = f"{staging}/experiments/"
    mine: Dict[str, List[Tuple[ExperimentRecord, WorkUnitRecord]]] = {}
    for record in records:
        for unit in record.work_units:
            if unit.cluster == cluster.name and (unit.job_directory or "").startswith(prefix):
                mine.setdefault(unit.job_directory[len(prefix):].split("/")[0], []).append((record, unit))
    items: List[CleanItem] = []
    kept_refs: Dict[str, str] = {}  # what kept experiments name: the first such experiment
    project_refs: Set[str] = set()  # what experiments of --project name
    for xid, (newest, size, files, locked) in sorted(listing.experiments.items()):
        ours = mine.get(xid, [])
        if project is not None and any(record.project == project for record, _ in ours):
            project_refs |= listing.refs.get(xid, set())
            project_refs |= {ref for _, unit in ours for ref in _unit_refs(unit)}
        active = sorted(listing.job_ids.get(xid, set()) & (listing.active or set()))
        created = max((_record_time(record, now) for record, _ in ours), default=0.0)
        if ".removing-" in xid:
            remove, why = True, "left by an interrupted lxm3 clean"
        elif locked:
            remove, why = False, "a submission holds it now"
        elif active:
            remove, why = False, f"job {', '.join(active)} queued or running"
        elif listing.active is None and listing.job_ids.get(xid):
            remove, why = False, "the queue could not be read: its jobs may be queued or running"
        elif any(unit.state == UnitState.SUBMITTING for _, unit in ours):
            remove, why = False, "its launch is still submitting"
        elif newest >= recent_cutoff or created >= cutoff:
            remove, why = False, f"changed {_ago(now, max(newest, created))} (younger than " + (
                f"{days:g} days)" if newest >= cutoff or created >= cutoff else "an hour: a launch may be under way)")
        elif project is not None and not ours:
            remove, why = False, f"no record of it here: its project is unknown (--project {project})"
        elif project is not None and not any(record.project == project for record, _ in ours):
            remove, why = False, f"of project {ours[0][0].project or '(none)'}, not {project}"
        elif "job" not in types:
            remove, why = False, "--type job not chosen"
        else:
            remove, why = True, f"last changed {_ago(now, newest)}; no job queued or running"
        if not remove:
            for ref in listing.refs.get(xid, ()):
                kept_refs.setdefault(ref, xid)
        if "job" in types:
            items.append(CleanItem(cluster.name, "job", prefix + xid, files, size, remove, why, xid))
    for path, mtime, size in listing.files:
        kind = "archive" if path.startswith("archives/") else "container"
        if kind not in types:
            continue
        if path in kept_refs:
            remove, why = False, f"experiment {kept_refs[path]} uses it"
        elif mtime >= cutoff:
            remove, why = False, f"copied {_ago(now, mtime)} (younger than {days:g} days)"
        elif project is not None and path not in project_refs:
            remove, why = False, f"not used by an experiment of project {project} recorded here"
        else:
            remove, why = True, "no kept experiment uses it"
        items.append(CleanItem(cluster.name, kind, f"{staging}/{path}", 1, size, remove, why, path))
    if "env" in types:
        items += _plan_environments(cluster, listing, records, cutoff, days, kept_refs, project, project_refs)
    return items


def _unit_refs(unit: WorkUnitRecord) -> Set[str]:
    """What a work unit's record says it uses, as the listing names it."""
    refs = set()
    for path, folder in ((unit.archive, "archives"), (unit.image, "images")):
        if path and os.path.basename(os.path.dirname(path)) == folder:
            refs.add(f"{folder}/{os.path.basename(path)}")
    if unit.environment:
        refs.add("env:" + os.path.basename(unit.environment))
    return refs


def _plan_environments(cluster: ClusterConfig, listing: _Listing, records: Sequence[ExperimentRecord],
                       cutoff: float, days: float, kept_refs: Mapping[str, str], project: Optional[str],
                       project_refs: Set[str]) -> List[CleanItem]:
    """The managed environments: kept while a kept experiment or a recent record
    uses them, a job of a record may, a launch holds their lock, or a launch
    (from any machine) used them in the last --days; and what interrupted builds left."""
    lines = [line.split() for line in listing.env_lines if line.strip()]
    envs = next((words[1] for words in lines if words[0] == "envs"), None)
    if envs is None:
        return []
    now = listing.now
    staging = listing.staging
    recent, running = {}, {}
    for record in records:
        for unit in record.work_units:
            if unit.cluster != cluster.name or not unit.environment or os.path.dirname(unit.environment) != envs:
                continue
            key = os.path.basename(unit.environment)
            if project is not None and record.project == project:
                project_refs.add("env:" + key)
            if _record_time(record, now) >= cutoff:
                recent[key] = record.experiment_id
            if unit.state == UnitState.SUBMITTING or listing.active is None and unit.arrays \
                    or listing.active and any(job_id in listing.active for job_id in unit.job_ids):
                running[key] = record.experiment_id
    items = []
    for words in lines:
        if words[0] == "env" and len(words) >= 7:
            key, files, size, used, locked, complete = words[1:7]
            used_at = int(used) if used.isdigit() else int(now)
            if locked == "1":
                why, remove = "a launch holds it now", False
            elif key in running:
                why, remove = f"jobs of experiment {running[key]} may be using it (queued or running)", False
            elif "env:" + key in kept_refs:
                why, remove = f"experiment {kept_refs['env:' + key]} uses it", False
            elif key in recent:
                why, remove = f"experiment {recent[key]} uses it (younger than {days:g} days)", False
            elif used_at >= cutoff:
                why, remove = f"a launch used it {_ago(now, used_at)}", False
            elif project is not None and "env:" + key not in project_refs:
                why, remove = f"not used by an experiment of project {project} recorded here", False
            else:
                why, remove = ("no recent experiment uses it" if complete == "1" else
                               "incomplete (no completion marker)"), True
            items.append(CleanItem(cluster.name, "env", f"{envs}/{key}", int(files) if files.isdigit() else None,
                                   int(size) if size.isdigit() else None, remove, why, key))
        elif words[0] == "junk" and len(words) >= 3:
            items.append(CleanItem(cluster.name, "env", f"{envs}/{words[1]}", None, None, words[2] != "1",
                                   "being built now" if words[2] == "1" else "left by an interrupted build",
                                   words[1]))
        elif words[0] == "incoming" and len(words) >= 3 and staging:
            key = words[1].split(".")[0]
            done = any(item.name == key for item in items)
            old = int(words[2]) < cutoff if words[2].isdigit() else False
            items.append(CleanItem(cluster.name, "env", f"{staging}/{ENVIRONMENT_INCOMING}/{words[1]}", 1, None,
                                   done or old, "an environment archive left after its environment was made"
                                   if done else "an environment archive on its way in", words[1]))
    return items


# Bash: list the managed environments (kept from before issue 15's types: "env" lines).
_LIST_ENVIRONMENTS = _LOCKED_FUNCTION + f"""
cd "$HOME"
if [ -d "$1" ] && cd -- "$1"; then
  echo "envs $(pwd -P)"
  for lxm_d in *; do
    [ -d "$lxm_d" ] || continue
    case $lxm_d in
      *.tmp-*|*.broken-*|*.removing-*) echo "junk $lxm_d $(lxm_locked ".${{lxm_d%%.*}}.lock")" ;;
      *)
        lxm_m="$lxm_d/{ENVIRONMENT_MARKER}"
        lxm_used=$(stat -c %Y -- ".$lxm_d.used" 2>/dev/null || stat -c %Y -- "$lxm_d")
        if [ -f "$lxm_m" ]; then
          echo "env $lxm_d $(sed -n 's/^files //p' "$lxm_m") $(sed -n 's/^bytes //p' "$lxm_m") $lxm_used $(lxm_locked ".$lxm_d.lock") 1"
        else
          echo "env $lxm_d - - $lxm_used $(lxm_locked ".$lxm_d.lock") 0"
        fi ;;
    esac
  done
else
  echo "envs-missing"
fi
cd "$HOME"
if [ -d "$2" ]; then
  for lxm_f in "$2"/*.tar.gz; do
    [ -f "$lxm_f" ] && echo "incoming $(basename -- "$lxm_f") $(stat -c %Y -- "$lxm_f")"
  done
fi
true
"""

# Bash: remove the environment $2 of directory $1 unless a launch holds its lock.
_REMOVE_ENVIRONMENT = """lxm_remove() {
  cd "$HOME" && cd -- "$1" || return 0
  local lock=".${2%%.*}.lock"
  if command -v flock >/dev/null 2>&1 && [ -e "$lock" ]; then
    exec 8>>"$lock"
    flock -n 8 || { echo "busy env $2"; exec 8>&-; return 0; }
  fi
  if [ -e "$2" ]; then
    mv -- "$2" "$2.removing-$$" && chmod -R u+rwX -- "$2.removing-$$" 2>/dev/null
    rm -rf -- "$2.removing-$$" && echo "removed env $2" || echo "failed env $2"
  else
    echo "removed env $2"
  fi
  case $2 in *.*) ;; *) rm -f -- ".$2.used" ;; esac
  exec 8>&- 2>/dev/null
  return 0
}
"""


def _removal_script(cluster: ClusterConfig, listing: _Listing, doomed: Sequence[CleanItem]) -> str:
    """One script removing ``doomed`` under the staging directory's CLEAN_LOCK, checking each again."""
    lines = [_REMOVE_STAGED, _REMOVE_ENVIRONMENT,
             f'cd "$HOME" && cd -- {shell_quote(listing.staging or _staging_path(cluster))} || exit 0',
             f"exec 9>>{CLEAN_LOCK}",
             "if command -v flock >/dev/null 2>&1 && ! flock -w 120 9; then echo lxm3-clean-busy; exit 0; fi",
             "lxm_active=\" $( {\n" + _queue_lines(listing.schedulers) + "} | awk '$1 == \"active\" { printf \"%s \", $2 } "
             "$1 == \"queue\" { q = 1 } $1 == \"noqueue\" { printf \"NOQUEUE \" } "
             "END { if (!q) printf \"NOQUEUE \" }') \""]
    at = int(listing.now)
    for item in doomed:  # experiment directories first: what the rest checks reads the job scripts left
        if item.kind == "job":
            lines.append(f"lxm_job {shell_quote(item.name)} {at}")
    mtimes = {path: mtime for path, mtime, _ in listing.files}
    for item in doomed:
        if item.kind in ("archive", "container"):
            lines.append(f"lxm_file {item.kind} {shell_quote(item.name)} {mtimes.get(item.name, 0)}")
    for item in doomed:
        if item.kind == "env":
            directory, name = os.path.dirname(item.path), os.path.basename(item.path)
            if not name.endswith(".tar.gz") and "." not in name:
                lines.append(f"if lxm_named {shell_quote(name)}; then echo {shell_quote('used env ' + name)}; "
                             f"else ( lxm_remove {shell_quote(directory)} {shell_quote(name)} ); fi")
            else:
                lines.append(f"( lxm_remove {shell_quote(directory)} {shell_quote(name)} )")
    return "\n".join(lines) + "\ntrue\n"


_NOT_REMOVED = {"busy": "in use: a launch or submission took its lock meanwhile",
                "changed": "changed since it was listed: kept",
                "active": "a job of it was queued meanwhile",
                "used": "a job script written meanwhile names it",
                "failed": "could not be removed"}


def _remove_there(cluster: ClusterConfig, connection: Connection, listing: _Listing,
                  doomed: Sequence[CleanItem]) -> None:
    size = sum(item.size or 0 for item in doomed)
    _progress(f"{cluster.name}: removing {_counted(len(doomed), 'item')} ({_size_text(size)}) "
              f"on {connection.target} ...")
    output = connection.run_script(_removal_script(cluster, listing, doomed), "removing what no experiment needs")
    if "lxm3-clean-busy" in output.split():
        raise ClusterError(f"another lxm3 clean has held {listing.staging}/{CLEAN_LOCK} on {connection.target} "
                           "for 2 minutes: nothing was removed; try again when it has ended")
    said = {}
    for line in output.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            said[(parts[1], parts[2])] = parts[0]
    for item in doomed:
        word = said.get(("job" if item.kind == "job" else item.kind, item.name), "")
        if word in ("removed", "gone"):
            continue
        item.remove, item.why = False, _NOT_REMOVED.get(word, "not removed (no answer)")


def _mark_cleaned(cluster: ClusterConfig, listing: _Listing, removed: Sequence[CleanItem],
                  records: Sequence[ExperimentRecord]) -> None:
    """Note in the records of this machine which work units' directories (and logs) went."""
    gone = {item.path for item in removed if item.kind == "job" and item.remove}
    when = _utc_now()
    for record in records:
        changed = False
        for unit in record.work_units:
            directory = os.path.dirname(unit.job_directory or "")
            if unit.cluster == cluster.name and directory in gone and not unit.cleaned:
                unit.cleaned, changed = when, True
        if changed:
            save_record(record)


def _plan_local_archives(records: Sequence[ExperimentRecord], doomed_xids: Set[Tuple[str, int]], days: float,
                         project: Optional[str]) -> List[CleanItem]:
    """The cache of built archives here: an archive goes when it was built or
    last used before --days (and over an hour ago) and no kept record names it."""
    now = time.time()
    cutoff = min(now - days * 86400, now - CLEAN_GRACE_SECONDS)
    archives = os.path.join(cache_dir(), "archives")
    try:
        names = sorted(n for n in os.listdir(archives) if n.endswith(".zip") and not n.startswith("."))
    except FileNotFoundError:
        return []
    kept, ours = {}, set()
    for record in records:
        # Kept: a recent record, local tasks still running, an experiment directory that stays.
        alive = (_record_time(record, now) >= now - days * 86400
                 or any(unit.state == UnitState.RUNNING if unit.is_local
                        else (unit.cluster or "", record.experiment_id) not in doomed_xids
                        for unit in record.work_units))
        for unit in record.work_units:
            name = os.path.basename(unit.archive or "")
            if not name:
                continue
            if project is not None and record.project == project:
                ours.add(name)
            if alive:
                kept.setdefault(name, record.experiment_id)
    items = []
    for name in names:
        path = os.path.join(archives, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if name in kept:
            remove, why = False, f"experiment {kept[name]} uses it"
        elif st.st_mtime >= cutoff:
            remove, why = False, f"built or used {_ago(now, st.st_mtime)}"
        elif project is not None and name not in ours:
            remove, why = False, f"not used by an experiment of project {project} recorded here"
        else:
            remove, why = True, f"built or last used {_ago(now, st.st_mtime)}; no kept experiment uses it"
        items.append(CleanItem(LOCAL_CLUSTER, "archive", path, 1, st.st_size, remove, why, name))
    return items


def _remove_local(doomed: Sequence[CleanItem]) -> None:
    """Delete cached archives (one clean at a time), each unless a launch used it
    meanwhile (reusing one touches it: _cached_archive); and their cache keys."""
    import fcntl

    _progress(f"this machine: removing {_counted(len(doomed), 'cached archive')} "
              f"({_size_text(sum(item.size or 0 for item in doomed))}) ...")
    locks = os.path.join(cache_dir(), "locks")
    make_private_dirs(locks)
    with open(os.open(os.path.join(locks, "archives.lock"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        gone = set()
        for item in doomed:
            try:
                if os.stat(item.path).st_mtime >= time.time() - CLEAN_GRACE_SECONDS:
                    item.remove, item.why = False, "used meanwhile"
                    continue
                os.unlink(item.path)
                gone.add(item.path)
            except FileNotFoundError:
                gone.add(item.path)
            except OSError as e:
                item.remove, item.why = False, f"could not be removed: {e.strerror}"
        keys = os.path.join(cache_dir(), "packages")
        for name in os.listdir(keys) if os.path.isdir(keys) else ():
            data = _read_json(os.path.join(keys, name))
            if isinstance(data, dict) and data.get("path") in gone:
                os.unlink(os.path.join(keys, name))


def clean(config: Config, types: Sequence[str], days: float, dry_run: bool,
          confirm: Callable[[List[CleanItem]], bool], clusters: Optional[Sequence[str]] = None,
          project: Optional[str] = None) -> List[CleanItem]:
    """List, on each cluster of ``config`` (or those named) and here, what
    ``types`` hold; unless ``dry_run``, remove what no experiment needs once
    ``confirm`` (given all of it) agrees. Returns every item found, kept or not.

    One ssh connection per cluster, one round trip to list, one to remove.
    A config without clusters: only this machine's archive cache."""
    for kind in types:
        if kind not in CLEAN_TYPES:
            raise LaunchError(f"lxm3 clean --type {kind}: the types are {', '.join(CLEAN_TYPES)}")
    chosen = [config.cluster(name) for name in clusters] if clusters else config.clusters
    records = list_records()
    items: List[CleanItem] = []
    plans = []
    try:
        for cluster in chosen:
            connection = Connection(cluster)
            plans.append((cluster, connection, None, []))
            _progress(f"{cluster.name}: listing {_staging_path(cluster)} on {connection.target} ...")
            listing = _list_cluster(cluster, connection, types, _cluster_schedulers(cluster, records))
            found = _plan_cluster(cluster, listing, records, types, days, project)
            plans[-1] = (cluster, connection, listing, found)
            items += found
        doomed_xids = {(cluster.name, int(item.name)) for cluster, _, _, found in plans
                       for item in found if item.kind == "job" and item.remove and item.name.isdigit()}
        if "archive" in types:
            items += _plan_local_archives(records, doomed_xids, days, project)
        doomed = [item for item in items if item.remove]
        if dry_run or not doomed or not confirm(doomed):
            if not dry_run:
                for item in doomed:
                    item.remove, item.why = False, "not confirmed"
            return items
        for cluster, connection, listing, found in plans:
            mine = [item for item in found if item.remove]
            if mine:
                _remove_there(cluster, connection, listing, mine)
                _mark_cleaned(cluster, listing, mine, records)
        local = [item for item in doomed if item.cluster == LOCAL_CLUSTER]
        if local:
            _remove_local(local)
        return items
    finally:
        for _, connection, _, _ in plans:
            connection.close()


def _confirm_removal(items: List[CleanItem]) -> bool:
    """Ask on the terminal before removing (``--force`` does not ask)."""
    size = sum(item.size or 0 for item in items)
    print(f"remove {_counted(len(items), 'item')} ({_size_text(size)}) listed above? [y/N] ", end="", flush=True)
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except KeyboardInterrupt:
        return False


def _cmd_clean(args) -> int:
    types = [t.strip() for t in (args.type or ",".join(CLEAN_TYPES)).split(",") if t.strip()]
    if args.days < 0:
        raise LaunchError("lxm3 clean --days must be 0 or more")
    if not (args.force or args.dry_run or sys.stdin.isatty()):
        raise LaunchError("lxm3 clean removes without asking only with --force (stdin is not a terminal): "
                          "add --force, or --dry-run to list what it would remove")
    config = load_config(args.lxm_config)
    if not config.clusters:
        _progress("no clusters in the config: cleaning this machine's archive cache only")

    def confirm(doomed: List[CleanItem]) -> bool:
        if args.force:
            return True
        _print_clean(doomed, dry_run=True)
        return _confirm_removal(doomed)

    items = clean(config, types, args.days, args.dry_run, confirm, args.cluster or None, args.project)
    _print_clean(items, dry_run=args.dry_run)
    return 0


def _print_clean(items: Sequence[CleanItem], dry_run: bool) -> None:
    if not items:
        print("nothing to clean: lxm3 left nothing there")
        return
    verb = "would remove" if dry_run else "removed"
    for cluster in sorted({item.cluster for item in items}):
        mine = [item for item in items if item.cluster == cluster]
        gone = [item for item in mine if item.remove]
        files = sum(item.files or 0 for item in gone)
        print(f"{cluster}: {verb} {len(gone)} of {len(mine)} "
              f"({files:,} files, {_size_text(sum(item.size or 0 for item in gone))}):")
        rows = [[("remove" if dry_run else "removed") if item.remove else "keep", item.kind, item.path,
                 "-" if item.files is None else f"{item.files:,} files",
                 "-" if item.size is None else _size_text(item.size), item.why] for item in mine]
        _print_table([["  " + row[0], *row[1:]] for row in rows])
    gone = [item for item in items if item.remove]
    print(f"total: {verb} {_counted(len(gone), 'item')}, {_size_text(sum(item.size or 0 for item in gone))}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _take_option(args: List[str], name: str) -> Tuple[Optional[str], List[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``args`` wherever it appears."""
    value, rest, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == name:
            if i + 1 >= len(args):
                raise LaunchError(f"{name} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg[len(name) + 1:]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _user_traceback(error: BaseException) -> None:
    """Print the error with the launcher's frames only: lxm3's, xm's and the
    standard library's say nothing about what the user should change."""
    import sysconfig
    import traceback

    if os.environ.get("LXM_DEBUG"):
        traceback.print_exception(type(error), error, error.__traceback__)
        return
    ours = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(xm.__file__)) + os.sep,
            sysconfig.get_paths()["stdlib"] + os.sep)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<frozen ")
              and not os.path.abspath(f.filename).startswith(ours)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    lines += traceback.format_exception_only(type(error), error)
    sys.stderr.write("".join(lines))


def _main_left_to_run(launcher_path: str, namespace: Mapping[str, Any]) -> bool:
    """Whether the launcher, having run as ``__main__``, left its ``main`` for
    ``lxm3 launch`` to run, as lxm3 0.4.2's did: that one imported the launcher
    and ran ``main`` itself, so launchers without ``if __name__ == "__main__":``
    worked there. A launcher left it if it defines a callable ``main`` and its
    top-level code has no ``__name__ == "__main__"`` test and never names
    ``main`` (as ``main()`` or ``app.run(main)`` do); a launcher that ran it
    has created an experiment (checked by the caller) or exited.
    """
    if not callable(namespace.get("main")):
        return False
    import ast

    with open(launcher_path, "rb") as f:
        tree = ast.parse(f.read(), launcher_path)
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes.extend(node.decorator_list)  # the body runs only when called
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and node.id == "main" and isinstance(node.ctx, ast.Load):
            return False
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if (any(isinstance(o, ast.Name) and o.id == "__name__" for o in operands)
                    and any(isinstance(o, ast.Constant) and o.value == "__main__" for o in operands)):
                return False
        nodes.extend(ast.iter_child_nodes(node))
    return True


def _uses_absl(namespace: Mapping[str, Any]) -> bool:
    """Whether the launcher holds absl's modules, flags or functions."""
    for value in namespace.values():
        try:
            module = value.__name__ if isinstance(value, type(sys)) else (
                getattr(value, "__module__", None) if callable(value) else type(value).__module__)
        except Exception:  # an object with an odd __getattr__ is not absl's
            continue
        if isinstance(module, str) and (module == "absl" or module.startswith("absl.")):
            return True
    return False


def _takes_argv(function: Callable[..., Any]) -> bool:
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: give it argv, as 0.4.2 did
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in parameters)


def _run_launcher_main(namespace: Mapping[str, Any], launcher_path: str, args: List[str]) -> None:
    """Run the launcher's ``main`` as lxm3 0.4.2's ``lxm3 launch`` did: through
    absl's ``app.run`` with ``--xm_launch_script=LAUNCHER`` (XManager's flag) when
    the launcher uses absl, else as ``main(argv)``; exits with what it returns."""
    main = namespace["main"]
    takes_argv = _takes_argv(main)

    def run(argv: List[str]) -> Any:
        return main(argv) if takes_argv else main()

    if _uses_absl(namespace):
        # The launcher's own dependency, loaded only because it uses it: lxm3 needs no absl.
        import importlib

        app, flags = importlib.import_module("absl.app"), importlib.import_module("absl.flags")

        if "xm_launch_script" not in flags.FLAGS:
            flags.DEFINE_string("xm_launch_script", None,
                                "Path to the launcher (set by lxm3 launch, as in XManager)")
        app.run(run, argv=[launcher_path, f"--xm_launch_script={launcher_path}", *args])
    sys.exit(run([launcher_path, *args]))


def _launch(launcher: str, args: List[str], dry_run: bool = False,
            created: Optional[List[int]] = None) -> int:
    """Run a launcher as ``lxm3 launch`` does; its exit status. ``created``: filled
    with the ids of the experiments it recorded (for ``--wait``)."""
    import runpy

    config_path, args = _take_option(args, "--lxm_config")
    options = LaunchOptions(config_path=os.path.abspath(os.path.expanduser(config_path)) if config_path else None)
    launcher_path = os.path.abspath(launcher)
    if not os.path.isfile(launcher_path):
        raise LaunchError(f"launcher {launcher} does not exist")
    if dry_run:
        import tempfile

        options.dry_run_directory = tempfile.mkdtemp(prefix="lxm3-dry-run-")
        _progress(f"dry run: job scripts are written to {options.dry_run_directory}; "
                  "nothing is copied, submitted or run")
    # The launcher sees itself as the program, as if run by python; all of it
    # is put back afterwards, so that a second launch in this process starts clean.
    saved_argv, saved_path = sys.argv, list(sys.path)
    xm.utils.set_launch_script(launcher_path)
    sys.argv = [launcher_path, *args]
    sys.path.insert(0, os.path.dirname(launcher_path))
    try:
        with options.applied():
            namespace = runpy.run_path(launcher_path, run_name="__main__")
            if not options._experiments_created and _main_left_to_run(launcher_path, namespace):
                _run_launcher_main(namespace, launcher_path, args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _exit_message(e.code))
    except LaunchError as e:
        print(f"lxm3: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # the experiment says what had been launched
        print(f"lxm3: interrupted{getattr(e, 'lxm3_outcome', '')}", file=sys.stderr)
        return 130
    except Exception as e:  # the user's error: show where in their launcher it happened
        _user_traceback(e)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        xm.utils.set_launch_script(None)
        if created is not None:
            created.extend(options._experiment_ids)
    return 0


def _exit_message(message: Any) -> int:
    print(message, file=sys.stderr)
    return 1


def _print_json(data: Any) -> None:
    import json

    json.dump(data, sys.stdout, indent=1, default=vars)
    print()


def _print_table(rows: List[List[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _where(unit: WorkUnitRecord) -> str:
    return "local" if unit.is_local else f"{unit.cluster} ({unit.executor})"


def _cmd_list(args) -> int:
    records = list_records(args.n)
    if args.json:
        _print_json([{k: v for k, v in r.to_json().items() if k != "work_units"} | {
            "where": sorted({_where(u) for u in r.work_units}),
            "work_units": len(r.work_units),
            "tasks": sum(u.num_tasks for u in r.work_units)} for r in records])
        return 0
    if not records:
        print(f"no experiments recorded yet in {os.path.dirname(_record_path(0))}")
        return 0
    rows = [["ID", "CREATED (UTC)", "TITLE", "WHERE", "UNITS", "TASKS", "STATUS"]]
    for r in records:
        units = r.work_units
        rows.append([str(r.experiment_id), r.created[:19].replace("T", " "), r.title[:40],
                     ", ".join(sorted({_where(u) for u in units})) or "-", str(len(units)),
                     str(sum(u.num_tasks for u in units)), r.status])
    _print_table(rows)
    return 0


def _selected_units(record: ExperimentRecord, work_unit: Optional[int]) -> Optional[List[int]]:
    if work_unit is None:
        return None
    return [record.unit(work_unit).id]


def _concluded_status(statuses: Mapping[int, WorkUnitStatus]) -> Optional[str]:
    """How a launched experiment ended, once no task is pending or running."""
    states = {t.state for s in statuses.values() for t in s.tasks}
    if not states or states & set(TaskState.ACTIVE):
        return None
    if states & {TaskState.FAILED, TaskState.UNKNOWN}:
        return ExperimentStatus.FAILED
    if TaskState.CANCELLED in states:
        return ExperimentStatus.CANCELLED
    return ExperimentStatus.COMPLETED if states == {TaskState.COMPLETED} else None


def _cmd_status(args) -> int:
    if args.watch:
        record = load_record(args.experiment)
        _selected_units(record, args.work_unit)  # an unknown work unit is an error now, not later
        return watch(args.experiment, args.work_unit, args.interval or WATCH_INTERVAL)
    record = load_record(args.experiment)
    reconcile_submissions(record)
    selected = _selected_units(record, args.work_unit)
    upstream = [] if selected is None else record.unit(selected[0]).upstream_ids()
    statuses = query_status(record, None if selected is None else selected + upstream)
    notes = dependency_notes(record, statuses)
    statuses = {wid: s for wid, s in statuses.items() if selected is None or wid in selected}
    concluded = _concluded_status(statuses) if args.work_unit is None else None
    if concluded and record.status == ExperimentStatus.LAUNCHED:  # so that 'lxm3 list' tells it too
        record.status = concluded
        save_record(record)
    if args.json:
        units = {wid: {"tasks": s.tasks, "counts": s.counts()} for wid, s in statuses.items()}
        for wid in units:
            if record.unit(wid).dependencies:
                units[wid]["dependencies"] = record.unit(wid).dependencies
            if wid in notes:
                units[wid]["dependency_never_met"] = notes[wid]
        _print_json({"experiment_id": record.experiment_id, "title": record.title,
                     "status": record.status, "work_units": units})
        return 0
    print(f"experiment {record.experiment_id} {record.title!r}: {record.status}, "
          f"created {record.created}" + (f"\n  error: {record.error}" if record.error else ""))
    for wid, status in statuses.items():
        unit = record.unit(wid)
        jobs = ",".join(unit.job_ids)
        print(f"work unit {wid} on {_where(unit)}{' jobs ' + jobs if jobs else ''}: "
              f"{unit.state}; {status.message}")
        if unit.dependencies:
            print("  after " + ", ".join(f"work unit {w} ({Dependency.KINDS.get(d['kind'], d['kind'])})"
                                         for d in unit.dependencies for w in d["work_units"]))
        if wid in notes:
            print(f"  {notes[wid]}")
        if args.work_unit is not None:
            rerun = any(t.attempts > 1 for t in status.tasks)  # (lxm3 rerun) how many each had
            rows = [["TASK", "JOB", "STATE", "EXIT"] + (["ATTEMPTS"] if rerun else [])]
            rows += [[str(t.task), t.job or "-", t.state + (f" ({t.detail})" if t.detail else ""),
                      "" if t.exit_code is None else str(t.exit_code)] + ([str(t.attempts)] if rerun else [])
                     for t in status.tasks]
            _print_table(rows)
        else:
            missing = [t.task for t in status.tasks if t.state == TaskState.NOT_SUBMITTED]
            if missing:
                print(f"  not submitted: task{'s' if len(missing) > 1 else ''} {_task_ranges(missing)}")
            shown = (TaskState.COMPLETED, TaskState.RUNNING, TaskState.PENDING, TaskState.NOT_SUBMITTED)
            for t in [t for t in status.tasks if t.state not in shown][:10]:
                exit_code = "" if t.exit_code is None else f" exit {t.exit_code}"
                print(f"  task {t.task}: {t.state}{exit_code}{' (' + t.detail + ')' if t.detail else ''}")
    return 0


def _cmd_wait(args) -> int:
    try:
        record = load_record(args.experiment)
        _selected_units(record, args.work_unit)
    except LaunchError as e:  # no such experiment or work unit: a usage error
        print(f"lxm3: error: {e}", file=sys.stderr)
        return 2
    return wait_for([args.experiment], args.work_unit, args.interval or WATCH_INTERVAL, args.timeout)


def _cmd_logs(args) -> int:
    record = load_record(args.experiment)
    reconcile_submissions(record)
    units = record.work_units
    if args.work_unit is None and len(units) != 1:
        raise LaunchError(f"experiment {record.experiment_id} has {len(units)} work units: "
                          "name one (lxm3 logs XID WID)")
    unit = units[0] if args.work_unit is None else record.unit(args.work_unit)
    if not 0 <= args.task < unit.num_tasks:
        raise LaunchError(f"work unit {unit.id} has tasks 0..{unit.num_tasks - 1}, not {args.task}")
    log_path = task_log_path(unit, args.task) or ""
    if unit.cleaned and unit.job_directory and log_path.startswith(os.path.dirname(unit.job_directory) + "/"):
        raise LaunchError(f"the logs of experiment {record.experiment_id} work unit {unit.id} were removed by "
                          f"lxm3 clean on {unit.cleaned[:10]}, with its directory "
                          f"{os.path.dirname(unit.job_directory)} on {unit.cluster}")
    return follow_log(unit, args.task, args.n, args.follow)


def _cmd_cancel(args) -> int:
    record = load_record(args.experiment)
    selected = _selected_units(record, args.work_unit)
    waiting = dependents(record, selected) if selected else []
    if waiting:
        which = f"work unit{'s' if len(waiting) > 1 else ''} {', '.join(map(str, waiting))}"
        with_them = args.with_dependents
        if not with_them and sys.stdin.isatty() and sys.stdout.isatty():
            answer = input(f"{which} wait{'' if len(waiting) > 1 else 's'} for work unit {selected[0]}; "
                           "cancel them too? [y/N] ")
            with_them = answer.strip().lower() in ("y", "yes")
        if with_them:
            selected = selected + waiting
        else:
            print(f"{which} wait{'' if len(waiting) > 1 else 's'} for work unit {selected[0]} and "
                  f"stay{'' if len(waiting) > 1 else 's'} queued (after_ok: for ever; after_any: they start); cancel them with 'lxm3 cancel "
                  f"{record.experiment_id} {selected[0]} --with-dependents' or 'lxm3 cancel "
                  f"{record.experiment_id} WID'")
    result = cancel(record, selected)
    if result.cancelled:
        print(f"cancelled job(s) {', '.join(result.cancelled)}")
    if result.ended:
        print(f"{'nothing to cancel: ' if not result.cancelled else ''}"
              f"job(s) {', '.join(result.ended)} had already ended")
    if not result.cancelled and not result.ended:
        print("nothing to cancel: no submitted jobs")
    return 0


def _cmd_rerun(args) -> int:
    record = load_record(args.experiment)
    tasks = parse_task_list(args.tasks) if args.tasks is not None else None
    launched = [u for u in record.work_units if u.state != UnitState.DRY_RUN]
    if tasks is not None and args.work_unit is None and len(launched) > 1:
        raise LaunchError(f"experiment {record.experiment_id} has {_counted(len(record.work_units), 'work unit')}: "
                          f"say whose tasks to rerun (lxm3 rerun {record.experiment_id} WID --tasks {args.tasks})")
    work_units = _selected_units(record, args.work_unit)
    if tasks is not None and work_units is None and launched:
        work_units = [launched[0].id]
    result = rerun_tasks(record, work_units, tasks)
    if not any(result.values()):
        where = f" work unit {args.work_unit}" if args.work_unit is not None else ""
        print(f"nothing to rerun: no task of experiment {record.experiment_id}{where} failed, was cancelled "
              f"or was lost in its latest attempt ('lxm3 status {record.experiment_id}' shows them)")
        return 0
    failed: List[TaskResult] = []
    submitted = False
    for wid, done in result.items():
        ran = [r for r in done if isinstance(r, TaskResult)]
        if ran:  # a local unit: its tasks ran here and ended
            failed += [r for r in ran if r.returncode != 0]
            bad = [r for r in ran if r.returncode != 0]
            print(f"work unit {wid}: reran {_counted(len(ran), 'task')} ({_task_ranges(r.task_id for r in ran)}) "
                  f"here: {len(ran) - len(bad)} completed" + (f", {len(bad)} failed" if bad else ""))
            continue
        submitted = submitted or bool(done)
        tasks_done = [t for a in done for t in a.task_ids()]
        print(f"work unit {wid}: resubmitted {_counted(len(tasks_done), 'task')} ({_task_ranges(tasks_done)}) "
              f"as job {', '.join(a.job_id or '?' for a in done)}")
    for r in failed:
        print(f"  work unit {r.work_unit_id} task {r.task_id}: exit code {r.returncode} (log: {r.log_path})")
    print(f"{'follow them' if submitted else 'see them'} with 'lxm3 status {record.experiment_id}'")
    return 1 if failed else 0


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="lxm3",
        description="Launch experiments on Slurm, Grid Engine or this machine, and follow them.",
        epilog="Run 'lxm3 COMMAND --help' for the options of a command. Clusters are reached "
               "over one SSH connection, kept for the next command for 5 minutes "
               "($LXM3_SSH_KEEP seconds; 0: not kept). A server that does not answer within "
               f"{SSH_CONNECT_TIMEOUT} s is given up on, and a connection whose server stops "
               f"answering ends after {SSH_KEEPALIVE_COUNT} keep-alives {SSH_KEEPALIVE_INTERVAL} s "
               "apart: set ssh_connect_timeout and ssh_keepalive_interval (seconds) for a cluster "
               "in the config, or $LXM3_SSH_CONNECT_TIMEOUT and $LXM3_SSH_KEEPALIVE_INTERVAL "
               "for every cluster (these win).",
    )
    parser.add_argument("--version", action="version", version=f"lxm3 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    launch = commands.add_parser(
        "launch",
        help="run a launcher script",
        description=(
            "Run LAUNCHER as __main__ with sys.argv = [LAUNCHER, ARGS...]. Plain scripts, "
            "argparse scripts and absl launchers (app.run(main)) all work. A launcher that "
            "only defines main (as lxm3 0.4.2 allowed) has it run once, as 0.4.2 did: "
            "app.run(main) with --xm_launch_script=LAUNCHER if it uses absl, else main(argv)."
        ),
        epilog=(
            "The config is the first found of: --lxm_config PATH (taken out of ARGS wherever "
            "it appears), $LXM_CONFIG, ./lxm.toml, $XDG_CONFIG_HOME/lxm3/config.toml. "
            "Local runs need no config. Set LXM_DEBUG=1 to see lxm3's own frames in tracebacks."
        ),
    )
    launch.add_argument("--dry-run", action="store_true",
                        help="package and write the job scripts into a local folder, print what "
                             "would be copied and submitted, and submit, copy and run nothing")
    launch.add_argument("--wait", action="store_true",
                        help="then wait, as 'lxm3 wait' does, until every task of the experiment it "
                             "launched has ended, and exit with wait's status (a launch that fails "
                             "exits at once with its own)")
    _add_polling_options(launch, timeout=True)
    launch.add_argument("launcher", metavar="LAUNCHER", help="the launcher script (a .py file)")
    launch.add_argument("args", metavar="ARGS", nargs="...", help="arguments for the launcher")

    listing = commands.add_parser("list", help="recent experiments, newest first",
                                  description="Experiments launched from this machine, newest first.")
    listing.add_argument("-n", type=int, default=20, help="how many (default 20)")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")

    status = commands.add_parser(
        "status", help="the state of an experiment's tasks",
        description="Ask the schedulers (one round trip per cluster) for the state of every task: "
                    "pending, running, completed, failed or cancelled, with exit codes.")
    status.add_argument("experiment", metavar="XID", help="experiment id (see 'lxm3 list')")
    status.add_argument("work_unit", metavar="WID", type=int, nargs="?", help="one work unit: list each task")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--watch", action="store_true",
                        help="follow the experiment until every task has ended: on a terminal, one "
                             "progress bar per work unit redrawn in place (no colour with $NO_COLOR), "
                             "otherwise a line per change; and the last lines of each newly failed "
                             "task's log. Exit status 0 if all tasks completed, 1 if not")
    _add_polling_options(status, timeout=False)

    wait = commands.add_parser(
        "wait", help="block until every task of an experiment has ended",
        description="Wait until no task of the experiment (or of work unit WID) is pending or running, "
                    "print a summary, and exit with 0 if every task completed, 1 if any failed, was "
                    "cancelled or was lost (an error that stops the wait, printed as 'lxm3: error:', "
                    f"is 1 too), 2 for a usage error (bad option, unknown experiment or work unit), "
                    f"{WAIT_TIMEOUT_EXIT} when --timeout ran out first (as timeout(1)), 130 on Ctrl-C. "
                    "Quiet but for the summary (and a progress line on a terminal).")
    wait.add_argument("experiment", metavar="XID", help="experiment id (see 'lxm3 list')")
    wait.add_argument("work_unit", metavar="WID", type=int, nargs="?", help="only this work unit")
    _add_polling_options(wait, timeout=True)

    logs = commands.add_parser("logs", help="show or follow a task's log",
                               description="Show the end of a task's log, or follow it with -f.")
    logs.add_argument("experiment", metavar="XID", help="experiment id (see 'lxm3 list')")
    logs.add_argument("work_unit", metavar="WID", type=int, nargs="?",
                      help="work unit (needed when there are several)")
    logs.add_argument("--task", type=int, default=0, help="task index, from 0 (default 0)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new lines until the task ends")
    logs.add_argument("-n", type=int, default=50, help="lines to show (default 50)")

    cancel_command = commands.add_parser("cancel", help="cancel an experiment's jobs",
                                         description="Cancel the submitted jobs (one scancel/qdel per cluster).")
    cancel_command.add_argument("experiment", metavar="XID", help="experiment id (see 'lxm3 list')")
    cancel_command.add_argument("work_unit", metavar="WID", type=int, nargs="?", help="only this work unit")
    cancel_command.add_argument("--with-dependents", "--yes", "-y", dest="with_dependents", action="store_true",
                                help="also cancel the work units that wait for WID (asked on a terminal)")

    rerun = commands.add_parser(
        "rerun", help="run failed (or chosen) tasks of a work unit again",
        description="Run tasks of a launched experiment again, with their original arguments and "
                    "environment, reusing the job script, tasks file and archive the launch wrote: "
                    "nothing is packaged or copied. Cluster tasks are submitted again; local tasks run "
                    "again here, in the foreground, as the launch ran them (its pool, GPUs per task and "
                    "streamed output; Ctrl-C stops them), and the exit status is 1 if any of them "
                    "failed. The default, --failed, reruns the tasks whose latest attempt failed, was "
                    "cancelled or was lost (as 'lxm3 status' shows them), in every work unit unless "
                    "WID is given. Tasks still pending or running are refused: cancel them first (a "
                    "local launch: wait for it or stop it).",
        epilog="Every attempt is kept: 'lxm3 status XID WID' shows each task's latest attempt and how "
               "many it had, 'lxm3 logs' the latest attempt's log (locally: task-I.log, then "
               "task-I.attempt-N.log). Tasks see LXM_RERUN (how many earlier attempts they had) and "
               "LXM_ATTEMPT in their environment. Examples: 'lxm3 rerun 1712345678901' "
               "(every failed task), 'lxm3 rerun 1712345678901 2 --tasks 3,7,12-20'.")
    rerun.add_argument("experiment", metavar="XID", help="experiment id (see 'lxm3 list')")
    rerun.add_argument("work_unit", metavar="WID", type=int, nargs="?",
                       help="only this work unit (needed with --tasks when there are several)")
    which = rerun.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_true",
                       help="the tasks whose latest attempt failed, was cancelled or was lost (the default)")
    which.add_argument("--tasks", metavar="LIST",
                       help="these task ids (from 0), e.g. 3,7,12-20")

    clean_command = commands.add_parser(
        "clean", help="remove what no experiment still needs (old job directories, archives, images, environments)",
        description="On each cluster of the config, remove what no experiment still needs: experiment "
                    "directories (job scripts, tasks files, logs) unchanged for --days, then the archives, "
                    "container images and managed environments that no kept experiment's job scripts name; "
                    "here, built archives not used for --days that no kept record names. Never what a "
                    "queued or running job uses (the schedulers are asked, for launches from any machine), "
                    "what a submission or launch holds, or what changed in the last hour. Lists what it "
                    "would remove, with sizes, and asks once (--force: does not ask).",
        epilog="The records of removed experiments stay ('lxm3 list' shows them); 'lxm3 logs' says their "
               "logs were cleaned. Log directories set by the launcher outside the experiment directory are "
               "left alone.")
    clean_command.add_argument("--type", default=None, metavar="TYPES",
                               help=f"what to clean, comma-separated, of {', '.join(CLEAN_TYPES)}: job = "
                                    "experiment directories and their logs, archive = staged archives and the "
                                    "archive cache here, container = staged .sif images, env = managed "
                                    "environments (default: all)")
    clean_command.add_argument("--days", type=float, default=CLEAN_DEFAULT_DAYS,
                               help=f"keep what changed or was used in the last DAYS days (default "
                                    f"{CLEAN_DEFAULT_DAYS}; 0: all that no job or launch needs)")
    clean_command.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                               help="list what would be removed and kept, with sizes and a total; remove nothing")
    clean_command.add_argument("--force", action="store_true", help="remove without asking (needed without a terminal)")
    clean_command.add_argument("--project", help="only experiments of this project (create_experiment's, as "
                                                 "recorded here), and the archives, images and environments they "
                                                 "used that no other kept experiment uses; staging is shared by "
                                                 "projects, so experiments without a record here are left alone")
    clean_command.add_argument("--cluster", action="append", metavar="NAME",
                               help="only this cluster of the config (repeatable; default: all)")
    clean_command.add_argument("--lxm_config", metavar="PATH", help="the config file (default: the usual search)")

    commands.add_parser("version", help="print lxm3's version")
    return parser


def _add_polling_options(parser: Any, timeout: bool) -> None:
    parser.add_argument("--interval", metavar="S", type=_seconds_option(WATCH_MIN_INTERVAL),
                        help=f"seconds between two queries of each cluster (one round trip each; "
                             f"default {WATCH_INTERVAL:.0f}, at least {WATCH_MIN_INTERVAL:.0f} to spare "
                             f"the scheduler); the interval grows x{WATCH_BACKOFF} after each query that "
                             f"saw no change, up to {WATCH_MAX_INTERVAL / 60:.0f} minutes, and is back to "
                             "S after a change")
    if timeout:
        parser.add_argument("--timeout", metavar="S", type=_seconds_option(0.0),
                            help=f"give up after S seconds with tasks still pending or running: exit "
                                 f"status {WAIT_TIMEOUT_EXIT}")


def _seconds_option(minimum: float) -> Callable[[str], float]:
    import argparse

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value >= minimum or value == float("inf"):  # also NaN
            raise argparse.ArgumentTypeError(
                f"{text!r}: a number of seconds, at least {minimum:g}"
                + (" (a shorter interval would load the scheduler)" if minimum else ""))
        return value

    return seconds


_LAUNCH_OPTIONS_WITH_VALUES = ("--interval", "--timeout")


def _split_launch_args(argv: List[str]) -> Tuple[List[str], List[str]]:
    """Everything after the launcher belongs to it, options like -h included."""
    i = 1
    while i < len(argv):
        if argv[i] in _LAUNCH_OPTIONS_WITH_VALUES:
            i += 2
            continue
        if not argv[i].startswith("-"):
            return argv[: i + 1], argv[i + 1:]
        i += 1
    return argv, []


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal) clean up like Ctrl-C: local tasks
    are stopped and the SSH connection is closed, not left behind."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _interrupt_on_termination()
    parser = _parser()
    if argv[:1] == ["launch"]:
        ours, theirs = _split_launch_args(argv)
        args = parser.parse_args(ours)
        args.args = theirs
    else:
        args = parser.parse_args(argv)
    handlers = {"list": _cmd_list, "status": _cmd_status, "logs": _cmd_logs, "cancel": _cmd_cancel,
                "clean": _cmd_clean, "rerun": _cmd_rerun, "wait": _cmd_wait}
    if args.command == "launch" and not args.wait and (args.interval or args.timeout is not None):
        parser.error("--interval and --timeout go with --wait")
    if args.command == "launch" and args.wait and args.dry_run:
        parser.error("a dry run launches nothing to wait for: --wait goes without --dry-run")
    if args.command == "status" and args.watch and args.json:
        parser.error("--watch redraws for people; --json is for scripts: use one of them")
    if args.command == "status" and not args.watch and args.interval:
        parser.error("--interval goes with --watch")
    try:
        if args.command == "launch":
            created: List[int] = []
            code = _launch(args.launcher, list(args.args), dry_run=args.dry_run, created=created)
            if not args.wait or code != 0:
                return code
            if not created:
                _progress("nothing to wait for: the launcher recorded no experiment")
                return code
            return wait_for(created, None, args.interval or WATCH_INTERVAL, args.timeout)
        if args.command == "version":
            print(f"lxm3 {__version__}")
            sys.stdout.flush()
            return 0
        if args.command in handlers:
            code = handlers[args.command](args)
            sys.stdout.flush()  # here, so that a closed pipe is caught below, not at exit
            return code
    except LaunchError as e:
        print(f"lxm3: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_left()
    parser.print_help()
    return 2


def _reader_left() -> int:
    """Whoever read our output stopped (``lxm3 status X | head -1``): end quietly.

    Python's recipe: point stdout at /dev/null, so that flushing it at exit
    does not fail again. The exit code is 141 (128 + SIGPIPE), what a shell
    reports for cat or grep in the same place, so that ``set -o pipefail``
    treats lxm3 like them; ``head`` already has what it asked for.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141

# ---------------------------------------------------------------------------
# Appendix: a TOML reader, for Pythons without tomllib (before 3.11)
# ---------------------------------------------------------------------------


def _toml_loads(text: str) -> dict:
    """Parse TOML with tomllib (3.11+), tomli if installed, else our reader."""
    try:
        import tomllib as toml  # novermin (guarded: 3.11+)
    except ImportError:
        try:
            import tomli as toml  # type: ignore[no-redef]
        except ImportError:
            return _toml_loads_fallback(text)
    return toml.loads(text)


# -- A TOML reader for Python 3.9-3.10 without tomli ----------------------

class TOMLDecodeError(ValueError):
    """A malformed document; the message ends with "(line N)", counted from 1."""


_TOML_WS = re.compile(r"[ \t]*")
# A comment may hold any character but the control characters other than tab.
_TOML_COMMENT = re.compile(r"(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?")
# What may separate the items of an array: blanks, newlines and comments.
_TOML_ARRAY_BLANK = re.compile(r"(?:[ \t\n]|#[^\x00-\x08\x0a-\x1f\x7f]*)*")
_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_HEX_DIGITS = re.compile(r"[0-9A-Fa-f]*")
# The same number grammar as tomllib; what follows a number is checked by the
# caller, so "1.", "1__0" or "0x" fail there as junk after a value.
_TOML_NUMBER = re.compile(
    r"""
    0(?:x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|o[0-7](?:_?[0-7])*|b[01](?:_?[01])*)
    |[+-]?(?:0|[1-9](?:_?[0-9])*)
     (?P<float>(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?)
    """,
    re.VERBOSE,
)
_TOML_INF_NAN = re.compile(r"[+-]?(?:inf|nan)")
_TOML_DATE_OR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{2}:[0-9]{2}")
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
# Runs of characters that stand for themselves, by (literal, multiline) string kind.
_TOML_STRING_RUN = {
    (False, False): re.compile(r'[^"\\\x00-\x08\x0a-\x1f\x7f]*'),
    (False, True): re.compile(r'[^"\\\x00-\x08\x0b-\x1f\x7f]*'),
    (True, False): re.compile(r"[^'\x00-\x08\x0a-\x1f\x7f]*"),
    (True, True): re.compile(r"[^'\x00-\x08\x0b-\x1f\x7f]*"),
}
# A backslash at the end of a line in a multi-line basic string swallows the
# newline and all blanks up to the next visible character.
_TOML_LINE_CONTINUATION = re.compile(r"\\[ \t]*\n[ \t\n]*")


class _TOMLParser:
    """Reads one document; ``pos`` is the index of the next character of ``src``.

    Tables are tracked by identity, which stays valid because every table
    remains referenced from the result until the end:
    ``defined`` holds tables that a ``[header]`` or a dotted key in a later
    section may not open again; ``pending`` holds the tables created by dotted
    keys in the current section, which may still extend them; ``frozen`` holds
    inline tables and arrays given as values, which nothing may extend.
    """

    def __init__(self, text: str) -> None:
        self.src = text.replace("\r\n", "\n")
        self.pos = 0
        self.root: Dict[str, Any] = {}
        self.defined: Set[int] = set()
        self.pending: Set[int] = set()
        self.frozen: Set[int] = set()

    def error(self, message: str, pos: int = -1) -> TOMLDecodeError:
        """Build the exception, naming the line of ``pos`` (default: the current one)."""
        line = self.src.count("\n", 0, self.pos if pos < 0 else pos) + 1
        return TOMLDecodeError(f"{message} (line {line})")

    def skip(self, pattern: re.Pattern[str]) -> None:
        self.pos = pattern.match(self.src, self.pos).end()

    def peek(self) -> str:
        return self.src[self.pos : self.pos + 1]

    def expect(self, token: str, where: str) -> None:
        if not self.src.startswith(token, self.pos):
            raise self.error(f"expected {token!r} {where}")
        self.pos += len(token)

    def parse_document(self) -> Dict[str, Any]:
        table = self.root
        while True:
            self.skip(_TOML_WS)
            char = self.peek()
            if char == "":
                return self.root
            if char == "\n":
                self.pos += 1
                continue
            if char == "[":
                self.defined |= self.pending
                self.pending = set()
                table = self.parse_header()
            elif char != "#":
                start = self.pos
                keys = self.parse_key()
                self.expect("=", "after a key")
                self.skip(_TOML_WS)
                self.store(table, keys, self.parse_value(), start)
            self.skip(_TOML_WS)
            self.skip(_TOML_COMMENT)
            if self.peek() not in ("\n", ""):
                raise self.error(f"unexpected {self.peek()!r} after a statement")

    def parse_header(self) -> Dict[str, Any]:
        """Read ``[a.b]`` or ``[[a.b]]`` and return the table that follows it."""
        start = self.pos
        is_array = self.src.startswith("[[", start)
        self.pos += 2 if is_array else 1
        keys = self.parse_key()
        self.expect("]]" if is_array else "]", "to close the table header")
        name = ".".join(keys)
        table = self.root
        for key in keys[:-1]:
            child = table.setdefault(key, {})
            if id(child) in self.frozen:
                raise self.error(f"cannot extend {key!r} in [{name}]", start)
            if isinstance(child, list):  # the last element of an array of tables
                child = child[-1]
            if not isinstance(child, dict):
                raise self.error(f"{key!r} in [{name}] is not a table", start)
            table = child
        existing = table.get(keys[-1])
        if is_array:
            if existing is None:
                existing = table[keys[-1]] = []
            elif not isinstance(existing, list) or id(existing) in self.frozen:
                raise self.error(f"cannot make {name!r} an array of tables", start)
            new: Dict[str, Any] = {}
            existing.append(new)
        elif existing is None:
            new = table[keys[-1]] = {}
        elif (
            isinstance(existing, dict)
            and id(existing) not in self.defined
            and id(existing) not in self.frozen
        ):
            new = existing  # only created implicitly so far, by [a.b.c] for [a.b]
        else:
            raise self.error(f"table [{name}] is defined twice", start)
        self.defined.add(id(new))
        return new

    def store(self, table: Dict[str, Any], keys: Tuple[str, ...], value: Any, start: int) -> None:
        """Set a possibly dotted key in ``table``, creating the tables on its path."""
        for key in keys[:-1]:
            child = table.get(key)
            if child is None:
                child = table[key] = {}
            elif (
                not isinstance(child, dict) or id(child) in self.frozen or id(child) in self.defined
            ):
                raise self.error(f"cannot extend {key!r} with dotted key {'.'.join(keys)!r}", start)
            self.pending.add(id(child))
            table = child
        if keys[-1] in table:
            raise self.error(f"duplicate key {'.'.join(keys)!r}", start)
        table[keys[-1]] = value
        if isinstance(value, (dict, list)):
            self.frozen.add(id(value))

    def parse_key(self) -> Tuple[str, ...]:
        """Read a bare, quoted or dotted key and the blanks around it."""
        keys = []
        while True:
            self.skip(_TOML_WS)
            if self.peek() in ('"', "'"):
                keys.append(self.parse_string(multiline_ok=False))
            else:
                match = _TOML_BARE_KEY.match(self.src, self.pos)
                if not match:
                    raise self.error(f"invalid key starting with {self.peek()!r}")
                keys.append(match.group())
                self.pos = match.end()
            self.skip(_TOML_WS)
            if self.peek() != ".":
                return tuple(keys)
            self.pos += 1

    def parse_value(self) -> Any:
        src, pos = self.src, self.pos
        char = self.peek()
        if char in ('"', "'"):
            return self.parse_string(multiline_ok=True)
        if char == "[":
            return self.parse_array()
        if char == "{":
            return self.parse_inline_table()
        for word, boolean in (("true", True), ("false", False)):
            if src.startswith(word, pos):
                self.pos += len(word)
                return boolean
        if _TOML_DATE_OR_TIME.match(src, pos):
            raise self.error(
                "dates and times are not supported by the built-in reader; install tomli"
            )
        match = _TOML_NUMBER.match(src, pos)
        if match:
            self.pos = match.end()
            text = match.group().replace("_", "")
            return float(text) if match.group("float") else int(text, 0)
        match = _TOML_INF_NAN.match(src, pos)
        if match:
            self.pos = match.end()
            return float(match.group())
        raise self.error(f"invalid value starting with {char!r}" if char else "missing value")

    def parse_array(self) -> List[Any]:
        array: List[Any] = []
        self.pos += 1
        while True:
            self.skip(_TOML_ARRAY_BLANK)
            if self.peek() == "]":
                self.pos += 1
                return array
            array.append(self.parse_value())
            self.skip(_TOML_ARRAY_BLANK)
            if self.peek() == "]":
                self.pos += 1
                return array
            self.expect(",", "or ']' after an array item")

    def parse_inline_table(self) -> Dict[str, Any]:
        """Read ``{k = v, ...}``: one line, no trailing comma, as in TOML 1.0."""
        table: Dict[str, Any] = {}
        self.pos += 1
        self.skip(_TOML_WS)
        if self.peek() == "}":
            self.pos += 1
            return table
        while True:
            start = self.pos
            keys = self.parse_key()
            self.expect("=", "after a key")
            self.skip(_TOML_WS)
            self.store(table, keys, self.parse_value(), start)
            self.skip(_TOML_WS)
            if self.peek() == "}":
                self.pos += 1
                return table
            self.expect(",", "or '}' in an inline table")

    def parse_string(self, multiline_ok: bool) -> str:
        """Read any of the four kinds of string; keys pass ``multiline_ok=False``."""
        src, start = self.src, self.pos
        quote = src[start]
        literal = quote == "'"
        multiline = multiline_ok and src.startswith(quote * 3, start)
        self.pos += 3 if multiline else 1
        if multiline and src.startswith("\n", self.pos):
            self.pos += 1  # a newline right after the opening quotes is dropped
        run_pattern = _TOML_STRING_RUN[literal, multiline]
        parts = []
        while True:
            match = run_pattern.match(src, self.pos)
            parts.append(match.group())
            self.pos = match.end()
            char = self.peek()
            if char == quote:
                if not multiline:
                    self.pos += 1
                    return "".join(parts)
                # Up to two quotes just before the closing three belong to the string.
                count = 1
                while count < 5 and src.startswith(quote, self.pos + count):
                    count += 1
                self.pos += count
                if count >= 3:
                    parts.append(quote * (count - 3))
                    return "".join(parts)
                parts.append(quote * count)
            elif char == "\\" and not literal:
                parts.append(self.parse_escape(multiline))
            elif char in ("", "\n"):
                raise self.error("unterminated string", start)
            else:
                raise self.error(f"control character {char!r} in a string")

    def parse_escape(self, multiline: bool) -> str:
        src, pos = self.src, self.pos
        if multiline:
            match = _TOML_LINE_CONTINUATION.match(src, pos)
            if match:
                self.pos = match.end()
                return ""
        code = src[pos + 1 : pos + 2]
        if code in _TOML_ESCAPES:
            self.pos += 2
            return _TOML_ESCAPES[code]
        if code not in ("u", "U"):
            raise self.error(f"invalid escape sequence {src[pos : pos + 2]!r}")
        size = 4 if code == "u" else 8
        digits = src[pos + 2 : pos + 2 + size]
        if len(digits) != size or not _TOML_HEX_DIGITS.fullmatch(digits):
            raise self.error(f"\\{code} needs {size} hex digits")
        codepoint = int(digits, 16)
        if 0xD800 <= codepoint <= 0xDFFF or codepoint > 0x10FFFF:
            raise self.error(f"\\{code}{digits} is not a Unicode scalar value")
        self.pos += 2 + size
        return chr(codepoint)


def _toml_loads_fallback(text: str) -> Dict[str, Any]:
    """Parse a TOML document like ``tomllib.loads``, for the subset described above."""
    return _TOMLParser(text).parse_document()


if __name__ == "__main__":
    # ``python -m lxm3`` runs this file as __main__; launchers import ``lxm3``.
    # Run the imported module's main so both see one set of globals.
    import lxm3

    sys.exit(lxm3.main())
