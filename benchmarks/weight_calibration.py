"""How the rules for the regularisation weight fare when the field holds more than scalar susceptibility.

The weight rules of qsmprep.science.inversion must be fixed without ground truth and without
looking at the in-vivo benchmark. GCV assumes the data are the dipole field of a scalar
susceptibility plus white noise. A real local field also holds white matter's anisotropic
susceptibility, which no scalar map explains (COSMOS and the in-vivo reference average it out),
and what background removal leaves. This study adds both to the simulated 1 mm head and
measures, over a range of weights, the NRMSE of L2 and TV against the true mean susceptibility,
beside the weights that GCV and the L-curve corner pick without ground truth.

White matter's susceptibility is a tensor chi_iso I + dchi w (n n^T - I/3): w the white matter
fraction, n a smooth random fibre direction (``phantoms.random_fibre_directions``), dchi the
anisotropy chi_parallel - chi_perpendicular (about 0.01 to 0.02 ppm in the STI literature).
``physics.anisotropic_field`` gives the field of the traceless part, which leaves the mean
susceptibility, the truth here, unchanged.

    python benchmarks/weight_calibration.py --out benchmarks/WEIGHT_CALIBRATION.md
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.simulate_bids import CHI_AIR, head_phantom, tilted_affine, voxel_averaged_field  # noqa: E402
from qsmprep.learned.phantoms import FIBRE_SMOOTHING_MM, random_fibre_directions  # noqa: E402
from qsmprep.science import bgremove, inversion, metrics  # noqa: E402
from qsmprep.science.masking import mask_box  # noqa: E402
from qsmprep.science.physics import (anisotropic_field, b0_direction_from_affine, dipole_kernel,  # noqa: E402
                                     padded_shape)

ANISOTROPIES_PPM = (0.0, 0.015)
NOISE_PPM = (0.001, 0.004)
TILT_DEG = 18.0
# Finer than inversion.L2_LAMBDAS, so that the L-curve's curvature is well sampled.
STUDY_LAMBDAS = np.logspace(-4, 1, 41)
TV_RATIOS_TO_GCV = (0.4, 1.0, 2.5, 6.3, 16.0)


def l2_study(field, mask, voxel_size, b0_dir, reference):
    """Per weight of STUDY_LAMBDAS: L2's NRMSE, GCV score, residual and penalty norms."""
    box = mask_box(mask, voxel_size, inversion.CROP_MARGIN_MM, inversion.CROP_MARGIN_MIN_VOXELS)
    field, mask, reference = field[box], mask[box], reference[box]
    fft_shape = padded_shape(mask.shape, factor=inversion.LINEAR_PAD_FACTOR, multiple=2)
    scale = float(np.sqrt(np.mean(field[mask] ** 2)))
    spectrum = scipy.fft.rfftn(np.where(mask, field, 0) / scale, s=fft_shape)
    kernel = dipole_kernel(fft_shape, voxel_size, b0_dir)
    gradient_spectrum = inversion.laplacian_spectrum(fft_shape, voxel_size)
    norm_weights = inversion.rfft_norm_weights(fft_shape)
    power = (np.abs(spectrum) ** 2 * norm_weights).astype(np.float32)
    counts = (norm_weights * np.prod(fft_shape)).astype(np.float32)
    rows = []
    for lam in STUDY_LAMBDAS:
        penalty = np.float32(lam) * gradient_spectrum
        denominator = kernel ** 2 + penalty
        denominator[0, 0, 0] = 1.0
        leftover = penalty / denominator
        residual = float(np.sum(power * leftover ** 2))
        solution_penalty = float(np.sum(power * gradient_spectrum * (kernel / denominator) ** 2))
        gcv = residual / float(np.sum(counts * leftover)) ** 2
        chi = scipy.fft.irfftn(spectrum * kernel / denominator, s=fft_shape)[
            tuple(slice(0, n) for n in mask.shape)] * scale
        rows.append({'lam': float(lam), 'nrmse': metrics.nrmse(chi, reference, mask), 'gcv': gcv,
                     'residual': residual, 'penalty': solution_penalty})
    return rows


