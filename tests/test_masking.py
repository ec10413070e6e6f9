import numpy as np

from qsmprep.science import masking


def test_brain_mask_of_the_biased_simulated_head_covers_the_brain_and_not_the_scalp(head):
    mask = masking.brain_mask(masking.combined_magnitude(head.megre['magnitude']), head.voxel_size)
    brain = head.brain
    assert (mask & brain).sum() / brain.sum() > 0.97
    # What the mask adds beyond the brain is the cerebrospinal fluid around it, not the scalp.
    assert (mask & ~brain).sum() / brain.sum() < 0.15
    scalp = head.phantom['head_mask'] & (head.phantom['r2star'] == 35.0)
    assert (mask & scalp).sum() / scalp.sum() < 0.02


def test_otsu_separates_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 5000), rng.normal(10, 1, 5000)])
    assert 3 < masking.otsu_threshold(values) < 7
