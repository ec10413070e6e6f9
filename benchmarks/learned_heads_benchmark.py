"""Learned and classical dipole inversion on simulated heads held out from every training and choice.

    python benchmarks/learned_heads_benchmark.py --out benchmarks/LEARNED_HEADS.md

The heads are those of ``classical_benchmark.py`` (3 T and 7 T, upright and oblique B0,
anisotropic voxels, a haemorrhage, strong coil bias and noise; every head has veins and a
calcification) and a ninth: 7 T, oblique, anisotropic voxels and a haemorrhage. They come from
the benchmarks' MNI phantom (``simulate_bids.head_phantom``), not from the training simulator,
so no training, checkpoint choice or inference setting saw them. Each head is inverted by every
method twice: from the TRUE local field on the true brain mask, and end to end from the local
field and mask of qsmprep's classical chain run on its multi-echo magnitude and phase
(``chain.run_chain``: mask, unwrapping, echo fit, V-SHARP). Scores are over the brain inside the
mask that was inverted, every map referenced to its mean there, as NRMSE is.

The lesion columns score what a method does to focal sources: the RMS error (ppb) inside the
haemorrhage and the calcification, and the share of the lesion's true contrast to the surrounding
brain (its mean minus the mean of a 3 mm shell around it) that the map recovers (100 %: all of
it; under 100 %: erased in part; above: exaggerated).

QSMnet is the baseline U-Net of ``qsmprep-train qsmnet`` (``benchmarks/models/qsmnet``), trained
on the shipped LP-CNN's simulated patches for the time its model card gives. TV uses the combined
magnitude as the BIDS App does. Each method runs in a child process
(``inversion_benchmark.run_method``).
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.chain import run_chain  # noqa: E402
from benchmarks.classical_benchmark import HAEMORRHAGE, HEADS, simulate_head  # noqa: E402
from benchmarks.inversion_benchmark import run_method  # noqa: E402
from benchmarks.simulate_bids import CALCIFICATION  # noqa: E402
from qsmprep.science import inversion, masking, metrics  # noqa: E402

LEARNED_HEADS = {**HEADS, '09': dict(description='7 T haemorrhage, tilted 15 deg, 1.2 x 1.2 x 1.8 mm',
                                     voxel_size=(1.2, 1.2, 1.8), seed=10, field_strength=7.0, tilt=15.0,
                                     lesions=(HAEMORRHAGE,), bias=('centre', 0.8), snr=60.0)}
METHODS = ('tkd', 'l2', 'tv', 'qsmnet', 'lpcnn', 'lpn')
CLASSICAL = ('tkd', 'l2', 'tv')
LEARNED = ('lpcnn', 'lpn')
NAMES = {'tkd': 'TKD', 'l2': 'L2', 'tv': 'TV', 'qsmnet': 'QSMnet (baseline)', 'lpcnn': 'LP-CNN', 'lpn': 'LPN'}
INPUTS = ('true local field', 'end to end')
METRICS = ('NRMSE', 'dNRMSE', 'HFEN', 'XSIM')
SHELL_MM = 3.0


def lesion_masks(phantom, voxel_size):
    """Name -> (lesion mask, surrounding shell mask) of the focal sources inside the brain."""
    brain = phantom['brain_mask']
    lesions = {'calcification': brain & np.isclose(phantom['chi'], CALCIFICATION[2])}
    haemorrhage = brain & np.isclose(phantom['chi'], HAEMORRHAGE[2])
    if haemorrhage.any():
        lesions['haemorrhage'] = haemorrhage
    structure = ndimage.generate_binary_structure(3, 1)
    result = {}
    for name, lesion in lesions.items():
        grown = lesion.copy()
        for _ in range(int(np.ceil(SHELL_MM / min(voxel_size)))):
            grown = ndimage.binary_dilation(grown, structure)
        result[name] = (lesion, grown & ~lesion & brain)
    return result


def lesion_scores(chi, truth, mask, lesions):
    """Per lesion inside ``mask``: RMS error (ppb) and recovered contrast (percent), maps referenced to their mean."""
    chi = inversion.reference_to_mask_mean(chi, mask)
    truth = inversion.reference_to_mask_mean(truth, mask)
    result = {}
    for name, (lesion, shell) in lesions.items():
        lesion, shell = lesion & mask, shell & mask
        if not lesion.any() or not shell.any():
            continue
        error = float(np.sqrt(np.mean((chi[lesion] - truth[lesion]) ** 2))) * 1000
        contrast = truth[lesion].mean() - truth[shell].mean()
        recovered = (chi[lesion].mean() - chi[shell].mean()) / contrast * 100
        result[name] = (error, float(recovered))
    return result


def score(chi, truth, mask):
    return {'NRMSE': metrics.nrmse(chi, truth, mask), 'dNRMSE': metrics.dnrmse(chi, truth, mask),
            'HFEN': metrics.hfen(chi, truth, mask), 'XSIM': metrics.xsim(chi, truth, mask)}


def run_head(settings):
    """Scores, lesion scores and seconds of every method on one head, for each input."""
    phantom, affine, megre, echo_times, field_strength = simulate_head(settings)
    voxel_size = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    brain = phantom['brain_mask']
    truth = np.where(brain, phantom['chi'], 0).astype(np.float32)
    magnitude = masking.combined_magnitude(megre['magnitude'])
    chain = run_chain(megre['magnitude'], megre['phase'], echo_times, field_strength, voxel_size, megre['b0_dir'])
    inputs = {'true local field': (megre['local_field'], brain),
              'end to end': (chain['local_field'], chain['local_mask'])}
    lesions = lesion_masks(phantom, voxel_size)
    result = {}
    for input_name, (local_field, mask) in inputs.items():
        evaluation = mask & brain
        data = {'local_field': local_field, 'mask': mask, 'voxel_size': voxel_size,
                'b0_dir': tuple(megre['b0_dir']), 'magnitude': magnitude}
        for method in METHODS:
            chi, _, seconds, _ = run_method(method, data)
            chi = inversion.reference_to_mask_mean(chi, evaluation)
            result[input_name, method] = {'scores': score(chi, truth, evaluation),
                                          'lesions': lesion_scores(chi, truth, evaluation, lesions),
                                          'seconds': seconds}
            print(settings['description'], input_name, method,
                  {key: round(value, 3) for key, value in result[input_name, method]['scores'].items()},
                  result[input_name, method]['lesions'], f'{seconds:.1f} s', flush=True)
        result[input_name, 'coverage'] = evaluation.sum() / brain.sum()
    return result


def head_table(results, input_name):
    lines = ['| head | coverage % | ' + ' | '.join(NAMES[m] for m in METHODS) + ' |',
             '|---|---|' + '---|' * len(METHODS)]
    for label, result in results.items():
        lines.append(f'| {label}: {LEARNED_HEADS[label]["description"]} | {100 * result[input_name, "coverage"]:.1f} | '
                     + ' | '.join(f'{result[input_name, m]["scores"]["NRMSE"]:.1f}' for m in METHODS) + ' |')
    return lines


def mean_table(results, input_name):
    lines = ['| method | ' + ' | '.join(f'{metric} {"" if metric == "XSIM" else "% "}' for metric in METRICS)
             + '| worst head minus best classical (points) | seconds per head |',
             '|---|' + '---|' * (len(METRICS) + 2)]
    best_classical = [min(result[input_name, m]['scores']['NRMSE'] for m in CLASSICAL) for result in results.values()]
    for method in METHODS:
        means = [np.mean([result[input_name, method]['scores'][metric] for result in results.values()])
                 for metric in METRICS]
        gap = max(result[input_name, method]['scores']['NRMSE'] - best
                  for result, best in zip(results.values(), best_classical))
        seconds = np.mean([result[input_name, method]['seconds'] for result in results.values()])
        lines.append(f'| {NAMES[method]} | ' + ' | '.join(f'{value:.3f}' if metric == 'XSIM' else f'{value:.1f}'
                                                        for metric, value in zip(METRICS, means))
                     + f' | {gap:+.1f} | {seconds:.1f} |')
    return lines


def target_lines(results, input_name):
    classical_means = {m: np.mean([r[input_name, m]['scores']['NRMSE'] for r in results.values()]) for m in CLASSICAL}
    best = min(classical_means, key=classical_means.get)
    lines = [f'Best classical method by mean NRMSE: {NAMES[best]} ({classical_means[best]:.1f} %); target 0.8 x = '
             f'{0.8 * classical_means[best]:.1f} %.', '']
    for method in LEARNED + ('qsmnet',):
        mean = np.mean([r[input_name, method]['scores']['NRMSE'] for r in results.values()])
        lines.append(f'- {NAMES[method]}: {mean:.1f} %, {mean / classical_means[best]:.2f} x {NAMES[best]}.')
    return lines


def lesion_table(results, input_name):
    lines = ['| head | lesion | ' + ' | '.join(NAMES[m] for m in METHODS) + ' |', '|---|---|' + '---|' * len(METHODS)]
    for label, result in results.items():
        for lesion in result[input_name, METHODS[0]]['lesions']:
            cells = []
            for method in METHODS:
                error, recovered = result[input_name, method]['lesions'][lesion]
                cells.append(f'{error:.0f} ppb, {recovered:.0f} %')
            lines.append(f'| {label} | {lesion} | ' + ' | '.join(cells) + ' |')
    for lesion in ('haemorrhage', 'calcification'):
        cells = []
        for method in METHODS:
            pairs = [r[input_name, method]['lesions'][lesion] for r in results.values()
                     if lesion in r[input_name, method]['lesions']]
            cells.append(f'{np.mean([p[0] for p in pairs]):.0f} ppb, {np.mean([p[1] for p in pairs]):.0f} %')
        lines.append(f'| **mean** | {lesion} | ' + ' | '.join(cells) + ' |')
    return lines


def write_report(path, results, wall, command):
    lines = ['# Learned and classical inversion on held-out simulated heads', '', __doc__.split('\n\n', 2)[2].rstrip(),
             '', f'{platform.machine()}, {os.cpu_count()} cores, {wall / 60:.0f} min. Made by:', '',
             f'    {command}', '',
             'Targets (issue 26): LP-CNN and LPN each at most 0.8 x the best classical method\'s mean NRMSE, never '
             'worse than it on any head by more than 2 points, and no larger error inside lesions than TV.', '']
    for input_name in INPUTS:
        lines += [f'## From the {input_name}' if input_name != 'end to end' else '## End to end', '',
                  'Mean over the heads:', ''] + mean_table(results, input_name) + ['']
        lines += target_lines(results, input_name) + ['', 'NRMSE % per head:', ''] + head_table(results, input_name)
        lines += ['', 'Lesions: RMS error inside, and share of the true contrast recovered:', '']
        lines += lesion_table(results, input_name) + ['']
    Path(path).write_text('\n'.join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, required=True, help='the Markdown table to write')
    parser.add_argument('--heads', nargs='+', default=list(LEARNED_HEADS), help='head labels to run')
    args = parser.parse_args()
    started = time.time()
    results = {label: run_head(LEARNED_HEADS[label]) for label in args.heads}
    write_report(args.out, results, time.time() - started,
                 'python benchmarks/learned_heads_benchmark.py --out ' + str(args.out)
                 + ('' if args.heads == list(LEARNED_HEADS) else ' --heads ' + ' '.join(args.heads)))


if __name__ == '__main__':
    main()
