"""TV's solver settings and weight rule, calibrated on simulated 2 mm heads (never on in-vivo data).

    python benchmarks/tv_calibration.py --out benchmarks/TV_CALIBRATION.md

Calibration heads (seeds 0 and 1; the benchmark heads of classical_benchmark.py use other
seeds, sizes and resolutions): local fields from the pipeline's own chain (mask, unwrapping,
echo fit, V-SHARP) and the true local field on the true brain mask. Each TV setting is scored
by NRMSE against the true susceptibility over the field's mask, both referenced to their mean.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.chain import run_chain  # noqa: E402
from benchmarks.simulate_bids import echo_times_for, head_phantom, simulate_megre, tilted_affine  # noqa: E402
from qsmprep.science import inversion, metrics  # noqa: E402

# name: seed, tilt (degrees), field strength (T), peak SNR
HEADS = {
    '3T upright SNR 100': (0, 0.0, 3.0, 100.0),
    '3T tilted 18 SNR 30': (1, 18.0, 3.0, 30.0),
    '7T tilted 18 SNR 50': (1, 18.0, 7.0, 50.0),
}
RELATIVE_WEIGHTS = (0.1, 0.2, 0.4, 1.0, 2.5)
FIXED_WEIGHTS = (3e-4, 1e-3, 3e-3)
SOLVERS = {  # name: keyword arguments of inversion.tv_admm
    'old: 60 it, cold, mu 1 / 100': dict(iterations=60, warm_start=False, mu_data=1.0, mu_ratio=100.0),
    'default: 50 it, L2 start, mu 0.1 / 10': dict(iterations=50, warm_start=True, mu_data=0.1, mu_ratio=10.0),
    '100 it, L2 start, mu 0.1 / 10': dict(iterations=100, warm_start=True, mu_data=0.1, mu_ratio=10.0),
    '100 it, L2 start, mu 0.3 / 10': dict(iterations=100, warm_start=True, mu_data=0.3, mu_ratio=10.0),
}


def fields(voxel_size_mm):
    """(name, local field, mask, truth, voxel size, b0, magnitude) per head: pipeline and true field."""
    for name, (seed, tilt, field_strength, snr) in HEADS.items():
        phantom, affine = head_phantom(voxel_size_mm, seed=seed)
        affine = tilted_affine(affine, tilt)
        echo_times = echo_times_for(field_strength)
        megre = simulate_megre(phantom, affine, echo_times, field_strength, peak_snr=snr, seed=seed)
        voxel_size = np.linalg.norm(affine[:3, :3], axis=0)
        brain = phantom['brain_mask']
        truth = np.where(brain, phantom['chi'], 0)
        magnitude = np.sqrt((megre['magnitude'] ** 2).sum(-1))
        chain = run_chain(megre['magnitude'], megre['phase'], echo_times, field_strength, voxel_size,
                          megre['b0_dir'])
        mask = chain['local_mask'] & brain
        yield f'{name}, pipeline', chain['local_field'], chain['local_mask'], mask, truth, voxel_size, \
            megre['b0_dir'], magnitude
        if tilt == 0 or field_strength > 5:
            yield f'{name}, true field', megre['local_field'], brain, brain, truth, voxel_size, megre['b0_dir'], \
                magnitude


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/TV_CALIBRATION.md'))
    parser.add_argument('--voxel-size', type=float, default=2.0)
    args = parser.parse_args()
    columns = [f'{r:g} x GCV' for r in RELATIVE_WEIGHTS] + [f'{w:g}' for w in FIXED_WEIGHTS]
    lines = ['# TV solver and weight calibration', '', __doc__.split('\n\n', 2)[2].strip(), '',
             f'{args.voxel_size:g} mm, {platform.machine()}, made by:', '',
             f'    python benchmarks/tv_calibration.py --out {args.out}', '',
             'NRMSE % per weight (relative to the field scaled to unit RMS in the mask: GCV multiples and '
             'fixed values); seconds for one TV run.', '',
             '| field | GCV weight | solver | ' + ' | '.join(columns) + ' | s |',
             '|---|---|---|' + '---|' * (len(columns) + 1)]
    for name, field, mask, scored, truth, voxel_size, b0_dir, magnitude in fields(args.voxel_size):
        box_field = np.where(mask, field, 0)
        gcv = inversion.l2_gradient(box_field, mask, voxel_size, b0_dir)[1]
        reference = inversion.reference_to_mask_mean(truth, scored)
        for solver, options in SOLVERS.items():
            cells, seconds = [], []
            for lam in [r * gcv for r in RELATIVE_WEIGHTS] + list(FIXED_WEIGHTS):
                started = time.perf_counter()
                chi, _ = inversion.invert(field, mask, voxel_size, b0_dir, method='tv', magnitude=magnitude,
                                          lam=lam, **options)
                seconds.append(time.perf_counter() - started)
                chi = inversion.reference_to_mask_mean(chi, scored)
                cells.append(f'{metrics.nrmse(chi, reference, scored):.1f}')
            lines.append(f'| {name} | {gcv:.2g} | {solver} | ' + ' | '.join(cells) + f' | {np.median(seconds):.1f} |')
            print(lines[-1], flush=True)
    args.out.write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
