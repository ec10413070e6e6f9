"""Every dipole inversion method on the 2016 QSM challenge in-vivo data and on a simulated head.

    python benchmarks/inversion_benchmark.py --out benchmarks/INVERSION.md

Evaluation only: every qsmprep parameter and weight rule was fixed on simulations before this
script ran on the challenge data, and nothing here feeds back into them. The published
reconstructions in ``published/`` are scored by the same code: they are stored flipped along
array axis 1, and QSMnet/QSMnet+ are zero-padded to 164x173x173 with the challenge grid at
offset (2, 6, 6) after the flip (the data's README). Each qsmprep method runs in a child
process so that its peak memory is its own.
"""
import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft
import scipy.io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulate_bids import (ECHO_TIMES_S, FIELD_STRENGTH_T, head_phantom, simulate_megre,  # noqa: E402
                                      tilted_affine)
from qsmprep.science import bgremove, inversion, masking, metrics  # noqa: E402

PUBLISHED = {'CFL2': None, 'QSMnet': (2, 6, 6), 'QSMnet+': (2, 6, 6)}
# The challenge's acquisition (its README): one echo at 25 ms, 2.8936 T.
CHALLENGE_ECHO_TIME_S = 0.025
CHALLENGE_FIELD_STRENGTH_T = 2.8936
SIMULATED_TILT_DEG = 18.0


def load_challenge(data_dir):
    data_dir = Path(data_dir)

    def image(name):
        return np.asanyarray(nib.load(data_dir / f'{name}.nii.gz').dataobj).astype(np.float32)

    return {
        'local_field': image('phs_tissue'), 'mask': image('msk') > 0, 'reference': image('chi_cosmos'),
        'chi33': image('chi_33'), 'magnitude': scipy.io.loadmat(data_dir / 'magn.mat')['magn'].astype(np.float32),
        'voxel_size': tuple(float(v) for v in scipy.io.loadmat(data_dir / 'spatial_res.mat')['spatial_res'].ravel()),
        'b0_dir': (0.0, 0.0, 1.0),
        'phase_scale': inversion.phase_scale_rad_per_ppm([CHALLENGE_ECHO_TIME_S], CHALLENGE_FIELD_STRENGTH_T),
    }


def simulated_head(voxel_size_mm=1.0, tilt_deg=SIMULATED_TILT_DEG):
    """The 1 mm simulated head tilted about x, its local field from V-SHARP of the true total field."""
    phantom, affine = head_phantom(voxel_size_mm)
    affine = tilted_affine(affine, tilt_deg)
    megre = simulate_megre(phantom, affine)
    voxel_size = (voxel_size_mm,) * 3
    local_field, mask = bgremove.vsharp(megre['total_field'], phantom['brain_mask'], voxel_size)
    return {
        'local_field': local_field, 'mask': mask, 'reference': np.where(mask, phantom['chi'], 0),
        'magnitude': masking.combined_magnitude(megre['magnitude']), 'voxel_size': voxel_size,
        'b0_dir': tuple(megre['b0_dir']),
        'phase_scale': inversion.phase_scale_rad_per_ppm(ECHO_TIMES_S, FIELD_STRENGTH_T),
    }


