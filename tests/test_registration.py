"""Rigid registration of a head orientation onto the reference: a known turn of the 2 mm simulated
head is recovered, and B0 follows it into the reference's voxel axes."""
import numpy as np
import pytest

from qsmprep.science import registration
from qsmprep.science.registration import RigidTransform


def rotation(axis, degrees):
    angle = np.deg2rad(degrees)
    matrix = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    matrix[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    return matrix


def about(centre, turn, shift):
    """x -> turn (x - centre) + centre + shift."""
    return RigidTransform(rotation=turn, translation=centre + shift - turn @ centre)


def inverse(transform):
    return RigidTransform(rotation=transform.rotation.T, translation=-transform.rotation.T @ transform.translation)


@pytest.fixture(scope='module')
def turned_head(head):
    """The first echo's magnitude of the head, and of the same head turned by 12 degrees about x and
    -6 about y and shifted by (3, -2, 4) mm in the scanner: moving(y) = reference(turn(y))."""
    reference = head.megre['magnitude'][..., 0]
    brain_voxels = np.argwhere(head.brain)
    centre = (head.affine @ np.append(brain_voxels.mean(axis=0), 1))[:3]
    turn = about(centre, rotation(0, 12) @ rotation(1, -6), np.array([3.0, -2.0, 4.0]))
    moving = registration.resample(reference, head.affine, head.affine, reference.shape, turn)
    return reference, moving, turn


def test_a_known_turn_is_recovered_within_a_third_of_a_millimetre_and_degree(head, turned_head):
    reference, moving, turn = turned_head
    found = registration.register_rigid(moving, head.affine, reference, head.affine, reference_mask=head.brain)
    expected = inverse(turn)
    residual = RigidTransform(rotation=found.rotation @ turn.rotation, translation=np.zeros(3))
    assert residual.angle_deg < 0.3
    points = (head.affine @ np.c_[np.argwhere(head.brain), np.ones(int(head.brain.sum()))].T)[:3]
    error_mm = np.linalg.norm(found.rotation @ points + found.translation[:, None]
                              - (expected.rotation @ points + expected.translation[:, None]), axis=0)
    assert error_mm.max() < 0.3, error_mm.max()
    aligned = registration.resample(moving, head.affine, head.affine, reference.shape, found)
    before, after = (np.corrcoef(image[head.brain], reference[head.brain])[0, 1] for image in (moving, aligned))
    assert after > 0.9 and before < after - 0.2, (before, after)  # interpolated twice, and noisy


def test_a_large_turn_is_recovered_from_the_reference_mask_alone(head):
    """25 degrees, as in a multi-orientation scan, with only the reference's mask (qsmprep-tools
    register): the moving brain's mask is found from its magnitude."""
    reference = head.megre['magnitude'][..., 0]
    centre = (head.affine @ np.append(np.argwhere(head.brain).mean(axis=0), 1))[:3]
    turn = about(centre, rotation(0, 25), np.zeros(3))
    moving = registration.resample(reference, head.affine, head.affine, reference.shape, turn)
    found = registration.register_rigid(moving, head.affine, reference, head.affine, reference_mask=head.brain)
    residual = RigidTransform(rotation=found.rotation @ turn.rotation, translation=np.zeros(3))
    assert residual.angle_deg < 0.3


def test_b0_of_the_turned_session_in_the_reference_axes(head, turned_head):
    _, _, turn = turned_head
    direction = registration.b0_direction_in_reference(inverse(turn), head.affine)
    # The head turned by ``turn``'s inverse in the scanner: B0 turned by ``turn`` in the head.
    assert np.allclose(direction, turn.rotation @ [0, 0, 1], atol=1e-6)
    assert np.isclose(np.degrees(np.arccos(direction[2])), 13.4, atol=0.1)
