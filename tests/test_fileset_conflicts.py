"""A Fileset destination that is already a file of the archive: the same content is
one entry; different content is a BuildError at packaging that names both
sources (not a zip with two entries of one name, which every task fails to
unpack). Real pip builds, real zips, a real Local launch."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile

import pytest

import lxm3
from lxm3 import xm

from conftest import ECHO_MAIN, write_files

CONFIG = "learning_rate: 0.1\n"

PYPROJECT_WITH_DATA = """\
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "echoapp"
    version = "0.1.0"

    [tool.setuptools]
    packages = ["echoapp"]

    [tool.setuptools.package-data]
    echoapp = ["*.yaml"]
"""


@pytest.fixture
def project(tmp_path):
    """echoapp, whose package data echoapp/config.yaml pip installs into the archive."""
    return write_files(tmp_path / "proj", {
        "pyproject.toml": PYPROJECT_WITH_DATA,
        "echoapp/__init__.py": "",
        "echoapp/main.py": ECHO_MAIN,
        "echoapp/config.yaml": CONFIG,
    })  # fmt: skip


def local_file(tmp_path, name, text):
    path = tmp_path / "resources" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def spec_with(project, *filesets):
    return lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=project,
                              resources=list(filesets))


def test_fileset_file_equal_to_the_installed_one_is_one_entry_and_tasks_run(tmp_path, project):
    same = local_file(tmp_path, "config.yaml", CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    with lxm3.create_experiment("same", config=lxm3.Config()) as experiment:
        executor = lxm3.Local()
        spec = spec_with(project, lxm3.Fileset({same: "echoapp/config.yaml"}))
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(),
                                                   env_vars={"ECHO_OUT": str(out)})])
        experiment.add(xm.Job(exe, executor, args=["ran"]))
    with zipfile.ZipFile(exe.archive.path) as zf:
        names = zf.namelist()
        assert names.count("echoapp/config.yaml") == 1
        assert zf.read("echoapp/config.yaml").decode() == CONFIG
    assert len(names) == len(set(names))
    assert subprocess.run(["unzip", "-tq", exe.archive.path], capture_output=True).returncode == 0
    with open(out / "task-0.json") as f:
        assert json.load(f)["argv"] == ["ran"]


def test_fileset_file_over_a_different_installed_file_fails_packaging_naming_both(tmp_path, project):
    other = local_file(tmp_path, "config.yaml", "learning_rate: 0.5\n")
    spec = spec_with(project, lxm3.Fileset({other: "echoapp/config.yaml"}))
    with pytest.raises(lxm3.BuildError, match=(
            rf"^two different files would be echoapp/config\.yaml in the archive: the file pip "
            rf"installed from {project}, and the Fileset file {other}; give the Fileset file "
            r"another destination")):
        lxm3.build_archive(spec, use_cache=False)


def test_two_fileset_files_for_one_destination(tmp_path, project):
    first = local_file(tmp_path, "a.yaml", "a: 1\n")
    second = local_file(tmp_path, "b.yaml", "b: 2\n")
    twin = local_file(tmp_path, "a-again.yaml", "a: 1\n")
    fine = spec_with(project, lxm3.Fileset({first: "conf/run.yaml", twin: "conf/run.yaml"}))
    with zipfile.ZipFile(lxm3.build_archive(fine, use_cache=False).path) as zf:
        assert zf.namelist().count("conf/run.yaml") == 1
    clash = spec_with(project, lxm3.Fileset({first: "conf/run.yaml"}),
                      lxm3.Fileset({second: "conf/run.yaml"}))
    with pytest.raises(lxm3.BuildError, match=(
            rf"^two different files would be conf/run\.yaml in the archive: the Fileset file "
            rf"{first}, and the Fileset file {second};")):
        lxm3.build_archive(clash, use_cache=False)


def test_fileset_directory_with_one_differing_file_names_that_file(tmp_path, project):
    directory = tmp_path / "overlay"
    write_files(directory, {"config.yaml": "learning_rate: 9\n", "extra.txt": "x"})
    spec = spec_with(project, lxm3.Fileset({str(directory): "echoapp"}))
    with pytest.raises(lxm3.BuildError, match=(
            rf"^two different files would be echoapp/config\.yaml in the archive: the file pip "
            rf"installed from {project}, and {directory}/config\.yaml of the Fileset directory "
            rf"{directory};")):
        lxm3.build_archive(spec, use_cache=False)


def test_a_file_where_the_archive_has_a_directory_is_refused(tmp_path, project):
    file = local_file(tmp_path, "echoapp", "not a package\n")
    spec = spec_with(project, lxm3.Fileset({file: "echoapp"}))
    with pytest.raises(lxm3.BuildError, match=(
            rf"^echoapp would be both a file and a directory in the archive: it is the Fileset "
            rf"file {file}, and echoapp/\S+ is the file pip installed from {project};")):
        lxm3.build_archive(spec, use_cache=False)


def test_fileset_cannot_replace_the_entrypoint_script(tmp_path, project):
    script = local_file(tmp_path, "entrypoint.sh", "echo mine\n")
    spec = spec_with(project, lxm3.Fileset({script: "entrypoint.sh"}))
    with pytest.raises(lxm3.BuildError, match=(
            rf"^entrypoint\.sh is the name of the script lxm3 writes into the archive to start "
            rf"the program, but the Fileset file {script} is there too")):
        lxm3.build_archive(spec, use_cache=False)


def test_a_zip_is_never_written_with_a_name_twice(tmp_path):
    a = local_file(tmp_path, "a", "1")
    b = local_file(tmp_path, "b", "2")
    with pytest.raises(ValueError, match=r"^x/y is given twice for the zip "):
        lxm3.write_reproducible_zip(str(tmp_path / "z.zip"), [(a, "x/y"), (b, os.path.join("x", "y"))])
