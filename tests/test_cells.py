"""Pure tests of cell analysis: what a cell reads, assigns, deletes and imports."""

from __future__ import annotations

import builtins
import collections
import dataclasses
import functools
import os

import pytest

from kt_jupyter.cells import CellAnalysis, ImportSource, analyze_cell, classify_value, filter_pushable


def reads(source: str) -> set[str]:
    """The cell's reads, minus the ``get_ipython`` that IPython syntax turns into."""
    return set(analyze_cell(source).reads) - {"get_ipython"}


# (source, reads, assigns)
CASES = {
    # assignments
    "plain read": ("y = f(x)", {"f", "x"}, ("y",)),
    "bound before use": ("x = 1\nprint(x)", {"print"}, ("x",)),
    "read before bound": ("print(x)\nx = 1", {"print", "x"}, ("x",)),
    "self reference": ("x = x + 1", {"x"}, ("x",)),
    "augmented": ("x += 1", {"x"}, ("x",)),
    "augmented after bind": ("x = 0\nx += step", {"step"}, ("x",)),
    "augmented subscript": ("a[i] += v", {"a", "i", "v"}, ()),
    "attribute and subscript targets": ("obj.attr = 1\nd[k] = v", {"obj", "d", "k", "v"}, ()),
    "unpacking": ("a, (b, *c) = t", {"t"}, ("a", "b", "c")),
    "chained list target": ("[p, q] = r = s", {"s"}, ("p", "q", "r")),
    "annotated with value": ("n: int = m", {"int", "m"}, ("n",)),
    "annotated without value": ("n: int", {"int"}, ()),
    "global at module level": ("global g\ng = 1", set(), ("g",)),
    "dedup in first-binding order": ("b = 1\na = 2\nb = 3", set(), ("b", "a")),
    "f-string": ("msg = f'{name!r}: {value:{width}}'", {"name", "value", "width"}, ("msg",)),
    "top-level await": ("r = await fetch(u)", {"fetch", "u"}, ("r",)),
    # loops and with
    "for targets": ("for i, x in enumerate(xs):\n    total = i", {"enumerate", "xs"}, ("i", "x", "total")),
    "loop variable after loop": ("for i in r:\n    pass\nprint(i)", {"r", "print", "i"}, ("i",)),
    "while": ("while x < 10:\n    x += 1", {"x"}, ("x",)),
    "with as": (
        "with open(p) as fh:\n    data = fh.read()\nprint(data)",
        {"open", "p", "print"}, ("fh", "data"),
    ),
    "async with and for": (
        "async with lock as held:\n    async for item in stream:\n        last = item",
        {"lock", "stream"}, ("held", "item", "last"),
    ),
    # walrus
    "walrus": ("if (n := len(xs)) > 3:\n    print(n)", {"len", "xs", "print"}, ("n",)),
    "walrus in comprehension": ("[y := v * 2 for v in vals]\nprint(y)", {"vals", "print", "y"}, ("y",)),
    "walrus accumulator": ("total = 0\n[total := total + v for v in vals]", {"vals"}, ("total",)),
    "walrus accumulator unbound": ("[total := total + v for v in vals]", {"vals", "total"}, ("total",)),
    "walrus in or": ("ok = a or (b := 2)\nprint(b)", {"a", "print", "b"}, ("b", "ok")),
    "walrus in both if-expression arms": (
        "v = (t := 1) if c else (t := 2)\nprint(t)",
        {"c", "print"}, ("t", "v"),
    ),
    # comprehensions
    "comprehension variables": (
        "squares = [i * i for i in range(n) if i % k]",
        {"range", "n", "k"}, ("squares",),
    ),
    "nested comprehension": ("pairs = {(a, b) for a in xs for b in ys if a != b}", {"xs", "ys"}, ("pairs",)),
    "dict comprehension and generator": (
        "d = {k: v for k, v in items}\ns = sum(x for x in d)", {"items", "sum"}, ("d", "s"),
    ),
    "comprehension sees earlier binding": ("n = 3\nsq = [i + n for i in range(n)]", {"range"}, ("n", "sq")),
    "comprehension in function": ("def f(xs):\n    return [x + off for x in xs]", {"off"}, ("f",)),
    # functions
    "function body": ("def f(a, b=dflt):\n    return a + g(b)", {"dflt", "g"}, ("f",)),
    "function global bound before def": ("g = 1\ndef f():\n    return g", set(), ("g", "f")),
    "function global bound after def": ("def f():\n    return g\ng = 1", {"g"}, ("f", "g")),
    "recursion": ("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)", set(), ("fact",)),
    "parameters and locals": (
        "def f(x, /, *args, y, **kw):\n    z = x\n    return z, args, y, kw",
        set(), ("f",),
    ),
    "decorator and annotations": ("@cache\ndef f(x: Arr, *, k: Kt = kd) -> Ret:\n    pass",
                                  {"cache", "Arr", "Kt", "kd", "Ret"}, ("f",)),
    "async def": ("async def go():\n    return await thing()", {"thing"}, ("go",)),
    "lambda": ("f = lambda x, y=d: x + y + z", {"d", "z"}, ("f",)),
    "lambda recursion": ("fib = lambda n: n if n < 2 else fib(n - 1) + fib(n - 2)", set(), ("fib",)),
    "lambda as argument": ("out = sorted(xs, key=lambda v: v[col])", {"sorted", "xs", "col"}, ("out",)),
    "closure": (
        "def outer():\n    v = 1\n    def inner():\n        return v + w\n    return inner",
        {"w"}, ("outer",),
    ),
    "nonlocal": ("def outer():\n    count = 0\n    def inc():\n        nonlocal count\n        count += 1\n"
                 "    return inc", set(), ("outer",)),
    "global read in function": ("def f():\n    global g\n    return g", {"g"}, ("f",)),
    "global bound by function": ("def setup():\n    global cfg\n    cfg = load()", {"load"}, ("setup", "cfg")),
    "global bound by function, read later": (
        "def f():\n    global g\n    g = 1\nf()\nprint(g)", {"print", "g"}, ("f", "g"),
    ),
    "global bound by nested function": (
        "def f():\n    def g():\n        global h\n        h += 1\n    return g", {"h"}, ("f", "h"),
    ),
    # classes
    "class body": (
        "class A(Base, metaclass=Meta):\n    x = 1\n    y = x + z\n    def m(self):\n        return A, w, x",
        {"Base", "Meta", "z", "w", "x"}, ("A",),
    ),
    "class body reads before binding": ("class A:\n    x = x", {"x"}, ("A",)),
    "class comprehension skips class scope": (
        "class A:\n    n = 3\n    xs = [n for _ in range(n)]", {"range", "n"}, ("A",),
    ),
    "class global": ("class A:\n    global g\n    g = 1", set(), ("g", "A")),
    "class decorator and annotation": ("@dataclass\nclass P:\n    x: int = 0", {"dataclass", "int"}, ("P",)),
    "super in method": (
        "class B(A):\n    def __init__(self):\n        super().__init__()",
        {"A", "super"}, ("B",),
    ),
    "nested class": ("class A:\n    k = 1\n    class B:\n        j = k", {"k"}, ("A",)),
    # try, if, match
    "try except as": (
        "try:\n    v = risky()\nexcept (KeyError, ValueError) as err:\n    print(err)\n    v = None\nprint(v)",
        {"risky", "KeyError", "ValueError", "print"}, ("v", "err"),
    ),
    "handler reads what the body may not have bound": (
        "try:\n    v = risky()\nexcept Exception:\n    print(v)", {"risky", "Exception", "print", "v"}, ("v",),
    ),
    "except name unbound afterwards": (
        "try:\n    pass\nexcept E as e:\n    pass\nprint(e)",
        {"E", "print", "e"}, ("e",),
    ),
    "try finally": ("try:\n    x = f()\nfinally:\n    y = 2\nprint(x, y)", {"f", "print"}, ("x", "y")),
    "try import fallback": (
        "try:\n    import ujson as json\nexcept ImportError:\n    json = None\njson.dumps(1)",
        {"ImportError"}, ("json",),
    ),
    "if both branches bind": ("if c:\n    x = 1\nelse:\n    x = 2\nprint(x)", {"c", "print"}, ("x",)),
    "if one branch binds": ("if c:\n    x = 1\nprint(x)", {"c", "print", "x"}, ("x",)),
    "else branch raises": (
        "if c:\n    x = 1\nelse:\n    raise ValueError\nprint(x)",
        {"c", "ValueError", "print"}, ("x",),
    ),
    "match captures": (
        "match cmd:\n    case Point(x=0, y=yy):\n        pass\n    case [first, *rest]:\n        pass\n"
        "    case {'k': val, **extra}:\n        pass\n    case Color.RED | Color.BLUE:\n        pass\n"
        "    case str() as s if s:\n        pass",
        {"cmd", "Point", "Color", "str"}, ("yy", "first", "rest", "val", "extra", "s"),
    ),
    "match capture without catch-all": (
        "match p:\n    case [a]:\n        pass\nprint(a)",
        {"p", "print", "a"}, ("a",),
    ),
    "match capture with catch-all": (
        "match p:\n    case [a]:\n        pass\n    case a:\n        pass\nprint(a)", {"p", "print"}, ("a",),
    ),
    # imports and del
    "imports": ("import numpy as np\nimport os.path\nfrom collections import OrderedDict as OD, deque",
                set(), ("np", "os", "OD", "deque")),
    "del": ("del x", {"x"}, ()),
    "del after bind": ("x = 1\ndel x", set(), ()),
    "del subscript and attribute": ("del d[k], o.a", {"d", "k", "o"}, ()),
    # IPython syntax
    "shell capture": ("x = !ls {folder}\nprint(x)", {"folder", "print"}, ("x",)),
    "shell dollar expansion": ("!echo $HOME $$literal", {"HOME"}, ()),
    "line magic code": ("%time y = f(x)", {"f", "x"}, ("y",)),
    "cell magic code": ("%%time\ny = f(x)\nz = y", {"f", "x"}, ("y", "z")),
    "timeit only reads": ("%timeit -n 10 -r 3 g(q)", {"g", "q"}, ()),
    "cell timeit setup": ("%%timeit -n 3 s = mk()\nuse(s)", {"mk", "use"}, ()),
    "capture output name": ("%%capture out --no-stderr\nprint(v)", {"print", "v"}, ("out",)),
    "help suffix": ("obj?", {"obj"}, ()),
    "help prefix": ("??obj.attr", {"obj"}, ()),
    "other line magic": ("%matplotlib inline\nplt.plot(xs)", {"plt", "xs"}, ()),
    "magic argument expansion": ("%cd {path}", {"path"}, ()),
    "bash body is not expanded": ("%%bash\necho $x {y}", set(), ()),
    "cell magic line is expanded": ("%%writefile {fname}\ncontent", {"fname"}, ()),
    "classic prompts": (">>> a = 1\n>>> a + b", {"b"}, ("a",)),
    "indented cell": ("    a = b\n    c = a", {"b"}, ("a", "c")),
}


