"""Generate docs/architecture.md, the module graph of longtrain, from the code.

    python docs/architecture.py            # rewrite docs/architecture.md
    python docs/architecture.py --check    # exit 1 if the committed page is stale

It walks train.py and every .py file under longtrain/ with `ast` (no import of the
package, so it runs without torch), collects every import of a longtrain module,
including those inside functions, and prints each module with its lines, its import
level (0 imports no longtrain module; otherwise one more than the highest module it
imports, a cycle's modules sharing one level) and what it imports. Modules that are
added, moved or renamed need nothing here: regenerate the page. tests/test_docs.py
fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "longtrain"
PAGE = ROOT / "docs" / "architecture.md"


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    top: set[str] = field(default_factory=set)  # imported at module level (or in a class body)
    inner: set[str] = field(default_factory=set)  # imported only inside a function

    @property
    def imports(self) -> set[str]:
        return self.top | self.inner


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def find_modules(root: Path = ROOT) -> dict[str, Path]:
    files = [root / "train.py", *sorted((root / PACKAGE).rglob("*.py"))]
    return {module_name(p, root): p for p in files if p.is_file() and "__pycache__" not in p.parts}


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `target` (a dotted name) is or lies in."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in known:
            return name
        parts.pop()
    return None


def imported_names(node: ast.AST, here: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may refer to (modules, or attributes of modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: from . import x, from ..a import b
        base = here.split(".")
        drop = node.level - 1 if is_package else node.level
        base = base[: len(base) - drop] if drop else base
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" if alias.name != "*" else prefix for alias in node.names] + [prefix]


def scan(name: str, path: Path, known: dict[str, Path]) -> Module:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    module = Module(name, path, len(text.splitlines()))
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = imported_names(child, name, is_package)
                if isinstance(child, ast.ImportFrom):
                    # `from a import b`: b may be a module of its own or a name in a; take the
                    # most specific known module for each imported name, else a itself.
                    targets = {resolve(n, known) for n in names[:-1] if n} - {None}
                    if not targets:
                        targets = {resolve(names[-1], known)} if names[-1] else set()
                else:  # import a.b.c (as x): the module a.b.c, or the package it lies in
                    targets = {resolve(n, known) for n in names}
                for target in targets:
                    if target and target != name and target.split(".")[0] == PACKAGE:
                        (module.inner if inside else module.top).add(target)
            visit(child, inside)

    visit(tree, False)
    module.inner -= module.top
    return module


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def levels(graph: dict[str, set[str]]) -> tuple[dict[str, int], list[list[str]]]:
    components = strongly_connected(graph)  # Tarjan emits a component after all it reaches
    of = {m: i for i, comp in enumerate(components) for m in comp}
    level: dict[str, int] = {}
    for i, comp in enumerate(components):
        below = [level[d] for m in comp for d in graph[m] if of[d] != i]
        for m in comp:
            level[m] = 1 + max(below) if below else 0
    cycles = [c for c in components if len(c) > 1]
    return level, cycles


def short(name: str) -> str:
    return name.removeprefix(PACKAGE + ".") if name != PACKAGE else name


def group(name: str) -> str:
    """The mermaid node a module belongs to: its subpackage, or itself for a top module."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else PACKAGE


def analyse(root: Path = ROOT) -> tuple[dict[str, Module], dict[str, int], list[list[str]]]:
    """Every module under root (train.py and longtrain/), its import level, and the cycles."""
    known = find_modules(root)
    modules = {name: scan(name, path, known) for name, path in known.items()}
    level, cycles = levels({name: set(m.imports) for name, m in modules.items()})
    return modules, level, cycles


def generate(root: Path = ROOT) -> str:
    modules, level, cycles = analyse(root)
    package_lines = sum(m.lines for n, m in modules.items() if n.split(".")[0] == PACKAGE)
    inner = sum(len(m.inner) for m in modules.values())

    out = [
        "# Architecture: the module graph",
        "",
        "<!-- Generated by `python docs/architecture.py` from the code; do not edit by hand.",
        "     tests/test_docs.py fails when this page differs from what the script prints. -->",
        "",
        "Every module of `longtrain/` and the entry point `train.py`, with its lines, its import",
        "level and the longtrain modules it imports, found by walking the code with `ast`",
        "(imports inside functions included). Level 0 imports no longtrain module; any other",
        "module sits one level above the highest module it imports. Imports point down the",
        "levels; the [README's code map](../README.md#code-map) says what each part is for.",
        "Regenerate after adding, moving or renaming a module: `python docs/architecture.py`.",
        "",
        f"- modules: {sum(1 for n in modules if n.split('.')[0] == PACKAGE)} in `{PACKAGE}/`, "
        f"{package_lines:,} lines (plus `train.py`, {modules['train'].lines} lines)"
        if "train" in modules
        else f"- modules: {len(modules)}, {package_lines:,} lines",
        f"- import levels: {max(level.values()) + 1 if level else 0} (0 to {max(level.values()) if level else 0})",
        f"- (importer, module) pairs imported only inside functions: {inner}",
        "- import cycles: " + ("none" if not cycles else "; ".join(" ↔ ".join(short(m) for m in c) for c in cycles)),
        "",
        "## Modules by level",
        "",
        "| level | module | lines | imports | imports inside functions only |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(modules, key=lambda n: (-level[n], n)):
        m = modules[name]
        top = ", ".join(f"`{short(d)}`" for d in sorted(m.top)) or "–"
        inn = ", ".join(f"`{short(d)}`" for d in sorted(m.inner)) or "–"
        label = f"`{short(name)}`" + (" (package)" if m.path.name == "__init__.py" else "")
        out.append(f"| {level[name]} | {label} | {m.lines} | {top} | {inn} |")

    edges: set[tuple[str, str]] = set()
    for name, m in modules.items():
        for dep in m.imports:
            a, b = group(name), group(dep)
            if a != b:
                edges.add((a, b))
    nodes = sorted({group(n) for n in modules})
    ident = {n: n.replace(".", "_") for n in nodes}
    out += [
        "",
        "## Graph by package",
        "",
        "Each node is a subpackage of `longtrain/` or a top-level module; an arrow points from",
        "the importer to what it imports (imports inside functions included).",
        "",
        "```mermaid",
        "graph TD",
    ]
    for n in nodes:
        out.append(f'  {ident[n]}["{short(n)}"]')
    for a, b in sorted(edges):
        out.append(f"  {ident[a]} --> {ident[b]}")
    out += ["```", ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = generate()
    if argv == ["--check"]:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python docs/architecture.py", file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: python docs/architecture.py [--check]", file=sys.stderr)
        return 2
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
