"""The config is checked before anything runs: an unknown key or a wrong type is an
error naming the file, the key (as a dotted path, with its cluster) and what is
valid there. A misspelt ``server`` read as absent would send a launch to this
machine, so it must stop the launch before packaging."""

import os
import re
import subprocess
import textwrap
import uuid

import pytest

import lxm3

from conftest import ROOT, lxm3_cli
from testbed_env import require_testbed

CLUSTER_KEYS = ("name, server, user, port, ssh_private_key, ssh_connect_timeout, "
                "ssh_keepalive_interval, storage, env, singularity, slurm, sge, pbs, proxycommand, "
                "ssh_config, python, environment, environments")


def load(tmp_path, text):
    path = tmp_path / "lxm.toml"
    path.write_text(textwrap.dedent(text))
    return str(path), lambda: lxm3.Config.from_file(str(path))


def cluster(body):
    return '[[clusters]]\nname = "hpc"\nserver = "login.example"\n' + textwrap.dedent(body)


def test_misspelt_server_names_file_key_cluster_and_choices(tmp_path):
    path, read = load(tmp_path, '[[clusters]]\nname = "hpc"\nservr = "login.example"\n')
    message = (rf"^{re.escape(path)}: unknown key 'clusters\[0\]\.servr' \(cluster 'hpc'\); "
               rf"did you mean 'server'\? The keys of \[\[clusters\]\] are: {re.escape(CLUSTER_KEYS)}$")
    with pytest.raises(lxm3.ConfigError, match=message):
        read()


def test_unknown_key_far_from_any_has_no_guess_but_the_choices(tmp_path):
    path, read = load(tmp_path, cluster("[clusters.storage]\nstaging = 'x'\nquota = 3\n"))
    with pytest.raises(lxm3.ConfigError, match=(
            rf"^{re.escape(path)}: unknown key 'clusters\[0\]\.storage\.quota' \(cluster 'hpc'\)\. "
            r"The keys of \[clusters\.storage\] are: staging$")):
        read()


def test_key_of_a_subtable_written_one_level_up_is_pointed_to(tmp_path):
    path, read = load(tmp_path, '[local]\nstaging = "/scratch/me"\n')
    with pytest.raises(lxm3.ConfigError, match=(
            rf"^{re.escape(path)}: unknown key 'local\.staging'; did you mean 'storage\.staging'\? "
            r"The keys of \[local\] are: storage, env, singularity$")):
        read()


def test_misspelt_top_level_and_scheduler_keys(tmp_path):
    path, read = load(tmp_path, 'projet = "p"\n')
    with pytest.raises(lxm3.ConfigError, match=(
            rf"^{re.escape(path)}: unknown key 'projet'; did you mean 'project'\? "
            r"The keys of the top level are: project, local, clusters$")):
        read()
    path, read = load(tmp_path, cluster("[clusters.sge]\nmemory_resorce = 'mem_free'\n"))
    with pytest.raises(lxm3.ConfigError, match=(
            rf"^{re.escape(path)}: unknown key 'clusters\[0\]\.sge\.memory_resorce' \(cluster 'hpc'\); "
            r"did you mean 'memory_resource'\? The keys of \[clusters\.sge\] are: bin_dir, gpu_types, "
            r"parallel_environment, memory_resource, gpu_resource, gpu_type_resource$")):
        read()


def test_second_cluster_is_named_by_its_index_and_name(tmp_path):
    path, read = load(tmp_path, cluster("") + '[[clusters]]\nname = "other"\nusr = "me"\n')
    with pytest.raises(lxm3.ConfigError, match=(
            rf"^{re.escape(path)}: unknown key 'clusters\[1\]\.usr' \(cluster 'other'\); "
            r"did you mean 'user'\?")):
        read()


