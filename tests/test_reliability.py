"""Bad and odd inputs through the real ``qsmprep`` command: each bad one stops with one message that
names the file and the key, writes no derivative for it and leaves the others running; each odd but
valid one gives a correct map; an interrupted run stops at once and resumes."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

from benchmarks.evaluate import evaluate_subject
from qsmprep.files import write_text_atomically


def copy_dataset(bids_dataset, destination, subjects=('01',)):
    """The 3 mm simulated dataset with only ``subjects`` (and its truth, for scoring)."""
    keep = {f'sub-{label}' for label in subjects}
    shutil.copytree(bids_dataset, destination,
                    ignore=lambda folder, names: [n for n in names if n.startswith('sub-') and n not in keep
                                                  and Path(folder, n).is_dir()])
    return destination


def megre_file(bids_dir, label, echo, part, extension='.nii.gz'):
    return bids_dir / f'sub-{label}' / 'anat' / f'sub-{label}_echo-{echo}_part-{part}_MEGRE{extension}'


def edit_sidecar(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def rewrite_image(path, change, dtype=None):
    image = nib.load(path)
    data = change(np.asanyarray(image.dataobj).astype(np.float64))
    nib.Nifti1Image(data.astype(dtype or np.float32), image.affine).to_filename(path)


def derivatives(output_dir):
    return sorted(Path(output_dir).rglob('*.nii*')) if Path(output_dir).exists() else []


def assert_refused(result, output_dir, *named):
    """Exit code 1, every text in ``named`` (the file, the key) in the message, no traceback, no map."""
    assert result.returncode == 1, result.stdout + result.stderr
    for text in named:
        assert str(text) in result.stderr, (text, result.stderr)
    assert 'Traceback' not in result.stderr
    assert not derivatives(output_dir)


@pytest.fixture
def dataset(bids_dataset, tmp_path):
    return copy_dataset(bids_dataset, tmp_path / 'bids')


# Crashes inside nodes, and per-participant isolation

def test_a_truncated_file_fails_its_participant_only(bids_dataset, tmp_path, run_qsmprep):
    bids_dir = copy_dataset(bids_dataset, tmp_path / 'bids', subjects=('01', '02'))
    truncated = megre_file(bids_dir, '02', 2, 'phase')
    truncated.write_bytes(truncated.read_bytes()[:2000])
    output_dir = tmp_path / 'out'
    result = run_qsmprep(bids_dir, output_dir, 'participant', '-w', tmp_path / 'work', '--nprocs', '2')
    assert result.returncode == 1
    assert str(truncated) in result.stderr and 'truncated' in result.stderr and 'Traceback' not in result.stderr
    assert 'failed, without derivatives: sub-02' in result.stderr and '1 of 2 series done' in result.stderr
    assert not (output_dir / 'sub-02').exists()
    assert evaluate_subject(output_dir, bids_dir, '01')['chi_nrmse'] < 70


def test_a_step_that_fails_prints_one_line_and_keeps_the_traceback_in_the_log(dataset, tmp_path, run_qsmprep):
    reference = nib.load(megre_file(dataset, '01', 1, 'mag'))
    mask = np.zeros(reference.shape, np.uint8)
    mask[tuple(n // 2 for n in reference.shape)] = 1  # background removal erodes it away
    mask_path = tmp_path / 'one voxel.nii.gz'
    nib.Nifti1Image(mask, reference.affine).to_filename(mask_path)
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work', '--mask', mask_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'sub-01: remove_background failed: ValueError' in result.stderr and 'no voxel of the mask' in result.stderr
    log = next((output_dir / 'logs').glob('*.log'))
    assert str(log) in result.stderr and 'Traceback' in log.read_text()
    assert not derivatives(output_dir)


# Silent wrong results

@pytest.mark.parametrize('key, value, expected', [
    ('EchoTime', '0.01', 'not a number'),
    ('EchoTime', 10.0, 'seconds'),
    ('MagneticFieldStrength', 3000, 'not a field in tesla'),
])
def test_implausible_metadata_is_refused(dataset, tmp_path, run_qsmprep, key, value, expected):
    sidecar = megre_file(dataset, '01', 1, 'mag', '.json')
    edit_sidecar(sidecar, lambda content: content.update({key: value}))
    output_dir = tmp_path / 'out'
    # qsmprep's own checks, behind the BIDS validator (which also refuses the string)
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work', '--skip-bids-validation')
    assert_refused(result, output_dir, sidecar, key, expected)


def test_the_bids_validator_names_the_file_and_key(dataset, tmp_path, run_qsmprep):
    sidecar = megre_file(dataset, '01', 2, 'mag', '.json')
    edit_sidecar(sidecar, lambda content: content.update(EchoTime='0.01'))
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    assert_refused(result, output_dir, sidecar, 'BIDS validator', 'EchoTime', '--skip-bids-validation')


def test_echo_spacing_shorter_than_a_readout_is_refused(dataset, tmp_path, run_qsmprep):
    first = json.loads(megre_file(dataset, '01', 1, 'mag', '.json').read_text())['EchoTime']
    for part in ('mag', 'phase'):
        edit_sidecar(megre_file(dataset, '01', 2, part, '.json'), lambda c: c.update(EchoTime=first + 1e-5))
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    assert_refused(result, output_dir, megre_file(dataset, '01', 2, 'mag', '.json'), 'EchoTime', 'readout')


def test_field_strength_in_the_wrong_unit_on_the_command_line(dataset, tmp_path, run_qsmprep):
    result = run_qsmprep(dataset, tmp_path / 'out', 'participant', '--field-strength', '3000')
    assert result.returncode == 2 and '--field-strength' in result.stderr and 'tesla' in result.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('change, expected', [
    (lambda phase: np.zeros_like(phase), 'blank'),
    (lambda phase: phase / np.pi, 'divided by pi'),
])
def test_phase_in_other_units_is_refused(dataset, tmp_path, run_qsmprep, change, expected):
    for path in (dataset / 'sub-01' / 'anat').glob('*_part-phase_MEGRE.nii.gz'):
        rewrite_image(path, change)
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    assert_refused(result, output_dir, 'part-phase_MEGRE.nii.gz', expected)


# Files that are not what they claim

def test_a_zero_byte_file_is_named(dataset, tmp_path, run_qsmprep):
    empty = megre_file(dataset, '01', 3, 'mag')
    empty.write_bytes(b'')
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work', '--skip-bids-validation')
    assert_refused(result, output_dir, empty, 'empty (0 bytes)')


def test_a_dangling_symlink_is_named(dataset, tmp_path, run_qsmprep):
    link = megre_file(dataset, '01', 3, 'mag')
    link.unlink()
    link.symlink_to(tmp_path / 'annex' / 'gone.nii.gz')
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work', '--skip-bids-validation')
    assert_refused(result, output_dir, link, 'does not exist')


def test_a_header_declaring_an_absurd_size_is_refused_before_reading(dataset, tmp_path, run_qsmprep):
    path = megre_file(dataset, '01', 2, 'mag')
    header = nib.load(path).header.copy()
    header.set_data_shape((30000, 30000, 30000))
    with gzip.open(path, 'wb') as handle:  # the header and a few bytes: a reader would allocate 100 TB
        handle.write(header.binaryblock + b'\0' * (int(header['vox_offset']) - 348 + 64))
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work', '--skip-bids-validation')
    assert_refused(result, output_dir, path, '30000 x 30000 x 30000', 'header')


def test_a_blank_magnitude_is_named(dataset, tmp_path, run_qsmprep):
    path = megre_file(dataset, '01', 1, 'mag')
    rewrite_image(path, np.zeros_like)
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    assert_refused(result, output_dir, path, 'magnitude is blank')


def test_a_4d_file_of_all_echoes_is_explained(dataset, tmp_path, run_qsmprep):
    anat = dataset / 'sub-01' / 'anat'
    for part in ('mag', 'phase'):
        echoes = sorted(anat.glob(f'*_echo-*_part-{part}_MEGRE.nii.gz'))
        stacked = np.stack([np.asanyarray(nib.load(path).dataobj) for path in echoes], axis=-1)
        nib.Nifti1Image(stacked, nib.load(echoes[0]).affine).to_filename(anat / f'sub-01_part-{part}_MEGRE.nii.gz')
        for path in echoes:
            path.unlink()
            Path(str(path).replace('.nii.gz', '.json')).unlink()
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work', '--skip-bids-validation')
    assert_refused(result, output_dir, anat / 'sub-01_part-mag_MEGRE.nii.gz', 'not used', '4-D', 'echo-<i>')


def test_a_single_echo_is_refused_with_the_reason(dataset, tmp_path, run_qsmprep):
    for path in (dataset / 'sub-01' / 'anat').glob('*_echo-*'):
        if '_echo-1_' not in path.name:
            path.unlink()
    output_dir = tmp_path / 'out'
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    assert_refused(result, output_dir, megre_file(dataset, '01', 1, 'mag'), 'one echo', 'phase offset')


def test_an_unknown_participant_lists_those_that_exist(bids_dataset, tmp_path, run_qsmprep):
    result = run_qsmprep(bids_dataset, tmp_path / 'out', 'participant', '--participant-label', '99')
    assert_refused(result, tmp_path / 'out', '99', 'participants with MEGRE data are 01, 02')


# Data loss

def test_another_pipelines_derivatives_are_not_touched(dataset, tmp_path, run_qsmprep):
    output_dir = tmp_path / 'fmriprep'
    output_dir.mkdir()
    description = output_dir / 'dataset_description.json'
    description.write_text(json.dumps({'Name': 'x', 'DatasetType': 'derivative',
                                       'GeneratedBy': [{'Name': 'fMRIPrep'}]}))
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    assert_refused(result, output_dir, description, 'fMRIPrep')
    assert 'fMRIPrep' in description.read_text() and sorted(output_dir.iterdir()) == [description]


@pytest.mark.parametrize('where', ['output is input', 'output holds input', 'work inside input', 'foreign files'])
def test_folders_that_would_mix_data_are_refused(dataset, tmp_path, run_qsmprep, where):
    output_dir, work_dir = tmp_path / 'out', tmp_path / 'work'
    if where == 'output is input':
        output_dir = dataset
    elif where == 'output holds input':
        output_dir = dataset.parent
    elif where == 'work inside input':
        work_dir = dataset / 'derivatives' / 'work'
    else:
        output_dir.mkdir()
        (output_dir / 'notes.txt').write_text('mine')
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', work_dir)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert ('work folder' if where == 'work inside input' else 'output folder') in result.stderr
    assert not (dataset / 'derivatives' / 'work').exists() and not derivatives(tmp_path / 'out')


def test_an_output_folder_that_cannot_be_written_fails_before_any_computing(dataset, tmp_path, run_qsmprep):
    blocker = tmp_path / 'a file'
    blocker.write_text('')
    result = run_qsmprep(dataset, blocker / 'out', 'participant', '-w', tmp_path / 'work')
    assert result.returncode == 1 and str(blocker / 'out') in result.stderr and 'cannot be written' in result.stderr
    assert not (tmp_path / 'work').exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_output_folder_fails_before_any_computing(dataset, tmp_path, run_qsmprep):
    output_dir = tmp_path / 'out'
    output_dir.mkdir()
    output_dir.chmod(0o555)
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', tmp_path / 'work')
    output_dir.chmod(0o755)
    assert result.returncode == 1 and 'cannot be written' in result.stderr


def test_a_rerun_with_other_options_removes_stale_maps_and_keeps_each_log(dataset, tmp_path, run_qsmprep):
    output_dir, work_dir = tmp_path / 'out', tmp_path / 'work'
    assert run_qsmprep(dataset, output_dir, 'participant', '-w', work_dir).returncode == 0
    anat = output_dir / 'sub-01' / 'anat'
    assert (anat / 'sub-01_desc-paramagnetic_Chimap.nii.gz').exists()
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', work_dir, '--no-chi-separation')
    assert result.returncode == 0, result.stderr
    assert not list(anat.glob('*desc-*magnetic_Chimap*')) and (anat / 'sub-01_Chimap.nii.gz').exists()
    assert len(list((output_dir / 'logs').glob('*.toml'))) == 2 and len(list((output_dir / 'logs').glob('*.log'))) == 2
    assert not list(output_dir.rglob('.qsmprep-tmp-*'))


def test_a_full_disk_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'dataset_description.json'
    path.write_text('{"Name": "before"}')

    def disk_full(descriptor):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError):
        write_text_atomically(path, '{"Name": "after"}')
    assert path.read_text() == '{"Name": "before"}' and [p.name for p in tmp_path.iterdir()] == [path.name]


# Interruption

def _start(bids_dir, output_dir, work_dir):
    executable = str(Path(sys.executable).with_name('qsmprep'))
    return subprocess.Popen([executable, str(bids_dir), str(output_dir), 'participant', '-w', str(work_dir),
                             '--nprocs', '2'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_workers(process, timeout_s=60):
    """The worker processes, once the run has some and a step is running."""
    started = time.time()
    while time.time() - started < timeout_s:
        workers = psutil.Process(process.pid).children(recursive=True)
        if len(workers) >= 2:
            time.sleep(0.5)
            return psutil.Process(process.pid).children(recursive=True)
        time.sleep(0.1)
    raise AssertionError('the run started no worker processes')


def _alive(process):
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize('signal_number, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_stops_at_once_and_resumes(dataset, tmp_path, run_qsmprep, signal_number, code):
    output_dir, work_dir = tmp_path / 'out', tmp_path / 'work'
    process = _start(dataset, output_dir, work_dir)
    workers = _wait_for_workers(process)
    stopped = time.time()
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code and time.time() - stopped < 10, stderr
    assert 'stopped by' in stderr and 'Traceback' not in stderr
    assert not any(_alive(worker) for worker in workers)
    assert not derivatives(output_dir) and not list(output_dir.rglob('.qsmprep-tmp-*'))
    result = run_qsmprep(dataset, output_dir, 'participant', '-w', work_dir)
    assert result.returncode == 0, result.stderr
    assert evaluate_subject(output_dir, dataset, '01')['chi_nrmse'] < 70


# Valid odd inputs

def test_odd_but_valid_inputs_give_correct_maps(bids_dataset, tmp_path, run_qsmprep):
    """LPI storage with phase in [0, 2 pi), and Siemens phase as raw integers 0..4095 on an oblique
    head, in a folder with a space and non-ASCII characters."""
    bids_dir = copy_dataset(bids_dataset, tmp_path / 'données brutes' / 'bids', subjects=('01', '02'))
    for path in bids_dir.rglob('sub-01_*.nii.gz'):  # the truth too
        image = nib.load(path)
        reverse_first_axis = np.diag([-1.0, 1.0, 1.0, 1.0])
        reverse_first_axis[0, 3] = image.shape[0] - 1
        data = np.asanyarray(image.dataobj)[::-1]
        if 'part-phase' in path.name:
            data = np.mod(data, 2 * np.pi)
        nib.Nifti1Image(data, image.affine @ reverse_first_axis).to_filename(path)
    for path in (bids_dir / 'sub-02' / 'anat').glob('*_part-phase_MEGRE.nii.gz'):
        rewrite_image(path, lambda phase: np.round((phase + np.pi) / (2 * np.pi) * 4096) % 4096, np.uint16)
        edit_sidecar(Path(str(path).replace('.nii.gz', '.json')),
                     lambda content: content.update(Units='arbitrary', Manufacturer='Siemens'))
    output_dir = tmp_path / 'sortie à part'
    result = run_qsmprep(bids_dir, output_dir, 'participant', '-w', tmp_path / 'travail', '--nprocs', '2')
    assert result.returncode == 0, result.stderr
    for label in ('01', '02'):
        assert evaluate_subject(output_dir, bids_dir, label)['chi_nrmse'] < 70, label


def test_the_derivatives_pass_the_bids_validator(bids_dataset, tmp_path, run_qsmprep):
    output_dir = tmp_path / 'out'
    result = run_qsmprep(copy_dataset(bids_dataset, tmp_path / 'bids'), output_dir, 'participant',
                         '-w', tmp_path / 'work')
    assert result.returncode == 0, result.stderr
    validator = Path(sys.executable).with_name('bids-validator-deno')
    report = subprocess.run([str(validator), str(output_dir), '--format', 'json'], capture_output=True, text=True)
    errors = [issue for issue in json.loads(report.stdout)['issues']['issues'] if issue['severity'] == 'error']
    assert not errors, errors
