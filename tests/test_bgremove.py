import numpy as np

from qsmprep.science import bgremove, metrics


def test_vsharp_recovers_the_true_local_field(head):
    local_field, valid = bgremove.vsharp(head.megre['total_field'], head.brain, head.voxel_size)
    assert valid.sum() / head.brain.sum() > 0.8  # two-voxel erosion at 2 mm
    assert metrics.nrmse(local_field, head.megre['local_field'], valid) < 45
    assert metrics.nrmse(-local_field, head.megre['local_field'], valid) > 150


def test_vsharp_removes_a_harmonic_field_entirely():
    x, y, z = np.meshgrid(*[np.arange(40, dtype=np.float32) - 20] * 3, indexing='ij')
    mask = x ** 2 + y ** 2 + z ** 2 < 15 ** 2
    harmonic = 1e-3 * (x ** 2 - y ** 2) + 0.01 * z + 0.3
    local_field, valid = bgremove.vsharp(harmonic, mask, (1, 1, 1))
    assert np.abs(local_field[valid]).max() < 2e-3 * np.ptp(harmonic[mask])


def test_pdf_recovers_the_true_local_field_over_the_whole_mask(head):
    total_field, b0_dir = head.megre['total_field'], head.megre['b0_dir']
    local_field, valid = bgremove.pdf(total_field, head.brain, head.voxel_size, b0_dir)
    assert np.array_equal(valid, head.brain)
    assert metrics.nrmse(local_field, head.megre['local_field'], head.brain) < 50
    # Away from the edge it is as good as V-SHARP.
    _, interior = bgremove.vsharp(total_field, head.brain, head.voxel_size)
    assert metrics.nrmse(local_field, head.megre['local_field'], interior) < 40
    # Sources fitted with a wrong B0 direction leave much more background behind.
    wrong, _ = bgremove.pdf(total_field, head.brain, head.voxel_size, [1, 0, 0])
    assert metrics.nrmse(wrong, head.megre['local_field'], interior) > 60
