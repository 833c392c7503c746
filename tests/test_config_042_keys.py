"""Every config key lxm3 0.4.2 read is honoured, or refused with what to do instead;
never an "unknown key". 0.4.2 read (lxm3/xm_cluster/config.py): ``project``;
``[local]`` ``storage.staging``, ``env``, ``singularity.binds``/``env``; per
``[[clusters]]`` ``name``, ``server``, ``user``, ``ssh_private_key``,
``proxycommand``, ``password``, ``storage.staging``, ``env``,
``singularity.binds``/``env``. ``ssh_config`` (an ssh config file: ``ssh -F``)
is honoured too. ``proxycommand`` and ``ssh_config`` reach every ssh and
rsync lxm3 runs: the launch, and ``lxm3 status`` later."""

from __future__ import annotations

import os
import re
import textwrap

import pytest
from cluster_helpers import job_unit, toml_string

import lxm3

from conftest import lxm3_cli

# Each key of 0.4.2, in a config 0.4.2 read, and what lxm3 makes of it.
CONFIG_042 = """\
    project = "myproj"
    [local.storage]
    staging = "staging-here"
    [local.env]
    LOCAL_VAR = "l"
    [[local.singularity.binds]]
    src = "/data"
    dest = "/mnt/data"
    [[clusters]]
    name = "hpc"
    server = "login.hpc.example"
    user = "alice"
    ssh_private_key = "~/.ssh/id_hpc"
    proxycommand = "ssh -W %h:%p gateway.example"
    ssh_config = "ssh/hpc_config"
    [clusters.storage]
    staging = "/scratch/alice/lxm3"
    [clusters.env]
    WANDB_MODE = "offline"
    [[clusters.singularity.binds]]
    src = "/scratch"
    dest = "/scratch"
"""


def write_config(tmp_path, text):
    path = tmp_path / "conf" / "lxm.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_042_config_is_read_with_every_key_honoured(tmp_path):
    path = write_config(tmp_path, CONFIG_042)
    config = lxm3.Config.from_file(path)
    assert config.project == "myproj"
    assert config.local_staging == os.path.join(str(tmp_path), "staging-here")
    assert config.local_env == {"LOCAL_VAR": "l"}
    assert config.local_singularity_binds == [("/data", "/mnt/data")]
    [cluster] = config.clusters
    assert (cluster.name, cluster.server, cluster.user) == ("hpc", "login.hpc.example", "alice")
    assert cluster.ssh_private_key == "~/.ssh/id_hpc"
    assert cluster.proxycommand == "ssh -W %h:%p gateway.example"
    # A relative ssh_config is next to the config file, wherever lxm3 runs from.
    assert cluster.ssh_config == str(tmp_path / "conf" / "ssh" / "hpc_config")
    assert cluster.staging == "/scratch/alice/lxm3"
    assert cluster.env == {"WANDB_MODE": "offline"}
    assert cluster.singularity_binds == [("/scratch", "/scratch")]


def test_ssh_config_and_proxycommand_are_options_of_every_ssh(tmp_path):
    ssh_config = tmp_path / "conf" / "ssh" / "hpc_config"
    ssh_config.parent.mkdir(parents=True)
    ssh_config.write_text("Host login.hpc.example\n  Port 2222\n")
    [cluster] = lxm3.Config.from_file(write_config(tmp_path, CONFIG_042)).clusters
    options = lxm3.Connection(cluster)._ssh_options()
    assert options[options.index("-F") + 1] == str(ssh_config)
    assert options[options.index("ProxyCommand=ssh -W %h:%p gateway.example") - 1] == "-o"
    # and the record keeps them, for status, logs and cancel
    keys = ("server", "user", "port", "ssh_private_key", "ssh_config", "proxycommand")
    unit = lxm3.WorkUnitRecord.from_json({"id": 1, "state": "submitted", "cluster": "hpc",
                                          "connection": {k: getattr(cluster, k) for k in keys}})
    assert lxm3._unit_connection(unit)._ssh_options() == options


def test_home_relative_ssh_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_config(tmp_path, '[[clusters]]\nname = "c"\nserver = "s"\nssh_config = "~/my_ssh"\n')
    [cluster] = lxm3.Config.from_file(path).clusters
    assert cluster.ssh_config == str(tmp_path / "my_ssh")


def test_missing_ssh_config_file_is_a_clear_error(tmp_path):
    [cluster] = lxm3.Config.from_file(write_config(tmp_path, CONFIG_042)).clusters
    with pytest.raises(lxm3.ConfigError, match=(
            r"^the ssh_config of cluster 'hpc', \S+/conf/ssh/hpc_config, does not exist$")):
        lxm3.Connection(cluster)._ssh_options()


