"""Several head orientations end to end: registration, COSMOS and least-squares STI against the truth.

    python benchmarks/orientations_benchmark.py --out benchmarks/ORIENTATIONS.md [--voxel-size 1.5] [--seeds 0 1]
        [--same-voxels]

Per seed, simulates one 3 T head (white matter anisotropic by 0.02 ppm times its fraction, along
smooth random fibres) scanned in 6 orientations, one run each: upright, pitched (about scanner x)
by +25 and -25 degrees, rolled (about y) by +25 and -25, and pitched and rolled by 20 each. The
head turns inside a fixed grid, resampled (``simulate_bids.simulate_orientations(resample=True)``);
with ``--same-voxels`` only the affine turns, so registration has the same voxels to match. Runs
`qsmprep --multi-orientation` on the raw runs with its defaults, then scores:

- registration: each run's transform against the known one (largest displacement over the brain,
  rotation error);
- COSMOS from the first 2, 3, 4 and all 6 runs (the app's COSMOS node on its own registered
  fields), against TV and LP-CNN on run 1 alone; susceptibility NRMSE, HFEN and XSIM over the true
  brain inside the combined mask, referenced to its mean;
- least-squares STI from 4 and 6 runs: MMS NRMSE, median principal-eigenvector error in white matter
  (fraction > 0.8) and MSA correlation over the brain;
- both also from the true local fields of the runs, brought onto run 1's grid by the known transforms
  and masked to the true brains: what the inversion alone makes of perfect fields;
- seconds of each stage on this machine.

Nothing here is tuned on the in-vivo data.
"""
import argparse
import gzip
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulate_bids import simulate_orientations  # noqa: E402
from qsmprep import methods  # noqa: E402
from qsmprep.files import read_itk_transform  # noqa: E402
from qsmprep.learned import missing_torch_message  # noqa: E402
from qsmprep.science import metrics, orientations, registration  # noqa: E402
from qsmprep.science.physics import voxel_size_from_affine  # noqa: E402

TURNS = [(0, 0), (25, 0), (25, 1), (-25, 0), (-25, 1), ((20, 0), (20, 1))]
ANISOTROPY_PPM = 0.02
SUBSETS = (2, 3, 4, 6)
STI_SUBSETS = (4, 6)
STAGES = ('load_megre', 'brain_mask', 'unwrap_phase', 'fit_total_field', 'remove_background', 'invert',
          'register_orientations', 'cosmos', 'least_squares_sti')


def _load(path):
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)


def node_seconds(work_dir, node):
    """Total seconds Nipype recorded for every node of this name (e.g. one per run)."""
    total = 0.0
    for result in Path(work_dir).glob(f'qsmprep_wf/**/{node}/result_{node}.pklz'):
        with gzip.open(result, 'rb') as handle:
            total += float(getattr(pickle.load(handle).runtime, 'duration', float('nan')))
    return total


def registration_errors(transforms, reference_affine, anat, brain):
    """Per later run: largest displacement error (mm) over the brain and rotation error (degrees)."""
    points = reference_affine @ np.c_[np.argwhere(brain), np.ones(int(brain.sum()))].T
    errors = []
    for run in range(2, len(TURNS) + 1):
        expected = transforms[run - 1]
        found = read_itk_transform(anat / f'sub-01_run-{run}_from-run{run}_to-run1_mode-image_xfm.txt')
        residual = found[:3, :3] @ expected[:3, :3].T
        angle = np.degrees(np.arccos(np.clip((np.trace(residual) - 1) / 2, -1, 1)))
        errors.append((float(np.linalg.norm((found - expected) @ points, axis=0).max()), float(angle)))
    return errors


def chi_scores(estimate, truth, mask):
    return {'NRMSE': metrics.nrmse(estimate, truth, mask), 'HFEN': metrics.hfen(estimate, truth, mask),
            'XSIM': metrics.xsim(estimate, truth, mask)}


