"""Finding MEGRE series and checking their metadata, on tiny hand-made datasets."""
import json

import nibabel as nib
import numpy as np
import pytest

from qsmprep.bids import InputError, collect_megre_series
from qsmprep.interfaces.qsm import LoadMEGRE

ECHO_TIMES = (0.005, 0.010, 0.015)


def make_dataset(root, subjects=('01',), phase_units='rad', phase_values=None, extra=None, shape=(8, 8, 8),
                 affine=None):
    """A BIDS dataset of tiny MEGRE series, phase uniform in [-pi, pi) as that of noise; ``extra``
    adds keys to every sidecar."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    random = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'dataset_description.json').write_text(json.dumps({'Name': 't', 'BIDSVersion': '1.10.0'}))
    for subject in subjects:
        anat = root / f'sub-{subject}' / 'anat'
        anat.mkdir(parents=True)
        for echo, te in enumerate(ECHO_TIMES, start=1):
            for part in ('mag', 'phase'):
                data = random.uniform(1, 2, shape) if part == 'mag' else (
                    phase_values if phase_values is not None else random.uniform(-np.pi, np.pi, shape))
                stem = anat / f'sub-{subject}_echo-{echo}_part-{part}_MEGRE'
                nib.Nifti1Image(np.asarray(data, np.float32), affine).to_filename(
                    f'{stem}.nii.gz')
                sidecar = {'EchoTime': te, 'MagneticFieldStrength': 3.0, **(extra or {})}
                if part == 'phase' and phase_units is not None:
                    sidecar['Units'] = phase_units
                stem.with_suffix('.json').write_text(json.dumps(sidecar))
    return root


def first(errors):
    """The message of the first series that failed."""
    return next(iter(errors.values()))


def edit_sidecar(root, name, change):
    path = root / 'sub-01' / 'anat' / name
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    return path


def test_series_are_found_and_labels_take_or_omit_the_prefix(tmp_path):
    root = make_dataset(tmp_path, subjects=('01', '02'))
    series, errors = collect_megre_series(root, participant_labels=['sub-02'], validate=False)
    assert not errors and [s.name for s in series] == ['sub-02']
    assert series[0].echo_times_s == list(ECHO_TIMES)
    assert series[0].b0_dir_source == 'image affine' and np.allclose(series[0].b0_dir, [0, 0, 1])
    series, _ = collect_megre_series(root, participant_labels=['01', '02'], validate=False)
    assert len(series) == 2


def test_missing_phase_units_names_the_file_and_key(tmp_path):
    root = make_dataset(tmp_path, phase_units=None)
    series, errors = collect_megre_series(root, validate=False)
    assert not series
    assert 'sub-01_echo-1_part-phase_MEGRE.json' in first(errors) and 'Units' in first(errors)


def test_echo_time_in_milliseconds_is_refused(tmp_path):
    root = make_dataset(tmp_path)
    path = edit_sidecar(root, 'sub-01_echo-2_part-mag_MEGRE.json', lambda c: c.update(EchoTime=10.0))
    _, errors = collect_megre_series(root, validate=False)
    assert str(path) in first(errors) and 'seconds' in first(errors)


def test_missing_field_strength_can_be_given_on_the_command_line(tmp_path):
    root = make_dataset(tmp_path)
    edit_sidecar(root, 'sub-01_echo-1_part-mag_MEGRE.json', lambda c: c.pop('MagneticFieldStrength'))
    _, errors = collect_megre_series(root, validate=False)
    assert 'MagneticFieldStrength' in first(errors) and '--field-strength' in first(errors)
    series, errors = collect_megre_series(root, validate=False, field_strength_override=7.0)
    assert not errors and series[0].field_strength_t == 7.0


def test_b0_dir_key_overrides_the_affine(tmp_path):
    root = make_dataset(tmp_path, extra={'B0_dir': [0, 1, 1]})
    series, _ = collect_megre_series(root, validate=False)
    assert series[0].b0_dir_source == 'sidecar key B0_dir'
    assert np.allclose(series[0].b0_dir, [0, 2 ** -0.5, 2 ** -0.5])


def test_a_sheared_affine_is_refused_and_an_oblique_one_kept(tmp_path):
    angle = np.deg2rad(18)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([2.0, 2.0, 2.0])
    series, errors = collect_megre_series(make_dataset(tmp_path / 'oblique', affine=oblique), validate=False)
    assert not errors and np.isclose(series[0].b0_dir[2], np.cos(angle))
    # Resampled to 1 x 1 x 3 mm by rescaling the diagonal only: the axes are no longer orthogonal.
    sheared = oblique.copy()
    sheared[[0, 1, 2], [0, 1, 2]] *= [0.5, 0.5, 1.5]
    _, errors = collect_megre_series(make_dataset(tmp_path / 'sheared', affine=sheared), validate=False)
    assert 'part-mag_MEGRE.nii.gz' in first(errors) and 'sheared' in first(errors)


def test_nan_in_an_image_is_named(tmp_path):
    values = np.random.default_rng(0).uniform(-np.pi, np.pi, (8, 8, 8)).astype(np.float32)
    values[0, 0, 0] = np.nan
    root = make_dataset(tmp_path, phase_values=values)
    _, errors = collect_megre_series(root, validate=False)
    assert 'part-phase_MEGRE.nii.gz' in first(errors) and 'NaN' in first(errors)


def test_radian_phase_outside_pi_is_refused(tmp_path):
    root = make_dataset(tmp_path, phase_values=np.full((8, 8, 8), 2000.0, np.float32))
    _, errors = collect_megre_series(root, validate=False)
    assert 'Units' in first(errors)


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(InputError, match='dataset_description.json'):
        collect_megre_series(tmp_path, validate=False)


def test_arbitrary_siemens_phase_is_scaled_from_its_known_range(tmp_path):
    values = np.array([-4096, -2048, 0, 2048, 4095], np.float32).reshape(5, 1, 1) * np.ones((5, 8, 8), np.float32)
    root = make_dataset(tmp_path, phase_units='arbitrary', phase_values=values, extra={'Manufacturer': 'Siemens'},
                        shape=(5, 8, 8))
    series, errors = collect_megre_series(root, validate=False)
    assert not errors
    load = LoadMEGRE(magnitude_files=series[0].magnitude_files, phase_files=series[0].phase_files,
                     phase_range=series[0].phase_range)
    load.base_dir = str(tmp_path)
    result = load.run(cwd=str(tmp_path))
    phase = nib.load(result.outputs.phase).get_fdata()[:, 0, 0, 0]
    assert np.allclose(phase, [-np.pi, -np.pi / 2, 0, np.pi / 2, np.pi * 4095 / 4096], atol=1e-5)


def test_arbitrary_phase_of_an_unknown_vendor_is_refused(tmp_path):
    root = make_dataset(tmp_path, phase_units='arbitrary', extra={'Manufacturer': 'Acme'})
    _, errors = collect_megre_series(root, validate=False)
    assert 'Manufacturer' in first(errors) and '"rad"' in first(errors)
