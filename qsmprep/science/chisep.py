"""Susceptibility source separation (chi-separation, Shin et al., NeuroImage 2021).

Model (../shared/CONVENTIONS.md), all susceptibilities in ppm, chi+ >= 0 the paramagnetic part
and chi- >= 0 the magnitude of the diamagnetic part:

    local field = D * (chi+ - chi-)          (ppm)
    R2'         = Dr (chi+ + chi-)           (1/s), Dr the relaxometric constant in Hz/ppm

The field sees the difference of the two sources and R2' (the reversible part of R2*) their
sum. ``chi_separation`` solves, with p = chi+ and n = chi-,

    min  1/2 ||W omega0 (D (p - n) - f)||^2 + 1/2 ||W (Dr (p + n) - R2')||^2
         + omega0^2 s lambda (TV(p) + TV(n))        subject to p, n >= 0, both 0 outside the mask

with s the RMS of the field in the mask, so that ``lambda`` is relative to a field of unit RMS
as in ``inversion.tv_admm`` and means the same at any field strength.

Balance of the two data terms: both residuals are rates, the field in rad/s
(omega0 = 2 pi gamma_bar B0 for 1 ppm) and R2' in 1/s. For complex Gaussian noise the phase and
the log-magnitude of each echo carry the same error (sigma / |S|), and the field and R2* are the
slopes of the same weighted line fit over the echo times, so at high SNR they have the same error
in these units and equal weights balance them (an R2 map adds its own error, which this
ignores). The common weight W is the magnitude scaled to mean 1 in the mask, since both errors
scale as 1 / magnitude. Divided by omega0^2, the R2' term weighs (Dr / omega0)^2 against the
field term: 0.020 at 3 T with Dr = 114 Hz/ppm. On the simulations below, 10 times more or less
R2' weight gave worse chi+ and chi-.

The solver is ADMM with the splits v = D (p - n) (weighted field term, closed form per voxel),
z = grad p and grad n (TV, soft thresholding) and y = (p, n) (R2' term with non-negativity and
the mask as support, a small closed-form problem per voxel). The (p, n) step is diagonal in
k-space once written for the sum p + n and the difference p - n, because the gradient uses
periodic differences.
"""
import numpy as np
import scipy.fft

from .inversion import (CROP_MARGIN_MIN_VOXELS, CROP_MARGIN_MM, laplacian_spectrum, periodic_gradient,
                        periodic_gradient_adjoint)
from .masking import mask_box
from .physics import GAMMA_BAR_MHZ_PER_T, dipole_kernel, padded_shape

DR_HZ_PER_PPM_3T = 114.0
# Chosen on simulations only, never on in-vivo data (benchmarks/NOTES.md): the smallest weight
# with the lowest chi+ error, since piecewise-constant phantoms reward large TV weights.
CHISEP_LAMBDA = 3e-3
CHISEP_ITERATIONS = 60
CHISEP_TOLERANCE = 3e-3
# ADMM penalties relative to the field term's (1): the TV penalty follows lambda as in
# inversion.tv_admm; the penalty of the (p, n) >= 0 split only sets the speed of convergence.
TV_PENALTY_PER_LAMBDA = 100.0
NONNEGATIVE_PENALTY = 0.03

# Used only when no R2 map exists: R2' = R2* - R2 with one R2 for all brain tissue.
ASSUMED_TISSUE_R2_HZ_3T = 12.5
NO_R2_ASSUMPTION = (
    "No R2 map was given: R2' = R2* - R2 with one tissue R2 of {r2:g} 1/s everywhere in the brain "
    "(the 3 T default, 12.5 1/s or T2 = 80 ms, lies between white matter, T2 about 70 ms, and cortical "
    "grey matter, about 90 ms). Where the true R2 differs by dR2, chi+ + chi- is biased by dR2 / Dr ppm: "
    "deep grey matter nuclei (R2 15 to 20 1/s) are overestimated; R2' below 0 (CSF) is set to 0."
)


