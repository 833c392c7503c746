"""Entrypoints as lxm3 0.4.2 and XManager mean them: ``UniversalPackage(entrypoint=
["python3", "main.py"])`` is ONE command line (its words joined with spaces);
``xm.CommandList([...])`` is one shell command per line. Real build scripts,
real Local launches."""

from __future__ import annotations

import json
import os

import lxm3
from lxm3 import xm

from conftest import ECHO_MAIN, write_files

BUILD_SCRIPT = """\
    #!/bin/sh
    # A build script as 0.4.2's examples write them: copy the program into $BUILDDIR.
    set -e
    cp main.py "$BUILDDIR/main.py"
    mkdir -p "$BUILDDIR/lib"
    echo 'GREETING = "built by build.sh"' > "$BUILDDIR/lib/greeting.py"
"""

MAIN = ECHO_MAIN.replace(
    'print("echo argv=%s"',
    'sys.path.insert(0, "lib"); import greeting; print(greeting.GREETING); print("echo argv=%s"')


def universal_project(tmp_path):
    root = write_files(tmp_path / "app", {"build.sh": BUILD_SCRIPT, "main.py": MAIN})
    os.chmod(os.path.join(root, "build.sh"), 0o755)
    return root


def launch_locally(tmp_path, spec, args):
    out = tmp_path / "out"
    out.mkdir()
    with lxm3.create_experiment("entrypoints", config=lxm3.Config()) as experiment:
        executor = lxm3.Local()
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(),
                                                   env_vars={"ECHO_OUT": str(out)})])
        experiment.add(xm.Job(exe, executor, args=args))
    [unit] = experiment.work_units.values()
    with open(unit.log_paths[0]) as f:
        log = f.read()
    with open(out / "task-0.json") as f:
        return json.load(f), log


def test_universal_entrypoint_words_are_one_command_line(tmp_path):
    spec = lxm3.UniversalPackage(entrypoint=["python3", "main.py", "--fixed=1"],
                                 build_script="build.sh", path=universal_project(tmp_path))
    report, log = launch_locally(tmp_path, spec, {"seed": 3, "name": "two  words"})
    assert report["argv"] == ["--fixed=1", "--seed=3", "--name=two  words"]
    assert "built by build.sh" in log
    assert "command not found" not in log


def test_universal_entrypoint_of_one_item_still_works(tmp_path):
    spec = lxm3.UniversalPackage(entrypoint=["python3 main.py"], build_script="build.sh",
                                 path=universal_project(tmp_path))
    report, _ = launch_locally(tmp_path, spec, ["a b"])
    assert report["argv"] == ["a b"]


def test_command_list_is_one_command_per_line(tmp_path, echo_project):
    spec = lxm3.PythonPackage(
        entrypoint=xm.CommandList(["export FROM_FIRST_LINE=yes", "cd echoapp && cd ..",
                                   'python3 -m echoapp.main "from the command"']),
        path=echo_project)
    report, _ = launch_locally(tmp_path, spec, ["task arg"])
    assert report["argv"] == ["from the command", "task arg"]
    assert report["env"]["FROM_FIRST_LINE"] == "yes"


def test_command_that_passes_its_arguments_itself_gets_them_once(tmp_path, echo_project):
    spec = lxm3.PythonPackage(entrypoint=xm.CommandList(['python3 -m echoapp.main "$@"']),
                              path=echo_project)
    report, _ = launch_locally(tmp_path, spec, ["only once"])
    assert report["argv"] == ["only once"]


def test_entrypoint_script_text():
    def body(entrypoint):
        return lxm3.entrypoint_script(entrypoint).splitlines()[2:]

    assert body(["python3", "main.py"]) == ['python3 main.py "$@"']
    assert body(xm.CommandList(["python3", "main.py"])) == ["python3", 'main.py "$@"']
    assert body(xm.CommandList(["run $@"])) == ["run $@"]
    assert body(["sh", "-c", "'exec prog \"$@\"'", "prog", '"$@"']) == \
        ['sh -c \'exec prog "$@"\' prog "$@"']
