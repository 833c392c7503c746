"""Tests of the built-in TOML reader used on Python < 3.11 when tomli is missing.

Documents are compared with ``tomllib.loads`` where it exists (3.11+) and with
written-out results everywhere, so the reader is also checked on 3.9.
Results are compared through ``repr`` so that 1, 1.0 and True differ, nan
equals nan, and key order counts.
"""

import datetime
import math
import random
import re

import pytest

from lxm3 import TOMLDecodeError
from lxm3 import _toml_loads_fallback as toml_loads

try:
    import tomllib  # novermin (guarded: Python 3.11+)
except ImportError:  # Python < 3.11
    tomllib = None

needs_tomllib = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11+")

LXM3_CONFIG = """\
project = "myproj"             # comment
[local]
[local.storage]
staging = ".cache/lxm"
[local.env]
FOO = "bar"
[[clusters]]
name = "mycluster"
server = "login.hpc.example"
user = "alice"
ssh_private_key = "~/.ssh/id_ed25519"
[clusters.storage]
staging = "/home/alice/lxm3-staging"
[clusters.env]
WANDB_API_KEY = "..."
[[clusters.singularity.binds]]
src = "/scratch"
dest = "/scratch"
"""

LXM3_CONFIG_RESULT = {
    "project": "myproj",
    "local": {"storage": {"staging": ".cache/lxm"}, "env": {"FOO": "bar"}},
    "clusters": [
        {
            "name": "mycluster",
            "server": "login.hpc.example",
            "user": "alice",
            "ssh_private_key": "~/.ssh/id_ed25519",
            "storage": {"staging": "/home/alice/lxm3-staging"},
            "env": {"WANDB_API_KEY": "..."},
            "singularity": {"binds": [{"src": "/scratch", "dest": "/scratch"}]},
        }
    ],
}

