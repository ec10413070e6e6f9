"""Finding and checking the multi-echo GRE (MEGRE) series of a BIDS dataset.

Every problem is raised as an ``InputError`` whose text names the file, the key and the fix,
so the command line can print it as one sentence and stop that series before anything runs.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .nifti import on_same_grid
from .science.physics import b0_direction_from_affine, voxel_size_from_affine

# Stored integer ranges of "arbitrary"-unit phase, by Manufacturer (CONVENTIONS.md).
ARBITRARY_PHASE_RANGES = {
    'siemens': (-4096.0, 4096.0),
    'philips': (-1000 * np.pi, 1000 * np.pi),
}
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
        return '_'.join(f'{ENTITY_KEYS[key]}-{self.entities[key]}' for key in ENTITY_ORDER
                        if key in self.entities)

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


def _echo_time(path, metadata):
    if 'EchoTime' not in metadata:
        raise InputError(f'{_sidecar(path)}: key EchoTime is missing; add the echo time in seconds '
                         f'(e.g. "EchoTime": 0.004).')
    echo_time = float(metadata['EchoTime'])
    if not 0 < echo_time < 1:
        raise InputError(f'{_sidecar(path)}: EchoTime is {echo_time}, not in seconds; BIDS wants seconds '
                         f'(e.g. 0.004 for 4 ms).')
    return echo_time


def _field_strength(path, metadata, override):
    if override is not None:
        return float(override)
    if 'MagneticFieldStrength' not in metadata:
        raise InputError(f'{_sidecar(path)}: key MagneticFieldStrength is missing; add it in tesla or run '
                         f'with --field-strength.')
    value = float(metadata['MagneticFieldStrength'])
    if not 0.05 < value < 20:
        raise InputError(f'{_sidecar(path)}: MagneticFieldStrength is {value}, which is not a field in '
                         f'tesla; correct it or run with --field-strength.')
    return value


def _phase_range(path, metadata):
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


def _check_image(path, reference):
    image = nib.load(str(path))
    if image.ndim != 3:
        raise InputError(f'{path}: the image is {image.ndim}-D; qsmprep wants one 3-D file per echo and part.')
    if reference is None:
        _check_orthogonal_axes(path, image.affine)
    else:
        if image.shape != reference.shape:
            raise InputError(f'{path}: shape {image.shape} differs from {reference.shape} of the first echo; '
                             f'all echoes and parts of a series must share one grid.')
        if not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise InputError(f'{path}: its affine differs from that of the first echo; all echoes and parts '
                             f'of a series must share one grid.')
    data = np.asanyarray(image.dataobj)
    if not np.all(np.isfinite(data)):
        raise InputError(f'{path}: the image holds NaN or infinite values; replace them (e.g. with 0) '
                         f'before running qsmprep.')
    return image, data


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


def _check_phase_values(path, data, phase_range):
    low, high = (-np.pi, np.pi) if phase_range is None else phase_range
    tolerance = 0.01 * (high - low)
    if data.min() < low - tolerance or data.max() > high + tolerance:
        hint = 'radians within [-pi, pi]' if phase_range is None else f'the stored range [{low:g}, {high:g})'
        raise InputError(f'{path}: phase values run from {data.min():g} to {data.max():g}, outside {hint}; '
                         f'check the Units key of its sidecar.')


def series_from_files(layout, magnitude_by_echo, phase_by_echo, entities, field_strength_override=None):
    """Check one series' files and metadata and describe it; raises ``InputError``."""
    if sorted(magnitude_by_echo) != sorted(phase_by_echo):
        missing = sorted(set(magnitude_by_echo) ^ set(phase_by_echo))
        any_file = next(iter({**magnitude_by_echo, **phase_by_echo}.values()))
        raise InputError(f'{any_file}: echoes {missing} have only one of part-mag and part-phase; every echo '
                         f'of a MEGRE series needs both.')
    echoes = sorted(magnitude_by_echo)
    echo_times, magnitude_files, phase_files = [], [], []
    reference = None
    field_strength, phase_range, b0_dir, b0_source, first_metadata = None, None, None, None, None
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
        echo_times.append(te_magnitude)
        if reference is None:
            reference, _ = _check_image(magnitude_path, None)
            field_strength = _field_strength(magnitude_path, magnitude_meta, field_strength_override)
            phase_range = _phase_range(phase_path, phase_meta)
            b0_dir, b0_source = _b0_dir(magnitude_path, magnitude_meta, reference.affine)
            first_metadata = magnitude_meta
        else:
            _check_image(magnitude_path, reference)
        _, phase_data = _check_image(phase_path, reference)
        if _phase_range(phase_path, phase_meta) != phase_range:
            raise InputError(f'{_sidecar(phase_path)}: Units differ from the first echo; all phase echoes of '
                             f'a series must use the same units.')
        _check_phase_values(phase_path, phase_data, phase_range)
        magnitude_files.append(str(magnitude_path))
        phase_files.append(str(phase_path))
    return MegreSeries(
        entities=entities, magnitude_files=magnitude_files, phase_files=phase_files,
        echo_times_s=echo_times, field_strength_t=field_strength, phase_range=phase_range,
        b0_dir=b0_dir, b0_dir_source=b0_source,
        voxel_size_mm=[float(v) for v in voxel_size_from_affine(reference.affine)],
        shape=tuple(int(n) for n in reference.shape),
        metadata={key: first_metadata[key] for key in ('Manufacturer', 'RepetitionTime', 'FlipAngle')
                  if key in first_metadata})


