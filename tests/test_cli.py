"""The real ``qsmprep`` command line on a small simulated BIDS dataset."""
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from benchmarks.evaluate import evaluate_subject
from qsmprep.cli.progress import StageProgress
from qsmprep.files import stage_progress_writer

SPEC = json.loads((Path(__file__).resolve().parents[1] / 'bids_spec' / 'derivatives.json').read_text())


@pytest.fixture(scope='module')
def participant_run(bids_dataset, tmp_path_factory, run_qsmprep):
    root = tmp_path_factory.mktemp('run')
    output_dir, work_dir = root / 'out', root / 'work'
    result = run_qsmprep(bids_dataset, output_dir, 'participant', '-w', work_dir, '--nprocs', '2')
    assert result.returncode == 0, result.stderr
    (root / 'stdout.txt').write_text(result.stdout)  # the run's terminal lines, for the progress test
    return output_dir, work_dir


def test_derivatives_follow_the_bids_spec(participant_run, bids_dataset):
    output_dir, _ = participant_run
    description = json.loads((output_dir / 'dataset_description.json').read_text())
    assert description['DatasetType'] == 'derivative'
    assert description['GeneratedBy'][0]['Name'] == 'qsmprep' and description['GeneratedBy'][0]['Version']
    for label in ('01', '02'):
        source = nib.load(bids_dataset / f'sub-{label}' / 'anat' / f'sub-{label}_echo-1_part-mag_MEGRE.nii.gz')
        for spec in SPEC['outputs'].values():
            name = spec['pattern'].split('<entities>')[1]
            image_path = output_dir / f'sub-{label}' / 'anat' / f'sub-{label}{name}'
            image = nib.load(image_path)
            assert image.shape == source.shape and np.allclose(image.affine, source.affine)
            sidecar = json.loads(Path(str(image_path).replace('.nii.gz', '.json')).read_text())
            assert sidecar['Units'] == spec['Units']
            missing = set(SPEC['common_sidecar_keys'] + spec['sidecar_keys']) - set(sidecar)
            assert not missing, f'{image_path.name} lacks {missing}'
            assert sidecar['Sources'][0].startswith('bids:raw:sub-')


@pytest.mark.parametrize('label', ['01', '02'])
def test_chimap_matches_the_simulated_truth(participant_run, bids_dataset, label):
    """Subject 02 is tilted by 18 degrees: its B0 direction is known only from the affine."""
    output_dir, _ = participant_run
    scores = evaluate_subject(output_dir, bids_dataset, label)
    assert scores['brain_mask_coverage'] > 0.99
    # At 3 mm, background removal's erosion by one voxel alone takes a fifth of the brain.
    assert scores['mask_coverage'] > 0.75
    assert scores['chi_nrmse'] < 70
    sidecar = json.loads((output_dir / f'sub-{label}' / 'anat' / f'sub-{label}_Chimap.json').read_text())
    assert sidecar['B0DirectionSource'] == 'image affine'
    assert sidecar['RegularizationWeight'] > 0  # chosen for this series by the GCV rule
    assert np.isclose(sidecar['B0Direction'][2], np.cos(np.deg2rad(18 if label == '02' else 0)), atol=1e-4)


def test_chi_separation_is_consistent_with_the_chimap(participant_run):
    output_dir, _ = participant_run
    anat = output_dir / 'sub-01' / 'anat'

    def image(name):
        return np.asanyarray(nib.load(anat / f'sub-01_{name}.nii.gz').dataobj)

    mask = image('desc-localfield_mask') > 0
    paramagnetic, diamagnetic = image('desc-paramagnetic_Chimap'), image('desc-diamagnetic_Chimap')
    assert paramagnetic.min() >= 0 and diamagnetic.min() >= 0
    difference = (paramagnetic - diamagnetic)[mask]
    assert np.corrcoef(difference, image('Chimap')[mask])[0, 1] > 0.8
    sidecar = json.loads((anat / 'sub-01_desc-paramagnetic_Chimap.json').read_text())
    assert sidecar['RelaxometricConstant'] == 114.0 and 'R2PrimeAssumption' in sidecar


def test_rerun_with_the_same_work_dir_resumes(participant_run, bids_dataset, run_qsmprep):
    output_dir, work_dir = participant_run
    results = sorted(work_dir.glob('qsmprep_wf/sub_01_wf/series_sub_01_wf/inversion_wf/invert/result_invert.pklz'))
    assert results
    before = results[0].stat().st_mtime
    result = run_qsmprep(bids_dataset, output_dir, 'participant', '-w', work_dir, '--participant-label', 'sub-01')
    assert result.returncode == 0, result.stderr
    assert results[0].stat().st_mtime == before  # the inversion was not run again


