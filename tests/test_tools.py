"""`qsmprep-tools` on plain NIfTI files of the simulated head."""
import nibabel as nib
import numpy as np
import pytest

from qsmprep.science import metrics



@pytest.fixture(scope='module')
def files(head, tmp_path_factory):
    folder = tmp_path_factory.mktemp('tools')
    true_phase = (2 * np.pi * head.field_strength * 42.57747892 * head.megre['total_field'][..., None]
                  * head.echo_times + head.phantom['phase_offset'][..., None])
    arrays = {'magnitude': head.megre['magnitude'], 'phase': head.megre['phase'], 'brain': head.brain,
              'unwrapped_phase': head.megre['phase'] + 2 * np.pi * np.round((true_phase - head.megre['phase'])
                                                                              / (2 * np.pi)),
              'r2star': head.phantom['r2star'],
              'total_field': head.megre['total_field'], 'local_field': head.megre['local_field']}
    paths = {}
    for name, array in arrays.items():
        paths[name] = folder / f'{name}.nii.gz'
        nib.Nifti1Image(np.asarray(array, np.float32), head.affine).to_filename(paths[name])
    paths['folder'] = folder
    return paths


def load(path):
    return nib.load(path).get_fdata()


def test_field(files, head, run_tool):
    out, noise = files['folder'] / 'field.nii.gz', files['folder'] / 'noise.nii.gz'
    result = run_tool('field', files['unwrapped_phase'], '--magnitude', files['magnitude'], '--mask', files['brain'],
                      '--echo-times', *head.echo_times, '--field-strength', head.field_strength, '-o', out,
                      '--out-noise', noise)
    assert result.returncode == 0, result.stderr
    assert 'echo fit: complex' in result.stdout
    assert metrics.nrmse(load(out), head.megre['total_field'], head.brain) < 1
    assert np.all(load(noise)[head.brain] > 0)


def test_chisep(files, head, run_tool):
    prefix = files['folder'] / 'sep'
    result = run_tool('chisep', files['local_field'], '--r2star', files['r2star'], '--mask', files['brain'],
                      '--field-strength', head.field_strength, '-o', prefix)
    assert result.returncode == 0, result.stderr
    assert 'R2 of 12.5' in result.stdout
    paramagnetic = load(f'{prefix}_desc-paramagnetic_Chimap.nii.gz')
    diamagnetic = load(f'{prefix}_desc-diamagnetic_Chimap.nii.gz')
    assert paramagnetic.min() >= 0 and diamagnetic.min() >= 0
    assert metrics.correlation(paramagnetic - diamagnetic, head.chi, head.brain) > 0.8


def test_invert(files, head, run_tool):
    out = files['folder'] / 'chi.nii.gz'
    result = run_tool('invert', files['local_field'], '--mask', files['brain'], '--method', 'tkd', '-o', out)
    assert result.returncode == 0, result.stderr
    assert metrics.nrmse(load(out), head.chi, head.brain) < 75


# Over the whole valid mask, outer voxel layer included (test_bgremove.py leaves it out).
@pytest.mark.parametrize('method, threshold', [('vsharp', 32), ('pdf', 38), ('lbv', 32)])
def test_bgremove(files, head, run_tool, method, threshold):
    out, out_mask = files['folder'] / f'local_{method}.nii.gz', files['folder'] / f'local_mask_{method}.nii.gz'
    result = run_tool('bgremove', files['total_field'], '--mask', files['brain'], '--method', method, '-o', out,
                      '--out-mask', out_mask)
    assert result.returncode == 0, result.stderr
    valid = load(out_mask) > 0
    assert metrics.nrmse(load(out), head.megre['local_field'], valid) < threshold


