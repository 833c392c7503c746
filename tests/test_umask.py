"""Tasks run with the umask the user's own commands have on the cluster, on every
scheduler, as if the user ran the program there themselves.

Left alone, a Slurm task gets the submitting shell's umask (sbatch passes it on,
and lxm3 submits from a shell set to 077 to keep its own files private), and a
Grid Engine task gets its execution daemon's (022): the same launcher would make
private files on one and shared ones on the other. The task program here is
cluster_helpers.TASK_MAIN plus its umask in the report; the mode of the report
file it creates is checked too.
"""

import json
import os
import shutil
import stat
import textwrap
import uuid

import pytest
from cluster_helpers import (
    MODES,
    SCHEDULERS,
    TASK_MAIN,
    ClusterWorkspace,
    job_unit,
)

from conftest import PYPROJECT, lxm3_cli, write_files
from testbed_env import require_testbed

UMASK_MAIN = textwrap.dedent(TASK_MAIN).replace(
    "start = time.time()\n",
    "start = time.time()\numask = os.umask(0)\nos.umask(umask)\n",
).replace('"cwd": os.getcwd(),', '"cwd": os.getcwd(),\n    "umask": "%04o" % umask,')
LOGIN_UMASK = 0o027  # the login-mode launch runs with this: neither 022 nor 077


@pytest.fixture(scope="module")
def umask_projects():
    """The echo project with the umask report, once per mode (login: owned by the test user)."""
    assert '"umask": "%04o" % umask' in UMASK_MAIN and "os.umask(umask)" in UMASK_MAIN
    roots, projects = [], {}

    def get(mode, user):
        if mode not in projects:
            root = f"/tmp/lxm3-umask-project-{mode}-{uuid.uuid4().hex[:10]}"
            os.mkdir(root)
            roots.append(root)
            path = write_files(os.path.join(root, "echo_project"), {
                "pyproject.toml": PYPROJECT.format(name="echoapp"),
                "echoapp/__init__.py": "",
                "echoapp/main.py": UMASK_MAIN,
            })
            if mode == "login":
                for dirpath, dirnames, filenames in os.walk(root):
                    for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                        shutil.chown(name, user, user)
            os.chmod(root, 0o755)
            projects[mode] = path
        return projects[mode]

    yield get
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workspaces(umask_projects):
    made = []

    def make(tb, scheduler, mode):
        made.append(ClusterWorkspace(tb, scheduler, mode, umask_projects(mode, tb.ssh_user)))
        return made[-1]

    yield make
    for ws in made:
        ws.cleanup()


@pytest.mark.testbed
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_tasks_get_the_umask_of_the_users_own_commands(workspaces, scheduler, mode):
    tb = require_testbed(scheduler)
    ws = workspaces(tb, scheduler, mode)
    if mode == "ssh":
        # What the user's own commands there get; lxm3 itself runs with 077 here,
        # which must not leak into the task either.
        expected = tb.ssh("umask").stdout.strip()
        launch_umask = 0o077
    else:  # this machine is the login node: the launching shell's umask is the user's
        expected, launch_umask = f"{LOGIN_UMASK:04o}", LOGIN_UMASK
    assert len(expected) == 4 and int(expected, 8) != 0o077, expected
    out = ws.out_dir()
    old = os.umask(launch_umask)  # inherited by the launch (and, via runuser, in login mode)
    try:
        launch = ws.launch([job_unit(ws.executor(), env_vars={"ECHO_OUT": out})]).check()
    finally:
        os.umask(old)
    [report] = ws.wait_for_reports(out, 1, launch).values()
    assert report["umask"] == expected, launch.describe()
    # A file the task creates gets the permissions that umask gives.
    created = os.stat(os.path.join(out, "task-0.json")).st_mode
    assert stat.S_IMODE(created) == 0o666 & ~int(expected, 8), oct(created)
    # lxm3's own files stay private.
    assert stat.S_IMODE(os.stat(ws.staging_path).st_mode) == 0o700
    job_script = os.path.join(ws.staging_path, "experiments", str(launch.experiment_id), "wu1", "job.sh")
    assert f"umask {expected}  # the umask of your own commands on the cluster" in open(job_script).read()


