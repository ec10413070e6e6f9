"""The group level on three simulated participants of different head sizes and tilts, with a
TemplateFlow cache built from nilearn's MNI template and an atlas of the phantom's nuclei."""
import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from benchmarks.simulate_bids import (COHORT_HEADS, NUCLEI, TEST_ATLAS, TEST_TEMPLATE, nucleus_names,
                                      simulate_cohort, tilted_affine, write_templateflow_home)
from qsmprep import group
from qsmprep.files import read_itk_transform
from qsmprep.science import normalization

HEADS = COHORT_HEADS
# Nuclei of at least 60 voxels at 2 mm; the red nucleus, substantia nigra and dentate (10 to 40
# voxels) are mostly edge, where a voxel more or less moves the mean by tens of ppb, and TV
# underestimates the globus pallidus' 0.15 ppm by 0.01 to 0.02 ppm even where the atlas is exact.
LARGE_NUCLEI = ('caudate', 'putamen', 'thalamus')


def true_matrix(head):
    """The template-to-subject world matrix the simulation applied: stretch, then tilt."""
    return tilted_affine(np.diag(list(head.get('scale', (1.0, 1.0, 1.0))) + [1.0]), head.get('tilt', 0.0))


@pytest.fixture(scope='module')
def group_run(tmp_path_factory, run_qsmprep):
    root = tmp_path_factory.mktemp('group')
    bids_dir, output_dir = root / 'bids', root / 'out'
    simulate_cohort(bids_dir, 2.0, HEADS)
    write_templateflow_home(root / 'templateflow')
    result = run_qsmprep(bids_dir, output_dir, 'participant', '-w', root / 'work', '--nprocs', '2',
                         '--no-chi-separation')
    assert result.returncode == 0, result.stderr
    previous = os.environ.get('TEMPLATEFLOW_HOME')
    os.environ['TEMPLATEFLOW_HOME'] = str(root / 'templateflow')
    try:
        result = run_qsmprep(bids_dir, output_dir, 'group', '--template', TEST_TEMPLATE, '--atlas', TEST_ATLAS,
                             '--nprocs', '2')
    finally:
        if previous is None:
            del os.environ['TEMPLATEFLOW_HOME']
        else:
            os.environ['TEMPLATEFLOW_HOME'] = previous
    assert result.returncode == 0, result.stderr
    return root


def _rows(root):
    with open(root / 'out' / 'group' / 'desc-regions_stats.tsv', newline='') as stream:
        return list(csv.DictReader(stream, delimiter='\t'))


def test_the_atlas_lands_within_a_voxel_of_where_the_simulation_put_it(group_run):
    points = np.array([[13, 12, 10, 1], [-25, 2, 0, 1], [11, -18, 6, 1], [-5, -20, -8, 1], [14, -56, -34, 1]]).T
    for label, head in enumerate(HEADS, start=1):
        found = read_itk_transform(group_run / 'out' / 'group' / 'transforms' /
                                   f'sub-{label:02d}_from-MEGRE_to-{TEST_TEMPLATE}_mode-image_xfm.txt')
        errors = np.linalg.norm((found @ points - true_matrix(head) @ points)[:3], axis=0)
        assert errors.max() < 1.5, (label, errors)


def test_deep_grey_matter_means_agree_with_the_truth(group_run):
    """The truth of a region: the simulated susceptibility over the atlas placed by the simulation's
    own transform, referenced as the Chimap is (its mean over the local-field mask)."""
    rows = _rows(group_run)
    assert len(rows) == len(HEADS) * 2 * len(NUCLEI)
    atlas_path = (group_run / 'templateflow' / f'tpl-{TEST_TEMPLATE}' /
                  f'tpl-{TEST_TEMPLATE}_res-01_atlas-{TEST_ATLAS}_dseg.nii.gz')
    atlas = nib.load(atlas_path)
    errors = {}
    for label, head in enumerate(HEADS, start=1):
        subject = f'sub-{label:02d}'
        truth_image = nib.load(group_run / 'bids' / 'derivatives' / 'truth' / subject / 'anat' /
                               f'{subject}_Chimap.nii.gz')
        mask = nib.load(group_run / 'out' / subject / 'anat' / f'{subject}_desc-localfield_mask.nii.gz').get_fdata() > 0
        truth = truth_image.get_fdata() - truth_image.get_fdata()[mask].mean()
        labels = normalization.labels_in_native(atlas.get_fdata(), atlas.affine, true_matrix(head),
                                                truth_image.affine, truth.shape)
        expected = {row['region']: row['chi_mean'] for row in
                    normalization.region_statistics(labels, nucleus_names(), {'chi': truth}, mask)}
        for row in rows:
            if row['participant_id'] == subject:
                errors[subject, row['region']] = float(row['chi_mean']) - expected[row['region']]
    large = {key: error for key, error in errors.items() if key[1].rsplit('_', 1)[0] in LARGE_NUCLEI}
    assert max(abs(error) for error in large.values()) < 0.02, large
    assert max(abs(error) for error in errors.values()) < 0.06, errors
    assert abs(np.median(list(errors.values()))) < 0.01


def test_table_has_its_dictionary_and_the_page_its_plots(group_run):
    folder = group_run / 'out' / 'group'
    rows = _rows(group_run)
    dictionary = json.loads((folder / 'desc-regions_stats.json').read_text())
    assert set(dictionary) == set(rows[0]) and dictionary['chi_mean']['Units'] == 'ppm'
    assert dictionary['region']['Levels']['1'] == 'caudate_right'
    assert all(int(row['voxels']) > 0 for row in rows)
    page = (folder / 'regions.html').read_text()
    for figure in ('regions_chi.png', 'regions_r2star.png'):
        assert f'src="figures/{figure}"' in page and (folder / 'figures' / figure).stat().st_size > 10_000


def test_outliers_are_flagged_from_five_series_on():
    def rows(values):
        return [{'region': 'r', 'series': f's{index}', 'chi_mean': value} for index, value in enumerate(values)]

    flagged = group.flag_outliers(rows([0.05, 0.052, 0.049, 0.051, 0.05, 0.12]))
    assert [row['chi_mean_outlier'] for row in flagged] == [False] * 5 + [True]
    assert not any(row['chi_mean_outlier'] for row in group.flag_outliers(rows([0.05, 0.051, 0.12])))


def test_a_missing_atlas_names_templateflow_home(group_run, run_qsmprep):
    os.environ['TEMPLATEFLOW_HOME'] = str(group_run / 'templateflow')
    try:
        result = run_qsmprep(group_run / 'bids', group_run / 'out', 'group', '--template', TEST_TEMPLATE,
                             '--atlas', 'NoSuchAtlas')
    finally:
        del os.environ['TEMPLATEFLOW_HOME']
    assert result.returncode == 1
    assert 'TEMPLATEFLOW_HOME' in result.stderr and 'NoSuchAtlas' in result.stderr
    assert 'Traceback' not in result.stderr
