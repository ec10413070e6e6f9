import numpy as np
import pytest
import scipy.sparse
from scipy.sparse import csgraph

from qsmprep.science import echofit, masking, metrics, unwrap
from qsmprep.science.physics import hz_per_ppm


def test_congruent_unwrap_recovers_a_steep_smooth_phase_exactly():
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing='ij')
    mask = x ** 2 + y ** 2 + z ** 2 < 0.9
    true_phase = 12 * x ** 2 + 8 * y * z + 5 * z
    unwrapped = unwrap.congruent_unwrap(unwrap.wrap(true_phase), (1, 1, 1), mask)
    difference = (unwrapped - true_phase)[mask]
    assert np.allclose(difference, difference[0], atol=1e-3)


def test_unwrapped_total_field_of_the_simulated_head_matches_the_truth(head):
    magnitude, phase = head.megre['magnitude'], head.megre['phase']
    mask = masking.brain_mask(masking.combined_magnitude(magnitude), head.voxel_size)
    unwrapped = unwrap.unwrap_echoes(phase, magnitude, head.echo_times, head.voxel_size, mask)
    total_field, offset = echofit.fit_total_field(unwrapped, magnitude, head.echo_times, head.field_strength, mask)
    # Next to the sinuses a few edge voxels alias (the field changes by more than pi per voxel
    # between echoes); the reliability check must find them all and keep the rest.
    reliable = echofit.reliable_field_mask(total_field, offset, mask, head.voxel_size, head.echo_times,
                                           head.field_strength)
    assert reliable.sum() / mask.sum() > 0.99
    assert metrics.nrmse(total_field, head.megre['total_field'], reliable) < 2
    # The opposite phase sign gives the negated field, far outside the threshold.
    assert metrics.nrmse(-total_field, head.megre['total_field'], reliable) > 150


def _true_phase(head):
    """The simulated head's unwrapped phase per echo (rad): phase offset + 2 pi f TE."""
    frequency_hz = hz_per_ppm(head.field_strength) * head.megre['total_field']
    return head.phantom['phase_offset'][..., None] + 2 * np.pi * frequency_hz[..., None] * head.echo_times


def _fraction_right(unwrapped, truth, mask):
    """Per echo, the fraction of ``mask`` voxels that carry the most common 2 pi multiple of the truth."""
    wraps = np.round((unwrapped - truth)[mask] / (2 * np.pi)).astype(int)
    return np.array([np.bincount(w - w.min()).max() / w.size for w in wraps.T])


@pytest.mark.parametrize('which', ['head', 'tilted_head'])
def test_romeo_recovers_the_unwrapped_phase_of_the_simulated_head(which, request):
    head = request.getfixturevalue(which)
    unwrapped = unwrap.unwrap_echoes(head.megre['phase'], head.megre['magnitude'], head.echo_times,
                                     head.voxel_size, head.brain, method='romeo')
    # Measured: every brain voxel right upright, all but one (where the field aliases) tilted.
    assert _fraction_right(unwrapped, _true_phase(head), head.brain).min() > 0.9995


def _field_step_phantom(shape=64, step_rad=4 * np.pi, taper_voxels=16):
    """Mask, magnitude, wrapped phase, true phase and echo times of a steep field step.

    Across z = 0 the first echo's phase rises by ``step_rad`` within about two voxels (a field
    step at a tissue boundary): consistent, but the steps there exceed pi per voxel, so the
    phase aliases. For x > 0 the step dies out over ``taper_voxels``, so a path around it
    joins both sides through steps well under pi.
    """
    grid = np.arange(shape, dtype=np.float32) - shape / 2
    x, y, z = np.meshgrid(grid, grid, grid, indexing='ij')
    mask = x ** 2 + y ** 2 + z ** 2 < (0.45 * shape) ** 2
    echo_times = np.array([0.004, 0.010, 0.016, 0.022])
    first_echo = 0.002 * (x ** 2 - 0.5 * y ** 2) + 0.1 * y + step_rad * 0.5 * (1 + np.tanh(z)) * np.clip(
        1 - x / taper_voxels, 0, 1)
    truth = 0.3 + 0.02 * x[..., None] + (first_echo / echo_times[0])[..., None] * echo_times
    noise = 0.05 * np.random.default_rng(1).standard_normal(truth.shape)
    return (mask, np.ones(truth.shape, dtype=np.float32), unwrap.wrap(truth + noise), truth.astype(np.float32),
            echo_times)