# (name, document, expected result)
CASES = [
    ("lxm3-config", LXM3_CONFIG, LXM3_CONFIG_RESULT),
    ("empty", "", {}),
    ("only-comments", "# a\n   # b\n\n\t\n", {}),
    ("crlf", 'a = 1\r\n[t]\r\nb = "x" # c\r\n', {"a": 1, "t": {"b": "x"}}),
    ("no-final-newline", "a = 1", {"a": 1}),
    ("comment-no-newline", "a = 1 # end", {"a": 1}),
    ("blanks", ' \t a \t = \t "b" \t # c\n', {"a": "b"}),
    (
        "bare-keys",
        "A-b_9 = 1\n1234 = 2\n-_- = 3\ntrue = 4\n",
        {"A-b_9": 1, "1234": 2, "-_-": 3, "true": 4},
    ),
    (
        "quoted-keys",
        '"a b" = 1\n\'c"d\' = 2\n"" = 3\n"\\u00e9\\t" = 4\n\'\\n\' = 5\n',
        {"a b": 1, 'c"d': 2, "": 3, "\u00e9\t": 4, "\\n": 5},
    ),
    (
        "dotted-keys",
        'a.b.c = 1\na . "b" . d = 2\n\'x.y\'.z = 3\n3.14 = "pi"\n',
        {"a": {"b": {"c": 1, "d": 2}}, "x.y": {"z": 3}, "3": {"14": "pi"}},
    ),
    (
        "dotted-keys-in-table",
        "[fruit]\napple.color = 'red'\napple.taste.sweet = true\n[fruit.apple.texture]\nsmooth = true\n",
        {
            "fruit": {
                "apple": {"color": "red", "taste": {"sweet": True}, "texture": {"smooth": True}}
            }
        },
    ),
    (
        "tables",
        "[a]\nx = 1\n[ b . 'c' ]\ny = 2\n[\"d e\".f] # c\n",
        {"a": {"x": 1}, "b": {"c": {"y": 2}}, "d e": {"f": {}}},
    ),
    (
        "super-table-after-sub-table",
        "[a.b.c]\nx = 1\n[a]\ny = 2\n",
        {"a": {"b": {"c": {"x": 1}}, "y": 2}},
    ),
    (
        "dotted-key-into-implicit-table",
        "[a.b.c]\n[a]\nb.d = 1\n",
        {"a": {"b": {"c": {}, "d": 1}}},
    ),
    (
        "array-of-tables",
        '[[p]]\nn = "a"\n[[p]]\n[[p]]\nn = "c"\n',
        {"p": [{"n": "a"}, {}, {"n": "c"}]},
    ),
    (
        "sub-tables-of-array-elements",
        "[[f]]\nn = 1\n[f.p]\nc = 'r'\n[[f.v]]\nn = 2\n[[f.v]]\nn = 3\n[[f]]\nn = 4\n[f.p]\nc = 'y'\n[[f.v]]\nn = 5\n",
        {
            "f": [
                {"n": 1, "p": {"c": "r"}, "v": [{"n": 2}, {"n": 3}]},
                {"n": 4, "p": {"c": "y"}, "v": [{"n": 5}]},
            ]
        },
    ),
    (
        "dotted-key-in-array-element",
        "[[a]]\nb.c = 1\n[[a]]\nb.c = 2\n",
        {"a": [{"b": {"c": 1}}, {"b": {"c": 2}}]},
    ),
    (
        "basic-string-escapes",
        r'a = "\b\t\n\f\r\"\\ \u00e9 \U0001F600 \u0000"' + "\n",
        {"a": '\b\t\n\f\r"\\ \u00e9 \U0001f600 \x00'},
    ),
    ("basic-string-tab-and-hash", 'a = "x\ty # not a comment"\n', {"a": "x\ty # not a comment"}),
    ("literal-string", r"a = 'C:\Users\n \"x\"'" + "\n", {"a": r"C:\Users\n \"x\""}),
    (
        "empty-strings",
        "a = \"\"\nb = ''\nc = \"\"\"\"\"\"\nd = ''''''\n",
        {"a": "", "b": "", "c": "", "d": ""},
    ),
    (
        "multiline-basic",
        'a = """\nline 1\n  line 2\\tx\n"""\nb = """one\ntwo"""\n',
        {"a": "line 1\n  line 2\tx\n", "b": "one\ntwo"},
    ),
    (
        "multiline-basic-line-ending-backslash",
        'a = """\\\n    The quick \\\n\n    brown \\   \n  fox."""\nb = """x\\\n"""\n',
        {"a": "The quick brown fox.", "b": "x"},
    ),
    (
        "multiline-basic-quotes-inside",
        'a = """Here are two quotes: "". Simple."""\nb = """"x""""\nc = """"This," she said, "is just a pointless statement.""""\n',
        {
            "a": 'Here are two quotes: "". Simple.',
            "b": '"x"',
            "c": '"This," she said, "is just a pointless statement."',
        },
    ),
    ("multiline-basic-crlf", 'a = """\r\nx\r\ny\\\r\n   z"""\r\n', {"a": "x\nyz"}),
    (
        "multiline-literal",
        "a = '''\nThe first newline is\ntrimmed in raw strings.\n   \\n stays '' here\n'''\nb = ''''x'''''\n",
        {"a": "The first newline is\ntrimmed in raw strings.\n   \\n stays '' here\n", "b": "'x''"},
    ),
    (
        "integers",
        "a = 0\nb = +99\nc = -17\nd = 1_000_000\ne = 0xDEAD_beef\nf = 0o755\ng = 0b1101_0110\nh = -0\ni = 9223372036854775808\n",
        {
            "a": 0,
            "b": 99,
            "c": -17,
            "d": 1000000,
            "e": 0xDEADBEEF,
            "f": 0o755,
            "g": 0b11010110,
            "h": 0,
            "i": 2**63,
        },
    ),
    (
        "floats",
        "a = 3.1415\nb = -0.01\nc = 5e+22\nd = 1e06\ne = -2E-2\nf = 6.626e-34\ng = 224_617.445_991\nh = -0.0\ni = +1.5\nj = 1e1_0\n",
        {
            "a": 3.1415,
            "b": -0.01,
            "c": 5e22,
            "d": 1e6,
            "e": -2e-2,
            "f": 6.626e-34,
            "g": 224617.445991,
            "h": -0.0,
            "i": 1.5,
            "j": 1e10,
        },
    ),
    (
        "inf-nan",
        "a = inf\nb = +inf\nc = -inf\nd = nan\ne = +nan\nf = -nan\n",
        {"a": math.inf, "b": math.inf, "c": -math.inf, "d": math.nan, "e": math.nan, "f": math.nan},
    ),
    ("booleans", "a = true\nb = false\n", {"a": True, "b": False}),
    (
        "arrays",
        "a = []\nb = [ 1, 2, 3 ]\nc = ['x', \"y\", '''z''']\nd = [[1, 2], ['a'], []]\ne = [1, 'mixed', 2.5, true, [], {}]\n",
        {
            "a": [],
            "b": [1, 2, 3],
            "c": ["x", "y", "z"],
            "d": [[1, 2], ["a"], []],
            "e": [1, "mixed", 2.5, True, [], {}],
        },
    ),
    (
        "multiline-arrays",
        "a = [\n  1,  # one\n  # nothing\n  2,\n\n]\nb = [ # open\n]\nc = [\n  [ 1 ,\n 2 ] , [\n3],\n]\n",
        {"a": [1, 2], "b": [], "c": [[1, 2], [3]]},
    ),
    (
        "array-of-inline-tables",
        'p = [{x = 1}, {x = 2, y = "b"},]\n',
        {"p": [{"x": 1}, {"x": 2, "y": "b"}]},
    ),
    (
        "inline-tables",
        'a = {}\nb = { x = 1 , y = "two" }\nc = {a = 1, b.c = "x", b.d = [1, {e = {}}]}\nd = {"q k" = 1, \'l\'.m = 2}\n',
        {
            "a": {},
            "b": {"x": 1, "y": "two"},
            "c": {"a": 1, "b": {"c": "x", "d": [1, {"e": {}}]}},
            "d": {"q k": 1, "l": {"m": 2}},
        },
    ),
    ("inline-table-in-table", "[t]\nu = {v = 1}\n[t.w]\n", {"t": {"u": {"v": 1}, "w": {}}}),
    (
        "values-followed-by-comments",
        "a = 1#c\nb = 'x'#c\nc = [1]#c\nd = {x = 1}#c\ne = true#c\nf = 1.5 # c\n[t]#c\n[[u]]#c\n",
        {"a": 1, "b": "x", "c": [1], "d": {"x": 1}, "e": True, "f": 1.5, "t": {}, "u": [{}]},
    ),
    (
        "unicode",
        '"k\u00e9" = 1\n"\u2603" = "\u2603 \U0001f600"\n# \u00e9\u00e8 comment\n',
        {"k\u00e9": 1, "\u2603": "\u2603 \U0001f600"},
    ),
]