def test_workflows_go_by_level_subject_series_stage(participant_run):
    _, work_dir = participant_run
    series_wf = work_dir / 'qsmprep_wf' / 'sub_01_wf' / 'series_sub_01_wf'
    stages = {'mask_wf': 'brain_mask', 'field_wf': 'fit_total_field', 'bgremove_wf': 'remove_background',
              'inversion_wf': 'invert', 'chisep_wf': 'separate_sources'}
    for stage, node in stages.items():
        assert (series_wf / stage / node / f'result_{node}.pklz').is_file(), stage


def test_progress_is_one_line_per_stage_without_nipype_chatter(participant_run):
    output_dir, _ = participant_run
    lines = (output_dir.parent / 'stdout.txt').read_text().splitlines()
    for stage in ('brain mask', 'phase unwrapping', 'background field removal', 'dipole inversion'):
        for label in ('01', '02'):
            assert sum(f'] sub-{label}: {stage} done in ' in line for line in lines) == 1, (stage, label)
    assert not any('nipype' in line or ' stages |' in line for line in lines)  # no bar when not a terminal
    assert lines[-1].startswith('qsmprep: 2 of 2 series done')


def test_on_a_terminal_a_bar_counts_the_stages_and_names_the_running_ones(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    now, stream = [0.0], Terminal()
    progress = StageProgress([], stream=stream, clock=lambda: now[0], total=3)
    mask = SimpleNamespace(name='brain_mask', fullname='series_a_wf.brain_mask')
    invert = SimpleNamespace(name='invert', fullname='series_a_wf.inversion_wf.invert', output_dir=lambda: tmp_path)
    progress(mask, 'start')
    now[0] = 5.0
    progress(invert, 'start')
    iterations = stage_progress_writer(tmp_path)  # as the inversion's worker process does
    iterations(40, 300)
    iterations(41, 300)  # within a second of the last: not written
    now[0] = 47.0
    assert progress.running() == 'run brain mask 47 s, run dipole inversion 42 s (iteration 40/300)'
    progress(mask, 'end')
    iterations(300, 300)  # the last is always written
    assert progress.running() == 'run dipole inversion 42 s (iteration 300/300)'
    progress.close()
    text = stream.getvalue()
    assert '] run: brain mask done in 47.0 s' in text
    assert '1/3 stages' in text and 'dipole inversion 42 s' in text


def test_report_shows_the_maps_metrics_methods_and_software(participant_run):
    output_dir, _ = participant_run
    report = (output_dir / 'sub-01.html').read_text()
    for heading in ('Summary', 'Brain mask and local-field mask', 'Susceptibility (Chimap)', 'chi+', 'R2*',
                    'Total field, local field and field noise', 'Methods', 'Warnings and errors', 'Software'):
        assert heading in report, heading
    figures = sorted((output_dir / 'sub-01' / 'figures').glob('*.png'))
    assert [f.name.split('desc-')[1] for f in figures] == [f'{name}_MEGRE.png' for name in
                                                          ('chimap', 'chisep', 'fields', 'masks', 'r2star')]
    for figure in figures:
        assert f'src="./sub-01/figures/{figure.name}"' in report
    # Self-contained: nothing is fetched from the network.
    assert 'src="http' not in report and 'href="http' not in report
    # The methods that ran, with their references; the numbers of the summary.
    assert 'Dymerska' in report and 'Wu B' in report and 'Milovic' in report and 'Shin HG' in report
    assert 'Brain mask volume (mL)' in report and 'Inversion weight' in report
    assert '>qsmprep<' in report and '>nireports<' in report
    assert 'sub-*/figures\n' in (output_dir / '.bidsignore').read_text()


def test_report_opens_in_a_browser_with_every_image(participant_run, tmp_path):
    from benchmarks import browser

    if browser.chromium_paths() is None:
        if os.environ.get('CI'):
            pytest.fail('CI must install chromium and chromium-driver (.ci/run does)')
        pytest.skip('no chromium and chromedriver here; `apt-get install chromium chromium-driver`')
    output_dir, _ = participant_run
    page = browser.open_page(output_dir / 'sub-02.html', screenshot=tmp_path / 'report.png')
    assert page['title'] == 'qsmprep report of sub-02'
    assert len(page['images']) == 5
    for loaded, width, height, source in page['images']:
        assert loaded and width > 100 and height > 100, source
    assert not [entry for entry in page['console'] if entry['level'] == 'SEVERE']
    assert (tmp_path / 'report.png').stat().st_size > 50_000


def test_missing_echo_time_stops_with_a_message_and_writes_no_map(bids_dataset, tmp_path, run_qsmprep):
    broken = tmp_path / 'bids'
    shutil.copytree(bids_dataset, broken)
    sidecar = broken / 'sub-01' / 'anat' / 'sub-01_echo-3_part-phase_MEGRE.json'
    content = json.loads(sidecar.read_text())
    del content['EchoTime']
    sidecar.write_text(json.dumps(content))
    output_dir = tmp_path / 'out'
    result = run_qsmprep(broken, output_dir, 'participant', '-w', tmp_path / 'work', '--participant-label', '01')
    assert result.returncode != 0
    assert str(sidecar) in result.stderr and 'EchoTime' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not list(output_dir.rglob('*.nii*'))


def test_not_a_bids_folder_is_one_clear_message(tmp_path, run_qsmprep):
    (tmp_path / 'data').mkdir()
    result = run_qsmprep(tmp_path / 'data', tmp_path / 'out', 'participant')
    assert result.returncode == 1
    assert 'dataset_description.json' in result.stderr and 'Traceback' not in result.stderr


def test_unknown_participant_is_named(bids_dataset, tmp_path, run_qsmprep):
    result = run_qsmprep(bids_dataset, tmp_path / 'out', 'participant', '--participant-label', '99')
    assert result.returncode == 1 and '99' in result.stderr and 'Traceback' not in result.stderr


def test_group_level_needs_a_qsmprep_output_folder(bids_dataset, tmp_path, run_qsmprep):
    result = run_qsmprep(bids_dataset, tmp_path / 'out', 'group')
    assert result.returncode == 1 and 'not a qsmprep output folder' in result.stderr


def test_version(run_qsmprep):
    result = run_qsmprep('--version')
    assert result.returncode == 0 and result.stdout.startswith('qsmprep ')


def test_a_user_mask_on_another_grid_is_refused_before_anything_runs(bids_dataset, tmp_path, run_qsmprep):
    mask = tmp_path / 'mask.nii.gz'
    nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)).to_filename(mask)
    output_dir = tmp_path / 'out'
    result = run_qsmprep(bids_dataset, output_dir, 'participant', '--participant-label', '01', '--mask', mask)
    assert result.returncode == 1 and str(mask) in result.stderr and 'grid' in result.stderr
    assert not output_dir.exists()


