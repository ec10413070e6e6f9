"""Dipole inversion on the 2016 QSM challenge in-vivo data, scored against COSMOS and chi33.

    python benchmarks/qsm2016_benchmark.py --data ../shared/benchmarks/qsm2016 --out benchmarks/QSM2016.md

Evaluation only: every qsmprep parameter was fixed on simulations before this script ran, and
nothing here feeds back into them. The published reconstructions in ``published/`` are scored by
the same code: they are stored flipped along array axis 1, and QSMnet/QSMnet+ are zero-padded to
164x173x173 with the challenge grid at offset (2, 6, 6) after the flip (the data's README).
Each qsmprep method runs in a child process so that its peak memory is its own.
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

from qsmprep.science import inversion, metrics  # noqa: E402

PUBLISHED = {'CFL2': None, 'QSMnet': (2, 6, 6), 'QSMnet+': (2, 6, 6)}


def load_challenge(data_dir):
    data_dir = Path(data_dir)

    def image(name):
        return np.asanyarray(nib.load(data_dir / f'{name}.nii.gz').dataobj).astype(np.float32)

    return {
        'local_field': image('phs_tissue'), 'mask': image('msk') > 0, 'cosmos': image('chi_cosmos'),
        'chi33': image('chi_33'), 'magnitude': scipy.io.loadmat(data_dir / 'magn.mat')['magn'].astype(np.float32),
        'voxel_size': tuple(float(v) for v in scipy.io.loadmat(data_dir / 'spatial_res.mat')['spatial_res'].ravel()),
    }


def published_result(data_dir, name, offset, shape):
    volume = np.asanyarray(nib.load(Path(data_dir) / 'published' / f'result_{name}.nii.gz').dataobj)
    volume = np.flip(volume.astype(np.float32), axis=1)
    if offset is not None:
        volume = volume[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return volume


def _run_method(method, data, queue):
    with scipy.fft.set_workers(2):
        started = time.time()
        chi = inversion.invert(data['local_field'], data['mask'], data['voxel_size'], (0.0, 0.0, 1.0),
                               method=method, magnitude=data['magnitude'] if method == 'tv' else None)
        seconds = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    queue.put((chi, seconds, peak_gb))


def run_method(method, data):
    """chi, seconds and the child's peak resident memory (GB, loading the data included)."""
    queue = multiprocessing.get_context('fork').Queue()
    process = multiprocessing.get_context('fork').Process(target=_run_method, args=(method, data, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def scores(chi, data):
    mask = data['mask']
    return {
        'NRMSE': metrics.nrmse(chi, data['cosmos'], mask), 'HFEN': metrics.hfen(chi, data['cosmos'], mask),
        'XSIM': metrics.xsim(chi, data['cosmos'], mask), 'NRMSE_chi33': metrics.nrmse(chi, data['chi33'], mask),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, default=Path(__file__).resolve().parents[2] / 'shared' / 'benchmarks' / 'qsm2016')
    parser.add_argument('--out', type=Path, default=Path('benchmarks/QSM2016.md'))
    args = parser.parse_args()
    data = load_challenge(args.data)
    rows = []
    for method in inversion.INVERSION_METHODS:
        chi, seconds, peak_gb = run_method(method, data)
        rows.append((f'qsmprep {method}', scores(chi, data), f'{seconds:.1f}', f'{peak_gb:.2f}'))
    for name, offset in PUBLISHED.items():
        chi = published_result(args.data, name, offset, data['mask'].shape)
        rows.append((f'published {name}', scores(chi, data), '', ''))
    lines = [
        '# Dipole inversion on the 2016 QSM challenge in-vivo data',
        '',
        'Local field of the challenge (3 T, 160x160x160, 1.06x1.06x1.07 mm), scored inside `msk` against the',
        '12-orientation COSMOS (and chi33), both referenced to their mean there (CONVENTIONS.md metrics).',
        'Evaluation only: no qsmprep parameter was chosen by looking at these scores. Seconds and peak memory',
        '(resident set of the child process, data included) on this 2-core machine. Made by:',
        '',
        f'    python benchmarks/qsm2016_benchmark.py --out {args.out}',
        '',
        '| method | NRMSE % vs COSMOS | HFEN % | XSIM | NRMSE % vs chi33 | seconds | peak GB |',
        '|---|---|---|---|---|---|---|',
    ]
    for name, score, seconds, peak in rows:
        lines.append(f'| {name} | {score["NRMSE"]:.1f} | {score["HFEN"]:.1f} | {score["XSIM"]:.3f} | '
                     f'{score["NRMSE_chi33"]:.1f} | {seconds} | {peak} |')
    args.out.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
