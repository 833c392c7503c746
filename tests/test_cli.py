"""The command line, run as users run it: python -m lxm3 ... in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

import lxm3

from conftest import ROOT


def lxm3_cli(*args, cwd=None, env=None):
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "lxm3", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_version():
    proc = lxm3_cli("version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"lxm3 {lxm3.__version__}"


def test_help_teaches_the_commands():
    proc = lxm3_cli("--help")
    assert proc.returncode == 0
    assert "launch" in proc.stdout and "version" in proc.stdout
    proc = lxm3_cli("launch", "--help")
    assert "--lxm_config" in proc.stdout and "LXM_CONFIG" in proc.stdout


def test_launcher_runs_as_main_with_its_arguments(tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent("""\
        import argparse, sys
        from lxm3 import xm_cluster
        parser = argparse.ArgumentParser()
        parser.add_argument("--seeds", type=int)
        parser.add_argument("rest", nargs="*")
        if __name__ == "__main__":
            flags = parser.parse_args()
            print("argv0", sys.argv[0])
            print("seeds", flags.seeds, "rest", flags.rest)
            print("config", xm_cluster.load_config().project)
    """))
    (tmp_path / "my.toml").write_text('project = "from-flag"\n')
    proc = lxm3_cli("launch", str(launcher), "--seeds", "3", "--lxm_config", str(tmp_path / "my.toml"),
                    "x y", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert f"argv0 {launcher}" in proc.stdout
    assert "seeds 3 rest ['x y']" in proc.stdout
    assert "config from-flag" in proc.stdout
    proc = lxm3_cli("launch", str(launcher), "--lxm_config=" + str(tmp_path / "my.toml"), "-h",
                    cwd=str(tmp_path))
    assert "usage:" in proc.stdout  # -h after the launcher is the launcher's


def test_errors_in_the_launcher_show_the_users_traceback(tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text("def helper():\n    raise RuntimeError('boom in my code')\nhelper()\n")
    proc = lxm3_cli("launch", str(launcher))
    assert proc.returncode == 1
    assert "RuntimeError: boom in my code" in proc.stderr
    assert f'File "{launcher}", line 2, in helper' in proc.stderr
    assert "lxm3.py" not in proc.stderr and "runpy" not in proc.stderr


def test_our_errors_are_one_clear_line(tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent("""\
        from lxm3 import xm, xm_cluster
        with xm_cluster.create_experiment("x") as experiment:
            spec = xm_cluster.PythonPackage(xm_cluster.ModuleName("m"), path="missing")
            experiment.package([xm.Packageable(spec, executor_spec=xm_cluster.Local.Spec())])
    """))
    proc = lxm3_cli("launch", str(launcher))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lxm3: error: PythonPackage path {tmp_path / 'missing'} is not a directory")


def test_missing_launcher_and_bad_config():
    proc = lxm3_cli("launch", "no_such_launcher.py")
    assert proc.returncode == 1
    assert "lxm3: error: launcher no_such_launcher.py does not exist" in proc.stderr


def test_absl_launcher(tmp_path):
    pytest.importorskip("absl")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent("""\
        from absl import app, flags
        FLAGS = flags.DEFINE_integer("seeds", 1, "number of seeds")
        def main(argv):
            print("absl seeds", FLAGS.value, argv[1:])
        if __name__ == "__main__":
            app.run(main)
    """))
    proc = lxm3_cli("launch", str(launcher), "--seeds=5", "--lxm_config", "/dev/null", "extra")
    assert proc.returncode == 0, proc.stderr
    assert "absl seeds 5 ['extra']" in proc.stdout


def test_example_sweep_runs_locally(tmp_path):
    example = os.path.join(ROOT, "examples", "sweep", "launcher.py")
    proc = lxm3_cli("launch", example, "--seeds", "2", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "loss=" in line]
    assert len(lines) == 4
    assert any('"lr=0.1 seed\'s 1"' in line for line in lines)
    assert "all 4 task(s)" in proc.stderr


def test_example_hello_world_runs_locally(tmp_path):
    example = os.path.join(ROOT, "examples", "hello_world", "launcher.py")
    proc = lxm3_cli("launch", example, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "arguments: ['--greeting=hi there', 'a positional argument']" in proc.stdout
