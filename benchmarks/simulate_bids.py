"""Simulated multi-echo GRE head datasets in BIDS form, with their ground truth.

For the tests, the demo and the benchmarks only: it uses qsm-forward (GPL) for the signal model,
noise and phase offset; the qsmprep package itself never imports it. The field is computed with
qsmprep's dipole operator on a finer grid (``voxel_averaged_field``); tests/test_physics.py checks
that operator against qsm-forward's. The head is built from the MNI152 2009a T1, grey and white matter
maps that nilearn ships: brain tissue with deep grey matter nuclei, veins and a calcification,
a skull, soft tissue, air sinuses and the air around the head, so that the background field has
the shape and size of a real one. A tilted head keeps its voxel grid and rotates its affine, so
the B0 direction is oblique in voxel axes and known only from the affine.

    python benchmarks/simulate_bids.py OUT_DIR [--voxel-size 2] [--tilt 18] [--subjects 01 02]

The truth goes to OUT_DIR/derivatives/truth/sub-<label>/anat/ (pybids ignores derivatives).
"""
import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import nilearn.datasets
import numpy as np
import qsm_forward
import scipy.fft
from scipy import ndimage

from qsmprep.science.masking import dilated, eroded
from qsmprep.science.normalization import region_statistics, resampled_at_step
from qsmprep.science.physics import DipoleOperator, anisotropic_field, b0_direction_from_affine

MNI_DATA = Path(nilearn.datasets.__file__).parent / 'data'
MNI_FILES = {
    't1': 'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz',
    'gm': 'mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz',
    'wm': 'mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz',
}
ECHO_TIMES_S = (0.004, 0.010, 0.016, 0.022, 0.028)
ECHO_TIMES_7T_S = (0.003, 0.008, 0.013, 0.018, 0.023)
FIELD_STRENGTH_T = 3.0
REPETITION_TIME_S = 0.05
FLIP_ANGLE_DEG = 15.0

# Susceptibility in ppm relative to water/CSF.
CHI_WM, CHI_GM, CHI_BONE, CHI_AIR = -0.03, 0.02, -2.0, 9.2
# (name, MNI centre in mm for the right side (mirrored to the left), radii in mm, chi in ppm, R2* in 1/s)
NUCLEI = (
    ('caudate', (13, 12, 10), (4, 8, 7), 0.06, 28.0),
    ('putamen', (25, 2, 0), (5, 12, 8), 0.05, 28.0),
    ('globus_pallidus', (19, -2, -2), (3, 6, 4), 0.15, 45.0),
    ('thalamus', (11, -18, 6), (6, 10, 7), 0.01, 22.0),
    ('red_nucleus', (5, -20, -8), (3, 3, 3), 0.12, 40.0),
    ('substantia_nigra', (11, -18, -12), (2.5, 5, 3), 0.14, 45.0),
    ('dentate', (14, -56, -34), (4, 5, 4), 0.10, 35.0),
)
# Vein segments: MNI start, end (mm), radius (mm); chi 0.35 ppm.
VEINS = (((0, -30, 12), (0, -72, 8), 2.5), ((2, -8, 16), (2, -30, 12), 1.5), ((-2, -8, 16), (-2, -30, 12), 1.5),
         ((30, -10, 40), (38, -40, 35), 1.5))
CHI_VEIN, R2STAR_VEIN = 0.35, 60.0
CALCIFICATION = ((22, 30, 25), 2.5, -0.15)
BONE_MM, SCALP_MM = 6.0, 5.0
# Air pockets in the skull: MNI centre (mm), radii (mm): frontal sinus, sphenoid sinus, both mastoids.
AIR_POCKETS = (((0, 72, 0), (12, 5, 9)), ((0, 16, -40), (12, 10, 8)), ((60, -25, -42), (8, 10, 8)),
               ((-60, -25, -42), (8, 10, 8)))


