"""Screenshots of qsmprep's HTML pages, as a browser shows them, from runs on simulated heads.

    python benchmarks/report_screenshots.py --out benchmarks/screenshots [--voxel-size 2]

Simulates three heads of different sizes and tilts (``simulate_bids.COHORT_HEADS``), runs the real
``qsmprep`` command line at the participant level and then at the group level (with a TemplateFlow
cache of nilearn's MNI template and an atlas of the phantom's nuclei, as the tests build it), and
opens the pages in headless Chromium (``benchmarks/browser.py``; needs Debian's ``chromium`` and
``chromium-driver``): ``report_subject.png`` (sub-02's report, B0 tilted by 12 degrees) and
``report_group.png`` (the group page), each the whole page at 1400 pixels wide.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import browser  # noqa: E402
from benchmarks.simulate_bids import (TEST_ATLAS, TEST_TEMPLATE, simulate_cohort,  # noqa: E402
                                      write_templateflow_home)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, required=True, help='folder of the screenshots')
    parser.add_argument('--voxel-size', type=float, default=2.0, help='voxel size of the simulated heads (mm)')
    args = parser.parse_args()
    if browser.chromium_paths() is None:
        raise SystemExit('report_screenshots: needs chromium and chromedriver (apt-get install chromium '
                         'chromium-driver)')
    args.out.mkdir(parents=True, exist_ok=True)
    qsmprep = str(Path(sys.executable).with_name('qsmprep'))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        simulate_cohort(root / 'bids', voxel_size_mm=args.voxel_size)
        write_templateflow_home(root / 'templateflow')
        out = str(root / 'out')
        subprocess.run([qsmprep, str(root / 'bids'), out, 'participant', '-w', str(root / 'work')], check=True)
        subprocess.run([qsmprep, str(root / 'bids'), out, 'group', '--template', TEST_TEMPLATE, '--atlas', TEST_ATLAS],
                       check=True, env={**os.environ, 'TEMPLATEFLOW_HOME': str(root / 'templateflow')})
        for page_path, name in ((root / 'out' / 'sub-02.html', 'report_subject.png'),
                                (root / 'out' / 'group' / 'regions.html', 'report_group.png')):
            page = browser.open_page(page_path, screenshot=args.out / name)
            print(f'{args.out / name}: {len(page["images"])} figures, console: {page["console"] or "quiet"}')


if __name__ == '__main__':
    main()
