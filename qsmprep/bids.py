"""Finding and checking the multi-echo GRE (MEGRE) series of a BIDS dataset.

Every problem is raised as an ``InputError`` whose text names the file, the key and the fix,
so the command line can print it as one sentence and stop that series before anything runs.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .nifti import on_same_grid
from .science.physics import b0_direction_from_affine, voxel_size_from_affine

logger = logging.getLogger('qsmprep')
# Stored integer ranges of "arbitrary"-unit phase, by Manufacturer (CONVENTIONS.md).
ARBITRARY_PHASE_RANGES = {
    'siemens': (-4096.0, 4096.0),
    'philips': (-1000 * np.pi, 1000 * np.pi),
}
SIEMENS_UNSIGNED_PHASE_RANGE = (0.0, 4096.0)
# Plausible acquisitions: what lies outside is a unit or header error, not a scan.
FIELD_STRENGTH_RANGE_T = (0.05, 20.0)
MAX_ECHO_TIME_S = 0.2  # no GRE for QSM echoes this late; later values are milliseconds
MIN_ECHOES = 2  # the field and the phase offset at TE = 0 are two unknowns per voxel
MIN_ECHO_SPACING_S = 0.0003  # shorter than any gradient-echo readout
VOXEL_SIZE_RANGE_MM = (0.05, 20.0)
MAX_VOXELS = 1024 ** 3  # per 3-D image: 4 GiB as float32; a header declaring more is corrupt
# Wrapped phase fills its range: the noise outside the head alone covers it. Phase that spans
# less than this fraction over all echoes is in other units (e.g. divided by pi) or blank.
MIN_PHASE_SPAN_FRACTION = 0.5
GROUPING_IGNORED = {'echo', 'part', 'extension', 'suffix', 'datatype'}
ENTITY_ORDER = ('subject', 'session', 'task', 'acquisition', 'ceagent', 'reconstruction', 'run')
ENTITY_KEYS = {'subject': 'sub', 'session': 'ses', 'task': 'task', 'acquisition': 'acq',
               'ceagent': 'ce', 'reconstruction': 'rec', 'run': 'run'}


class InputError(ValueError):
    """A problem with the input data, phrased for the user: the file, the problem, the fix."""


@dataclass
class MegreSeries:
    """One multi-echo GRE series: its files, echo times and acquisition geometry."""
    entities: dict
    magnitude_files: list
    phase_files: list
    echo_times_s: list
    field_strength_t: float
    phase_range: tuple  # stored values mapped linearly onto [-pi, pi); None for radians
    b0_dir: list
    b0_dir_source: str
    voxel_size_mm: list
    shape: tuple
    metadata: dict = field(default_factory=dict)

    @property
    def name(self):
        """The BIDS prefix of the series, e.g. ``sub-01_ses-1_run-1``."""
        return series_name(self.entities)

    @property
    def workflow_name(self):
        return self.name.replace('-', '_')


def strip_prefix(label, prefix):
    return label[len(prefix):] if label.startswith(prefix) else label


def _sidecar(path):
    sidecar = Path(str(path).replace('.nii.gz', '').replace('.nii', '') + '.json')
    return sidecar


def _metadata(layout, path):
    metadata = layout.get_metadata(str(path))
    if not metadata and not _sidecar(path).exists():
        raise InputError(f'{_sidecar(path)}: the sidecar is missing; write one with EchoTime '
                         f'(s), MagneticFieldStrength (T) and, for phase, Units.')
    return metadata


def _number(path, metadata, key, example):
    """The number under ``key`` of a sidecar; refuses strings, lists and booleans."""
    value = metadata[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f'{_sidecar(path)}: {key} is {json.dumps(value)}, not a number; write it as a number '
                         f'(e.g. "{key}": {example}).')
    return float(value)


def _echo_time(path, metadata):
    if 'EchoTime' not in metadata:
        raise InputError(f'{_sidecar(path)}: key EchoTime is missing; add the echo time in seconds '
                         f'(e.g. "EchoTime": 0.004).')
    echo_time = _number(path, metadata, 'EchoTime', 0.004)
    if not 0 < echo_time < MAX_ECHO_TIME_S:
        raise InputError(f'{_sidecar(path)}: EchoTime is {echo_time}, not a gradient-echo time in seconds; '
                         f'BIDS wants seconds (e.g. 0.004 for 4 ms).')
    return echo_time


def check_field_strength(value):
    """Whether ``value`` (tesla) can be an MRI field: the same rule for sidecars and the command line."""
    low, high = FIELD_STRENGTH_RANGE_T
    return low < value < high


def _field_strength(path, metadata, override):
    if override is not None:
        return float(override)
    if 'MagneticFieldStrength' not in metadata:
        raise InputError(f'{_sidecar(path)}: key MagneticFieldStrength is missing; add it in tesla or run '
                         f'with --field-strength.')
    value = _number(path, metadata, 'MagneticFieldStrength', 3)
    if not check_field_strength(value):
        raise InputError(f'{_sidecar(path)}: MagneticFieldStrength is {value}, which is not a field in '
                         f'tesla; correct it or run with --field-strength.')
    return value


def _units_range(path, metadata):
    units = metadata.get('Units')
    if units is None:
        raise InputError(f'{_sidecar(path)}: key Units is missing from a phase sidecar; add "Units": "rad" '
                         f'(or "arbitrary" with Manufacturer for integer phase).')
    if units == 'rad':
        return None
    if units == 'arbitrary':
        manufacturer = str(metadata.get('Manufacturer', '')).lower()
        for vendor, stored_range in ARBITRARY_PHASE_RANGES.items():
            if vendor in manufacturer:
                return stored_range
        raise InputError(f'{_sidecar(path)}: phase Units is "arbitrary" but Manufacturer '
                         f'({metadata.get("Manufacturer")!r}) is not one whose integer range is known '
                         f'({", ".join(ARBITRARY_PHASE_RANGES)}); convert the phase to radians and set '
                         f'"Units": "rad".')
    raise InputError(f'{_sidecar(path)}: phase Units is {units!r}; use "rad" or "arbitrary".')


def _load_image(path):
    """The NIfTI header of ``path``, refused with the file's name when it cannot be what it claims."""
    path = Path(path)
    if not path.exists():
        raise InputError(f'{path}: the file does not exist (a broken symbolic link?); restore the file it '
                         f'points to.')
    if path.stat().st_size == 0:
        raise InputError(f'{path}: the file is empty (0 bytes); copy or convert it again.')
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for a file that is not NIfTI
        raise InputError(f'{path}: not a readable NIfTI file ({error}); convert it again.') from error
    shape = image.shape
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise InputError(f'{path}: its header declares {" x ".join(map(str, shape))} voxels, more than '
                         f'{MAX_VOXELS:,}; the header is corrupt: convert the file again.')
    if image.ndim == 3:
        voxel_size = voxel_size_from_affine(image.affine)
        low, high = VOXEL_SIZE_RANGE_MM
        if not np.all((voxel_size > low) & (voxel_size < high)):
            raise InputError(f'{path}: voxel size {[round(float(v), 3) for v in voxel_size]} mm (header pixdim '
                             f'and affine) is not that of an MRI scan; fix the header.')
    return image


