"""Managed environments on this machine: what a project declares, how the
cluster's Python becomes pip's target, the resolution with the real pip (wheels
from a local directory, so that the tests need no network), the cache that
spares a warm launch any resolution, the packed archive, and the lines of the
job script that put an environment on PYTHONPATH and check its Python.

The cluster's side (the probe, the unpacking, the tasks) is tested on the test
bed in test_cluster_python.py. Here the cluster's Python is described by the
dictionary its probe would print (``cluster_python``): a stand-in, because no
cluster is contacted.
"""

import base64
import hashlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tarfile
import zipfile

import pytest

import lxm3
from lxm3 import xm, xm_cluster

from conftest import PYPROJECT, ROOT, write_files


def cluster_python(version="3.11.2", libc="glibc 2.36", machine="x86_64", implementation="cpython"):
    """What the probe of a cluster whose python3 is ``version`` prints (PYTHON_INFO_CODE)."""
    major, minor = version.split(".")[:2]
    return {
        "executable": "/usr/bin/python3", "version": version, "implementation": implementation,
        "cache_tag": f"{implementation}-{major}{minor}", "abiflags": "", "machine": machine, "libc": libc,
        "markers": {
            "implementation_name": implementation, "implementation_version": version, "os_name": "posix",
            "platform_machine": machine, "platform_release": "6.1.0", "platform_system": "Linux",
            "platform_version": "#1 SMP", "python_full_version": version,
            "platform_python_implementation": "CPython", "python_version": f"{major}.{minor}",
            "sys_platform": "linux"},
    }


