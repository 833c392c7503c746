"""Packaging with real pip: reproducible, content-addressed, cached archives."""

import os
import re
import zipfile

import pytest

import lxm3
from lxm3 import xm

from conftest import PYPROJECT, write_files


def names_in(archive):
    with zipfile.ZipFile(archive.path) as zf:
        return set(zf.namelist())


def spec_for(path, **kwargs):
    return lxm3.PythonPackage(entrypoint=xm.ModuleName("echoapp.main"), path=path, **kwargs)


def test_python_package_archive_holds_the_code_and_an_entrypoint(echo_project):
    archive = lxm3.build_archive(spec_for(echo_project))
    names = names_in(archive)
    assert {"echoapp/__init__.py", "echoapp/main.py", "entrypoint.sh"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    with zipfile.ZipFile(archive.path) as zf:
        entry = zf.read("entrypoint.sh").decode()
        assert 'python3}" -m echoapp.main "$@"' in entry
        assert zf.getinfo("entrypoint.sh").external_attr >> 16 & 0o111
    # The name carries the content hash.
    assert os.path.basename(archive.path) == f"echo_project-{archive.digest[:16]}.zip"


def test_identical_inputs_give_identical_bytes(echo_project):
    first = lxm3.build_archive(spec_for(echo_project), use_cache=False)
    with open(first.path, "rb") as f:
        first_bytes = f.read()
    os.remove(first.path)
    second = lxm3.build_archive(spec_for(echo_project), use_cache=False)
    with open(second.path, "rb") as f:
        assert f.read() == first_bytes
    assert second.digest == first.digest


def test_unchanged_project_is_not_rebuilt(echo_project, monkeypatch, capsys):
    first = lxm3.build_archive(spec_for(echo_project))

    def no_build(*args, **kwargs):
        raise AssertionError("pip ran for an unchanged project")

    monkeypatch.setattr(lxm3, "_run_build_step", no_build)
    again = lxm3.build_archive(spec_for(echo_project))
    assert again == first
    assert "unchanged" in capsys.readouterr().err


def test_a_changed_source_file_gives_a_new_archive(echo_project):
    first = lxm3.build_archive(spec_for(echo_project))
    with open(os.path.join(echo_project, "echoapp", "extra.py"), "w") as f:
        f.write("VALUE = 1\n")
    second = lxm3.build_archive(spec_for(echo_project))
    assert second.digest != first.digest
    assert "echoapp/extra.py" in names_in(second)
    assert os.path.exists(first.path)  # earlier archives stay valid for running jobs


def test_changed_options_give_a_new_build(echo_project):
    first = lxm3.build_archive(spec_for(echo_project))
    other = lxm3.build_archive(lxm3.PythonPackage(
        entrypoint=xm.CommandList(["echo start", "python3 -m echoapp.main"]), path=echo_project))
    assert other.digest != first.digest
    with zipfile.ZipFile(other.path) as zf:
        assert zf.read("entrypoint.sh").decode().endswith('echo start\npython3 -m echoapp.main "$@"\n')


def test_fileset_files_are_shipped_at_their_destination(echo_project, tmp_path):
    write_files(tmp_path / "data", {"config.json": '{"a": 1}', "sub/more.txt": "more"})
    fileset = lxm3.Fileset({str(tmp_path / "data" / "config.json"): "configs/run.json"})
    fileset.add_path(str(tmp_path / "data" / "sub"), "extra")
    archive = lxm3.build_archive(spec_for(echo_project, resources=[fileset]))
    assert {"configs/run.json", "extra/more.txt"} <= names_in(archive)
    assert fileset.get_path("configs/run.json", lxm3.Local.Spec()) == "configs/run.json"
    with pytest.raises(ValueError, match="not a destination"):
        fileset.get_path("nope.json", lxm3.Local.Spec())


def test_extra_packages_are_installed_too(echo_project, tmp_path):
    helper = write_files(tmp_path / "helperpkg", {
        "pyproject.toml": PYPROJECT.format(name="helperpkg"),
        "helperpkg/__init__.py": "X = 1\n",
    })
    archive = lxm3.build_archive(spec_for(echo_project, extra_packages=[helper]))
    assert "helperpkg/__init__.py" in names_in(archive)


def test_pip_errors_reach_the_user(tmp_path):
    broken = write_files(tmp_path / "broken", {
        "pyproject.toml": "[project]\nname = 'broken'\nversion = 'not a version'\n",
        "broken/__init__.py": "",
    })
    with pytest.raises(lxm3.BuildError, match=re.escape(f"pip install of {broken} failed")) as info:
        lxm3.build_archive(lxm3.PythonPackage(xm.ModuleName("broken"), path=broken))
    assert "not a version" in str(info.value)  # pip's own explanation is quoted


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(lxm3.BuildError, match="is not a directory"):
        lxm3.build_archive(lxm3.PythonPackage(xm.ModuleName("x"), path=str(tmp_path / "nope")))


def test_directory_without_a_project_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lxm3.BuildError, match="neither pyproject.toml nor setup.py"):
        lxm3.build_archive(lxm3.PythonPackage(xm.ModuleName("x"), path=str(tmp_path / "empty")))


def test_bad_entrypoint_is_rejected_when_written():
    with pytest.raises(ValueError, match=r"ModuleName\('my-module.py'\) is not a Python module name"):
        lxm3.PythonPackage(entrypoint=xm.ModuleName("my-module.py"))
    with pytest.raises(TypeError, match="entrypoint must be xm_cluster.ModuleName"):
        lxm3.PythonPackage(entrypoint="pkg.main")
    with pytest.raises(ValueError, match="^CommandList needs a non-empty list of shell commands$"):
        lxm3.PythonPackage(entrypoint=xm.CommandList([]))


def universal(tmp_path, script_text, mode=0o755):
    root = write_files(tmp_path / "uni", {"build.sh": script_text, "run.sh": "echo run\n"})
    os.chmod(os.path.join(root, "build.sh"), mode)
    return lxm3.UniversalPackage(entrypoint=["./run.sh"], build_script="build.sh",
                                 build_args=["--out", "run.sh"], path=root)


def test_universal_package_ships_what_the_build_script_writes(tmp_path):
    spec = universal(tmp_path, '#!/bin/sh\nset -e\ncp "$2" "$BUILDDIR/$2"\nchmod +x "$BUILDDIR/$2"\n')
    archive = lxm3.build_archive(spec)
    assert names_in(archive) == {"run.sh", "entrypoint.sh"}
    with zipfile.ZipFile(archive.path) as zf:
        assert zf.read("entrypoint.sh").decode().endswith('./run.sh "$@"\n')


def test_failing_build_script_is_reported_with_its_output(tmp_path):
    spec = universal(tmp_path, "#!/bin/sh\necho 'compiler exploded' >&2\nexit 4\n")
    with pytest.raises(lxm3.BuildError, match=r"failed \(exit code 4\)") as info:
        lxm3.build_archive(spec)
    assert "compiler exploded" in str(info.value)


def test_non_executable_build_script_says_how_to_fix_it(tmp_path):
    spec = universal(tmp_path, "#!/bin/sh\n", mode=0o644)
    with pytest.raises(lxm3.BuildError, match="is not executable; run: chmod"):
        lxm3.build_archive(spec)


def test_fingerprint_ignores_build_leftovers(echo_project):
    before = lxm3.tree_fingerprint(echo_project)
    for leftover in ("build/lib/x.py", "echoapp.egg-info/PKG-INFO", "echoapp/__pycache__/m.pyc"):
        write_files(echo_project, {leftover: "x"})
    assert lxm3.tree_fingerprint(echo_project) == before