def r2prime(r2star_hz, r2_hz=None, mask=None, assumed_r2_hz=ASSUMED_TISSUE_R2_HZ_3T):
    """R2' = R2* - R2 in 1/s, clipped at 0, and the sidecar entries that say how it was made.

    With ``r2_hz`` (an R2 map, e.g. from multi-echo spin echo) the difference is taken voxel by
    voxel. Without it, R2 is the constant ``assumed_r2_hz`` (a 3 T value; see
    ``NO_R2_ASSUMPTION``, which the returned entries carry). Voxels outside ``mask`` are 0.
    """
    r2star_hz = np.asarray(r2star_hz, dtype=np.float32)
    if r2_hz is None:
        r2 = np.float32(assumed_r2_hz)
        sidecar = {'R2PrimeSource': 'R2star minus an assumed constant R2',
                   'AssumedR2': float(assumed_r2_hz),
                   'R2PrimeAssumption': NO_R2_ASSUMPTION.format(r2=assumed_r2_hz)}
    else:
        r2 = np.asarray(r2_hz, dtype=np.float32)
        sidecar = {'R2PrimeSource': 'R2star minus the given R2 map'}
    result = np.maximum(r2star_hz - r2, 0)
    if mask is not None:
        result = np.where(mask, result, 0)
    return result.astype(np.float32), sidecar


def relaxometric_constant(field_strength_t):
    """Dr (Hz/ppm) at ``field_strength_t``: the 3 T value scaled linearly with B0.

    In the static dephasing regime R2' is proportional to the frequency offset that the sources
    produce, gamma B0 chi, so Dr grows linearly with the field strength.
    """
    return DR_HZ_PER_PPM_3T * field_strength_t / 3.0


def sidecar_parameters(field_strength_t, dr_hz_per_ppm=DR_HZ_PER_PPM_3T, lam=CHISEP_LAMBDA,
                       iterations=CHISEP_ITERATIONS):
    """The method's parameters for the sidecars of the chi+ and chi- maps."""
    return {
        'EstimationAlgorithm': 'chi-separation (Shin et al. 2021), TV-regularised, ADMM',
        'RelaxometricConstant': float(dr_hz_per_ppm),
        'RelaxometricConstantUnits': 'Hz/ppm',
        'MagneticFieldStrength': float(field_strength_t),
        'RegularizationWeight': float(lam),
        'MaxIterations': int(iterations),
        'DataTermBalance': "field in rad/s and R2' in 1/s weighted equally, both by the normalised magnitude",
        'DiamagneticSign': 'chi- is stored as a non-negative magnitude; total chi = chi+ - chi-',
    }


def _omega0(field_strength_t):
    """Angular frequency (rad/s) of a 1 ppm field at ``field_strength_t`` tesla."""
    return 2 * np.pi * GAMMA_BAR_MHZ_PER_T * field_strength_t


class _NonnegativeProx:
    """Per voxel: argmin over p, n >= 0 of weight/2 (p + n - target)^2 + penalty/2 |(p, n) - (p0, n0)|^2.

    The unconstrained minimum moves p + n to s = (weight target + penalty/2 (p0 + n0)) /
    (weight + penalty/2) and keeps d = p0 - n0; it is feasible where s >= |d|. Elsewhere the
    smaller component is 0 (its KKT condition holds exactly where the free minimum makes it
    negative) and the larger one solves the 1-D problem, clipped at 0. The coefficients depend
    only on the weights, so they are computed once.
    """

    def __init__(self, target, weight, penalty):
        self.sum_offset = weight * target / (weight + 0.5 * penalty)
        self.sum_slope = 0.5 * penalty / (weight + 0.5 * penalty)
        self.face_offset = weight * target / (weight + penalty)
        self.face_slope = penalty / (weight + penalty)

    def __call__(self, p0, n0):
        difference = p0 - n0
        total = self.sum_offset + self.sum_slope * (p0 + n0)
        face = np.maximum(self.face_offset + self.face_slope * np.maximum(p0, n0), 0)
        feasible = total >= np.abs(difference)
        paramagnetic_face = difference >= 0
        p = np.where(feasible, 0.5 * (total + difference), np.where(paramagnetic_face, face, 0))
        n = np.where(feasible, 0.5 * (total - difference), np.where(paramagnetic_face, 0, face))
        return p, n


