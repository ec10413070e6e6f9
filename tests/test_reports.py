"""The pieces of the per-subject report: its checks, its figures' colours and its methods text."""
import numpy as np

from qsmprep.reports import figures, subject
from qsmprep.science import echofit

SIDECAR = {'EchoTime': [0.004, 0.01, 0.016], 'MagneticFieldStrength': 3.0, 'B0Direction': [0.0, 0.0, 1.0],
           'PhaseUnwrapping': 'romeo', 'BackgroundFieldRemoval': 'pdf',
           'EchoCombination': 'a fit', 'Reference': 'mean over desc-localfield_mask'}


def _maps(total_field):
    mask = np.zeros(total_field.shape, dtype=np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    return {'brain_mask': mask, 'localfield_mask': mask, 'total_field': total_field,
            'local_field': total_field * 0.01, 'chimap': total_field * 0.1}


def test_the_unwrapping_check_finds_a_jump_of_one_wrap_and_passes_a_smooth_field():
    sidecar = {**SIDECAR, 'EstimationAlgorithm': 'truncated k-space division'}
    x = np.linspace(-1, 1, 20, dtype=np.float32)
    smooth = np.broadcast_to(0.5 * x[:, None, None], (20, 20, 20)).copy()
    wrapped = smooth.copy()
    wrapped[:, :, 10:] += echofit.wrap_period_ppm(SIDECAR['EchoTime'], 3.0)
    key = 'Phase jumps (unwrapping check): neighbour pairs off by half a wrap (%)'
    assert float(subject.series_metrics(_maps(smooth), sidecar, (1.0, 1.0, 1.0))[key]) == 0
    # One plane of 16 x 16 pairs jumps, among 3 x 16 x 16 x 15 pairs.
    share = float(subject.series_metrics(_maps(wrapped), sidecar, (1.0, 1.0, 1.0))[key])
    assert np.isclose(share, 100 / 45, atol=0.01)


def test_methods_cite_what_ran_and_only_that():
    text = subject.methods_paragraph({**SIDECAR, 'EstimationAlgorithm': subject.INVERSIONS['lpn'].estimation_algorithm},
                                     series_count=1)
    assert 'Fang Z, Buchanan S, Sulam J' in text and 'Liu T, Khalidov I' in text and 'Dymerska' in text
    assert 'COSMOS' not in text and 'Shin HG' not in text and 'Milovic' not in text
    both = subject.methods_paragraph({**SIDECAR, 'EstimationAlgorithm': 'x'}, 4, chi_separation=True,
                                     orientations=True)
    assert 'Shin HG' in both and 'COSMOS' in both


def test_warnings_of_a_subject_are_not_those_of_a_longer_label(tmp_path):
    log = tmp_path / 'run.log'
    log.write_text('t qsmprep WARNING: brain mask of /d/sub-1/anat/sub-1_echo-1_part-mag_MEGRE.nii.gz: small\n'
                   't qsmprep WARNING: brain mask of /d/sub-10/anat/sub-10_echo-1_part-mag_MEGRE.nii.gz: small\n'
                   't qsmprep INFO: sub-1 ran\n')
    assert [line.split('/d/')[1][:6] for line in subject.subject_warnings(log, '1')] == ['sub-1/']
    assert len(subject.subject_warnings(log, '10')) == 1
    assert subject.mentions_subject('sub-1 (orientations)', '1') and not subject.mentions_subject('sub-10_run-1', '1')


def test_principal_directions_are_coloured_by_axis():
    vectors = np.zeros((3, 4, 4, 4))
    vectors[0, :2], vectors[1, 2:] = 1, -1  # left-right in one half, front-back (negative) in the other
    rgb = figures.direction_colours(vectors, np.ones((4, 4, 4)), np.ones((4, 4, 4), dtype=bool))
    assert np.allclose(rgb[:2], [1, 0, 0]) and np.allclose(rgb[2:], [0, 1, 0])


def test_slices_spread_over_the_brain_only():
    mask = np.zeros((10, 10, 40), dtype=bool)
    mask[2:8, 2:8, 10:30] = True
    planes = figures.slice_indices(mask)
    assert len(planes) == figures.SLICES and planes.min() >= 10 and planes.max() <= 29
