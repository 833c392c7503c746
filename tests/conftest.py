"""What the tests share: fixtures, and the plain helpers test modules import from here.

pytest loads this file before any test module. Fixtures are used by naming them;
the helpers (functions, classes, constants) with ``from conftest import ...``.
A test module never imports another test module: what two of them need lives
here, or, for the Slurm/Grid Engine test bed, in cluster_helpers.py and
testbed_env.py.

Sections: every test's private environment; projects the tasks run; strings that
break shells; job scripts without packaging; lxm3 as users run it; launches and
their records; processes; cluster workspaces.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# --- every test's private environment -------------------------------------------------


def pytest_configure(config):
    """Ctrl-C reaches the commands the tests start, as at a terminal.

    A shell starts a background job (``pytest ... &`` in a script) with SIGINT
    ignored, and children inherit that: an ``lxm3`` the tests interrupt would
    never see its Ctrl-C. A handler of our own is reset to the default in every
    child, so SIGINT kills or interrupts them as it does at a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One cache for the session, so the pip build environment is made once."""
    return str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(autouse=True)
def xdg_dirs(tmp_path, monkeypatch, session_cache):
    """Keep lxm3's config, data and state out of the real home directory."""
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("XDG_CACHE_HOME", session_cache)
    for name in ("LXM_CONFIG", "LXM_CLUSTER", "LXM_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch):
    """A private XDG_RUNTIME_DIR, so each test starts without kept SSH connections;
    the connections a test kept are ended after it. Short: sockets live there."""
    path = tempfile.mkdtemp(prefix="lxm3rt-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield path
    for socket in glob.glob(os.path.join(path, "lxm3", "ssh-*")):
        subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "kept"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(path, ignore_errors=True)


# --- projects the tasks run -----------------------------------------------------------


def write_files(root, files):
    """Write ``{relative path: text}`` under root (text is dedented)."""
    for rel, text in files.items():
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
    return str(root)


PYPROJECT = """\
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{name}"
    version = "0.1.0"

    [tool.setuptools]
    packages = ["{name}"]
"""

# A program that reports exactly what it received, for byte-for-byte checks.
ECHO_MAIN = """\
    import json, os, sys
    report = {
        "argv": sys.argv[1:],
        "env": {k: v for k, v in os.environ.items()},
        "cwd": os.getcwd(),
    }
    out = os.environ.get("ECHO_OUT")
    if out:
        path = os.path.join(out, "task-%s.json" % os.environ.get("LXM_TASK_ID"))
        with open(path, "w") as f:
            json.dump(report, f)
    print("echo argv=%s" % json.dumps(sys.argv[1:]))
    sys.exit(int(os.environ.get("ECHO_EXIT", "0")))
"""


@pytest.fixture
def echo_project(tmp_path):
    """A Python project whose module ``echoapp.main`` reports its argv and env."""
    return write_files(tmp_path / "echo_project", {
        "pyproject.toml": PYPROJECT.format(name="echoapp"),
        "echoapp/__init__.py": "",
        "echoapp/main.py": ECHO_MAIN,
    })


def echo_report(out, task=0):
    """What task ``task`` of the echo program reported into ``out`` (its ECHO_OUT)."""
    with open(os.path.join(str(out), f"task-{task}.json")) as f:
        return json.load(f)


def echo_reports(out):
    """{task id: report} of every task of the echo program that reported into ``out``."""
    found = {}
    for name in os.listdir(str(out)):
        match = re.fullmatch(r"task-(\d+)\.json", name)
        if match:
            found[int(match.group(1))] = echo_report(out, match.group(1))
    return found


# The program of the record, status and logs tests: it prints a line naming its
# task, optionally waits for a gate file ``$GATE`` to exist (so that a test decides
# when it goes on), prints ``$LINES`` numbered lines, optionally waits for a second
# gate ``$HOLD`` (so that a test decides when it ends), and exits with the code
# ``$CODES`` gives its task.
LXMTASK_MAIN = """\
    import json, os, signal, sys, time
    task = os.environ.get("LXM_TASK_ID")
    print("task %s argv=%s" % (task, json.dumps(sys.argv[1:])), flush=True)
    out = os.environ.get("OUT")
    if out:  # proof that the task ran
        with open(os.path.join(out, "task-%s" % task), "w") as f:
            f.write(json.dumps(sys.argv[1:]))
    deadline = time.time() + float(os.environ.get("MAX_WAIT", "300"))

    def wait_for(gate):
        while gate and not os.path.exists(gate):
            if time.time() > deadline:  # never hold a cluster's slot for long
                print("task %s: gave up waiting for %s" % (task, gate), flush=True)
                sys.exit(99)
            time.sleep(0.2)

    wait_for(os.environ.get("GATE"))
    for i in range(int(os.environ.get("LINES", "0"))):
        print("line %d of task %s" % (i, task), flush=True)
        time.sleep(float(os.environ.get("EVERY", "0.5")))
    wait_for(os.environ.get("HOLD"))
    print("task %s done" % task, flush=True)
    if os.environ.get("KILL_TASK") == task:  # as the OOM killer would: no trap runs
        os.killpg(0, signal.SIGKILL)
    sys.exit(int(json.loads(os.environ.get("CODES") or "{}").get(task, 0)))
"""


@pytest.fixture(scope="session")
def task_project(tmp_path_factory):
    """The project of LXMTASK_MAIN, once per session (so it is packaged once)."""
    root = tmp_path_factory.mktemp("lxmtask")
    os.chmod(str(root), 0o755)
    return write_files(root / "lxmtask_project", {
        "pyproject.toml": PYPROJECT.format(name="lxmtask"),
        "lxmtask/__init__.py": "",
        "lxmtask/main.py": LXMTASK_MAIN,
    })  # fmt: skip


def git(repo, *args):
    """``git -C repo ARGS`` with a committer identity; its stdout, stripped."""
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=Test", "-c",
                           "user.email=test@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


# --- strings that break shells --------------------------------------------------------

# Arguments and environment values that a shell, printf, echo or a careless quote
# would change: every one must reach the task byte for byte.
AWKWARD = [
    "plain",
    "two  spaces",
    " leading and trailing ",
    "",
    "single ' quote",
    'double " quote',
    "$HOME",
    "${PATH}",
    "$(touch /tmp/lxm3-pwned)",
    "`touch /tmp/lxm3-pwned`",
    "*",
    "?[a-z]*",
    "{a,b}",
    "~",
    "~root",
    "a;b && c || d | e & f",
    "line one\nline two",
    "trailing newline\n",
    "\n",
    "tab\there",
    "carriage\rreturn",
    "back\\slash \\n \\x41 \\0 \\c",
    "%s %b %d %%",
    "-n",
    "-e",
    "--",
    "--flag=value with spaces",
    "héllo wörld ✓ 日本語 🚀",
    "!history",
    "#not a comment",
    "<redirect> >out 2>&1",
    "=",
    "x" * 5000,
]


# --- job scripts without packaging ----------------------------------------------------


def make_archive(directory, main_source=ECHO_MAIN):
    """An archive like packaging makes, built without pip: echoapp + entrypoint.sh."""
    import lxm3
    from lxm3 import xm

    src = os.path.join(directory, "archive-src")
    os.makedirs(os.path.join(src, "echoapp"))
    with open(os.path.join(src, "echoapp", "__init__.py"), "w"):
        pass
    with open(os.path.join(src, "echoapp", "main.py"), "w") as f:
        f.write(textwrap.dedent(main_source))
    with open(os.path.join(src, "entrypoint.sh"), "w") as f:
        f.write(lxm3.entrypoint_script(xm.ModuleName("echoapp.main")))
    path = os.path.join(directory, "echo.zip")
    files = [(os.path.join(dp, n), os.path.relpath(os.path.join(dp, n), src))
             for dp, _, names in os.walk(src) for n in names]
    lxm3.write_reproducible_zip(path, files)
    return path


def write_job(directory, tasks, common_env=None, archive=None, num_tasks=None, setup=""):
    """A local job script for ``tasks`` (lxm3.Task) with its tasks file, in directory/job;
    ``setup`` is what runs before the task (e.g. module loads). Returns the script's path."""
    import lxm3

    archive = archive or make_archive(directory)
    job_dir = os.path.join(directory, "job")
    script = lxm3.render_job_script(
        header=lxm3.LOCAL_HEADER, task_id=lxm3.LOCAL_TASK_ID, experiment_id=1234,
        work_unit_id=7, num_tasks=num_tasks or len(tasks), archive=archive,
        tasks_file=os.path.join(job_dir, "tasks"), setup=setup,
    )
    script_path, _ = lxm3.write_job_files(job_dir, script, tasks, common_env or {})
    return script_path


def run_task(script, task_id, out_dir, env=None, path=None):
    """Run task ``task_id`` of a job script with bash: (process, echo report or None)."""
    full_env = {**os.environ, "LXM_TASK_ID": str(task_id), "ECHO_OUT": str(out_dir), **(env or {})}
    if path is not None:
        full_env["PATH"] = path
    proc = subprocess.run(["bash", script], env=full_env, capture_output=True, text=True)
    report_path = os.path.join(str(out_dir), f"task-{task_id}.json")
    report = None
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    return proc, report


# --- lxm3 as users run it -------------------------------------------------------------


def lxm3_cli(*args, env=None, cwd=None, timeout=300):
    """``python -m lxm3 ARGS`` as a user runs it; text output captured."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "lxm3", *args], env=full_env, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def lxm3_popen(*args, env=None, **kwargs):
    """``python -m lxm3 ARGS`` started in the background (Popen keyword arguments pass on)."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "lxm3", *args], env=full_env,
                            stdin=subprocess.DEVNULL, **kwargs)


def error_line(proc):
    """The one-line error of a failed command: exit code 1, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lxm3: error: "), proc.stderr
    return lines[0]


def read_lines(proc, count, pattern, timeout, stream="stdout"):
    """Read ``count`` lines matching ``pattern`` from the process's stdout (or stderr)
    within ``timeout`` s: [(arrival time, text)]."""
    found, done = [], threading.Event()

    def reader():
        for line in getattr(proc, stream):
            if re.fullmatch(pattern, line.rstrip("\n")):
                found.append((time.monotonic(), line.rstrip("\n")))
                if len(found) >= count:
                    break
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not done.wait(timeout):
        pytest.fail(f"read {len(found)} of {count} lines matching {pattern!r} in {timeout} s: "
                    f"{found}")
    assert len(found) >= count, f"the output ended after {found}"
    return found


def wait_until(condition, timeout, what, interval=0.1):
    """Call ``condition()`` until it is true; fail after ``timeout`` s, saying what
    did not happen. Deadlines are generous: tests share a loaded 2-core machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def interrupt_when(proc, ready, what, sig=None, timeout=120):
    """Once ``ready()`` is true, send ``sig`` (default SIGINT, as Ctrl-C does) to a
    command started with lxm3_popen, and wait for it to end: its (stdout, stderr).
    It must not end before; it is killed if it outlives the ``timeout`` s."""
    import signal

    try:
        wait_until(lambda: ready() or proc.poll() is not None, timeout, what)
        assert proc.poll() is None, ("it ended on its own", proc.communicate())
        proc.send_signal(signal.SIGINT if sig is None else sig)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- launches and their records -------------------------------------------------------

# A launcher driven by spec.json beside it: a title and work units, each an
# ArrayJob of LXMTASK_MAIN on an executor ("Local", "Slurm", "GridEngine").
LXMTASK_LAUNCHER = """\
    import json
    import os
    import time

    from lxm3 import xm, xm_cluster

    HERE = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(HERE, "spec.json"), encoding="utf-8") as f:
        SPEC = json.load(f)

    if SPEC.get("start_at"):  # launches started together create their experiments together
        while time.time() < SPEC["start_at"]:
            time.sleep(0.0002)

    with xm_cluster.create_experiment(SPEC["title"]) as experiment:
        executables = {}
        for unit in SPEC["units"]:
            options = dict(unit.get("options") or {})
            if "cpu" in options:
                options["requirements"] = xm.JobRequirements(cpu=options.pop("cpu"))
            executor = getattr(xm_cluster, unit["executor"])(**options)
            if unit["executor"] not in executables:
                package = xm_cluster.PythonPackage(
                    path=SPEC["project"], entrypoint=xm_cluster.ModuleName("lxmtask.main"))
                [executables[unit["executor"]]] = experiment.package(
                    [xm.Packageable(package, executor_spec=executor.Spec())])
            experiment.add(xm_cluster.ArrayJob(executables[unit["executor"]], executor,
                                               args=unit["args"], env_vars=unit["env_vars"]))
        if SPEC.get("raise"):
            raise RuntimeError(SPEC["raise"])
"""


def write_launcher(directory, spec):
    """LXMTASK_LAUNCHER and its spec.json in ``directory``; returns the launcher's path."""
    os.makedirs(str(directory), exist_ok=True)
    with open(os.path.join(str(directory), "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    path = os.path.join(str(directory), "launcher.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(LXMTASK_LAUNCHER))
    return path


def local_unit(num_tasks, env=None, task_env=None):
    """A Local ArrayJob of ``num_tasks`` tasks with arguments --seed=i."""
    if task_env is None:
        env_vars = [dict(env or {})]
    else:
        env_vars = [{**(env or {}), **task_env(i)} for i in range(num_tasks)]
    return {"executor": "Local", "args": [{"seed": i} for i in range(num_tasks)],
            "env_vars": env_vars}


def launch_local(tmp_path, name, spec, args=(), expect_rc=0):
    """Run ``lxm3 launch`` on a launcher in tmp_path/name; returns (proc, record)."""
    launcher = write_launcher(tmp_path / name, spec)
    before = record_files()
    proc = lxm3_cli("launch", launcher, *args, cwd=str(tmp_path))
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
    return proc, read_record(new_record_id(before))


def experiments_dir():
    return os.path.join(os.environ["XDG_STATE_HOME"], "lxm3", "experiments")


def record_files():
    """The file names of every record, sorted."""
    try:
        return sorted(os.listdir(experiments_dir()))
    except FileNotFoundError:
        return []


def read_record(experiment_id):
    """The record, read as any script would: the standard library's json."""
    with open(os.path.join(experiments_dir(), f"{experiment_id}.json"), encoding="utf-8") as f:
        return json.load(f)


def new_record_id(before):
    """The id of the one record file that is not in ``before``."""
    new = [name for name in record_files() if name not in before]
    assert len(new) == 1, f"expected one new record, found {new} in {experiments_dir()}"
    assert new[0].endswith(".json")
    return int(new[0][:-5])


def status_json(experiment_id, *more):
    """``lxm3 status ID [MORE] --json``, parsed."""
    proc = lxm3_cli("status", str(experiment_id), *more, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def states(status, work_unit_id=1):
    """[(state, exit code)] of each task of a work unit in ``status --json`` output."""
    tasks = status["work_units"][str(work_unit_id)]["tasks"]
    assert [t["task"] for t in tasks] == list(range(len(tasks)))
    return [(t["state"], t["exit_code"]) for t in tasks]


# --- processes ------------------------------------------------------------------------


def processes_mentioning(*needles):
    """{pid: command line} of the processes on this machine (but this one) whose
    command line contains one of the needles."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if any(needle in argv for needle in needles):
            found[int(pid)] = argv
    return found


def wait_no_processes(text, timeout):
    """Wait up to ``timeout`` s for no process to mention ``text``; what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def is_gone(pid):
    """The process has ended (it no longer exists, or is a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the command name in parentheses, which may hold spaces.
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


# --- cluster workspaces ---------------------------------------------------------------


@pytest.fixture
def cluster_workspaces():
    """``make(tb, scheduler, mode)`` -> a cluster_helpers.ClusterWorkspace, whose jobs
    are cancelled and directories removed after the test."""
    from cluster_helpers import workspace_factory  # it imports this module

    with workspace_factory() as make:
        yield make
