"""Executable specs, packagable factories, job operators, launcher paths, pattern matching."""

import os
import re
import sys
from typing import Any, Callable

import pytest
from xm_toy_backend import ToyExecutable, ToyExecutor, ToyExecutorSpec

import xm
from xm import executables, job_operators, pattern_matching, utils


@pytest.fixture
def launcher(tmp_path):
    """Pretends the launcher is tmp_path/project/launch.py."""
    project = tmp_path / "project"
    project.mkdir()
    script = project / "launch.py"
    script.write_text("")
    utils.set_launch_script(str(script))
    yield project.resolve()
    utils.set_launch_script(None)


# --- Launcher-relative paths -----------------------------------------------------------


def test_relative_paths_resolve_against_the_launcher(launcher):
    assert utils.find_launch_script_path() == str(launcher / "launch.py")
    assert utils.resolve_path_relative_to_launcher(".") == str(launcher)
    assert utils.resolve_path_relative_to_launcher("data/x") == str(launcher / "data" / "x")
    assert utils.resolve_path_relative_to_launcher("..") == str(launcher.parent)
    assert utils.get_absolute_path("y") == str(launcher / "y")


def test_absolute_paths_are_kept(launcher):
    assert utils.resolve_path_relative_to_launcher("/abs/../path") == "/abs/../path"


def test_missing_launcher_is_an_error(tmp_path):
    utils.set_launch_script(str(tmp_path / "gone.py"))
    try:
        message = re.escape(
            "Unable to determine launch script path. The script is not present at "
            f"{str(tmp_path / 'gone.py')!r}."
        )
        with pytest.raises(RuntimeError, match=message):
            utils.resolve_path_relative_to_launcher("x")
    finally:
        utils.set_launch_script(None)


def test_launcher_guessed_from_argv(tmp_path, monkeypatch):
    script = tmp_path / "run.py"
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script), "--flag"])
    assert utils.find_launch_script_path() == str(script)
    assert utils.resolve_path_relative_to_launcher("a") == os.path.realpath(tmp_path / "a")