def _read_data(path, image):
    try:
        return np.asanyarray(image.dataobj)
    except Exception as error:  # truncated gzip streams and short files raise EOFError, OSError, ValueError
        raise InputError(f'{path}: the image data cannot be read ({type(error).__name__}: {error}); the file is '
                         f'truncated or corrupt: copy or convert it again.') from error


def _check_image(path, reference):
    image = _load_image(path)
    if image.ndim != 3:
        raise InputError(f'{path}: the image is {image.ndim}-D {image.shape}; qsmprep wants one 3-D file per echo '
                         f'and part (..._echo-<i>_part-<mag|phase>_MEGRE.nii.gz).')
    if reference is None:
        _check_orthogonal_axes(path, image.affine)
    else:
        if image.shape != reference.shape:
            raise InputError(f'{path}: shape {image.shape} differs from {reference.shape} of the first echo; '
                             f'all echoes and parts of a series must share one grid.')
        if not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise InputError(f'{path}: its affine differs from that of the first echo; all echoes and parts '
                             f'of a series must share one grid.')
    data = _read_data(path, image)
    if not np.all(np.isfinite(data)):
        raise InputError(f'{path}: the image holds NaN or infinite values; replace them (e.g. with 0) '
                         f'before running qsmprep.')
    return image, data


