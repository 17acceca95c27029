"""The shape of the code: one home per job, data flowing one way, no import
cycle, and the house style. Each check names what broke it."""

import ast
import io
import pathlib
import re
import tokenize
import tomllib

from conftest import ROOT

PACKAGE = ROOT / "cxr_jax"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, name: str, top_level: bool):
  """cxr_jax modules imported at module level (or inside functions)."""
  found = []
  for node in ast.walk(tree):
    in_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    if in_function == top_level:
      continue
    for sub in (ast.walk(node) if in_function else [node]):
      if isinstance(sub, ast.ImportFrom) and sub.module:
        base = sub.module
        if sub.level:  # relative import
          base = ".".join(name.split(".")[:-sub.level] + [sub.module])
        for alias in sub.names:
          found.append((f"{base}.{alias.name}", sub.lineno))
      elif isinstance(sub, ast.Import):
        found += [(a.name, sub.lineno) for a in sub.names]
  if top_level:
    found = [(m, n) for m, n in found
             if any(isinstance(s, (ast.Import, ast.ImportFrom)) and
                    s.lineno == n for s in tree.body)]
  return [(m, n) for m, n in found if m.startswith("cxr_jax")]


def test_no_import_placed_inside_a_function_to_hide_a_cycle():
  """Only the CLI imports lazily (so `cxr-jax --help` starts without JAX)."""
  offenders = []
  for path in SOURCES:
    if path.name == "cli.py":
      continue
    tree = ast.parse(path.read_text())
    offenders += [f"{path.relative_to(ROOT)}:{line} imports {mod}"
                  for mod, line in _imports(tree, _module_name(path), False)]
  assert not offenders, offenders


def test_no_import_cycle():
  modules = {_module_name(p): p for p in SOURCES}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for mod, _ in _imports(ast.parse(path.read_text()), name, True):
      # `from cxr_jax.x import y` imports module cxr_jax.x.y or cxr_jax.x.
      deps.add(mod if mod in modules else mod.rpartition(".")[0])
    graph[name] = {d for d in deps if d in modules and d != name}
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in graph[node]:
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep)
    stack.pop()
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node)


def _package_text() -> str:
  return "\n".join(p.read_text() for p in SOURCES)


def test_one_home_for_each_constant_and_helper():
  text = _package_text()
  assert text.count('"nih_metadata"') == 1  # metadata.METADATA_DIR
  assert len(re.findall(r"^def _?at_least_float32", text, re.M)) == 1
  # The paper's Adadelta settings are read in one place.
  readers = [p.name for p in SOURCES if "adadelta_rho" in p.read_text()]
  assert readers == ["optim.py"], readers
  # Helpers only benchmarks or tests use live there, not in the library.
  for helper in ("def mass_radius", "def to_model_input_host"):
    assert helper not in text, helper


def test_analysis_never_reads_parameters_by_name():
  """CAM comes from the model's class maps, for any backbone."""
  for name in ("cam.py", "localization.py", "predict.py", "inference.py",
               "evaluation.py", "demo.py"):
    source = (PACKAGE / name).read_text()
    assert '["kernel"]' not in source and "Mixed_7c" not in source, name


def test_two_space_indentation():
  for path in SOURCES + sorted((ROOT / "tests").glob("*.py")):
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    first = next((t for t in tokens if t.type == tokenize.INDENT), None)
    if first is not None:
      assert len(first.string) == 2, f"{path.name}:{first.start[0]}"


def test_readme_commands_table_is_one_table():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
  rows = [i for i, line in enumerate(section.splitlines())
          if line.startswith("| `cxr-jax ")]
  assert rows and rows == list(range(rows[0], rows[0] + len(rows))), rows


def test_plain_test_install_does_not_pull_torch():
  """`pip install -e '.[test]'` must not resolve the CUDA build of torch."""
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  assert not any(dep.startswith("torch") for dep in extras["test"])
