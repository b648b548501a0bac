"""Import arrows between handler's modules, and those that point upward (issue 27's before/after figure).

A room is a subpackage of lora_serving/handler (tp, lora, models, runner, djl, tool_parsers) or one of its
top-level modules. An arrow is a distinct (importing module, imported module) pair inside handler, from any
import statement (lazy and TYPE_CHECKING ones too; --runtime leaves out those under `if TYPE_CHECKING:`).
Imports of handler's own __init__ are not counted. An arrow a -> b between two rooms points upward when b,
following module-level arrows, reaches a's room again: that room then sits both below and above b, so no
order of the rooms has every arrow pointing down.
    .venv/bin/python scripts/import_arrows.py [--runtime] [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import collections
import pathlib

PACKAGE = "lora_serving.handler"


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for path in (root / "lora_serving" / "handler").rglob("*.py"):
        parts = list(path.relative_to(root / "lora_serving" / "handler").with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([PACKAGE, *parts])] = path
    return found


def imported_names(tree: ast.AST, runtime_only: bool) -> list[str]:
    skipped: set[int] = set()
    names = []
    for node in ast.walk(tree):  # breadth first: an `if TYPE_CHECKING:` comes before its body
        if id(node) in skipped:
            continue
        if runtime_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def arrows(root: pathlib.Path, runtime_only: bool) -> set[tuple[str, str]]:
    found = modules(root)
    edges = set()
    for module, path in found.items():
        for name in imported_names(ast.parse(path.read_text()), runtime_only):
            while name and name not in found:  # `from a.b import c`: the module a.b.c, else a.b
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE + ".") and name != module:
                edges.add((module, name))
    return edges


def room(module: str) -> str:
    return module[len(PACKAGE) + 1:].split(".")[0]


def upward(edges: set[tuple[str, str]]) -> list[tuple[str, str]]:
    out = collections.defaultdict(set)
    for a, b in edges:
        out[a].add(b)

    def reached(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in out[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    return sorted((a, b) for a, b in edges
                  if room(a) != room(b) and any(room(m) == room(a) for m in reached(b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", action="store_true", help="leave out imports under `if TYPE_CHECKING:`")
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    edges = arrows(pathlib.Path(args.root), args.runtime)
    up = upward(edges)
    print(f"{len(edges)} import arrows between handler's modules{' (runtime only)' if args.runtime else ''}; "
          f"{len(up)} point upward")
    for a, b in up:
        print(f"  {a[len(PACKAGE) + 1:]} -> {b[len(PACKAGE) + 1:]}")


if __name__ == "__main__":
    main()