def _check_magnitude_values(path, data):
    if data.max() <= 0 or data.max() == data.min():
        raise InputError(f'{path}: the magnitude is blank (every voxel {data.flat[0]:g}); convert it again from '
                         f'the scanner data.')
    if data.min() < 0:
        raise InputError(f'{path}: the magnitude has negative values (down to {data.min():g}); is this file a '
                         f'phase image? Check its part-<mag|phase> entity.')


# Largest |cosine| between two voxel axes of an affine still taken as orthogonal: float32 headers
# of oblique scans carry about 1e-7; 0.01 is a shear of 0.6 degrees.
MAX_AXIS_COSINE = 0.01


def _check_orthogonal_axes(path, affine):
    """Refuse a sheared affine: the dipole physics needs orthogonal voxel axes.

    A resampler that rescales only the diagonal of an oblique affine (as some simulators do)
    leaves its axes sheared, so that both the voxel sizes and the B0 direction read from it are
    wrong while the data look fine.
    """
    axes = np.asarray(affine, dtype=float)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    cosines = np.abs(axes.T @ axes - np.eye(3))
    if cosines.max() > MAX_AXIS_COSINE:
        angle = np.degrees(np.arcsin(min(float(cosines.max()), 1.0)))
        raise InputError(f'{path}: the voxel axes of its affine are sheared by {angle:.1f} degrees, so its voxel '
                         'sizes and B0 direction cannot be read from it; reslice the series to an orthogonal grid '
                         '(or fix the header of the tool that wrote it).')


def _b0_dir(path, metadata, affine):
    if 'B0_dir' in metadata:
        b0_dir = np.asarray(metadata['B0_dir'], dtype=float)
        if b0_dir.shape != (3,) or np.linalg.norm(b0_dir) == 0:
            raise InputError(f'{_sidecar(path)}: B0_dir must be three numbers, not all 0 (the B0 '
                             f'direction in voxel axes).')
        return list(b0_dir / np.linalg.norm(b0_dir)), 'sidecar key B0_dir'
    return list(b0_direction_from_affine(affine)), 'image affine'


def _phase_range(path, metadata, data):
    """Stored range of the phase, from Units and Manufacturer (None: radians); Siemens integer phase
    is stored either signed (-4096..4094, scaled by the converter) or raw (0..4095)."""
    stored_range = _units_range(path, metadata)
    if stored_range == ARBITRARY_PHASE_RANGES['siemens'] and data.min() >= 0:
        return SIEMENS_UNSIGNED_PHASE_RANGE
    return stored_range


def _check_phase_values(path, data, phase_range):
    """Refuse values outside the stored range; radians may be in [-pi, pi] or in [0, 2 pi]."""
    allowed = [(-np.pi, np.pi), (0.0, 2 * np.pi)] if phase_range is None else [phase_range]
    for low, high in allowed:
        tolerance = 0.01 * (high - low)
        if data.min() >= low - tolerance and data.max() <= high + tolerance:
            return
    hint = 'radians within [-pi, pi] or [0, 2 pi]' if phase_range is None else \
        f'the stored range [{allowed[0][0]:g}, {allowed[0][1]:g})'
    raise InputError(f'{path}: phase values run from {data.min():g} to {data.max():g}, outside {hint}; '
                     f'check the Units key of its sidecar.')


def _check_phase_span(phase_paths, spans, phase_range):
    """Refuse a series whose phase covers too little of its range in every echo (see
    ``MIN_PHASE_SPAN_FRACTION``)."""
    width = 2 * np.pi if phase_range is None else phase_range[1] - phase_range[0]
    widest = int(np.argmax(spans))
    if spans[widest] == 0:
        raise InputError(f'{phase_paths[0]}: the phase is blank (one value in every voxel of every echo); '
                         f'convert it again from the scanner data.')
    if spans[widest] < MIN_PHASE_SPAN_FRACTION * width:
        units = 'radians' if phase_range is None else f'the stored range of {width:g}'
        raise InputError(f'{phase_paths[widest]}: the phase spans only {spans[widest]:.3g} of {units}, though '
                         f'wrapped phase fills its range; it is in other units (divided by pi?): scale it to '
                         f'radians or set the Units key of its sidecar to match.')


