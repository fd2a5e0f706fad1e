"""The planes of edgesplit as import rules that a machine checks (docs/ARCHITECTURE.md, "Layers").

Every module under ``edgesplit/`` is parsed (never imported): its imports at module level, inside
functions and under ``if TYPE_CHECKING:`` all count, relative imports resolved to the module they
name. An import of ``pkg.mod`` is an edge to ``pkg.mod`` (not to ``pkg``, whose ``__init__`` Python
runs too: counting it would make every package that re-exports its own submodules a cycle), and
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.

import-linter was considered: it has no contract for an allow-list of third-party packages, for
"no cycles anywhere" or for module length, so the rules are checked here, in one readable table.

Patterns in the table: ``x.y`` is that module only; ``x.y.**`` is ``x.y`` and everything under
it; ``x.y.*`` is a direct subpackage of ``x.y`` (its ``__init__`` only); ``stdlib`` is any module
of Python's standard library. A bare name (``torch``) stands for that top-level package and all
under it.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "edgesplit"
MAX_LINES = 400


@dataclass(frozen=True)
class Rule:
    tag: str
    says: str
    importers: tuple[str, ...]
    allowed: tuple[str, ...] | None = None  # when set: every import must match one of these
    forbidden: tuple[str, ...] = ()
    internal_only: bool = False  # the allow-list covers edgesplit modules only (third-party free)
    lazy_too: bool = True  # function-level imports count (they all do today; kept explicit)


TORCH = ("torch", "torchvision", "torchaudio")


def registered_manifest_checks(root: Path = PACKAGE_DIR) -> tuple[str, ...]:
    """The modules the families name as ``manifest_check`` or ``manifest_parse`` in their
    ``register_family`` call (read from each family's ``__init__``: a literal ``"module:attribute"``,
    or this table cannot know it)."""
    found = []
    for init in sorted((root / "families").glob("*/__init__.py")):
        for node in ast.walk(ast.parse(init.read_text(), str(init))):
            called = getattr(node, "func", None)
            if (
                not isinstance(node, ast.Call)
                or getattr(called, "id", getattr(called, "attr", "")) != "register_family"
            ):
                continue
            for kw in node.keywords:
                if kw.arg in ("manifest_check", "manifest_parse"):
                    if not (isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)):
                        raise ValueError(f"{init}: {kw.arg} must be a string literal (tests/test_layers.py reads it)")
                    found.append(kw.value.value.split(":")[0])
    return tuple(sorted(set(found)))


# The one families module a contract may import: a torch-free stdlib-only leaf (rule below) holding
# names, serving shapes and lazy "module:attribute" entry points, a family's manifest check included.
REGISTRY = "edgesplit.families.registry"
# Modules the registry loads for the contracts (a family's own manifest section): contract-level.
MANIFEST_CHECKS = registered_manifest_checks()
# The registry side of the families, a plane of its own (plane() below): torch-free, read on devices.
FAMILY_REGISTRY = ("edgesplit.families", REGISTRY, "edgesplit.families.*", *MANIFEST_CHECKS)
# Device profiles are data (stdlib + yaml, rule b2 below): a plane of their own, so the build plane
# may size models from them (ED-ViT's budgets) while profile's measuring tools import the build plane.
PROFILE_DATA = "edgesplit.profile.devices"
RULES = (
    Rule("a", "edge and server never import each other", ("edgesplit.edge.**",), forbidden=("edgesplit.server.**",)),
    Rule("a", "edge and server never import each other", ("edgesplit.server.**",), forbidden=("edgesplit.edge.**",)),
    Rule(
        "b",
        "control is numpy-only: the stdlib, numpy, yaml and itself",
        ("edgesplit.control.**",),
        allowed=("stdlib", "numpy", "yaml", "edgesplit.control.**"),
    ),
    Rule("b2", "device profiles are data: the stdlib and yaml only", (PROFILE_DATA,), allowed=("stdlib", "yaml")),
    Rule(
        "c",
        "the engine does not import the build plane",
        ("edgesplit.engine.**",),
        forbidden=("edgesplit.builder.**", "edgesplit.families.**"),
    ),
    Rule(
        "d",
        "contract wire imports only wire",
        ("edgesplit.wire.**",),
        allowed=("edgesplit.wire.**",),
        internal_only=True,
    ),
    Rule(
        "d",
        "contract bundle imports only wire and the torch-free family registry",
        ("edgesplit.bundle",),
        allowed=("edgesplit.wire.**", "edgesplit.bundle_schema", REGISTRY),
        internal_only=True,
    ),
    Rule(
        "d",
        "contract bundle's manifest schema imports only wire and the torch-free family registry",
        ("edgesplit.bundle_schema",),
        allowed=("edgesplit.wire.**", REGISTRY),
        internal_only=True,
    ),
    Rule(
        "d",
        "the family registry is a leaf the contracts may import: the stdlib and its package (to find families)",
        (REGISTRY,),
        allowed=("stdlib", "edgesplit.families"),
    ),
    Rule(
        "d",
        "a family's __init__ only registers it (discovery imports it on every device): the stdlib and the registry",
        ("edgesplit.families.*",),
        allowed=("stdlib", REGISTRY),
    ),
    Rule(
        "d",
        "a family's manifest check is contract-level (every bundle reader runs it): the stdlib and wire only",
        MANIFEST_CHECKS,
        allowed=("stdlib", "edgesplit.wire.**"),
    ),
    Rule(
        "d",
        "engine imports only engine, wire and bundle",
        ("edgesplit.engine.**",),
        allowed=("edgesplit.engine.**", "edgesplit.wire.**", "edgesplit.bundle"),
        internal_only=True,
    ),
    Rule("e", "edge imports no torch, not even lazily", ("edgesplit.edge.**",), forbidden=TORCH),
)


# -- the import graph ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name: an edgesplit module, or the third-party / stdlib name as written
    line: int
    lazy: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:``

    @property
    def internal(self) -> bool:
        return self.target == "edgesplit" or self.target.startswith("edgesplit.")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[Import]
    rel: str  # the path as the failure messages print it: edgesplit/x/y.py


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_names(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every .py under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def parse_imports(name: str, path: Path, is_package: bool, known: set[str]) -> list[Import]:
    """Every import statement in one module, with where it sits."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve_from(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, lazy: bool, tc: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, lazy, tc))
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(name, sub if sub in known else base, node.lineno, lazy, tc))
        for child in ast.iter_child_nodes(node):
            in_tc = tc or (isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body)
            visit(child, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), in_tc)

    visit(tree, False, False)
    # one edge per (target, line): ``from .x import a, b`` is one import of x
    return list(dict.fromkeys(found))


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, Module]:
    names = module_names(root)
    known = set(names)
    graph = {
        n: Module(n, p, pkg, parse_imports(n, p, pkg, known), str(p.relative_to(root.parent)))
        for n, (p, pkg) in names.items()
    }
    for m in graph.values():  # an internal name that is not a module (a stale import) resolves to its package
        m.imports = [
            i
            if not i.internal or i.target in known
            else Import(i.importer, _existing_prefix(i.target, known), i.line, i.lazy, i.type_checking)
            for i in m.imports
        ]
    return graph