def echo_times_for(field_strength_t):
    """The simulated echo times (s) at a field strength: shorter at 7 T, where T2* is shorter."""
    return ECHO_TIMES_7T_S if field_strength_t > 5 else ECHO_TIMES_S


def load_mni_maps(voxel_size_mm, scale=(1.0, 1.0, 1.0)):
    """T1, grey and white matter maps in [0, 1] on a grid of ``voxel_size_mm`` (one number or one
    per axis), and its affine.

    ``scale`` stretches the template along each axis (a head of another size and shape): the
    affine returned still maps voxels to MNI millimetres, so structures placed by MNI
    coordinates follow the stretch; the grid's true voxel size is ``voxel_size_mm``.
    """
    voxel_size = np.broadcast_to(np.asarray(voxel_size_mm, dtype=float), (3,))
    images = {key: nib.load(MNI_DATA / name) for key, name in MNI_FILES.items()}
    affine = images['t1'].affine.copy()
    mni_step = voxel_size / np.asarray(scale, dtype=float)
    maps = {key: resampled_at_step(img.get_fdata(dtype=np.float32) / 255.0, mni_step) for key, img in images.items()}
    affine[:3, :3] = affine[:3, :3] @ np.diag(mni_step)
    return maps, affine


def _world_grid(shape, affine):
    ijk = np.meshgrid(*[np.arange(n) for n in shape], indexing='ij')
    return [sum(affine[r, c] * ijk[c] for c in range(3)) + affine[r, 3] for r in range(3)]


def _ellipsoid(world, centre, radii):
    return sum(((w - c) / r) ** 2 for w, c, r in zip(world, centre, radii)) <= 1


def _segment(world, start, end, radius):
    start, end = np.asarray(start, float), np.asarray(end, float)
    direction = end - start
    length = np.linalg.norm(direction)
    direction /= length
    relative = [w - s for w, s in zip(world, start)]
    along = np.clip(sum(r * d for r, d in zip(relative, direction)), 0, length)
    distance2 = sum((r - along * d) ** 2 for r, d in zip(relative, direction))
    return distance2 <= radius ** 2


def _mirrored(centre):
    return [tuple(centre), (-centre[0],) + tuple(centre[1:])]