def series_from_files(layout, magnitude_by_echo, phase_by_echo, entities, field_strength_override=None):
    """Check one series' files and metadata and describe it; raises ``InputError``."""
    if sorted(magnitude_by_echo) != sorted(phase_by_echo):
        missing = sorted(set(magnitude_by_echo) ^ set(phase_by_echo))
        any_file = next(iter({**magnitude_by_echo, **phase_by_echo}.values()))
        raise InputError(f'{any_file}: echoes {missing} have only one of part-mag and part-phase; every echo '
                         f'of a MEGRE series needs both.')
    echoes = sorted(magnitude_by_echo)
    if len(echoes) < MIN_ECHOES:
        raise InputError(f'{magnitude_by_echo[echoes[0]]}: the series has one echo, but qsmprep needs at least '
                         f'{MIN_ECHOES}: the field is the slope of the phase over echo time, and one echo cannot tell '
                         f'it from the phase offset at TE = 0 (on simulated heads a single echo gave a Chimap ten '
                         f'times off the truth); acquire more echoes or use a single-echo tool.')
    echo_times, magnitude_files, phase_files = [], [], []
    reference = None
    field_strength, phase_range, b0_dir, b0_source, first_metadata = None, None, None, None, None
    phase_spans = []
    for echo in echoes:
        magnitude_path, phase_path = magnitude_by_echo[echo], phase_by_echo[echo]
        magnitude_meta, phase_meta = _metadata(layout, magnitude_path), _metadata(layout, phase_path)
        te_magnitude, te_phase = _echo_time(magnitude_path, magnitude_meta), _echo_time(phase_path, phase_meta)
        if not np.isclose(te_magnitude, te_phase):
            raise InputError(f'{_sidecar(phase_path)}: EchoTime {te_phase} differs from {te_magnitude} of its '
                             f'magnitude; make the two sidecars agree.')
        if echo_times and te_magnitude <= echo_times[-1]:
            raise InputError(f'{_sidecar(magnitude_path)}: EchoTime {te_magnitude} is not later than that of the '
                             f'previous echo; echo numbers must follow echo times.')
        if echo_times and te_magnitude - echo_times[-1] < MIN_ECHO_SPACING_S:
            raise InputError(f'{_sidecar(magnitude_path)}: EchoTime {te_magnitude} is only '
                             f'{1e3 * (te_magnitude - echo_times[-1]):.3g} ms after the previous echo, shorter than '
                             f'any gradient-echo readout; check the echo times of the series (in seconds).')
        echo_times.append(te_magnitude)
        magnitude_image, magnitude_data = _check_image(magnitude_path, reference)
        _check_magnitude_values(magnitude_path, magnitude_data)
        if reference is None:
            reference = magnitude_image
            field_strength = _field_strength(magnitude_path, magnitude_meta, field_strength_override)
            b0_dir, b0_source = _b0_dir(magnitude_path, magnitude_meta, reference.affine)
            first_metadata = magnitude_meta
        _, phase_data = _check_image(phase_path, reference)
        echo_phase_range = _phase_range(phase_path, phase_meta, phase_data)
        if echo == echoes[0]:
            phase_range = echo_phase_range
        elif echo_phase_range != phase_range:
            raise InputError(f'{_sidecar(phase_path)}: Units (or the stored range) differ from the first echo; '
                             f'all phase echoes of a series must use the same units.')
        _check_phase_values(phase_path, phase_data, phase_range)
        phase_spans.append(float(phase_data.max()) - float(phase_data.min()))
        magnitude_files.append(str(magnitude_path))
        phase_files.append(str(phase_path))
    _check_phase_span(phase_files, phase_spans, phase_range)
    return MegreSeries(
        entities=entities, magnitude_files=magnitude_files, phase_files=phase_files,
        echo_times_s=echo_times, field_strength_t=field_strength, phase_range=phase_range,
        b0_dir=b0_dir, b0_dir_source=b0_source,
        voxel_size_mm=[float(v) for v in voxel_size_from_affine(reference.affine)],
        shape=tuple(int(n) for n in reference.shape),
        metadata={key: first_metadata[key] for key in ('Manufacturer', 'RepetitionTime', 'FlipAngle')
                  if key in first_metadata})