def published_result(data_dir, name, offset, shape):
    volume = np.asanyarray(nib.load(Path(data_dir) / 'published' / f'result_{name}.nii.gz').dataobj)
    volume = np.flip(volume.astype(np.float32), axis=1)
    if offset is not None:
        volume = volume[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return volume


def _run_method(method, data, queue):
    options = {'phase_scale_rad_per_ppm': data['phase_scale']} if method == 'nltv' else {}
    with scipy.fft.set_workers(2):
        started = time.time()
        chi, parameters = inversion.invert(
            data['local_field'], data['mask'], data['voxel_size'], data['b0_dir'], method=method,
            magnitude=data['magnitude'] if method in ('tv', 'nltv') else None, **options)
        seconds = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    queue.put((chi, parameters, seconds, peak_gb))


def run_method(method, data):
    """chi, chosen parameters, seconds and the child's peak resident memory (GB, data included)."""
    context = multiprocessing.get_context('fork')
    queue = context.Queue()
    process = context.Process(target=_run_method, args=(method, data, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def scores(chi, data):
    mask, reference = data['mask'], data['reference']
    result = {
        'NRMSE': metrics.nrmse(chi, reference, mask), 'dNRMSE': metrics.dnrmse(chi, reference, mask),
        'HFEN': metrics.hfen(chi, reference, mask), 'XSIM': metrics.xsim(chi, reference, mask),
    }
    if 'chi33' in data:
        result['NRMSE_chi33'] = metrics.nrmse(chi, data['chi33'], mask)
    return result


def table(rows, with_chi33):
    header = '| method | NRMSE % | dNRMSE % | HFEN % | XSIM |' + (' NRMSE % vs chi33 |' if with_chi33 else '')
    lines = [header + ' weight | seconds | peak GB |',
             '|---' * (header.count('|') + 2) + '|']
    for name, score, weight, seconds, peak in rows:
        line = f'| {name} | {score["NRMSE"]:.1f} | {score["dNRMSE"]:.1f} | {score["HFEN"]:.1f} | {score["XSIM"]:.3f} |'
        if with_chi33:
            line += f' {score["NRMSE_chi33"]:.1f} |'
        lines.append(line + f' {weight} | {seconds} | {peak} |')
    return lines


def method_rows(data):
    rows = []
    for method in inversion.INVERSION_METHODS:
        chi, parameters, seconds, peak_gb = run_method(method, data)
        weight = parameters.get('RegularizationWeight', parameters.get('TKDThreshold'))
        rows.append((f'qsmprep {method}', scores(chi, data), f'{weight:.3g}', f'{seconds:.1f}', f'{peak_gb:.2f}'))
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, default=Path(__file__).resolve().parents[2] / 'shared' / 'benchmarks' / 'qsm2016')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/INVERSION.md'))
    args = parser.parse_args()

    challenge = load_challenge(args.data)
    challenge_rows = method_rows(challenge)
    for name, offset in PUBLISHED.items():
        chi = published_result(args.data, name, offset, challenge['mask'].shape)
        challenge_rows.append((f'published {name}', scores(chi, challenge), '', '', ''))
    simulated_rows = method_rows(simulated_head())

    lines = [
        '# Dipole inversion: every method on the same data',
        '',
        'Made on this 2-core machine by:',
        '',
        f'    python benchmarks/inversion_benchmark.py --out {args.out}',
        '',
        'Metrics as CONVENTIONS.md defines them, both maps referenced to their mean over the mask;',
        'dNRMSE is the NRMSE after the best linear rescaling of the estimate (QSM challenge 2.0).',
        '`weight` is the regularisation weight each method chose by its own rule (relative to the',
        'field scaled to unit RMS; GCV for L2, 0.4 times that for TV), or the TKD threshold. Seconds and',
        'peak memory (resident set of the child process, data included) are for the inversion alone.',
        '',
        '## 2016 QSM challenge, in vivo, against the 12-orientation COSMOS',
        '',
        'Local field of the challenge (3 T, 160x160x160, 1.06x1.06x1.07 mm), scored inside `msk`.',
        'Evaluation only: no qsmprep parameter was chosen by looking at these scores.',
        '',
        *table(challenge_rows, with_chi33=True),
        '',
        f'## Simulated 1 mm head, tilted {SIMULATED_TILT_DEG:g} degrees, against the true susceptibility',
        '',
        '`benchmarks/simulate_bids.py` head (3 T, 5 echoes); local field from V-SHARP of the true',
        'total field, scored over the V-SHARP mask.',
        '',
        *table(simulated_rows, with_chi33=False),
    ]
    args.out.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