def test_phase_stored_with_the_opposite_sign_needs_phase_sign(bids_dataset, tmp_path, run_qsmprep):
    flipped = tmp_path / 'bids'
    shutil.copytree(bids_dataset, flipped, ignore=shutil.ignore_patterns('sub-02'))
    for path in flipped.glob('sub-01/anat/*_part-phase_MEGRE.nii.gz'):
        image = nib.load(path)
        nib.Nifti1Image(-np.asanyarray(image.dataobj), image.affine, image.header).to_filename(path)
    output_dir = tmp_path / 'out'
    result = run_qsmprep(flipped, output_dir, 'participant', '-w', tmp_path / 'work', '--phase-sign', '-1')
    assert result.returncode == 0, result.stderr
    assert evaluate_subject(output_dir, flipped, '01')['chi_nrmse'] < 70
    sidecar = json.loads((output_dir / 'sub-01' / 'anat' / 'sub-01_Chimap.json').read_text())
    assert sidecar['PhaseSign'] == -1


def test_lpcnn_inversion_reruns_only_what_follows_the_local_field(participant_run, bids_dataset, run_qsmprep,
                                                                   tmp_path):
    pytest.importorskip('torch')
    _, work_dir = participant_run
    lpcnn_work_dir, output_dir = tmp_path / 'work', tmp_path / 'out'
    shutil.copytree(work_dir, lpcnn_work_dir)
    result = run_qsmprep(bids_dataset, output_dir, 'participant', '-w', lpcnn_work_dir, '--participant-label', '01',
                         '--inversion', 'lpcnn', '--nprocs', '2')
    assert result.returncode == 0, result.stderr
    # The 3 mm test data lie outside the shipped model's training range: the user is told.
    assert 'outside the 0.6-1.5 mm' in result.stderr
    series_wf = lpcnn_work_dir / 'qsmprep_wf' / 'sub_01_wf' / 'series_sub_01_wf'
    background = series_wf / 'bgremove_wf' / 'remove_background' / 'result_remove_background.pklz'
    assert background.stat().st_mtime == (work_dir / background.relative_to(lpcnn_work_dir)).stat().st_mtime
    sidecar = json.loads((output_dir / 'sub-01' / 'anat' / 'sub-01_Chimap.json').read_text())
    assert sidecar['Model'] == 'LP-CNN' and len(sidecar['ModelSha256']) == 64
    assert evaluate_subject(output_dir, bids_dataset, '01')['chi_nrmse'] < 80