def score_head(seed, voxel_size, data_dir, resample):
    bids_dir, output_dir, work_dir = data_dir / f'bids_{seed}', data_dir / f'out_{seed}', data_dir / f'work_{seed}'
    for folder in (bids_dir, output_dir, work_dir):
        shutil.rmtree(folder, ignore_errors=True)
    phantom, transforms = simulate_orientations(bids_dir, TURNS, voxel_size_mm=voxel_size, seed=seed,
                                                anisotropy_ppm=ANISOTROPY_PPM, resample=resample)
    command = [str(Path(sys.executable).with_name('qsmprep')), str(bids_dir), str(output_dir), 'participant',
               '-w', str(work_dir), '--multi-orientation', '--no-chi-separation']
    started = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - started
    anat = output_dir / 'sub-01' / 'anat'
    brain = phantom['brain_mask']
    true_chi = np.where(brain, phantom['chi'], 0)
    combined = _load(anat / 'sub-01_desc-brain_mask.nii.gz') > 0
    evaluation = combined & brain
    run_image = [nib.load(bids_dir / 'sub-01' / 'anat' / f'sub-01_run-{run}_echo-1_part-mag_MEGRE.nii.gz')
                 for run in range(1, len(TURNS) + 1)]
    scores = {'registration': registration_errors(transforms, run_image[0].affine, anat, brain),
              'coverage': float(evaluation.sum() / brain.sum()),
              'TV, run 1': chi_scores(_load(anat / 'sub-01_run-1_Chimap.nii.gz'), true_chi, evaluation)}
    # The COSMOS node's own inputs: every run's local field and mask on run 1's grid, and B0 there.
    registered = next(work_dir.glob('qsmprep_wf/**/register_orientations/result_register_orientations.pklz'))
    with gzip.open(registered, 'rb') as handle:
        outputs = pickle.load(handle).outputs
    fields = np.stack([_load(path) for path in outputs.local_fields])
    masks = np.stack([_load(path) > 0 for path in outputs.localfield_masks])
    voxel = voxel_size_from_affine(nib.load(outputs.local_fields[0]).affine)
    for count in SUBSETS:
        mask = np.logical_and.reduce(masks[:count])
        chi = orientations.cosmos(fields[:count] * mask, mask, voxel, outputs.b0_dirs[:count])
        scores[f'COSMOS, {count} runs'] = chi_scores(chi, true_chi, evaluation)
    if not missing_torch_message('lpcnn'):
        chi, _ = methods.invert('lpcnn', [fields[0]], masks[0], voxel, [outputs.b0_dirs[0]])
        scores['LP-CNN, run 1'] = chi_scores(chi, true_chi, evaluation)
    truth = bids_dir / 'derivatives' / 'truth' / 'sub-01' / 'anat'
    true_fields, true_masks = [], []
    for run, transform in enumerate(transforms, start=1):
        known = registration.RigidTransform(rotation=transform[:3, :3], translation=transform[:3, 3])
        for name, order, collected in (('desc-local_fieldmap', 1, true_fields), ('desc-brain_mask', 0, true_masks)):
            collected.append(registration.resample(_load(truth / f'sub-01_run-{run}_{name}.nii.gz'),
                                                   run_image[run - 1].affine, run_image[0].affine, brain.shape,
                                                   known, order=order))
    true_masks = np.stack(true_masks) > 0
    true_fields = np.stack(true_fields) * true_masks
    for count in SUBSETS:
        mask = np.logical_and.reduce(true_masks[:count])
        chi = orientations.cosmos(true_fields[:count] * mask, mask, voxel, outputs.b0_dirs[:count])
        scores[f'COSMOS, {count} runs, true local fields'] = chi_scores(chi, true_chi, evaluation)
    white_matter = brain & (phantom['wm_fraction'] > 0.8)
    true_msa = phantom['anisotropy']
    for count in STI_SUBSETS:
        for source, data, data_masks in (('', fields, masks), (', true local fields', true_fields, true_masks)):
            mask = np.logical_and.reduce(data_masks[:count])
            tensor = orientations.sti_least_squares(data[:count] * mask, mask, voxel, outputs.b0_dirs[:count])
            mms, msa, pev = orientations.tensor_maps(tensor, mask)
            inside = mask & brain
            angle = np.degrees(np.arccos(np.clip(np.abs((pev * phantom['fibres']).sum(axis=0)), 0, 1)))
            scores[f'STI, {count} runs{source}'] = {
                'MMS NRMSE': metrics.nrmse(mms, true_chi, inside),
                'PEV error in WM (deg)': float(np.median(angle[white_matter & mask])),
                'MSA correlation': float(np.corrcoef(msa[inside], true_msa[inside])[0, 1])}
    scores['seconds'] = {stage: node_seconds(work_dir, stage) for stage in STAGES}
    scores['seconds']['whole command'] = wall
    scores['grid'] = 'x'.join(map(str, brain.shape))
    return scores