@pytest.mark.parametrize("source, expected_reads, expected_assigns", CASES.values(), ids=CASES.keys())
def test_reads_and_assigns(source, expected_reads, expected_assigns):
    analysis = analyze_cell(source)
    assert reads(source) == expected_reads
    assert analysis.assigns == expected_assigns


@pytest.mark.parametrize(
    "source, deletes, assigns",
    [
        ("x = 1\ndel x", ("x",), ()),
        ("del x\nx = 2", (), ("x",)),
        ("x = f()\nif bad:\n    del x", ("x",), ("x",)),
        ("del a, b\na = 1", ("b",), ("a",)),
        ("a = b = 1\ndel b, a", ("b", "a"), ()),
        ("for i in r:\n    del cache[i]", (), ("i",)),
        ("class A:\n    t = 1\n    del t", (), ("A",)),
        ("def f():\n    global g\n    del g", (), ("f", "g")),
    ],
)
def test_deletes(source, deletes, assigns):
    analysis = analyze_cell(source)
    assert analysis.deletes == deletes
    assert analysis.assigns == assigns


@pytest.mark.parametrize(
    "source, name, source_of, statement",
    [
        ("import numpy as np", "np", ImportSource("numpy", None, "np"), "import numpy as np"),
        ("import a.b.c", "a", ImportSource("a.b.c"), "import a.b.c"),
        ("import a.b.c as d", "d", ImportSource("a.b.c", None, "d"), "import a.b.c as d"),
        ("from os import path", "path", ImportSource("os", "path"), "from os import path"),
        ("from os import path as p", "p", ImportSource("os", "path", "p"), "from os import path as p"),
        ("from .. import sib", "sib", ImportSource("..", "sib"), "from .. import sib"),
        ("from .pkg import m", "m", ImportSource(".pkg", "m"), "from .pkg import m"),
        ("import json\nimport ujson as json", "json",
         ImportSource("ujson", None, "json"), "import ujson as json"),
        ("if fast:\n    import orjson as js", "js", ImportSource("orjson", None, "js"), "import orjson as js"),
    ],
)
def test_imports(source, name, source_of, statement):
    analysis = analyze_cell(source)
    assert analysis.imports[name] == source_of
    assert analysis.imports[name].statement == statement
    assert name in analysis.assigns


