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
- COSMOS from the first 2, 3, 4 and all 6 runs (the app's COSMOS method on its own registered
  fields), against TV and LP-CNN on run 1 alone and LP-CNN on the first 4 runs; susceptibility
  NRMSE, HFEN and XSIM over the true brain inside the combined mask, referenced to its mean;
- the tensor by least squares from 4 and 6 runs and by the shipped DeepSTI from 1, 3, 4 and 6:
  MMS NRMSE, median principal-eigenvector error in white matter (fraction > 0.8) and MSA
  correlation over the brain (``metrics.sti_scores``);
- COSMOS and the tensor also from true local fields: each run's field of the reference head computed on
  run 1's grid with that run's true B0 direction there, in the true brain: what the inversion alone
  makes of perfect fields;
- seconds of each stage on this machine, for the 6 runs and for the first 4 alone with
  ``--sti deepsti`` (the learned rows need torch).

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

from benchmarks.simulate_bids import simulate_orientations, true_local_field  # noqa: E402
from qsmprep import methods  # noqa: E402
from qsmprep.files import read_itk_transform  # noqa: E402
from qsmprep.learned import missing_torch_message  # noqa: E402
from qsmprep.science import metrics, orientations, registration  # noqa: E402
from qsmprep.science.physics import TENSOR_COMPONENTS, traceless_tensor, voxel_size_from_affine  # noqa: E402

TURNS = [(0, 0), (25, 0), (25, 1), (-25, 0), (-25, 1), ((20, 0), (20, 1))]
ANISOTROPY_PPM = 0.02
SUBSETS = (2, 3, 4, 6)
STI_SUBSETS = (4, 6)
DEEPSTI_SUBSETS = (1, 3, 4, 6)
STAGES = ('load_megre', 'brain_mask', 'unwrap_phase', 'fit_total_field', 'remove_background', 'invert',
          'register_orientations', 'cosmos', 'sti_tensor')


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
    learned_missing = missing_torch_message('lpcnn')
    if not learned_missing:
        chi, _ = methods.invert('lpcnn', [fields[0]], masks[0], voxel, [outputs.b0_dirs[0]], threads=os.cpu_count())
        scores['LP-CNN, run 1'] = chi_scores(chi, true_chi, evaluation)
        mask = np.logical_and.reduce(masks[:4])
        chi, _ = methods.invert('lpcnn', list(fields[:4] * mask), mask, voxel, outputs.b0_dirs[:4],
                                threads=os.cpu_count())
        scores['LP-CNN, 4 runs'] = chi_scores(chi, true_chi, evaluation)
    # Perfect fields: each run's local field of the reference head computed on run 1's grid with that
    # run's true B0 there (as the simulator computes run 1's), so that these rows measure the inversion
    # alone, without the error of resampling the turned heads' fields back.
    true_b0_dirs = [registration.b0_direction_in_reference(
        registration.RigidTransform(rotation=transform[:3, :3], translation=transform[:3, 3]), run_image[0].affine)
        for transform in transforms]
    true_masks = np.repeat(brain[np.newaxis], len(TURNS), axis=0)
    true_fields = np.stack([true_local_field(phantom, voxel, b0_dir) for b0_dir in true_b0_dirs]) * brain
    for count in SUBSETS:
        chi = orientations.cosmos(true_fields[:count], brain, voxel, true_b0_dirs[:count])
        scores[f'COSMOS, {count} runs, true local fields'] = chi_scores(chi, true_chi, evaluation)
    white_matter = brain & (phantom['wm_fraction'] > 0.8)
    true_tensor = traceless_tensor(phantom['anisotropy'], phantom['fibres']) + true_chi * np.array(
        [float(i == j) for i, j in TENSOR_COMPONENTS], dtype=np.float32)[:, None, None, None]
    sti_methods = [('STI', 'ls', STI_SUBSETS)] + ([] if learned_missing else [('DeepSTI', 'deepsti', DEEPSTI_SUBSETS)])
    for name, method, subsets in sti_methods:
        for count in subsets:
            for source, data, data_masks, b0_dirs in (('', fields, masks, outputs.b0_dirs),
                                                      (', true local fields', true_fields, true_masks, true_b0_dirs)):
                mask = np.logical_and.reduce(data_masks[:count])
                tensor, _ = methods.susceptibility_tensor(method, data[:count] * mask, mask, voxel, b0_dirs[:count],
                                                          threads=os.cpu_count())
                scores[f'{name}, {count} run{"s" if count > 1 else ""}{source}'] = metrics.sti_scores(
                    tensor, true_tensor, mask & brain, white_matter)
    scores['seconds'] = {stage: node_seconds(work_dir, stage) for stage in STAGES}
    scores['seconds']['whole command'] = wall
    if not learned_missing:
        scores['seconds, 4 runs, --sti deepsti'] = time_four_runs(bids_dir, data_dir / f'four_runs_{seed}')
    scores['grid'] = 'x'.join(map(str, brain.shape))
    return scores


def time_four_runs(bids_dir, folder):
    """Seconds of each stage of the app on the first 4 runs alone, with DeepSTI's tensor."""
    shutil.rmtree(folder, ignore_errors=True)
    four_runs = folder / 'bids'
    shutil.copytree(bids_dir, four_runs, ignore=lambda directory, names: [
        name for name in names if name == 'derivatives' or any(f'_run-{run}_' in name for run in (5, 6))])
    command = [str(Path(sys.executable).with_name('qsmprep')), str(four_runs), str(folder / 'out'), 'participant',
               '-w', str(folder / 'work'), '--multi-orientation', '--sti', 'deepsti', '--no-chi-separation']
    started = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - started
    return {**{stage: node_seconds(folder / 'work', stage) for stage in STAGES}, 'whole command': wall}


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
    lines += ['', '## The tensor: least-squares STI and DeepSTI (MMS NRMSE % / median PEV error in white matter, '
                  'degrees / MSA correlation)', '', header.rstrip('\n')]
    for key in [key for key in results[seeds[0]] if key.startswith(('STI', 'DeepSTI'))]:
        lines.append(f'| {key} | ' + ' | '.join(
            f'{results[s][key]["MMS NRMSE"]:.1f} / {results[s][key]["PEV error in WM (deg)"]:.1f} / '
            f'{results[s][key]["MSA correlation"]:.2f}' for s in seeds) + ' |')
    lines += ['', '## Seconds on this machine (summed over runs where a stage runs per run)', '',
              header.rstrip('\n')]
    for stage in list(results[seeds[0]]['seconds']):
        lines.append(f'| {stage} | ' + ' | '.join(f'{results[s]["seconds"][stage]:.1f}' for s in seeds) + ' |')
    four_runs = 'seconds, 4 runs, --sti deepsti'
    if four_runs in results[seeds[0]]:
        lines += ['', '## Seconds of a 4-run subject with `--sti deepsti` on this machine', '', header.rstrip('\n')]
        for stage in list(results[seeds[0]][four_runs]):
            lines.append(f'| {stage} | ' + ' | '.join(f'{results[s][four_runs][stage]:.1f}' for s in seeds) + ' |')
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