def chisep_admm(local_field_ppm, r2prime_hz, mask, voxel_size, b0_dir, field_strength_t,
                dr_hz_per_ppm=DR_HZ_PER_PPM_3T, magnitude=None, lam=CHISEP_LAMBDA,
                iterations=CHISEP_ITERATIONS, tolerance=CHISEP_TOLERANCE):
    """(chi+, chi-) in ppm on the grid of ``mask``, without cropping; see ``chi_separation``."""
    mask = np.asarray(mask, dtype=bool)
    shape = mask.shape
    fft_shape = padded_shape(shape, factor=1.0, multiple=2)
    pad = [(0, m - n) for n, m in zip(shape, fft_shape)]
    field = np.where(mask, local_field_ppm, 0).astype(np.float32)
    scale = float(np.sqrt(np.mean(field[mask] ** 2)))
    scale = scale if scale > 0 else 1.0
    field = np.pad(field / scale, pad)
    # R2' as the susceptibility sum it implies, in the same scaled units as the field.
    chi_sum = np.pad(np.where(mask, np.maximum(r2prime_hz, 0), 0) / (dr_hz_per_ppm * scale), pad).astype(np.float32)
    if magnitude is None:
        weight = mask.astype(np.float32)
    else:
        magnitude = np.asarray(magnitude, dtype=np.float32)
        weight = np.where(mask, magnitude / max(float(magnitude[mask].mean()), 1e-12), 0).astype(np.float32)
    weight_squared = np.pad(weight, pad) ** 2
    r2prime_weight = np.float32((dr_hz_per_ppm / _omega0(field_strength_t)) ** 2) * weight_squared

    kernel = dipole_kernel(fft_shape, voxel_size, b0_dir)
    mu_field, mu_gradient, mu_nonnegative = 1.0, TV_PENALTY_PER_LAMBDA * lam, NONNEGATIVE_PENALTY
    # The y split holds the constraints: 0 outside the mask, so its step only visits the mask.
    support = np.flatnonzero(np.pad(mask, pad))
    nonnegative_prox = _NonnegativeProx(chi_sum.ravel()[support], r2prime_weight.ravel()[support],
                                        np.float32(mu_nonnegative))
    # The v step (weighted field term) is a per-voxel average of the data and its target.
    field_data = weight_squared * field
    field_normaliser = 1 / (weight_squared + mu_field)
    sum_denominator = mu_gradient * laplacian_spectrum(fft_shape, voxel_size) + mu_nonnegative
    # The sum and difference come out halved (exact in floating point), so that p and n are
    # their sum and difference; the field of the difference takes twice the kernel.
    half_inverse_sum_denominator = (0.5 / sum_denominator).astype(np.float32)
    half_inverse_difference_denominator = (0.5 / (sum_denominator + 2 * mu_field * kernel ** 2)).astype(np.float32)
    field_kernel = (2 * mu_field * kernel).astype(np.float32)
    double_kernel = 2 * kernel
    threshold = np.float32(lam / mu_gradient)

    # Scaled ADMM: each split s of a value a (v of D (p - n), z of grad p and grad n, y of (p, n))
    # has a dual u. The (p, n) step only needs s - u, and the split step, with w = a + u, gives
    # s = prox(w) and the new u = w - s, so s - u = 2 s - w: each split keeps its dual and s - u,
    # updated in place (the gradients are 3 volumes each, whose temporaries cost as much as the
    # arithmetic).
    p, n = np.zeros(fft_shape, dtype=np.float32), np.zeros(fft_shape, dtype=np.float32)
    yp, yn, dual_yp, dual_yn, yp_less_dual, yn_less_dual = (np.zeros_like(p) for _ in range(6))
    dual_zp, dual_zn, zp_less_dual, zn_less_dual = (np.zeros((3,) + fft_shape, dtype=np.float32)
                                                    for _ in range(4))
    dual_v, v_less_dual = np.zeros_like(field), field.copy()
    for _ in range(iterations):
        # (p, n) step: with s = p + n and t = p - n the normal equations decouple in k-space.
        tv_p = periodic_gradient_adjoint(zp_less_dual, voxel_size)
        tv_n = periodic_gradient_adjoint(zn_less_dual, voxel_size)
        sum_rhs = tv_p + tv_n
        sum_rhs *= np.float32(mu_gradient)
        sum_rhs += np.float32(mu_nonnegative) * (yp_less_dual + yn_less_dual)
        difference_rhs = tv_p
        difference_rhs -= tv_n
        difference_rhs *= np.float32(mu_gradient)
        difference_rhs += np.float32(mu_nonnegative) * (yp_less_dual - yn_less_dual)
        sum_spectrum = scipy.fft.rfftn(sum_rhs)
        sum_spectrum *= half_inverse_sum_denominator
        half_total = scipy.fft.irfftn(sum_spectrum, s=fft_shape, overwrite_x=True)
        difference_spectrum = scipy.fft.rfftn(difference_rhs)
        field_spectrum = scipy.fft.rfftn(v_less_dual)
        field_spectrum *= field_kernel
        difference_spectrum += field_spectrum
        difference_spectrum *= half_inverse_difference_denominator
        half_difference = scipy.fft.irfftn(difference_spectrum, s=fft_shape)
        difference_spectrum *= double_kernel
        field_of_chi = scipy.fft.irfftn(difference_spectrum, s=fft_shape, overwrite_x=True)
        previous_p, previous_n = p, n
        p, n = half_total + half_difference, half_total - half_difference

        # v step: w = D (p - n) + u.
        w = field_of_chi
        w += dual_v
        v = w * np.float32(mu_field)
        v += field_data
        v *= field_normaliser
        np.subtract(w, v, out=dual_v)
        np.subtract(v, dual_v, out=v_less_dual)
        # z steps: z = soft-threshold(w), so the new dual w - z is w clipped to the threshold.
        for chi, dual_z, z_less_dual in ((p, dual_zp, zp_less_dual), (n, dual_zn, zn_less_dual)):
            w = periodic_gradient(chi, voxel_size)
            w += dual_z
            np.clip(w, -threshold, threshold, out=dual_z)
            np.subtract(w, dual_z, out=z_less_dual)
            z_less_dual -= dual_z
        # y step: w = (p, n) + u, held in u until the new u = w - y.
        dual_yp += p
        dual_yn += n
        yp.ravel()[support], yn.ravel()[support] = nonnegative_prox(dual_yp.ravel()[support],
                                                                   dual_yn.ravel()[support])
        for y, dual_y, y_less_dual in ((yp, dual_yp, yp_less_dual), (yn, dual_yn, yn_less_dual)):
            dual_y -= y
            np.subtract(y, dual_y, out=y_less_dual)
        change = np.sqrt((np.linalg.norm(p - previous_p) ** 2 + np.linalg.norm(n - previous_n) ** 2)
                         / max(np.linalg.norm(p) ** 2 + np.linalg.norm(n) ** 2, 1e-24))
        if change < tolerance:
            break
    # The split y holds the constraints exactly: non-negative, 0 outside the mask.
    crop = tuple(slice(0, s) for s in shape)
    return (yp[crop] * np.float32(scale)).astype(np.float32), (yn[crop] * np.float32(scale)).astype(np.float32)


