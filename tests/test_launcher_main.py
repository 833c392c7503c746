"""`lxm3 launch` runs both styles of launcher: scripts that run themselves under
``if __name__ == "__main__":``, and lxm3 0.4.2's, whose ``lxm3 launch`` imported the
launcher and ran ``app.run(main)`` itself, so its launchers may have no guard. ``main``
runs exactly once either way."""

import os
import textwrap

import pytest

import lxm3

from conftest import lxm3_cli, write_files


def launch(tmp_path, source, *args, name="launcher.py"):
    write_files(tmp_path, {name: source})
    return lxm3_cli("launch", name, *args, cwd=str(tmp_path))


def ran(proc):
    return [line for line in proc.stdout.splitlines() if line.startswith("main ran")]


ABSL_MAIN = textwrap.dedent("""\
    from absl import app, flags
    from lxm3 import xm, xm_cluster

    _SEED = flags.DEFINE_integer("seed", 0, "random seed")

    def main(argv):
        print("main ran", _SEED.value, argv[1:], flags.FLAGS.xm_launch_script == argv[0])
""")


def test_absl_launcher_without_a_guard_runs_its_main_once_with_its_flags(tmp_path):
    pytest.importorskip("absl")
    proc = launch(tmp_path, ABSL_MAIN, "--seed=3", "positional")
    assert proc.returncode == 0, proc.stderr
    # as 0.4.2: absl parsed the flags, --xm_launch_script names the launcher
    assert ran(proc) == ["main ran 3 ['positional'] True"]


def test_absl_launcher_with_a_guard_runs_its_main_once(tmp_path):
    pytest.importorskip("absl")
    proc = launch(tmp_path, ABSL_MAIN.replace("flags.FLAGS.xm_launch_script == argv[0]", "'guarded'")
                  + "\nif __name__ == '__main__':\n    app.run(main)\n", "--seed=4")
    assert proc.returncode == 0, proc.stderr
    assert ran(proc) == ["main ran 4 [] guarded"]


def test_absl_flags_are_checked_as_0_4_2_checked_them(tmp_path):
    pytest.importorskip("absl")
    proc = launch(tmp_path, ABSL_MAIN, "--no_such_flag=1")
    assert proc.returncode == 1
    assert "Unknown command line flag 'no_such_flag'" in proc.stderr
    assert ran(proc) == []


def test_absl_launcher_whose_main_takes_no_argv(tmp_path):
    pytest.importorskip("absl")
    proc = launch(tmp_path, """\
        from absl import flags
        _N = flags.DEFINE_integer("n", 1, "n")
        def main():
            print("main ran", _N.value)
    """, "--n=2")
    assert proc.returncode == 0, proc.stderr
    assert ran(proc) == ["main ran 2"]


def test_argparse_script_with_a_guard_runs_once(tmp_path):
    proc = launch(tmp_path, """\
        import argparse
        def main():
            parser = argparse.ArgumentParser()
            parser.add_argument("--lr", type=float)
            print("main ran", parser.parse_args().lr)
        if __name__ == "__main__":
            main()
    """, "--lr", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert ran(proc) == ["main ran 0.5"]


def test_argparse_launcher_without_a_guard_runs_once_without_absl(tmp_path):
    proc = launch(tmp_path, """\
        import argparse, sys
        def main():
            parser = argparse.ArgumentParser()
            parser.add_argument("--lr", type=float)
            print("main ran", parser.parse_args().lr, "absl" in sys.modules)
    """, "--lr", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert ran(proc) == ["main ran 0.25 False"]  # lxm3 imports absl only for launchers using it


def test_plain_main_gets_argv_and_gives_the_exit_status(tmp_path):
    proc = launch(tmp_path, """\
        import sys
        def main(argv):
            print("main ran", argv[1:], "absl" in sys.modules)
            return 3
    """, "a", "--b=c")
    assert proc.returncode == 3
    assert ran(proc) == ["main ran ['a', '--b=c'] False"]


def test_a_script_that_calls_its_main_itself_is_not_run_again(tmp_path):
    proc = launch(tmp_path, """\
        def main():
            print("main ran")
        main()
    """)
    assert proc.returncode == 0, proc.stderr
    assert ran(proc) == ["main ran"]


def test_a_script_that_runs_app_run_unguarded_runs_once(tmp_path):
    pytest.importorskip("absl")
    proc = launch(tmp_path, ABSL_MAIN.replace("flags.FLAGS.xm_launch_script == argv[0]", "'self'")
                  + "\napp.run(main)\n")
    assert proc.returncode == 0, proc.stderr
    assert ran(proc) == ["main ran 0 [] self"]


def test_a_script_that_launched_at_top_level_keeps_its_main_a_helper(tmp_path):
    """It created an experiment: it ran; its ``main`` is something else."""
    proc = launch(tmp_path, """\
        from lxm3 import xm_cluster
        def main():
            print("main ran")
        with xm_cluster.create_experiment("top level", config=xm_cluster.Config()) as experiment:
            print("launched", experiment.experiment_id)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "launched" in proc.stdout
    assert ran(proc) == []


def test_a_name_main_that_is_not_a_function_is_left_alone(tmp_path):
    proc = launch(tmp_path, "main = 'not callable'\nprint('module ran')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "module ran\n"


def test_errors_in_main_show_the_launchers_traceback(tmp_path):
    proc = launch(tmp_path, """\
        def main(argv):
            raise RuntimeError("boom in main")
    """)
    assert proc.returncode == 1
    assert "RuntimeError: boom in main" in proc.stderr
    assert f'File "{tmp_path / "launcher.py"}", line 2, in main' in proc.stderr


def test_a_0_4_2_launcher_launches_its_jobs_once(tmp_path):
    """Like lxm3 0.4.2's own launchers: absl, main(_), no guard; a local sweep."""
    pytest.importorskip("absl")
    write_files(tmp_path, {"app/build.sh": "#!/bin/sh\ntrue\n"})
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    proc = launch(tmp_path, """\
        from absl import app, flags
        from lxm3 import xm, xm_cluster

        _SEEDS = flags.DEFINE_integer("seeds", 1, "how many seeds")

        def main(_):
            with xm_cluster.create_experiment(experiment_title="no guard") as experiment:
                executor = xm_cluster.Local()
                spec = xm_cluster.UniversalPackage(
                    entrypoint=xm_cluster.CommandList(['echo "task ran with $*"', "true"]),
                    build_script="build.sh", path="app")
                [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
                experiment.add(xm_cluster.ArrayJob(
                    exe, executor, args=[{"seed": s} for s in range(_SEEDS.value)]))
    """, "--seeds=2")
    assert proc.returncode == 0, proc.stderr
    tasks = sorted(line.split("] ", 1)[1] for line in proc.stdout.splitlines() if "task ran" in line)
    assert tasks == ["task ran with --seed=0", "task ran with --seed=1"]
    assert [r.title for r in lxm3.list_records()] == ["no guard"]


def test_create_experiment_without_a_title_is_named_after_the_launcher(tmp_path):
    """XManager's create_experiment takes no title; 0.4.2's README calls it so."""
    launcher = tmp_path / "my_sweep.py"
    launcher.write_text(textwrap.dedent("""\
        from lxm3 import xm_cluster
        with xm_cluster.create_experiment() as experiment:
            print("title", experiment.experiment_title)
    """))
    proc = lxm3_cli("launch", str(launcher), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "title my_sweep" in proc.stdout