def collect_megre_series(bids_dir, participant_labels=None, session_labels=None, validate=True,
                         field_strength_override=None):
    """All MEGRE series of the selected participants.

    Returns ``(series, errors)``: the series that passed every check, and one message per
    series that did not. Raises ``InputError`` when the folder is not a usable BIDS dataset.
    """
    from bids import BIDSLayout  # pybids is slow to import; only the app needs it

    bids_dir = Path(bids_dir)
    if not (bids_dir / 'dataset_description.json').is_file():
        raise InputError(f'{bids_dir}: not a BIDS dataset (dataset_description.json is missing); point '
                         f'qsmprep at the root of a BIDS dataset.')
    try:
        layout = BIDSLayout(str(bids_dir), validate=validate)
    except Exception as error:  # pybids raises several types for unreadable datasets
        raise InputError(f'{bids_dir}: pybids could not index the dataset ({error}); fix the dataset or run '
                         f'with --skip-bids-validation.') from error
    query = {'suffix': 'MEGRE', 'extension': ['.nii', '.nii.gz']}
    if participant_labels:
        query['subject'] = [strip_prefix(label, 'sub-') for label in participant_labels]
    if session_labels:
        query['session'] = [strip_prefix(label, 'ses-') for label in session_labels]
    files = layout.get(**query)
    if participant_labels:
        found = {f.entities['subject'] for f in files}
        absent = sorted(set(query['subject']) - found)
        if absent:
            raise InputError(f'{bids_dir}: no MEGRE data for participant(s) {", ".join(absent)}; check '
                             f'--participant-label against the sub-* folders.')
    if not files:
        raise InputError(f'{bids_dir}: no *_MEGRE.nii[.gz] files were found (for the selected participants); '
                         f'qsmprep needs multi-echo GRE named ..._echo-<i>_part-<mag|phase>_MEGRE.nii.gz.')
    groups = {}
    for bids_file in files:
        entities = {k: v for k, v in bids_file.get_entities().items()
                    if k not in GROUPING_IGNORED and k in ENTITY_KEYS}
        key = tuple(sorted(entities.items()))
        group = groups.setdefault(key, {'entities': entities, 'mag': {}, 'phase': {}})
        part = bids_file.entities.get('part')
        echo = bids_file.entities.get('echo')
        if part not in ('mag', 'phase') or echo is None:
            raise InputError(f'{bids_file.path}: a MEGRE file needs both an echo-<i> and a part-<mag|phase> '
                             f'entity; rename it.')
        group[part][int(echo)] = bids_file.path
    series, errors = [], []
    for group in groups.values():
        try:
            series.append(series_from_files(layout, group['mag'], group['phase'], group['entities'],
                                            field_strength_override))
        except InputError as error:
            errors.append(str(error))
    return series, errors


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
    return 'bids:raw:' + os.path.relpath(path, bids_dir)
