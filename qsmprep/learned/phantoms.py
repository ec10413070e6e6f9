"""Random susceptibility maps (ppm) for training: random shapes and brain-like patches.

Both are drawn on an arbitrary, possibly anisotropic, grid (``shape``, ``spacing_mm``) centred
on the patch, so the simulator can draw them on a grid finer than the patch's voxels. Each
returns ``(chi_ppm, mask)``, and the brain-like ones also their white matter fraction (for
the anisotropy's field): the susceptibility is 0 outside the mask, because the local field is
the field of the susceptibility inside the mask.

The brain-like patches are cut from the MNI152 2009a grey and white matter maps that nilearn
ships (the same template benchmarks/simulate_bids.py builds its head from), with random tissue
values, a random rotation, a smooth random deformation, and random nuclei, veins,
calcifications and microbleeds. nilearn is needed only for them.
"""
import functools
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.spatial.transform import Rotation

MNI_FILES = {
    'gm': 'mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz',
    'wm': 'mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz',
}

# Tissue susceptibility ranges in ppm (relative, as every Chimap is referenced).
CHI_WM_RANGE = (-0.06, -0.01)
CHI_GM_RANGE = (0.0, 0.05)
CHI_CSF_RANGE = (-0.01, 0.01)
TEXTURE_STD_RANGE = (0.0, 0.015)
TEXTURE_CORRELATION_MM = (1.0, 4.0)
# Inclusions in brain patches: (largest count, radius range in mm, chi range in ppm, elongated).
# Nuclei are ellipsoids, veins tubes; calcifications are diamagnetic and microbleeds strongly
# paramagnetic small spheres.
BRAIN_INCLUSIONS = {
    'nucleus': (3, (2.0, 8.0), (0.03, 0.2), False),
    'vein': (4, (0.4, 2.0), (0.2, 0.5), True),
    'calcification': (2, (0.5, 3.0), (-0.4, -0.05), False),
    'microbleed': (2, (0.5, 2.0), (0.3, 1.2), False),
}
# Smooth deformation of the template: a sum of plane waves of displacement, each up to
# DEFORMATION_MAX_MM / DEFORMATION_WAVES, with wavelengths longer than the structures they bend.
DEFORMATION_MAX_MM = 4.0
DEFORMATION_WAVES = 4
DEFORMATION_WAVELENGTH_MM = (30.0, 90.0)
# White matter fibre directions vary smoothly over this distance (a fibre bundle's width).
FIBRE_SMOOTHING_MM = 6.0
# Random shapes: (largest count, radius range in mm, chi range in ppm, elongated).
SHAPES = {
    'ellipsoid': (16, (1.0, 12.0), (-0.2, 0.3), False),
    'tube': (6, (0.3, 2.5), (-0.1, 0.5), True),
}
# Some shapes are several times stronger, as haemorrhages and calcifications are.
STRONG_SHAPE_PROBABILITY = 0.1
STRONG_SHAPE_FACTOR = 4.0


def local_coordinates(shape, spacing_mm):
    """Coordinates in mm of the voxel centres of ``shape``, centred on the grid, one per axis."""
    coordinates = []
    for axis, (n, d) in enumerate(zip(shape, spacing_mm)):
        view = [1, 1, 1]
        view[axis] = n
        coordinates.append(((np.arange(n) - (n - 1) / 2) * d).reshape(view).astype(np.float32))
    return coordinates


