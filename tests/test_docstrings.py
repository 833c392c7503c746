"""Every parameter of the public xm_cluster API is documented where help() shows it.

On a login node ``help(xm_cluster.Slurm)`` may be the only manual. Each
parameter of a public class's ``__init__`` (or of a public function) has an
entry ``name: ...`` in the ``Args:`` section of the class's (function's)
docstring, so that a parameter added later without documentation, or renamed
without its entry, fails here.
"""

import inspect
import re

import pytest

import lxm3
from lxm3 import xm

# The classes and functions launchers call, by their name in xm_cluster.
DOCUMENTED = [
    "Fileset", "PythonPackage", "UniversalPackage", "SingularityContainer",
    "DockerContainer", "PDMProject", "PythonContainer",
    "SingularityOptions", "DockerOptions", "Local", "ClusterExecutor", "Slurm",
    "GridEngine", "PBS", "ArrayJob", "ClusterConfig", "Config",
    "create_experiment", "get_experiment", "get_current_experiment",
    "UclGridEngine", "configure_wandb",
]
# Without parameters of their own: a docstring with a summary line is enough.
SPECS = ["LocalSpec", "ClusterExecutorSpec", "SlurmSpec", "GridEngineSpec", "PBSSpec"]

_ENTRY = re.compile(r"(\*{0,2}\w+)(?: \([^)]*\))?:(?:\s|$)")


def args_section(doc):
    """The parameter names of a Google-style ``Args:`` section, in order."""
    lines = inspect.cleandoc(doc or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    if len(starts) != 1:
        return None
    args_indent = len(lines[starts[0]]) - len(lines[starts[0]].lstrip())
    names, entry_indent = [], None
    for line in lines[starts[0] + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= args_indent:
            break  # the section has ended
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent:
            match = _ENTRY.match(line.strip())
            assert match, f"not an Args entry ('name: text'): {line.strip()!r}"
            names.append(match.group(1).lstrip("*"))
    return names


def parameters(obj):
    """What a caller passes: ``__init__``'s parameters, or the function's."""
    if obj is lxm3.ClusterExecutor:  # its subclasses pass these to _init_common
        function = obj._init_common
    elif inspect.isclass(obj):
        function = obj.__init__
    else:
        function = obj
    return [name for name in inspect.signature(function).parameters if name != "self"]


def missing_and_stale(obj):
    """Parameters without an Args entry, and entries naming no parameter."""
    documented = args_section(obj.__doc__) or []
    params = parameters(obj)
    return ([p for p in params if p not in documented],
            [d for d in documented if d not in params])


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_parameter_has_an_args_entry(name):
    obj = getattr(lxm3.xm_cluster, name)
    if parameters(obj):
        assert args_section(obj.__doc__), f"{name}'s docstring has no 'Args:' section"
    missing, stale = missing_and_stale(obj)
    assert missing == [], f"{name}: parameters without an 'Args:' entry: {missing}"
    assert stale == [], f"{name}: 'Args:' entries that are no parameter: {stale}"


@pytest.mark.parametrize("name", DOCUMENTED + SPECS)
def test_docstring_starts_with_a_one_line_summary(name):
    doc = inspect.cleandoc(getattr(lxm3.xm_cluster, name).__doc__ or "")
    lines = doc.splitlines()
    assert lines and lines[0].strip(), f"{name} has no docstring"
    assert len(lines) == 1 or not lines[1].strip(), (
        f"{name}: the first line should be a summary, then a blank line")


@pytest.mark.parametrize("name", ["Slurm", "GridEngine", "PBS"])
def test_each_scheduler_lists_the_shared_parameters_itself(name):
    """help(Slurm) is complete on its own: the ClusterExecutor fields are listed there too."""
    shared = parameters(lxm3.ClusterExecutor)
    documented = args_section(getattr(lxm3, name).__doc__)
    assert [p for p in shared if p not in documented] == []


def test_every_executor_and_spec_class_is_checked():
    """A new public executor or executable spec in lxm3.py joins DOCUMENTED (or SPECS);
    private bases (``_DockerBuiltProject``) are documented by their subclasses."""
    found = {name for name, obj in vars(lxm3).items()
             if inspect.isclass(obj) and obj.__module__ == lxm3.__name__ and not name.startswith("_")
             and issubclass(obj, (xm.Executor, xm.ExecutorSpec, xm.ExecutableSpec))}
    assert found - set(DOCUMENTED) - set(SPECS) == set()


def test_the_check_catches_an_undocumented_or_stale_parameter():
    class Documented:
        """Summary.

        Args:
          alpha: documented.
          gamma (int): no longer a parameter.
          **kwargs: the rest.
        """

        def __init__(self, alpha, beta=None, **kwargs):
            pass

    assert missing_and_stale(Documented) == (["beta"], ["gamma"])
    assert args_section("Summary.\n\n    No args.") is None
    with pytest.raises(AssertionError, match="not an Args entry"):
        args_section("Summary.\n\nArgs:\n  alpha - wrong form\n")