def head_phantom(voxel_size_mm=1.0, seed=0, scale=(1.0, 1.0, 1.0), lesions=(), bias=('linear', 0.3),
                 field_strength_t=FIELD_STRENGTH_T):
    """Arrays of one simulated head (MNI orientation) and its affine.

    ``voxel_size_mm`` is one number or one per axis. Variants of the head: ``scale`` stretches
    the template along each axis, ``lesions`` adds ellipsoids (MNI centre mm, radii mm, chi ppm,
    R2* 1/s at 3 T) such as a haemorrhage or a calcification, ``bias`` is the receive-coil bias
    (``('linear', s)``: from 1 - s to 1 + s, brighter towards the back and top; ``('rim', s)``:
    as an array coil, 1 at the centre to 1 + s at the skin; ``('centre', s)``: as a 7 T head, 1 + s
    at the centre to 1 at the skin) and R2* grows linearly with ``field_strength_t`` from its 3 T
    values. The default is the head every test and benchmark used before variants existed.

    Keys: chi (ppm, air and bone included), brain_mask, head_mask, intracranial_mask, m0, r1,
    r2star (1/s), phase_offset (rad), wm_fraction (white matter's share of each brain voxel),
    nuclei (label map of the deep grey matter nuclei, as ``nucleus_names`` numbers them; 0 elsewhere).
    """
    rng = np.random.default_rng(seed)
    vs = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size_mm, dtype=float), (3,)))
    maps, affine = load_mni_maps(vs, scale)
    # The template is skull-stripped: grow a skull and a scalp around it, inside a larger grid.
    margin = [int(np.ceil((BONE_MM + SCALP_MM + 4) / v)) for v in vs]
    maps = {key: np.pad(m, [(n, n) for n in margin]) for key, m in maps.items()}
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(margin, dtype=float)
    world = _world_grid(maps['t1'].shape, affine)

    brain = ndimage.binary_fill_holes(eroded(dilated(maps['gm'] + maps['wm'] > 0.5, 3, vs), 3, vs))
    intracranial = ndimage.binary_fill_holes(maps['t1'] > 0.15) | dilated(brain, 2, vs)
    skull_outer = dilated(intracranial, BONE_MM, vs)
    head = dilated(skull_outer, SCALP_MM, vs)
    bone = skull_outer & ~intracranial
    air = ~head
    for centre, radii in AIR_POCKETS:
        air |= _ellipsoid(world, centre, radii) & ~intracranial

    wm_fraction = np.where(brain, maps['wm'], 0)
    gm_fraction = np.where(brain, maps['gm'], 0)
    csf_fraction = np.where(brain, np.clip(1 - wm_fraction - gm_fraction, 0, 1), 0)
    texture = ndimage.gaussian_filter(rng.standard_normal(brain.shape).astype(np.float32),
                                      [2.0 / v for v in vs])
    texture *= 0.01 / max(float(texture[brain].std()), 1e-9)
    chi = CHI_WM * wm_fraction + CHI_GM * gm_fraction + np.where(brain, texture, 0)
    r2star = 20.0 * wm_fraction + 15.0 * gm_fraction + 4.0 * csf_fraction
    m0 = 0.65 * wm_fraction + 0.8 * gm_fraction + 1.0 * csf_fraction
    r1 = 1.1 * wm_fraction + 0.7 * gm_fraction + 0.25 * csf_fraction
    nuclei = np.zeros(brain.shape, dtype=np.uint8)
    for index, (_, centre, radii, chi_value, r2star_value) in enumerate(NUCLEI):
        for side, side_centre in enumerate(_mirrored(centre)):
            nucleus = _ellipsoid(world, side_centre, radii) & brain
            chi[nucleus], r2star[nucleus], nuclei[nucleus] = chi_value, r2star_value, 2 * index + side + 1
    for start, end, radius in VEINS:
        vein = _segment(world, start, end, radius) & brain
        chi[vein], r2star[vein] = CHI_VEIN, R2STAR_VEIN
    centre, radius, chi_value = CALCIFICATION
    chi[_ellipsoid(world, centre, (radius,) * 3) & brain] = chi_value
    for centre, radii, chi_value, r2star_value in lesions:
        lesion = _ellipsoid(world, centre, radii) & brain
        chi[lesion], r2star[lesion] = chi_value, r2star_value

    soft_tissue = head & ~intracranial & ~bone & ~air
    csf = intracranial & ~brain
    m0[csf], r1[csf], r2star[csf] = 1.0, 0.25, 4.0
    chi[bone], chi[air] = CHI_BONE, CHI_AIR
    m0[soft_tissue], r1[soft_tissue], r2star[soft_tissue] = 0.8, 1.0, 35.0
    m0[bone], r1[bone], r2star[bone] = 0.05, 1.0, 300.0
    m0[air], r1[air], r2star[air] = 0.0, 1.0, 0.0
    r2star *= field_strength_t / 3.0

    phase_offset = qsm_forward.generate_phase_offset(m0, head, m0.shape)
    # The affine of the grid as scanned: voxels of ``vs`` mm (the template's was stretched).
    affine = np.diag(list(scale) + [1.0]) @ affine
    return {
        'chi': chi.astype(np.float32), 'brain_mask': brain, 'head_mask': head & ~air,
        'intracranial_mask': intracranial, 'm0': (m0 * coil_bias(world, head, *bias)).astype(np.float32),
        'r1': r1.astype(np.float32), 'r2star': r2star.astype(np.float32),
        'phase_offset': phase_offset.astype(np.float32), 'wm_fraction': wm_fraction.astype(np.float32),
        'nuclei': nuclei,
    }, affine


