"""The module graph: no import circles, and the layering the README states
(pure NumPy clustering, flags only in config.py and the entry points)."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {'run', 'evaluate'}


def _modules():
  """{module name: parsed AST} of the project (tests and benchmarks aside)."""
  modules = {}
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if d not in ('tests', 'benchmarks', 'runs')
               and not d.startswith(('.', '_'))]
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        module = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        module = module.removesuffix('.__init__')
        with open(path) as f:
          modules[module] = ast.parse(f.read())
  return modules


def _imports(tree):
  """Top-level names of every module `tree` imports (anywhere in it)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names |= {f'{node.module}.{alias.name}' for alias in node.names}
  return names


MODULES = _modules()
GRAPH = {name: {m for m in _imports(tree) if m in MODULES} - {name}
         for name, tree in MODULES.items()}


def _reachable(start):
  seen, stack = set(), [start]
  while stack:
    for nxt in GRAPH[stack.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        stack.append(nxt)
  return seen


def test_the_project_has_its_modules():
  assert {'run', 'config', 'experiment', 'objective', 'fnc', 'sogcl',
          'ifnd', 'clustering', 'features', 'evaluate', 'actions',
          'pictures', 'model', 'resnet', 'data', 'data_util', 'trainer',
          'checkpoints', 'lars_optimizer'} <= set(MODULES)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_module_imports_itself_through_others(module):
  assert module not in _reachable(module), (
      f'{module} is part of an import circle: {sorted(GRAPH[module])}')


def test_a_circle_would_be_found():
  """The check above can fail: a graph with a circle has one."""
  global GRAPH
  saved = GRAPH
  try:
    GRAPH = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}}
    assert 'a' in _reachable('a')
  finally:
    GRAPH = saved


def test_clustering_imports_no_tensorflow_or_model_code():
  imported = set().union(*(_imports(MODULES[m])
                           for m in _reachable('clustering') | {'clustering'}))
  assert not any(m.split('.')[0] == 'tensorflow' for m in imported)
  assert not _reachable('clustering')


def test_objectives_do_not_depend_on_each_other_or_on_evaluation():
  for name in ('fnc', 'sogcl', 'ifnd'):
    others = {'fnc', 'sogcl', 'ifnd', 'evaluate', 'run', 'experiment',
              'config'} - {name}
    assert not _reachable(name) & others, name


def _touches_flags(tree):
  for node in ast.walk(tree):
    if (isinstance(node, ast.ImportFrom) and node.module == 'absl' and
        'flags' in {alias.name for alias in node.names}):
      return True
    if (isinstance(node, ast.Import) and
        'absl.flags' in {alias.name for alias in node.names}):
      return True
    if isinstance(node, ast.Attribute) and node.attr == 'FLAGS':
      return True
  return False


def test_only_config_and_entry_points_touch_absl_flags():
  users = {name for name, tree in MODULES.items() if _touches_flags(tree)}
  assert 'config' in users
  assert users <= {'config'} | ENTRY_POINTS, users
