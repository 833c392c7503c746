"""Arguments, environment variables and job blocks (`xm.job_blocks`, `xm.utils`)."""

import enum
import logging
import re

import pytest
from xm_toy_backend import ToyExecutable, ToyExecutor, ToyExecutorSpec, ToySpec

import xm
from xm import job_blocks, utils


class Color(enum.Enum):
    A = 1
    B = 2


# --- Building SequentialArgs ---------------------------------------------------


def test_from_mapping_keeps_insertion_order():
    args = xm.SequentialArgs.from_collection({"a": 1, "b": 2, "c": 3})
    assert args.to_list(str) == ["--a=1", "--b=2", "--c=3"]


def test_from_mapping_stringifies_keys():
    args = xm.SequentialArgs.from_collection({1: "x"})
    assert args.to_dict() == {"1": "x"}


def test_from_sequence_is_positional():
    args = xm.SequentialArgs.from_collection([1, 2, 3])
    assert args.to_list(str) == ["1", "2", "3"]
    assert xm.SequentialArgs.from_collection((1, "2")).to_list(str) == ["1", "2"]


def test_from_none_is_empty():
    assert xm.SequentialArgs.from_collection(None).to_list() == []
    assert xm.SequentialArgs().to_list() == []


def test_from_sequential_args_copies():
    original = xm.merge_args({"a": 1})
    copy = xm.SequentialArgs.from_collection(original)
    assert copy == original and copy is not original
    copy._ingest_keyword_item("b", 2)
    assert original.to_dict() == {"a": 1}


def test_from_string_says_to_wrap_it_in_a_list():
    message = re.escape(
        "Tried to construct xm.SequentialArgs from a string: '--foo'. "
        "Wrap it in a list: ['--foo'] to make it a single argument."
    )
    with pytest.raises(ValueError, match=message):
        xm.SequentialArgs.from_collection("--foo")


def test_from_other_objects_is_a_type_error():
    with pytest.raises(TypeError, match="got int: 3"):
        xm.SequentialArgs.from_collection(3)
    with pytest.raises(TypeError, match="got set"):
        xm.SequentialArgs.from_collection({"a"})


# --- Merging -------------------------------------------------------------------------


def test_merge_keeps_first_position_and_takes_new_value():
    args = xm.merge_args([1], {"a": "z", "b": "y"}, [2], {"b": "x", "c": "t"}, [3])
    assert args.to_list(str) == ["1", "--a=z", "--b=x", "2", "--c=t", "3"]


def test_merge_overrides_defaults():
    args = xm.merge_args({"foo": "1", "bar": "42"}, {"foo": "2"})
    assert args.to_list() == ["--foo=2", "--bar=42"]


def test_merge_does_not_modify_operands():
    base = xm.merge_args({"foo": 1})
    merged = xm.merge_args(base, {"foo": 2}, ["pos"])
    assert base.to_list() == ["--foo=1"]
    assert merged.to_list() == ["--foo=2", "pos"]


def test_merge_of_nothing_is_empty():
    assert xm.merge_args() == xm.SequentialArgs()
    assert xm.merge_args(None, [], {}).to_list() == []


def test_merge_rejects_strings():
    with pytest.raises(ValueError, match="Wrap it in a list"):
        xm.merge_args({"a": 1}, "--b=2")


# --- Rendering -----------------------------------------------------------------------


def test_observed_rendering():
    args = xm.merge_args(
        ["pos arg", xm.ShellSafeArg("$HOME")],
        {
            "foo": "space bar",
            "flag": True,
            "off": False,
            "none": None,
            "lst": [1, "a b"],
            "nested": [[1, 2]],
            "e": Color.A,
            "sh": xm.ShellSafeArg("${X}"),
            "f": 0.1,
        },
    )
    assert args.to_list() == [
        "'pos arg'",
        "$HOME",
        "--foo='space bar'",
        "--flag",
        "--nooff",
        "--lst=1",
        "--lst='a b'",
        "--nested='[[1, 2]]'",
        "--e=A",
        "--sh=${X}",
        "--f=0.1",
    ]


def test_bools_render_as_absl_flags():
    args = xm.SequentialArgs.from_collection({"yes": True, "no": False})
    assert args.to_list(str) == ["--yes", "--nono"]


