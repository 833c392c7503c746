"""The rules every test module keeps, checked so that they stay kept.

- No module of the suite imports a test module: what two test modules share is
  in conftest.py (or, for the test bed, cluster_helpers.py and testbed_env.py).
- Every ``pytest.raises`` and ``pytest.warns`` says which message it expects
  (``match=``): an error of the right type with the wrong message is a bug.
"""

import ast
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = sorted(name for name in os.listdir(HERE) if name.endswith(".py"))  # helpers too
TEST_MODULES = [name for name in MODULES if name.startswith("test_")]


def parse(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=name)


def imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def raises_without_match(tree):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("raises", "warns")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest"
                and not any(keyword.arg == "match" for keyword in node.keywords)):
            yield node.lineno, node.func.attr


def test_no_test_module_imports_another():
    assert "test_suite_rules.py" in TEST_MODULES and len(TEST_MODULES) > 20, TEST_MODULES
    found = [f"{name}:{line}: {module}" for name in MODULES
             for line, module in imported_modules(parse(name))
             if module.split(".")[0].startswith("test_")]
    assert found == [], "test modules import test modules (move what they share to conftest.py):\n" + (
        "\n".join(found))


def test_every_raises_names_its_message():
    found = [f"{name}:{line}: pytest.{what}(...)" for name in MODULES
             for line, what in raises_without_match(parse(name))]
    assert found == [], "add match= with the message a user would see:\n" + "\n".join(found)


def test_the_checks_catch_what_they_look_for():
    """Each check finds a breach in a module written to break it."""
    bad = ast.parse("import test_records\nfrom test_status import Workspace\n"
                    "import pytest\nwith pytest.raises(ValueError):\n    pass\n"
                    "with pytest.warns(UserWarning, match='kept'):\n    pass\n")
    assert [m for _, m in imported_modules(bad) if m.startswith("test_")] == [
        "test_records", "test_status"]
    assert list(raises_without_match(bad)) == [(4, "raises")]
