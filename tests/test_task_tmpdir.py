"""A task stopped while it prepares its working directory leaves no directory behind.

The job script unpacks the archive into a private directory under $TMPDIR and
removes it on exit. A TERM that lands after the directory exists but before the
script knows its name (the window between ``mktemp`` creating it and printing
its name, then the assignment) used to leave it behind: on a cluster, one per
cancelled task, in a node's /tmp.

That window is microseconds wide, so the test widens it with stand-ins first on
the tasks' PATH (nothing real can hold a task there long enough): ``mktemp``
creates its directory with the real mktemp, then waits before printing the
name; ``unzip`` waits, then runs the real unzip. Each touches a file saying it
has begun, and the launch is stopped (SIGTERM, as a closed terminal or a
supervisor does) once every task has reached one of them.
"""

import os
import shutil
import signal
import subprocess
import textwrap

from conftest import interrupt_when, lxm3_popen, write_files

NUM_TASKS = 3

STAND_IN = """\
    #!/bin/bash
    # Stand-in for {name}: say so, widen the window, then do the real work.
    touch "$LXM_TEST_MARKS/{name}-$LXM_TASK_ID"
    {body}
"""

LAUNCHER = """\
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment("tmpdir") as experiment:
        executor = xm_cluster.Local(max_parallel_tasks={n})
        spec = xm_cluster.UniversalPackage(entrypoint=["echo task ran"], build_script="build.sh",
                                           path="app")
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{{}}] * {n}))
"""


def stand_ins(bindir, real_mktemp, real_unzip):
    bodies = {
        # The directory exists, its name is not yet printed: the window.
        "mktemp": f'out=$({real_mktemp} "$@") || exit\nsleep 60\nprintf "%s\\n" "$out"',
        "unzip": f'sleep 60\nexec {real_unzip} "$@"',
    }
    for name, body in bodies.items():
        path = os.path.join(bindir, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(STAND_IN.format(name=name, body="{body}")).format(body=body))
        os.chmod(path, 0o755)


def test_stopped_tasks_leave_no_temporary_directory(tmp_path):
    real_mktemp, real_unzip = shutil.which("mktemp"), shutil.which("unzip")
    assert real_mktemp and real_unzip, "mktemp and unzip are needed"
    bindir, marks, task_tmp = tmp_path / "bin", tmp_path / "marks", tmp_path / "task-tmp"
    for d in (bindir, marks, task_tmp):
        d.mkdir()
    stand_ins(str(bindir), real_mktemp, real_unzip)
    write_files(tmp_path, {
        "app/build.sh": '#!/bin/sh\necho hello > "$BUILDDIR/hello.txt"\n',
        "launcher.py": LAUNCHER.format(n=NUM_TASKS),
    })
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    env = {"TMPDIR": str(task_tmp), "LXM_TEST_MARKS": str(marks),
           "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = lxm3_popen("launch", "launcher.py", cwd=str(tmp_path), env=env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = interrupt_when(proc, lambda: len(os.listdir(marks)) == NUM_TASKS,
                               "the tasks to start", sig=signal.SIGTERM)
    assert proc.returncode == 130, stderr
    assert "task ran" not in stderr
    left = [name for name in os.listdir(task_tmp) if name.startswith("lxm3")]
    assert left == [], f"left behind in the tasks' TMPDIR: {left}"