def _existing_prefix(target: str, known: set[str]) -> str:
    parts = target.split(".")
    while len(parts) > 1 and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


# -- patterns and rules -------------------------------------------------------------------------
STDLIB = frozenset(sys.stdlib_module_names)


def matches(pattern: str, target: str, graph: dict[str, Module]) -> bool:
    if pattern == "stdlib":
        return target.split(".")[0] in STDLIB
    if pattern.endswith(".**"):
        base = pattern[:-3]
        return target == base or target.startswith(base + ".")
    if pattern.endswith(".*"):
        base = pattern[:-2]
        parent, _, leaf = target.rpartition(".")
        return parent == base and bool(leaf) and target in graph and graph[target].is_package
    if not pattern.startswith("edgesplit"):  # a third-party top-level package
        return target == pattern or target.startswith(pattern + ".")
    return target == pattern


def violations(rule: Rule, graph: dict[str, Module]) -> list[str]:
    out = []
    for m in graph.values():
        if not any(matches(p, m.name, graph) for p in rule.importers):
            continue
        for imp in m.imports:
            if imp.lazy and not rule.lazy_too:
                continue
            bad = any(matches(p, imp.target, graph) for p in rule.forbidden)
            if rule.allowed is not None and (imp.internal or not rule.internal_only):
                bad = bad or not any(matches(p, imp.target, graph) for p in rule.allowed)
            if bad:
                where = "function-level " if imp.lazy else ("TYPE_CHECKING " if imp.type_checking else "")
                out.append(f"{m.rel}:{imp.line}: rule ({rule.tag}) {rule.says}: {m.name} {where}imports {imp.target}")
    return out