def series_name(entities):
    """The BIDS prefix of a series' entities, e.g. ``sub-01_ses-1_run-1``."""
    return '_'.join(f'{ENTITY_KEYS[key]}-{entities[key]}' for key in ENTITY_ORDER if key in entities)


def _run_order(series):
    run = series.entities.get('run', '')
    return (0, int(run), '') if str(run).isdigit() else (1, 0, str(run))


def orientation_groups(series_list):
    """The series grouped into heads: those that differ only in their run, sorted by run (the first
    is the reference orientation)."""
    groups = {}
    for series in series_list:
        key = tuple(sorted((k, v) for k, v in series.entities.items() if k != 'run'))
        groups.setdefault(key, []).append(series)
    return [sorted(group, key=_run_order) for group in groups.values()]


def _unusable_reason(path, part, echo):
    """Why a file named as MEGRE cannot be one echo of a series."""
    if part not in ('mag', 'phase') or echo is None:
        try:
            volumes = nib.load(str(path)).shape
        except Exception:
            volumes = ()
        if len(volumes) == 4:
            return (f'{path}: not used: it holds {volumes[3]} volumes in one 4-D file, but qsmprep wants one 3-D '
                    f'file per echo and part; split it into ..._echo-<i>_part-<mag|phase>_MEGRE.nii.gz files with '
                    f'their own EchoTime.')
        return (f'{path}: not used: a MEGRE file needs both an echo-<i> and a part-<mag|phase> entity; '
                f'rename it.')
    return None


def collect_megre_series(bids_dir, participant_labels=None, session_labels=None, validate=True,
                         field_strength_override=None):
    """All MEGRE series of the selected participants.

    Returns ``(series, errors)``: the series that passed every check, and per series that did
    not, its name and the reason. With ``validate`` the BIDS validator's errors in a series'
    files fail that series. Raises ``InputError`` when the folder is not a usable BIDS dataset.
    """
    from bids import BIDSLayout  # pybids is slow to import; only the app needs it

    bids_dir = Path(bids_dir)
    if not (bids_dir / 'dataset_description.json').is_file():
        raise InputError(f'{bids_dir}: not a BIDS dataset (dataset_description.json is missing); point '
                         f'qsmprep at the root of a BIDS dataset.')
    validator_errors = run_bids_validator(bids_dir) if validate else {}
    # Files above the participants that qsmprep reads: the description and inherited MEGRE sidecars.
    root_errors = [message for location, messages in validator_errors.items() if '/' not in location
                   and (location == 'dataset_description.json' or location.endswith('MEGRE.json'))
                   for message in messages]
    if root_errors:
        raise InputError('\n'.join(root_errors))
    try:
        # qsmprep runs the BIDS validator itself, so that a file it refuses is named, not skipped.
        layout = BIDSLayout(str(bids_dir), validate=False)
    except Exception as error:  # pybids raises several types for unreadable datasets
        raise InputError(f'{bids_dir}: pybids could not index the dataset ({error}); fix the dataset.') from error
    query = {'suffix': 'MEGRE', 'extension': ['.nii', '.nii.gz']}
    if participant_labels:
        query['subject'] = [strip_prefix(label, 'sub-') for label in participant_labels]
    if session_labels:
        query['session'] = [strip_prefix(label, 'ses-') for label in session_labels]
    files = layout.get(**query)
    with_megre = sorted(layout.get_subjects(suffix='MEGRE'))
    if participant_labels:
        found = {f.entities['subject'] for f in files}
        absent = sorted(set(query['subject']) - found)
        if absent:
            raise InputError(f'{bids_dir}: no MEGRE data for participant(s) {", ".join(absent)}; the participants '
                             f'with MEGRE data are {", ".join(with_megre) or "none"}; check --participant-label.')
    if not files:
        raise InputError(f'{bids_dir}: no *_MEGRE.nii[.gz] files were found (for the selected participants); '
                         f'qsmprep needs multi-echo GRE named ..._echo-<i>_part-<mag|phase>_MEGRE.nii.gz.')
    groups = {}
    for bids_file in files:
        entities = {k: v for k, v in bids_file.get_entities().items()
                    if k not in GROUPING_IGNORED and k in ENTITY_KEYS}
        key = tuple(sorted(entities.items()))
        group = groups.setdefault(key, {'entities': entities, 'mag': {}, 'phase': {}, 'unusable': []})
        part, echo = bids_file.entities.get('part'), bids_file.entities.get('echo')
        reason = _unusable_reason(bids_file.path, part, echo)
        if reason:
            group['unusable'].append(reason)
        else:
            group[part][int(echo)] = bids_file.path
    series, errors = [], {}
    for group in groups.values():
        name = series_name(group['entities'])
        read_by_qsmprep = [_relative(related, bids_dir) for path in [*group['mag'].values(), *group['phase'].values()]
                           for related in (path, _sidecar(path))]
        found_by_validator = list(dict.fromkeys(message for location in read_by_qsmprep
                                                for message in validator_errors.pop(location, [])))
        try:
            if group['unusable'] or found_by_validator:
                raise InputError('\n'.join(group['unusable'] + found_by_validator))
            series.append(series_from_files(layout, group['mag'], group['phase'], group['entities'],
                                            field_strength_override))
        except InputError as error:
            errors[name] = str(error)
    selected = {f'sub-{subject}' for subject in query.get('subject', with_megre)}
    for location, messages in validator_errors.items():
        if location.split('/')[0] in selected:
            for message in messages:
                logger.warning('%s (qsmprep does not read this file)', message)
    return series, errors


