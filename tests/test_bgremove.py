"""Background field removal on the simulated 2 mm head (tests/conftest.py), from its true total field.

Each method is scored over its valid mask without the brain mask's outer voxel layer (partial
volume with the CSF, and no Laplacian there for LBV): 91.9 % of the brain at 2 mm. At 1 mm the
same region keeps 91.5 to 95.9 % and every method stays under 30 % NRMSE upright and tilted
(benchmarks/BGREMOVE.md). At 2 mm a larger share of the brain is near its edge, where the local
field is least recoverable, so the limit is 32 %: the methods score 28 to 31 %, a flipped sign
over 190 % and the tilted head processed with B0 along the voxel z axis 34 to 37 %.
"""
import numpy as np
import pytest
import scipy.fft
from scipy import ndimage

from qsmprep.science import bgremove, masking, metrics

NRMSE_LIMIT = 32.0


def evaluation_region(valid, brain):
    return valid & ndimage.binary_erosion(brain)


def run(head, method, b0_dir=None):
    b0_dir = head.megre['b0_dir'] if b0_dir is None else b0_dir
    with scipy.fft.set_workers(2):
        return bgremove.remove_background(head.megre['total_field'], head.brain, head.voxel_size, b0_dir, method)


@pytest.mark.parametrize('method', bgremove.BGREMOVE_METHODS)
def test_recovers_the_true_local_field(head, method):
    local_field, valid = run(head, method)
    region = evaluation_region(valid, head.brain)
    assert region.sum() >= 0.9 * head.brain.sum()
    assert metrics.nrmse(local_field, head.megre['local_field'], region) < NRMSE_LIMIT
    assert metrics.nrmse(-local_field, head.megre['local_field'], region) > 150


@pytest.mark.parametrize('method', bgremove.BGREMOVE_METHODS)
def test_oblique_b0_of_a_tilted_head_is_used(tilted_head, method):
    local_field, valid = run(tilted_head, method)
    region = evaluation_region(valid, tilted_head.brain)
    assert region.sum() >= 0.9 * tilted_head.brain.sum()
    assert metrics.nrmse(local_field, tilted_head.megre['local_field'], region) < NRMSE_LIMIT
    ignoring_tilt, _ = run(tilted_head, method, b0_dir=[0.0, 0.0, 1.0])
    assert metrics.nrmse(ignoring_tilt, tilted_head.megre['local_field'], region) > NRMSE_LIMIT


@pytest.mark.parametrize('method', bgremove.BGREMOVE_METHODS)
def test_a_harmonic_field_is_removed(method):
    x, y, z = np.meshgrid(*[np.arange(40, dtype=np.float32) - 20] * 3, indexing='ij')
    mask = x ** 2 + y ** 2 + z ** 2 < 15 ** 2
    harmonic = 1e-3 * (x ** 2 - y ** 2) + 0.01 * z + 0.3
    local_field, valid = bgremove.remove_background(harmonic, mask, (1, 1, 1), (0.3, 0.2, 0.93), method)
    # PDF's iterations leave 1.1 %; V-SHARP 0.05 %, LBV (exact for quadratics) 1e-5 %.
    assert np.abs(local_field[valid]).max() < 0.02 * np.ptp(harmonic[mask])


def test_valid_masks():
    mask = np.zeros((30, 30, 30), dtype=bool)
    mask[5:25, 5:25, 5:25] = True
    field = np.ones(mask.shape, dtype=np.float32)
    _, valid = bgremove.pdf(field, mask, (1, 1, 1), (0, 0, 1))
    assert np.array_equal(valid, mask)
    _, valid = bgremove.lbv(field, mask, (1, 1, 1), (0, 0, 1))
    assert np.array_equal(valid, ndimage.binary_erosion(mask))
    # V-SHARP erodes by its smallest radius: 2 mm, at least one voxel, two when all axes are coarser.
    assert bgremove.default_radii_mm((1, 1, 1)) == [12.0, 2.0]
    assert bgremove.default_radii_mm((3, 3, 3)) == [12.0, 6.0]
    assert bgremove.default_radii_mm((0.5, 0.5, 3)) == [12.0, 3.0]
    _, valid = bgremove.vsharp(field, mask, (1, 1, 1), (0, 0, 1))
    assert valid.sum() == 16 ** 3


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match='choose from'):
        bgremove.remove_background(np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool), (1, 1, 1), (0, 0, 1), 'sharp')


def test_vsharp_holds_on_a_magnitude_mask_that_reaches_the_skull(head):
    # The magnitude mask takes in the fluid around the brain up to the skull (-2 ppm), whose
    # steep field no discrete model follows to the local field's accuracy: with every voxel as
    # data V-SHARP scored 83 % NRMSE here; with data from 4 mm deep, 35 % over 99.7 % of the brain.
    mask = masking.brain_mask(masking.combined_magnitude(head.megre['magnitude']), head.voxel_size)
    with scipy.fft.set_workers(2):
        local_field, valid = bgremove.vsharp(head.megre['total_field'], mask, head.voxel_size, head.megre['b0_dir'])
    region = valid & head.brain
    assert region.sum() >= 0.97 * head.brain.sum()
    assert metrics.nrmse(local_field, head.megre['local_field'], region) < 40
