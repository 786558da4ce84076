"""The package structure: no import cycles, and models/ never imports train/ or experiments/.

The same check by hand: `python -m pytest -q tests/test_structure.py`. It reads every import, at module
level and inside functions, from the source (nothing is imported)."""

import ast
import pathlib

from conftest import ROOT

PACKAGES = ('models', 'train', 'experiments')


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """Module -> the project modules it imports (`from package import module` counts the module alone)."""
  modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        submodules = {f'{node.module}.{alias.name}' for alias in node.names} & set(modules)
        edges |= submodules if len(submodules) == len(node.names) else {node.module, *submodules}
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected component of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_module_imports_itself_through_others():
  assert cycles(import_graph()) == []


def test_models_never_import_the_training_code():
  leaks = {m: sorted(e for e in edges if e.split('.')[0] in ('train', 'experiments'))
           for m, edges in import_graph().items() if m.split('.')[0] == 'models'}
  assert {m: e for m, e in leaks.items() if e} == {}


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