@pytest.mark.parametrize("body, message", [
    ("[clusters.storage]\nstaging = 42\n",
     r"'clusters\[0\]\.storage\.staging' \(cluster 'hpc'\) must be a string, not an integer \(42\)$"),
    ("port = 0\n", r"'clusters\[0\]\.port' \(cluster 'hpc'\) must be a port number from 1 to 65535, "
                   r"not an integer \(0\)$"),
    ("port = 65536\n", r"'clusters\[0\]\.port' .* must be a port number from 1 to 65535, not an integer"),
    ("port = \"22\"\n", r"'clusters\[0\]\.port' .* must be a port number from 1 to 65535, "
                        r"not a string \('22'\)$"),
    ("port = true\n", r"'clusters\[0\]\.port' .* not a boolean \(true\)$"),
    ("ssh_connect_timeout = 0\n",
     r"'clusters\[0\]\.ssh_connect_timeout' .* must be a number of seconds above 0, not an integer \(0\)$"),
    ("ssh_keepalive_interval = \"30\"\n",
     r"'clusters\[0\]\.ssh_keepalive_interval' .* must be a number of seconds above 0, not a string"),
    ("user = [\"a\"]\n", r"'clusters\[0\]\.user' \(cluster 'hpc'\) must be a string, not an array$"),
    ("storage = \"/scratch\"\n",
     r"'clusters\[0\]\.storage' .* must be a table \(\[clusters\.storage\]\), not a string"),
    ("[clusters.env]\nNESTED = { a = 1 }\n",
     r"'clusters\[0\]\.env\.NESTED' \(cluster 'hpc'\) must be a string, not a table$"),
    ("[clusters.slurm]\ngpu_types = { A100 = 80 }\n",
     r"'clusters\[0\]\.slurm\.gpu_types\.A100' .* must be a string, not an integer \(80\)$"),
    ("[clusters.singularity]\nbinds = { src = \"/a\" }\n",
     r"'clusters\[0\]\.singularity\.binds' .* must be an array of tables: "
     r"write \[\[clusters\.singularity\.binds\]\], not a table$"),
    ("[[clusters.singularity.binds]]\ndest = \"/data\"\n",
     r"'clusters\[0\]\.singularity\.binds\[0\]' \(cluster 'hpc'\) has no 'src'"),
])
def test_wrong_types_name_the_key_and_what_it_must_be(tmp_path, body, message):
    path, read = load(tmp_path, cluster(body))
    with pytest.raises(lxm3.ConfigError, match=rf"^{re.escape(path)}: {message}"):
        read()


def test_top_level_shapes(tmp_path):
    path, read = load(tmp_path, "project = 3\n")
    with pytest.raises(lxm3.ConfigError, match=rf"^{re.escape(path)}: 'project' must be a string, "
                                               r"not an integer \(3\)$"):
        read()
    path, read = load(tmp_path, "local = 1\n")
    with pytest.raises(lxm3.ConfigError, match=r"'local' must be a table \(\[local\]\), not an integer"):
        read()
    path, read = load(tmp_path, "[local.storage]\nstaging = false\n")
    with pytest.raises(lxm3.ConfigError, match=r"'local\.storage\.staging' must be a string, "
                                               r"not a boolean \(false\)$"):
        read()


def test_password_is_refused_with_how_lxm3_logs_in(tmp_path):
    path, read = load(tmp_path, cluster('password = "hunter2"\n'))
    with pytest.raises(lxm3.ConfigError, match=(
            rf"^{re.escape(path)}: 'clusters\[0\]\.password' \(cluster 'hpc'\) is not supported: "
            r"lxm3 takes no passwords: it logs in with your ssh keys or ssh-agent, and when a "
            r"password or 2FA code is needed ssh asks for it itself, once per kept connection")) as info:
        read()
    assert "hunter2" not in str(info.value)  # a secret is never echoed


def test_singularity_env_is_refused_with_where_to_put_it(tmp_path):
    path, read = load(tmp_path, cluster("[clusters.singularity.env]\nA = \"1\"\n"))
    with pytest.raises(lxm3.ConfigError, match=(
            r"'clusters\[0\]\.singularity\.env' \(cluster 'hpc'\) is not supported: lxm3 does not "
            r"read singularity\.env .*put the variables in the env table")):
        read()