@pytest.mark.parametrize(
    "source", ["import os.path", "from os import path as p", "import collections.abc as cabc"],
)
def test_import_statement_recreates_the_binding(source):
    (name, imported), = analyze_cell(source).imports.items()
    original: dict = {}
    again: dict = {}
    exec(source, original)
    exec(imported.statement, again)
    assert again[name] is original[name]


@pytest.mark.parametrize(
    "source", ["def f():\n    import json", "class A:\n    import json", "x = 1"],
)
def test_only_top_level_imports_are_recorded(source):
    assert dict(analyze_cell(source).imports) == {}


def test_star_import():
    analysis = analyze_cell("from os.path import *\nx = join('a', 'b')")
    assert analysis.star_import
    assert analysis.assigns == ("x",)
    assert analysis.reads == {"join"}
    assert not analyze_cell("from os import path").star_import


@pytest.mark.parametrize(
    "source, shown",
    [
        ("1 + 1", True),
        ("x = 1", False),
        ("x = 1\nx", True),
        ("x;", False),
        ("x  ;  # quiet\n", False),
        ("f(x)\n# trailing comment\n\n", True),
        ("print(1); 2", True),
        ("", False),
        ("# only a comment", False),
        ("if c:\n    x", False),
        ("x = !ls", False),
        ("%ls", True),
        ("df.head()", True),
    ],
)
def test_last_expr(source, shown):
    assert analyze_cell(source).last_expr is shown


