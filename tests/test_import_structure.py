"""No import cycles among jtl's modules, counting imports inside functions, read with ast alone.

An edge A -> B means that executing an import statement anywhere in A (module level, a function,
an `if TYPE_CHECKING:` block) runs B: the module named, a submodule named by `from X import sub`,
and every package on the way that is not already an enclosing package of A. An enclosing package
of A counts only when A reads a name from it (`from jtl.models import create_model` inside
jtl.models.resnet would be an edge to jtl.models; `from jtl import params` is an edge to
jtl.params only).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "jtl"


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every .py file under jtl/ (a package is its __init__)."""
  mods = {}
  for d, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in names:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mods[name.removesuffix(".__init__")] = path
  return mods


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node: ast.AST, module: str, is_package: bool, mods) -> list[tuple[str, bool]]:
  """(target module, whether a name is read from it) for one import statement."""
  if isinstance(node, ast.Import):
    return [(a.name, False) for a in node.names]
  if node.level:
    package = module if is_package else module.rpartition(".")[0]
    base = package.split(".")[:len(package.split(".")) - node.level + 1]
    source = ".".join(base + ([node.module] if node.module else []))
  else:
    source = node.module
  out = []
  for alias in node.names:
    sub = f"{source}.{alias.name}"
    out.append((sub, False) if sub in mods else (source, True))
  return out


def import_graph() -> dict[str, dict[str, str]]:
  """{module: {imported module: "file:line" of the first import statement that runs it}}."""
  mods = _modules()
  graph: dict[str, dict[str, str]] = {m: {} for m in mods}
  for module, path in mods.items():
    is_package = path.endswith("__init__.py")
    own = set(_ancestors(module))
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for target, reads_name in _imported(node, module, is_package, mods):
        while target and target not in mods and "." in target:
          target = target.rpartition(".")[0]
        if target not in mods:
          continue  # not a jtl module
        runs = [a for a in _ancestors(target) if a in mods and a not in own] + [target]
        for t in runs:
          if t != module and (t not in own or reads_name):
            graph[module].setdefault(t, f"{os.path.relpath(path, ROOT)}:{node.lineno}")
  return graph


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
  """One cycle (a list of modules, first == last) through each strongly connected component."""
  index, low, stack, on, comps = {}, {}, [], set(), []

  def visit(v):  # Tarjan
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(comp)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for comp in comps:
    start = min(comp)
    # Breadth-first from start, inside the component, back to start: a shortest cycle.
    parent, frontier, end = {start: None}, [start], None
    while frontier and end is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v]):
          if w == start:
            end = v
            break
          if w in comp and w not in parent:
            parent[w] = v
            nxt.append(w)
        if end is not None:
          break
      frontier = nxt
    path = [start]  # start <- end <- parent[end] <- ... <- start
    while end is not None:
      path.append(end)
      end = parent[end]
    cycles.append(path[::-1])
  return cycles


def _describe(cycle, graph) -> str:
  steps = [f"  {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
  return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_the_graph_sees_function_level_and_relative_imports():
  graph = import_graph()
  assert "jtl.models" in graph["jtl.export"]  # `from jtl.models import ...` inside a function
  assert "jtl.models.registry" in graph["jtl.models.resnet"]
  assert "jtl" not in graph["jtl.models.factory"]  # `from jtl import params` runs jtl.params


def test_no_import_cycles():
  graph = import_graph()
  cycles = find_cycles(graph)
  assert not cycles, "import cycles in jtl/ (function-level imports counted):\n" + "\n".join(
      _describe(c, graph) for c in cycles)


# The layers, lowest first: a module may import its own layer and the ones below, never one
# above. A unit is a top-level module or package of jtl (a package is one unit: all its modules
# share its layer). The package root `jtl` itself is left out (it re-exports create_model).
LAYERS = (
    # Foundations: nothing of jtl's below them.
    ("errors", "params", "distributed", "budget", "metrics", "intervals", "run_record", "report",
     "lock"),
    # The pieces a run is made of: config, data, weights, models, deployment formats.
    ("config", "config_file", "class_weights", "workdir", "data", "weights", "models", "deploy"),
    # The engine's parts: optimizer and steps, evaluation, the loop, its hooks, checkpoints,
    # the feature cache, the linear probe's solve, pruning's transforms, the export and
    # prediction of finished runs.
    ("optim", "pruning", "steps", "evaluation", "feature_cache", "linear_probe", "loop", "hooks",
     "checkpoint", "checkpoint_reads", "error_analysis", "report_md", "export", "predict"),
    # Runs: planned, trained, finished; the range test, pruned runs, ablation studies.
    ("plan", "final", "train", "lr_find", "prune_runs", "prune", "ablation", "ablation_summary"),
    # Commands: argument parsing and one-line errors, the `jtl` dispatcher.
    ("cli_errors", "commands", "cli", "main", "__main__"),
)


def _unit(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def _layer_of() -> dict[str, int]:
  return {unit: i for i, units in enumerate(LAYERS) for unit in units}


def test_every_module_has_a_layer():
  layer = _layer_of()
  missing = sorted({_unit(m) for m in _modules() if _unit(m) and _unit(m) not in layer})
  assert not missing, f"jtl modules in no layer of LAYERS: {missing}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
  layer, graph = _layer_of(), import_graph()
  upward = []
  for module, targets in graph.items():
    source = _unit(module)
    for target, where in targets.items():
      if source is None or _unit(target) is None:
        continue
      if layer[_unit(target)] > layer[source]:
        upward.append(f"  {module} (layer {layer[source]}) imports {target} (layer "
                      f"{layer[_unit(target)]}) at {where}")
  assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_the_library_never_imports_the_study_scripts():
  for module, path in _modules().items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
               else [])
      assert not any(n == "experiments" or n.startswith("experiments.") for n in names), (
          f"{path}:{node.lineno} imports the top-level experiments package")
