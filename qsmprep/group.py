"""The group level: regional susceptibility and R2* of every participant, in a template's atlas.

For every series with a Chimap in the output folder, its first-echo magnitude (the sidecar's
first source) is registered to the template's T1-weighted image (``science.normalization``), the
template's atlas is brought back onto the series' grid, and the mean and median of the Chimap and
the R2* map over each region inside the local-field mask are written to
``output_dir/group/desc-regions_stats.tsv`` with its data dictionary (``.json``), beside a page of
plots (``regions.html``). The transforms are kept in ``group/transforms/`` and reused while they are
newer than the maps they were made from.

Templates come from TemplateFlow's cache (``TEMPLATEFLOW_HOME``), which the container build fills:
nothing is downloaded here, and a missing file stops the run with a message that names it.
"""
import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .files import read_itk_transform, write_itk_transform, write_text_atomically
from .science import normalization

DEFAULT_TEMPLATE = 'MNI152NLin2009cAsym'
# Multi-contrast Anatomical Subcortical Structures Parcellation (Bazin et al. 2020): deep grey
# matter nuclei drawn on 7 T quantitative maps, QSM among them.
DEFAULT_ATLAS = 'MASSP20'
TEMPLATE_RESOLUTION = 2  # mm of the template image that the magnitude is registered to
OUTLIER_Z = 3.5  # robust z-score (median and MAD across the series) above which a value is flagged
# With fewer series the MAD is one or two distances: the farthest of three values scored above 3.5
# in most regions of three simulated heads.
OUTLIER_MIN_SERIES = 5
COLUMNS = {
    'participant_id': ('participant', None),
    'session_id': ('session, n/a without one', None),
    'series': ('the BIDS prefix of the series (subject, session, acquisition, run)', None),
    'region': ('atlas region', None),
    'voxels': ('voxels of the region inside the local-field mask, on the series grid', None),
    'chi_mean': ('mean magnetic susceptibility (Chimap, referenced to its mean over the local-field mask)', 'ppm'),
    'chi_median': ('median magnetic susceptibility', 'ppm'),
    'r2star_mean': ('mean R2*', '1/s'),
    'r2star_median': ('median R2*', '1/s'),
    'chi_mean_outlier': (f'chi_mean is more than {OUTLIER_Z} robust standard deviations (1.4826 MAD) from the '
                         f'median of the region across series (needs {OUTLIER_MIN_SERIES} series)', None),
}


class GroupError(Exception):
    """A problem with the group level's input, said in one line."""


@dataclass(frozen=True)
class TemplateFiles:
    name: str
    t1w: Path
    brain_mask: Path
    atlas: Path
    atlas_labels: Path


def _cached_file(template, description, **entities):
    """The one non-empty file of ``template`` matching ``entities`` in TemplateFlow's cache."""
    from templateflow import api

    found = [Path(path) for path in (api.ls(template, **entities) or [])]
    present = [path for path in found if path.is_file() and path.stat().st_size > 0]
    if not present:
        query = ', '.join(f'{key}={value!r}' for key, value in entities.items())
        raise GroupError(f'the {description} of template {template} ({query}) is not in TEMPLATEFLOW_HOME='
                         f'{os.environ.get("TEMPLATEFLOW_HOME", "~/.cache/templateflow")}; qsmprep downloads '
                         f'nothing: fill it where the network is, e.g. python -c "from templateflow import api; '
                         f'api.get(\'{template}\', {query})", and point TEMPLATEFLOW_HOME there.')
    return sorted(present)[0]


def _queries(atlas):
    """(description, TemplateFlow entities) of each file the group level reads."""
    image = {'resolution': TEMPLATE_RESOLUTION, 'extension': '.nii.gz'}
    return {'t1w': ('T1-weighted image', {**image, 'desc': None, 'suffix': 'T1w'}),
            'brain_mask': ('brain mask', {**image, 'desc': 'brain', 'suffix': 'mask'}),
            'atlas': (f'atlas {atlas}', {'atlas': atlas, 'suffix': 'dseg', 'extension': '.nii.gz'}),
            'atlas_labels': (f'label table of atlas {atlas}', {'atlas': atlas, 'suffix': 'dseg', 'extension': '.tsv'})}


