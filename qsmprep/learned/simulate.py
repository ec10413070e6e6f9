"""Training samples for learned dipole inversion, simulated on the fly with the forward model.

A sample is a susceptibility patch (``phantoms.random_shapes`` or ``phantoms.brain_like``), its
mask, a random voxel size, one to ``max_orientations`` random B0 directions and the local
field of each, with noise and a residual background field. Everything is drawn from one seeded
generator per batch, keyed by (seed, stream, step): a run resumed at step k sees the batches an
uninterrupted run would, and the validation stream never overlaps the training one.

The field is computed as benchmarks/simulate_bids.py's ``voxel_averaged_field`` explains: on a
grid ``supersampling`` times finer than the patch (the phantom drawn there, not copied), with
qsmprep's dipole operator zero-padded so it does not wrap, then averaged over each voxel, as a
scanner measures it. The true susceptibility is the voxel average of the fine map.

``GENERATOR_VERSION`` names the distribution of samples: change it whenever a change here or
in ``phantoms`` changes what a given seed produces, so a model card says what it was trained on.
"""
import dataclasses

import numpy as np
from scipy.spatial.transform import Rotation

from qsmprep.science.physics import DipoleOperator

from . import phantoms

GENERATOR_VERSION = '1.0'
TRAINING_STREAM, VALIDATION_STREAM = 0, 1
# Most acquisitions are axial, with B0 along the third voxel axis; the others have any direction.
AXIAL_PROBABILITY = 0.3


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """What the generator draws from; the model card stores it with ``GENERATOR_VERSION``."""
    voxel_size_range_mm: tuple = (0.6, 1.5)
    max_orientations: int = 3
    max_tilt_deg: float = 40.0
    noise_max_ppm: float = 0.005
    # The residual is harmonic over the whole patch, so the L2 start inverts it into large smooth
    # errors. A network trained with residuals of up to 0.01 ppm RMS (as large as a brain patch's
    # field) learned to strip smooth contrast from every input: it shrank the simulated 1 mm head
    # of INVERSION.md by a factor 1.24 and scored worse than its own L2 start (53.7 against 46.7 %
    # NRMSE). 0.003 is 1.5 times the RMS error V-SHARP leaves on that head (0.002 ppm); fine-tuned
    # on it for 2000 steps, the model scored 45.2 % there with a factor 1.11.
    background_max_ppm: float = 0.003
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


def random_b0_directions(rng, count, max_tilt_deg):
    """``count`` unit B0 directions in voxel axes: the first axial or uniform on the sphere, the
    others tilted from it by up to ``max_tilt_deg`` about a random axis, as a head rotates in
    the coil between the orientations of a multi-orientation acquisition."""
    if rng.random() < AXIAL_PROBABILITY:
        first = np.array([0.0, 0.0, 1.0])
    else:
        first = rng.standard_normal(3)
        first /= np.linalg.norm(first)
    directions = [first]
    for _ in range(count - 1):
        axis = np.cross(first, rng.standard_normal(3))
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(0, max_tilt_deg))
        directions.append(Rotation.from_rotvec(angle * axis).apply(first))
    return np.asarray(directions)


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


def simulate_sample(rng, patch_size, orientations, config):
    """One ``TrainingSample`` of ``patch_size`` voxels per side with ``orientations`` fields."""
    s = config.supersampling
    voxel_size = rng.uniform(*config.voxel_size_range_mm, 3)
    fine_shape = (patch_size * s,) * 3
    fine_spacing = voxel_size / s
    kind = 'brain' if rng.random() < config.brain_fraction else 'shapes'
    draw = phantoms.brain_like if kind == 'brain' else phantoms.random_shapes
    fine_chi, fine_mask = draw(rng, fine_shape, fine_spacing)
    mask = _voxel_average(fine_mask.astype(np.float32), s) >= 0.5
    chi = np.where(mask, _voxel_average(fine_chi, s), 0).astype(np.float32)
    b0_dirs = random_b0_directions(rng, orientations, config.max_tilt_deg)
    noise_std = rng.uniform(0, config.noise_max_ppm)
    fields = []
    for b0_dir in b0_dirs:
        operator = DipoleOperator(fine_shape, fine_spacing, b0_dir, pad_factor=config.pad_factor)
        field = _voxel_average(operator.forward(fine_chi), s)
        field += residual_background(rng, field.shape, mask, rng.uniform(0, config.background_max_ppm))
        field += noise_std * rng.standard_normal(field.shape).astype(np.float32)
        fields.append(np.where(mask, field, 0))
    return TrainingSample(chi, mask, np.asarray(fields, dtype=np.float32), voxel_size, b0_dirs, kind)


def simulate_batch(seed, step, batch_size, patch_size, config, stream=TRAINING_STREAM):
    """The batch of ``step``: a list of ``batch_size`` samples sharing one orientation count
    (so their fields stack), each with its own voxel size, directions and phantom."""
    rng = np.random.default_rng([seed, stream, step])
    orientations = int(rng.integers(1, config.max_orientations + 1))
    return [simulate_sample(rng, patch_size, orientations, config) for _ in range(batch_size)]