def chi_separation(local_field_ppm, r2prime_hz, mask, voxel_size, b0_dir, field_strength_t,
                   dr_hz_per_ppm=DR_HZ_PER_PPM_3T, magnitude=None, lam=CHISEP_LAMBDA,
                   iterations=CHISEP_ITERATIONS, tolerance=CHISEP_TOLERANCE):
    """Paramagnetic and diamagnetic susceptibility (ppm) from the local field and R2'.

    ``local_field_ppm``: background-removed field in ppm of B0; ``r2prime_hz``: R2' in 1/s (see
    ``r2prime``); ``b0_dir``: unit B0 direction in voxel axes; ``field_strength_t`` sets the
    balance of the two data terms (module docstring); ``dr_hz_per_ppm``: the relaxometric
    constant Dr (114 Hz/ppm is a 3 T value); ``magnitude`` (optional) weights both data terms.

    Returns ``(chi_paramagnetic, chi_diamagnetic)``, both >= 0 and 0 outside ``mask``; the total
    susceptibility is their difference. They are not referenced to the mask mean: R2' fixes
    their absolute level, and referencing would make them negative. The solver works on the
    mask's box with ``CROP_MARGIN_MM`` of room, like ``inversion.invert``.
    """
    mask = np.asarray(mask, dtype=bool)
    chi_paramagnetic = np.zeros(mask.shape, dtype=np.float32)
    chi_diamagnetic = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return chi_paramagnetic, chi_diamagnetic
    box = mask_box(mask, voxel_size, CROP_MARGIN_MM, CROP_MARGIN_MIN_VOXELS)
    cropped_magnitude = None if magnitude is None else np.asarray(magnitude, dtype=np.float32)[box]
    chi_paramagnetic[box], chi_diamagnetic[box] = chisep_admm(
        np.asarray(local_field_ppm, dtype=np.float32)[box], np.asarray(r2prime_hz, dtype=np.float32)[box],
        mask[box], voxel_size, b0_dir, field_strength_t, dr_hz_per_ppm=dr_hz_per_ppm,
        magnitude=cropped_magnitude, lam=lam, iterations=iterations, tolerance=tolerance)
    return chi_paramagnetic, chi_diamagnetic
