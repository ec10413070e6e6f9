"""Dipole inversion: local field (ppm) to susceptibility (ppm).

- ``tkd``: truncated k-space division (Shmueli et al. 2009): |D| below the threshold is
  replaced by the threshold with D's sign.
- ``l2``: closed-form Tikhonov inversion with a gradient penalty, minimise
  1/2 ||D chi - f||^2 + lambda/2 ||grad chi||^2, diagonal in k-space.
- ``tv``: magnitude-weighted total variation solved with ADMM (the linear weighted TV of
  Milovic et al. 2018, FANSI): minimise 1/2 ||W (D chi - f)||^2 + lambda ||grad chi||_1 with the
  splits z = grad chi and v = D chi, so that every step is closed form (the chi step is
  diagonal in k-space because the gradient uses periodic differences).
- ``nltv``: the same TV with the nonlinear data term of FANSI, 1/2 ||W (exp(i D chi) - exp(i f))||^2
  on the field expressed as phase, which stays correct where noise pushes the phase near +-pi.

Regularisation weights are never tuned on a benchmark; they are chosen per dataset without
ground truth. L2's weight minimises generalised cross-validation (GCV), exact and nearly free
because the L2 solution is diagonal in k-space. TV's weight is L2's GCV weight times
``TV_TO_L2_WEIGHT``, a ratio fixed on simulated heads, and TV starts from that L2 solution.
``lam`` is relative to the field scaled to unit RMS inside the mask, so that a weight means the
same at any field strength.
"""
import numpy as np
import scipy.fft

from .masking import mask_box
from .physics import GAMMA_BAR_MHZ_PER_T, dipole_kernel, padded_shape

INVERSION_METHODS = ('tv', 'nltv', 'l2', 'tkd')
DEFAULT_INVERSION = 'tv'
TKD_THRESHOLD = 0.19
# GCV searches these relative weights, a quarter decade apart, from noise-free to very noisy fields.
L2_LAMBDAS = np.logspace(-4, 1, 21)
# TV's weight is this times L2's GCV weight, and its ADMM starts from that L2 solution with small
# penalties, so that 50 iterations reach the plateau (benchmarks/TV_CALIBRATION.md).
TV_TO_L2_WEIGHT = 1.0
TV_ITERATIONS = 50
TV_DATA_PENALTY = 0.1
TV_GRADIENT_PENALTY_RATIO = 10.0
NLTV_NEWTON_STEPS = 4
# Room around the mask's box for the solvers (masking.mask_box): 8 mm for the dipole fields of
# the tissue at the edge, and no fewer than 8 voxels on coarse grids, where fewer made L2's
# solution worse (the 2 mm test head: L2 42 % NRMSE with 4 voxels, under 40 % with 8).
CROP_MARGIN_MM = 8.0
CROP_MARGIN_MIN_VOXELS = 8
# TKD and L2 treat the zero field outside the mask as data, so their FFT grid is zero-padded to
# this factor of the mask's box, or the dipole fields of the solution wrap around. TV's data
# weight is 0 outside the mask, so the field there is free and it needs no padding.
LINEAR_PAD_FACTOR = 2.0


def _grid(shape, factor=1.0):
    return padded_shape(shape, factor=factor, multiple=2)


def _crop(volume, shape):
    return volume[tuple(slice(0, n) for n in shape)]


def _rms_scale(field, mask):
    scale = float(np.sqrt(np.mean(field[mask] ** 2))) if mask.any() else 1.0
    return scale if scale > 0 else 1.0


def phase_scale_rad_per_ppm(echo_times_s, field_strength_t):
    """Phase (rad) that 1 ppm of field accrues by the mean echo time: nltv's data scale.

    The multi-echo field is one number per voxel; expressing it as phase at the mean echo time
    keeps the nonlinear data term's sensitivity to noise close to that of the echoes it came from.
    """
    return float(2 * np.pi * GAMMA_BAR_MHZ_PER_T * field_strength_t * np.mean(echo_times_s))