def test_romeo_goes_around_an_aliased_field_step_where_laplacian_fails():
    # One echo with a step of 4 pi (steps up to 1.5 pi per voxel), rated on its phase alone.
    mask, _, phase, truth, _ = _field_step_phantom(step_rad=4 * np.pi)
    assert np.abs(np.diff(truth[..., 0], axis=2)).max() > 1.4 * np.pi
    romeo = unwrap.congruent_unwrap(phase[..., 0], (1, 1, 1), mask, method='romeo')
    laplacian = unwrap.congruent_unwrap(phase[..., 0], (1, 1, 1), mask, method='laplacian')
    # Measured: romeo gets every voxel right; the least-squares estimate spreads the missing
    # wraps over the whole volume and snaps about 60 % of the voxels to a wrong multiple.
    assert _fraction_right(romeo[..., None], truth[..., :1], mask)[0] > 0.999
    assert _fraction_right(laplacian[..., None], truth[..., :1], mask)[0] < 0.6

    # A step of 8 pi: some voxel steps are near 2 pi, which look like no step at all in one
    # echo; the first echo and the echo difference rating each other's steps find them.
    mask, magnitude, phase, truth, echo_times = _field_step_phantom(step_rad=8 * np.pi)
    romeo = unwrap.unwrap_echoes(phase, magnitude, echo_times, (1, 1, 1), mask, method='romeo')
    laplacian = unwrap.unwrap_echoes(phase, magnitude, echo_times, (1, 1, 1), mask, method='laplacian')
    assert _fraction_right(romeo, truth, mask).min() > 0.999
    assert _fraction_right(laplacian, truth, mask).max() < 0.5


def test_romeo_is_congruent_with_the_wrapped_phase(tilted_head):
    phase, mask = tilted_head.megre['phase'], tilted_head.brain
    unwrapped = unwrap.unwrap_echoes(phase, tilted_head.megre['magnitude'], tilted_head.echo_times,
                                     tilted_head.voxel_size, mask, method='romeo')
    wraps = (unwrapped - phase) / (2 * np.pi)
    assert np.abs(wraps - np.round(wraps))[mask].max() < 1e-3
    assert np.all(unwrapped[~mask] == 0)


def test_romeo_unwraps_each_mask_component_on_its_own():
    grid = np.arange(40, dtype=np.float32) - 20
    x, y, z = np.meshgrid(grid, grid, grid, indexing='ij')
    left, right = (x + 9) ** 2 + y ** 2 + z ** 2 < 64, (x - 9) ** 2 + y ** 2 + z ** 2 < 64
    truth = 0.5 * x + 0.3 * y ** 2 / 8 + 20.0
    unwrapped = unwrap.romeo_unwrap(unwrap.wrap(truth), left | right)
    for part in (left, right):
        offset = (unwrapped - truth)[part]
        assert np.allclose(offset, offset[0], atol=1e-3)
        # Each component is shifted by whole wraps so that its mean lies within [-pi, pi].
        assert abs(unwrapped[part].mean()) <= np.pi + 1e-4
        assert abs(offset[0] / (2 * np.pi) - np.round(offset[0] / (2 * np.pi))) < 1e-4


def test_maximum_spanning_forest_matches_scipy():
    rng = np.random.default_rng(0)
    count = 3000
    ends = np.sort(rng.integers(0, count, (9000, 2)), axis=1)
    # Distinct edges without loops: scipy would add up repeated ones.
    sources, targets = np.unique(ends[ends[:, 0] != ends[:, 1]], axis=0).T
    # Qualities on the forest's own 2^20 levels, so that both rank the edges alike.
    quality = rng.integers(0, 2 ** 20, sources.size) / 2 ** 20
    in_forest = unwrap._maximum_spanning_forest(sources, targets, quality, count)
    graph = scipy.sparse.coo_matrix((2 - quality, (sources, targets)), shape=(count, count))
    reference = csgraph.minimum_spanning_tree(graph)
    components, _ = csgraph.connected_components(graph, directed=False)
    assert in_forest.sum() == reference.nnz == count - components
    assert np.isclose((2 - quality[in_forest]).sum(), reference.sum())