def l_curve_corner(rows):
    """The weight of greatest curvature of (log residual, log penalty) over log weight."""
    t = np.log([row['lam'] for row in rows])
    rho = np.log([row['residual'] for row in rows]) / 2
    eta = np.log([row['penalty'] for row in rows]) / 2
    d_rho, d_eta = np.gradient(rho, t), np.gradient(eta, t)
    dd_rho, dd_eta = np.gradient(d_rho, t), np.gradient(d_eta, t)
    curvature = (d_rho * dd_eta - dd_rho * d_eta) / np.maximum((d_rho ** 2 + d_eta ** 2) ** 1.5, 1e-30)
    # Only interior points have both one-sided neighbours for the second derivatives.
    return rows[1 + int(np.argmax(curvature[1:-1]))]['lam']


def simulated_case(phantom, affine, anisotropy_ppm, noise_ppm, seed=0):
    rng = np.random.default_rng(seed)
    voxel_size = tuple(np.linalg.norm(affine[:3, :3], axis=0))
    b0_dir = b0_direction_from_affine(affine)
    total = voxel_averaged_field(phantom['chi'] - CHI_AIR, voxel_size, b0_dir)
    if anisotropy_ppm:
        fibres = random_fibre_directions(rng, phantom['chi'].shape, voxel_size)
        total += anisotropic_field(anisotropy_ppm * phantom['wm_fraction'], fibres, voxel_size, b0_dir)
    total += noise_ppm * rng.standard_normal(total.shape).astype(np.float32)
    local, mask = bgremove.vsharp(total, phantom['brain_mask'], voxel_size, b0_dir)
    return local, mask, voxel_size, b0_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('benchmarks/WEIGHT_CALIBRATION.md'))
    parser.add_argument('--voxel-size', type=float, default=1.0)
    args = parser.parse_args()
    phantom, affine = head_phantom(args.voxel_size)
    affine = tilted_affine(affine, TILT_DEG)
    lines = [
        '# Regularisation weight rules against structured model error', '',
        f'Simulated {args.voxel_size:g} mm head tilted {TILT_DEG:g} degrees, local field from V-SHARP of the '
        'total field with white noise and, where the anisotropy is not 0, white matter susceptibility '
        f'anisotropy (fibre directions smooth over {FIBRE_SMOOTHING_MM:g} mm). NRMSE against the true mean '
        'susceptibility over the V-SHARP mask. Weights are relative to the field scaled to unit RMS. Made by:',
        '', f'    python benchmarks/weight_calibration.py --out {args.out} --voxel-size {args.voxel_size:g}', '',
        '| anisotropy ppm | noise ppm | L2 best weight | L2 best NRMSE % | GCV weight | L2 NRMSE % at GCV '
        '| L-curve weight | L2 NRMSE % at L-curve | '
        + ' | '.join(f'TV NRMSE % at {r:g} x GCV' for r in TV_RATIOS_TO_GCV) + ' |',
        '|---' * (8 + len(TV_RATIOS_TO_GCV)) + '|']
    with scipy.fft.set_workers(os.cpu_count() or 1):
        for anisotropy in ANISOTROPIES_PPM:
            for noise in NOISE_PPM:
                started = time.time()
                local, mask, voxel_size, b0_dir = simulated_case(phantom, affine, anisotropy, noise)
                reference = np.where(mask, phantom['chi'], 0)
                rows = l2_study(local, mask, voxel_size, b0_dir, reference)
                best = min(rows, key=lambda row: row['nrmse'])
                gcv = min(rows, key=lambda row: row['gcv'])
                corner_lam = l_curve_corner(rows)
                corner = next(row for row in rows if row['lam'] == corner_lam)
                tv_scores = []
                for ratio in TV_RATIOS_TO_GCV:
                    chi, _ = inversion.invert(local, mask, voxel_size, b0_dir, method='tv',
                                              lam=ratio * gcv['lam'])
                    tv_scores.append(metrics.nrmse(chi, reference, mask))
                lines.append(
                    f'| {anisotropy:g} | {noise:g} | {best["lam"]:.3g} | {best["nrmse"]:.1f} | {gcv["lam"]:.3g} | '
                    f'{gcv["nrmse"]:.1f} | {corner["lam"]:.3g} | {corner["nrmse"]:.1f} | '
                    + ' | '.join(f'{score:.1f}' for score in tv_scores) + ' |')
                print(lines[-1], f'({time.time() - started:.0f} s)', flush=True)
    args.out.write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
