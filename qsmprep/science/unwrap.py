"""Phase unwrapping: spatial (Laplacian) and its multi-echo extension.

``laplacian_unwrap`` is least-squares unwrapping on the mask: the unwrapped phase whose
discrete Laplacian best matches that of the wrapped phase (from wrapped neighbour differences).
Its result is smooth and, in regions without phase residues, equal to the phase up to a
constant; near residues it is not congruent with the wrapped phase. ``unwrap_echoes`` makes it congruent
(adding whole multiples of 2 pi to the measured phase) and carries it through the echoes.
"""
import numpy as np
import scipy.fft

from .echofit import weighted_line_fit
from .masking import bounding_box, masked_median
from .solvers import conjugate_gradient

UNWRAP_METHODS = ('laplacian',)


def wrap(phase):
    """Phase wrapped into [-pi, pi)."""
    return ((phase + np.pi) % (2 * np.pi) - np.pi).astype(np.float32)


def _forward_difference(volume, axis):
    """volume[i + 1] - volume[i] along ``axis``; the last plane is 0."""
    difference = np.zeros_like(volume)
    head = [slice(None)] * 3
    head[axis] = slice(0, -1)
    difference[tuple(head)] = np.diff(volume, axis=axis)
    return difference


def _difference_adjoint(difference, axis):
    """Adjoint of ``_forward_difference``."""
    result = -difference.copy()
    tail = [slice(None)] * 3
    tail[axis] = slice(1, None)
    head = [slice(None)] * 3
    head[axis] = slice(0, -1)
    result[tuple(tail)] += difference[tuple(head)]
    return result


def _neumann_poisson_solve(volume, voxel_size):
    """Solve (sum_a D_a^T D_a / d_a^2) u = volume on the box via the DCT; mean of u is 0."""
    spectrum = scipy.fft.dctn(volume, type=2, norm='ortho')
    eigen = np.zeros(volume.shape, dtype=np.float32)
    for axis, (n, d) in enumerate(zip(volume.shape, voxel_size)):
        view = [1] * 3
        view[axis] = n
        eigen = eigen + ((2 - 2 * np.cos(np.pi * np.arange(n) / n)) / d ** 2).astype(np.float32).reshape(view)
    eigen[0, 0, 0] = 1.0
    spectrum = spectrum / eigen
    spectrum[0, 0, 0] = 0.0
    return scipy.fft.idctn(spectrum, type=2, norm='ortho').astype(np.float32)


def laplacian_unwrap(wrapped_phase, voxel_size, mask, iterations=200, tolerance=1e-5):
    """Least-squares unwrapped phase (rad) inside ``mask``, 0 outside, mean 0 inside.

    Minimises sum over neighbouring voxel pairs inside the mask of
    (u_i - u_j - wrap(p_i - p_j))^2 / d^2: the Laplacian of u matches the Laplacian of the
    wrapped phase computed from wrapped neighbour differences, with Neumann conditions on
    the mask's own boundary (so nothing outside the mask leaks in). Solved by conjugate
    gradients preconditioned with the DCT Poisson solver of the whole box.
    """
    mask = np.asarray(mask, dtype=bool)
    result = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return result
    box = bounding_box(mask)
    inside = mask[box]
    phase = np.where(inside, np.asarray(wrapped_phase, dtype=np.float32)[box], 0.0)
    edge_weights = [inside & np.roll(inside, -1, axis=a) for a in range(3)]
    for axis, weight in enumerate(edge_weights):
        last = [slice(None)] * 3
        last[axis] = -1
        weight[tuple(last)] = False

    def normal_operator(u):
        return sum(_difference_adjoint(w * _forward_difference(u, a), a) / d ** 2
                   for a, (w, d) in enumerate(zip(edge_weights, voxel_size)))

    rhs = sum(_difference_adjoint(w * wrap(_forward_difference(phase, a)), a) / d ** 2
              for a, (w, d) in enumerate(zip(edge_weights, voxel_size)))
    u = conjugate_gradient(normal_operator, rhs, iterations, tolerance,
                           precondition=lambda residual: _neumann_poisson_solve(residual, voxel_size))
    u = np.where(inside, u - u[inside].mean(), 0.0)
    result[box] = u
    return result


def congruent_unwrap(wrapped_phase, voxel_size, mask, method='laplacian', median_passes=2):
    """Unwrapped phase that differs from the measured one by whole multiples of 2 pi only.

    Each voxel takes the 2 pi multiple that brings the measured phase closest to the smooth
    estimate of ``method``. Where that estimate is off by more than pi (next to phase residues,
    at steep fields near air) the voxel lands one or more wraps away from its neighbours;
    ``median_passes`` times, every voxel is snapped again to the median of its 3x3x3
    neighbourhood inside the mask, which repairs such isolated voxels.
    """
    if method not in UNWRAP_METHODS:
        raise ValueError(f'unknown unwrapping method {method!r}; choose from {UNWRAP_METHODS}')
    wrapped_phase = np.asarray(wrapped_phase, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(wrapped_phase)

    def snapped_to(estimate):
        wraps = np.round((estimate - wrapped_phase) / (2 * np.pi))
        return np.where(mask, wrapped_phase + 2 * np.pi * wraps, 0.0).astype(np.float32)

    estimate = laplacian_unwrap(wrapped_phase, voxel_size, mask)
    # The least-squares estimate has mean 0 inside the mask; shift it onto the measured phase.
    unwrapped = snapped_to(estimate + np.median(wrap(wrapped_phase - estimate)[mask]))
    for _ in range(median_passes):
        unwrapped = snapped_to(masked_median(unwrapped, mask))
    return unwrapped


def unwrap_echoes(phase, magnitude, echo_times, voxel_size, mask, method='laplacian'):
    """Unwrap multi-echo phase (echoes on the last axis) consistently across echoes.

    The spatially unwrapped first echo and the spatially unwrapped phase difference of the
    first two echoes predict every later echo; each echo then takes the 2 pi multiple closest
    to the prediction, and the frequency estimate is refined with each echo added. The
    frequency thus comes from echo differences, free of the phase offset at TE = 0.
    """
    phase = np.asarray(phase, dtype=np.float32)
    magnitude = np.asarray(magnitude, dtype=np.float32)
    echo_times = np.asarray(echo_times, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    first = congruent_unwrap(phase[..., 0], voxel_size, mask, method)
    unwrapped = [first]
    if phase.shape[-1] == 1:
        return first[..., None]
    difference = np.angle(np.exp(1j * (phase[..., 1] - phase[..., 0]))).astype(np.float32)
    angular_frequency = congruent_unwrap(difference, voxel_size, mask, method) / (echo_times[1] - echo_times[0])
    for echo in range(1, phase.shape[-1]):
        prediction = unwrapped[-1] + angular_frequency * (echo_times[echo] - echo_times[echo - 1])
        unwrapped.append(np.where(mask, prediction + wrap(phase[..., echo] - prediction), 0.0))
        angular_frequency, _ = weighted_line_fit(
            echo_times[:echo + 1], np.stack(unwrapped, axis=-1), magnitude[..., :echo + 1] ** 2)
    return np.stack(unwrapped, axis=-1).astype(np.float32)
