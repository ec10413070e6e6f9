"""The BIDS App on one head scanned in four orientations (3 mm, one run each) with
--multi-orientation --sti ls: each run registered onto the first, combined by COSMOS and
least-squares STI on its grid; then LP-CNN and DeepSTI on the same registered fields."""
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from benchmarks.simulate_bids import simulate_orientations
from qsmprep.files import read_itk_transform
from qsmprep.science import metrics
from qsmprep.science.physics import b0_direction_from_affine

TURNS = [(0, 0), (20, 0), (20, 1), (-15, 0)]  # (degrees, scanner axis) per run


@pytest.fixture(scope='module')
def simulated_run(tmp_path_factory, run_qsmprep):
    root = tmp_path_factory.mktemp('orientations')
    bids_dir, output_dir = root / 'bids', root / 'out'
    simulate_orientations(bids_dir, TURNS, voxel_size_mm=3.0)
    result = run_qsmprep(bids_dir, output_dir, 'participant', '-w', root / 'work', '--nprocs', '2',
                         '--multi-orientation', '--sti', 'ls')
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope='module')
def multi_orientation_run(simulated_run):
    return simulated_run / 'bids', simulated_run / 'out' / 'sub-01' / 'anat'


def image(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_each_run_is_registered_onto_the_first(multi_orientation_run):
    bids_dir, anat = multi_orientation_run
    affines = [nib.load(bids_dir / 'sub-01' / 'anat' / f'sub-01_run-{run}_echo-1_part-mag_MEGRE.nii.gz').affine
               for run in range(1, 5)]
    brain = image(anat / 'sub-01_run-1_desc-brain_mask.nii.gz') > 0
    points = affines[0] @ np.c_[np.argwhere(brain), np.ones(int(brain.sum()))].T
    sidecar = json.loads((anat / 'sub-01_desc-cosmos_Chimap.json').read_text())
    assert sidecar['Runs'] == ['1', '2', '3', '4']
    for run in range(2, 5):
        # The same voxels in each run, placed by another affine: the transform is A_run A_1^-1.
        expected = affines[run - 1] @ np.linalg.inv(affines[0])
        found = read_itk_transform(anat / f'sub-01_run-{run}_from-run{run}_to-run1_mode-image_xfm.txt')
        assert np.linalg.norm((found - expected) @ points, axis=0).max() < 0.3
        # ... and B0 in the first run's voxel axes is the run's own.
        assert np.allclose(sidecar['B0Directions'][run - 1], b0_direction_from_affine(affines[run - 1]), atol=2e-3)
        assert abs(sidecar['Registration'][f'run-{run}']['RotationDegrees'] - abs(TURNS[run - 1][0])) < 0.3


def test_cosmos_is_written_on_the_reference_grid_and_beats_one_orientation(multi_orientation_run):
    bids_dir, anat = multi_orientation_run
    truth = bids_dir / 'derivatives' / 'truth' / 'sub-01' / 'anat'
    true_chi = image(truth / 'sub-01_run-1_Chimap.nii.gz')
    true_brain = image(truth / 'sub-01_run-1_desc-brain_mask.nii.gz') > 0
    cosmos = nib.load(anat / 'sub-01_desc-cosmos_Chimap.nii.gz')
    assert np.allclose(cosmos.affine, nib.load(anat / 'sub-01_run-1_Chimap.nii.gz').affine)
    combined = image(anat / 'sub-01_desc-brain_mask.nii.gz') > 0
    evaluation = combined & true_brain
    assert evaluation.sum() > 0.7 * true_brain.sum()
    # From the pipeline's own local fields, whose error (28-41 % at 3 mm) bounds both.
    one_orientation = metrics.nrmse(image(anat / 'sub-01_run-1_Chimap.nii.gz'), true_chi, evaluation)
    assert metrics.nrmse(np.asanyarray(cosmos.dataobj), true_chi, evaluation) < one_orientation
    assert json.loads((anat / 'sub-01_desc-brain_mask.json').read_text())['Type'] == 'Brain'


def test_tensor_maps_are_written_with_their_sidecars(multi_orientation_run):
    _, anat = multi_orientation_run
    shapes = {name: nib.load(anat / f'sub-01_desc-{name}_Chimap.nii.gz').shape for name in ('sti', 'mms', 'msa', 'pev')}
    grid = nib.load(anat / 'sub-01_desc-cosmos_Chimap.nii.gz').shape
    assert shapes == {'sti': grid + (6,), 'mms': grid, 'msa': grid, 'pev': grid + (3,)}
    sidecar = json.loads((anat / 'sub-01_desc-sti_Chimap.json').read_text())
    assert sidecar['Orientations'] == 4 and sidecar['TensorComponents'][1] == 'chi12' and sidecar['Units'] == 'ppm'
    assert sidecar['EstimationAlgorithm'].startswith('least squares')
    cosmos_sidecar = json.loads((anat / 'sub-01_desc-cosmos_Chimap.json').read_text())
    assert cosmos_sidecar['EstimationAlgorithm'].startswith('COSMOS')
    # This head has no anisotropy: the tensor's mean is its susceptibility.
    mask = image(anat / 'sub-01_desc-brain_mask.nii.gz') > 0
    mms, cosmos = image(anat / 'sub-01_desc-mms_Chimap.nii.gz'), image(anat / 'sub-01_desc-cosmos_Chimap.nii.gz')
    assert np.corrcoef(mms[mask], cosmos[mask])[0, 1] > 0.7


def test_report_shows_registration_cosmos_and_the_principal_eigenvector(simulated_run):
    report = (simulated_run / 'out' / 'sub-01.html').read_text()
    assert 'Orientations' in report and 'COSMOS [cosmos]' in report
    for name in ('registration', 'cosmos', 'pev'):
        assert (simulated_run / 'out' / 'sub-01' / 'figures' / f'sub-01_desc-{name}_MEGRE.png').is_file()
        assert f'sub-01_desc-{name}_MEGRE.png' in report
    assert len(re.findall(r'src="[^"]*_desc-chimap_MEGRE.png"', report)) == 4  # one Chimap per run


def rerun_with(simulated_run, run_qsmprep, tmp_path, *options):
    """The 4-run dataset again with a learned method added (needs torch), in a copy of the first
    run's work folder so that the fields and the registration are reused; its anat folder."""
    pytest.importorskip('torch')
    work_dir, output_dir = tmp_path / 'work', tmp_path / 'out'
    shutil.copytree(simulated_run / 'work', work_dir)
    result = run_qsmprep(simulated_run / 'bids', output_dir, 'participant', '-w', work_dir, '--nprocs', '2',
                         '--multi-orientation', *options)
    assert result.returncode == 0, result.stderr
    return output_dir / 'sub-01' / 'anat'


def test_lpcnn_takes_every_registered_orientation(simulated_run, run_qsmprep, tmp_path):
    anat = rerun_with(simulated_run, run_qsmprep, tmp_path, '--inversion', 'lpcnn')
    sidecar = json.loads((anat / 'sub-01_desc-lpcnn_Chimap.json').read_text())
    assert sidecar['Model'] == 'LP-CNN' and len(sidecar['B0Directions']) == 4
    truth = simulated_run / 'bids' / 'derivatives' / 'truth' / 'sub-01' / 'anat'
    evaluation = (image(anat / 'sub-01_desc-brain_mask.nii.gz') > 0) & (
        image(truth / 'sub-01_run-1_desc-brain_mask.nii.gz') > 0)
    true_chi = image(truth / 'sub-01_run-1_Chimap.nii.gz')
    # 3 mm is outside the shipped model's 0.6-1.5 mm: a loose bar, as for one orientation in test_cli.
    assert metrics.nrmse(image(anat / 'sub-01_desc-lpcnn_Chimap.nii.gz'), true_chi, evaluation) < 80


def test_deepsti_writes_the_tensor_from_four_orientations(simulated_run, run_qsmprep, tmp_path):
    anat = rerun_with(simulated_run, run_qsmprep, tmp_path, '--sti', 'deepsti')
    sidecar = json.loads((anat / 'sub-01_desc-sti_Chimap.json').read_text())
    assert sidecar['Model'] == 'DeepSTI' and sidecar['Orientations'] == 4
    assert sidecar['EstimationAlgorithm'].startswith('learned proximal gradient descent on the tensor model')
    grid = nib.load(anat / 'sub-01_desc-cosmos_Chimap.nii.gz').shape
    assert nib.load(anat / 'sub-01_desc-sti_Chimap.nii.gz').shape == grid + (6,)
    mask = image(anat / 'sub-01_desc-brain_mask.nii.gz') > 0
    mms, cosmos = image(anat / 'sub-01_desc-mms_Chimap.nii.gz'), image(anat / 'sub-01_desc-cosmos_Chimap.nii.gz')
    assert np.corrcoef(mms[mask], cosmos[mask])[0, 1] > 0.7


def test_sti_without_multi_orientation_is_refused(simulated_run, run_qsmprep, tmp_path):
    result = run_qsmprep(simulated_run / 'bids', tmp_path / 'out', 'participant', '-w', tmp_path / 'work',
                         '--sti', 'ls')
    assert result.returncode == 2 and 'add --multi-orientation' in result.stderr
    assert not (tmp_path / 'out' / 'sub-01').exists()