def test_mask_r2star_and_unwrap(files, head, run_tool):
    mask = files['folder'] / 'mask.nii.gz'
    assert run_tool('mask', files['magnitude'], '-o', mask).returncode == 0
    computed_mask = load(mask) > 0
    assert (computed_mask & head.brain).sum() / head.brain.sum() > 0.97
    echo_times = [f'{t:g}' for t in head.echo_times]
    r2star = files['folder'] / 'r2star.nii.gz'
    result = run_tool('r2star', files['magnitude'], '--echo-times', *echo_times, '--mask', mask, '-o', r2star)
    assert result.returncode == 0, result.stderr
    assert metrics.nrmse(load(r2star), head.phantom['r2star'], computed_mask & head.brain) < 25
    unwrapped = files['folder'] / 'unwrapped.nii.gz'
    result = run_tool('unwrap', files['phase'], '--magnitude', files['magnitude'], '--echo-times', *echo_times,
                      '--mask', mask, '-o', unwrapped)
    assert result.returncode == 0, result.stderr
    phase = load(unwrapped)
    # The first-to-last echo difference of the unwrapped phase carries the total field.
    hz_per_ppm = 42.57747892 * head.field_strength
    field = (phase[..., -1] - phase[..., 0]) / (2 * np.pi * hz_per_ppm * (head.echo_times[-1] - head.echo_times[0]))
    assert metrics.nrmse(field, head.megre['total_field'], computed_mask & head.brain) < 10


def test_a_mask_on_another_grid_is_one_clear_message(files, tmp_path, run_tool):
    small = tmp_path / 'small_mask.nii.gz'
    nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)).to_filename(small)
    result = run_tool('invert', files['local_field'], '--mask', small, '-o', tmp_path / 'chi.nii.gz')
    assert result.returncode == 1
    assert str(small) in result.stderr and 'grid' in result.stderr and 'Traceback' not in result.stderr


def test_lpcnn_takes_several_orientations_of_one_grid(files, head, run_tool, tmp_path):
    pytest.importorskip('torch')
    from qsmprep.science.physics import DipoleOperator, b0_direction_from_affine

    # A second orientation of the same head: B0 turned 25 degrees from the first.
    first = b0_direction_from_affine(head.affine)
    second = np.array([np.sin(np.deg2rad(25)), 0.0, np.cos(np.deg2rad(25))])
    second_field = tmp_path / 'local_field_2.nii.gz'
    field = DipoleOperator(head.chi.shape, head.voxel_size, second).forward(head.chi)
    nib.Nifti1Image(np.where(head.brain, field, 0).astype(np.float32), head.affine).to_filename(second_field)
    out = tmp_path / 'chi_lpcnn.nii.gz'
    result = run_tool('invert', files['local_field'], second_field, '--mask', files['brain'], '--method', 'lpcnn',
                      '--b0-dir', *first, '--b0-dir', *second, '-o', out)
    assert result.returncode == 0, result.stderr
    assert '2 orientation(s)' in result.stdout
    assert metrics.correlation(load(out), head.chi, head.brain) > 0.7

    result = run_tool('invert', files['local_field'], second_field, '--mask', files['brain'], '--method', 'lpcnn',
                      '--b0-dir', *first, '-o', out)
    assert result.returncode == 1 and '--b0-dir was given 1 times for 2 local fields' in result.stderr
    result = run_tool('invert', files['local_field'], second_field, '--mask', files['brain'], '--method', 'tv',
                      '-o', out)
    assert result.returncode == 1 and 'several orientations need' in result.stderr


def test_lpn_writes_its_regularizer_map_and_other_methods_refuse_one(files, head, run_tool, tmp_path):
    pytest.importorskip('torch')
    out, regularizer = tmp_path / 'chi_lpn.nii.gz', tmp_path / 'regularizer.nii.gz'
    result = run_tool('invert', files['local_field'], '--mask', files['brain'], '--method', 'lpn', '-o', out,
                      '--regularizer-map', regularizer)
    assert result.returncode == 0, result.stderr
    assert 'LPN (' in result.stdout and 'learned regularizer R = ' in result.stdout
    assert metrics.correlation(load(out), head.chi, head.brain) > 0.7
    values = load(regularizer)
    assert np.all(values[~head.brain] == 0) and np.any(values[head.brain] != 0)

    result = run_tool('invert', files['local_field'], '--mask', files['brain'], '--method', 'tv', '-o', out,
                      '--regularizer-map', regularizer)
    assert result.returncode == 1 and '--method lpn' in result.stderr and 'Traceback' not in result.stderr