def make_wheel(directory, name, version, requires=(), tag="py3-none-any", files=None, entry_points=None):
    """Write a real wheel (a zip with its dist-info), as a build backend would."""
    dist = name.replace("-", "_")
    files = dict(files or {f"{dist}/__init__.py": f"VERSION = {version!r}\n"})
    info = f"{dist}-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    files[f"{info}/METADATA"] = "\n".join(metadata) + "\n"
    files[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: lxm3-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    if entry_points:
        files[f"{info}/entry_points.txt"] = entry_points
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = os.path.join(str(directory), f"{dist}-{version}-{tag}.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name_in_zip, text in files.items():
            zf.writestr(name_in_zip, text)
    return path


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch):
    """A directory of wheels as pip's only source: no index, no network."""
    path = tmp_path / "wheelhouse"
    path.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip.conf names other indexes
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    return path


def requirements_of(project, lines, source="pyproject.toml"):
    names = lxm3._requirement_names(lines)
    return lxm3.Requirements(list(lines), os.path.join(str(project), source), str(project), names, {})


def project(tmp_path, name="depapp", dependencies=None, extra=None, dynamic=False):
    text = PYPROJECT.format(name=name)
    if dependencies is not None or dynamic:
        deps = 'dynamic = ["dependencies"]' if dynamic else f"dependencies = {json.dumps(dependencies)}"
        text = text.replace('version = "0.1.0"\n', f'version = "0.1.0"\n    {deps}\n')
    return write_files(tmp_path / name, {"pyproject.toml": text, f"{name}/__init__.py": "",
                                         f"{name}/main.py": "print('hi')\n", **(extra or {})})


def package(path, **kwargs):
    return xm_cluster.PythonPackage(xm_cluster.ModuleName("depapp.main"), path=path, **kwargs)


# -- configuration -------------------------------------------------------------


def test_the_cluster_keys_are_read_and_checked(tmp_path):
    config = tmp_path / "lxm.toml"
    config.write_text('[[clusters]]\nname = "hpc"\nserver = "login"\npython = "/opt/py/bin/python3.11"\n'
                      'environment = "managed"\nenvironments = "/scratch/me/envs"\n')
    cluster = lxm3.Config.from_file(str(config)).cluster()
    assert (cluster.python, cluster.python_command, cluster.environment, cluster.environments) == (
        "/opt/py/bin/python3.11", "/opt/py/bin/python3.11", "managed", "/scratch/me/envs")
    assert lxm3.ClusterConfig("plain").python_command == "python3"
    for line, needle in (('python = "bin/python3"', "'clusters[0].python' (cluster 'hpc') must be a command name"),
                         ('python = "python3 -X dev"', "one word"),
                         ('environment = "conda"', "'clusters[0].environment' (cluster 'hpc') must be one of "
                                                   "'managed', 'none'"),
                         ("environments = 3", "'clusters[0].environments' (cluster 'hpc') must be a string")):
        config.write_text(f'[[clusters]]\nname = "hpc"\n{line}\n')
        with pytest.raises(lxm3.ConfigError, match=r"lxm\.toml: ") as raised:
            lxm3.Config.from_file(str(config))
        assert needle in str(raised.value)


def test_python_package_environment_is_checked_at_once(tmp_path):
    path = project(tmp_path)
    assert package(path, environment="managed").environment == "managed"
    assert package(path).environment is None
    with pytest.raises(ValueError, match=r"environment='conda'\) must be one of 'managed', 'none'"):
        package(path, environment="conda")


# -- what a project declares ---------------------------------------------------


def test_pyproject_dependencies_and_those_of_extra_package_paths(tmp_path):
    path = project(tmp_path, dependencies=["absl-py>=1", "numpy; python_version >= '3.9'"])
    other = project(tmp_path, name="other", dependencies=["einops==0.8.0"])
    requirements = lxm3.declared_requirements(package(path, extra_packages=[other, "rich==13.0"]))
    assert requirements.lines == ["absl-py>=1", "numpy; python_version >= '3.9'", "einops==0.8.0"]
    assert requirements.names == ["absl-py", "numpy", "einops"]
    assert requirements.source == os.path.join(path, "pyproject.toml")
    assert not requirements.bundled and requirements.note is None
    assert lxm3.declared_requirements(package(path, pip_args=["--no-compile"])).bundled


def test_pins_beside_the_project_are_honoured_first(tmp_path):
    path = project(tmp_path, dependencies=["numpy"], extra={
        "requirements.txt": "-r base.txt\nnumpy==1.26.4  # pinned\n",
        "base.txt": "absl-py==2.1.0\n"})
    requirements = lxm3.declared_requirements(package(path))
    assert requirements.lines == [f"-r {shlex.quote(os.path.join(path, 'requirements.txt'))}"]
    assert requirements.names == ["numpy"]
    # The included file is part of what decides the environment (the cache's inputs).
    assert set(requirements.inputs) == {os.path.join(path, "requirements.txt"), os.path.join(path, "base.txt")}
    write_files(path, {"pylock.toml": """\
        lock-version = "1.0"
        created-by = "test"
        [[packages]]
        name = "numpy"
        version = "1.26.4"
        [[packages]]
        name = "tomli"
        version = "2.0.1"
        marker = "python_version < '3.11'"
        [[packages]]
        name = "depapp"
        directory = { path = "." }
        """})
    locked = lxm3.declared_requirements(package(path))
    assert locked.lines == ["numpy==1.26.4", "tomli==2.0.1 ; python_version < '3.11'"]
    assert locked.source == os.path.join(path, "pylock.toml")


def test_what_cannot_be_read_is_said(tmp_path):
    dynamic = lxm3.declared_requirements(package(project(tmp_path, dynamic=True)))
    assert dynamic.lines == [] and "dynamic" in dynamic.note and "requirements.txt" in dynamic.note
    locked = project(tmp_path, name="withuv", dependencies=["numpy"], extra={"uv.lock": "version = 1\n"})
    note = lxm3.declared_requirements(package(locked)).note
    assert "uv.lock is not read" in note and "uv export --format requirements-txt" in note
    bare = write_files(tmp_path / "setup_only", {"setup.py": "from setuptools import setup\nsetup()\n"})
    setup_only = lxm3.declared_requirements(package(bare))
    assert setup_only.lines == [] and "has no pyproject.toml" in setup_only.note


# -- the cluster's Python as pip's target ---------------------------------------


def test_manylinux_platforms_go_down_to_what_pip_would_accept_on_that_glibc():
    tags = lxm3.manylinux_platforms("x86_64", (2, 36))
    assert tags[0] == "manylinux_2_36_x86_64" and tags[-1] == "manylinux1_x86_64"
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux2010_x86_64", "manylinux_2_5_x86_64"):
        assert tag in tags
    assert "manylinux_2_37_x86_64" not in tags
    arm = lxm3.manylinux_platforms("aarch64", (2, 28))
    assert arm[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert not any("manylinux1" in t or "2010" in t for t in arm)


def test_target_refuses_what_wheels_cannot_serve():
    target = lxm3.PythonTarget(cluster_python("3.11.2"), "hpc")
    assert (target.version, target.abi, target.tag) == ("3.11", "cp311", "cpython-311")
    assert target.describe() == "CPython 3.11 (cp311) on manylinux_2_36_x86_64"
    with pytest.raises(lxm3.ClusterError, match="needs CPython 3, but the Python of hpc is PyPy"):
        lxm3.PythonTarget(cluster_python(implementation="pypy"), "hpc")
    with pytest.raises(lxm3.ClusterError, match=r"needs a Linux with glibc .* reports libc ''"):
        lxm3.PythonTarget(cluster_python(libc=""), "hpc")


# -- resolving with the real pip ------------------------------------------------


def test_resolves_for_the_clusters_python_not_this_one(tmp_path, wheelhouse):
    """pip evaluates markers for the Python it runs on; lxm3 makes it use the cluster's.
    The same requirements resolved for 3.11 and for 3.12 differ by the marker."""
    make_wheel(wheelhouse, "lxm3-pure", "1.0", requires=["lxm3-backport; python_version < '3.12'"])
    make_wheel(wheelhouse, "lxm3-backport", "2.0")
    make_wheel(wheelhouse, "lxm3-native", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64",
               files={"lxm3_native/__init__.py": "", "lxm3_native/_speed.cpython-311-x86_64-linux-gnu.so": "elf"})
    path = project(tmp_path)
    requirements = requirements_of(path, ["lxm3-pure", "lxm3-native"])
    env = lxm3.resolve_environment(requirements, lxm3.PythonTarget(cluster_python("3.11.2"), "hpc"), "t")
    assert env.pins == [["lxm3-backport", "2.0"], ["lxm3-native", "1.0"], ["lxm3-pure", "1.0"]]
    assert env.tag == "cpython-311" and env._resolved_now
    with tarfile.open(env.archive) as tar:
        names = tar.getnames()
    assert "lxm3_native/_speed.cpython-311-x86_64-linux-gnu.so" in names and "lxm3_backport/__init__.py" in names
    assert env.digest == hashlib.sha256(open(env.archive, "rb").read()).hexdigest()
    # For 3.12 the backport's marker is false, and the cp311 wheel does not fit.
    newer = lxm3.resolve_environment(requirements_of(path, ["lxm3-pure"]),
                                     lxm3.PythonTarget(cluster_python("3.12.3"), "hpc"), "t")
    assert newer.pins == [["lxm3-pure", "1.0"]] and newer.key != env.key


def test_a_warm_resolution_runs_no_pip(tmp_path, wheelhouse, capsys):
    make_wheel(wheelhouse, "lxm3-pure", "1.0")
    requirements = requirements_of(project(tmp_path), ["lxm3-pure"])
    target = lxm3.PythonTarget(cluster_python(), "hpc")
    first = lxm3.resolve_environment(requirements, target, "t")
    assert "resolving its environment" in capsys.readouterr().err
    for name in os.listdir(wheelhouse):  # pip would now find nothing
        os.unlink(os.path.join(wheelhouse, name))
    again = lxm3.resolve_environment(requirements, target, "t")
    assert again == first and not again._resolved_now
    assert capsys.readouterr().err == ""
    # New inputs are resolved: here, and so they fail without the wheel.
    with pytest.raises(lxm3.BuildError, match="no wheel of lxm3-pure"):
        lxm3.resolve_environment(requirements_of(project(tmp_path, name="other"), ["lxm3-pure>=1"]),
                                 target, "t")


def test_the_key_is_what_the_environment_holds(tmp_path, wheelhouse):
    """Other requirement texts that resolve to the same pins share one key (and
    archive bytes); another platform does not."""
    make_wheel(wheelhouse, "lxm3-pure", "1.0")
    path = project(tmp_path)
    target = lxm3.PythonTarget(cluster_python(), "hpc")
    one = lxm3.resolve_environment(requirements_of(path, ["lxm3-pure"]), target, "t")
    two = lxm3.resolve_environment(requirements_of(path, ["lxm3-pure==1.0"]), target, "t")
    assert (one.key, one.digest) == (two.key, two.digest)
    older = lxm3.resolve_environment(requirements_of(path, ["lxm3-pure"]),
                                     lxm3.PythonTarget(cluster_python(libc="glibc 2.28"), "hpc"), "t")
    assert older.key != one.key


def test_no_wheel_for_the_cluster_names_the_package_tag_and_options(tmp_path, wheelhouse):
    """A package with only a source distribution (as many are) has no wheel to send."""
    sdist = tmp_path / "lxm3_sdist_only-1.0"
    write_files(sdist, {"setup.py": "from setuptools import setup\nsetup(name='lxm3-sdist-only', version='1.0')\n"})
    with tarfile.open(os.path.join(wheelhouse, "lxm3_sdist_only-1.0.tar.gz"), "w:gz") as tar:
        tar.add(str(sdist), arcname="lxm3_sdist_only-1.0")
    target = lxm3.PythonTarget(cluster_python(), "hpc")
    with pytest.raises(lxm3.BuildError, match="no wheel of lxm3-sdist-only") as raised:
        lxm3.resolve_environment(requirements_of(project(tmp_path), ["lxm3-sdist-only"]), target, "hpc: depapp")
    message = str(raised.value)
    for needle in ("hpc: depapp: no wheel of lxm3-sdist-only for the cluster's CPython 3.11 (cp311)",
                   "cp311-cp311-manylinux_2_36_x86_64", "pin a version of lxm3-sdist-only",
                   "pure-Python alternative", "container (SingularityContainer)",
                   "--python-version 3.11 --platform manylinux_2_36_x86_64"):
        assert needle in message


def test_an_unreachable_index_is_named(tmp_path, monkeypatch):
    """An index that refuses connections (a closed port on 127.0.0.1): pip's
    connection errors become "cannot reach the package index"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip names the connection error only when it retries
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    target = lxm3.PythonTarget(cluster_python(), "hpc")
    with pytest.raises(lxm3.BuildError, match=r"this machine cannot reach the package index \(pip looked "
                                              rf"in http://127\.0\.0\.1:{port}/simple\)"):
        lxm3.resolve_environment(requirements_of(project(tmp_path), ["absl-py"]), target, "t")


def test_pth_files_and_console_scripts_work_from_pythonpath(tmp_path, wheelhouse):
    """A .pth file is read (lxm3's sitecustomize), and a console script runs the
    task's Python, here this one: the environment unpacked as the cluster would."""
    this = cluster_python(platform.python_version())
    this["markers"].update(python_full_version=platform.python_version())
    make_wheel(wheelhouse, "lxm3-pth", "1.0", files={
        "lxm3_pth.pth": "import os; os.environ['LXM3_PTH_RAN'] = '1'\nlxm3_pth_extra\n",
        "lxm3_pth_extra/lxm3_hidden.py": "WHERE = 'found through the .pth file'\n",
        "lxm3_pth/__init__.py": "def main():\n    print('script ran')\n"},
        entry_points="[console_scripts]\nlxm3-pth-tool = lxm3_pth:main\n")
    env = lxm3.resolve_environment(requirements_of(project(tmp_path), ["lxm3-pth"]),
                                   lxm3.PythonTarget(this, "here"), "t")
    unpacked = tmp_path / "env"
    with tarfile.open(env.archive) as tar:  # as the cluster unpacks it (with the "data" filter where there is one)
        tar.extractall(str(unpacked), **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    assert (unpacked / "sitecustomize.py").exists()
    # The interpreter's own sitecustomize (if any) still runs: it is chained.
    chained = write_files(tmp_path / "later", {"sitecustomize.py": "import os\nos.environ['LATER_RAN'] = '1'\n"})
    env_vars = {**os.environ, "PYTHONPATH": f"{tmp_path / 'code'}:{unpacked}:{chained}", "LXM_PYTHON": sys.executable}
    out = subprocess.run([sys.executable, "-c", "import os, lxm3_hidden; print(lxm3_hidden.WHERE, "
                          "os.environ.get('LXM3_PTH_RAN'), os.environ.get('LATER_RAN'))"],
                         env=env_vars, capture_output=True, text=True)
    assert out.stdout.strip() == "found through the .pth file 1 1", out.stderr
    script = unpacked / "bin" / "lxm3-pth-tool"
    assert sys.executable.encode() not in script.read_bytes()  # no path of this machine's Python
    ran = subprocess.run([str(script)], env=env_vars, capture_output=True, text=True)
    assert ran.stdout.strip() == "script ran", ran.stderr


def test_the_archive_is_reproducible(tmp_path):
    site = write_files(tmp_path / "site", {"a/__init__.py": "x = 1\n", "a/b/data.txt": "data\n", "bin/tool": "#!/bin/sh\n"})
    os.chmod(os.path.join(site, "bin", "tool"), 0o755)
    first = lxm3.pack_environment(site, str(tmp_path / "one.tar.gz"))
    os.utime(os.path.join(site, "a", "__init__.py"), (1, 1))  # times are not kept
    second = lxm3.pack_environment(site, str(tmp_path / "two.tar.gz"))
    assert first == second and first[1:] == (3, 21)
    with tarfile.open(str(tmp_path / "one.tar.gz")) as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert modes["bin/tool"] == 0o755 and modes["a/__init__.py"] == 0o644


# -- the job script ---------------------------------------------------------------


def run_env_lines(tmp_path, env_dir, tag, extra_env=None):
    """Run the job script's environment lines in bash, as a task would after its
    archive is unpacked; prints LXM_PYTHON and PYTHONPATH, or fails as the task would."""
    plan = lxm3.EnvironmentPlan(lxm3.Environment("k" * 64, "", "", 0, 0, [], tag), str(env_dir), [])
    script = "\n".join([
        "lxm_fail() { printf 'lxm3: %s\\n' \"$*\" >&2; exit 125; }",
        f"lxm_workdir={tmp_path}/work",
        'export PYTHONPATH="$lxm_workdir${PYTHONPATH:+:$PYTHONPATH}"',
        lxm3.environment_lines("python3", plan),
        'echo "LXM_PYTHON=$LXM_PYTHON"',
        'echo "PYTHONPATH=$PYTHONPATH"'])
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **(extra_env or {})}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)


def test_job_script_puts_the_environment_after_the_code(tmp_path):
    env_dir = tmp_path / "envs" / ("k" * 64)
    env_dir.mkdir(parents=True)
    (env_dir / lxm3.ENVIRONMENT_MARKER).write_text("key x\n")
    this = sys.implementation.cache_tag + getattr(sys, "abiflags", "")
    result = run_env_lines(tmp_path, env_dir, this, {"LXM_PYTHON": sys.executable, "PYTHONPATH": "/theirs"})
    assert result.returncode == 0, result.stderr
    assert f"LXM_PYTHON={sys.executable}" in result.stdout  # the task's own wins
    assert f"PYTHONPATH={tmp_path}/work:{env_dir}:/theirs" in result.stdout
    assert "LXM_PYTHON=python3\n" in run_env_lines(tmp_path, env_dir, lxm3.python_tag(
        {"cache_tag": subprocess.run(["python3", "-c", "import sys; print(sys.implementation.cache_tag)"],
                                     capture_output=True, text=True).stdout.strip()})).stdout


def test_job_script_refuses_another_python_or_a_missing_environment(tmp_path):
    env_dir = tmp_path / "envs" / ("k" * 64)
    env_dir.mkdir(parents=True)
    result = run_env_lines(tmp_path, env_dir, "cpython-311", {"LXM_PYTHON": sys.executable})
    assert result.returncode == 125
    assert "missing or incomplete" in result.stderr and str(env_dir) in result.stderr
    (env_dir / lxm3.ENVIRONMENT_MARKER).write_text("key x\n")
    result = run_env_lines(tmp_path, env_dir, "cpython-20", {"LXM_PYTHON": sys.executable})
    this = sys.implementation.cache_tag
    assert result.returncode == 125
    assert f"is {this}, but the managed environment {env_dir} was made for cpython-20" in result.stderr
    assert "set python in the cluster's config" in result.stderr


# -- the warning at packaging ------------------------------------------------------

LAUNCHER = """\
    import os
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment("deps") as experiment:
        spec = xm_cluster.PythonPackage(xm_cluster.ModuleName("depapp.main"), path=os.environ["PROJECT"],
                                        environment=os.environ.get("ENVIRONMENT") or None)
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=xm_cluster.Slurm.Spec())])
        experiment.add(xm_cluster.ArrayJob(exe, xm_cluster.Slurm(), args=[{"i": 1}, {"i": 2}]))
        experiment.add(xm_cluster.ArrayJob(exe, xm_cluster.Slurm(), args=[{"i": 3}]))
"""


def dry_run(tmp_path, project_path, environment="", config=""):
    write_files(tmp_path, {"launcher.py": LAUNCHER, "lxm.toml": '[[clusters]]\nname = "hpc"\n' + config})
    env = {**os.environ, "PYTHONPATH": ROOT, "PROJECT": project_path, "ENVIRONMENT": environment}
    return subprocess.run([sys.executable, "-m", "lxm3", "launch", "--dry-run", "launcher.py"], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)


def test_declared_dependencies_tasks_will_not_have_are_named(tmp_path):
    path = project(tmp_path, dependencies=["absl-py", "numpy>=1.26"])
    result = dry_run(tmp_path, path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1, result.stderr  # once, though two work units use it
    for needle in ("declares dependencies (absl-py, numpy) that tasks on hpc will not get", "--no-deps",
                   'PythonPackage(environment="managed")', "environment = \"managed\" in the config of "
                   "cluster 'hpc'", "SingularityContainer"):
        assert needle in warnings[0]
    managed = dry_run(tmp_path, path, environment="managed")
    assert "warning:" not in managed.stderr
    assert "managed environments are resolved at launch" in managed.stdout  # the cluster was never asked
    assert "warning:" not in dry_run(tmp_path, path, config='environment = "managed"\n').stderr
    nodeps = write_files(tmp_path / "nodeps", {"pyproject.toml": PYPROJECT.format(name="depapp"),
                                               "depapp/__init__.py": "", "depapp/main.py": ""})
    assert "warning:" not in dry_run(tmp_path, nodeps).stderr


def test_a_managed_environment_in_a_container_is_refused(tmp_path):
    spec = xm_cluster.SingularityContainer(package(project(tmp_path), environment="managed"), "docker://python:3.11")
    with pytest.raises(lxm3.BuildError, match=r"runs in a container \(docker://python:3\.11\), whose Python "
                                              r"brings its own packages"):
        lxm3.package(xm.Packageable(spec, executor_spec=xm_cluster.Slurm.Spec()))


def test_records_of_earlier_lxm3_load_without_the_new_fields():
    unit = lxm3.WorkUnitRecord.from_json({"id": 1, "state": "submitted", "scheduler": "slurm"})
    assert (unit.python, unit.environment) == (None, None)
    data = lxm3.WorkUnitRecord(1, "submitted", python={"version": "3.11.2"}, environment="/e/k").to_json()
    again = lxm3.WorkUnitRecord.from_json(json.loads(json.dumps(data)))
    assert (again.python, again.environment) == ({"version": "3.11.2"}, "/e/k")


def test_clean_refuses_types_it_does_not_have(tmp_path):
    config = lxm3.Config(clusters=[lxm3.ClusterConfig("hpc")])
    with pytest.raises(lxm3.LaunchError, match=r"--type jobs: the types are job, archive, container, env"):
        lxm3.clean(config, ["jobs"], 30, True, lambda items: False)
    result = subprocess.run([sys.executable, "-m", "lxm3", "clean", "--days", "1"], cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": ROOT}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "only with --force (stdin is not a terminal)" in result.stderr


def test_import_stays_light():
    """The new section imports nothing at module level (json, subprocess, tarfile...)."""
    code = "import sys, lxm3; print(sorted(m for m in ('json', 'subprocess', 'tarfile', 'gzip', 'hashlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
