"""Chi-separation on a small phantom with known paramagnetic and diamagnetic sources.

The phantom (64^3, 2 mm) is an ellipsoidal brain with a cortex, white matter, ventricles, deep
grey matter nuclei, a vein and a calcification. The per-tissue chi+ and chi- are the base values
of the susceptibility-separation phantom of Ridani et al. 2026 as qsm-forward ships them (its
chi- is negative; here it is the magnitude); the calcification is purely diamagnetic. Both
components carry independent smooth texture, so that they vary separately within a tissue.
The field is the padded dipole convolution of chi+ - chi-, R2' comes from qsm-forward's
``generate_r2prime``, and both get Gaussian noise.
"""
import numpy as np
import pytest
import qsm_forward
from scipy import ndimage

from qsmprep.science import chisep, metrics
from qsmprep.science.physics import DipoleOperator

VOXEL_SIZE = (2.0, 2.0, 2.0)
FIELD_STRENGTH_T = 3.0
DR = chisep.DR_HZ_PER_PPM_3T
# qsm-forward's tissue labels for the Ridani et al. values.
CAUDATE, GLOBUS_PALLIDUS, PUTAMEN, WHITE_MATTER, GREY_MATTER, BLOOD = 1, 2, 3, 8, 9, 11
# 3 T tissue R2 (1/s), T2 from the literature rounded.
R2 = {'grey': 11.5, 'white': 13.5, 'csf': 0.5, 'nucleus': 17.0, 'vein': 20.0}