LOCAL_LAUNCHER = """\
    import sys
    from lxm3 import xm, xm_cluster

    executor = getattr(xm_cluster, sys.argv[1])()
    with xm_cluster.create_experiment("umask") as experiment:
        spec = xm_cluster.PythonPackage(xm_cluster.ModuleName("echoapp.main"), path="echo_project")
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm.Job(exe, executor, env_vars={"ECHO_OUT": sys.argv[2]}))
"""


def run_launcher(tmp_path, *args):
    old = os.umask(LOGIN_UMASK)
    try:
        return lxm3_cli("launch", *args, cwd=str(tmp_path))
    finally:
        os.umask(old)


def test_local_tasks_and_dry_runs_use_the_launching_umask(tmp_path):
    """Local tasks get the umask lxm3 was launched with; a dry run of a cluster
    launch, which asks the cluster nothing, writes that one and says so."""
    write_files(tmp_path / "echo_project", {"pyproject.toml": PYPROJECT.format(name="echoapp"),
                                            "echoapp/__init__.py": "", "echoapp/main.py": UMASK_MAIN})
    (tmp_path / "launcher.py").write_text(textwrap.dedent(LOCAL_LAUNCHER))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_launcher(tmp_path, "launcher.py", "Local", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "task-0.json").read_text())
    assert report["umask"] == f"{LOGIN_UMASK:04o}"
    (tmp_path / "lxm.toml").write_text('[[clusters]]\nname = "c"\nserver = "login.example"\n')
    proc = run_launcher(tmp_path, "--dry-run", "launcher.py", "Slurm", str(out))
    assert proc.returncode == 0, proc.stderr
    directory = proc.stderr.split("job scripts are written to ")[1].split(";")[0]
    [script] = [os.path.join(d, "job.sh") for d, _, files in os.walk(directory) if "job.sh" in files]
    assert (f"umask {LOGIN_UMASK:04o}  # this machine's umask: a dry run does not ask the cluster "
            "for its own") in open(script).read()
    shutil.rmtree(directory)


def test_a_umask_that_is_not_an_octal_mask_is_refused(monkeypatch):
    """A real shell's ``umask`` always prints a mask; what the probe would do with
    anything else is checked with a connection whose output is given (a stand-in:
    no real shell prints a wrong one), and the job script refuses one too."""
    import lxm3

    for printed in ("0022", "022", "0777"):
        script = lxm3.render_job_script(header="", task_id="LXM_TASK_ID=0", experiment_id=1,
                                        work_unit_id=1, num_tasks=1, archive="a.zip",
                                        tasks_file="tasks", umask=printed, umask_note="n")
        assert f"\numask {printed}  # n\n" in script
    for bad in ("22", "00022", "u=rwx", "0022; rm -rf ~", "0089"):
        with pytest.raises(ValueError, match="is not an octal mask such as 0022"):
            lxm3.render_job_script(header="", task_id="LXM_TASK_ID=0", experiment_id=1,
                                   work_unit_id=1, num_tasks=1, archive="a.zip",
                                   tasks_file="tasks", umask=bad)
    connection = lxm3.Connection(lxm3.ClusterConfig(name="c", server="login.example"))
    monkeypatch.setattr(connection, "run_script", lambda script, what: (
        "umask u=rwx,g=rx,o=rx\nstaging /home/a/lxm3-staging\nhome /home/a\n"))
    with pytest.raises(lxm3.ClusterError, match=r"'umask' in a shell on login\.example \(cluster 'c'\) "
                                                r"printed 'u=rwx,g=rx,o=rx', not an octal mask such as 0022"):
        lxm3.probe_cluster(connection, lxm3.SCHEDULERS["slurm"])