def write_table(path, results, command, voxel_size, resample):
    seeds = list(results)
    header = '| | ' + ' | '.join(f'seed {seed}' for seed in seeds) + ' |\n|---|' + '---|' * len(seeds) + '\n'
    how = 'the head turned inside one grid' if resample else 'the same voxels under turned affines'
    lines = [f'# Several orientations, end to end ({voxel_size} mm, 3 T, 6 runs, {how})', '',
             f'Made by `{command}` on {platform.machine()}, {os.cpu_count()} cores, '
             f'{time.strftime("%Y-%m-%d")}. See the script\'s docstring for the heads and the scores.', '',
             '## Registration (largest displacement error over the brain, mm / rotation error, degrees)', '',
             header.rstrip('\n')]
    for run in range(2, len(TURNS) + 1):
        lines.append(f'| run {run} ({TURNS[run - 1]}) | ' + ' | '.join(
            f'{results[s]["registration"][run - 2][0]:.2f} / {results[s]["registration"][run - 2][1]:.2f}'
            for s in seeds) + ' |')
    lines += ['', '## Susceptibility (NRMSE % / HFEN % / XSIM over the true brain in the combined mask)', '',
              header.rstrip('\n')]
    lines.append('| coverage of the brain | ' + ' | '.join(f'{results[s]["coverage"]:.3f}' for s in seeds) + ' |')
    chi_rows = [key for key in results[seeds[0]] if key.startswith(('TV', 'LP-CNN', 'COSMOS'))]
    for key in chi_rows:
        lines.append(f'| {key} | ' + ' | '.join(
            f'{results[s][key]["NRMSE"]:.1f} / {results[s][key]["HFEN"]:.1f} / {results[s][key]["XSIM"]:.3f}'
            for s in seeds) + ' |')
    lines += ['', '## Least-squares STI (MMS NRMSE % / median PEV error in white matter, degrees / MSA correlation)',
              '', header.rstrip('\n')]
    for key in [key for key in results[seeds[0]] if key.startswith('STI')]:
        lines.append(f'| {key} | ' + ' | '.join(
            f'{results[s][key]["MMS NRMSE"]:.1f} / {results[s][key]["PEV error in WM (deg)"]:.1f} / '
            f'{results[s][key]["MSA correlation"]:.2f}' for s in seeds) + ' |')
    lines += ['', '## Seconds on this machine (summed over runs where a stage runs per run)', '',
              header.rstrip('\n')]
    for stage in list(results[seeds[0]]['seconds']):
        lines.append(f'| {stage} | ' + ' | '.join(f'{results[s]["seconds"][stage]:.1f}' for s in seeds) + ' |')
    lines.append('| grid (voxels) | ' + ' | '.join(results[s]['grid'] for s in seeds) + ' |')
    Path(path).write_text('\n'.join(lines) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/ORIENTATIONS.md'))
    parser.add_argument('--data', type=Path, default=Path('/tmp/qsmprep_orientations'))
    parser.add_argument('--voxel-size', type=float, default=1.5)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--same-voxels', action='store_true', help='turn the affines, not the head in the grid')
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    results = {seed: score_head(seed, args.voxel_size, args.data, not args.same_voxels) for seed in args.seeds}
    command = (f'python benchmarks/orientations_benchmark.py --out {args.out} --voxel-size {args.voxel_size} '
               f'--seeds {" ".join(map(str, args.seeds))}' + (' --same-voxels' if args.same_voxels else ''))
    write_table(args.out, results, command, args.voxel_size, not args.same_voxels)
    print(Path(args.out).read_text())


if __name__ == '__main__':
    main()
