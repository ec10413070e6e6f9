import numpy as np
import pytest
from scipy import ndimage

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


def _unwrapped_by_truth(head, phase):
    """``phase`` with the 2 pi multiples that bring it closest to the noise-free phase (ideal unwrapping)."""
    frequency_hz = hz_per_ppm(head.field_strength) * head.megre['total_field'][..., None]
    echo_times = head.echo_times.astype(np.float32)
    true_phase = head.phantom['phase_offset'][..., None] + 2 * np.pi * frequency_hz * echo_times
    return (phase + 2 * np.pi * np.round((true_phase - phase) / (2 * np.pi))).astype(np.float32)


@pytest.fixture(scope='module')
def low_snr_head(head):
    """Magnitude and ideally unwrapped phase of the head with complex noise added down to a peak SNR of 25."""
    magnitude, phase = head.megre['magnitude'], head.megre['phase']
    sigma = magnitude.reshape(-1, magnitude.shape[-1]).max(axis=0) / 25.0
    rng = np.random.default_rng(0)
    real = magnitude * np.cos(phase) + sigma * rng.standard_normal(magnitude.shape, dtype=np.float32)
    imaginary = magnitude * np.sin(phase) + sigma * rng.standard_normal(magnitude.shape, dtype=np.float32)
    return np.hypot(real, imaginary), _unwrapped_by_truth(head, np.arctan2(imaginary, real))


def _error_about_mean(field, truth, mask):
    error = (field - truth)[mask]
    return error - error.mean()


def test_noise_free_complex_fit_is_exact_and_two_echoes_fall_back_to_the_line():
    echo_times = np.array([0.004, 0.010, 0.016, 0.022])
    field_ppm, offset = -0.37, 2.9
    magnitude = 100 * np.exp(-20 * echo_times)[None, None, None, :]
    phase = offset + 2 * np.pi * hz_per_ppm(7.0) * field_ppm * echo_times[None, None, None, :]
    assert echofit.echo_fit_method(4) == 'complex'
    fitted_field, fitted_offset, noise = echofit.fit_total_field(phase, magnitude, echo_times, 7.0,
                                                                 return_noise=True)
    assert np.isclose(fitted_field.item(), field_ppm, rtol=1e-4)
    assert np.isclose(fitted_offset.item(), offset, atol=1e-4)
    assert fitted_field.dtype == fitted_offset.dtype == noise.dtype == np.float32
    assert 0 <= noise.item() < 1e-4
    assert echofit.echo_fit_method(2) == 'linear'
    two_echoes = [a[..., :2] for a in (phase, magnitude)]
    assert np.array_equal(echofit.fit_total_field(*two_echoes, echo_times[:2], 7.0),
                          echofit.fit_total_field(*two_echoes, echo_times[:2], 7.0, method='linear'))
    with pytest.raises(ValueError):
        echofit.fit_total_field(*two_echoes, echo_times[:2], 7.0, return_noise=True)
    with pytest.raises(ValueError):
        echofit.fit_total_field(phase, magnitude, echo_times, 7.0, method='quadratic')


def test_complex_field_fit_of_the_simulated_head_matches_the_truth(head):
    magnitude, truth, brain = head.megre['magnitude'], head.megre['total_field'], head.brain
    phase = _unwrapped_by_truth(head, head.megre['phase'])
    field, _ = echofit.fit_total_field(phase, magnitude, head.echo_times, head.field_strength, brain)
    line, _ = echofit.fit_total_field(phase, magnitude, head.echo_times, head.field_strength, brain,
                                      method='linear')
    assert np.all(field[~brain] == 0)
    assert metrics.nrmse(field, truth, brain) < 1.0
    assert metrics.nrmse(field, truth, brain) <= 1.01 * metrics.nrmse(line, truth, brain)
    # The opposite phase sign, or echo times in milliseconds, fail the same threshold.
    flipped, _ = echofit.fit_total_field(-phase, magnitude, head.echo_times, head.field_strength, brain)
    assert metrics.nrmse(flipped, truth, brain) > 1.0
    wrong_units, _ = echofit.fit_total_field(phase, magnitude, head.echo_times * 1000, head.field_strength, brain)
    assert metrics.nrmse(wrong_units, truth, brain) > 1.0


def test_complex_fit_at_low_snr_is_no_worse_than_the_line_and_ignores_single_echo_wraps(head, low_snr_head):
    magnitude, phase = low_snr_head
    truth, brain, n_echoes = head.megre['total_field'], head.brain, len(head.echo_times)

    def nrmse(phase, method):
        field, _ = echofit.fit_total_field(phase, magnitude, head.echo_times, head.field_strength, brain,
                                           method=method)
        return metrics.nrmse(field, truth, brain)

    clean = {method: nrmse(phase, method) for method in echofit.ECHO_FIT_METHODS}
    assert clean['complex'] <= 1.01 * clean['linear']
    # A wrong 2 pi in one echo of 5% of the voxels, as an unwrapper may leave at low SNR: the line
    # follows it, the complex fit does not.
    rng = np.random.default_rng(1)
    wrong = (brain & (rng.random(brain.shape) < 0.05))[..., None] & (
        np.arange(n_echoes) == rng.integers(0, n_echoes, brain.shape)[..., None])
    phase = phase + np.where(wrong, 2 * np.pi * rng.choice([-1, 1], wrong.shape), 0).astype(np.float32)
    assert nrmse(phase, 'complex') < 1.01 * clean['complex']
    assert nrmse(phase, 'linear') > 3 * clean['linear']


def test_field_noise_map_predicts_the_error_and_makes_a_data_weight(head, low_snr_head):
    magnitude, phase = low_snr_head
    brain = head.brain
    # Without signal in a block of voxels the noise is large but finite.
    silent = np.zeros(brain.shape, dtype=bool)
    silent[tuple(slice(c - 2, c + 2) for c in np.array(brain.shape) // 2)] = True
    assert brain[silent].all()
    magnitude = np.where(silent[..., None], 0, magnitude)
    field, offset, noise = echofit.fit_total_field(phase, magnitude, head.echo_times, head.field_strength, brain,
                                                   return_noise=True)
    assert noise.dtype == np.float32 and np.all(np.isfinite(noise)) and np.all(noise[~brain] == 0)
    assert np.allclose(echofit.field_noise_ppm(phase, magnitude, head.echo_times, head.field_strength, field,
                                               offset, brain), noise, rtol=1e-3)
    assert np.allclose(noise[silent], echofit.wrap_period_ppm(head.echo_times, head.field_strength))
    calibrated = brain & ~ndimage.binary_dilation(silent, iterations=2)
    error = _error_about_mean(field, head.megre['total_field'], calibrated)
    predicted = noise[calibrated]
    assert 0.8 < np.sqrt(np.mean(error ** 2)) / np.sqrt(np.mean(predicted ** 2)) < 1.25
    assert np.corrcoef(predicted, np.abs(error))[0, 1] > 0.02
    weight = echofit.data_weight(noise, brain)
    assert np.isclose(weight[brain].mean(), 1, rtol=1e-4) and np.all(weight[~brain] == 0)
    assert weight[silent].max() < 0.01 * np.median(weight[brain])
    assert np.all(echofit.data_weight(np.zeros(brain.shape), brain)[brain] == 1)