def coil_bias(world, head, kind='linear', strength=0.3):
    """Smooth receive-coil sensitivity over the grid (see ``head_phantom``'s ``bias``)."""
    if kind == 'linear':
        y, z = world[1], world[2]
        return 1.0 - strength + strength * (y.max() - y) / np.ptp(y) + strength * (z - z.min()) / np.ptp(z)
    centre = [float(w[head].mean()) for w in world]
    extent = [float(np.abs(w[head] - c).max()) for w, c in zip(world, centre)]
    radius_squared = sum(((w - c) / e) ** 2 for w, c, e in zip(world, centre, extent))
    if kind == 'rim':
        return 1.0 + strength * np.minimum(radius_squared, 1.5)
    if kind == 'centre':
        return 1.0 + strength * np.exp(-3.0 * radius_squared)
    raise ValueError(f'unknown coil bias {kind!r}')


def tilted_affine(affine, tilt_deg, axis=0):
    """The affine of the same voxel grid with the head turned by ``tilt_deg`` about scanner x
    (pitch, ``axis=0``) or y (roll, ``axis=1``)."""
    angle = np.deg2rad(tilt_deg)
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(4)
    rotation[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    return rotation @ affine


def voxel_averaged_field(chi_ppm, voxel_size, b0_dir, supersampling=2):
    """Field (ppm) of ``chi_ppm`` averaged over each voxel, as a scanner measures it.

    The field is computed on a grid ``supersampling`` times finer (each voxel copied) and
    averaged back. On the coarse grid itself an oblique dipole kernel is discontinuous at the
    Nyquist frequency, so a voxelised step of several ppm at the skull or an air cavity would
    ring through the whole brain; averaging two fine voxels cancels the fine grid's Nyquist
    frequency exactly. Zero-padded, so ``chi_ppm`` must be 0 where the world around it is.
    """
    fine = chi_ppm
    for axis in range(3):
        fine = np.repeat(fine, supersampling, axis=axis)
    fine_voxel = [v / supersampling for v in voxel_size]
    with scipy.fft.set_workers(os.cpu_count() or 1):
        field = DipoleOperator(fine.shape, fine_voxel, b0_dir, pad_factor=1.5, voxel_averaged=False).forward(fine)
    del fine
    n0, n1, n2 = chi_ppm.shape
    s = supersampling
    return field.reshape(n0, s, n1, s, n2, s).mean(axis=(1, 3, 5)).astype(np.float32)


def true_local_field(phantom, voxel_size, b0_dir):
    """The field (ppm) of the brain's own susceptibility (and anisotropy) for ``b0_dir`` in voxel axes.

    Not referenced to its mean: a uniform offset c inside the brain adds c times a field harmonic
    there, which background removal cannot see, but the brain's mean chi here is 0.0001 to 0.0003
    ppm and referencing it changed this field by 0.4 % or less and background removal's NRMSE by
    under 0.2 %.
    """
    local_field = voxel_averaged_field(np.where(phantom['brain_mask'], phantom['chi'], 0), voxel_size, b0_dir)
    if 'anisotropy' in phantom:
        local_field += anisotropic_field(phantom['anisotropy'], phantom['fibres'], voxel_size, b0_dir)
    return local_field


def simulate_megre(phantom, affine, echo_times_s=ECHO_TIMES_S, field_strength_t=FIELD_STRENGTH_T,
                   peak_snr=100.0, seed=0):
    """Multi-echo magnitude and phase (echoes on the last axis) and the true fields in ppm."""
    rng = np.random.default_rng(seed)
    voxel_size = np.linalg.norm(affine[:3, :3], axis=0)
    b0_dir = b0_direction_from_affine(affine)
    # Relative to air, the world outside the grid is 0, as the zero padding assumes.
    total_field = voxel_averaged_field(phantom['chi'] - CHI_AIR, voxel_size, b0_dir)
    local_field = true_local_field(phantom, voxel_size, b0_dir)
    if 'anisotropy' in phantom:  # white matter's traceless tensor a (n n^T - I/3), in the brain
        total_field += anisotropic_field(phantom['anisotropy'], phantom['fibres'], voxel_size, b0_dir)
    magnitude, phase = [], []
    for te in echo_times_s:
        signal = qsm_forward.generate_signal(
            total_field, B0=field_strength_t, TR=REPETITION_TIME_S, TE=te, flip_angle=FLIP_ANGLE_DEG,
            phase_offset=phantom['phase_offset'], R1=phantom['r1'], R2star=phantom['r2star'], M0=phantom['m0'])
        signal = qsm_forward.add_noise(signal, peak_snr=peak_snr, rng=rng)
        magnitude.append(np.abs(signal))
        phase.append(np.angle(signal))
    return {
        'magnitude': np.stack(magnitude, -1).astype(np.float32), 'phase': np.stack(phase, -1).astype(np.float32),
        'total_field': total_field.astype(np.float32), 'local_field': local_field.astype(np.float32),
        'b0_dir': b0_dir,
    }


def _write_json(path, content):
    path.write_text(json.dumps(content, indent=2) + '\n')


def _save(array, affine, path):
    nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine).to_filename(path)


