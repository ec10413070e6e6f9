"""COSMOS and susceptibility tensor imaging from the local fields of several head orientations of
the 2 mm simulated head, against its truth."""
import numpy as np
import pytest

from benchmarks.simulate_bids import voxel_averaged_field
from qsmprep.learned.phantoms import random_fibre_directions
from qsmprep.science import inversion, metrics, orientations
from qsmprep.science.physics import TENSOR_COMPONENTS, DipoleOperator, traceless_tensor


def tilted(axis, degrees):
    """B0 after the head turned by ``degrees`` about voxel axis 0 or 1 (in the head's axes)."""
    angle = np.deg2rad(degrees)
    direction = np.array([0.0, 0.0, np.cos(angle)])
    direction[axis] = np.sin(angle)
    return direction


UPRIGHT = np.array([0.0, 0.0, 1.0])
COSMOS_DIRECTIONS = [UPRIGHT, tilted(1, 25), tilted(0, 25)]


@pytest.fixture(scope='module')
def orientation_fields(head):
    """Local fields of three orientations as a scanner measures them, with noise of 0.0005 ppm (a
    fourteenth of the field's RMS)."""
    rng = np.random.default_rng(0)
    return np.stack([(voxel_averaged_field(head.chi, head.voxel_size, direction)
                      + rng.normal(0, 5e-4, head.chi.shape)) * head.brain for direction in COSMOS_DIRECTIONS])


def test_cosmos_from_three_orientations_beats_single_orientation_tv(head, orientation_fields):
    tv = inversion.invert(orientation_fields[0], head.brain, head.voxel_size, UPRIGHT, method='tv')[0]
    chi = orientations.cosmos(orientation_fields, head.brain, head.voxel_size, COSMOS_DIRECTIONS)
    tv_error, cosmos_error = (metrics.nrmse(x, head.chi, head.brain) for x in (tv, chi))
    assert cosmos_error < 15 and cosmos_error < 0.6 * tv_error, (cosmos_error, tv_error)
    assert np.all(chi[~head.brain] == 0) and abs(chi[head.brain].mean()) < 1e-6


def test_cosmos_from_two_orientations_still_beats_tv(head, orientation_fields):
    tv = inversion.invert(orientation_fields[0], head.brain, head.voxel_size, UPRIGHT, method='tv')[0]
    chi = orientations.cosmos(orientation_fields[:2], head.brain, head.voxel_size, COSMOS_DIRECTIONS[:2])
    assert metrics.nrmse(chi, head.chi, head.brain) < 0.8 * metrics.nrmse(tv, head.chi, head.brain)


def test_cosmos_wants_one_direction_per_field(head, orientation_fields):
    with pytest.raises(ValueError, match='one 3-D field per direction'):
        orientations.cosmos(orientation_fields, head.brain, head.voxel_size, COSMOS_DIRECTIONS[:2])


def test_tensor_maps_of_a_known_tensor():
    fibre = np.array([1.0, 2.0, 2.0]) / 3
    tensor = traceless_tensor(np.full((2, 2, 2), 0.03), np.broadcast_to(fibre[:, None, None, None], (3, 2, 2, 2)))
    tensor[[0, 3, 5]] += 0.01  # isotropic part on the diagonal
    mms, msa, pev = orientations.tensor_maps(tensor, np.ones((2, 2, 2), bool))
    assert np.allclose(mms, 0.01, atol=1e-7) and np.allclose(msa, 0.03, atol=1e-7)
    assert np.allclose(np.abs((pev * fibre[:, None, None, None]).sum(axis=0)), 1, atol=1e-5)


def test_sti_recovers_a_known_tensor_from_seven_orientations(head):
    """Isotropic susceptibility everywhere, white matter anisotropic by 0.02 ppm along smooth fibres."""
    white_matter = head.phantom['wm_fraction'] * head.brain
    fibres = random_fibre_directions(np.random.default_rng(1), head.chi.shape, head.voxel_size)
    tensor = traceless_tensor(0.02 * white_matter, fibres)
    for component, (i, j) in enumerate(TENSOR_COMPONENTS):
        if i == j:
            tensor[component] += head.chi
    diagonal = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    directions = [UPRIGHT, tilted(0, 30), tilted(0, -30), tilted(1, 30), tilted(1, -30),
                  np.cos(np.deg2rad(35)) * UPRIGHT + np.sin(np.deg2rad(35)) * diagonal,
                  np.cos(np.deg2rad(35)) * UPRIGHT - np.sin(np.deg2rad(35)) * diagonal]
    fields = DipoleOperator(head.chi.shape, head.voxel_size, directions, pad_factor=1.5,
                            tensor=True).forward(tensor) * head.brain
    estimate = orientations.sti_least_squares(fields, head.brain, head.voxel_size, directions, iterations=30)
    (mms, msa, pev), (true_mms, true_msa, _) = (orientations.tensor_maps(t, head.brain) for t in (estimate, tensor))
    assert metrics.nrmse(mms, true_mms, head.brain) < 25
    strong = head.brain & (white_matter > 0.8)
    angle = np.degrees(np.arccos(np.clip(np.abs((pev * fibres).sum(axis=0)), 0, 1)))[strong]
    assert np.median(angle) < 20
    assert np.corrcoef(msa[head.brain], true_msa[head.brain])[0, 1] > 0.5