def fetch_templates(template=DEFAULT_TEMPLATE, atlas=DEFAULT_ATLAS):
    """Download into TEMPLATEFLOW_HOME what the group level reads: for container builds, where the
    network is; qsmprep itself never calls this."""
    from templateflow import api

    for _, entities in _queries(atlas).values():
        api.get(template, **entities)


def template_files(template, atlas):
    """The T1w image and brain mask of ``template`` at ``TEMPLATE_RESOLUTION`` mm and its ``atlas``
    (any resolution: ``normalization.labels_in_native`` brings it to each series) with its label table."""
    return TemplateFiles(name=template, **{key: _cached_file(template, description, **entities)
                                           for key, (description, entities) in _queries(atlas).items()})


def atlas_names(path):
    """Label -> name from a TemplateFlow label table (tab-separated: an index column and a name)."""
    with open(path, newline='') as stream:
        rows = list(csv.DictReader(stream, delimiter='\t'))
    if not rows:
        raise GroupError(f'{path}: the atlas label table is empty')
    keys = list(rows[0])
    index_key = 'index' if 'index' in keys else keys[0]
    name_key = next((key for key in ('name', 'label', 'abbreviation') if key in keys), keys[-1])
    return {int(row[index_key]): row[name_key] for row in rows if int(row[index_key]) != 0}


@dataclass(frozen=True)
class SeriesMaps:
    participant: str
    session: str
    prefix: str
    chimap: Path
    r2starmap: Path
    localfield_mask: Path
    brain_mask: Path
    magnitude: Path


def find_series(output_dir, bids_dir, participant_labels=None, session_labels=None):
    """Every series with a Chimap (not a combination of orientations) in ``output_dir``, selected by labels."""
    participants = {label.removeprefix('sub-') for label in participant_labels or ()}
    sessions = {label.removeprefix('ses-') for label in session_labels or ()}
    found = []
    for chimap in sorted(Path(output_dir).glob('sub-*/**/anat/*_Chimap.nii.gz')):
        prefix = chimap.name[:-len('_Chimap.nii.gz')]
        if '_desc-' in chimap.name:
            continue
        entities = dict(part.split('-', 1) for part in prefix.split('_'))
        if participants and entities['sub'] not in participants:
            continue
        if sessions and entities.get('ses') not in sessions:
            continue
        sidecar = json.loads(chimap.with_name(f'{prefix}_Chimap.json').read_text())
        source = sidecar['Sources'][0].removeprefix('bids:raw:')
        magnitude = Path(bids_dir) / source
        if not magnitude.exists():
            raise GroupError(f'{magnitude}: the first-echo magnitude of {chimap.name} (its sidecar\'s first Sources '
                             'entry) is not in the BIDS folder given; give the dataset that the participant level '
                             'ran on.')
        found.append(SeriesMaps(participant=f'sub-{entities["sub"]}',
                                session=f'ses-{entities["ses"]}' if 'ses' in entities else 'n/a', prefix=prefix,
                                chimap=chimap, r2starmap=chimap.with_name(f'{prefix}_R2starmap.nii.gz'),
                                localfield_mask=chimap.with_name(f'{prefix}_desc-localfield_mask.nii.gz'),
                                brain_mask=chimap.with_name(f'{prefix}_desc-brain_mask.nii.gz'), magnitude=magnitude))
    return found


