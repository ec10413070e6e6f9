"""Training samples for learned dipole inversion, simulated on the fly with the forward model.

A sample is a susceptibility patch (``phantoms.random_shapes`` or ``phantoms.brain_like``), its
mask, a random voxel size, one to ``max_orientations`` random B0 directions and the local
field of each, with noise, a residual background field and, in brain patches, the field of
white matter's susceptibility anisotropy. Everything is drawn from one seeded
generator per batch, keyed by (seed, stream, step): a run resumed at step k sees the batches an
uninterrupted run would, and the validation stream never overlaps the training one. A third
stream draws ``simulate_head``, the whole brains the training command validates on.

The field is computed as benchmarks/simulate_bids.py's ``voxel_averaged_field`` explains: on a
grid ``supersampling`` times finer than the patch (the phantom drawn there, not copied), with
qsmprep's dipole operator zero-padded so it does not wrap, then averaged over each voxel, as a
scanner measures it. The true susceptibility is the voxel average of the fine map.

``GENERATOR_VERSION`` names the distribution of samples: change it whenever a change here or
in ``phantoms`` changes what a given seed produces, so a model card says what it was trained on.
DeepSTI's tensor phantoms (``simulate_tensor_batch``, ``simulate_tensor_head``) are drawn the same
way, with their own ``TENSOR_GENERATOR_VERSION``.
"""
import dataclasses

import numpy as np
from scipy.spatial.transform import Rotation

from qsmprep.science.masking import bounding_box
from qsmprep.science.physics import TENSOR_COMPONENTS, DipoleOperator, anisotropic_field, traceless_tensor

from . import phantoms

GENERATOR_VERSION = '1.0'
TRAINING_STREAM, VALIDATION_STREAM, HEAD_STREAM = 0, 1, 2
# Most acquisitions are axial, with B0 along the third voxel axis; the others have any direction.
AXIAL_PROBABILITY = 0.3
# The validation head's grid holds the template's brain (about 180 mm across at most) in any rotation.
HEAD_EXTENT_MM = 192.0
HEAD_B0_TILT_DEG = 20.0
HEAD_B0_DIR = np.array([np.sin(np.deg2rad(HEAD_B0_TILT_DEG)), 0.0, np.cos(np.deg2rad(HEAD_B0_TILT_DEG))])
# Its residual background, noise and anisotropy are this fraction of the largest the training
# draws: their mean.
HEAD_DISTURBANCE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """What the generator draws from; the model card stores it with ``GENERATOR_VERSION``."""
    voxel_size_range_mm: tuple = (0.6, 1.5)
    max_orientations: int = 3
    max_tilt_deg: float = 40.0
    noise_max_ppm: float = 0.005
    # 1.5 times the RMS error V-SHARP leaves on a simulated head; a much larger residual taught
    # the network to strip smooth contrast from every input (benchmarks/NOTES.md).
    background_max_ppm: float = 0.003
    # White matter's anisotropy chi_parallel - chi_perpendicular, drawn per brain patch up to this
    # (1.5 times the 0.01 to 0.02 ppm of the STI literature). Its field is model error, not
    # contrast: the truth stays the mean susceptibility (benchmarks/NOTES.md). 0 draws what
    # generator 1.0 drew before this setting existed, as the shipped checkpoint resumes.
    anisotropy_max_ppm: float = 0.03
    brain_fraction: float = 0.5
    supersampling: int = 2
    pad_factor: float = 1.5


@dataclasses.dataclass
class TrainingSample:
    """One simulated patch: ``local_fields_ppm`` is (N, *shape) for the N ``b0_dirs`` (N, 3)."""
    chi_ppm: np.ndarray
    mask: np.ndarray
    local_fields_ppm: np.ndarray
    voxel_size: np.ndarray
    b0_dirs: np.ndarray
    kind: str

    @property
    def truth_ppm(self):
        """What a network is trained to return: (1, *shape)."""
        return self.chi_ppm[np.newaxis]


