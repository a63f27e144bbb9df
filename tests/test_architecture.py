"""The map is true: docs/architecture.md against the imports of the code.

Every import in ``isl_core`` and ``data_download`` is read from the source (``ast``), wherever it stands: at the top,
inside a function (a lazy import) or under ``if TYPE_CHECKING``. The floors come from the one place that declares
them, the module table of docs/architecture.md; this test checks that no import runs from a floor to a higher one,
that no two modules import each other however indirectly, that every module has its one line there, that the
README's layout names only modules that exist and every one of them, and that no module outgrows about 450 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("isl_core", "data_download")
MAX_LINES = 450
LINE_EXCEPTIONS: dict[str, int] = {}  # a module allowed past MAX_LINES for a while, with the reason beside it
# a table row of docs/architecture.md: | `module` | N floor name | what it holds |
ROW = re.compile(r"^\| `([\w/.]+)` \| (\d+) ([^|]+?) \| (.+) \|$", re.M)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages (a package is its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the two packages that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the module mod; `from mod import name` imports mod
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # `import a.b.c` of a module a.b: the module a.b
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _documented() -> dict[str, tuple[int, str]]:
    """Dotted module name -> (floor number, floor name), from docs/architecture.md's module table, in row order."""
    rows = ROW.findall((REPO / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert rows, "docs/architecture.md: no module table"
    floors = {}
    for module, number, floor, _ in rows:
        dotted = ("isl_core." + module.removesuffix(".py").replace("/", ".")).removesuffix(".__init__")
        if module == "data_download/":
            dotted = "data_download"
        assert dotted not in floors, f"docs/architecture.md: {module} has two lines"
        floors[dotted] = (int(number), floor.strip())
    return floors


def _floor(module: str, floors: dict[str, tuple[int, str]]) -> tuple[int, str]:
    return floors["data_download"] if module.split(".")[0] == "data_download" else floors[module]


def test_every_module_has_one_line_and_every_line_a_module():
    floors, modules = _documented(), set(_modules())
    isl_core = {m for m in modules if m.split(".")[0] == "isl_core"}
    assert sorted(isl_core - set(floors)) == [], "modules without a line in docs/architecture.md"
    assert sorted(set(floors) - isl_core - {"data_download"}) == [], "lines for modules that do not exist"
    names = {}
    for number, name in floors.values():  # one name per floor number
        assert names.setdefault(number, name) == name, f"floor {number} is called {names[number]!r} and {name!r}"


def test_no_import_runs_up_a_floor_or_down_the_table():
    floors, graph = _documented(), _graph()
    upward = [f"{a} (floor {_floor(a, floors)[0]}) imports {b} (floor {_floor(b, floors)[0]})"
              for a, targets in sorted(graph.items()) for b in sorted(targets) if _floor(b, floors) > _floor(a, floors)]
    assert upward == []
    # within a floor the rows are in import order too: a module imports only modules on rows above its own
    row = {m: i for i, m in enumerate(floors)}
    later = [f"{a} imports {b}, a row below it" for a, targets in sorted(graph.items()) for b in sorted(targets)
             if a.split(".")[0] == b.split(".")[0] == "isl_core" and row[b] > row[a]]
    assert later == []


def test_no_import_cycles_not_even_lazy_ones():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_import_reader_sees_lazy_and_type_checking_imports(tmp_path):
    """The checks above are only as good as the reader: it must see every kind of import."""
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n"
            "def f():\n    import pkg.c.d\n    from pkg import e\n    from . import b\n")
    path = tmp_path / "a.py"
    path.write_text(code)
    modules = {m: tmp_path for m in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.e")}
    assert _imports("pkg.a", path, modules) == {"pkg.b", "pkg.c", "pkg.e"}


def test_no_module_outgrows_the_limit():
    too_long = {}
    for path in _modules().values():
        rel = path.relative_to(REPO).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > LINE_EXCEPTIONS.get(rel, MAX_LINES):
            too_long[rel] = lines
    assert too_long == {}


def test_readme_layout_names_the_modules_that_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## What is where", 1)[1].split("```")[1]
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    files = {p.name for p in (REPO / "isl_core").glob("*.py") if p.name != "__init__.py"}
    assert sorted(named - files) == [], "the README's layout names modules that do not exist"
    assert sorted(files - named) == [], "modules the README's layout leaves out"
    assert "viz/" in layout
