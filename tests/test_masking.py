import numpy as np
import pytest
from scipy import ndimage

from benchmarks.simulate_bids import head_phantom, simulate_megre
from qsmprep.science import masking


def test_brain_mask_of_the_biased_simulated_head_covers_the_brain_and_not_the_scalp(head):
    mask = masking.brain_mask(masking.combined_magnitude(head.megre['magnitude']), head.voxel_size)
    brain = head.brain
    assert (mask & brain).sum() / brain.sum() > 0.97
    # What the mask adds beyond the brain is the cerebrospinal fluid around it, not the scalp.
    assert (mask & ~brain).sum() / brain.sum() < 0.15
    scalp = head.phantom['head_mask'] & (head.phantom['r2star'] == 35.0)
    assert (mask & scalp).sum() / scalp.sum() < 0.02


@pytest.mark.parametrize('bias, peak_snr', [(('rim', 2.5), 15.0), (('centre', 1.0), 25.0)])
def test_brain_mask_keeps_the_deep_nuclei_under_a_bright_noise_floor_and_strong_bias(bias, peak_snr):
    # At a peak SNR of 15 the background's noise floor is above 10 % of the 99th percentile, and a
    # rim-bright array coil makes the cortex brighter than the deep brain: the head that used to
    # give a hollow shell without the deep grey matter.
    phantom, affine = head_phantom(2.0, bias=bias)
    magnitude = masking.combined_magnitude(simulate_megre(phantom, affine, peak_snr=peak_snr)['magnitude'])
    mask = masking.brain_mask(magnitude, (2.0, 2.0, 2.0))
    brain, nuclei = phantom['brain_mask'], phantom['nuclei'] > 0
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.95
    assert (mask & nuclei).sum() == nuclei.sum()
    for label in range(1, phantom['nuclei'].max() + 1):
        assert mask[phantom['nuclei'] == label].all()


def test_head_foreground_separates_a_bright_noise_floor_from_the_head():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    head = np.zeros(shape, dtype=bool)
    head[10:30, 10:30, 10:30] = True
    # A Rician background whose mean is 25 % of the tissue level (an SNR of 5).
    tissue = np.where(head, 1.0, 0.0)
    noise = 0.2 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    magnitude = np.abs(tissue + noise).astype(np.float32)
    foreground = masking.head_foreground(magnitude)
    assert foreground[head].mean() > 0.995
    # The 3-voxel average may blur the edge by one voxel, no more.
    assert not (foreground & ~ndimage.binary_dilation(head)).any()


def test_brain_mask_fills_a_dark_region_open_to_the_surface_through_a_narrow_channel():
    # A ball of tissue with a dark core (as iron-rich nuclei or ventricles) reached by a 4 mm channel
    # from its surface: not a hole for hole filling, still brain.
    shape = (64, 64, 64)
    grid = np.indices(shape) - 31.5
    radius = np.sqrt((grid ** 2).sum(axis=0))
    brain = radius < 24
    magnitude = np.where(brain, 1.0, 0.02)
    core = radius < 10
    channel = (np.abs(grid[0]) < 2) & (np.abs(grid[1]) < 2) & (grid[2] < 0) & brain
    magnitude = np.where(core | channel, 0.1, magnitude).astype(np.float32)
    mask = masking.brain_mask(magnitude, (1.0, 1.0, 1.0))
    assert mask[core].all()
    assert (mask & brain).sum() / brain.sum() > 0.98
    assert (mask & ~brain).sum() / brain.sum() < 0.02


def test_otsu_separates_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 5000), rng.normal(10, 1, 5000)])
    assert 3 < masking.otsu_threshold(values) < 7


def test_implausible_masks_are_named_and_a_whole_brain_is_not(head):
    voxel_size = (2.0, 2.0, 2.0)
    assert masking.implausibilities(head.brain, voxel_size) == []
    small = np.zeros_like(head.brain)
    small[:20, :20, :20] = True  # a corner blob of 64 mL that touches three faces
    reasons = masking.implausibilities(small, voxel_size)
    assert len(reasons) == 2 and 'less than' in reasons[0] and 'first slice of axis 2' in reasons[1]
    assert 'more than' in masking.implausibilities(head.phantom['head_mask'] | head.brain, (3.0, 3.0, 3.0))[0]


def test_masked_median_ignores_outside_voxels_and_is_the_same_in_slabs():
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(23, 9, 8)).astype(np.float32)
    mask = rng.random(volume.shape) > 0.3
    mask[9:14, 2:7, 2:7] = True  # one voxel's whole neighbourhood inside
    volume[~mask] = 1e6  # would win every median if outside voxels voted
    median = masking.masked_median(volume, mask, size=5)
    assert np.abs(median).max() < 10 and not median[~mask].any()
    assert median[11, 4, 4] == np.median(volume[9:14, 2:7, 2:7])
    for threads in (2, 3):
        assert np.array_equal(masking.masked_median(volume, mask, size=5, threads=threads), median)


def test_filled_holes_matches_ndimage_when_the_mask_touches_the_edge():
    rng = np.random.default_rng(5)
    mask = rng.random((20, 18, 16)) > 0.35
    mask[0] = True  # background regions open only towards the image's edge are not holes
    assert np.array_equal(masking.filled_holes(mask), ndimage.binary_fill_holes(mask))


def test_mask_box_gives_the_same_room_in_mm_along_every_axis():
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[15:25, 15:25, 15:25] = True
    # A float32 affine's voxel size may be a hair under 1 mm: still 8 voxels, not 9.
    box = masking.mask_box(mask, (0.99999997, 2.0, 3.0), 8.0)
    assert [(s.start, s.stop) for s in box] == [(7, 33), (11, 29), (12, 28)]
    assert masking.mask_box(mask, (1.0, 1.0, 1.0), 30.0) == (slice(0, 40),) * 3
    box = masking.mask_box(mask, (0.5, 2.0, 3.0), 8.0, min_voxels=8)
    assert [(s.start, s.stop) for s in box] == [(0, 40), (7, 33), (7, 33)]