def _ellipsoid(grid, centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def _tissue(label):
    chi_pos, chi_neg = qsm_forward.CHISEP_TISSUE_PARAMS[label][:2]
    return chi_pos, -chi_neg


def _phantom(b0_dir=(0.0, 0.0, 1.0), seed=0, field_noise_ppm=1e-3, r2star_noise_hz=0.5):
    rng = np.random.default_rng(seed)
    n = 64
    axis = (np.arange(n) - (n - 1) / 2) * VOXEL_SIZE[0]
    grid = np.meshgrid(axis, axis, axis, indexing='ij')
    brain = _ellipsoid(grid, (0, 0, 0), (48, 56, 44))
    white = _ellipsoid(grid, (0, 0, 0), (42, 50, 38))
    chi_pos, chi_neg, r2 = (np.zeros(brain.shape, dtype=np.float32) for _ in range(3))

    def assign(region, pos_neg, r2_value):
        chi_pos[region], chi_neg[region] = pos_neg
        r2[region] = r2_value

    assign(brain & ~white, _tissue(GREY_MATTER), R2['grey'])
    assign(white, _tissue(WHITE_MATTER), R2['white'])
    for side in (-1, 1):
        assign(_ellipsoid(grid, (side * 8, 6, 6), (4, 12, 6)), (0.0, 0.0), R2['csf'])
        assign(_ellipsoid(grid, (side * 12, 16, 10), (4, 7, 5)), _tissue(CAUDATE), R2['nucleus'])
        assign(_ellipsoid(grid, (side * 24, 2, -2), (5, 12, 8)), _tissue(PUTAMEN), R2['nucleus'])
        assign(_ellipsoid(grid, (side * 17, -2, -4), (3, 6, 4)), _tissue(GLOBUS_PALLIDUS), R2['nucleus'])
    vein = (np.hypot(grid[0], grid[2] - 20) <= 3) & (grid[1] < -10) & white
    assign(vein, _tissue(BLOOD), R2['vein'])
    assign(_ellipsoid(grid, (22, 30, 16), (3, 3, 3)), (0.0, 0.15), R2['grey'])
    for component in (chi_pos, chi_neg):
        texture = ndimage.gaussian_filter(rng.standard_normal(brain.shape), 1.0)
        texture *= 0.004 / texture[brain].std()
        # Texture only where the component exists, so pure sources stay pure.
        component += np.where(component > 0, texture, 0).astype(np.float32)
        np.maximum(component, 0, out=component)
        component[~brain] = 0
    chi_total = chi_pos - chi_neg
    field = DipoleOperator(brain.shape, VOXEL_SIZE, b0_dir, pad_factor=1.5).forward(chi_total)
    field += np.float32(field_noise_ppm) * rng.standard_normal(brain.shape).astype(np.float32)
    # qsm-forward's R2' model, with its sign convention (chi- negative), checks ours.
    r2prime = qsm_forward.generate_r2prime(chi_pos, -chi_neg, dr=DR)
    r2star = r2 + r2prime + r2star_noise_hz * rng.standard_normal(brain.shape)
    return {
        'brain': brain, 'chi_pos': chi_pos, 'chi_neg': chi_neg, 'chi_total': chi_total, 'r2': r2,
        'field': np.where(brain, field, 0).astype(np.float32),
        'r2star': np.where(brain, r2star, 0).astype(np.float32), 'b0_dir': b0_dir,
    }


@pytest.fixture(scope='module')
def phantom():
    return _phantom()


def _separate(phantom, field_sign=1.0):
    r2prime, _ = chisep.r2prime(phantom['r2star'], phantom['r2'], phantom['brain'])
    return chisep.chi_separation(field_sign * phantom['field'], r2prime, phantom['brain'], VOXEL_SIZE,
                                 phantom['b0_dir'], FIELD_STRENGTH_T, dr_hz_per_ppm=DR)


def _errors(phantom, chi_pos, chi_neg):
    brain = phantom['brain']
    return (metrics.nrmse(chi_pos, phantom['chi_pos'], brain), metrics.nrmse(chi_neg, phantom['chi_neg'], brain),
            metrics.nrmse(chi_pos - chi_neg, phantom['chi_total'], brain))


@pytest.fixture(scope='module')
def separated(phantom):
    return _separate(phantom)


def test_both_sources_are_recovered(phantom, separated):
    chi_pos, chi_neg = separated
    pos_error, neg_error, total_error = _errors(phantom, chi_pos, chi_neg)
    assert pos_error <= 50 and neg_error <= 50
    assert total_error <= 35
    assert metrics.correlation(chi_pos - chi_neg, phantom['chi_total'], phantom['brain']) >= 0.95


def test_outputs_are_nonnegative_and_zero_outside_the_mask(phantom, separated):
    for chi in separated:
        assert chi.dtype == np.float32 and chi.shape == phantom['brain'].shape
        assert chi.min() >= 0
        assert np.all(chi[~phantom['brain']] == 0)


def test_the_sum_follows_r2prime(phantom, separated):
    # R2' pins chi+ + chi- voxel by voxel: the sum is close to the truth (not only up to a constant).
    brain = phantom['brain']
    chi_sum = (separated[0] + separated[1])[brain]
    true_sum = (phantom['chi_pos'] + phantom['chi_neg'])[brain]
    assert np.linalg.norm(chi_sum - true_sum) / np.linalg.norm(true_sum) < 0.2


def test_a_flipped_field_sign_fails(phantom):
    pos_error, neg_error, _ = _errors(phantom, *_separate(phantom, field_sign=-1.0))
    assert pos_error > 50 and neg_error > 50


def test_oblique_b0_direction(phantom):
    tilt = np.deg2rad(20)
    oblique = _phantom(b0_dir=(0.0, np.sin(tilt), np.cos(tilt)))
    pos_error, neg_error, total_error = _errors(oblique, *_separate(oblique))
    assert pos_error <= 50 and neg_error <= 50 and total_error <= 35


def test_nonnegative_prox_minimises_its_objective():
    # Brute force on a grid of the per-voxel problem the y step solves in closed form.
    rng = np.random.default_rng(1)
    p_grid, n_grid = np.meshgrid(np.linspace(0, 4, 401), np.linspace(0, 4, 401))

    def cost(p, n, p0, n0, target, weight, penalty):
        return weight / 2 * (p + n - target) ** 2 + penalty / 2 * ((p - p0) ** 2 + (n - n0) ** 2)

    for _ in range(100):
        p0, n0, target = rng.normal(size=3)
        weight, penalty = rng.uniform(0, 3) * (rng.random() > 0.2), rng.uniform(0.05, 3)
        p, n = chisep._NonnegativeProx(np.array(target), np.array(weight), penalty)(np.array(p0), np.array(n0))
        problem = (p0, n0, target, weight, penalty)
        assert p >= 0 and n >= 0
        assert cost(p, n, *problem) <= cost(p_grid, n_grid, *problem).min() + 1e-9


def test_r2prime_with_an_r2_map_is_the_clipped_difference():
    r2star = np.array([30.0, 10.0, 4.0], dtype=np.float32)
    r2 = np.array([12.0, 12.0, 0.5], dtype=np.float32)
    r2prime, sidecar = chisep.r2prime(r2star, r2)
    np.testing.assert_allclose(r2prime, [18.0, 0.0, 3.5])
    assert r2prime.dtype == np.float32
    assert 'AssumedR2' not in sidecar and 'R2PrimeAssumption' not in sidecar


def test_r2prime_without_an_r2_map_states_its_assumption():
    r2star = np.array([[30.0, 4.0]], dtype=np.float32)
    mask = np.array([[True, False]])
    r2prime, sidecar = chisep.r2prime(r2star, mask=mask)
    np.testing.assert_allclose(r2prime, [[30.0 - chisep.ASSUMED_TISSUE_R2_HZ_3T, 0.0]])
    assert sidecar['AssumedR2'] == chisep.ASSUMED_TISSUE_R2_HZ_3T
    assert f'{chisep.ASSUMED_TISSUE_R2_HZ_3T:g} 1/s' in sidecar['R2PrimeAssumption']
    parameters = chisep.sidecar_parameters(FIELD_STRENGTH_T)
    assert parameters['RelaxometricConstant'] == DR and parameters['RelaxometricConstantUnits'] == 'Hz/ppm'
