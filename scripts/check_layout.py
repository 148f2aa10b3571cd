"""Check the layout rules of DESIGN.md section 3 (run from the repository root):

- layering `tuner` <- `worker` <- `api`: no module of `tuner` imports `worker` or `api`, none of
  `worker` imports `api`; neither imports FastAPI or Starlette (module- or function-level imports);
- no import cycle between modules of `tuner`, `worker`, `api`, `quanttune` (every import counts,
  also those inside functions: a cycle is a cycle even when it only bites at call time);
- no function longer than `--max-lines` (default 80).

    python scripts/check_layout.py [--max-lines 80] [--longest 10]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("tuner", "worker", "api", "quanttune")
FORBIDDEN = {"tuner": ("api", "worker", "fastapi", "starlette"), "worker": ("api", "fastapi", "starlette")}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules `name` imports (absolute and relative, anywhere in the file)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - node.level + 1]
                module = ".".join(prefix + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module, or pkg itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in (targets if isinstance(node, ast.Import) else [targets[-1]]):
                found.add("!" + target)  # raw names, for the layering rule
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return out


def is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def check(root: Path, max_lines: int, longest: int) -> list[str]:
    known = modules(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        found = imports(name, path, known)
        # a module's own package __init__ runs before it: not an edge of a cycle
        graph[name] = {m for m in found if not m.startswith("!") and not is_ancestor(m, name)}
        top = name.split(".")[0]
        for raw in (m[1:] for m in found if m.startswith("!")):
            if raw.split(".")[0] in FORBIDDEN.get(top, ()):
                problems.append(f"layering: {name} imports {raw}")
    for component in cycles(graph):
        problems.append(f"import cycle: {' <-> '.join(component)}")
    lengths = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    lengths.sort(reverse=True)
    for n, where in lengths:
        if n > max_lines:
            problems.append(f"function of {n} lines: {where}")
    print(f"{len(known)} modules; longest functions:")
    for n, where in lengths[:longest]:
        print(f"  {n:4d}  {where}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-lines", type=int, default=80)
    parser.add_argument("--longest", type=int, default=10)
    args = parser.parse_args()
    problems = check(Path.cwd(), args.max_lines, args.longest)
    for problem in problems:
        print(problem)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