@pytest.mark.parametrize("key, value, advice", [
    ("password", '"hunter2"', r"lxm3 takes no passwords: it logs in with your ssh keys or ssh-agent"),
    ("singularity.env", '{ A = "1" }', r"lxm3 does not read singularity\.env"),
])
def test_042_keys_lxm3_does_not_take_are_refused_with_advice(tmp_path, key, value, advice):
    name, _, sub = key.partition(".")
    body = f"{name} = {value}\n" if not sub else f"[clusters.{name}]\n{sub} = {value}\n"
    path = write_config(tmp_path, f'[[clusters]]\nname = "hpc"\nserver = "s"\n{body}')
    with pytest.raises(lxm3.ConfigError, match=rf"'clusters\[0\]\.{re.escape(key)}' \(cluster 'hpc'\) "
                                               rf"is not supported: {advice}") as info:
        lxm3.Config.from_file(path)
    assert "unknown key" not in str(info.value) and "hunter2" not in str(info.value)


def test_a_misspelt_route_key_is_still_an_unknown_key(tmp_path):
    path = write_config(tmp_path, '[[clusters]]\nname = "hpc"\nproxy_command = "x"\n')
    with pytest.raises(lxm3.ConfigError, match=r"unknown key 'clusters\[0\]\.proxy_command' "
                                               r"\(cluster 'hpc'\); did you mean 'proxycommand'\?"):
        lxm3.Config.from_file(path)


# -- through the test bed's ssh -----------------------------------------------------


def cluster_config(ws, **keys):
    lines = ["[[clusters]]", f'name = "{ws.cluster_name}"']
    lines += [f"{key} = {value if isinstance(value, int) else toml_string(value)}"
              for key, value in keys.items()]
    lines += ["[clusters.storage]", f"staging = {toml_string(ws.staging)}"]
    path = os.path.join(ws.root, "lxm.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def own_connections(monkeypatch):
    """Each lxm3 command with its own ssh connection, so each reads the route anew."""
    monkeypatch.setenv("LXM3_SSH_KEEP", "0")


def launch_and_wait(ws, config):
    out = ws.out_dir()
    launch = ws.launch([job_unit(ws.executor(), args=["routed"], env_vars={"ECHO_OUT": out})],
                       config=config).check()
    [report] = ws.wait_for_reports(out, 1, launch).values()
    assert report["argv"] == ["routed"]
    return launch


def status(launch):
    proc = lxm3_cli("status", str(launch.experiment_id), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "work unit 1 on testbed-ssh (Slurm)" in proc.stdout
    assert "1 task(s): 1 completed" in proc.stdout, proc.stdout  # read over ssh
    return proc


@pytest.mark.testbed
def test_proxycommand_through_a_real_ssh_hop_reaches_the_cluster(cluster_workspaces, own_connections):
    from testbed_env import require_testbed

    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    log = os.path.join(ws.root, "proxy.log")
    proxy = os.path.join(ws.root, "proxy.sh")
    with open(proxy, "w") as f:
        f.write(textwrap.dedent(f"""\
            #!/bin/sh
            # A jump host: log the hop, then relay to %h:%p through ssh to the test bed.
            echo "hop to $1:$2" >> {log}
            exec ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -p {tb.ssh_port} \\
                -i {tb.ssh_key} -W "$1:$2" {tb.destination}
        """))
    os.chmod(proxy, 0o755)
    config = cluster_config(ws, server=tb.ssh_host, user=tb.ssh_user, port=tb.ssh_port,
                            proxycommand=f"{proxy} %h %p")
    launch = launch_and_wait(ws, config)
    with open(log) as f:
        hops = f.read().splitlines()
    assert hops and set(hops) == {f"hop to {tb.ssh_host}:{tb.ssh_port}"}, hops
    status(launch)  # from the record: through the hop again
    with open(log) as f:
        assert len(f.read().splitlines()) > len(hops)


@pytest.mark.testbed
def test_ssh_config_file_gives_host_port_and_user(cluster_workspaces, own_connections):
    from testbed_env import require_testbed

    tb = require_testbed("slurm")
    ws = cluster_workspaces(tb, "slurm", "ssh")
    alias = "lxm3-testbed-alias"  # resolves nowhere: only the Host entry makes it reachable
    # The name its host key is recorded under in known_hosts: "[host]:port" off port 22.
    key_alias = tb.ssh_host if tb.ssh_port == 22 else f"[{tb.ssh_host}]:{tb.ssh_port}"
    with open(os.path.join(ws.root, "ssh_config"), "w") as f:
        f.write(textwrap.dedent(f"""\
            Host {alias}
                HostName {tb.ssh_host}
                Port {tb.ssh_port}
                User {tb.ssh_user}
                IdentityFile {tb.ssh_key}
                HostKeyAlias {key_alias}
                StrictHostKeyChecking yes
        """))
    config = cluster_config(ws, server=alias, ssh_config="ssh_config")  # next to lxm.toml
    launch = launch_and_wait(ws, config)
    assert f"submitted to {ws.cluster_name}" in launch.stderr
    status(launch)  # from the record: the same ssh_config
