"""Imports inside `egspo/` go one way: the graph of every import statement (module level and
inside functions alike) has no cycle. Built from the source with `ast`, nothing is imported."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "egspo"


def module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted name → file of every module of the package at `root` (a package is its __init__)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module → the package's modules it imports anywhere in its source.

  `from a import b` is an edge to the module `a.b` when it exists (a submodule), else to `a`;
  relative imports are resolved against the importing module's package.
  """
  modules = module_names(root)
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      else:
        continue
      for target in targets:
        # `import a.b.c` binds a module below `a.b` that may be a package: the longest known.
        while target and target not in modules:
          target = target.rpartition(".")[0]
        if target and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [m0, m1, ..., m0] of `graph`, or None (iterative depth-first search)."""
  state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
  for start in sorted(graph):
    if state[start]:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt, 2) == 1:
        return path[path.index(nxt):] + [nxt]
      elif state.get(nxt, 2) == 0:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph[nxt])))
  return None


def test_egspo_has_no_import_cycle():
  graph = import_graph(PACKAGE)
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_every_kind_of_import():
  """Edges the cycle test relies on: module level, inside functions, `from pkg import module`,
  package attributes, and the one-way layers the structure promises."""
  graph = import_graph(PACKAGE)
  assert "egspo.rl.registry" in graph["egspo.rl.baselines"]  # from egspo.rl.registry import …
  assert "egspo.rl.algorithms" in graph["egspo.rl"]  # from egspo.rl import algorithms
  assert "egspo.train" in graph["egspo.main"]  # inside main()
  assert "egspo.rl.registry" in graph["egspo.config_checks"]  # inside validate()
  assert not {m for m in graph["egspo.model.llada"] if m != "egspo.partitioning"}
  assert graph["egspo.partitioning"] == set()
  assert not any(m.startswith("egspo.model") for m in graph["egspo.sharding"])
  assert not any(m.startswith(("egspo.rl.algorithms", "egspo.rl.baselines"))
                 for m in graph["egspo.rl.registry"])


@pytest.mark.parametrize("where", ["module", "function"])
def test_a_cycle_is_found(tmp_path, where):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg.sub import b\n")
  body = "from .. import a\n" if where == "module" else "def f():\n  import pkg.a\n"
  (pkg / "sub" / "b.py").write_text(body)
  (pkg / "c.py").write_text("from pkg import a\n")
  graph = import_graph(pkg)
  assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b"},
                   "pkg.sub.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
  assert find_cycle(graph) in (["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.sub.b", "pkg.a", "pkg.sub.b"])
  (pkg / "sub" / "b.py").write_text("import json\n")
  assert find_cycle(import_graph(pkg)) is None
