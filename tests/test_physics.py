import numpy as np
import qsm_forward
from scipy import ndimage

from benchmarks.simulate_bids import tilted_affine
from qsmprep.science import masking, metrics
from qsmprep.science.physics import (DipoleOperator, anisotropic_field, b0_direction_from_affine, dipole_kernel,
                                     smv_kernel, voxel_size_from_affine)


def test_b0_direction_of_an_upright_head_is_the_third_voxel_axis():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    assert np.allclose(b0_direction_from_affine(affine), [0, 0, 1])


def test_b0_direction_of_a_tilted_head_follows_the_affine():
    # Pitching the head by +18 degrees about scanner x puts B0 at 18 degrees from voxel z,
    # towards +y: h = R^T (0, 0, 1) with R the rotation in the affine.
    h = b0_direction_from_affine(tilted_affine(np.diag([1.0, 1.0, 1.0, 1.0]), 18.0))
    assert np.allclose(h, [0, np.sin(np.deg2rad(18)), np.cos(np.deg2rad(18))])


def test_b0_direction_ignores_voxel_size_and_axis_flips():
    affine = np.diag([-0.8, 1.2, 2.5, 1.0])
    assert np.allclose(b0_direction_from_affine(affine), [0, 0, 1])
    swapped = np.array([[0, 0, 1.5, 0], [1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    assert np.allclose(b0_direction_from_affine(swapped), [0, 1, 0])


def test_dipole_kernel_values():
    kernel = dipole_kernel((16, 16, 16), (1, 1, 1), (0, 0, 1), real=False)
    assert kernel[0, 0, 0] == 0
    assert np.isclose(kernel[0, 0, 1], -2 / 3)   # k along B0
    assert np.isclose(kernel[1, 0, 0], 1 / 3)    # k across B0


def test_dipole_operator_matches_qsm_forward_for_an_oblique_field():
    # A smooth phantom: at the Nyquist frequency an oblique kernel is ambiguous (D(k) != D(-k)
    # there) and the two implementations resolve it differently.
    rng = np.random.default_rng(1)
    chi = np.zeros((32, 36, 28), dtype=np.float32)
    chi[8:24, 10:26, 8:20] = rng.normal(size=(16, 16, 12))
    chi = ndimage.gaussian_filter(chi, 1.5)
    b0_dir = np.array([0.2, -0.3, 0.93])
    b0_dir /= np.linalg.norm(b0_dir)
    ours = DipoleOperator(chi.shape, (1, 1, 1), b0_dir, pad_factor=2, voxel_averaged=False).forward(chi)
    theirs = qsm_forward.generate_field(chi, voxel_size=[1, 1, 1], B0_dir=b0_dir)
    mask = np.ones(chi.shape, dtype=bool)
    assert metrics.nrmse(ours, theirs, mask) < 1.0
    # The same field with the B0 direction's axes swapped is far off: the test sees axis errors.
    swapped = DipoleOperator(chi.shape, (1, 1, 1), b0_dir[[1, 0, 2]], pad_factor=2, voxel_averaged=False).forward(chi)
    assert metrics.nrmse(swapped, theirs, mask) > 20


def test_dipole_operator_adjoint():
    rng = np.random.default_rng(2)
    operator = DipoleOperator((12, 10, 14), (1, 1.2, 0.9), (0.3, 0.1, 0.95), pad_factor=1.5)
    x = rng.normal(size=operator.shape).astype(np.float32)
    y = rng.normal(size=operator.shape).astype(np.float32)
    assert np.isclose(np.vdot(operator.forward(x), y), np.vdot(x, operator.adjoint(y)), rtol=1e-4)


OBLIQUE_DIRECTIONS = np.array([[0.0, 0.0, 1.0], [0.3, 0.1, 0.95], [-0.5, 0.2, 0.8]])


def test_isotropic_tensor_has_the_scalar_field_in_every_orientation():
    # chi I in the tensor model is scalar susceptibility chi: a wrong diagonal component or term
    # breaks the equality (the off-diagonal ones are checked by the anisotropic field below).
    rng = np.random.default_rng(4)
    shape, voxel_size = (14, 12, 10), (0.9, 1.0, 1.4)
    chi = rng.normal(size=shape).astype(np.float32)
    isotropic = np.zeros((6,) + shape, dtype=np.float32)
    isotropic[[0, 3, 5]] = chi
    for voxel_averaged in (True, False):
        scalar = DipoleOperator(shape, voxel_size, OBLIQUE_DIRECTIONS, 1.5, voxel_averaged).forward(chi)
        tensor = DipoleOperator(shape, voxel_size, OBLIQUE_DIRECTIONS, 1.5, voxel_averaged, tensor=True)
        assert scalar.shape == (3,) + shape
        assert np.allclose(tensor.forward(isotropic), scalar, atol=1e-5 * np.abs(scalar).max())


def test_operator_adjoint_batch_and_torch_for_scalar_and_tensor():
    import torch
    rng = np.random.default_rng(5)
    shape, voxel_size = (12, 10, 14), (1, 1.2, 0.9)
    for tensor in (False, True):
        operator = DipoleOperator(shape, voxel_size, OBLIQUE_DIRECTIONS, pad_factor=1.5, tensor=tensor)
        x = rng.normal(size=((6,) if tensor else ()) + shape).astype(np.float32)
        y = rng.normal(size=(3,) + shape).astype(np.float32)
        fields = operator.forward(x)
        assert fields.shape == y.shape and operator.adjoint(y).shape == x.shape
        assert np.isclose(np.vdot(fields, y), np.vdot(x, operator.adjoint(y)), rtol=1e-4)
        single = DipoleOperator(shape, voxel_size, OBLIQUE_DIRECTIONS[2], pad_factor=1.5, tensor=tensor)
        assert np.allclose(single.forward(x), fields[2])
        assert np.allclose(operator.forward(np.stack([x, 2 * x]))[1], 2 * fields, atol=1e-6)
        in_torch = operator.normal(torch.from_numpy(x)).numpy()
        assert np.allclose(in_torch, operator.normal(x), atol=1e-5 * np.abs(in_torch).max())


def test_anisotropic_field_of_fibres_along_and_across_b0_is_a_multiple_of_the_dipole_field():
    # For the tensor a (n n^T - I/3), n = h gives h^T X h = 2a/3 and X h = 2a h/3: 2/3 of the
    # dipole field of a; n across h gives -1/3 of it. A wrong sign, axis or factor breaks both.
    rng = np.random.default_rng(3)
    anisotropy = ndimage.gaussian_filter(rng.normal(size=(20, 24, 18)), 2).astype(np.float32)
    voxel_size = (0.8, 1.1, 1.3)
    b0_dir = np.array([0.3, -0.2, 0.93]) / np.linalg.norm([0.3, -0.2, 0.93])
    across = np.cross(b0_dir, [1.0, 0.0, 0.0])
    across /= np.linalg.norm(across)
    dipole_field = DipoleOperator(anisotropy.shape, voxel_size, b0_dir, pad_factor=1.5,
                                  voxel_averaged=False).forward(anisotropy)
    for direction, factor in ((b0_dir, 2 / 3), (across, -1 / 3)):
        fibres = np.broadcast_to(direction.astype(np.float32)[:, None, None, None], (3, *anisotropy.shape))
        field = anisotropic_field(anisotropy, fibres, voxel_size, b0_dir)
        assert np.allclose(field, factor * dipole_field, atol=1e-4 * np.abs(dipole_field).max())


def test_spheres_and_balls_ignore_the_rounding_of_a_tilted_affine():
    # A 1 mm grid tilted by 18 degrees, stored in float32 as NIfTI stores it, reads as
    # 1.00000003 mm along two axes: the lattice points at exactly the radius must stay in (or
    # out) along all three axes alike.
    rounded = voxel_size_from_affine(tilted_affine(np.eye(4), 18.0).astype(np.float32))
    assert not np.array_equal(rounded, [1.0, 1.0, 1.0])
    for radius in (2.0, 12.0):
        assert np.allclose(smv_kernel((32, 32, 32), rounded, radius), smv_kernel((32, 32, 32), (1, 1, 1), radius),
                           atol=1e-6)
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[5:15, 6:14, 4:16] = True
    for operation in (masking.eroded, masking.dilated):
        assert np.array_equal(operation(mask, 2.0, rounded), operation(mask, 2.0, (1, 1, 1)))


def test_voxel_averaged_kernel_follows_the_field_a_scanner_measures_at_an_oblique_b0():
    # Blocky susceptibility (constant within voxels, as the simulated heads): the field averaged
    # over each voxel, computed on a grid three times finer, is what the scanner measures. For an
    # oblique B0 the point-sampled kernel misses it by several times more than the averaged one.
    rng = np.random.default_rng(7)
    chi = np.zeros((24, 28, 20), dtype=np.float32)
    chi[6:18, 7:21, 5:15] = rng.normal(size=(12, 14, 10))
    voxel_size = (1.0, 1.2, 1.5)
    b0_dir = np.array([0.0, np.sin(np.deg2rad(25)), np.cos(np.deg2rad(25))])
    fine = chi.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    fine_field = DipoleOperator(fine.shape, [v / 3 for v in voxel_size], b0_dir, pad_factor=1.5,
                                voxel_averaged=False).forward(fine)
    measured = fine_field.reshape(24, 3, 28, 3, 20, 3).mean(axis=(1, 3, 5))
    everywhere = np.ones(chi.shape, dtype=bool)
    averaged = DipoleOperator(chi.shape, voxel_size, b0_dir, pad_factor=1.5).forward(chi)
    point = DipoleOperator(chi.shape, voxel_size, b0_dir, pad_factor=1.5, voxel_averaged=False).forward(chi)
    assert metrics.nrmse(averaged, measured, everywhere) < 0.5 * metrics.nrmse(point, measured, everywhere)
    assert metrics.nrmse(averaged, measured, everywhere) < 10