def write_subject(bids_dir, label, phantom, affine, megre, echo_times_s=ECHO_TIMES_S,
                  field_strength_t=FIELD_STRENGTH_T, run=None):
    """Write one subject's MEGRE echoes (of ``run`` when given) and its truth into ``bids_dir``."""
    anat = Path(bids_dir) / f'sub-{label}' / 'anat'
    anat.mkdir(parents=True, exist_ok=True)
    prefix = f'sub-{label}' + (f'_run-{run}' if run is not None else '')
    for echo, te in enumerate(echo_times_s, start=1):
        for part, volume, extra in (('mag', 1000 * megre['magnitude'][..., echo - 1], {}),
                                    ('phase', megre['phase'][..., echo - 1], {'Units': 'rad'})):
            stem = anat / f'{prefix}_echo-{echo}_part-{part}_MEGRE'
            _save(volume, affine, f'{stem}.nii.gz')
            _write_json(Path(f'{stem}.json'), {
                'EchoTime': te, 'EchoNumber': echo, 'MagneticFieldStrength': field_strength_t,
                'RepetitionTime': REPETITION_TIME_S, 'FlipAngle': FLIP_ANGLE_DEG, **extra})
    truth = Path(bids_dir) / 'derivatives' / 'truth' / f'sub-{label}' / 'anat'
    truth.mkdir(parents=True, exist_ok=True)
    brain = phantom['brain_mask']
    chi_brain = np.where(brain, phantom['chi'], 0)
    for name, volume in (('Chimap', chi_brain), ('desc-brain_mask', brain), ('R2starmap', phantom['r2star']),
                         ('desc-total_fieldmap', megre['total_field']),
                         ('desc-local_fieldmap', megre['local_field'])):
        _save(volume, affine, truth / f'{prefix}_{name}.nii.gz')
    nib.Nifti1Image(phantom['nuclei'].astype(np.int16), affine).to_filename(truth / f'{prefix}_desc-nuclei_dseg.nii.gz')


def write_dataset_description(bids_dir, name='qsmprep simulated MEGRE'):
    bids_dir = Path(bids_dir)
    bids_dir.mkdir(parents=True, exist_ok=True)
    _write_json(bids_dir / 'dataset_description.json', {'Name': name, 'BIDSVersion': '1.10.0'})
    truth = bids_dir / 'derivatives' / 'truth'
    truth.mkdir(parents=True, exist_ok=True)
    _write_json(truth / 'dataset_description.json', {
        'Name': 'ground truth of the simulation', 'BIDSVersion': '1.10.0', 'DatasetType': 'derivative',
        'GeneratedBy': [{'Name': 'qsmprep benchmarks/simulate_bids.py'}]})