def test_none_drops_the_flag_and_warns_once(caplog):
    job_blocks.print_none_warning.cache_clear()
    args = xm.SequentialArgs.from_collection({"skip_me": None, "pass_me": "None"})
    with caplog.at_level(logging.WARNING, logger="xm.job_blocks"):
        assert args.to_list(str) == ["--pass_me=None"]
        assert args.to_list(str) == ["--pass_me=None"]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "Setting `skip_me=None` will exclude the flag. To pass the actual value, "
        'pass the string literal `skip_me="None"` instead'
    ]


def test_sequences_repeat_the_flag():
    assert xm.merge_args({"c": [3, "4"]}).to_list(str) == ["--c=3", "--c=4"]
    assert xm.merge_args({"c": (3, 4)}).to_list(str) == ["--c=3", "--c=4"]
    assert xm.merge_args({"c": []}).to_list(str) == []


def test_nested_sequences_are_rendered_whole():
    assert xm.merge_args({"a": [[1, 2, 3]]}).to_list(str) == ["--a=[[1, 2, 3]]"]
    assert xm.merge_args({"a": [1, (2,)]}).to_list() == ["--a='[1, (2,)]'"]


def test_values_are_shell_quoted():
    args = xm.merge_args(["it's", "*", "$HOME", "a\nb"], {"k": "`x`"})
    assert args.to_list() == ["'it'\"'\"'s'", "'*'", "'$HOME'", "'a\nb'", "--k='`x`'"]


def test_custom_escaper_and_joiner():
    args = xm.merge_args(["p"], {"k": "v w", "flag": True})
    assert args.to_list(escaper=str, kwargs_joiner=lambda k, v: f"{k} {v}") == [
        "p",
        "--k v w",
        "--flag",
    ]


def test_repr():
    assert repr(xm.merge_args(["a"], {"b": 1, "c": True})) == "['a', '--b'=1, '--c']"


def test_to_dict():
    args = xm.merge_args(["--knob"], {1: False})
    assert args.to_dict() == {"--knob": True, "1": False}
    assert args.to_dict(kwargs_only=True) == {"1": False}


def test_to_dict_kwargs_only_is_a_copy():
    args = xm.merge_args({"a": 1})
    args.to_dict(kwargs_only=True)["a"] = 2
    assert args.to_list() == ["--a=1"]


def test_equality():
    assert xm.merge_args({"a": 1}, ["x"]) == xm.merge_args({"a": 1}, ["x"])
    assert xm.merge_args({"a": 1}, ["x"]) != xm.merge_args(["x"], {"a": 1})
    assert xm.merge_args({"a": 1}) != xm.merge_args({"a": 2})
    assert xm.merge_args(["a"]) != ["a"]


def test_rewrite_args_only_touches_strings():
    args = xm.merge_args(["/old/x", 3], {"path": "/old/y", "n": 1, "flag": True})
    rewritten = args.rewrite_args(lambda s: s.replace("/old", "/new"))
    assert rewritten.to_list() == ["/new/x", "3", "--path=/new/y", "--n=1", "--flag"]
    assert args.to_list()[0] == "/old/x"


# --- Escaper and ShellSafeArg --------------------------------------------------------


def test_arg_escaper():
    assert utils.ARG_ESCAPER(1.0) == "1.0"
    assert utils.ARG_ESCAPER("Jonny Droptable") == "'Jonny Droptable'"
    assert utils.ARG_ESCAPER(Color.B) == "B"
    assert utils.ARG_ESCAPER(xm.ShellSafeArg("$X y")) == "$X y"


def test_shell_safe_arg_refuses_str():
    message = re.escape(
        "Converting ShellSafeArg(arg='42') to a string would strip the ShellSafe semantics."
    )
    with pytest.raises(RuntimeError, match=message):
        f"{xm.ShellSafeArg('42')}"  # noqa: B018


def test_trivial_kwargs_joiner():
    assert utils.trivial_kwargs_joiner("--a", "b") == "--a=b"


# --- Jobs, packageables, groups --------------------------------------------------------


def test_job_converts_args_and_env_vars():
    job = xm.Job(ToyExecutable("e"), ToyExecutor(), args={"a": 1}, env_vars=[("K", "v")])
    assert isinstance(job.args, xm.SequentialArgs)
    assert job.args.to_list() == ["--a=1"]
    assert job.env_vars == {"K": "v"}
    assert job.name is None


def test_job_defaults():
    job = xm.Job(ToyExecutable("e"), ToyExecutor())
    assert job.args == xm.SequentialArgs()
    assert job.env_vars == {}
    assert xm.Job(ToyExecutable("e"), ToyExecutor(), "n", ["x"], {"A": "1"}).name == "n"


