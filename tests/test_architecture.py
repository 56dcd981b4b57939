"""The architecture contract of `codreamer/`: static checks on the source (`ast`, nothing imported).

- (a) the import graph has no cycle: every import counts, at module level, inside functions
  and under ``if TYPE_CHECKING:``; ``from codreamer.x import y`` is an edge to the module
  ``codreamer.x.y`` when that is a module, else to ``codreamer.x``;
- (b) `codreamer.config` is a leaf: it imports nothing else from `codreamer`;
- (c) layering (`LAYERS`): a module imports its own layer and the ones below, never above;
- (d) no module over `MAX_LINES` lines;
- (e) only `ENV_READERS` read the process environment (settings come from `codreamer.config`).

Each rule also runs on a small tree planted under ``tmp_path`` that breaks it, so that a
failure is known to be caught and to read well (the ``*_is_caught`` tests). The temporary
exception lists (`KNOWN_LAYER_VIOLATIONS`, `OVER_SIZE_WHILE_SPLIT`) only shrink: an entry that
no longer applies fails `test_exception_lists_hold_only_live_entries` until it is removed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = "codreamer"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# --------------------------------------------------------------------------- the rules

#: The layers, lowest first. A component is the first name under `codreamer/` (a module or a
#: package; `__init__` is the package's own `codreamer/__init__.py`). A module may import its
#: own layer and the layers below it, never a layer above.
#:
#:   layer               components                                    may import layers
#:   0 settings          __init__ config                               0 (config: nothing, rule b)
#:   1 foundations       paths errors log storage redaction markdown   0-1
#:                       retry domain usage runs local_trace
#:   2 components        data agent rewards events backends tracking   0-2
#:   3 orchestration     pipeline analysis checkpoints reports         0-3
#:   4 entry points      cli                                           0-4
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("0 settings", frozenset("__init__ config".split())),
    (
        "1 foundations",
        frozenset("paths errors log storage redaction markdown retry domain usage runs local_trace".split()),
    ),
    ("2 components", frozenset("data agent rewards events backends tracking".split())),
    ("3 orchestration", frozenset("pipeline analysis checkpoints reports".split())),
    ("4 entry points", frozenset("cli".split())),
)

#: Upward edges that exist today (importer, imported). None are left (issue 13 moved the locked
#: JSONL append into the foundation `codreamer.storage`). Keep it empty; never add to it.
KNOWN_LAYER_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()

MAX_LINES = 600

#: Modules over `MAX_LINES` while they are being split (paths under `codreamer/`). Empty it;
#: never add to it (pipeline/loop.py, analysis/analyzer.py, analysis/collector.py, events/log.py
#: and tracking.py were split in issue 13).
OVER_SIZE_WHILE_SPLIT: frozenset[str] = frozenset()

#: The modules (or packages) allowed to read the process environment, and why. Everything else
#: takes its settings from `codreamer.config.Settings`. Writing the environment is not a read.
ENV_READERS: dict[str, str] = {
    "codreamer.config": "the settings themselves (pydantic-settings reads the environment and .env)",
    "codreamer.tracking": "W&B and Weave take their switches from the environment: tracking sets and restores them",
    "codreamer.backends.factory": "OMP_NUM_THREADS, torch's own thread-count variable, as the --torch-threads default",
}


def layer_of(module: str) -> int | None:
    comp = component(module)
    return next((i for i, (_, comps) in enumerate(LAYERS) if comp in comps), None)


# --------------------------------------------------------------------------- the scanner


@dataclass(frozen=True)
class Import:
    target: str  # a module of the scanned package
    line: int


@dataclass
class Module:
    name: str
    path: Path  # relative to the scanned package's parent ("codreamer/x.py")
    lines: int
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path) -> dict[str, Module]:
    """Every module of the package at `root` with its imports of the package, by module name."""
    package = root.name
    modules: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = _module_name(path, root)
        rel = path.relative_to(root.parent)
        modules[name] = Module(name, rel, len(text.splitlines()), ast.parse(text, filename=str(rel)))

    def existing(name: str) -> str | None:
        """`name` or its nearest prefix that is a module of the package."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod in modules.values():
        is_package = mod.path.name == "__init__.py"
        here = mod.name if is_package else mod.name.rpartition(".")[0]
        found: dict[str, int] = {}
        for node in ast.walk(mod.tree):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [existing(a.name) for a in node.names if a.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != package:
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else existing(base))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.split(".")[0] == package
            ):
                targets = [existing(node.args[0].value)]
            for target in targets:
                if target and target != mod.name and target not in found:
                    found[target] = getattr(node, "lineno", 0)
        mod.imports = [Import(t, line) for t, line in sorted(found.items(), key=lambda kv: kv[1])]
    return modules