def test_every_documented_key_is_accepted_and_read(tmp_path):
    """The README's config example (every key) loads; values land where they belong."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Configuration"):]
    example = section[section.index("```toml") + 7:section.index("```", section.index("```toml") + 7)]
    lxm3.Config.from_dict(lxm3._toml_loads(example))  # no error
    path, read = load(tmp_path, """\
        project = "p"
        [local.storage]
        staging = "/scratch/me"
        [local.env]
        N = 3
        B = true
        [[local.singularity.binds]]
        src = "/data"
        [[clusters]]
        name = "hpc"
        server = "login.example"
        user = "alice"
        port = 2222
        ssh_private_key = "~/.ssh/id"
        ssh_connect_timeout = 10
        ssh_keepalive_interval = 2.5
        [clusters.storage]
        staging = "/home/alice/lxm3"
        [clusters.env]
        X = "y"
        [[clusters.singularity.binds]]
        src = "/scratch"
        dest = "/mnt"
        [clusters.slurm]
        gpu_types = { A100 = "a100" }
        [clusters.sge]
        gpu_types = { V100 = "v100" }
        parallel_environment = "mpi"
        memory_resource = "mem_free"
        gpu_resource = "gpus"
        gpu_type_resource = "gputype"
    """)
    config = read()
    assert config.local_env == {"N": "3", "B": "True"}  # as lxm3 always wrote them
    assert config.local_singularity_binds == [("/data", "/data")]
    [hpc] = config.clusters
    assert (hpc.port, hpc.ssh_connect_timeout, hpc.ssh_keepalive_interval) == (2222, 10, 2.5)
    assert hpc.singularity_binds == [("/scratch", "/mnt")]
    assert lxm3._scheduler_settings(hpc, "sge")["memory_resource"] == "mem_free"


LAUNCHER = """\
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment({title!r}) as experiment:
        spec = xm_cluster.UniversalPackage(entrypoint=["echo ran"], build_script="build.sh", path="app")
        executor = xm_cluster.Slurm()
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm.Job(exe, executor))
"""


@pytest.mark.testbed
def test_misspelt_server_stops_the_launch_before_anything_happens(tmp_path):
    """Read as absent, ``servr`` would make this machine the login node: sbatch would
    run here (the test bed's Slurm is on this machine) with lxm3's files in the
    staging path. The launch must exit 1 before packaging; nothing is submitted."""
    tb = require_testbed("slurm")
    title = f"servr-{uuid.uuid4().hex[:10]}"
    app = tmp_path / "app"
    app.mkdir()
    marker = tmp_path / "built"
    (app / "build.sh").write_text(f"#!/bin/sh\ntouch {marker}\necho hi > \"$BUILDDIR/hi\"\n")
    (app / "build.sh").chmod(0o755)
    (tmp_path / "launcher.py").write_text(textwrap.dedent(LAUNCHER.format(title=title)))
    staging = tmp_path / "staging"
    config = tmp_path / "lxm.toml"
    config.write_text(f'[[clusters]]\nname = "hpc"\nservr = "localhost"\n'
                      f'[clusters.storage]\nstaging = "{staging}"\n')
    proc = lxm3_cli("launch", "launcher.py", "--lxm_config", str(config), cwd=str(tmp_path),
                    env=tb.local_env())
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"lxm3: error: {config}: unknown key 'clusters[0].servr' "
                                  "(cluster 'hpc'); did you mean 'server'?"), proc.stderr
    assert "Traceback" not in proc.stderr and "packaging" not in proc.stderr, proc.stderr
    assert not marker.exists(), "the project was built"
    assert not staging.exists(), "files were deployed on this machine"
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j"], capture_output=True,
                            text=True, timeout=60, env=tb.local_env())
    assert queued.returncode == 0, queued.stderr
    assert not [name for name in queued.stdout.split() if title.replace("-", "_") in name]