def test_job_rejects_string_args():
    with pytest.raises(ValueError, match="Wrap it in a list"):
        xm.Job(ToyExecutable("e"), ToyExecutor(), args="--foo")


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "", "É"])
def test_env_var_names_are_validated(name):
    message = re.escape(
        f"Environment variables names must conform to [a-zA-Z_][a-zA-Z0-9_]*. Got {name!r}."
    )
    with pytest.raises(ValueError, match=message):
        xm.Job(ToyExecutable("e"), ToyExecutor(), env_vars={name: "x"})
    with pytest.raises(ValueError, match=message):
        xm.Packageable(ToySpec("s"), ToyExecutorSpec(), env_vars={name: "x"})


@pytest.mark.parametrize("name", ["A", "_", "a_1", "CUDA_VISIBLE_DEVICES"])
def test_valid_env_var_names(name):
    assert xm.Job(ToyExecutable("e"), ToyExecutor(), env_vars={name: "x"}).env_vars == {name: "x"}


def test_packageable_converts_like_job():
    packageable = xm.Packageable(ToySpec("s"), ToyExecutorSpec(), args=["a"], env_vars={"K": 1})
    assert packageable.args.to_list() == ["a"]
    assert packageable.env_vars == {"K": 1}
    empty = xm.Packageable(ToySpec("s"), ToyExecutorSpec())
    assert (empty.args, empty.env_vars) == (xm.SequentialArgs(), {})


def test_job_equality_and_repr():
    a = xm.Job(ToyExecutable("e"), ToyExecutor(), args={"x": 1})
    executor = a.executor
    assert a == xm.Job(ToyExecutable("e"), executor, args={"x": 1})
    assert a != xm.Job(ToyExecutable("e"), executor, args={"x": 2})
    assert repr(a).startswith("Job(executable=ToyExecutable(name='e')")


def test_job_group():
    a, b = xm.Job(ToyExecutable("a"), ToyExecutor()), xm.Job(ToyExecutable("b"), ToyExecutor())
    group = xm.JobGroup(learner=a, actor=b)
    assert group.jobs == {"learner": a, "actor": b}
    assert group.constraints == []

    class SameMachine(xm.Constraint):
        pass

    constraint = SameMachine()
    constrained = xm.JobGroup(x=a, constraints=(constraint,))
    assert constrained.constraints == [constraint]
    assert "x" in constrained.jobs and "constraints" not in constrained.jobs
    with pytest.raises(TypeError, match=r"__init__\(\) takes 1 positional argument but 2 were given"):
        xm.JobGroup(a)


def test_get_args_for_all_jobs():
    def job():
        return xm.Job(ToyExecutable("e"), ToyExecutor())

    group = xm.JobGroup(a=job(), b=xm.JobGroup(b1=xm.JobGroup(b1i=job(), b1ii=job()), b2=job()))
    logdir = {"logdir": "/logdir/1"}
    assert xm.get_args_for_all_jobs(group, logdir) == {
        "a": {"args": logdir},
        "b": {"b1": {"b1i": {"args": logdir}, "b1ii": {"args": logdir}}, "b2": {"args": logdir}},
    }
    assert xm.get_args_for_all_jobs(job(), logdir) == {"args": logdir}


def test_executable_is_a_value_object_base():
    class Archive(xm.Executable):
        def __init__(self, name, path=""):
            super().__init__(name)
            self.path = path
            self._cache = object()  # private: left out of equality and repr

    archive = Archive(name="n", path="/p")
    assert (archive.name, archive.path) == ("n", "/p")
    assert repr(archive).endswith("Archive(name='n', path='/p')")
    assert archive == Archive("n", "/p")
    assert archive != Archive("n", "/q")
    assert archive != ToyExecutable("n")  # another class, even with the same name
    assert repr(ToyExecutable("e")) == "ToyExecutable(name='e')"
    with pytest.raises(TypeError, match="unhashable type: 'Archive'"):
        hash(archive)  # mutable, like the dataclass it replaces



def test_executable_spec_and_executor_are_abstract():
    with pytest.raises(TypeError, match=r"^Can't instantiate abstract class ExecutableSpec "
                                        r"with(out an implementation for)? abstract method '?name'?$"):
        xm.ExecutableSpec()
    with pytest.raises(TypeError, match=r"^Can't instantiate abstract class Executor "
                                        r"with(out an implementation for)? abstract method '?Spec'?$"):
        xm.Executor()
    assert isinstance(ToyExecutor.Spec(), xm.ExecutorSpec)
    assert ToySpec("name").name == "name"