# Documents kept only for comparison with tomllib: corner cases whose result
# is easiest to state as "whatever tomllib gives".
TOMLLIB_ONLY = [
    'a = "\\u00E9\\U0010FFFF\\uD7FF\\uE000"\n',
    "a = [[[[[]]]]]\n",
    "a = [ 1 , [ 2 , [ 3 ] ] , ]\n",
    "x = 1\n[a]\n[a.b]\n[a.b.c]\n[a.d]\n[x2]\n",
    "[a]\nb.c.d = 1\n[a.b.c.e]\n",
    "[a.b]\n[a.c]\n[a]\nd = 1\n",
    "[[a.b]]\n[a]\nc = 1\n[[a.b]]\n",
    "[[a]]\n[[a.b]]\n[a.b.c]\n[[a.b]]\n[a.b.c]\n",
    'a = """\\\n"""\nb = """\\  \n  \n  \\\n  x"""\n',
    "a = '''''''\n",
    'a = """"""""\n',
    "a=1\nb=2.5e-3\nc=-1\n",
    "a = 0.0\nb = 0e0\nc = -0e-0\nd = 1_2.3_4e5_6\n",
    "a = 0xff\nb = 0o0\nc = 0b0\nd = 0x0_0\n",
    "a = inf\nb = [nan, -inf]\n",
    "a = {b = {c = {d = 1}}, e.f.g = 2}\n",
    "a = 'tab\there'\nb = '''tab\there'''\n",
    "'a'.'b'.\"c\" = 1\n'a'.b.d = 2\n",
]