def _data(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def series_statistics(series, template, transform_path):
    """The rows of one series: its template-to-native transform (reused from ``transform_path`` when
    newer than its inputs, else computed and written there), the atlas on its grid, the statistics."""
    magnitude, affine = _data(series.magnitude)
    if magnitude.ndim == 4:
        magnitude = magnitude[..., 0]
    brain_mask = _data(series.brain_mask)[0] > 0
    inputs_time = max(path.stat().st_mtime for path in (series.magnitude, series.brain_mask, series.chimap))
    if transform_path.exists() and transform_path.stat().st_mtime > inputs_time:
        matrix = read_itk_transform(transform_path)
    else:
        t1w, t1w_affine = _data(template.t1w)
        template_mask = _data(template.brain_mask)[0] > 0
        matrix = normalization.register_to_template(magnitude.astype(np.float32), affine, brain_mask,
                                                    t1w.astype(np.float32), t1w_affine, template_mask)
        transform_path.parent.mkdir(parents=True, exist_ok=True)
        write_itk_transform(matrix, transform_path)
    atlas, atlas_affine = _data(template.atlas)
    labels = normalization.labels_in_native(atlas, atlas_affine, matrix, affine, brain_mask.shape)
    maps = {'chi': _data(series.chimap)[0].astype(np.float32), 'r2star': _data(series.r2starmap)[0].astype(np.float32)}
    valid = _data(series.localfield_mask)[0] > 0
    rows = normalization.region_statistics(labels, atlas_names(template.atlas_labels), maps, valid)
    return [{'participant_id': series.participant, 'session_id': series.session, 'series': series.prefix, **row}
            for row in rows]


def flag_outliers(rows):
    """Set ``chi_mean_outlier`` on every row: the robust z-score of chi_mean within its region."""
    for region in {row['region'] for row in rows}:
        members = [row for row in rows if row['region'] == region and np.isfinite(row['chi_mean'])]
        values = np.array([row['chi_mean'] for row in members])
        median = np.median(values) if values.size else 0.0
        spread = 1.4826 * np.median(np.abs(values - median)) if values.size else 0.0
        for row in members:
            row['chi_mean_outlier'] = bool(len(members) >= OUTLIER_MIN_SERIES and spread > 0
                                           and abs(row['chi_mean'] - median) / spread > OUTLIER_Z)
    for row in rows:
        row.setdefault('chi_mean_outlier', False)
    return rows


def _cell(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return 'n/a' if not np.isfinite(value) else f'{value:.6g}'
    return str(value)


def write_table(rows, folder, template):
    """``desc-regions_stats.tsv`` and its JSON data dictionary in ``folder``."""
    lines = ['\t'.join(COLUMNS)] + ['\t'.join(_cell(row[key]) for key in COLUMNS) for row in rows]
    write_text_atomically(folder / 'desc-regions_stats.tsv', '\n'.join(lines) + '\n')
    dictionary = {key: {'Description': description, **({'Units': units} if units else {})}
                  for key, (description, units) in COLUMNS.items()}
    dictionary['region']['Atlas'] = f'{template.name}, {template.atlas.name}'
    dictionary['region']['Levels'] = atlas_names(template.atlas_labels)
    write_text_atomically(folder / 'desc-regions_stats.json', json.dumps(dictionary, indent=2, default=str) + '\n')


def run_group(output_dir, bids_dir, participant_labels=None, session_labels=None, template=DEFAULT_TEMPLATE,
              atlas=DEFAULT_ATLAS, nprocs=1, progress=print):
    """Everything the group level writes; returns the rows of the table."""
    from .reports.group import write_group_report

    series_list = find_series(output_dir, bids_dir, participant_labels, session_labels)
    if not series_list:
        raise GroupError(f'{output_dir}: no Chimap of a participant; run the participant level first.')
    files = template_files(template, atlas)
    folder = Path(output_dir) / 'group'
    transforms = {series.prefix: folder / 'transforms' / f'{series.prefix}_from-MEGRE_to-{template}_mode-image_xfm.txt'
                  for series in series_list}
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, min(nprocs, len(series_list)))) as pool:
        futures = [(series, pool.submit(series_statistics, series, files, transforms[series.prefix]))
                   for series in series_list]
        for series, future in futures:
            try:
                rows += future.result()
            except GroupError:
                raise
            except Exception as error:  # one line for the user; the series is named
                raise GroupError(f'{series.prefix}: the registration to {template} or the statistics failed '
                                 f'({type(error).__name__}: {error})') from error
            progress(f'qsmprep: {series.prefix}: regions of {atlas} measured')
    rows = flag_outliers(rows)
    write_table(rows, folder, files)
    write_group_report(rows, folder, files)
    return rows
