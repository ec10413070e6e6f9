import numpy as np

from qsmprep.science import echofit, masking, metrics
from qsmprep.science.physics import hz_per_ppm


def test_r2star_and_field_of_a_noise_free_voxel_are_exact():
    echo_times = np.array([0.004, 0.010, 0.016, 0.022])
    r2star, field_ppm, offset = 33.0, 0.12, 0.4
    magnitude = 100 * np.exp(-r2star * echo_times)[None, None, None, :]
    phase = offset + 2 * np.pi * hz_per_ppm(3.0) * field_ppm * echo_times[None, None, None, :]
    fitted_r2star, t2star, s0 = echofit.fit_r2star(magnitude, echo_times)
    assert np.isclose(fitted_r2star.item(), r2star, rtol=1e-4)
    assert np.isclose(t2star.item(), 1 / r2star, rtol=1e-4)
    assert np.isclose(s0.item(), 100, rtol=1e-4)
    fitted_field, fitted_offset = echofit.fit_total_field(phase, magnitude, echo_times, 3.0)
    assert np.isclose(fitted_field.item(), field_ppm, rtol=1e-4)
    assert np.isclose(fitted_offset.item(), offset, atol=1e-4)


def test_r2star_of_the_simulated_head_matches_the_truth(head):
    magnitude = head.megre['magnitude']
    mask = masking.brain_mask(masking.combined_magnitude(magnitude), head.voxel_size)
    r2star, _, _ = echofit.fit_r2star(magnitude, head.echo_times, mask)
    evaluation = mask & head.brain
    assert metrics.nrmse(r2star, head.phantom['r2star'], evaluation) < 25
    # Echo times in milliseconds instead of seconds fail the same threshold.
    wrong_units, _, _ = echofit.fit_r2star(magnitude, head.echo_times * 1000, mask)
    assert metrics.nrmse(wrong_units, head.phantom['r2star'], evaluation) > 25