def test_no_launcher_in_interactive_use(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-c"])
    monkeypatch.setattr(sys.modules["__main__"], "__file__", None, raising=False)
    assert utils.find_launch_script_path() == ""
    assert utils.resolve_path_relative_to_launcher("a") == os.path.realpath(
        os.path.join(utils._START_DIR, "a")
    )


# --- Executable specs --------------------------------------------------------------


def test_spec_names_come_from_paths():
    assert executables.Container(image_path="/home/user/project/image.tar").name == "image_tar"
    assert executables.Binary(path="./binary").name == "binary"
    assert executables.BazelContainer(label="//container").name == "container"
    assert executables.BazelBinary(label=":binary").name == "_binary"
    assert executables.name_from_path("/a/my-project/") == "my_project"


def test_python_container(launcher):
    spec = xm.PythonContainer(entrypoint=xm.ModuleName("module"), path="/home/user/project/")
    assert spec.name == "project"
    assert spec.path == "/home/user/project/"
    relative = xm.PythonContainer(entrypoint=xm.CommandList(["echo hi"]))
    assert relative.path == str(launcher)
    assert (relative.base_image, relative.docker_instructions, relative.use_deep_module) == (
        None,
        None,
        False,
    )


def test_dockerfile_defaults_relative_to_launcher(launcher):
    spec = xm.Dockerfile()
    assert spec.path == str(launcher)
    assert spec.dockerfile == str(launcher / "Dockerfile")
    assert spec.name == launcher.name
    other = xm.Dockerfile(path="ctx", dockerfile="docker/Dockerfile.gpu")
    assert other.path == str(launcher / "ctx")
    assert other.dockerfile == str(launcher / "docker" / "Dockerfile.gpu")


def test_entrypoints_are_named_tuples():
    module = xm.ModuleName("pkg.main")
    assert module.module_name == "pkg.main" and module == ("pkg.main",)
    assert repr(module) == "ModuleName(module_name='pkg.main')"
    commands = xm.CommandList(["a", "b"])
    assert commands.commands == ["a", "b"]
    assert isinstance(commands, tuple)


def test_binary_dependencies_are_lists():
    spec = xm.Binary(path="/bin/true", dependencies=())
    assert spec.dependencies == []
    assert xm.BazelBinary(label="//x", bazel_args=("-c", "opt")).bazel_args == ["-c", "opt"]
    assert issubclass(xm.Binary, xm.ExecutableSpec)


# --- Packagables ---------------------------------------------------------------------


def test_packagable_factories(launcher):
    spec = ToyExecutorSpec()
    packageable = xm.binary(spec, "/bin/true", args={"a": 1}, env_vars={"K": "v"})
    assert isinstance(packageable, xm.Packageable)
    assert packageable.executable_spec == xm.Binary(path="/bin/true")
    assert packageable.executor_spec is spec
    assert packageable.args.to_list() == ["--a=1"]
    assert packageable.env_vars == {"K": "v"}

    assert xm.container(spec, "img:1").executable_spec == xm.Container("img:1")
    assert xm.bazel_binary(spec, "//x", (), ["-c"]).executable_spec.bazel_args == ["-c"]
    assert xm.bazel_container(spec, "//y").executable_spec == xm.BazelContainer("//y")
    python = xm.python_container(spec, xm.ModuleName("m"), args=["x"])
    assert python.executable_spec.path == str(launcher)
    assert python.args.to_list() == ["x"]
    assert python.env_vars == {}
    assert xm.dockerfile_container(spec).executable_spec.dockerfile == str(launcher / "Dockerfile")


def test_packagable_factories_validate_args():
    with pytest.raises(ValueError, match="Wrap it in a list"):
        xm.binary(ToyExecutorSpec(), "/bin/true", args="--x")
    with pytest.raises(ValueError, match="Environment variables names must conform"):
        xm.container(ToyExecutorSpec(), "img", env_vars={"1A": "x"})


# --- Job operators ---------------------------------------------------------------------


def _job(name=None):
    return xm.Job(ToyExecutable("exe"), ToyExecutor(), name=name)


class SameMachine(xm.Constraint):
    def __init__(self, tag):
        self.tag = tag


def test_flatten_and_collect():
    a, b, c = _job("a"), _job("b"), _job("c")
    group = xm.JobGroup(x=a, y=xm.JobGroup(z=b, w=c))
    assert job_operators.flatten_jobs(group) == [a, b, c]
    assert job_operators.collect_jobs_by_filter(group, lambda j: j.name != "b") == [a, c]
    with pytest.raises(TypeError, match="^Expected xm.Job or xm.JobGroup, got <function "):
        job_operators.flatten_jobs(xm.JobGroup(g=lambda wu: None))


def test_aggregate_constraint_cliques():
    outer, inner = SameMachine("outer"), SameMachine("inner")
    a, b, c = _job("a"), _job("b"), _job("c")
    group = xm.JobGroup(a=a, sub=xm.JobGroup(b=b, c=c, constraints=[inner]), constraints=[outer])
    cliques = job_operators.aggregate_constraint_cliques(group)
    assert [(clique.constraint.tag, clique.jobs) for clique in cliques] == [
        ("outer", [a, b, c]),
        ("inner", [b, c]),
    ]


def test_shallow_copy_job_type():
    job = _job()
    group = xm.JobGroup(j=job)
    copied = job_operators.shallow_copy_job_type(group)
    assert copied is not group and copied.jobs["j"] is not job
    assert copied.jobs["j"] == job
    assert copied.jobs["j"].executable is job.executable

    async def generator(work_unit):
        pass

    assert job_operators.shallow_copy_job_type(generator) is generator
    with pytest.raises(TypeError,
                       match="^42 is not an xm.Job, xm.JobGroup, job generator or xm.JobConfig$"):
        job_operators.shallow_copy_job_type(42)


def test_populate_job_names():
    lone = _job()
    job_operators.populate_job_names(lone)
    assert lone.name == "exe"
    group = xm.JobGroup(a=_job(), b=xm.JobGroup(c=_job(), d=_job("kept")))
    job_operators.populate_job_names(group)
    assert [j.name for j in job_operators.flatten_jobs(group)] == ["a", "b_c", "kept"]


# --- Pattern matching and metadata ------------------------------------------------


def test_pattern_matching_dispatches_on_annotations():
    def on_int(value: int):
        return "int"

    def on_str(value: str):
        return "str"

    matcher = pattern_matching.match(
        on_int,
        on_str,
        pattern_matching.Case([Callable[..., Any]], lambda value: "callable"),
        pattern_matching.Case([Any], lambda value: "any"),
    )
    assert [matcher(1), matcher("s"), matcher(len), matcher(1.5)] == [
        "int",
        "str",
        "callable",
        "any",
    ]


def test_pattern_matching_errors():
    matcher = pattern_matching.match(pattern_matching.Case([int], lambda v: v))
    with pytest.raises(TypeError, match="did not match any type pattern"):
        matcher("x")

    def unannotated(value):
        return value

    with pytest.raises(ValueError, match="value argument of a .* is missing a type annotation"):
        pattern_matching.match(unannotated)


def test_metadata_context():
    context = xm.MetadataContext(creator="me", annotations=xm.ContextAnnotations())
    assert context.creator == "me"
    assert context.annotations.title == ""
    assert context == xm.MetadataContext(creator="me", annotations=context.annotations)
