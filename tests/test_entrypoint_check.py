"""A wrong ModuleName entrypoint fails the build (real pip), not every task on the cluster."""

import os
import zipfile

import pytest

import lxm3
from lxm3 import xm

from conftest import ECHO_MAIN, PYPROJECT, write_files

# setuptools ships *.so package data as it is: a file named like a compiled
# extension (no compiler needed), which the check must count as a module.
PYPROJECT_WITH_DATA = PYPROJECT.replace("[tool.setuptools]", """\
    [tool.setuptools.package-data]
    "*" = ["*.so"]

    [tool.setuptools]""")


@pytest.fixture
def project(tmp_path):
    """A package with modules, a subpackage, a runnable subpackage and an 'extension'."""
    return write_files(tmp_path / "proj", {
        "pyproject.toml": PYPROJECT_WITH_DATA.replace(
            'packages = ["{name}"]', 'packages = ["{name}", "{name}.tools", "{name}.cli"]'
        ).format(name="echoapp"),
        "echoapp/__init__.py": "",
        "echoapp/main.py": ECHO_MAIN,
        "echoapp/train.py": "",
        "echoapp/tools/__init__.py": "",
        "echoapp/tools/evaluate.py": "",
        "echoapp/cli/__init__.py": "",
        "echoapp/cli/__main__.py": ECHO_MAIN,
        "echoapp/fast.cpython-311-x86_64-linux-gnu.so": "not really compiled",
    })


def build(path, module):
    return lxm3.build_archive(lxm3.PythonPackage(entrypoint=xm.ModuleName(module), path=path),
                              use_cache=False)


def test_a_misspelt_module_fails_the_build_with_a_suggestion(project, capsys):
    with pytest.raises(lxm3.BuildError, match=r"the entrypoint module echoapp\.mian is not in the "
                       r"archive: echoapp/ has no mian\.py or mian/\. did you mean echoapp\.main\? "
                       r"echoapp contains: cli, fast, main, tools, train"):
        build(project, "echoapp.mian")
    assert "built" not in capsys.readouterr().err
    with pytest.raises(lxm3.BuildError, match=r"echoapp/tools/ has no evaluat\.py or evaluat/\. "
                       r"did you mean echoapp\.tools\.evaluate\?"):
        build(project, "echoapp.tools.evaluat")


def test_modules_packages_with_main_and_extensions_are_found(project):
    for module in ("echoapp.main", "echoapp.tools.evaluate", "echoapp.cli", "echoapp.fast"):
        archive = build(project, module)
        with zipfile.ZipFile(archive.path) as zf:
            assert f'-m {module} "$@"' in zf.read("entrypoint.sh").decode()


def test_a_package_without_main_cannot_be_run(project):
    with pytest.raises(lxm3.BuildError, match=r"the entrypoint echoapp\.tools is a package without "
                       r"a __main__\.py, which python -m cannot run; name the module to run: "
                       r"echoapp\.tools contains: evaluate"):
        build(project, "echoapp.tools")


def test_a_module_inside_a_module_is_refused(project):
    with pytest.raises(lxm3.BuildError, match=r"echoapp\.main\.run cannot exist: echoapp\.main is "
                       r"a module, not a package"):
        build(project, "echoapp.main.run")


def test_a_module_from_the_nodes_python_is_only_a_warning(project, capsys):
    archive = build(project, "torch.distributed.run")
    assert os.path.isfile(archive.path)
    err = capsys.readouterr().err
    assert ("warning: the entrypoint module torch.distributed.run is not in the archive "
            "(it has no torch/ or torch.py)") in err
    assert "built" in err


def test_a_namespace_package_may_have_other_parts_on_the_node(tmp_path, capsys):
    path = write_files(tmp_path / "nsproj", {
        "pyproject.toml": PYPROJECT.replace('packages = ["{name}"]',
                                            'packages = ["company.mine"]').format(name="nsproj"),
        "company/mine/__init__.py": "",
        "company/mine/main.py": "",
    })
    build(path, "company.mine.main")
    assert "warning" not in capsys.readouterr().err
    build(path, "company.shared.run")  # company/ has no __init__.py: PEP 420 namespace
    assert ("warning: the entrypoint module company.shared.run is not in the archive "
            "(company/ has no shared)") in capsys.readouterr().err
    with pytest.raises(lxm3.BuildError, match=r"company/mine/ has no mian\.py"):
        build(path, "company.mine.mian")  # a regular package: nothing else can add to it