@pytest.mark.parametrize(
    "source, lineno, message",
    [
        ("a = 1\nb = 2\nc = = 3", 3, "invalid syntax"),
        ("%matplotlib inline\n!ls\nc = = 3", 3, "invalid syntax"),
        ("x = (1,\n", 1, "never closed"),
        ("x = 1\nreturn x", 2, "outside function"),
        ("nonlocal x", 1, "nonlocal"),
        ("def f():\n    x = 1\n    global x", 3, "assigned to before global"),
        ("class A:\n    ys = [(y := i) for i in range(3)]", 2, "class body"),
    ],
)
def test_syntax_errors_propagate_with_cell_line_numbers(source, lineno, message):
    with pytest.raises(SyntaxError, match=message) as info:
        analyze_cell(source)
    assert info.value.lineno == lineno


def test_analysis_is_frozen():
    analysis = analyze_cell("import os\nx = 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        analysis.reads = frozenset()  # type: ignore[misc]
    with pytest.raises(TypeError):
        analysis.imports["y"] = ImportSource("y")  # type: ignore[index]
    assert CellAnalysis() == CellAnalysis(frozenset(), (), (), {}, False, False)


def test_filter_pushable_drops_ipython_names_and_builtins():
    def my_len(x):
        return 0

    namespace = {
        "x": 1, "_private": 2, "len": my_len, "print": builtins.print,
        "_": 5, "__": 4, "___": 3, "_i": "", "_ii": "", "_iii": "", "_i3": "x = 1", "_7": 7,
        "In": [], "Out": {}, "get_ipython": print, "exit": None, "quit": None,
        "_oh": {}, "_dh": [], "_ih": [], "_exit_code": 0,
        "__builtins__": builtins, "__name__": "__main__", "__doc__": None,
    }
    assert filter_pushable(set(namespace) | {"missing", "range"}, namespace) == ["_private", "len", "x"]


def test_filter_pushable_on_an_analysed_cell():
    cell = "model = fit(data, epochs=3)\nprint(model.score)\nrows = [r for r in table if r > cut]"
    namespace = {"fit": len, "data": [1], "model": "stale", "table": [], "cut": 0, "unused": 1}
    assert filter_pushable(analyze_cell(cell).reads, namespace) == ["cut", "data", "fit", "table"]


def _defined_in(source: str, name: str, module: str = "__main__") -> object:
    namespace: dict = {"__name__": module}
    exec(source, namespace)
    return namespace[name]


@pytest.mark.parametrize(
    "value, kind",
    [
        (os, "module"),
        (os.path, "module"),
        (_defined_in("def f():\n    return 1", "f"), "function"),
        (_defined_in("f = lambda: 1", "f"), "function"),
        (_defined_in("def f():\n    return 1", "f", module="not_an_imported_module"), "function"),
        (_defined_in("class A:\n    pass", "A"), "class"),
        (os.path.join, "value"),
        (len, "value"),
        (collections.OrderedDict, "value"),
        (functools.partial(print, 1), "value"),
        (3, "value"),
        ([1, 2], "value"),
    ],
)
def test_classify_value(value, kind):
    assert classify_value(value) == kind


@pytest.mark.parametrize("line,magic", [
    ("ls -la", True),  # a line magic or alias without %, as IPython runs a one-line cell
    ("ls", True),
    ("x = 1", False),  # an assignment: x is a variable then, whatever magics exist
    ("pass", False),  # a keyword, a builtin: never a magic (IPython's prefilter says the same)
    ("len(x)", False),
    ("ls == 2", True),  # a comparison is not an assignment
])
def test_a_one_line_cell_is_a_magic_only_as_ipython_would_run_it(line, magic):
    names = {"ls", "x", "pass", "len"}  # as if the running IPython had magics of these names
    analysis = analyze_cell(f"# %%kt\n{line}", line_magics=names)
    assert ("get_ipython" in analysis.reads) is magic, line
