"""Phase unwrapping: spatial (Laplacian or ROMEO-like region growing) and its multi-echo extension.

``laplacian_unwrap`` is least-squares unwrapping on the mask: the unwrapped phase whose
discrete Laplacian best matches that of the wrapped phase (from wrapped neighbour differences).
Its result is smooth and, in regions without phase residues, equal to the phase up to a
constant; near residues it is not congruent with the wrapped phase. ``congruent_unwrap`` makes it
congruent (adding whole multiples of 2 pi to the measured phase).

``romeo_unwrap`` follows the phase from voxel to voxel along the most reliable neighbour pairs
(rated by phase, magnitude and another echo, as ROMEO does), so it is congruent by construction
and keeps a region of aliased or noisy phase from spoiling the phase around it, where a
least-squares estimate spreads the error out. ``unwrap_echoes`` carries either through the echoes.
"""
import numpy as np
import scipy.fft
import scipy.sparse
from scipy import ndimage
from scipy.sparse import csgraph

from .echofit import echoes_first, weighted_line_fit
from .masking import bounding_box, masked_median
from .solvers import conjugate_gradient

UNWRAP_METHODS = ('romeo', 'laplacian')
# ROMEO-like growing is congruent by construction, faster, and on the simulated heads got 0-1
# voxels wrong where Laplacian got 47-204 wrong (tests/test_unwrap.py).
DEFAULT_UNWRAP = 'romeo'


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

    With 'laplacian', each voxel takes the 2 pi multiple that brings the measured phase closest
    to the smooth least-squares estimate. Where that estimate is off by more than pi (next to
    phase residues, at steep fields near air) the voxel lands one or more wraps away from its
    neighbours; ``median_passes`` times, every voxel is snapped again to the median of its
    3x3x3 neighbourhood inside the mask, which repairs such isolated voxels. 'romeo' is
    ``romeo_unwrap`` rated on the phase alone, congruent by construction (``voxel_size`` and
    ``median_passes`` play no part).
    """
    if method not in UNWRAP_METHODS:
        raise ValueError(f'unknown unwrapping method {method!r}; choose from {UNWRAP_METHODS}')
    wrapped_phase = np.asarray(wrapped_phase, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(wrapped_phase)
    if method == 'romeo':
        return romeo_unwrap(wrapped_phase, mask)

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
    frequency thus comes from echo differences, free of the phase offset at TE = 0. With
    'romeo' the first echo and the difference are unwrapped by ``romeo_unwrap``, rated with the
    magnitude and with each other.
    """
    phase = np.asarray(phase, dtype=np.float32)
    magnitude = np.asarray(magnitude, dtype=np.float32)
    echo_times = np.asarray(echo_times, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if method not in UNWRAP_METHODS:
        raise ValueError(f'unknown unwrapping method {method!r}; choose from {UNWRAP_METHODS}')

    def spatial_unwrap(wrapped, echo_magnitude, reference=None, time_ratio=1.0):
        if method == 'romeo':
            return romeo_unwrap(wrapped, mask, echo_magnitude, reference, time_ratio)
        return congruent_unwrap(wrapped, voxel_size, mask, method)

    if phase.shape[-1] == 1:
        return spatial_unwrap(phase[..., 0], magnitude[..., 0])[..., None]
    difference = wrap(phase[..., 1] - phase[..., 0])
    first_time, spacing = echo_times[0], echo_times[1] - echo_times[0]
    # For ROMEO's phase-gradient coherence the first echo and the echo difference rate each
    # other's steps: they alias in different places, and the difference has no phase offset.
    first = spatial_unwrap(phase[..., 0], magnitude[..., 0], difference, first_time / spacing)
    unwrapped_difference = spatial_unwrap(difference, magnitude[..., 1], phase[..., 0], spacing / first_time)

    # The temporal part works voxel by voxel, on the voxels inside the mask only, with the echoes
    # first (echofit.echoes_first), summed over echoes by weighted_line_fit on (voxels, echoes)
    # views, as contiguous rows.
    n_echoes = phase.shape[-1]
    inside_phase = echoes_first(phase, mask)
    weights = echoes_first(magnitude, mask) ** 2
    unwrapped = [first[mask]]
    angular_frequency = unwrapped_difference[mask] / spacing
    for echo in range(1, n_echoes):
        prediction = unwrapped[-1] + angular_frequency * (echo_times[echo] - echo_times[echo - 1])
        unwrapped.append(prediction + wrap(inside_phase[echo] - prediction))
        angular_frequency, _ = weighted_line_fit(
            echo_times[:echo + 1], np.stack(unwrapped).T, weights[:echo + 1].T)
    result = np.zeros(phase.shape, dtype=np.float32)
    for echo, values in enumerate(unwrapped):
        result[..., echo][mask] = values
    return result


def _rated_edges(phase, index, axis, magnitude=None, reference_phase=None, time_ratio=1.0,
                 magnitude_level=1.0):
    """The edges from voxel i to i + 1 along ``axis`` with both ends inside the mask (``index``
    holds the voxel numbers there, -1 outside): their two voxel numbers and ROMEO-like quality
    in [0, 1].
    """
    low, high = [slice(None)] * 3, [slice(None)] * 3
    low[axis], high[axis] = slice(0, -1), slice(1, None)
    low, high = tuple(low), tuple(high)
    edges = (index[low] >= 0) & (index[high] >= 0)
    step = wrap(phase[high][edges] - phase[low][edges])
    # Phase coherence: a step near pi may as well be a step of -pi, a wrap.
    quality = 1 - np.abs(step) / np.pi
    if reference_phase is not None:
        # Phase-gradient coherence: the step of the phase of another echo time, scaled to this
        # one's, agrees unless one of them aliases; 0 once they differ by a radian, as in ROMEO.
        reference_step = wrap(reference_phase[high][edges] - reference_phase[low][edges])
        quality *= np.clip(1 - np.abs(step - time_ratio * reference_step), 0, 1)
    if magnitude is not None:
        a, b = magnitude[low][edges], magnitude[high][edges]
        smaller, larger = np.minimum(a, b), np.maximum(a, b)
        # Magnitude coherence (a jump in magnitude marks a tissue boundary) and magnitude
        # weight (dark voxels have noisy phase; half the typical level already counts as bright).
        quality *= (smaller / np.maximum(larger, 1e-30)) ** 2
        quality *= np.minimum(smaller / (0.5 * magnitude_level), 1)
    return index[low][edges], index[high][edges], quality


def _maximum_spanning_forest(sources, targets, quality, count):
    """Boolean mask of the edges (``sources[e]`` to ``targets[e]``, voxel numbers below
    ``count``) that form the spanning forest of maximum total ``quality``.

    Boruvka's algorithm, vectorised: in every round each current component picks its best edge
    to another component, all picked edges join the forest and their components merge, which at
    least halves the number of components per round. Ties are broken by edge number, so that the
    order is strict and the picked edges cannot close a cycle. (scipy's minimum_spanning_tree,
    Kruskal's algorithm, gives the same forest but spends several times as long in a stable
    sort of all edges.)
    """
    edge_count = sources.size
    # One int64 key per edge, smaller for better edges: quality on 2^20 levels, then edge number.
    levels = np.round((1 - quality.astype(np.float64)) * 2 ** 20).astype(np.int64)
    keys = levels * edge_count + np.arange(edge_count)
    in_forest = np.zeros(edge_count, dtype=bool)
    # The two ends of each edge as component numbers; at first every voxel is its own component.
    first, second = sources.astype(np.int32), targets.astype(np.int32)
    components = count
    while first.size:
        best = np.full(components, np.iinfo(np.int64).max)
        np.minimum.at(best, first, keys)
        np.minimum.at(best, second, keys)
        picked = (keys == best[first]) | (keys == best[second])
        in_forest[keys[picked] % edge_count] = True
        merged = scipy.sparse.coo_matrix((np.ones(int(picked.sum()), dtype=np.float32),
                                          (first[picked], second[picked])), shape=(components, components))
        components, relabel = csgraph.connected_components(merged, directed=False)
        first, second = relabel[first], relabel[second]
        # Edges within a merged component can never join the forest.
        between = first != second
        first, second, keys = first[between], second[between], keys[between]
    return in_forest


def romeo_unwrap(wrapped_phase, mask, magnitude=None, reference_phase=None, time_ratio=1.0):
    """Quality-guided region-growing unwrapping in the spirit of ROMEO (Dymerska et al. 2021).

    Every pair of 6-neighbours inside ``mask`` gets a quality from the wrapped phase step
    between them, and when given from ``magnitude`` and from the agreement with the step of
    ``reference_phase`` (the phase of another echo time; ``time_ratio`` = this phase's echo
    time over the reference's). Growing a region from a seed, always across the best edge
    that reaches a new voxel, is Prim's algorithm: its edges form the maximum spanning tree of
    the quality graph, found here without a loop over voxels. Each voxel takes its tree parent's unwrapped
    phase plus the wrapped step between them, so the result differs from ``wrapped_phase`` by
    whole multiples of 2 pi. The seed only sets the constant: every other phase difference
    follows the tree. Each connected component of the mask (6-connected) is unwrapped on its
    own and shifted by a multiple of 2 pi that brings its mean into [-pi, pi]. Returns 0 outside
    the mask.
    """
    wrapped_phase = np.asarray(wrapped_phase, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    result = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return result
    box = bounding_box(mask)
    inside = mask[box]
    phase = wrapped_phase[box]
    rating = {}
    if magnitude is not None:
        magnitude = np.asarray(magnitude, dtype=np.float32)
        rating.update(magnitude=magnitude[box], magnitude_level=float(np.median(magnitude[mask])))
    if reference_phase is not None:
        rating.update(reference_phase=np.asarray(reference_phase, dtype=np.float32)[box], time_ratio=time_ratio)

    count = int(inside.sum())
    index = np.full(inside.shape, -1, dtype=np.int64)
    index[inside] = np.arange(count)
    sources, targets, quality = map(np.concatenate, zip(*(
        _rated_edges(phase, index, axis, **rating) for axis in range(3))))
    in_tree = _maximum_spanning_forest(sources, targets, quality, count)
    sources, targets = sources[in_tree], targets[in_tree]

    # An extra root node (number ``count``), joined to one seed voxel per connected component,
    # makes the spanning forest one tree, so that one breadth-first search gives every voxel
    # its parent. Any voxel of a component can be its seed.
    labels, components = ndimage.label(inside)
    voxel_labels = labels[inside] - 1
    seeds = np.empty(components, dtype=np.int64)
    seeds[voxel_labels] = np.arange(count)
    root = count
    tree = scipy.sparse.csr_matrix(
        (np.ones(sources.size + components, dtype=np.float32),
         (np.concatenate([sources, np.full(components, root)]), np.concatenate([targets, seeds]))),
        shape=(count + 1, count + 1))
    _, parent = csgraph.breadth_first_order(tree, root, directed=False, return_predecessors=True)
    parent[root] = root

    # The whole wraps from each voxel's phase to its parent's (none for the seeds), summed
    # from the root down by pointer jumping: each pass adds the parent's partial sum and skips
    # to the parent's parent, so after log2(tree depth) passes every sum covers the whole path.
    values = np.append(phase[inside].astype(np.float64), 0.0)
    wraps = np.round((values[parent] - values) / (2 * np.pi)).astype(np.int64)
    wraps[seeds] = 0
    while (parent != root).any():
        wraps += wraps[parent]
        parent = parent[parent]
    unwrapped = values[:count] + 2 * np.pi * wraps[:count]

    mean = np.bincount(voxel_labels, unwrapped) / np.bincount(voxel_labels)
    unwrapped -= 2 * np.pi * np.round(mean / (2 * np.pi))[voxel_labels]
    result[box][inside] = unwrapped
    return result
