"""The config file: lxm3 0.4.2's format, found where users put it."""

import os
import re
import textwrap

import pytest

import lxm3

CONFIG = textwrap.dedent("""\
    project = "myproj"
    [local]
    [local.storage]
    staging = "lxm-staging"
    [local.env]
    FOO = "bar"
    [[clusters]]
    name = "first"
    server = "login.example"
    user = "alice"
    [clusters.storage]
    staging = "/home/alice/lxm3-staging"
    [clusters.env]
    WANDB_MODE = "offline"
    [[clusters.singularity.binds]]
    src = "/scratch"
    dest = "/data"
    [[clusters]]
    name = "second"
    [clusters.storage]
    staging = "/tmp/second"
""")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "lxm.toml"
    path.write_text(CONFIG)
    return str(path)


def test_reads_the_042_format(config_file):
    config = lxm3.Config.from_file(config_file)
    assert config.project == "myproj"
    assert config.local_staging == os.path.abspath("lxm-staging")
    assert config.local_env == {"FOO": "bar"}
    first, second = config.clusters
    assert (first.name, first.server, first.user) == ("first", "login.example", "alice")
    assert first.staging == "/home/alice/lxm3-staging"
    assert first.env == {"WANDB_MODE": "offline"}
    assert first.singularity_binds == [("/scratch", "/data")]
    assert second.server is None  # no server: the login node itself


def test_cluster_choice_by_name_environment_then_first(config_file, monkeypatch):
    config = lxm3.Config.from_file(config_file)
    assert config.cluster().name == "first"
    assert config.cluster("second").name == "second"
    monkeypatch.setenv("LXM_CLUSTER", "second")
    assert config.cluster().name == "second"
    with pytest.raises(lxm3.ConfigError, match="no cluster named 'third'.*known: 'first', 'second'"):
        config.cluster("third")
    with pytest.raises(lxm3.ConfigError, match=r"no \[\[clusters\]\]"):
        lxm3.Config().cluster()


def test_project_from_environment_wins(config_file, monkeypatch):
    monkeypatch.setenv("LXM_PROJECT", "other")
    assert lxm3.Config.from_file(config_file).project == "other"


def test_search_order(tmp_path, monkeypatch, xdg_dirs):
    user = os.path.join(os.environ["XDG_CONFIG_HOME"], "lxm3", "config.toml")
    assert lxm3.find_config_file() is None
    assert lxm3.load_config() == lxm3.Config()
    os.makedirs(os.path.dirname(user))
    open(user, "w").write('project = "user"\n')
    assert lxm3.find_config_file() == user
    (tmp_path / "lxm.toml").write_text('project = "cwd"\n')
    assert lxm3.load_config().project == "cwd"
    env_config = tmp_path / "env.toml"
    env_config.write_text('project = "env"\n')
    monkeypatch.setenv("LXM_CONFIG", str(env_config))
    assert lxm3.load_config().project == "env"
    flag_config = tmp_path / "flag.toml"
    flag_config.write_text('project = "flag"\n')
    with lxm3.LaunchOptions(config_path=str(flag_config)).applied():
        assert lxm3.load_config().project == "flag"
    assert lxm3.load_config().project == "env"  # the launch's option ends with it
    assert lxm3.load_config(str(flag_config)).project == "flag"


def test_missing_explicit_config_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LXM_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(lxm3.ConfigError, match="nope.toml does not exist"):
        lxm3.load_config()


def test_malformed_config_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('project = "ok"\n[local]\nstaging = \n')
    with pytest.raises(lxm3.ConfigError, match=re.escape(f"{path}: Invalid value (at line 3, column 11)")):
        lxm3.Config.from_file(str(path))


def test_wrong_shapes_are_explained(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[clusters]\nname = "x"\n')
    with pytest.raises(lxm3.ConfigError, match=r"'clusters' must be an array of tables: write \[\[clusters\]\]"):
        lxm3.Config.from_file(str(path))
    path.write_text('[[clusters]]\nserver = "x"\n')
    with pytest.raises(lxm3.ConfigError, match=r"clusters\[0\] has no 'name'"):
        lxm3.Config.from_file(str(path))
