"""`lxm3 launch` options travel with the launch: nothing leaks into the next one.

``lxm3.main`` is called twice in this one process, as a notebook, a test
suite or a driver script would; the second launch must not inherit the
first one's --dry-run, --lxm_config, argv, sys.path or launcher path.
"""

import json
import os
import sys

import lxm3

from conftest import write_files

LAUNCHER = """\
    import os, sys
    from lxm3 import xm, xm_cluster

    print("project", xm_cluster.load_config().project)
    print("argv", sys.argv[1:])
    with xm_cluster.create_experiment("leak") as experiment:
        spec = xm_cluster.UniversalPackage(path=".", build_script="build.sh",
                                           entrypoint=["sh", "run.sh"])
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=xm_cluster.Local.Spec())])
        experiment.add(xm.Job(exe, xm_cluster.Local(), env_vars={"MARKER": os.environ["MARKER"]}))
"""


def test_a_dry_run_does_not_make_the_next_launch_a_dry_run(tmp_path, monkeypatch, capsys):
    project = write_files(tmp_path / "proj", {"launcher.py": LAUNCHER, "my.toml": 'project = "flagged"\n',
                                                 "build.sh": "#!/bin/sh\ncp run.sh \"$BUILDDIR/\"\n",
                                                 "run.sh": 'touch "$MARKER"\n'})
    launcher = os.path.join(project, "launcher.py")
    os.chmod(os.path.join(project, "build.sh"), 0o755)
    marker = tmp_path / "ran"
    monkeypatch.setenv("MARKER", str(marker))
    argv, path = list(sys.argv), list(sys.path)

    assert lxm3.main(["launch", "--dry-run", launcher, "--lxm_config", os.path.join(project, "my.toml"),
                      "first"]) == 0
    out = capsys.readouterr()
    assert "project flagged" in out.out and "argv ['first']" in out.out
    assert "[dry run] would run 1 task(s) locally" in out.out
    assert not marker.exists()  # a dry run runs nothing
    assert lxm3.list_records() == []  # and leaves no record
    assert (sys.argv, sys.path) == (argv, path)

    assert lxm3.main(["launch", launcher, "second"]) == 0
    out = capsys.readouterr()
    assert "project None" in out.out  # the first launch's --lxm_config is gone
    assert "argv ['second']" in out.out
    assert "[dry run]" not in out.out + out.err
    assert marker.exists()  # this launch ran its task
    [record] = lxm3.list_records()
    assert json.loads(json.dumps(record.to_json()))["title"] == "leak"
    assert (sys.argv, sys.path) == (argv, path)
    assert lxm3.xm.utils.find_launch_script_path() != launcher


def test_current_launch_is_the_defaults_outside_a_launch(tmp_path):
    assert lxm3.current_launch() == lxm3.LaunchOptions()
    options = lxm3.LaunchOptions(dry_run_directory=str(tmp_path))
    with options.applied():
        assert lxm3.current_launch() is options
    assert lxm3.current_launch().dry_run_directory is None
