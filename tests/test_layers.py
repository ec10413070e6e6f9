"""The package's layers (CONTRIBUTING.md): each imports only from the layers below it.

science (arrays in, arrays out) < learned (torch models on science's physics) < methods (the
registry of inversions) < settings (of a run) < files, nifti, bids (files) < interfaces (Nipype nodes) <
workflows < reports (HTML pages) < group (the group level) < cli. No module imports another module's private
names.
"""
import ast
from pathlib import Path

import qsmprep

PACKAGE = Path(qsmprep.__file__).parent
# What each layer may import from the package (its own layer included); the package root only
# holds the version.
ALLOWED = {
    'science': {'science'},
    'learned': {'science', 'learned'},
    'methods': {'science', 'learned', 'methods'},
    'settings': {'science', 'methods', 'settings'},
    'files': {'files'},
    'nifti': {'nifti'},
    'bids': {'science', 'nifti', 'bids'},
    'interfaces': {'science', 'learned', 'methods', 'settings', 'files', 'nifti', 'bids', 'interfaces'},
    'workflows': {'science', 'learned', 'methods', 'settings', 'files', 'nifti', 'bids', 'interfaces', 'workflows'},
    'reports': {'science', 'methods', 'files', 'nifti', 'bids', 'interfaces', 'reports'},
    'group': {'science', 'files', 'reports', 'group'},
    'cli': {'science', 'learned', 'methods', 'settings', 'files', 'nifti', 'bids', 'interfaces', 'workflows',
            'reports', 'group', 'cli'},
}
# Third-party frameworks that belong to one layer and above.
FRAMEWORKS = {'nipype': {'interfaces', 'workflows', 'cli'}}


def _imports(path, package):
    """(imported module as a dotted name, imported names, line) per import statement of ``path``."""
    package_parts = ('qsmprep',) + path.relative_to(package).with_suffix('').parts
    if path.name == '__init__.py':
        package_parts = package_parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + (path.name == '__init__.py')]
                module = '.'.join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module
            yield module, [alias.name for alias in node.names], node.lineno


def layer_breaches(package):
    """Every import in the package folder ``package`` that breaks the layering, in words."""
    breaches = []
    for path in sorted(package.rglob('*.py')):
        if path.parent == package and path.name == '__init__.py':
            continue
        layer = path.relative_to(package).parts[0].removesuffix('.py')
        imports = []
        for module, names, line in _imports(path, package):
            if module == 'qsmprep':  # ``from qsmprep import x``: x is a module, or the version
                imports += [(module if name == '__version__' else f'qsmprep.{name}', [], line) for name in names]
            else:
                imports.append((module, names, line))
        for module, names, line in imports:
            parts = module.split('.')
            where = f'{path.relative_to(package.parent)}:{line}'
            if parts[0] == 'qsmprep' and len(parts) > 1:
                if parts[1] not in ALLOWED[layer]:
                    breaches.append(f'{where}: {layer} imports {module}')
                private = [name for name in names if name.startswith('_')]
                if private and Path(*parts[1:]) != path.relative_to(package).with_suffix(''):
                    breaches.append(f'{where}: imports the private {", ".join(private)} of {module}')
            elif parts[0] in FRAMEWORKS and layer not in FRAMEWORKS[parts[0]]:
                breaches.append(f'{where}: {layer} imports {parts[0]}')
    return breaches


def test_every_module_imports_only_from_its_layer_and_below():
    breaches = layer_breaches(PACKAGE)
    assert not breaches, '\n'.join(breaches)


def test_the_layer_check_sees_upward_framework_and_private_imports(tmp_path):
    package = tmp_path / 'qsmprep'
    for folder, text in (('science', 'from ..cli.parser import positive_int\nimport nipype\n'
                                     'from .. import __version__\n'),
                         ('learned', 'from ..science.inversion import _private\nfrom .models import fine\n'
                                     'from .. import workflows\n')):
        (package / folder).mkdir(parents=True)
        (package / folder / 'module.py').write_text(text)
    breaches = layer_breaches(package)
    assert len(breaches) == 4, breaches
    assert any('learned imports qsmprep.workflows' in b for b in breaches)
    assert any('science imports qsmprep.cli.parser' in b for b in breaches)
    assert any('science imports nipype' in b for b in breaches)
    assert any('private _private of qsmprep.science.inversion' in b for b in breaches)