def simulate_dataset(bids_dir, voxel_size_mm=2.0, tilts_deg=(0.0,), labels=None, peak_snr=100.0, seed=0):
    """A BIDS dataset with one subject per tilt; returns the subject labels."""
    labels = labels or [f'{i + 1:02d}' for i in range(len(tilts_deg))]
    write_dataset_description(bids_dir)
    phantom, affine = head_phantom(voxel_size_mm, seed=seed)
    for label, tilt in zip(labels, tilts_deg):
        subject_affine = tilted_affine(affine, tilt)
        megre = simulate_megre(phantom, subject_affine, peak_snr=peak_snr, seed=seed)
        write_subject(bids_dir, label, phantom, subject_affine, megre)
    return labels


# Three heads of different sizes, shapes and tilts: the group level's test and screenshot cohort.
COHORT_HEADS = ({'seed': 0}, {'seed': 1, 'scale': (1.06, 0.95, 1.0), 'tilt': 12.0},
                {'seed': 2, 'scale': (0.94, 1.0, 1.05), 'tilt': -10.0})


def simulate_cohort(bids_dir, voxel_size_mm=2.0, heads=COHORT_HEADS, peak_snr=100.0):
    """A BIDS dataset with one subject per entry of ``heads`` (``head_phantom``'s ``seed`` and
    ``scale``, and ``tilt`` in degrees): heads of several sizes and shapes; returns the labels."""
    write_dataset_description(bids_dir)
    labels = []
    for index, head in enumerate(heads, start=1):
        phantom, affine = head_phantom(voxel_size_mm, seed=head['seed'], scale=head.get('scale', (1.0, 1.0, 1.0)))
        affine = tilted_affine(affine, head.get('tilt', 0.0))
        megre = simulate_megre(phantom, affine, peak_snr=peak_snr, seed=head['seed'])
        labels.append(f'{index:02d}')
        write_subject(bids_dir, labels[-1], phantom, affine, megre)
    return labels


# The template that nilearn ships (ICBM 2009a nonlinear symmetric), as TemplateFlow names it, and
# an atlas of the phantom's deep grey matter nuclei on it: what the group level's tests use.
TEST_TEMPLATE, TEST_ATLAS = 'MNI152NLin2009aSym', 'qsmprepNuclei'


def template_to_subject(head):
    """The template-to-subject world matrix that ``simulate_cohort`` applied to ``head``: its
    stretch, then its tilt."""
    return tilted_affine(np.diag(list(head.get('scale', (1.0, 1.0, 1.0))) + [1.0]), head.get('tilt', 0.0))


def true_region_means(bids_dir, output_dir, label, chimap=None):
    """Nucleus -> mean susceptibility (ppm) of subject ``label`` over the nucleus as simulated (the
    truth's ``desc-nuclei_dseg``), inside qsmprep's local-field mask and referenced as qsmprep's
    Chimap is (to its mean over that mask): the truth the group level's table is scored against.
    With ``chimap`` (an array on the subject's grid), the same for it instead of the truth."""
    truth = Path(bids_dir) / 'derivatives' / 'truth' / f'sub-{label}' / 'anat'
    mask_path = Path(output_dir) / f'sub-{label}' / 'anat' / f'sub-{label}_desc-localfield_mask.nii.gz'
    mask = np.asanyarray(nib.load(mask_path).dataobj) > 0
    chi = np.asarray(nib.load(truth / f'sub-{label}_Chimap.nii.gz').get_fdata() if chimap is None else chimap,
                     dtype=float)
    chi = chi - chi[mask].mean()
    nuclei = np.asanyarray(nib.load(truth / f'sub-{label}_desc-nuclei_dseg.nii.gz').dataobj)
    return {row['region']: row['chi_mean']
            for row in region_statistics(nuclei, nucleus_names(), {'chi': chi}, mask)}


def nucleus_names():
    """Atlas label -> name of each nucleus of ``NUCLEI``, right (MNI x > 0) then left."""
    return {2 * index + side + 1: f'{name}_{"right" if side == 0 else "left"}'
            for index, (name, *_) in enumerate(NUCLEI) for side in range(2)}