def cycles(graph: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), by
    Tarjan's algorithm, iterative so a deep graph cannot hit the recursion limit."""
    edges = {n: sorted({i.target for i in m.imports if i.internal and i.target in graph}) for n, m in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recursed = False
            for j in range(i, len(edges[node])):
                nxt = edges[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recursed = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recursed:
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in edges[node]:
                    out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(out)


def plane(name: str, graph: dict[str, Module]) -> str | None:
    """The plane-sized unit a module belongs to: ``edgesplit.X`` for each top-level package or
    module, the build plane's two packages as one, the family registry on its own (the bundle
    contract consults it). None for the root package (``__version__`` only)."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    if name == PROFILE_DATA:
        return "edgesplit.profile[devices]"
    if parts[1] in ("builder", "families"):
        registry = any(matches(p, name, graph) for p in FAMILY_REGISTRY)
        return "edgesplit.families[registry]" if registry else "edgesplit.builder+families"
    return ".".join(parts[:2])


def plane_graph(graph: dict[str, Module]) -> dict[str, Module]:
    """The import graph with each module replaced by its plane (same Module shape, so
    :func:`cycles` and :func:`describe_cycle` run on it; ``imports`` keep the module's line)."""
    out: dict[str, Module] = {}
    for m in graph.values():
        src = plane(m.name, graph)
        if src is None:
            continue
        unit = out.setdefault(src, Module(src, m.path, True, [], src))
        for imp in m.imports:
            dst = plane(imp.target, graph) if imp.internal and imp.target in graph else None
            if dst is not None and dst != src:
                unit.imports.append(Import(f"{m.rel}:{imp.line} {m.name}", dst, imp.line, imp.lazy, imp.type_checking))
    return out


def describe_cycle(comp: list[str], graph: dict[str, Module], what: str = "modules") -> str:
    members = set(comp)
    lines = [f"import cycle (rule f) among {len(comp)} {what}: {', '.join(comp)}"]
    for n in comp:
        for imp in graph[n].imports:
            if what == "planes" and imp.target in members:
                lines.append(f"    {imp.importer} -> {imp.target}")
            elif imp.target in members:
                how = "function-level" if imp.lazy else ("TYPE_CHECKING" if imp.type_checking else "module-level")
                lines.append(f"    {graph[n].rel}:{imp.line}: {n} -> {imp.target} ({how})")
    return "\n".join(lines)


# -- the checks on edgesplit --------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, Module]:
    return import_graph()


@pytest.mark.parametrize("rule", RULES, ids=[f"{r.tag}-{r.importers[0]}" for r in RULES])
def test_layer_rule(rule, graph):
    assert any(matches(p, n, graph) for n in graph for p in rule.importers), (
        f"rule ({rule.tag}) checks nothing: no module matches {rule.importers} (renamed?)"
    )
    bad = violations(rule, graph)
    assert not bad, f"{len(bad)} layer violation(s):\n" + "\n".join(bad)


def test_edge_never_loads_torch_at_import_time(graph):
    """Rule (e) across modules: importing any edge module loads (through module-level imports of
    edgesplit modules, their parent packages included) nothing that imports torch."""
    bad = []
    for start in (n for n in graph if matches("edgesplit.edge.**", n, graph)):
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            n = todo.pop()
            for imp in graph[n].imports:
                if imp.lazy or imp.type_checking:
                    continue
                if imp.internal and imp.target in graph:
                    parts = imp.target.split(".")
                    for k in range(1, len(parts) + 1):  # Python runs each parent package's __init__ first
                        t = ".".join(parts[:k])
                        if t in graph and t not in seen:
                            seen.add(t)
                            via[t] = n
                            todo.append(t)
                elif any(matches(p, imp.target, graph) for p in TORCH):
                    chain, c = [], n
                    while c is not None:
                        chain.append(c)
                        c = via[c]
                    bad.append(
                        f"{graph[n].rel}:{imp.line}: rule (e) importing {start} loads torch: "
                        f"{' <- '.join(chain)} imports {imp.target}"
                    )
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(describe_cycle(c, graph) for c in found)


def test_no_import_cycles_between_planes(graph):
    """Rule (f) one level up: demo -> bench.serverproc and bench.e2e -> demo is no module cycle, but
    the two tools would still depend on each other."""
    planes = plane_graph(graph)
    found = cycles(planes)
    assert not found, f"{len(found)} cycle(s) between planes:\n" + "\n".join(
        describe_cycle(c, planes, "planes") for c in found
    )


def test_no_module_over_the_line_limit(graph):
    long = sorted((len(m.path.read_text().splitlines()), m.rel) for m in graph.values())
    over = [f"{path}: rule (g) {n} lines, over {MAX_LINES}" for n, path in long if n > MAX_LINES]
    assert not over, f"{len(over)} module(s) over {MAX_LINES} lines:\n" + "\n".join(over)


# -- the checker itself, on a package written here ----------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "edgesplit"


def test_checker_resolves_relative_lazy_and_type_checking_imports(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "edgesplit/__init__.py": "",
            "edgesplit/a/__init__.py": "from .one import f\n",
            "edgesplit/a/one.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import two\n",
            "edgesplit/a/three.py": "from . import one\nfrom .one import f, g\nimport numpy as np\n",
            "edgesplit/b/__init__.py": "",
            "edgesplit/b/two.py": "def run():\n    from ..a.one import f\n    import torch.nn\n",
        },
    )
    g = import_graph(pkg)
    got = {(i.importer, i.target, i.line, i.lazy, i.type_checking) for m in g.values() for i in m.imports}
    assert got == {
        ("edgesplit.a", "edgesplit.a.one", 1, False, False),
        ("edgesplit.a.one", "typing", 1, False, False),
        ("edgesplit.a.one", "edgesplit.b.two", 3, False, True),
        ("edgesplit.a.three", "edgesplit.a.one", 1, False, False),
        ("edgesplit.a.three", "edgesplit.a.one", 2, False, False),
        ("edgesplit.a.three", "numpy", 3, False, False),
        ("edgesplit.b.two", "edgesplit.a.one", 2, True, False),
        ("edgesplit.b.two", "torch.nn", 3, True, False),
    }
    assert cycles(g) == [["edgesplit.a.one", "edgesplit.b.two"]]  # TYPE_CHECKING one way, lazy the other
    msg = describe_cycle(cycles(g)[0], g)
    assert "edgesplit/b/two.py:2: edgesplit.b.two -> edgesplit.a.one (function-level)" in msg
    assert "edgesplit/a/one.py:3: edgesplit.a.one -> edgesplit.b.two (TYPE_CHECKING)" in msg


def test_checker_rules_name_module_line_and_rule(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "edgesplit/__init__.py": "",
            "edgesplit/control/__init__.py": "import json\nimport numpy\nfrom . import sim\n",
            "edgesplit/control/sim.py": "import yaml\n\ndef f():\n    import onnxruntime\n    from ..wire import codec\n",
            "edgesplit/wire/__init__.py": "",
            "edgesplit/wire/codec.py": "import zmq\nfrom ..families.bottlefit import x\n",
            "edgesplit/families/__init__.py": "",
            "edgesplit/families/bottlefit/__init__.py": "",
            "edgesplit/families/bottlefit/train.py": "",
            "edgesplit/bundle.py": "from .families import bottlefit\nfrom .families.bottlefit import train\n",
        },
    )
    g = import_graph(pkg)
    rule_b = next(r for r in RULES if r.tag == "b")
    assert violations(rule_b, g) == [
        "edgesplit/control/sim.py:4: rule (b) control is numpy-only: the stdlib, numpy, yaml and itself: "
        "edgesplit.control.sim function-level imports onnxruntime",
        "edgesplit/control/sim.py:5: rule (b) control is numpy-only: the stdlib, numpy, yaml and itself: "
        "edgesplit.control.sim function-level imports edgesplit.wire.codec",
    ]
    wire, bundle = (
        next(r for r in RULES if r.importers == (imp,)) for imp in ("edgesplit.wire.**", "edgesplit.bundle")
    )
    assert [v.split(": ")[-1] for v in violations(wire, g)] == [
        "edgesplit.wire.codec imports edgesplit.families.bottlefit"
    ]
    # a contract names no family, not even its registering __init__: it asks the registry
    assert [v.split(": ")[-1] for v in violations(bundle, g)] == [
        "edgesplit.bundle imports edgesplit.families.bottlefit",
        "edgesplit.bundle imports edgesplit.families.bottlefit.train",
    ]


def test_the_rule_table_reads_every_manifest_check():
    """The table's static reading of ``manifest_check``/``manifest_parse`` matches the running registry."""
    from edgesplit.families.registry import family_names, get_family

    fams = [get_family(n) for n in family_names()]
    running = {e.split(":")[0] for f in fams for e in (f.manifest_check, f.manifest_parse) if e}
    assert sorted(running) == list(MANIFEST_CHECKS)
    assert "edgesplit.families.edvit.manifest" in MANIFEST_CHECKS  # ED-ViT's section is checked this way
