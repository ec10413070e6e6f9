"""The group level on simulated cohorts at several voxel sizes: where the atlas lands and how far
the regional means are from the truth.

    python benchmarks/group_benchmark.py --out benchmarks/GROUP.md [--voxel-sizes 1 1.5 2 1.2x1.2x2]

Per voxel size, ``simulate_bids.simulate_cohort`` makes the three heads of ``COHORT_HEADS`` (the
template's own shape, and stretched by up to 6 % and tilted by 12 and -10 degrees), and the real
command line runs the participant level (without chi-separation) and then the group level against
the tests' TemplateFlow cache (nilearn's MNI 2009a T1w at 2 mm and an atlas of the phantom's 14
nuclei at 1 mm, ``simulate_bids.write_templateflow_home``). Per participant:

- atlas placement: the distance between where the group level's transform and the simulation's
  (``simulate_bids.template_to_subject``) put the template's brain voxels (mean and largest, mm);
- region means: the table's chi_mean minus the truth (``simulate_bids.true_region_means``: the
  simulated susceptibility over each nucleus as simulated, inside the local-field mask, referenced
  as the Chimap is), the largest absolute error over both sides of each nucleus (ppm); and, as
  "exact", the same for the Chimap over the simulated nuclei: what the participant level leaves,
  before the registration adds its part.

The group level's wall time (2 processes, three participants) is in each section's heading.
"""
import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulate_bids import (COHORT_HEADS, NUCLEI, TEST_ATLAS, TEST_TEMPLATE,  # noqa: E402
                                      simulate_cohort, template_to_subject, true_region_means,
                                      write_templateflow_home)
from qsmprep.files import read_itk_transform  # noqa: E402


def voxel_size(text):
    """'1.5' or '1.2x1.2x2' (mm) as three numbers."""
    sizes = [float(part) for part in text.split('x')]
    return tuple(sizes * 3) if len(sizes) == 1 else tuple(sizes)


def run_cohort(folder, size, qsmprep):
    """Simulate the cohort in ``folder`` and run both levels; the group level's wall seconds."""
    if not (folder / 'out' / 'sub-03').exists():
        simulate_cohort(folder / 'bids', size)
        subprocess.run([qsmprep, str(folder / 'bids'), str(folder / 'out'), 'participant', '-w', str(folder / 'work'),
                        '--nprocs', '2', '--no-chi-separation'], check=True)
    write_templateflow_home(folder / 'templateflow')
    shutil.rmtree(folder / 'out' / 'group', ignore_errors=True)  # else its transforms are reused
    started = time.perf_counter()
    subprocess.run([qsmprep, str(folder / 'bids'), str(folder / 'out'), 'group', '--template', TEST_TEMPLATE,
                    '--atlas', TEST_ATLAS, '--nprocs', '2'], check=True,
                   env={**os.environ, 'TEMPLATEFLOW_HOME': str(folder / 'templateflow')})
    return time.perf_counter() - started


def score(folder):
    """Per participant: placement (mean, largest mm) and, per nucleus, the largest |error| of the
    table and of the exact placement (ppm)."""
    template = folder / 'templateflow' / f'tpl-{TEST_TEMPLATE}'
    brain = nib.load(template / f'tpl-{TEST_TEMPLATE}_res-02_desc-brain_mask.nii.gz')
    voxels = np.argwhere(np.asanyarray(brain.dataobj) > 0)
    points = brain.affine @ np.c_[voxels, np.ones(len(voxels))].T
    with open(folder / 'out' / 'group' / 'desc-regions_stats.tsv', newline='') as stream:
        table = list(csv.DictReader(stream, delimiter='\t'))
    results = {}
    for label, head in enumerate(COHORT_HEADS, start=1):
        subject = f'sub-{label:02d}'
        found = read_itk_transform(folder / 'out' / 'group' / 'transforms' /
                                   f'{subject}_from-MEGRE_to-{TEST_TEMPLATE}_mode-image_xfm.txt')
        distances = np.linalg.norm(((found - template_to_subject(head)) @ points)[:3], axis=0)
        chimap = nib.load(folder / 'out' / subject / 'anat' / f'{subject}_Chimap.nii.gz').get_fdata()
        truth = true_region_means(folder / 'bids', folder / 'out', f'{label:02d}')
        exact = true_region_means(folder / 'bids', folder / 'out', f'{label:02d}', chimap=chimap)
        table_error, exact_error = {}, {}
        for row in table:
            if row['participant_id'] == subject:
                nucleus, region = row['region'].rsplit('_', 1)[0], row['region']
                for errors, value in ((table_error, float(row['chi_mean'])), (exact_error, exact[region])):
                    errors[nucleus] = max(errors.get(nucleus, 0.0), abs(value - truth[region]))
        results[subject] = {'placement': (distances.mean(), distances.max()), 'table': table_error,
                            'exact': exact_error}
    return results


def write_table(path, sections, command):
    nuclei = [name for name, *_ in NUCLEI]
    lines = ['# Group level on simulated cohorts: atlas placement and regional means against the truth', '',
             f'Made by `{command}` on {platform.machine()}, {os.cpu_count()} cores, {time.strftime("%Y-%m-%d")}. '
             'See the script\'s docstring for the heads, the template and the scores.', '',
             'Placement: distance between the found and the true template-to-subject transforms over the '
             'template\'s brain, mean / largest (mm). Nuclei: largest |chi_mean - truth| of the two sides (ppm), '
             'the table\'s / the Chimap over the simulated nuclei.']
    for size, (seconds, results) in sections.items():
        lines += ['', f'## {"x".join(f"{value:g}" for value in size)} mm (group level {seconds:.0f} s)', '',
                  '| participant | placement (mm) | ' + ' | '.join(nuclei) + ' |',
                  '|---|---|' + '---|' * len(nuclei)]
        for subject, result in results.items():
            lines.append(f'| {subject} | {result["placement"][0]:.2f} / {result["placement"][1]:.2f} | ' + ' | '.join(
                f'{result["table"][name]:.3f} / {result["exact"][name]:.3f}' for name in nuclei) + ' |')
        worst = max(max(result['table'].values()) for result in results.values())
        lines.append(f'\nLargest error of the table: {worst:.3f} ppm.')
    Path(path).write_text('\n'.join(lines) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/GROUP.md'))
    parser.add_argument('--voxel-sizes', nargs='+', default=['1', '1.5', '2', '1.2x1.2x2'],
                        help='voxel sizes (mm) of the cohorts: one number or three joined by x')
    parser.add_argument('--data', type=Path, default=Path('/tmp/qsmprep_group_benchmark'),
                        help='work folder; cohorts already run there are reused')
    args = parser.parse_args()
    qsmprep = str(Path(sys.executable).with_name('qsmprep'))
    sections = {}
    for text in args.voxel_sizes:
        folder = args.data / f'vs-{text}'
        seconds = run_cohort(folder, voxel_size(text), qsmprep)
        sections[voxel_size(text)] = (seconds, score(folder))
        print(f'{text} mm: done', flush=True)
    command = f'python benchmarks/group_benchmark.py --out {args.out} --voxel-sizes {" ".join(args.voxel_sizes)}'
    write_table(args.out, sections, command)
    print(Path(args.out).read_text())


if __name__ == '__main__':
    main()
