"""The import rules of docs/architecture.md, read from the source with `ast` (nothing is imported).

Every import counts: module level, inside functions, relative (`from . import x`), and
`importlib.import_module("...")` with a literal name. Imports under `if TYPE_CHECKING:` count
for the layering rules but not for the torch-free and cycle rules, since they never run.
DeepSpeed privates are found where they are spelled: `from deepspeed.x import _y`, a module path
with a `_` component, and `name._y` where `name` was bound by a deepspeed import. A private
reached through an object (`engine.optimizer._x`) is not visible here; tests/test_dscompat.py
checks the fingerprint of every private moelab.dscompat relies on instead.

Each rule is a function of the repository root, so the tests at the end also run it on a small
tree holding one violation of each kind and check that it is reported.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"launcher": "launcher", "moelab": "src/moelab"}
HEAVY = ("torch", "deepspeed", "transformers", "mlflow")
SCHEMAS = ("moelab.config", "moelab.rundir", "moelab.dsconfig", "moelab.runref")
MODEL_FORBIDDEN = ("moelab.engine", "moelab.telemetry", "moelab.train", "moelab.checkpoint")
MOE_OWNERS = ("moelab.ds_moe", "moelab.dscompat")
PRIVATES_OWNER = "moelab.dscompat"
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    """One imported name: `module` (absolute) and, for `from module import name`, `name`."""

    module: str
    name: str | None
    line: int
    top: bool  # runs when the importing module is imported (not inside a function)
    runtime: bool  # not under `if TYPE_CHECKING:`

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: list[Import] = field(default_factory=list)
    private_uses: list[tuple[int, str]] = field(default_factory=list)  # deepspeed `x._y`


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


class _Reader(ast.NodeVisitor):
    """Collects a module's imports and its `deepspeed_name._private` attribute uses."""

    def __init__(self, module: Module, package: str) -> None:
        self.mod, self.package = module, package
        self.depth, self.type_only = 0, False
        self.ds_names: set[str] = set()  # local names bound to a deepspeed module or object

    def add(self, module: str, name: str | None, line: int) -> None:
        top, runtime = self.depth == 0, not self.type_only
        self.mod.imports.append(Import(module, name, line, top, runtime))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, None, node.lineno)
            if alias.name.split(".")[0] == "deepspeed":
                self.ds_names.add(alias.asname or "deepspeed")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            up = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*up, *([base] if base else [])])
        for alias in node.names:
            self.add(base, alias.name, node.lineno)
            if base.split(".")[0] == "deepspeed":
                self.ds_names.add(alias.asname or alias.name)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        arg = node.args[0] if node.args else None
        value = arg.value if isinstance(arg, ast.Constant) else None
        if called in ("import_module", "__import__") and isinstance(value, str):
            self.add(value, None, node.lineno)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base: ast.expr = node.value
        while isinstance(base, ast.Attribute):
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.ds_names and _is_private(node.attr):
            self.mod.private_uses.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self.type_only = self.type_only, True
        for stmt in node.body:
            self.visit(stmt)
        self.type_only = outer
        for stmt in node.orelse:
            self.visit(stmt)

    def _scope(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope


@functools.cache
def read_tree(root: Path) -> dict[str, Module]:
    """Every module of launcher/ and src/moelab/ under `root`, by dotted name."""
    modules: dict[str, Module] = {}
    for top, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [top, *path.relative_to(root / folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            text = path.read_text()
            module = Module(name, path.relative_to(root), len(text.splitlines()))
            package = name if is_package else name.rpartition(".")[0]
            _Reader(module, package).visit(ast.parse(text, str(path)))
            modules[name] = module
    return modules


def target(imp: Import, modules: dict[str, Module]) -> str | None:
    """The module of launcher/ or src/moelab/ that `imp` loads, if it is one of them."""
    for candidate in (imp.full, imp.module):
        if candidate in modules:
            return candidate
    return None


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def where(module: Module, line: int, rule: str, detail: str) -> str:
    return f"{module.path}:{line}: [{rule}] {detail}"


def _parents(name: str) -> Iterator[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def config_is_torch_free(root: Path) -> list[str]:
    """The config schemas, and every moelab module the launcher imports at module level, load
    without torch, deepspeed, transformers or mlflow (module-level imports, transitively)."""
    modules = read_tree(root)
    problems = [f"src/moelab: [torch-free] {s} is missing" for s in SCHEMAS if s not in modules]
    seen: dict[str, str | None] = {}  # module -> the module whose import brought it in
    queue: list[str] = []

    def reach(name: str, by: str | None) -> None:
        for package in _parents(name):
            if package in modules and package not in seen:
                seen[package] = by
                queue.append(package)

    for schema in SCHEMAS:
        reach(schema, None)
    for mod in modules.values():
        for imp in mod.imports if mod.name.startswith("launcher") else ():
            if imp.top and imp.runtime and (t := target(imp, modules)) and t.startswith("moelab"):
                reach(t, mod.name)
    while queue:
        mod = modules[queue.pop(0)]
        for imp in (i for i in mod.imports if i.top and i.runtime):
            if imp.module.split(".")[0] in HEAVY:
                chain = _chain(seen, mod.name)
                problems.append(where(mod, imp.line, "torch-free", f"{chain} -> {imp.module}"))
            elif t := target(imp, modules):
                reach(t, mod.name)
    return problems


def _chain(seen: dict[str, str | None], name: str) -> str:
    names = [name]
    while (by := seen.get(names[-1])) is not None:
        names.append(by)
    return " -> ".join(reversed(names))


def models_are_engine_free(root: Path) -> list[str]:
    """moelab.models.* imports none of the engine, telemetry, training loop or checkpoints."""
    problems = []
    for mod in read_tree(root).values():
        for imp in mod.imports if _under(mod.name, ("moelab.models",)) else ():
            if _under(imp.module, MODEL_FORBIDDEN) or _under(imp.full, MODEL_FORBIDDEN):
                problems.append(where(mod, imp.line, "models", f"{mod.name} imports {imp.full}"))
    return problems


def ranks_never_import_the_launcher(root: Path) -> list[str]:
    """No module of src/moelab imports `launcher` (it runs on ranks without the head node)."""
    problems = []
    for mod in read_tree(root).values():
        for imp in mod.imports if mod.name.startswith("moelab") else ():
            if imp.module.split(".")[0] == "launcher":
                problems.append(where(mod, imp.line, "ranks", f"{mod.name} imports {imp.full}"))
    return problems


def only_the_adapter_imports_deepspeed_moe(root: Path) -> list[str]:
    """`deepspeed.moe` and its submodules are imported by moelab.ds_moe and dscompat only."""
    problems = []
    for mod in read_tree(root).values():
        for imp in mod.imports if mod.name not in MOE_OWNERS else ():
            if _under(imp.module, ("deepspeed.moe",)) or _under(imp.full, ("deepspeed.moe",)):
                detail = f"{mod.name} imports {imp.full}; use moelab.ds_moe"
                problems.append(where(mod, imp.line, "deepspeed.moe", detail))
    return problems


def only_dscompat_touches_deepspeed_privates(root: Path) -> list[str]:
    """No module but moelab.dscompat names a `_private` of DeepSpeed (import or attribute)."""
    problems = []
    for mod in read_tree(root).values():
        if mod.name == PRIVATES_OWNER:
            continue
        for imp in mod.imports:
            parts = imp.full.split(".")
            if parts[0] == "deepspeed" and any(_is_private(p) for p in parts):
                detail = f"{mod.name} imports {imp.full}; move it to {PRIVATES_OWNER}"
                problems.append(where(mod, imp.line, "privates", detail))
        for line, expr in mod.private_uses:
            detail = f"{mod.name} uses {expr}; move it to {PRIVATES_OWNER}"
            problems.append(where(mod, line, "privates", detail))
    return problems


def no_import_cycles(root: Path) -> list[str]:
    """No cycle among the modules of launcher/, nor among those of src/moelab/ (function-level
    imports included, `if TYPE_CHECKING:` ones not)."""
    modules = read_tree(root)
    problems = []
    for top in PACKAGES:
        graph: dict[str, dict[str, int]] = {}  # module -> {module it imports: line}
        for mod in modules.values():
            if mod.name.split(".")[0] != top:
                continue
            edges = graph.setdefault(mod.name, {})
            for imp in (i for i in mod.imports if i.runtime):
                t = target(imp, modules)
                if t and t != mod.name and t.split(".")[0] == top:
                    edges.setdefault(t, imp.line)
        for cycle in _cycles(graph):
            first = modules[cycle[0]]
            problems.append(where(first, graph[cycle[0]][cycle[1]], "cycle", " -> ".join(cycle)))
    return problems


def _paths_from(graph: dict[str, dict[str, int]], start: str) -> dict[str, str]:
    """Each module reachable from `start` -> its predecessor on a shortest path."""
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph.get(node, {})):
            if succ not in prev:
                prev[succ] = node
                queue.append(succ)
    return prev


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle `a -> b -> a` per strongly connected group of modules."""
    done: set[str] = set()
    cycles = []
    for node in sorted(graph):
        prev = _paths_from(graph, node)
        if node in done or node not in prev:
            continue
        back = [node, prev[node]]
        while back[-1] != node:
            back.append(prev[back[-1]])
        cycles.append(back[::-1])
        done |= {n for n in prev if node in _paths_from(graph, n)}
    return cycles


def files_are_short(root: Path) -> list[str]:
    """No .py file of launcher/, src/moelab/ or benchmarks/ is over 400 lines (MAX_LINES)."""
    problems = []
    for folder in (*PACKAGES.values(), "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                rel = path.relative_to(root)
                problems.append(f"{rel}:{lines}: [size] {lines} lines, over {MAX_LINES}: split it")
    return problems


# One violation of each rule, beside code each rule must accept (allowed owners, imports
# under TYPE_CHECKING or inside functions where only module-level ones count).
BAD_TREE = {
    "launcher/__init__.py": "",
    "launcher/cli.py": (
        "from moelab.config import Config\n\n\ndef main():\n    from . import loop\n"
    ),
    "launcher/loop.py": "from launcher import cli\n",
    "src/moelab/__init__.py": "",
    "src/moelab/config.py": (
        "from typing import TYPE_CHECKING\n\nfrom moelab import util\n\n"
        "if TYPE_CHECKING:\n    import torch\n"
    ),
    "src/moelab/util.py": "import torch\n",
    "src/moelab/rundir.py": "def load():\n    import mlflow\n",
    "src/moelab/dsconfig.py": "",
    "src/moelab/runref.py": "",
    "src/moelab/models/__init__.py": "",
    "src/moelab/models/layers.py": "from ..telemetry import core\nfrom moelab import ds_moe\n",
    "src/moelab/telemetry/__init__.py": "",
    "src/moelab/telemetry/core.py": "def f():\n    from moelab.telemetry import sink\n",
    "src/moelab/telemetry/sink.py": "from . import core\n",
    "src/moelab/ds_moe.py": "from deepspeed.moe.layer import MoE\n",
    "src/moelab/dscompat.py": (
        "from deepspeed.moe import sharded_moe\nfrom deepspeed.utils import groups, _x\n\n"
        "rank = groups._get_rank\n"
    ),
    "src/moelab/engine.py": (
        "import importlib\n\n\ndef run():\n    importlib.import_module('launcher.cli')\n"
        "    from deepspeed import moe\n"
    ),
    "src/moelab/train.py": (
        "from deepspeed.utils import groups\nfrom deepspeed.runtime.zero import _helper\n"
        "import deepspeed._impl.x as dp\n\nrank = groups._get_expert_parallel_rank('x')\n"
        "size = groups.get_size().__len__\n"
    ),
    "src/moelab/big.py": "x = 1\n" * (MAX_LINES + 1),
    "benchmarks/short.py": "x = 1\n" * MAX_LINES,
    "benchmarks/long.py": "x = 1\n" * (MAX_LINES + 2),
}

Rule = Callable[[Path], list[str]]
EXPECTED: dict[Rule, list[str]] = {
    config_is_torch_free: [
        "src/moelab/util.py:1: [torch-free] moelab.config -> moelab.util -> torch"
    ],
    models_are_engine_free: [
        "src/moelab/models/layers.py:1: [models] moelab.models.layers imports moelab.telemetry.core"
    ],
    ranks_never_import_the_launcher: [
        "src/moelab/engine.py:5: [ranks] moelab.engine imports launcher.cli"
    ],
    only_the_adapter_imports_deepspeed_moe: [
        "src/moelab/engine.py:6: [deepspeed.moe] moelab.engine imports deepspeed.moe"
    ],
    only_dscompat_touches_deepspeed_privates: [
        "src/moelab/train.py:2: [privates] moelab.train imports deepspeed.runtime.zero._helper",
        "src/moelab/train.py:3: [privates] moelab.train imports deepspeed._impl.x",
        "src/moelab/train.py:5: [privates] moelab.train uses groups._get_expert_parallel_rank",
    ],
    no_import_cycles: [
        "launcher/cli.py:5: [cycle] launcher.cli -> launcher.loop -> launcher.cli",
        "src/moelab/telemetry/core.py:2: [cycle] moelab.telemetry.core -> moelab.telemetry.sink"
        " -> moelab.telemetry.core",
    ],
    files_are_short: [
        f"src/moelab/big.py:{MAX_LINES + 1}: [size] {MAX_LINES + 1} lines",
        f"benchmarks/long.py:{MAX_LINES + 2}: [size] {MAX_LINES + 2} lines",
    ],
}


@pytest.mark.parametrize("rule", EXPECTED, ids=lambda rule: rule.__name__)
def test_the_source_keeps_the_rule(rule: Rule) -> None:
    problems = rule(ROOT)
    assert not problems, f"{rule.__doc__}\n" + "\n".join(problems)


@pytest.mark.parametrize("rule", EXPECTED, ids=lambda rule: rule.__name__)
def test_the_rule_reports_each_violation_and_nothing_else(rule: Rule, tmp_path: Path) -> None:
    for rel, text in BAD_TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = rule(tmp_path)
    assert len(problems) == len(EXPECTED[rule]), "\n".join(problems)
    for got, want in zip(problems, EXPECTED[rule], strict=True):
        assert got.startswith(want), f"{got!r} does not start with {want!r}"