def nuclei_atlas(shape, affine, points=5):
    """The nuclei of ``NUCLEI`` on the grid of ``shape`` and ``affine`` as an atlas draws them: each
    voxel takes the nucleus that covers more than half of it (``points`` per axis sample it).
    Labelling the voxels whose centre is inside instead makes nuclei centred on a voxel with a
    whole radius in voxels a fifth too large."""
    atlas = np.zeros(shape, dtype=np.int16)
    to_voxels = np.linalg.inv(affine)
    offsets = (np.arange(points) + 0.5) / points - 0.5
    for index, (_, centre, radii, _, _) in enumerate(NUCLEI):
        for side, side_centre in enumerate(_mirrored(centre)):
            corners = np.array([[side_centre[a] + sign * (radii[a] + 2) for a in range(3)] + [1]
                                for sign in (-1, 1)])
            ends = (to_voxels @ corners.T)[:3]
            start = np.maximum(np.floor(ends.min(axis=1)).astype(int), 0)
            stop = np.minimum(np.ceil(ends.max(axis=1)).astype(int) + 1, shape)
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            inside = np.zeros(stop - start, dtype=np.float32)
            for shift in np.stack(np.meshgrid(offsets, offsets, offsets, indexing='ij'), -1).reshape(-1, 3):
                shifted = affine.copy()
                shifted[:3, 3] = affine[:3, :3] @ (start + shift) + affine[:3, 3]
                inside += _ellipsoid(_world_grid(inside.shape, shifted), side_centre, radii)
            atlas[box][inside > points ** 3 / 2] = 2 * index + side + 1
    return atlas


def write_templateflow_home(home):
    """A TemplateFlow cache in ``home`` with ``TEST_TEMPLATE``'s T1w and brain mask at 2 mm and the
    atlas ``TEST_ATLAS`` of the phantom's nuclei at 1 mm, with its label table."""
    folder = Path(home) / f'tpl-{TEST_TEMPLATE}'
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f'tpl-{TEST_TEMPLATE}'
    images = {key: nib.load(MNI_DATA / name) for key, name in MNI_FILES.items()}
    affine = images['t1'].affine
    t1 = images['t1'].get_fdata(dtype=np.float32)
    brain = ndimage.binary_fill_holes((images['gm'].get_fdata() + images['wm'].get_fdata()) / 255.0 > 0.5)
    half = affine.copy()
    half[:3, :3] *= 2
    _save(resampled_at_step(t1, 2), half, f'{stem}_res-02_T1w.nii.gz')
    _save(resampled_at_step(brain.astype(np.float32), 2) > 0.5, half, f'{stem}_res-02_desc-brain_mask.nii.gz')
    _save(nuclei_atlas(t1.shape, affine), affine, f'{stem}_res-01_atlas-{TEST_ATLAS}_dseg.nii.gz')
    Path(f'{stem}_res-01_atlas-{TEST_ATLAS}_dseg.tsv').write_text(
        'index\tname\n' + ''.join(f'{label}\t{name}\n' for label, name in nucleus_names().items()))
    _write_json(folder / 'template_description.json', {'Name': 'ICBM 2009a Nonlinear Symmetric (nilearn copy)',
                                                         'Identifier': TEST_TEMPLATE})


def _turn(degrees, axis):
    angle = np.deg2rad(degrees)
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    return rotation


# Label maps, masks and susceptibility are resampled by nearest neighbour, the rest linearly:
# interpolated, the skull's and the air's several ppm would leak into the brain's edge voxels and
# become sources of its local field.
NEAREST_KEYS = ('chi', 'brain_mask', 'head_mask', 'intracranial_mask', 'nuclei')


