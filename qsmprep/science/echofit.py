"""Multi-echo fits: R2*/T2*/S0 from the magnitude, the total field from the unwrapped phase.

Arrays hold the echoes on their last axis. Echo times are in seconds, R2* in 1/s, fields in ppm.
The line fits are weighted linear least squares, solved in closed form for every voxel at once;
the complex field fit refines the line with a few Gauss-Newton steps, also for all voxels at once.
"""
import numpy as np
from scipy import ndimage

from .masking import bounding_box, masked_median
from .physics import hz_per_ppm

R2STAR_MAX_PER_S = 1000.0
# Total-field fits, in the order the BIDS sidecar may name them (EstimationAlgorithm).
ECHO_FIT_METHODS = ('complex', 'linear')
# From this many echoes the complex fit is the default and the field noise can be estimated;
# with fewer, the line passes through every echo and leaves no residual.
COMPLEX_FIT_MIN_ECHOES = 3
COMPLEX_FIT_ITERATIONS = 5
# Neighbourhood (voxels per side) over which the residual variance of the field fit is pooled.
NOISE_POOL_SIZE = 3


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
    inside = np.ones(magnitude.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    # Only the voxels inside are fitted, echoes first (see echoes_first); the transposes hand
    # weighted_line_fit (voxels, echoes) views whose sums over echoes add contiguous rows.
    voxel_magnitude = echoes_first(magnitude, inside)
    positive = np.maximum(voxel_magnitude, np.finfo(np.float32).tiny)
    weights = np.where(voxel_magnitude > 0, voxel_magnitude ** 2, 0.0).astype(np.float32)
    slope, intercept = weighted_line_fit(echo_times, np.log(positive).T, weights.T)
    r2star = np.clip(-slope, 0.0, R2STAR_MAX_PER_S)
    s0 = np.exp(np.clip(intercept, -80, 80)).astype(np.float32)
    with np.errstate(divide='ignore'):
        t2star = np.where(r2star > 0, 1.0 / r2star, 0.0).astype(np.float32)
    return _scatter(r2star, inside), _scatter(t2star, inside), _scatter(s0, inside)


def echo_fit_method(n_echoes, method=None):
    """The total-field fit that ``fit_total_field`` uses for ``n_echoes`` echoes.

    ``method`` when given, else 'complex' from ``COMPLEX_FIT_MIN_ECHOES`` echoes and 'linear'
    below: with two echoes both fits pass exactly through the data and agree, and with one the
    complex fit cannot tell the phase offset from the field.
    """
    if method is None:
        return 'complex' if n_echoes >= COMPLEX_FIT_MIN_ECHOES else 'linear'
    if method not in ECHO_FIT_METHODS:
        raise ValueError(f'unknown echo fit method {method!r}; choose from {ECHO_FIT_METHODS}')
    if method == 'complex' and n_echoes < 2:
        raise ValueError('the complex echo fit needs at least two echoes')
    return method


def fit_total_field(unwrapped_phase, magnitude, echo_times, field_strength_t, mask=None, method=None,
                    return_noise=False):
    """Total field (ppm) and phase offset (rad) from unwrapped multi-echo phase.

    'linear' fits phase_n = offset + 2 pi f TE_n per voxel with weights m_n^2 (phase noise variance
    is sigma^2 / m^2); with one echo the offset is taken as 0. 'complex' (the default from three
    echoes, see ``echo_fit_method``) starts from that line and minimises the magnitude-weighted
    complex residual sum_n |S_n - m_n exp(i (offset + 2 pi f TE_n))|^2 with S_n = m_n exp(i phase_n):
    a wrong 2 pi in a single echo does not affect it, and it keeps the unwrapped field of its
    start. f in Hz is converted to ppm. ``method`` is one of ``ECHO_FIT_METHODS``, or None for
    the choice of ``echo_fit_method`` (which the caller can record). Only voxels inside ``mask``
    are fitted; the others are 0.

    With ``return_noise`` (three echoes or more) a third map is returned: the standard deviation
    of the fitted field in ppm, see ``field_noise_ppm``.
    """
    phase = np.asarray(unwrapped_phase, dtype=np.float32)
    echo_times = np.asarray(echo_times, dtype=np.float32)
    n_echoes = phase.shape[-1]
    method = echo_fit_method(n_echoes, method)
    if return_noise and n_echoes < COMPLEX_FIT_MIN_ECHOES:
        raise ValueError('a field noise map needs at least three echoes (two fit the line exactly)')
    inside = np.ones(phase.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    voxel_phase = echoes_first(phase, inside)
    weights = echoes_first(magnitude, inside) ** 2
    # The fits work with the phase at each voxel's weighted mean echo time and the angular frequency.
    t_mean, centred, spread = _centred_echo_times(echo_times, weights)
    if n_echoes == 1:
        angular_frequency = voxel_phase[0] / echo_times[0]
        mean_phase = angular_frequency * t_mean
    else:
        mean_phase, angular_frequency = _line_fit(voxel_phase, weights, centred, spread)
        if method == 'complex':
            mean_phase, angular_frequency = _complex_fit(voxel_phase, weights, echo_times, centred, spread,
                                                         mean_phase, angular_frequency)
    to_ppm = 1.0 / (2 * np.pi * hz_per_ppm(field_strength_t))
    field_ppm = _scatter(angular_frequency * to_ppm, inside)
    offset = _scatter(mean_phase - angular_frequency * t_mean, inside)
    if not return_noise:
        return field_ppm, offset
    squared_residual = _squared_residual(voxel_phase, weights, centred, mean_phase, angular_frequency)
    return field_ppm, offset, _field_noise_ppm(squared_residual, spread, echo_times, field_strength_t, inside)


def echoes_first(array, inside):
    """float32 (echoes, voxels) array of the voxels inside ``inside``.

    With the echoes first, sums over echoes add contiguous rows, many times faster than sums
    over a short last axis. Gathered echo by echo: NIfTI arrays are in Fortran order, where
    reshaping the 4-D array to (voxels, echoes) copies it whole.
    """
    array = np.asarray(array, dtype=np.float32)
    return np.stack([array[..., echo][inside] for echo in range(array.shape[-1])])


def _scatter(values, inside):
    """float32 volume of ``inside``'s shape holding ``values`` inside and 0 outside."""
    volume = np.zeros(inside.shape, dtype=np.float32)
    volume[inside] = values
    return volume


def _echo_sum(a, b):
    """sum_n a_n b_n per voxel of two (echoes, voxels) arrays, without an (echoes, voxels) temporary."""
    return np.einsum('ev,ev->v', a, b)


def _phase_residual(phase, times, mean_phase, angular_frequency, out):
    """phase - mean_phase - angular_frequency * times into the (echoes, voxels) buffer ``out``.

    The fits spend their time on (echoes, voxels) arrays; filling one buffer avoids allocating
    new ones at every step.
    """
    np.multiply(angular_frequency, times, out=out)
    np.subtract(phase, out, out=out)
    return np.subtract(out, mean_phase, out=out)


def _centred_echo_times(echo_times, weights):
    """Per voxel: weighted mean echo time, echo times less it (echoes, voxels), weighted spread.

    About the weighted mean time, the phase at that time and the frequency are uncorrelated
    in a weighted line fit, so each has its own one-number normal equation.
    """
    weight_sum = weights.sum(axis=0)
    t_mean = (echo_times @ weights) / np.where(weight_sum > 0, weight_sum, 1.0)
    centred = echo_times[:, None] - t_mean
    spread = _echo_sum(weights * centred, centred)
    return t_mean, centred, spread


def _line_fit(phase, weights, centred_times, spread):
    """Weighted line fit of (echoes, voxels) ``phase`` against echo time per voxel.

    Returns the phase at the weighted mean echo time and the slope (rad/s), as
    ``weighted_line_fit`` does, with 0 where the weights leave them undefined.
    """
    weight_sum = weights.sum(axis=0)
    mean_phase = _echo_sum(weights, phase) / np.where(weight_sum > 0, weight_sum, 1.0)
    slope = _echo_sum(weights * centred_times, phase) / np.where(spread > 0, spread, np.inf)
    return mean_phase, slope


def _complex_fit(phase, weights, echo_times, centred_times, spread, mean_phase, angular_frequency):
    """Minimise sum_n w_n |exp(i phase_n) - exp(i (phi + omega t_n))|^2 per voxel.

    ``phase``, ``weights`` (m^2) and ``centred_times`` t_n (the echo times less their weighted
    mean) are (echoes, voxels); ``spread`` is sum_n w_n t_n^2. ``mean_phase`` phi and
    ``angular_frequency`` omega (rad/s) are the weighted line fit of ``phase``; the fitted pair
    is returned. The cost is sum_n 2 w_n (1 - cos r_n) with the phase residual
    r_n = phase_n - phi - omega t_n. Its Gauss-Newton step is the weighted line fit of sin r_n
    against t_n, whose normal matrix sum_n w_n (1, t_n)^T (1, t_n) bounds the true curvature
    (the same sum with w_n cos r_n) from above: every step minimises a quadratic majorant of the
    cost and so lowers it, without damping or line search, and the fit stays in the basin of its
    start, i.e. on the unwrapped branch of the line fit.
    """
    weight_sum = weights.sum(axis=0)
    # Voxels without signal spread (no magnitude, or all in one echo) keep their start.
    safe_weight_sum = np.where(weight_sum > 0, weight_sum, np.inf)
    safe_spread = np.where(spread > 0, spread, np.inf)
    weighted_centred = weights * centred_times
    residual = np.empty_like(phase)
    # Two starts: the line, and the line's frequency corrected to fit the successive echo
    # differences with, for it, the best phase at the mean time (the weighted circular mean of
    # the phases rotated back, taken relative to the line's so that it stays on the same branch).
    # The corrected start escapes the pull of a single wrongly unwrapped echo; the line is kept
    # where it fits better, which it can when the echo differences are noisy.
    corrected_frequency = angular_frequency + _echo_difference_correction(phase, weights, echo_times,
                                                                          angular_frequency)
    _phase_residual(phase, centred_times, mean_phase, corrected_frequency, out=residual)
    corrected_phase = mean_phase + np.arctan2(_echo_sum(weights, np.sin(residual)),
                                              _echo_sum(weights, np.cos(residual)))
    corrected_is_better = (
        _complex_cost(weights, _phase_residual(phase, centred_times, corrected_phase, corrected_frequency,
                                               residual))
        < _complex_cost(weights, _phase_residual(phase, centred_times, mean_phase, angular_frequency,
                                                 residual)))
    mean_phase = np.where(corrected_is_better, corrected_phase, mean_phase)
    angular_frequency = np.where(corrected_is_better, corrected_frequency, angular_frequency)
    for _ in range(COMPLEX_FIT_ITERATIONS):
        sine = np.sin(_phase_residual(phase, centred_times, mean_phase, angular_frequency, residual),
                      out=residual)
        mean_phase = mean_phase + _echo_sum(weights, sine) / safe_weight_sum
        angular_frequency = angular_frequency + _echo_sum(weighted_centred, sine) / safe_spread
    return mean_phase, angular_frequency


def _complex_cost(weights, residual):
    """sum_n w_n (1 - cos r_n) per voxel, half the squared complex residual; overwrites ``residual``."""
    # 1 - cos r = 2 sin^2(r / 2), which keeps small residuals in float32.
    half_sine = np.sin(np.multiply(residual, 0.5, out=residual), out=residual)
    return 2 * _echo_sum(weights, np.square(half_sine, out=half_sine))


def _echo_difference_correction(phase, weights, echo_times, angular_frequency):
    """Frequency (rad/s) to add to ``angular_frequency`` so that it fits successive echo differences.

    The phase steps between successive echoes, less the frequency's, are averaged as unit phasors
    weighted by m_n m_n+1 (as their Hermitian products S_n+1 conj(S_n) are): a wrong 2 pi in a
    single echo leaves them unchanged, whereas it pulls the line fit far enough (a fifth of the
    period 1 / echo spacing with five echoes) to start the complex fit in a wrong local minimum.
    The correction stays within half a period, so the unwrapped branch of the line is kept.
    """
    spacing = np.diff(echo_times)
    step = np.diff(phase, axis=0) - angular_frequency * spacing[:, None]
    pair_weights = np.sqrt(weights[1:] * weights[:-1])
    mean_step = np.arctan2(_echo_sum(pair_weights, np.sin(step)), _echo_sum(pair_weights, np.cos(step)))
    # Without signal in any pair the mean step is arctan2(0, 0) = 0; the spacing floor avoids 0 / 0.
    safe_sum = np.maximum(pair_weights.sum(axis=0), np.finfo(np.float32).tiny)
    mean_spacing = np.maximum((spacing @ pair_weights) / safe_sum, spacing.min())
    return mean_step / mean_spacing


def field_noise_ppm(unwrapped_phase, magnitude, echo_times, field_strength_t, field_ppm, phase_offset,
                    mask=None):
    """Standard deviation (ppm) of a fitted total field, per voxel, from the fit's residual.

    With complex noise of standard deviation sigma per real component, the phase of echo n has
    variance sigma^2 / m_n^2 and the fitted angular frequency sigma^2 / sum_n m_n^2 (TE_n - TE_mean)^2
    (the inverse curvature of the cost; TE_mean weighted by m^2). sigma^2 is estimated from the
    residual |S_n - m_n exp(i (offset + omega TE_n))|^2: each voxel has n_echoes - 2 degrees of
    freedom, too few on their own (one with three echoes), so residuals and degrees of freedom
    are pooled over the voxel's ``NOISE_POOL_SIZE``-cube neighbourhood inside ``mask``. Model
    errors (non-linear phase near air) thus raise the noise where they occur. Where the signal
    is absent the noise is capped at the wrap period (``wrap_period_ppm``), beyond which the field
    carries no information, so the map is finite everywhere; 0 outside ``mask``.
    """
    phase = np.asarray(unwrapped_phase, dtype=np.float32)
    echo_times = np.asarray(echo_times, dtype=np.float32)
    if phase.shape[-1] < COMPLEX_FIT_MIN_ECHOES:
        raise ValueError('a field noise map needs at least three echoes (two fit the line exactly)')
    inside = np.ones(phase.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    voxel_phase = echoes_first(phase, inside)
    weights = echoes_first(magnitude, inside) ** 2
    field_ppm = np.asarray(field_ppm, dtype=np.float32)[inside]
    angular_frequency = 2 * np.pi * hz_per_ppm(field_strength_t) * field_ppm
    offset = np.asarray(phase_offset, dtype=np.float32)[inside]
    _, _, spread = _centred_echo_times(echo_times, weights)
    squared_residual = _squared_residual(voxel_phase, weights, echo_times[:, None], offset, angular_frequency)
    return _field_noise_ppm(squared_residual, spread, echo_times, field_strength_t, inside)


def _squared_residual(phase, weights, times, phase_at_0, angular_frequency):
    """sum_n |S_n - m_n exp(i (phase_at_0 + omega times_n))|^2 per voxel, with S_n = m_n exp(i phase_n)."""
    residual = _phase_residual(phase, times, phase_at_0, angular_frequency, np.empty_like(phase))
    # |exp(i a) - exp(i b)|^2 = 2 (1 - cos(a - b)).
    return 2 * _complex_cost(weights, residual)


def _field_noise_ppm(squared_residual, spread, echo_times, field_strength_t, inside):
    """``field_noise_ppm`` from each voxel's squared residual and sum_n m_n^2 (TE_n - TE_mean)^2."""
    residual_volume = _scatter(squared_residual, inside)
    degrees_of_freedom = _scatter(len(echo_times) - 2.0, inside)
    pooled = ndimage.uniform_filter(residual_volume, NOISE_POOL_SIZE)[inside]
    pooled_dof = ndimage.uniform_filter(degrees_of_freedom, NOISE_POOL_SIZE)[inside]
    cap = wrap_period_ppm(echo_times, field_strength_t)
    with np.errstate(divide='ignore', invalid='ignore'):
        noise = np.sqrt(pooled / pooled_dof / spread) / (2 * np.pi * hz_per_ppm(field_strength_t))
    noise = np.where(spread > 0, np.minimum(noise, cap), cap)
    return _scatter(noise, inside)


def data_weight(noise_ppm, mask, floor_fraction=0.01):
    """Data weight 1 / noise for a field-to-susceptibility fit, mean 1 inside ``mask``, 0 outside.

    ``mask`` is the mask the noise map was fitted in, or part of it (the map is 0 outside). The
    weight multiplies the field residual inside the norm, so its square is the inverse noise
    variance. Noise below ``floor_fraction`` times its median in the mask is raised to
    that floor so that no voxel with a lucky small residual dominates; a noise-free map
    (all 0) gives weight 1 everywhere in the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    noise = np.asarray(noise_ppm, dtype=np.float32)
    weight = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return weight
    floor = floor_fraction * np.median(noise[mask])
    if floor > 0:
        weight[mask] = 1.0 / np.maximum(noise[mask], floor)
    else:
        weight[mask] = 1.0
    return (weight / weight[mask].mean()).astype(np.float32)


def wrap_period_ppm(echo_times, field_strength_t):
    """Field step (ppm) that a wrong 2 pi in the shortest echo spacing adds to the fitted field."""
    echo_times = np.asarray(echo_times, dtype=float)
    spacing = np.diff(echo_times).min() if echo_times.size > 1 else echo_times[0]
    return 1.0 / (spacing * hz_per_ppm(field_strength_t))


def reliable_field_mask(field_ppm, phase_offset, mask, voxel_size, echo_times, field_strength_t,
                        smoothing_mm=4.0, threads=1):
    """``mask`` without the voxels that took a wrong 2 pi in unwrapping, and their neighbours.

    A wrong 2 pi in the echo spacing shifts the fitted field by a wrap period and the fitted
    phase offset (the phase at TE = 0, smooth in space) by 2 pi TE1 / spacing. A voxel is
    dropped when its field is half a period off the median of its 5x5x5 neighbourhood, or when
    its phase offset is more than pi / 3 off the local average of the offset (a Gaussian of
    ``smoothing_mm`` over the mask), a test that still holds at the edge of the mask where few
    neighbours vote. A background removal that averages over spheres would otherwise smear
    their error over the brain. ``threads`` compute the median side by side.
    """
    mask = np.asarray(mask, dtype=bool)
    reliable = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return reliable
    sigma = [smoothing_mm / d for d in voxel_size]
    # Only the mask's voxels are tested, so the work is done on its box, widened by the reach of
    # the Gaussian (4 sigma, ndimage's default truncation): the same neighbourhoods, a third of
    # the volume of a 1 mm head.
    box = bounding_box(mask, margin=[int(4.0 * s + 0.5) + 1 for s in sigma])
    inside = mask[box]
    field_ppm = np.asarray(field_ppm, dtype=np.float32)[box]
    field_deviation = np.abs(field_ppm - masked_median(field_ppm, inside, size=5, threads=threads))
    outliers = field_deviation > wrap_period_ppm(echo_times, field_strength_t) / 2
    unit_offset = np.where(inside, np.exp(1j * np.asarray(phase_offset, dtype=np.float32)[box]), 0)
    local_offset = (ndimage.gaussian_filter(unit_offset.real, sigma)
                    + 1j * ndimage.gaussian_filter(unit_offset.imag, sigma))
    outliers |= np.abs(np.angle(unit_offset * np.conj(local_offset))) > np.pi / 3
    reliable[box] = inside & ~ndimage.binary_dilation(inside & outliers)
    return reliable