# (name, document, 1-based line of the error)
ERRORS = [
    ("duplicate-key", "a = 1\nb = 2\na = 3\n", 3),
    ("duplicate-key-quoted", 'a = 1\n"a" = 2\n', 2),
    ("duplicate-key-after-multiline-value", "a = 1\na = [\n1,\n2]\n", 2),
    ("duplicate-key-in-table", "[t]\nx = 1\n\nx = 2\n", 4),
    ("duplicate-dotted-key", "a.b = 1\na.b = 2\n", 2),
    ("key-overwrites-table-from-dotted", "a.b = 1\na = 2\n", 2),
    ("dotted-key-extends-value", "a = 1\na.b = 2\n", 2),
    ("duplicate-inline-key", "a = {x = 1, x = 2}\n", 1),
    ("inline-extends-inline", "a = {b = {c = 1}, b.d = 2}\n", 1),
    ("table-defined-twice", "[a]\nx = 1\n[b]\n[a]\n", 4),
    ("sub-table-defined-twice", "[a.b]\n[a]\n[a.b]\n", 3),
    ("table-over-value", "a = 1\n[a]\n", 2),
    ("table-through-value", "a = 1\n[a.b]\n", 2),
    ("table-over-dotted-table", "a.b = 1\n[a]\n", 2),
    ("table-over-dotted-table-in-section", "[x]\na.b = 1\n[x.a]\n", 3),
    ("dotted-key-into-table", "[a.b]\nc = 1\n[a]\nb.d = 2\n", 4),
    ("dotted-key-into-dotted-table-later", "[a]\nb.c = 1\n[x]\n[a]\n", 4),
    ("table-over-inline-table", "a = {x = 1}\n[a]\n", 2),
    ("table-into-inline-table", "a = {x = 1}\n[a.y]\n", 2),
    ("dotted-key-into-inline-table", "a = {x = 1}\na.y = 2\n", 2),
    ("table-over-array-of-tables", "[[a]]\n[a]\n", 2),
    ("array-of-tables-over-table", "[a]\n[[a]]\n", 2),
    ("array-of-tables-over-array", "a = [1]\n[[a]]\n", 2),
    ("array-of-tables-over-value", "a = 1\n\n[[a]]\n", 3),
    ("table-into-static-array", "a = [{}]\n[a.b]\n", 2),
    ("dotted-key-into-array-of-tables", "[[a]]\n[x]\n[a]\n", 3),
    ("dotted-key-through-array", "[[a.b]]\n[a]\nb.c = 1\n", 3),
    ("missing-equals", "a = 1\nb 2\n", 2),
    ("missing-value", "a = 1\nb =\n", 2),
    ("missing-value-eof", "a =", 1),
    ("missing-key", "= 1\n", 1),
    ("invalid-bare-key", "a = 1\nk!y = 2\n", 2),
    ("key-with-space", "a b = 1\n", 1),
    ("multiline-string-key", 'a = 1\n"""k""" = 2\n', 2),
    ("junk-after-value", "a = 1\nb = 2 3\n", 2),
    ("junk-after-string", 'a = "x" y\n', 1),
    ("junk-after-table", "[a] x = 1\n", 1),
    ("two-statements", "a = 1 b = 2\n", 1),
    ("unterminated-basic", 'a = 1\nb = "abc\nc = 2\n', 2),
    ("unterminated-basic-eof", 'a = "abc', 1),
    ("unterminated-literal", "a = 1\nb = 'abc\n", 2),
    ("unterminated-multiline-basic", 'a = 1\nb = """abc\n\ndef\n', 2),
    ("unterminated-multiline-literal", "a = '''abc\n\ndef''\n", 1),
    ("unterminated-array", "a = [1, 2\n", 2),
    ("unterminated-inline-table", "a = {x = 1\n", 1),
    ("unterminated-header", "[a\nb = 1\n", 1),
    ("unterminated-array-header", "[[a]\n", 1),
    ("empty-header", "x = 1\n[]\n", 2),
    ("bad-escape", 'a = 1\nb = "\\x41"\n', 2),
    ("bad-escape-in-multiline", 'a = """\nok\n\\q"""\n', 3),
    ("short-unicode-escape", 'a = "\\u12"\n', 1),
    ("non-hex-unicode-escape", 'a = "\\u+123"\n', 1),
    ("surrogate-escape", 'a = "\\uD800"\n', 1),
    ("too-large-escape", 'a = "\\U00110000"\n', 1),
    ("backslash-space-not-at-line-end", 'a = """x\\ y"""\n', 1),
    ("control-char-in-string", 'a = "x\x01y"\n', 1),
    ("control-char-in-comment", "a = 1 # x\x7f\n", 1),
    ("bare-cr-in-string", 'a = """x\ry"""\n', 1),
    ("newline-in-inline-table", "a = {\nx = 1}\n", 1),
    ("trailing-comma-inline-table", "a = {x = 1,}\n", 1),
    ("missing-comma-array", "a = [1 2]\n", 1),
    ("double-comma-array", "a = [\n1,\n,2]\n", 3),
    ("leading-zero", "a = 01\n", 1),
    ("double-underscore", "a = 1__0\n", 1),
    ("trailing-underscore", "a = 1_\n", 1),
    ("trailing-dot", "a = 1.\n", 1),
    ("leading-dot", "a = .5\n", 1),
    ("dot-before-exponent", "a = 1.e5\n", 1),
    ("empty-exponent", "a = 1e\n", 1),
    ("signed-hex", "a = +0x10\n", 1),
    ("uppercase-hex-prefix", "a = 0X10\n", 1),
    ("empty-hex", "a = 0x\n", 1),
    ("bad-octal-digit", "a = 0o8\n", 1),
    ("uppercase-inf", "a = Inf\n", 1),
    ("uppercase-true", "a = True\n", 1),
    ("truex", "a = truex\n", 1),
    ("bare-word", "a = yes\n", 1),
    ("non-ascii-bare-key", "k\u00e9 = 1\n", 1),
    ("array-header-spaced", "[ [a]]\n", 1),
]

