"""Multi-echo fits: R2*/T2*/S0 from the magnitude, the total field from the unwrapped phase.

Arrays hold the echoes on their last axis. Echo times are in seconds, R2* in 1/s, fields in ppm.
The fits are weighted linear least squares, solved in closed form for every voxel at once.
"""
import numpy as np
from scipy import ndimage

from .masking import masked_median
from .physics import hz_per_ppm

R2STAR_MAX_PER_S = 1000.0


def weighted_line_fit(echo_times, values, weights):
    """Slope and intercept of ``values`` against ``echo_times`` per voxel, weighted."""
    t = np.asarray(echo_times, dtype=np.float32)
    weight_sum = weights.sum(axis=-1)
    safe_sum = np.where(weight_sum > 0, weight_sum, 1.0)
    t_mean = (weights * t).sum(axis=-1) / safe_sum
    v_mean = (weights * values).sum(axis=-1) / safe_sum
    t_centred = t - t_mean[..., None]
    spread = (weights * t_centred ** 2).sum(axis=-1)
    slope = (weights * t_centred * (values - v_mean[..., None])).sum(axis=-1)
    slope = np.where(spread > 0, slope / np.where(spread > 0, spread, 1.0), 0.0)
    intercept = v_mean - slope * t_mean
    return slope.astype(np.float32), intercept.astype(np.float32)


def fit_r2star(magnitude, echo_times, mask=None):
    """Mono-exponential decay fit of multi-echo magnitude.

    Weighted log-linear fit with weights m^2 (the log of a magnitude m with noise sigma has
    variance sigma^2 / m^2). Returns ``(r2star_per_s, t2star_s, s0)``; R2* is clipped to
    [0, 1000] 1/s and T2* is 0 where R2* is 0. Voxels outside ``mask`` are 0.
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if magnitude.shape[-1] < 2:
        raise ValueError('an R2* fit needs at least two echoes')
    positive = np.maximum(magnitude, np.finfo(np.float32).tiny)
    weights = np.where(magnitude > 0, magnitude ** 2, 0.0).astype(np.float32)
    slope, intercept = weighted_line_fit(echo_times, np.log(positive), weights)
    r2star = np.clip(-slope, 0.0, R2STAR_MAX_PER_S)
    s0 = np.exp(np.clip(intercept, -80, 80)).astype(np.float32)
    with np.errstate(divide='ignore'):
        t2star = np.where(r2star > 0, 1.0 / r2star, 0.0).astype(np.float32)
    if mask is not None:
        inside = np.asarray(mask, dtype=bool)
        r2star, t2star, s0 = (np.where(inside, a, 0.0).astype(np.float32) for a in (r2star, t2star, s0))
    return r2star.astype(np.float32), t2star, s0


def fit_total_field(unwrapped_phase, magnitude, echo_times, field_strength_t, mask=None):
    """Total field (ppm) and phase offset (rad) from unwrapped multi-echo phase.

    Fits phase_n = offset + 2 pi f TE_n per voxel with weights m_n^2 (phase noise variance is
    sigma^2 / m^2). With one echo the offset is taken as 0. f in Hz is converted to ppm.
    """
    phase = np.asarray(unwrapped_phase, dtype=np.float32)
    echo_times = np.asarray(echo_times, dtype=np.float32)
    if phase.shape[-1] == 1:
        frequency_hz = phase[..., 0] / (2 * np.pi * echo_times[0])
        offset = np.zeros(phase.shape[:-1], dtype=np.float32)
    else:
        weights = np.asarray(magnitude, dtype=np.float32) ** 2
        slope, offset = weighted_line_fit(echo_times, phase, weights)
        frequency_hz = slope / (2 * np.pi)
    field_ppm = (frequency_hz / hz_per_ppm(field_strength_t)).astype(np.float32)
    if mask is not None:
        inside = np.asarray(mask, dtype=bool)
        field_ppm = np.where(inside, field_ppm, 0.0).astype(np.float32)
        offset = np.where(inside, offset, 0.0).astype(np.float32)
    return field_ppm, offset


def wrap_period_ppm(echo_times, field_strength_t):
    """Field step (ppm) that a wrong 2 pi in the shortest echo spacing adds to the fitted field."""
    echo_times = np.asarray(echo_times, dtype=float)
    spacing = np.diff(echo_times).min() if echo_times.size > 1 else echo_times[0]
    return 1.0 / (spacing * hz_per_ppm(field_strength_t))


def reliable_field_mask(field_ppm, phase_offset, mask, voxel_size, echo_times, field_strength_t,
                        smoothing_mm=4.0):
    """``mask`` without the voxels that took a wrong 2 pi in unwrapping, and their neighbours.

    A wrong 2 pi in the echo spacing shifts the fitted field by a wrap period and the fitted
    phase offset (the phase at TE = 0, smooth in space) by 2 pi TE1 / spacing. A voxel is
    dropped when its field is half a period off the median of its 5x5x5 neighbourhood, or when
    its phase offset is more than pi / 3 off the local average of the offset (a Gaussian of
    ``smoothing_mm`` over the mask), a test that still holds at the edge of the mask where few
    neighbours vote. A background removal that averages over spheres would otherwise smear
    their error over the brain.
    """
    mask = np.asarray(mask, dtype=bool)
    field_deviation = np.abs(np.asarray(field_ppm, dtype=np.float32) - masked_median(field_ppm, mask, size=5))
    outliers = field_deviation > wrap_period_ppm(echo_times, field_strength_t) / 2
    sigma = [smoothing_mm / d for d in voxel_size]
    unit_offset = np.where(mask, np.exp(1j * np.asarray(phase_offset, dtype=np.float32)), 0)
    local_offset = (ndimage.gaussian_filter(unit_offset.real, sigma)
                    + 1j * ndimage.gaussian_filter(unit_offset.imag, sigma))
    outliers |= np.abs(np.angle(unit_offset * np.conj(local_offset))) > np.pi / 3
    return mask & ~ndimage.binary_dilation(mask & outliers)