def smooth_noise(rng, shape, spacing_mm, correlation_mm):
    """Gaussian random field of unit standard deviation, smooth over ``correlation_mm`` (periodic)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    frequencies = [np.fft.fftfreq(n, d) for n, d in zip(shape[:-1], spacing_mm[:-1])]
    frequencies.append(np.fft.rfftfreq(shape[-1], spacing_mm[-1]))
    k_squared = sum(f.reshape([-1 if a == i else 1 for a in range(3)]) ** 2 for i, f in enumerate(frequencies))
    smooth = scipy.fft.irfftn(scipy.fft.rfftn(noise) * np.exp(-2 * np.pi ** 2 * correlation_mm ** 2 * k_squared),
                              s=shape).astype(np.float32)
    return smooth / max(float(smooth.std()), 1e-12)


def random_fibre_directions(rng, shape, spacing_mm):
    """Unit vectors (3, *shape) varying smoothly over ``FIBRE_SMOOTHING_MM``: fibre directions."""
    sigma = [FIBRE_SMOOTHING_MM / d for d in spacing_mm]
    directions = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
                           for _ in range(3)])
    return directions / np.maximum(np.linalg.norm(directions, axis=0), 1e-12)


def _ellipsoid(coordinates, centre, radii, rotation):
    """Voxels inside an ellipsoid of ``radii`` (mm) with axes rotated by ``rotation``."""
    inside = 0
    for axis in range(3):
        along = sum(rotation[row, axis] * (c - centre[row]) for row, c in enumerate(coordinates))
        inside = inside + (along / radii[axis]) ** 2
    return inside <= 1


def _tube(coordinates, centre, direction, radius):
    """Voxels within ``radius`` (mm) of the line through ``centre`` along unit ``direction``."""
    relative = [c - p for c, p in zip(coordinates, centre)]
    along = sum(r * d for r, d in zip(relative, direction))
    return sum((r - along * d) ** 2 for r, d in zip(relative, direction)) <= radius ** 2


def _add_inclusions(rng, chi, coordinates, extent_mm, inclusions, strong_probability=0.0):
    """Add random ellipsoids and tubes of ``inclusions`` (a table as ``SHAPES``) to ``chi`` in place."""
    for count_max, radius_range, chi_range, elongated in inclusions.values():
        for _ in range(rng.integers(0, count_max + 1)):
            centre = rng.uniform(-0.5, 0.5, 3) * extent_mm
            rotation = Rotation.random(random_state=rng).as_matrix()
            value = rng.uniform(*chi_range)
            if rng.random() < strong_probability:
                value *= STRONG_SHAPE_FACTOR
            if elongated:
                region = _tube(coordinates, centre, rotation[:, 0], rng.uniform(*radius_range))
            else:
                region = _ellipsoid(coordinates, centre, rng.uniform(*radius_range, 3), rotation)
            chi[region] += value


def random_shapes(rng, shape, spacing_mm):
    """Ellipsoids and tubes of random sizes and values on a smooth texture, in a random mask.

    Half the masks are the whole patch, half a large ellipsoid within it, so the network sees
    mask edges that cut through structures as well as patches of data without edges.
    """
    coordinates = local_coordinates(shape, spacing_mm)
    extent_mm = np.asarray(shape) * np.asarray(spacing_mm)
    chi = rng.uniform(*TEXTURE_STD_RANGE) * smooth_noise(rng, shape, spacing_mm,
                                                          rng.uniform(*TEXTURE_CORRELATION_MM))
    _add_inclusions(rng, chi, coordinates, extent_mm, SHAPES, STRONG_SHAPE_PROBABILITY)
    mask = np.ones(shape, dtype=bool) if rng.random() < 0.5 else random_ellipsoid(rng, coordinates, extent_mm)
    return np.where(mask, chi, 0).astype(np.float32), mask


def random_ellipsoid(rng, coordinates, extent_mm):
    """A large ellipsoid of random axes near the centre of a patch of ``extent_mm``: a mask edge."""
    radii = rng.uniform(0.3, 0.6, 3) * extent_mm
    return _ellipsoid(coordinates, rng.uniform(-0.1, 0.1, 3) * extent_mm, radii,
                      Rotation.random(random_state=rng).as_matrix())


@functools.lru_cache(maxsize=1)
def mni_tissue_maps():
    """Grey and white matter fractions and a brain probability on the 1 mm MNI152 grid (cached).

    The brain is grey plus white matter closed by 3 mm and filled, so it holds the ventricles
    (as CSF) as the brain masks of real data do. The closing is three steps of the 6-neighbour
    cross rather than a ball (as benchmarks/simulate_bids.py uses): within 0.6 % of its voxels
    and five times faster.
    """
    # Only nilearn's files are read: importing nilearn.datasets would pull in pandas, requests and
    # scikit-learn, which a GPU machine given only the wheels of nilearn and nibabel lacks.
    nilearn_spec = importlib.util.find_spec('nilearn')
    if nilearn_spec is None:
        raise ImportError('brain-like training patches need nilearn (pip install nilearn), '
                          'which ships the MNI152 tissue maps')
    data_dir = Path(nilearn_spec.origin).parent / 'datasets' / 'data'
    maps = {key: nib.load(data_dir / name).get_fdata(dtype=np.float32) / 255.0 for key, name in MNI_FILES.items()}
    cross = ndimage.generate_binary_structure(3, 1)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(maps['gm'] + maps['wm'] > 0.5, cross, iterations=3))
    maps['brain'] = brain.astype(np.float32)
    return maps


def _random_brain_centre(rng, brain):
    """A random voxel index inside the brain (rejection sampling on the whole grid)."""
    while True:
        index = tuple(rng.integers(0, n) for n in brain.shape)
        if brain[index] > 0.5:
            return np.asarray(index, dtype=np.float32)


def _deformation(rng, coordinates):
    """Smooth random displacements (mm) at ``coordinates``, one array per axis."""
    displacement = [0, 0, 0]
    for _ in range(DEFORMATION_WAVES):
        wave_vector = rng.standard_normal(3)
        wave_vector *= 2 * np.pi / (np.linalg.norm(wave_vector) * rng.uniform(*DEFORMATION_WAVELENGTH_MM))
        wave = np.cos(sum(k * c for k, c in zip(wave_vector, coordinates)) + rng.uniform(0, 2 * np.pi))
        amplitude = rng.uniform(-1, 1, 3) * DEFORMATION_MAX_MM / DEFORMATION_WAVES
        displacement = [d + a * wave for d, a in zip(displacement, amplitude)]
    return displacement


def brain_centre():
    """The centre of mass of the template's brain, as a template voxel index."""
    return np.asarray(ndimage.center_of_mass(mni_tissue_maps()['brain']), dtype=np.float32)


