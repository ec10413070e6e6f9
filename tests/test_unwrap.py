import numpy as np

from qsmprep.science import echofit, masking, metrics, unwrap


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
