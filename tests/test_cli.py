"""The command line, run as users run it: ``python -m lxm3 ...`` in a subprocess.

What ``--help`` of each command teaches; what a mistake gets: on the command
line, argparse's usage and exit code 2; in the config file or the launcher, one
``lxm3: error:`` line that names the file and the key, exit code 1, and nothing
run. And that a launcher runs as ``__main__`` with its own arguments. What the
commands do with records (list, status, logs, cancel) is in test_records.py and
test_status.py; ``--version`` and pipes are in test_cli_truth.py.
"""

import os
import re
import textwrap

import pytest

from conftest import ROOT, error_line, lxm3_cli

# Wide enough that argparse wraps no line: the help is compared phrase by phrase.
WIDE = {"COLUMNS": "300"}


def words(text):
    """Text with its whitespace folded, so that line breaks do not matter."""
    return " ".join(text.split())


# --- what --help teaches --------------------------------------------------------------

# command: (its usage line, what its help must say)
HELP = {
    "launch": ("usage: lxm3 launch [-h] [--dry-run] [--wait] [--interval S] [--timeout S] LAUNCHER ...", [
        "Run LAUNCHER as __main__ with sys.argv = [LAUNCHER, ARGS...]",
        "absl launchers (app.run(main)) all work",
        "LAUNCHER the launcher script (a .py file)",
        "ARGS arguments for the launcher",
        "--dry-run package and write the job scripts into a local folder",
        "The config is the first found of: --lxm_config PATH (taken out of ARGS wherever it "
        "appears), $LXM_CONFIG, ./lxm.toml, $XDG_CONFIG_HOME/lxm3/config.toml",
        "Set LXM_DEBUG=1 to see lxm3's own frames in tracebacks",
        "--wait then wait, as 'lxm3 wait' does, until every task of the experiment it launched has ended",
    ]),
    "list": ("usage: lxm3 list [-h] [-n N] [--json]", [
        "Experiments launched from this machine, newest first.",
        "-n N how many (default 20)",
        "--json print JSON for scripts",
    ]),
    "status": ("usage: lxm3 status [-h] [--json] [--watch] [--interval S] XID [WID]", [
        "pending, running, completed, failed or cancelled, with exit codes",
        "XID experiment id (see 'lxm3 list')",
        "WID one work unit: list each task",
        "--json print JSON for scripts",
        "--watch follow the experiment until every task has ended",
        "at least 5 to spare the scheduler",
    ]),
    "wait": ("usage: lxm3 wait [-h] [--interval S] [--timeout S] XID [WID]", [
        "exit with 0 if every task completed, 1 if any failed",
        "124 when --timeout ran out first",
        "--interval S seconds between two queries of each cluster (one round trip each; default 30, "
        "at least 5 to spare the scheduler); the interval grows x1.5",
    ]),
    "logs": ("usage: lxm3 logs [-h] [--task TASK] [-f] [-n N] XID [WID]", [
        "Show the end of a task's log, or follow it with -f.",
        "WID work unit (needed when there are several)",
        "--task TASK task index, from 0 (default 0)",
        "-f, --follow keep printing new lines until the task ends",
        "-n N lines to show (default 50)",
    ]),
    "cancel": ("usage: lxm3 cancel [-h] [--with-dependents] XID [WID]", [
        "Cancel the submitted jobs (one scancel/qdel per cluster).",
        "WID only this work unit",
        "also cancel the work units that wait for WID",
    ]),
    "version": ("usage: lxm3 version [-h]", []),
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_of_each_command(command):
    usage, phrases = HELP[command]
    proc = lxm3_cli(command, "--help", env=WIDE)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines()[0] == usage
    text = words(proc.stdout)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in the help of {command}:\n{proc.stdout}"


def test_help_lists_every_command_and_the_ssh_settings():
    for args in (["--help"], ["-h"]):
        proc = lxm3_cli(*args, env=WIDE)
        assert (proc.returncode, proc.stderr) == (0, ""), args
        assert proc.stdout.startswith("usage: lxm3 [-h] [--version] COMMAND ...\n")
        text = words(proc.stdout)
        for command, line in [("launch", "run a launcher script"),
                              ("list", "recent experiments, newest first"),
                              ("status", "the state of an experiment's tasks"),
                              ("logs", "show or follow a task's log"),
                              ("cancel", "cancel an experiment's jobs"),
                              ("version", "print lxm3's version")]:
            assert f"{command} {line}" in text, command
        assert "Run 'lxm3 COMMAND --help' for the options of a command." in text
        for setting in ("$LXM3_SSH_KEEP", "ssh_connect_timeout", "ssh_keepalive_interval",
                        "$LXM3_SSH_CONNECT_TIMEOUT", "$LXM3_SSH_KEEPALIVE_INTERVAL"):
            assert setting in text, setting


# --- mistakes on the command line: argparse's usage, exit code 2 ----------------------


def test_no_command_prints_the_help_and_fails():
    proc = lxm3_cli(env=WIDE)
    assert proc.returncode == 2
    assert proc.stdout.startswith("usage: lxm3 [-h] [--version] COMMAND ...\n")
    assert "launch run a launcher script" in words(proc.stdout)


@pytest.mark.parametrize("args, usage, error", [
    (["bogus"], "usage: lxm3 [-h] [--version] COMMAND ...",
     "lxm3: error: argument COMMAND: invalid choice: 'bogus' (choose from "),
    (["status"], "usage: lxm3 status [-h] [--json] [--watch] [--interval S] XID [WID]",
     "lxm3 status: error: the following arguments are required: XID"),
    (["logs", "42", "--task", "x"], "usage: lxm3 logs [-h] [--task TASK] [-f] [-n N] XID [WID]",
     "lxm3 logs: error: argument --task: invalid int value: 'x'"),
    (["list", "-n", "many"], "usage: lxm3 list [-h] [-n N] [--json]",
     "lxm3 list: error: argument -n: invalid int value: 'many'"),
    (["cancel", "42", "one"], "usage: lxm3 cancel [-h] [--with-dependents] XID [WID]",
     "lxm3 cancel: error: argument WID: invalid int value: 'one'"),
    (["launch"], "usage: lxm3 launch [-h] [--dry-run] [--wait] [--interval S] [--timeout S] LAUNCHER ...",
     "lxm3 launch: error: the following arguments are required: LAUNCHER"),
])  # fmt: skip
def test_bad_arguments_show_the_usage_and_exit_2(args, usage, error):
    proc = lxm3_cli(*args, env=WIDE)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    first, second = proc.stderr.splitlines()
    assert first == usage
    assert second.startswith(error), second


def test_an_unknown_experiment_is_named_with_where_lxm3_looked(xdg_dirs):
    experiments = os.path.join(os.environ["XDG_STATE_HOME"], "lxm3", "experiments")
    for command in ("status", "logs", "cancel"):
        assert error_line(lxm3_cli(command, "42")) == (
            f"lxm3: error: no record of experiment 42 in {experiments}; "
            "'lxm3 list' shows the experiments launched from this machine"), command
    proc = lxm3_cli("list")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "no experiments recorded yet" in proc.stdout


# --- mistakes in the config file: one line naming file and key, exit code 1 ----------

# A launcher that says so when it gets past loading the config.
CONFIG_LAUNCHER = """\
    from lxm3 import xm_cluster
    with xm_cluster.create_experiment("config check") as experiment:
        print("the experiment started")
"""


@pytest.mark.parametrize("config, message", [
    ('[[clusters]]\nname = "c"\nservr = "login.example"\n',
     "{path}: unknown key 'clusters[0].servr' (cluster 'c'); did you mean 'server'? "
     "The keys of [[clusters]] are: name, server, "),
    ('[[clusters]]\nname = "c"\nport = "22"\n',
     "{path}: 'clusters[0].port' (cluster 'c') must be a port number from 1 to 65535, "
     "not a string ('22')"),
    ('[local]\nstagin = "x"\n',
     "{path}: unknown key 'local.stagin'; did you mean 'storage'? The keys of [local] are: "),
    ('project = 7\n', "{path}: 'project' must be a string"),
])  # fmt: skip
@pytest.mark.parametrize("how", ["--lxm_config", "LXM_CONFIG", "./lxm.toml"])
def test_bad_config_names_the_file_and_the_key(tmp_path, how, config, message):
    write = tmp_path / ("lxm.toml" if how == "./lxm.toml" else "site.toml")
    write.write_text(config)
    (tmp_path / "launcher.py").write_text(textwrap.dedent(CONFIG_LAUNCHER))
    args, env = [], {}
    if how == "--lxm_config":
        args = ["--lxm_config", str(write)]
    elif how == "LXM_CONFIG":
        env = {"LXM_CONFIG": str(write)}
    proc = lxm3_cli("launch", "launcher.py", *args, cwd=str(tmp_path), env=env)
    line = error_line(proc)
    assert line.startswith("lxm3: error: " + message.format(path=write)), line
    assert "the experiment started" not in proc.stdout


@pytest.mark.parametrize("how", ["--lxm_config", "LXM_CONFIG"])
def test_a_config_file_that_is_not_there_is_named(tmp_path, how):
    (tmp_path / "launcher.py").write_text(textwrap.dedent(CONFIG_LAUNCHER))
    missing = tmp_path / "no-such.toml"
    args = ["--lxm_config", str(missing)] if how == "--lxm_config" else []
    env = {"LXM_CONFIG": str(missing)} if how == "LXM_CONFIG" else {}
    proc = lxm3_cli("launch", "launcher.py", *args, cwd=str(tmp_path), env=env)
    assert error_line(proc) == f"lxm3: error: lxm3 config {missing} does not exist"
    assert "the experiment started" not in proc.stdout


def test_malformed_toml_names_the_file_and_the_line(tmp_path):
    (tmp_path / "launcher.py").write_text(textwrap.dedent(CONFIG_LAUNCHER))
    config = tmp_path / "lxm.toml"
    config.write_text('project = "p"\n[local]\nstaging = \n')
    line = error_line(lxm3_cli("launch", "launcher.py", cwd=str(tmp_path)))
    assert re.match(rf"lxm3: error: {re.escape(str(config))}: .*\bline 3\b", line), line


# --- the launcher --------------------------------------------------------------------


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
    assert proc.returncode == 0, proc.stderr
    # -h after the launcher is the launcher's: its own usage, not lxm3's.
    assert proc.stdout.startswith("usage: launcher.py [-h] [--seeds SEEDS] [rest"), proc.stdout


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


def test_missing_launcher_is_named():
    assert error_line(lxm3_cli("launch", "no_such_launcher.py")) == (
        "lxm3: error: launcher no_such_launcher.py does not exist")


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