def _relative(path, bids_dir):
    return Path(os.path.relpath(path, bids_dir)).as_posix()


def _bids_validator_command():
    """The ``bids-validator-deno`` executable beside this Python, else on the PATH."""
    beside = Path(sys.executable).with_name('bids-validator-deno')
    return str(beside) if beside.exists() else shutil.which('bids-validator-deno')


def run_bids_validator(bids_dir):
    """The BIDS validator's errors, as messages by file (relative to ``bids_dir``)."""
    command = _bids_validator_command()
    if command is None:
        raise InputError(f'{bids_dir}: the BIDS validator (bids-validator-deno) is not installed; install it with '
                         f'pip or run with --skip-bids-validation.')
    result = subprocess.run([command, str(bids_dir), '--format', 'json', '--ignoreWarnings'],
                            capture_output=True, text=True)
    try:
        issues = json.loads(result.stdout)['issues']['issues']
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f'{bids_dir}: the BIDS validator failed ({result.stderr.strip()[-300:]}); run with '
                         f'--skip-bids-validation to go on without it.') from None
    messages = {}
    for issue in issues:
        if issue.get('severity') != 'error':
            continue
        location = issue.get('location', '/').lstrip('/')
        detail = (issue.get('issueMessage') or '').strip().splitlines()
        key = f' {issue["subCode"]}' if issue.get('subCode') else ''
        # A missing key is reported at the image; the fix goes into its sidecar.
        named = _sidecar(bids_dir / location) if issue['code'] == 'SIDECAR_KEY_REQUIRED' else bids_dir / location
        text = (f'{named}: the BIDS validator reports {issue["code"]}{key}'
                + (f' ({detail[0]})' if detail and not detail[0].startswith('Field description') else '')
                + '; fix the file or run with --skip-bids-validation.')
        for place in [location, *(a.lstrip('/') for a in issue.get('affects', []))]:
            if text not in messages.setdefault(place, []):
                messages[place].append(text)
    return messages


def check_user_mask(mask_path, series):
    """Raise ``InputError`` unless the user's mask is a non-empty 3-D image on the series' grid."""
    mask = nib.load(str(mask_path))
    reference = nib.load(series.magnitude_files[0])
    if mask.ndim != 3 or not on_same_grid(mask, reference):
        raise InputError(f'{mask_path}: the mask is not on the grid of {series.magnitude_files[0]} (shape '
                         f'{mask.shape} vs {reference.shape}); resample it onto the MEGRE grid.')
    if not np.any(np.asanyarray(mask.dataobj)):
        raise InputError(f'{mask_path}: the mask is empty; give a mask with the brain set to 1.')


def bids_uri(path, bids_dir):
    """BIDS URI of an input file, relative to the raw dataset (``DatasetLinks`` key ``raw``)."""
    return 'bids:raw:' + _relative(path, bids_dir)
