import numpy as np

from qsmprep.science import inversion, masking, metrics


def _magnitude(head):
    return masking.combined_magnitude(head.megre['magnitude'])


def test_tv_from_the_true_local_field_matches_the_true_susceptibility(head):
    chi = inversion.tv_admm(head.megre['local_field'], head.brain, head.voxel_size, [0, 0, 1],
                            magnitude=_magnitude(head))
    assert metrics.nrmse(chi, head.chi, head.brain) < 35
    assert metrics.xsim(chi, head.chi, head.brain) > 0.5


def test_tkd_from_the_true_local_field_is_worse_than_tv_but_close(head):
    chi = inversion.tkd(head.megre['local_field'], head.brain, head.voxel_size, [0, 0, 1])
    assert metrics.nrmse(chi, head.chi, head.brain) < 75


def test_oblique_b0_must_be_taken_from_the_affine(tilted_head):
    head = tilted_head
    b0_dir = np.array([0, np.sin(np.deg2rad(18)), np.cos(np.deg2rad(18))])
    chi = inversion.tv_admm(head.megre['local_field'], head.brain, head.voxel_size, b0_dir,
                            magnitude=_magnitude(head))
    assert metrics.nrmse(chi, head.chi, head.brain) < 35
    ignoring_b0 = inversion.tv_admm(head.megre['local_field'], head.brain, head.voxel_size, [0, 0, 1],
                                    magnitude=_magnitude(head))
    assert metrics.nrmse(ignoring_b0, head.chi, head.brain) > 35


def test_referencing_makes_the_mask_mean_zero():
    chi = np.random.default_rng(0).normal(0.1, 0.05, (8, 8, 8)).astype(np.float32)
    mask = np.zeros(chi.shape, dtype=bool)
    mask[2:6, 2:6, 2:6] = True
    referenced = inversion.reference_to_mask_mean(chi, mask)
    assert abs(referenced[mask].mean()) < 1e-6 and np.all(referenced[~mask] == 0)
