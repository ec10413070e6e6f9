"""Background field removal on the simulated 1 mm head: accuracy, time and memory per method.

    python benchmarks/bgremove_benchmark.py --out benchmarks/BGREMOVE.md [--voxel-size 1]

Simulates the head of benchmarks/simulate_bids.py upright and tilted by 18 degrees (seed 0),
runs every method of qsmprep.science.bgremove on the TRUE total field and brain mask with two
FFT threads, and scores the local field against the true one (NRMSE after referencing both to
their mean) over the method's valid mask without the brain mask's outer voxel layer. Also
times each method on a 160^3 crop of the upright head (the brain mask cut to the crop), and
PDF and LBV without their brain-source step (``brain_iterations=0``), for comparison.
"""
import argparse
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulate_bids import head_phantom, simulate_megre, tilted_affine  # noqa: E402
from qsmprep.science import bgremove, metrics  # noqa: E402

HEADS = (('upright', 0.0), ('tilted 18 degrees', 18.0))
RUNS = [(method, method, {}) for method in bgremove.BGREMOVE_METHODS] + [
    ('pdf without brain sources', 'pdf', {'brain_iterations': 0}),
    ('lbv without brain sources', 'lbv', {'brain_iterations': 0}),
]
CROP = 160


def timed(method, total_field, mask, voxel_size, b0_dir, options):
    """(local field, valid mask, seconds, peak GB of arrays allocated) of one run, two FFT threads."""
    tracemalloc.start()
    started = time.perf_counter()
    with scipy.fft.set_workers(2):
        local_field, valid = bgremove.remove_background(total_field, mask, voxel_size, b0_dir, method, **options)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 1e9
    tracemalloc.stop()
    return local_field, valid, seconds, peak


def score(local_field, valid, true_local_field, brain):
    region = valid & ndimage.binary_erosion(brain)
    return metrics.nrmse(local_field, true_local_field, region), region.sum() / brain.sum()


def centred_crop(mask, size):
    """Slices of a ``size``^3 box centred on the mask's bounding box."""
    indices = np.argwhere(mask)
    centre = (indices.min(axis=0) + indices.max(axis=0)) // 2
    starts = [int(np.clip(c - size // 2, 0, n - size)) for c, n in zip(centre, mask.shape)]
    return tuple(slice(s, s + size) for s in starts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/BGREMOVE.md'))
    parser.add_argument('--voxel-size', type=float, default=1.0)
    args = parser.parse_args()
    voxel_size = (args.voxel_size,) * 3
    load_before = os.getloadavg()[0]
    phantom, affine = head_phantom(args.voxel_size, seed=0)
    brain = phantom['brain_mask']
    rows, crop_rows = [], []
    for head, tilt in HEADS:
        megre = simulate_megre(phantom, tilted_affine(affine, tilt), seed=0)
        total_field, true_local, b0_dir = megre['total_field'], megre['local_field'], megre['b0_dir']
        del megre
        for label, method, options in RUNS:
            local_field, valid, seconds, peak = timed(method, total_field, brain, voxel_size, b0_dir, options)
            nrmse, kept = score(local_field, valid, true_local, brain)
            rows.append((head, label, nrmse, kept, seconds, peak))
            print(rows[-1], flush=True)
        if tilt == 0.0:
            crop = centred_crop(brain, CROP)
            for method in bgremove.BGREMOVE_METHODS:
                local_field, valid, seconds, peak = timed(method, total_field[crop], brain[crop], voxel_size,
                                                          b0_dir, {})
                nrmse, kept = score(local_field, valid, true_local[crop], brain[crop])
                crop_rows.append((method, nrmse, kept, seconds, peak))
                print(crop_rows[-1], flush=True)
    load_after = os.getloadavg()[0]

    lines = [
        '# Background field removal benchmark',
        '',
        'Made by:',
        '',
        f'    python benchmarks/bgremove_benchmark.py --out {args.out} --voxel-size {args.voxel_size:g}',
        '',
        f'Simulated {args.voxel_size:g} mm head of benchmarks/simulate_bids.py (grid {brain.shape}, '
        f'{int(brain.sum())} brain voxels), upright and tilted by 18 degrees (B0 oblique in voxel axes), '
        'seed 0. Each method runs on the true total field and the true brain mask with two FFT threads '
        f'on {platform.machine()} ({os.cpu_count()} cores, shared: load average {load_before:.1f} before and '
        f'{load_after:.1f} after). NRMSE of the local field against the true one, both referenced to '
        'their mean, over the method\'s valid mask without the brain mask\'s outer voxel layer; "brain '
        'kept" is that region\'s share of the brain mask. Peak memory: the largest total of arrays '
        'allocated at once during the run (tracemalloc), input arrays excluded.',
        '',
        '| head | method | NRMSE % | brain kept % | seconds | peak memory GB |',
        '|---|---|---|---|---|---|',
    ]
    lines += [f'| {head} | {label} | {nrmse:.1f} | {100 * kept:.1f} | {seconds:.1f} | {peak:.2f} |'
              for head, label, nrmse, kept, seconds, peak in rows]
    lines += [
        '',
        f'## {CROP}^3 volume',
        '',
        f'The upright head cropped to {CROP}^3 voxels around the brain (the mask is cut where the brain '
        'reaches past the crop), default options.',
        '',
        '| method | NRMSE % | brain kept % | seconds | peak memory GB |',
        '|---|---|---|---|---|',
    ]
    lines += [f'| {method} | {nrmse:.1f} | {100 * kept:.1f} | {seconds:.1f} | {peak:.2f} |'
              for method, nrmse, kept, seconds, peak in crop_rows]
    args.out.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
