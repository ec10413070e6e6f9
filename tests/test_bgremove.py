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