# Dates and times are rejected by design; tomllib reads them.
DATE_ERRORS = [
    ("date", "a = 1\nb = 1979-05-27\n", 2),
    ("datetime", "a = 1979-05-27T07:32:00Z\n", 1),
    ("local-time", "x = 1\n\nt = 07:32:00\n", 3),
    ("date-in-array", "a = [\n1979-05-27,\n]\n", 2),
]


def _names(cases):
    return [case[0] for case in cases]


@pytest.mark.parametrize("name, document, expected", CASES, ids=_names(CASES))
def test_expected_result(name, document, expected):
    assert repr(toml_loads(document)) == repr(expected)


@needs_tomllib
@pytest.mark.parametrize("name, document, expected", CASES, ids=_names(CASES))
def test_same_as_tomllib(name, document, expected):
    assert repr(toml_loads(document)) == repr(tomllib.loads(document))


@needs_tomllib
@pytest.mark.parametrize("document", TOMLLIB_ONLY)
def test_corner_cases_same_as_tomllib(document):
    assert repr(toml_loads(document)) == repr(tomllib.loads(document))


def test_result_is_fresh_and_mutable():
    first = toml_loads(LXM3_CONFIG)
    first["clusters"][0]["env"]["X"] = "y"
    assert toml_loads(LXM3_CONFIG) == LXM3_CONFIG_RESULT


@pytest.mark.parametrize(
    "name, document, line", ERRORS + DATE_ERRORS, ids=_names(ERRORS + DATE_ERRORS)
)
def test_error_names_line(name, document, line):
    with pytest.raises(TOMLDecodeError, match=rf"\(line {line}\)$") as info:
        toml_loads(document)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name, document, line", DATE_ERRORS, ids=_names(DATE_ERRORS))
def test_dates_point_to_tomli(name, document, line):
    with pytest.raises(
        TOMLDecodeError, match=r"not supported by the built-in reader; install tomli \(line \d+\)"
    ):
        toml_loads(document)


@needs_tomllib
@pytest.mark.parametrize("name, document, line", ERRORS, ids=_names(ERRORS))
def test_tomllib_rejects_error_cases_too(name, document, line):
    with pytest.raises(tomllib.TOMLDecodeError,
                       match=r"\((at )?(line \d+, column \d+|end of document)\)"):
        tomllib.loads(document)


@needs_tomllib
@pytest.mark.parametrize("name, document, line", DATE_ERRORS, ids=_names(DATE_ERRORS))
def test_tomllib_reads_dates(name, document, line):
    """What the built-in reader refuses is valid TOML: tomllib reads dates and times."""
    values = list(tomllib.loads(document).values())
    if isinstance(values[-1], list):
        values = values[-1]
    assert any(isinstance(v, (datetime.date, datetime.time)) for v in values), values


def _mutations(seed, count):
    """Yield small random edits of the corpus: the reader must agree with tomllib on each."""
    rng = random.Random(seed)
    documents = [case[1] for case in CASES] + TOMLLIB_ONLY + [case[1] for case in ERRORS]
    pieces = list("[]{}=.,#\"'\\ \n\t_+-0xe") + [
        '"""',
        "'''",
        "[[",
        "]]",
        "a",
        "1",
        "\\u",
        "inf",
        "true",
    ]
    for _ in range(count):
        document = rng.choice(documents)
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(document))
            action = rng.random()
            if action < 0.4:
                document = document[:at] + rng.choice(pieces) + document[at:]
            elif action < 0.8:
                document = document[:at] + document[at + rng.randint(1, 3) :]
            else:
                other = rng.choice(documents)
                start = rng.randint(0, len(other))
                document = document[:at] + other[start : start + rng.randint(1, 20)] + document[at:]
        yield document


_DATE_LIKE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{2}:[0-9]{2}")


@needs_tomllib
def test_random_edits_same_as_tomllib():
    for document in _mutations(seed=1234, count=5000):
        if _DATE_LIKE.search(document):
            continue
        try:
            expected = repr(tomllib.loads(document))
        except tomllib.TOMLDecodeError:
            expected = "error"
        try:
            actual = repr(toml_loads(document))
        except TOMLDecodeError as error:
            assert re.search(r"\(line \d+\)$", str(error))
            actual = "error"
        assert actual == expected, document