def random_b0_directions(rng, count, max_tilt_deg):
    """``count`` unit B0 directions in voxel axes: the first axial or uniform on the sphere, the
    others tilted from it by up to ``max_tilt_deg`` about a random axis, as a head rotates in
    the coil between the orientations of a multi-orientation acquisition."""
    if rng.random() < AXIAL_PROBABILITY:
        first = np.array([0.0, 0.0, 1.0])
    else:
        first = rng.standard_normal(3)
        first /= np.linalg.norm(first)
    return _tilted_from(rng, first, count, max_tilt_deg)


def _tilted_from(rng, first, count, max_tilt_deg):
    """``first`` and ``count - 1`` directions tilted from it by up to ``max_tilt_deg`` about random axes."""
    directions = [first]
    for _ in range(count - 1):
        axis = np.cross(first, rng.standard_normal(3))
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(0, max_tilt_deg))
        directions.append(Rotation.from_rotvec(angle * axis).apply(first))
    return np.asarray(directions)


def _template_head(rng, voxel_size_mm, config):
    """The validation heads' brain: ``phantoms.brain_like`` around the template's centre on a grid of
    ``HEAD_EXTENT_MM`` at ``voxel_size_mm`` (isotropic), drawn ``supersampling`` times finer.
    Returns the voxel size and the fine susceptibility, mask and white matter fraction."""
    s = config.supersampling
    voxel_size = np.full(3, float(voxel_size_mm))
    fine_shape = (int(np.ceil(HEAD_EXTENT_MM / voxel_size_mm)) * s,) * 3
    return (voxel_size,) + phantoms.brain_like(rng, fine_shape, voxel_size / s, centre=phantoms.brain_centre())


