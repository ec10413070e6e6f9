"""`qsmprep-tools register`, `cosmos` and `sti` on NIfTI files of the 2 mm simulated head."""
import re

import nibabel as nib
import numpy as np
import pytest

from benchmarks.simulate_bids import voxel_averaged_field
from qsmprep.files import read_itk_transform
from qsmprep.science import metrics, registration
from test_registration import about, rotation


def save(array, affine, path):
    nib.Nifti1Image(np.asarray(array), affine).to_filename(path)
    return path


def test_register_writes_the_transform_and_resamples_the_moving_run(head, tmp_path, run_tool):
    reference = head.megre['magnitude'][..., 0]
    centre = (head.affine @ np.append(np.argwhere(head.brain).mean(axis=0), 1))[:3]
    turn = about(centre, rotation(0, 10), np.array([2.0, 0.0, -3.0]))
    moving = registration.resample(reference, head.affine, head.affine, reference.shape, turn)
    moving_mask = registration.resample(head.brain.astype(np.float32), head.affine, head.affine, reference.shape,
                                        turn, order=0)
    paths = {name: save(array, head.affine, tmp_path / f'{name}.nii.gz') for name, array in
             (('reference', reference), ('moving', moving), ('mask', head.brain.astype(np.uint8)),
              ('moving_mask', moving_mask.astype(np.uint8)))}
    transform_path, resampled = tmp_path / 'sub-01_run-2_from-run2_to-run1_mode-image_xfm.txt', tmp_path / 'back.nii.gz'
    result = run_tool('register', paths['moving'], '--reference', paths['reference'], '--reference-mask',
                      paths['mask'], '-o', transform_path, '--resample', paths['moving_mask'], '--resampled', resampled)
    assert result.returncode == 0, result.stderr
    assert 'Transform: AffineTransform_double_3_3' in transform_path.read_text()
    found = read_itk_transform(transform_path)
    # The transform maps the reference to the moving run: the inverse of the turn made.
    assert np.allclose(found[:3, :3], turn.rotation.T, atol=5e-3)
    assert np.allclose(found[:3, :3] @ (turn.rotation @ centre + turn.translation) + found[:3, 3], centre, atol=0.3)
    back = nib.load(resampled)
    assert back.get_data_dtype() == np.uint8
    overlap = 2 * np.sum((np.asanyarray(back.dataobj) > 0) & head.brain) / (np.sum(back.dataobj) + head.brain.sum())
    assert overlap > 0.97
    b0_dir = np.array(re.search(r'--b0-dir (\S+) (\S+) (\S+)', result.stdout).groups(), dtype=float)
    assert np.allclose(b0_dir, turn.rotation @ [0, 0, 1], atol=5e-3)


def test_cosmos_and_sti_tools(head, tmp_path, run_tool):
    directions = [np.array([0.0, 0.0, 1.0]), rotation(0, 25) @ [0, 0, 1], rotation(1, 25) @ [0, 0, 1]]
    fields = [save((voxel_averaged_field(head.chi, head.voxel_size, d) * head.brain).astype(np.float32),
                   head.affine, tmp_path / f'field{n}.nii.gz') for n, d in enumerate(directions)]
    mask = save(head.brain.astype(np.uint8), head.affine, tmp_path / 'mask.nii.gz')
    b0_options = [text for d in directions for text in ('--b0-dir', *map(str, d))]
    result = run_tool('cosmos', *fields, '--mask', mask, *b0_options, '-o', tmp_path / 'cosmos.nii.gz')
    assert result.returncode == 0, result.stderr
    assert metrics.nrmse(nib.load(tmp_path / 'cosmos.nii.gz').get_fdata(), head.chi, head.brain) < 12
    result = run_tool('cosmos', *fields, '--mask', mask, '-o', tmp_path / 'no.nii.gz')
    assert result.returncode == 1 and '--b0-dir once per field' in result.stderr
    result = run_tool('sti', *fields, '--mask', mask, *b0_options, '--iterations', '3',
                      '--output-prefix', tmp_path / 'sub-01')
    assert result.returncode == 0 and 'needs 6 or more' in result.stderr, result.stderr
    assert nib.load(tmp_path / 'sub-01_desc-sti_Chimap.nii.gz').shape == head.chi.shape + (6,)
    assert nib.load(tmp_path / 'sub-01_desc-pev_Chimap.nii.gz').shape == head.chi.shape + (3,)
    assert nib.load(tmp_path / 'sub-01_desc-msa_Chimap.nii.gz').shape == head.chi.shape
    pytest.importorskip('torch')
    result = run_tool('sti', *fields, '--mask', mask, *b0_options, '--method', 'deepsti',
                      '--output-prefix', tmp_path / 'learned')
    assert result.returncode == 0 and 'warning' not in result.stderr, result.stderr
    mms = nib.load(tmp_path / 'learned_desc-mms_Chimap.nii.gz').get_fdata()
    # This head is isotropic: the tensor's mean is its susceptibility.
    assert metrics.nrmse(mms, head.chi, head.brain) < 40
