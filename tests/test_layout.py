"""Imports point down only: emailsvc -> tasks -> taskq -> models -> mailkit (watcher and dashboard sit on tasks).

A module may import its own package and anything below its layer, never
above: mailkit imports nothing of ours, models no task machinery, taskq never
tasks.py or the HTTP layer (it is handed the Huey instance and the registry).
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {'emailsvc': 5, 'dashboard': 4, 'contract': 4,  # emailsvc.py mounts the dashboard's app, uses the contract
          'watcher': 4,  # its own process: reads accounts, asks tasks to decrypt and to queue syncs
         'tasks': 3, 'taskq': 2, 'models': 1, 'mailkit': 0}


def our_imports(source):
    """The top-level names of our own modules that `source` imports, anywhere in it (functions too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names & set(LAYERS)


def wrong_way(module, source):
    """The imports of `module` (a top-level name) that point up or sideways into another layer."""
    layer = LAYERS[module]
    return sorted(name for name in our_imports(source) if name != module and LAYERS[name] >= layer)


def service_modules():
    for path in sorted(ROOT.glob('*.py')) + sorted(ROOT.glob('mailkit/*.py')) + sorted(ROOT.glob('taskq/*.py')):
        module = path.parent.name if path.parent != ROOT else path.stem
        if module in LAYERS:
            yield path.relative_to(ROOT), module


@pytest.mark.parametrize('path,module', list(service_modules()), ids=lambda v: str(v))
def test_imports_point_down(path, module):
    assert wrong_way(module, (ROOT / path).read_text()) == []


def test_every_layer_has_modules():
    assert {module for _, module in service_modules()} >= {'emailsvc', 'tasks', 'taskq', 'models', 'mailkit'}


@pytest.mark.parametrize('module,source,bad', [
    ('mailkit', 'import models', ['models']),
    ('mailkit', 'def f():\n    from taskq import ledger', ['taskq']),
    ('models', 'import tasks', ['tasks']),
    ('taskq', 'from tasks import huey', ['tasks']),
    ('taskq', 'import emailsvc', ['emailsvc']),
    ('tasks', 'import emailsvc', ['emailsvc']),
    ('taskq', 'import models\nfrom mailkit import logs\nfrom taskq import ledger', []),
])
def test_the_check_catches_a_wrong_import(module, source, bad):
    assert wrong_way(module, source) == bad