def tkd(local_field_ppm, mask, voxel_size, b0_dir, threshold=TKD_THRESHOLD):
    """Susceptibility (ppm) by truncated k-space division, 0 outside ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    shape = mask.shape
    fft_shape = _grid(shape, LINEAR_PAD_FACTOR)
    kernel = dipole_kernel(fft_shape, voxel_size, b0_dir)
    truncated = np.where(np.abs(kernel) > threshold, kernel, np.where(kernel < 0, -threshold, threshold))
    spectrum = scipy.fft.rfftn(np.where(mask, local_field_ppm, 0).astype(np.float32), s=fft_shape)
    chi = _crop(scipy.fft.irfftn(spectrum / truncated, s=fft_shape), shape)
    return np.where(mask, chi, 0).astype(np.float32)


def laplacian_spectrum(fft_shape, voxel_size):
    """|F grad|^2 summed over axes on the rfft grid of ``fft_shape``: the spectrum of grad^T grad (-Laplacian)."""
    total = np.zeros(fft_shape[:-1] + (fft_shape[-1] // 2 + 1,), dtype=np.float32)
    for axis, (n, d) in enumerate(zip(fft_shape, voxel_size)):
        index = np.arange(total.shape[axis])
        view = [1, 1, 1]
        view[axis] = index.size
        total += ((2 - 2 * np.cos(2 * np.pi * index / n)) / d ** 2).reshape(view).astype(np.float32)
    return total


def rfft_norm_weights(fft_shape):
    """Weights that turn sums of |rfft|^2 into sums over the full spectrum (Parseval)."""
    n = fft_shape[-1]
    weights = np.full(n // 2 + 1, 2.0, dtype=np.float32)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    return weights / np.prod(fft_shape)


def _l2_gcv_weight(spectrum, kernel, gradient_spectrum, fft_shape, lambdas):
    """The weight of ``lambdas`` minimising generalised cross-validation (Golub et al. 1979).

    The L2 solution's influence matrix is diagonal in k-space, with entries D^2 / (D^2 +
    lambda |G|^2), so GCV(lambda) = ||residual||^2 / trace(I - influence)^2 costs one pass
    over the spectrum per weight: the weight that best predicts left-out data.
    """
    norm_weights = rfft_norm_weights(fft_shape)
    power = (np.abs(spectrum) ** 2 * norm_weights).astype(np.float32)
    counts = (norm_weights * np.prod(fft_shape)).astype(np.float32)  # full-spectrum entries each stands for
    kernel_squared = kernel ** 2
    scores = []
    for weight in lambdas:
        penalty = np.float32(weight) * gradient_spectrum
        denominator = kernel_squared + penalty
        denominator[0, 0, 0] = 1.0
        leftover = penalty / denominator
        scores.append(float(np.sum(power * leftover ** 2)) / float(np.sum(counts * leftover)) ** 2)
    return float(lambdas[int(np.argmin(scores))])


def l2_gradient(local_field_ppm, mask, voxel_size, b0_dir, lam=None, lambdas=L2_LAMBDAS,
                pad_factor=LINEAR_PAD_FACTOR, voxel_averaged=True):
    """Susceptibility (ppm) by closed-form L2 with a gradient penalty, 0 outside ``mask``.

    ``lam=None`` picks the weight of ``lambdas`` that minimises GCV; ``voxel_averaged`` selects
    the dipole kernel (``physics.dipole_kernel``). Returns ``(chi, lam)``.
    """
    mask = np.asarray(mask, dtype=bool)
    shape = mask.shape
    fft_shape = _grid(shape, pad_factor)
    field = np.where(mask, local_field_ppm, 0).astype(np.float32)
    scale = _rms_scale(field, mask)
    spectrum = scipy.fft.rfftn(field / scale, s=fft_shape)
    kernel = dipole_kernel(fft_shape, voxel_size, b0_dir, voxel_averaged=voxel_averaged)
    gradient_spectrum = laplacian_spectrum(fft_shape, voxel_size)
    if lam is None:
        lam = _l2_gcv_weight(spectrum, kernel, gradient_spectrum, fft_shape, lambdas)
    denominator = kernel ** 2 + lam * gradient_spectrum
    denominator[0, 0, 0] = 1.0
    chi = _crop(scipy.fft.irfftn(spectrum * kernel / denominator, s=fft_shape), shape) * scale
    return np.where(mask, chi, 0).astype(np.float32), lam


def _axis_slices(axis, first, second):
    """Index tuples selecting ``first`` and ``second`` (slices) along ``axis`` of a 3-D array."""
    def along(part):
        index = [slice(None)] * 3
        index[axis] = part
        return tuple(index)
    return along(first), along(second)


def periodic_gradient(volume, voxel_size):
    """Forward differences with periodic boundaries, stacked on a new first axis (float32)."""
    volume = np.asarray(volume, dtype=np.float32)
    gradient = np.empty((3,) + volume.shape, dtype=np.float32)
    for axis, d in enumerate(voxel_size):
        # Written into the output slice by slice: np.roll would copy the volume first.
        body, body_next = _axis_slices(axis, slice(0, -1), slice(1, None))
        last, first = _axis_slices(axis, slice(-1, None), slice(0, 1))
        np.subtract(volume[body_next], volume[body], out=gradient[axis][body])
        np.subtract(volume[first], volume[last], out=gradient[axis][last])
        gradient[axis] *= np.float32(1 / d)
    return gradient


def periodic_gradient_adjoint(gradients, voxel_size):
    """Adjoint of ``periodic_gradient`` (minus the divergence)."""
    total = np.zeros(gradients.shape[1:], dtype=np.float32)
    difference = np.empty_like(total)
    for axis, d in enumerate(voxel_size):
        component = gradients[axis]
        body, body_previous = _axis_slices(axis, slice(1, None), slice(0, -1))
        first, last = _axis_slices(axis, slice(0, 1), slice(-1, None))
        np.subtract(component[body_previous], component[body], out=difference[body])
        np.subtract(component[last], component[first], out=difference[first])
        difference *= np.float32(1 / d)
        total += difference
    return total


class _WeightedTV:
    """ADMM for magnitude-weighted TV on one padded grid.

    With ``phase_scale`` (rad per unit of the scaled field) the data term is the nonlinear
    one, |exp(i phase_scale v) - exp(i phase_scale f)|^2, and the v step is solved per voxel
    by Newton's method; otherwise it is the linear |v - f|^2 with a closed-form v step.
    """

    def __init__(self, field, weight, voxel_size, b0_dir, phase_scale=None):
        self.fft_shape = field.shape
        self.voxel_size = voxel_size
        self.field = field
        self.weight_squared = weight ** 2
        self.phase_scale = phase_scale
        self.kernel = dipole_kernel(self.fft_shape, voxel_size, b0_dir)
        self.gradient_spectrum = laplacian_spectrum(self.fft_shape, voxel_size)
        self.chi = np.zeros(self.fft_shape, dtype=np.float32)
        self.z = np.zeros((3,) + self.fft_shape, dtype=np.float32)
        self.s = np.zeros_like(self.z)
        self.v = field.copy()
        self.t = np.zeros_like(field)

    def _irfft(self, spectrum):
        return scipy.fft.irfftn(spectrum, s=self.fft_shape).astype(np.float32, copy=False)

    def _data_step(self, target, mu_data):
        """v minimising the data term plus mu_data/2 |v - target|^2."""
        if self.phase_scale is None:
            return self.data_offset + self.data_gain * target
        # Newton on w^2 (1 - cos(c (v - f))) / c^2 + mu/2 (v - target)^2, voxel by voxel. Where the
        # cosine is negative the term is concave and the curvature falls to mu: each step is kept
        # within one radian of phase, or a small mu throws v across several wraps (in vivo and on a
        # simulated head at 7 T and 40 ms the map diverged to over 1000 % NRMSE).
        c = self.phase_scale
        v = target.copy()
        for _ in range(NLTV_NEWTON_STEPS):
            residual = c * (v - self.field)
            slope = self.weight_squared * np.sin(residual) / c + mu_data * (v - target)
            curvature = self.weight_squared * np.maximum(np.cos(residual), 0) + mu_data
            v -= np.clip(slope / curvature, -1 / c, 1 / c)
        return v

    def warm_start(self, chi):
        """Start from ``chi`` (on the padded grid) with the splits consistent with it."""
        self.chi = np.asarray(chi, dtype=np.float32)
        self.z = periodic_gradient(self.chi, self.voxel_size)
        self.v = self._irfft(scipy.fft.rfftn(self.chi) * self.kernel)

    def run(self, lam, iterations, tolerance, mu_data, mu_ratio, progress=None):
        """ADMM iterations at weight ``lam``; stops early when chi changes by less than ``tolerance``.

        The penalties are ``mu_data`` on the data split and ``mu_ratio * lam * mu_data`` on the
        gradient split. ``progress(done, iterations)`` is called after each iteration.

        The updates are arranged to touch each volume as few times as possible (numpy's
        elementwise operations, not the FFTs, dominate the cost): the chi step's two k-space
        factors are precomputed, and the scaled dual s of the gradient split equals the clipped
        z candidate, so z and s come from one clip.
        """
        mu_gradient = mu_ratio * lam * mu_data
        threshold = lam / mu_gradient
        denominator = mu_data * self.kernel ** 2 + mu_gradient * self.gradient_spectrum
        denominator[0, 0, 0] = 1.0
        gradient_factor = (mu_gradient / denominator).astype(np.float32)
        data_factor = (mu_data * self.kernel / denominator).astype(np.float32)
        self.data_gain = (mu_data / (self.weight_squared + mu_data)).astype(np.float32)
        self.data_offset = (self.weight_squared * self.field / (self.weight_squared + mu_data)).astype(np.float32)
        for iteration in range(iterations):
            divergence = periodic_gradient_adjoint(self.z - self.s, self.voxel_size)
            chi_spectrum = gradient_factor * scipy.fft.rfftn(divergence)
            chi_spectrum += data_factor * scipy.fft.rfftn(self.v - self.t)
            previous = self.chi
            self.chi = self._irfft(chi_spectrum)
            chi_spectrum *= self.kernel
            field_of_chi = self._irfft(chi_spectrum)
            candidate = periodic_gradient(self.chi, self.voxel_size)
            candidate += self.s
            self.s = np.clip(candidate, -threshold, threshold)
            self.z = candidate - self.s
            field_of_chi += self.t
            self.v = self._data_step(field_of_chi, mu_data)
            self.t = field_of_chi - self.v
            if progress is not None:
                progress(iteration + 1, iterations)
            if tolerance and iteration % 5 == 4:
                change = np.linalg.norm(self.chi - previous) / max(np.linalg.norm(self.chi), 1e-12)
                if change < tolerance:
                    break
        return self


def tv_admm(local_field_ppm, mask, voxel_size, b0_dir, magnitude=None, lam=None, iterations=TV_ITERATIONS,
            tolerance=1e-3, phase_scale_rad_per_ppm=None, warm_start=True, mu_data=TV_DATA_PENALTY,
            mu_ratio=TV_GRADIENT_PENALTY_RATIO, progress=None):
    """Susceptibility (ppm) by magnitude-weighted TV with ADMM, 0 outside ``mask``.

    The data weight is the magnitude scaled to mean 1 inside the mask (1 without magnitude)
    and 0 outside, so the field outside the mask is not data. ``lam=None`` takes
    ``TV_TO_L2_WEIGHT`` times L2's GCV weight; ``warm_start`` starts ADMM from L2's GCV solution.
    ``phase_scale_rad_per_ppm`` (2 pi gamma B0 TE) selects the nonlinear data term;
    ``progress(done, iterations)`` is called after each ADMM iteration. Returns ``(chi, lam)``.
    """
    mask = np.asarray(mask, dtype=bool)
    shape = mask.shape
    fft_shape = _grid(shape)
    pad = [(0, m - n) for n, m in zip(shape, fft_shape)]
    field = np.where(mask, local_field_ppm, 0).astype(np.float32)
    scale = _rms_scale(field, mask)
    start = None
    if lam is None or warm_start:
        start, l2_lam = l2_gradient(field, mask, voxel_size, b0_dir)
        lam = TV_TO_L2_WEIGHT * l2_lam if lam is None else lam
    if magnitude is None:
        weight = mask.astype(np.float32)
    else:
        magnitude = np.asarray(magnitude, dtype=np.float32)
        weight = np.where(mask, magnitude / max(float(magnitude[mask].mean()), 1e-12), 0).astype(np.float32)
    phase_scale = None if phase_scale_rad_per_ppm is None else phase_scale_rad_per_ppm * scale
    solver = _WeightedTV(np.pad(field / scale, pad), np.pad(weight, pad), voxel_size, b0_dir, phase_scale)
    if warm_start:
        solver.warm_start(np.pad(start / scale, pad))
    solver.run(lam, iterations, tolerance, mu_data, mu_ratio, progress)
    chi = _crop(solver.chi, shape) * scale
    return np.where(mask, chi, 0).astype(np.float32), float(lam)


def invert(local_field_ppm, mask, voxel_size, b0_dir, method=DEFAULT_INVERSION, magnitude=None, progress=None,
           **options):
    """Dispatch to a dipole inversion method; returns ``(chi_ppm, parameters)``.

    ``parameters`` holds what the method chose (the regularisation weight) for the sidecar.
    The solvers work on the mask's box with room (``CROP_MARGIN_MM``, ``masking.mask_box``):
    outside the mask the field is no data (TV) or zero (TKD, L2). ``progress(done, total)`` hears
    of the iterations of the iterative methods.
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f'unknown inversion method {method!r}; choose from {INVERSION_METHODS}')
    mask = np.asarray(mask, dtype=bool)
    chi = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return chi, {}
    box = mask_box(mask, voxel_size, CROP_MARGIN_MM, CROP_MARGIN_MIN_VOXELS)
    field = np.asarray(local_field_ppm, dtype=np.float32)[box]
    parameters = {}
    if method in ('tv', 'nltv'):
        cropped_magnitude = None if magnitude is None else np.asarray(magnitude, dtype=np.float32)[box]
        if method == 'nltv' and 'phase_scale_rad_per_ppm' not in options:
            raise ValueError('nltv needs phase_scale_rad_per_ppm (2 pi gamma B0 TE)')
        chi[box], lam = tv_admm(field, mask[box], voxel_size, b0_dir, magnitude=cropped_magnitude, progress=progress,
                                **options)
        parameters['RegularizationWeight'] = lam
    elif method == 'l2':
        chi[box], lam = l2_gradient(field, mask[box], voxel_size, b0_dir, **options)
        parameters['RegularizationWeight'] = lam
    else:
        chi[box] = tkd(field, mask[box], voxel_size, b0_dir, **options)
        parameters['TKDThreshold'] = options.get('threshold', TKD_THRESHOLD)
    return chi, parameters


def reference_to_mask_mean(chi_ppm, mask):
    """Susceptibility relative to its mean over ``mask`` (CONVENTIONS.md), 0 outside."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(chi_ppm, dtype=np.float32)
    return np.where(mask, chi_ppm - chi_ppm[mask].mean(), 0).astype(np.float32)
