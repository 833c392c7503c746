"""Packaging on real filesystem layouts, and what is checked before packaging starts.

A laptop whose /tmp is a tmpfs, or a login node with an NFS home and a local
/tmp, has $TMPDIR and the cache ($XDG_CACHE_HOME/lxm3) on different
filesystems: nothing may be renamed from one to the other.
"""

import json
import os
import subprocess
import tempfile
import textwrap
import zipfile

import pytest

import lxm3
from lxm3 import xm

from conftest import lxm3_cli, write_files

LAUNCHER = """\
    import os
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment(experiment_title="fs") as experiment:
        executor = xm_cluster.{executor}()
        spec = xm_cluster.PythonPackage(path={project!r},
                                        entrypoint=xm_cluster.ModuleName("echoapp.main"))
        [exe] = experiment.package([xm.Packageable(
            spec, executor_spec=executor.Spec(), env_vars={{"ECHO_OUT": {out!r}}})])
        experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{{"seed": s}} for s in range(2)]))
"""


def run_launcher(tmp_path, project, out, env, executor="Local"):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER.format(
        executor=executor, project=project, out=str(out))))
    return lxm3_cli("launch", str(launcher), cwd=str(tmp_path), env=env, timeout=600)


def _required_or_skip(reason):
    if os.environ.get("LXM3_REQUIRE_TESTBED") == "1":
        pytest.fail(f"{reason} (LXM3_REQUIRE_TESTBED=1: this layout must be tested)")
    pytest.skip(reason)


@pytest.fixture
def other_filesystem(tmp_path):
    """A directory for $TMPDIR on another filesystem than tmp_path: /dev/shm (a
    tmpfs) when it is one, else a small tmpfs mounted for the test (root only)."""
    cache_dev = os.stat(str(tmp_path)).st_dev
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = tempfile.mkdtemp(prefix="lxm3-tmpdir-", dir="/dev/shm")
        if os.stat(path).st_dev != cache_dev:
            yield path
            subprocess.run(["rm", "-rf", "--", path])
            return
        os.rmdir(path)
    if os.geteuid() != 0:
        _required_or_skip("no writable filesystem other than the one of the test's tmp_path "
                          "(/dev/shm is missing or the same), and mounting a tmpfs needs root")
    path = tempfile.mkdtemp(prefix="lxm3-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", path],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(path)
        _required_or_skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", path])
    os.rmdir(path)


def test_a_launch_builds_and_caches_when_tmpdir_is_on_another_filesystem(
        echo_project, tmp_path, other_filesystem):
    cache = tmp_path / "cache"
    cache.mkdir()
    assert os.stat(other_filesystem).st_dev != os.stat(str(cache)).st_dev
    out = tmp_path / "out"
    out.mkdir()
    proc = run_launcher(tmp_path, echo_project, out,
                        {"TMPDIR": other_filesystem, "XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert "Invalid cross-device link" not in proc.stderr
    # Both tasks ran from the archive built through $TMPDIR and kept in the cache.
    reports = {name: json.loads((out / name).read_text()) for name in os.listdir(str(out))}
    assert sorted(r["argv"] for r in reports.values()) == [["--seed=0"], ["--seed=1"]]
    archives = cache / "lxm3" / "archives"
    [archive] = os.listdir(str(archives))  # the archive, and no temporary file beside it
    assert archive.startswith("echo_project-") and archive.endswith(".zip")
    with zipfile.ZipFile(str(archives / archive)) as zf:
        assert zf.testzip() is None
        assert "echoapp/main.py" in zf.namelist()
    # The build environment made for this fresh cache is there, under its final name only.
    envs = os.listdir(str(cache / "lxm3" / "build-env"))
    assert len(envs) == 1 and not envs[0].startswith("."), envs
    assert os.listdir(other_filesystem) == []  # the build directory is gone too

    # A second launch finds the archive in the cache.
    proc = run_launcher(tmp_path, echo_project, out,
                        {"TMPDIR": other_filesystem, "XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert "unchanged, using" in proc.stderr


def test_a_build_that_fails_while_zipping_leaves_no_archive(echo_project, tmp_path):
    """Never a half-written archive under a final name, nor a temporary one left over."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a")
    os.symlink(str(tmp_path / "gone"), str(data / "z-dangling.txt"))  # read after a.txt
    spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project,
                              resources=[lxm3.Fileset({str(data): "data"})])
    archives = os.path.join(lxm3.cache_dir(), "archives")
    before = set(os.listdir(archives)) if os.path.isdir(archives) else set()
    with pytest.raises(FileNotFoundError, match="z-dangling.txt"):
        lxm3.build_archive(spec, use_cache=False)
    assert set(os.listdir(archives)) == before


# -- A missing cluster config is reported before packaging ------------------

@pytest.mark.parametrize("executor", ["Slurm", "GridEngine"])
def test_no_config_is_reported_before_anything_is_built(echo_project, tmp_path, executor):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    proc = run_launcher(tmp_path, echo_project, out, {"XDG_CACHE_HOME": str(cache)},
                        executor=executor)
    assert proc.returncode == 1
    assert "lxm3: error: no [[clusters]] in the lxm3 config (no config file was found)" \
        in proc.stderr, proc.stderr
    assert "packaging" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(str(cache / "lxm3" / "archives"))


def test_a_config_without_clusters_is_named_before_anything_is_built(echo_project, tmp_path):
    config = tmp_path / "xdg_config_home" / "lxm3" / "config.toml"
    write_files(config.parent, {"config.toml": '[local.env]\nA = "1"\n'})
    cache = tmp_path / "cache"
    proc = run_launcher(tmp_path, echo_project, tmp_path / "out", {"XDG_CACHE_HOME": str(cache)},
                        executor="Slurm")
    assert proc.returncode == 1
    assert f"no [[clusters]] in the lxm3 config ({config})" in proc.stderr, proc.stderr
    assert "packaging" not in proc.stderr
    assert not os.path.exists(str(cache / "lxm3" / "archives"))


def test_package_checks_the_experiments_own_config(echo_project, capsys):
    spec = lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=echo_project)
    with pytest.raises(lxm3.ConfigError, match=r"no \[\[clusters\]\] in the lxm3 config"):
        with lxm3.create_experiment("no config", config=lxm3.Config()) as experiment:
            experiment.package([xm.Packageable(spec, executor_spec=lxm3.Slurm.Spec())])
    assert "packaging" not in capsys.readouterr().err
    # With a cluster in the experiment's config, packaging goes ahead.
    config = lxm3.Config(clusters=[lxm3.ClusterConfig(name="c")])
    with lxm3.create_experiment("with config", config=config) as experiment:
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=lxm3.GridEngine.Spec())])
    assert os.path.isfile(exe.archive.path)