@cache
def _tree() -> dict[str, Module]:
    return scan(ROOT)


# --------------------------------------------------------------------------- the checks (lists of problems)


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    out.append(sorted(comp))
    return out


def _shortest_cycle(graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """A shortest cycle through the first member, staying inside `members` (first node repeated at the end)."""
    start = min(members)
    previous: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for child in graph[node]:
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError("not a cycle")  # pragma: no cover


def import_cycles(modules: dict[str, Module]) -> list[str]:
    """One line per strongly connected group of modules: a shortest cycle, each edge with its import line."""
    graph = {name: [i.target for i in mod.imports if i.target in modules] for name, mod in modules.items()}
    problems = []
    for comp in _strongly_connected(graph):
        if len(comp) < 2:
            continue
        cycle = _shortest_cycle(graph, set(comp))
        hops = []
        for a, b in pairwise(cycle):
            line = next(i.line for i in modules[a].imports if i.target == b)
            hops.append(f"{a} -> {b} ({modules[a].where(line)})")
        others = f"; modules in the same knot: {', '.join(comp)}" if len(comp) > len(cycle) - 1 else ""
        problems.append(" | ".join(hops) + others)
    return problems


def config_imports(modules: dict[str, Module]) -> list[str]:
    return [
        f"{mod.where(i.line)}: {mod.name} imports {i.target}"
        for mod in modules.values()
        if component(mod.name) == "config"
        for i in mod.imports
        if component(i.target) != "config"
    ]


def unplaced_components(modules: dict[str, Module]) -> list[str]:
    return sorted(
        {f"{component(m)} ({modules[m].path}): add it to a layer of LAYERS" for m in modules if layer_of(m) is None}
    )


def upward_imports(modules: dict[str, Module], known: Iterable[tuple[str, str]] = ()) -> list[str]:
    known = set(known)
    problems = []
    for mod in modules.values():
        low = layer_of(mod.name)
        for i in mod.imports:
            high = layer_of(i.target)
            if low is None or high is None or high <= low or (mod.name, i.target) in known:
                continue
            problems.append(
                f"{mod.where(i.line)}: {mod.name} (layer {LAYERS[low][0]}) imports {i.target} (layer {LAYERS[high][0]})"
            )
    return problems


def upward_edges(modules: dict[str, Module]) -> set[tuple[str, str]]:
    return {
        (mod.name, i.target)
        for mod in modules.values()
        for i in mod.imports
        if (lo := layer_of(mod.name)) is not None and (hi := layer_of(i.target)) is not None and hi > lo
    }


def over_size(modules: dict[str, Module], allowed: Iterable[str] = ()) -> list[str]:
    allowed = set(allowed)
    return [
        f"{mod.path}: {mod.lines} lines"
        for mod in sorted(modules.values(), key=lambda m: -m.lines)
        if mod.lines > MAX_LINES and str(mod.path.relative_to(PACKAGE)) not in allowed
    ]


_ENV_WRITES = ("setdefault", "pop", "update", "clear")


def _env_reads(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, source) of every read of the process environment: `os.getenv`, `os.environ[...]`,
    `os.environ.get`, `in os.environ`, `os.environ` passed on... Writes (`os.environ[k] = v`,
    `del`, `.setdefault`, `.pop`, `.update`) are not reads."""
    os_names, environ_names, getenv_names = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name for a in node.names if a.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level:
            environ_names |= {a.asname or a.name for a in node.names if a.name in ("environ", "environb")}
            getenv_names |= {a.asname or a.name for a in node.names if a.name in ("getenv", "getenvb")}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = []

    def is_os(node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and node.id in os_names

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (
            (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in ("getenv", "getenvb")
                and is_os(node.func.value)
            )
            or (isinstance(node.func, ast.Name) and node.func.id in getenv_names)
        ):
            reads.append((node.lineno, ast.unparse(node)))
            continue
        if isinstance(node, ast.Attribute):
            environ = node.attr in ("environ", "environb") and is_os(node.value)
        elif isinstance(node, ast.Name):
            environ = node.id in environ_names
        else:
            continue
        if not environ:
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Subscript) and isinstance(parent.ctx, ast.Store | ast.Del):
            continue
        call = parents.get(parent) if isinstance(parent, ast.Attribute) else None
        if isinstance(parent, ast.Attribute) and parent.attr in _ENV_WRITES and isinstance(call, ast.Call):
            continue
        shown = call or parent or node  # `os.environ.get(...)`, `os.environ[...]`, `x in os.environ`
        reads.append((node.lineno, ast.unparse(shown)))
    return sorted(set(reads))


def _env_allowed(module: str, allowed: Iterable[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def env_readers(modules: dict[str, Module], allowed: Iterable[str] = ()) -> list[str]:
    allowed = list(allowed)
    return [
        f"{mod.where(line)}: {mod.name} reads the environment: {source[:80]}"
        for mod in modules.values()
        if not _env_allowed(mod.name, allowed)
        for line, source in _env_reads(mod.tree)
    ]


def _fail(problems: list[str], header: str) -> None:
    if problems:
        pytest.fail(f"{header} ({len(problems)}):\n  " + "\n  ".join(problems), pytrace=False)


# --------------------------------------------------------------------------- the contract on codreamer/


def test_the_scan_sees_the_package() -> None:
    modules = _tree()
    assert "codreamer.config" in modules
    assert len(modules) > 30
    assert any(mod.imports for mod in modules.values())


def test_no_import_cycle() -> None:
    _fail(import_cycles(_tree()), "import cycles in codreamer/ (break each: move the shared part down a layer)")


def test_config_is_a_leaf() -> None:
    _fail(config_imports(_tree()), "codreamer.config imports from the project (build views next to their users)")


def test_every_component_has_a_layer() -> None:
    _fail(unplaced_components(_tree()), "components of codreamer/ missing from LAYERS")


def test_no_import_goes_up_a_layer() -> None:
    _fail(
        upward_imports(_tree(), KNOWN_LAYER_VIOLATIONS),
        "imports from a lower layer to a higher one (see LAYERS in tests/test_architecture.py)",
    )


def test_no_module_over_max_lines() -> None:
    _fail(over_size(_tree(), OVER_SIZE_WHILE_SPLIT), f"modules over {MAX_LINES} lines (split them by concern)")


def test_only_env_readers_read_the_environment() -> None:
    _fail(
        env_readers(_tree(), ENV_READERS),
        "environment reads outside ENV_READERS (add a field to codreamer.config.Settings instead)",
    )


def test_exception_lists_hold_only_live_entries() -> None:
    modules = _tree()
    stale = [
        f"KNOWN_LAYER_VIOLATIONS: {a} -> {b} is gone" for a, b in sorted(KNOWN_LAYER_VIOLATIONS - upward_edges(modules))
    ]
    sizes = {str(m.path.relative_to(PACKAGE)): m.lines for m in modules.values()}
    stale += [
        f"OVER_SIZE_WHILE_SPLIT: {p} is {'gone' if p not in sizes else f'{sizes[p]} lines'}"
        for p in sorted(OVER_SIZE_WHILE_SPLIT)
        if sizes.get(p, 0) <= MAX_LINES
    ]
    stale += [
        f"ENV_READERS: nothing under {a} reads the environment"
        for a in ENV_READERS
        if a != "codreamer.config"  # the rule's own home, whether or not it reads directly
        and not any(_env_allowed(m.name, [a]) and _env_reads(m.tree) for m in modules.values())
    ]
    _fail(stale, "exceptions that no longer apply: remove them from tests/test_architecture.py")


# --------------------------------------------------------------------------- each rule caught on a planted tree


def _plant(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    root = tmp_path / PACKAGE
    for rel, text in {"__init__.py": "", "config.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return scan(root)


def test_a_cycle_through_function_level_and_type_checking_imports_is_caught(tmp_path: Path) -> None:
    modules = _plant(
        tmp_path,
        {
            "agent/__init__.py": "",
            "agent/rollout.py": "from codreamer.rewards import scoring\n",
            "rewards/__init__.py": "",
            "rewards/scoring.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from codreamer.pipeline.loop import Run\n"
            ),
            "pipeline/__init__.py": "",
            "pipeline/loop.py": "def run():\n    from ..agent.rollout import rollout\n",
            "runs.py": "import codreamer.paths\n",
            "paths.py": "import codreamer.runs as runs\n",
        },
    )
    problems = import_cycles(modules)
    assert len(problems) == 2
    assert (
        "codreamer.agent.rollout -> codreamer.rewards.scoring (codreamer/agent/rollout.py:1) | "
        "codreamer.rewards.scoring -> codreamer.pipeline.loop (codreamer/rewards/scoring.py:3) | "
        "codreamer.pipeline.loop -> codreamer.agent.rollout (codreamer/pipeline/loop.py:2)"
    ) in problems
    assert any(p.startswith("codreamer.paths -> codreamer.runs") for p in problems)
    with pytest.raises(pytest.fail.Exception, match=r"import cycles in codreamer/.*\(2\):\n  codreamer\."):
        _fail(problems, "import cycles in codreamer/")


def test_from_package_import_name_is_an_edge_to_the_package(tmp_path: Path) -> None:
    modules = _plant(
        tmp_path,
        {
            "events/__init__.py": "from codreamer.events.log import EventLog\n",
            "events/log.py": "from codreamer.events import models\nfrom codreamer.events import EventLog\n",
            "events/models.py": "",
        },
    )
    assert [i.target for i in modules["codreamer.events.log"].imports] == [
        "codreamer.events.models",
        "codreamer.events",
    ]
    assert import_cycles(modules) == [
        "codreamer.events -> codreamer.events.log (codreamer/events/__init__.py:1) | "
        "codreamer.events.log -> codreamer.events (codreamer/events/log.py:2)"
    ]


def test_config_importing_the_project_is_caught(tmp_path: Path) -> None:
    modules = _plant(tmp_path, {"config.py": "def f():\n    from codreamer.retry import RetryPolicy\n", "retry.py": ""})
    assert config_imports(modules) == ["codreamer/config.py:2: codreamer.config imports codreamer.retry"]


def test_an_upward_import_and_an_unplaced_component_are_caught(tmp_path: Path) -> None:
    modules = _plant(
        tmp_path,
        {
            "paths.py": "",
            "runs.py": "from codreamer.paths import RUNS\nfrom codreamer.cli import main\n",
            "cli.py": "",
            "gadgets.py": "",
        },
    )
    assert upward_imports(modules) == [
        "codreamer/runs.py:2: codreamer.runs (layer 1 foundations) imports codreamer.cli (layer 4 entry points)"
    ]
    assert upward_imports(modules, {("codreamer.runs", "codreamer.cli")}) == []
    assert unplaced_components(modules) == ["gadgets (codreamer/gadgets.py): add it to a layer of LAYERS"]


def test_a_module_over_max_lines_is_caught(tmp_path: Path) -> None:
    modules = _plant(tmp_path, {"big.py": "x = 1\n" * (MAX_LINES + 1), "fine.py": "x = 1\n" * MAX_LINES})
    assert over_size(modules) == [f"codreamer/big.py: {MAX_LINES + 1} lines"]
    assert over_size(modules, {"big.py"}) == []


def test_environment_reads_are_caught_and_writes_are_not(tmp_path: Path) -> None:
    modules = _plant(
        tmp_path,
        {
            "reader.py": (
                "import os\n"
                "from os import environ as env, getenv\n"
                "a = os.getenv('A')\n"
                "b = os.environ['B']\n"
                "c = os.environ.get('C', '')\n"
                "d = 'D' in env\n"
                "e = getenv('E')\n"
            ),
            "writer.py": (
                "import os\n"
                "os.environ['A'] = '1'\n"
                "os.environ.setdefault('B', '1')\n"
                "os.environ.pop('C', None)\n"
                "del os.environ['D']\n"
            ),
        },
    )
    problems = env_readers(modules)
    assert [p.split(": ")[0] for p in problems] == [f"codreamer/reader.py:{n}" for n in (3, 4, 5, 6, 7)]
    assert "os.environ.get('C', '')" in problems[2]
    assert env_readers(modules, ["codreamer.reader"]) == []