def _voxel_average(volume, supersampling):
    n0, n1, n2 = (n // supersampling for n in volume.shape)
    s = supersampling
    return volume.reshape(n0, s, n1, s, n2, s).mean(axis=(1, 3, 5)).astype(np.float32)


def residual_background(rng, shape, mask, rms_ppm):
    """A harmonic field (solid harmonics of degree 1 and 2) with RMS ``rms_ppm`` over ``mask``:
    what background removal leaves behind, smooth and with zero Laplacian as the true one."""
    x, y, z = (2 * np.arange(n, dtype=np.float32) / max(n - 1, 1) - 1 for n in shape)
    x, y, z = np.meshgrid(x, y, z, indexing='ij', sparse=True)
    harmonics = (x, y, z, x * y, y * z, x * z, x ** 2 - y ** 2, 2 * z ** 2 - x ** 2 - y ** 2)
    field = sum(rng.standard_normal() * h for h in harmonics)
    rms = float(np.sqrt(np.mean(field[mask] ** 2))) if mask.any() else 0.0
    return (field * (rms_ppm / rms if rms > 0 else 0.0)).astype(np.float32)


def _voxel_averaged_truth(fine_chi, fine_mask, supersampling):
    """The susceptibility and mask a scanner's voxels hold: voxel averages of the fine maps."""
    mask = _voxel_average(fine_mask.astype(np.float32), supersampling) >= 0.5
    return np.where(mask, _voxel_average(fine_chi, supersampling), 0).astype(np.float32), mask


def _white_matter_fibres(rng, fine_white_matter, mask, voxel_size, supersampling):
    """The white matter fraction of the scanner's voxels (0 outside ``mask``) and random fibre
    directions on their grid: with an anisotropy in ppm, what ``_measured_field`` adds the field of."""
    white_matter = np.where(mask, _voxel_average(fine_white_matter, supersampling), 0).astype(np.float32)
    return white_matter, phantoms.random_fibre_directions(rng, mask.shape, voxel_size)


def _measured_field(rng, fine_chi, fine_spacing, mask, b0_dir, background_rms_ppm, noise_std_ppm, config,
                    anisotropy=None):
    """The local field of ``fine_chi`` for ``b0_dir`` as a scanner's voxels measure it, with a
    residual background of ``background_rms_ppm`` and white noise, 0 outside ``mask``.

    ``anisotropy``: (chi_parallel - chi_perpendicular in ppm per voxel, fibre directions) on the
    voxel grid, whose field is added. It is computed on the voxel grid, not the fine one: the
    white matter fraction and the fibres are smooth over several voxels, and the fine grid's
    FFTs would cost more than the rest of the sample.
    """
    operator = DipoleOperator(fine_chi.shape, fine_spacing, b0_dir, pad_factor=config.pad_factor,
                              voxel_averaged=False)
    field = _voxel_average(operator.forward(fine_chi), config.supersampling)
    if anisotropy is not None:
        anisotropy_ppm, fibres = anisotropy
        field += anisotropic_field(anisotropy_ppm, fibres, fine_spacing * config.supersampling, b0_dir,
                                   config.pad_factor)
    field += residual_background(rng, field.shape, mask, background_rms_ppm)
    field += noise_std_ppm * rng.standard_normal(field.shape).astype(np.float32)
    return np.where(mask, field, 0)


def _random_phantom(rng, patch_size, config):
    """A random voxel size, and a brain-like or random-shapes phantom drawn on the grid
    ``config.supersampling`` times finer than a patch of ``patch_size`` voxels per side: (voxel
    size, kind, fine chi, fine mask, fine white matter fraction or None)."""
    voxel_size = rng.uniform(*config.voxel_size_range_mm, 3)
    fine_shape = (patch_size * config.supersampling,) * 3
    fine_spacing = voxel_size / config.supersampling
    if rng.random() < config.brain_fraction:
        return (voxel_size, 'brain') + phantoms.brain_like(rng, fine_shape, fine_spacing)
    return (voxel_size, 'shapes') + phantoms.random_shapes(rng, fine_shape, fine_spacing) + (None,)


def simulate_sample(rng, patch_size, orientations, config):
    """One ``TrainingSample`` of ``patch_size`` voxels per side with ``orientations`` fields."""
    s = config.supersampling
    voxel_size, kind, fine_chi, fine_mask, fine_white_matter = _random_phantom(rng, patch_size, config)
    fine_spacing = voxel_size / s
    chi, mask = _voxel_averaged_truth(fine_chi, fine_mask, s)
    b0_dirs = random_b0_directions(rng, orientations, config.max_tilt_deg)
    noise_std = rng.uniform(0, config.noise_max_ppm)
    anisotropy = None
    if kind == 'brain' and config.anisotropy_max_ppm > 0:
        white_matter, fibres = _white_matter_fibres(rng, fine_white_matter, mask, voxel_size, s)
        anisotropy = (rng.uniform(0, config.anisotropy_max_ppm) * white_matter, fibres)
    fields = [_measured_field(rng, fine_chi, fine_spacing, mask, b0_dir, rng.uniform(0, config.background_max_ppm),
                              noise_std, config, anisotropy) for b0_dir in b0_dirs]
    return TrainingSample(chi, mask, np.asarray(fields, dtype=np.float32), voxel_size, b0_dirs, kind)


def simulate_head(seed, voxel_size_mm, config, disturbance_fractions=(HEAD_DISTURBANCE_FRACTION,)):
    """Whole brains for validation, as ``TrainingSample``s of kind 'head' cropped to their mask.

    Held-out patches score the network on what it trains on; a whole brain scores it on what
    it is used for, where a bias at low spatial frequencies (such as shrinking everything) shows
    in a way that 48^3 patches hide. It is ``phantoms.brain_like`` drawn around the centre of
    the whole template (random tissue values, rotation, deformation and inclusions) on
    isotropic voxels, with one B0 direction tilted by ``HEAD_B0_TILT_DEG``. One sample is returned
    for each of ``disturbance_fractions``, with that fraction of the largest residual background,
    noise and white matter anisotropy of ``config``, all of one phantom: drawing it takes 9 of
    the 11 s a 1.5 mm brain takes. Its own stream keeps it apart from the training and validation
    patches, and it is not the benchmarks' head.
    """
    rng = np.random.default_rng([seed, HEAD_STREAM])
    s = config.supersampling
    voxel_size, fine_chi, fine_mask, fine_white_matter = _template_head(rng, voxel_size_mm, config)
    chi, mask = _voxel_averaged_truth(fine_chi, fine_mask, s)
    box = bounding_box(mask, margin=2)
    heads = []
    if config.anisotropy_max_ppm > 0:
        white_matter, fibres = _white_matter_fibres(rng, fine_white_matter, mask, voxel_size, s)
    for fraction in disturbance_fractions:
        anisotropy = None
        if fraction > 0 and config.anisotropy_max_ppm > 0:
            anisotropy = (fraction * config.anisotropy_max_ppm * white_matter, fibres)
        field = _measured_field(rng, fine_chi, voxel_size / s, mask, HEAD_B0_DIR, fraction * config.background_max_ppm,
                                fraction * config.noise_max_ppm, config, anisotropy)
        heads.append(TrainingSample(chi[box], mask[box], field[box][np.newaxis], voxel_size, HEAD_B0_DIR[np.newaxis],
                                    'head'))
    return heads


def simulate_batch(seed, step, batch_size, patch_size, config, stream=TRAINING_STREAM):
    """The batch of ``step``: a list of ``batch_size`` samples sharing one orientation count
    (so their fields stack), each with its own voxel size, directions and phantom."""
    rng = np.random.default_rng([seed, stream, step])
    orientations = int(rng.integers(1, config.max_orientations + 1))
    return [simulate_sample(rng, patch_size, orientations, config) for _ in range(batch_size)]


# The susceptibility patches that LPN's denoiser trains on (``simulate_chi_batch``): LP-CNN's phantoms
# without their fields.
CHI_GENERATOR_VERSION = 'chi-1.0'


@dataclasses.dataclass
class SusceptibilitySample:
    """One simulated susceptibility patch (voxel averages of a finer phantom) and its mask."""
    chi_ppm: np.ndarray
    mask: np.ndarray
    voxel_size: np.ndarray
    kind: str


def simulate_chi_batch(seed, step, batch_size, patch_size, config, stream=TRAINING_STREAM):
    """The batch of ``step``: ``batch_size`` ``SusceptibilitySample``s drawn as ``simulate_sample``
    draws its phantoms, on its generator's settings."""
    rng = np.random.default_rng([seed, stream, step])
    samples = []
    for _ in range(batch_size):
        voxel_size, kind, fine_chi, fine_mask, _ = _random_phantom(rng, patch_size, config)
        samples.append(SusceptibilitySample(*_voxel_averaged_truth(fine_chi, fine_mask, config.supersampling),
                                            voxel_size, kind))
    return samples


# DeepSTI's samples (``simulate_tensor_batch``) have their own version: they are drawn differently.
TENSOR_GENERATOR_VERSION = 'sti-1.1'
# Most brain patches lie inside the brain; whole heads have an edge everywhere, where a network that
# never saw one changed the mean susceptibility most (benchmarks/NOTES.md). Half the patches are cut
# by an ellipsoid.
TENSOR_EDGE_PROBABILITY = 0.5


@dataclasses.dataclass(frozen=True)
class TensorSimulationConfig:
    """What DeepSTI's generator draws from; the model card stores it with ``TENSOR_GENERATOR_VERSION``."""
    voxel_size_range_mm: tuple = (0.8, 2.0)
    max_orientations: int = 6
    # Head rotations in the coil reach about 45 degrees between orientations (STI acquisitions).
    max_tilt_deg: float = 45.0
    noise_max_ppm: float = 0.005
    background_max_ppm: float = 0.003
    # chi_parallel - chi_perpendicular of white matter: around the 0.01 to 0.03 ppm of the STI
    # literature, from nearly isotropic to twice the largest reported.
    anisotropy_range_ppm: tuple = (0.005, 0.05)
    supersampling: int = 2
    pad_factor: float = 1.5


@dataclasses.dataclass
class TensorSample:
    """One simulated tensor patch or head: ``tensor_ppm`` (6, *shape) and ``local_fields_ppm``
    (N, *shape) for the N ``b0_dirs`` (N, 3); ``white_matter`` is where the tensor is anisotropic."""
    tensor_ppm: np.ndarray
    mask: np.ndarray
    local_fields_ppm: np.ndarray
    voxel_size: np.ndarray
    b0_dirs: np.ndarray
    white_matter: np.ndarray

    @property
    def truth_ppm(self):
        """What a network is trained to return: (6, *shape)."""
        return self.tensor_ppm


def _tensor_sample(rng, fine_chi, fine_mask, fine_white_matter, voxel_size, b0_dirs, anisotropy_ppm, noise_std_ppm,
                   background_rms_ppm, config):
    """The tensor phantom of a brain drawn on the fine grid: the voxel-averaged mean susceptibility
    times I plus white matter's traceless anisotropy along smooth random fibres, and its fields."""
    s = config.supersampling
    chi, mask = _voxel_averaged_truth(fine_chi, fine_mask, s)
    white_matter, fibres = _white_matter_fibres(rng, fine_white_matter, mask, voxel_size, s)
    anisotropy = anisotropy_ppm * white_matter
    tensor = traceless_tensor(anisotropy, fibres) + chi * np.array(
        [float(i == j) for i, j in TENSOR_COMPONENTS], dtype=np.float32)[:, None, None, None]
    fields = [_measured_field(rng, fine_chi, voxel_size / s, mask, b0_dir, background_rms_ppm, noise_std_ppm, config,
                              (anisotropy, fibres)) for b0_dir in b0_dirs]
    return TensorSample(np.where(mask, tensor, 0).astype(np.float32), mask, np.asarray(fields, dtype=np.float32),
                        voxel_size, np.asarray(b0_dirs), white_matter > 0.5)


def simulate_tensor_sample(rng, patch_size, orientations, config):
    """One ``TensorSample`` of a brain-like patch of ``patch_size`` voxels per side."""
    s = config.supersampling
    voxel_size = rng.uniform(*config.voxel_size_range_mm, 3)
    fine_shape = (patch_size * s,) * 3
    fine_chi, fine_mask, fine_white_matter = phantoms.brain_like(rng, fine_shape, voxel_size / s)
    if rng.random() < TENSOR_EDGE_PROBABILITY:
        fine_mask &= phantoms.random_ellipsoid(rng, phantoms.local_coordinates(fine_shape, voxel_size / s),
                                               np.asarray(fine_shape) * voxel_size / s)
        fine_chi, fine_white_matter = (np.where(fine_mask, volume, 0).astype(np.float32)
                                       for volume in (fine_chi, fine_white_matter))
    b0_dirs = random_b0_directions(rng, orientations, config.max_tilt_deg)
    return _tensor_sample(rng, fine_chi, fine_mask, fine_white_matter, voxel_size, b0_dirs,
                          rng.uniform(*config.anisotropy_range_ppm), rng.uniform(0, config.noise_max_ppm),
                          rng.uniform(0, config.background_max_ppm), config)


def simulate_tensor_batch(seed, step, batch_size, patch_size, config, stream=TRAINING_STREAM):
    """The batch of ``step``, samples sharing one orientation count (1 to ``max_orientations``)."""
    rng = np.random.default_rng([seed, stream, step])
    orientations = int(rng.integers(1, config.max_orientations + 1))
    return [simulate_tensor_sample(rng, patch_size, orientations, config) for _ in range(batch_size)]


def simulate_tensor_head(seed, voxel_size_mm, config, orientations):
    """A whole brain for DeepSTI's validation, cropped to its mask, with ``orientations`` B0
    directions: the first tilted by ``HEAD_B0_TILT_DEG``, the others by up to ``max_tilt_deg`` from
    it; the mean anisotropy, noise and residual background of ``config`` (``simulate_head``'s
    stream, so not a training patch)."""
    rng = np.random.default_rng([seed, HEAD_STREAM])
    voxel_size, fine_chi, fine_mask, fine_white_matter = _template_head(rng, voxel_size_mm, config)
    b0_dirs = _tilted_from(rng, HEAD_B0_DIR, orientations, config.max_tilt_deg)
    head = _tensor_sample(rng, fine_chi, fine_mask, fine_white_matter, voxel_size, b0_dirs,
                          float(np.mean(config.anisotropy_range_ppm)), HEAD_DISTURBANCE_FRACTION * config.noise_max_ppm,
                          HEAD_DISTURBANCE_FRACTION * config.background_max_ppm, config)
    box = bounding_box(head.mask, margin=2)
    return TensorSample(head.tensor_ppm[(slice(None),) + box], head.mask[box],
                        head.local_fields_ppm[(slice(None),) + box], voxel_size, head.b0_dirs, head.white_matter[box])