def brain_like(rng, shape, spacing_mm, centre=None):
    """A patch of a randomised MNI152 brain: tissue values, rotation, deformation and inclusions,
    around ``centre`` (a template voxel index; default: a random voxel of the brain).

    Returns ``(chi_ppm, mask, white_matter)``, the last the white matter fraction (0 outside the
    mask), where the simulator puts susceptibility anisotropy."""
    maps = mni_tissue_maps()
    coordinates = local_coordinates(shape, spacing_mm)
    rotation = Rotation.random(random_state=rng).as_matrix().astype(np.float32)
    if centre is None:
        centre = _random_brain_centre(rng, maps['brain'])
    displacement = _deformation(rng, coordinates)
    # The MNI maps are 1 mm isotropic, so template mm are template voxel indices (from the centre).
    template_indices = [centre[row] + displacement[row] + sum(rotation[row, axis] * coordinates[axis]
                                                               for axis in range(3)) for row in range(3)]

    def sample(volume):
        return ndimage.map_coordinates(volume, template_indices, order=1, mode='constant', cval=0.0)

    mask = sample(maps['brain']) > 0.5
    wm, gm = sample(maps['wm']), sample(maps['gm'])
    csf = np.clip(1 - wm - gm, 0, 1)
    chi = (rng.uniform(*CHI_WM_RANGE) * wm + rng.uniform(*CHI_GM_RANGE) * gm + rng.uniform(*CHI_CSF_RANGE) * csf
           + rng.uniform(*TEXTURE_STD_RANGE) * smooth_noise(rng, shape, spacing_mm,
                                                             rng.uniform(*TEXTURE_CORRELATION_MM)))
    extent_mm = np.asarray(shape) * np.asarray(spacing_mm)
    _add_inclusions(rng, chi, coordinates, extent_mm, BRAIN_INCLUSIONS)
    return np.where(mask, chi, 0).astype(np.float32), mask, np.where(mask, wm, 0).astype(np.float32)