def turned_phantom(phantom, affine, transform):
    """The phantom with the head moved by ``transform`` (4x4, world mm) inside the same grid, each
    map resampled (fibre directions also turned); the scanner, and so B0, stay where they were."""
    voxel_map = np.linalg.inv(affine) @ np.linalg.inv(transform) @ affine  # output voxel -> input voxel
    turned = {}
    for key, volume in phantom.items():
        if key == 'fibres':
            continue
        order = 0 if key in NEAREST_KEYS else 1
        turned[key] = ndimage.affine_transform(np.asarray(volume, dtype=np.float32), voxel_map[:3, :3],
                                               voxel_map[:3, 3], order=order).astype(np.asarray(volume).dtype)
    if 'fibres' in phantom:
        axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        voxel_rotation = axes.T @ transform[:3, :3] @ axes
        fibres = np.stack([ndimage.affine_transform(component, voxel_map[:3, :3], voxel_map[:3, 3], order=1)
                           for component in phantom['fibres']])
        fibres = np.einsum('ij,j...->i...', voxel_rotation, fibres)
        turned['fibres'] = (fibres / np.maximum(np.linalg.norm(fibres, axis=0), 1e-6)).astype(np.float32)
    return turned


def simulate_orientations(bids_dir, turns_deg, voxel_size_mm=3.0, label='01', peak_snr=100.0, seed=0,
                          anisotropy_ppm=0.0, resample=False):
    """One subject scanned in several head orientations, one ``run-<i>`` each: ``turns_deg`` holds
    per run a turn (degrees, scanner axis) or a sequence of them, the first run the reference.

    Without ``resample`` each run keeps the same voxels and only its affine turns (as a scan whose
    slices follow the head); with it the grid stays and the head turns about its centre inside it,
    resampled (partial volume, other voxels cut by the field of view), as when the slices do not
    follow. ``anisotropy_ppm`` > 0 gives white matter a traceless tensor of that anisotropy (times
    its fraction) along smooth random fibres. Returns the reference phantom (with keys anisotropy
    and fibres when anisotropic) and per run the 4x4 world transform from run 1 to it.
    """
    write_dataset_description(bids_dir)
    phantom, affine = head_phantom(voxel_size_mm, seed=seed)
    if anisotropy_ppm:
        from qsmprep.learned.phantoms import random_fibre_directions

        phantom['anisotropy'] = (anisotropy_ppm * phantom['wm_fraction'] * phantom['brain_mask']).astype(np.float32)
        phantom['fibres'] = random_fibre_directions(np.random.default_rng(seed), phantom['chi'].shape,
                                                    np.linalg.norm(affine[:3, :3], axis=0))
    centre = (affine @ np.append(np.argwhere(phantom['brain_mask']).mean(axis=0), 1))[:3]
    transforms = []
    for run, turns in enumerate(turns_deg, start=1):
        rotation = np.eye(3)
        for degrees, axis in ([turns] if np.isscalar(turns[0]) else turns):
            rotation = _turn(degrees, axis) @ rotation
        transform = np.eye(4)
        if resample:
            transform[:3, :3], transform[:3, 3] = rotation, centre - rotation @ centre
            run_affine, run_phantom = affine, (turned_phantom(phantom, affine, transform) if run > 1 else phantom)
        else:
            transform[:3, :3] = rotation  # the affine turns about the world origin
            run_affine, run_phantom = transform @ affine, phantom
        transforms.append(transform)
        megre = simulate_megre(run_phantom, run_affine, peak_snr=peak_snr, seed=seed + run)
        write_subject(bids_dir, label, run_phantom, run_affine, megre, run=run)
    return phantom, transforms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('bids_dir', type=Path)
    parser.add_argument('--voxel-size', type=float, default=2.0, help='isotropic voxel size in mm')
    parser.add_argument('--tilt', type=float, nargs='+', default=[0.0],
                        help='head tilt in degrees, one subject per value')
    parser.add_argument('--peak-snr', type=float, default=100.0)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    labels = simulate_dataset(args.bids_dir, args.voxel_size, args.tilt, peak_snr=args.peak_snr, seed=args.seed)
    print(f'simulated subjects {", ".join(labels)} in {args.bids_dir}')


if __name__ == '__main__':
    main()
