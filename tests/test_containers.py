"""The container recipes, checked where there is no Docker daemon: the wheel that the Dockerfile
installs carries what qsmprep loads when it runs, and the recipes agree with the package, the
Makefile and each other (torch pin, version tag, template cache, entry point)."""
import configparser
import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import qsmprep

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / 'Dockerfile').read_text()
DEFINITION = (ROOT / 'containers' / 'qsmprep.def').read_text()


def test_the_wheel_the_image_installs_carries_the_models_and_the_report_files(tmp_path):
    """``COPY . /src/qsmprep`` then ``pip install /src/qsmprep``: built here from a copy of the tree
    without what .dockerignore leaves out."""
    ignored = [line.strip().removeprefix('**/') for line in (ROOT / '.dockerignore').read_text().splitlines()
               if line.strip() and not line.startswith('#')]
    source = tmp_path / 'src'
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*ignored, 'build', '.pytest_cache'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation',
                    '--wheel-dir', str(tmp_path / 'wheel'), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / 'wheel').glob('qsmprep-*.whl')
    assert wheel.name.startswith(f'qsmprep-{qsmprep.__version__}-')
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / 'qsmprep'
    needed = [path for folder in ('learned/models', 'reports/data') for path in (package / folder).rglob('*')
              if path.is_file() and '__pycache__' not in path.parts]
    needed += [path for path in package.rglob('*.py') if '__pycache__' not in path.parts]
    assert any(path.suffix == '.pt' for path in needed) and any(path.name == 'model_card.json' for path in needed)
    missing = [str(path.relative_to(ROOT)) for path in needed if path.relative_to(ROOT).as_posix() not in names]
    assert not missing, missing


def test_recipes_agree_with_the_package_the_makefile_and_each_other():
    version = qsmprep.__version__
    torch_pins = re.findall(r'torch==([\w.]+)', DOCKERFILE)
    assert torch_pins and set(torch_pins) == set(re.findall(r'torch==([\w.]+)', (ROOT / 'Makefile').read_text()))
    assert re.search(rf'^From: qsmprep:{re.escape(version)}$', DEFINITION, re.M)
    assert re.search(rf'^\s*Version {re.escape(version)}$', DEFINITION, re.M)
    for path in ('README.md', 'scripts/slurm_array.sh'):
        tags = set(re.findall(r'qsmprep[:-](\d+\.\d+\.\d+)', (ROOT / path).read_text()))
        assert tags == {version}, (path, tags)
    cache = re.search(r'TEMPLATEFLOW_HOME=(\S+)', DOCKERFILE).group(1)
    assert re.search(rf'export TEMPLATEFLOW_HOME={re.escape(cache)}$', DEFINITION, re.M)
    assert f'chmod -R a+rX {cache}' in DOCKERFILE


def test_what_the_dockerfile_runs_exists():
    """Its ``python -c`` imports, and the entry point, a console script of the package."""
    for module, name in re.findall(r'from ([\w.]+) import (\w+)', DOCKERFILE):
        assert callable(getattr(importlib.import_module(module), name)), (module, name)
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    scripts = [line.split('=')[0].strip() for line in config['options.entry_points']['console_scripts'].splitlines()
               if line.strip()]
    (entry_point,) = re.findall(r'^ENTRYPOINT \["(\w+)"\]', DOCKERFILE, re.M)
    assert entry_point in scripts
