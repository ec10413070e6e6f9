"""Background field removal: the local field (ppm) inside the brain from the total field (ppm).

The background field is the field of susceptibility outside the brain mask, harmonic inside it.
The field of the brain's own susceptibility is not fully separable from it: whatever part of it
is harmonic inside the mask (such as the field, deeper inside, of the susceptibility near the
mask's edge) could as well come from outside sources. Classic V-SHARP, PDF and LBV lose that
part (benchmarks/NOTES.md), so the methods below decide it with a prior: the brain's
susceptibility is small (a Tikhonov penalty) while outside sources are free, so a harmonic field
that small brain susceptibility explains, together with the rest of the local field, stays in
the local field.
Measurements: benchmarks/BGREMOVE.md.

- ``vsharp``: variable-radius SHARP. The background is harmonic inside the brain, so the
  spherical mean value (SMV) filter leaves it unchanged and ``field - SMV(field)`` removes it.
  Each voxel uses the largest radius whose sphere fits inside the mask (the mask is eroded by
  the smallest radius). Instead of dividing the stitched high-pass by one radius' kernel
  (truncated), which is wrong wherever a smaller radius was used, the brain susceptibility
  whose high-passed field matches every voxel with that voxel's own radius is fitted
  (Tikhonov, preconditioned conjugate gradients), and its field is the local field. Only
  voxels ``VSHARP_DATA_DEPTH_MM`` inside the mask are data: next to the skull the background
  is too steep to remove to the local field's accuracy.
- ``pdf``: projection onto dipole fields (Liu et al. 2011). The susceptibility outside the mask
  whose field best fits the total field inside it (least squares, conjugate gradients) is
  subtracted; then brain sources are admitted (``_admit_brain_sources``). Both solves start
  from their solutions at twice the voxel size. Keeps the whole mask.
- ``lbv``: Laplacian boundary value (Zhou et al. 2014). The background solves Laplace's equation
  inside the mask with the total field as its value on the mask's edge, so the local field
  solves Poisson's equation with the total field's Laplacian and is 0 on the edge (conjugate
  gradients preconditioned by a box Poisson solver); then brain sources are admitted as in PDF.
  Keeps the mask without its outer voxel layer, where the Laplacian is not measured.

All three work on the mask's bounding box with an empty margin, on an FFT-friendly grid whose
convolutions are periodic: the margin keeps the wrapped copies of the mask away from it. FFT
threads come from ``scipy.fft.set_workers``.
"""
import numpy as np
import scipy.fft
from scipy import ndimage

from .masking import bounding_box, eroded
from .physics import DipoleOperator, dipole_kernel, smv_kernel
from .solvers import conjugate_gradient

BGREMOVE_METHODS = ('vsharp', 'pdf', 'lbv')
# Empty margin around the mask: where PDF and the brain-source fit look for outside sources, and
# V-SHARP's gap between the brain and its periodic copies.
SOURCE_MARGIN_MM = 6.0
VSHARP_MARGIN_MM = 4.0
# V-SHARP takes as data only voxels this deep inside the mask: next to the skull (about -2 ppm)
# no discrete model follows the steep field to the local field's accuracy.
VSHARP_DATA_DEPTH_MM = 4.0
# Tikhonov weight of brain susceptibility against free outside sources (PDF, LBV), relative to
# the dipole kernel; the problem is linear, so it does not depend on the field's scale.
BRAIN_SOURCE_WEIGHT = 0.1
# V-SHARP fits high-passed data, whose low frequencies are weak: its iteration count
# regularises, and this small weight only keeps the problem definite.
VSHARP_WEIGHT = 0.003
# Floor of V-SHARP's preconditioner, the normal operator as if the mask were the whole space.
VSHARP_PRECONDITIONER_FLOOR = 0.1
# V-SHARP and PDF are far from converged after their iterations, which are part of their
# regularisation; PDF does most of them on a grid of twice the voxel size (``_pdf_coarse_start``).
VSHARP_ITERATIONS = 26
PDF_COARSE_ITERATIONS = 60
PDF_COARSE_BRAIN_ITERATIONS = 40
PDF_ITERATIONS = 40
PDF_BRAIN_ITERATIONS = 10
CG_TOLERANCE = 1e-7
# LBV's Poisson problem is well posed: its result no longer changes below this residual.
LBV_TOLERANCE = 1e-4
# How each value was chosen: benchmarks/NOTES.md.


class _MaskGrid:
    """The mask's bounding box with ``margin`` empty voxels on every side, on a fast FFT shape.

    Only the field inside the mask is used, so the box may reach past the image's edge.
    """

    def __init__(self, mask, margin, sine=False):
        self.image_shape = mask.shape
        self.box = bounding_box(mask, margin=0)
        extent = [s.stop - s.start for s in self.box]
        if sine:  # a type-I sine transform of n points is an FFT of 2 (n + 1)
            self.shape = tuple(scipy.fft.next_fast_len(n + 2 * margin + 1) - 1 for n in extent)
        else:
            # Factors 7 and 11 allowed: as fast per voxel as sizes of 2, 3 and 5 only, which
            # can be 23 % larger (benchmarks/NOTES.md).
            self.shape = tuple(scipy.fft.next_fast_len(n + 2 * margin) for n in extent)
        self.inner = tuple(slice(margin, margin + n) for n in extent)

    def embed(self, volume):
        out = np.zeros(self.shape, dtype=volume.dtype)
        out[self.inner] = volume[self.box]
        return out

    def extract(self, array):
        out = np.zeros(self.image_shape, dtype=array.dtype)
        out[self.box] = array[self.inner]
        return out


def _convolve(volume, kernel, shape):
    """Periodic convolution with a kernel given on the rfft grid (float32 in, float32 out)."""
    spectrum = scipy.fft.rfftn(volume)
    spectrum *= kernel
    return scipy.fft.irfftn(spectrum, s=shape, overwrite_x=True)


def _fit_sources(field, data, sources, dipole, shape, penalty, iterations, start=None):
    """Susceptibility on ``sources`` minimising ||data (field - D chi)||^2 + ||penalty chi||^2.

    ``start``: the iterations' starting point (0 when not given).
    """
    data, sources = data.astype(np.float32), sources.astype(np.float32)
    penalty_squared = np.asarray(penalty, dtype=np.float32) ** 2

    def normal_operator(chi):
        field_of_chi = _convolve(chi, dipole, shape)
        field_of_chi *= data
        result = _convolve(field_of_chi, dipole, shape)
        result += penalty_squared * chi
        result *= sources
        return result

    rhs = _convolve(field * data, dipole, shape) * sources
    return conjugate_gradient(normal_operator, rhs, iterations, CG_TOLERANCE, start=start)


def _fit_brain_sources(field, data, brain, dipole, shape, weight, iterations, start=None):
    """Brain susceptibility (penalised by ``weight``) and outside susceptibility (free), fitted
    together to ``field`` on ``data``.
    """
    everywhere = np.ones(shape, dtype=bool)
    return _fit_sources(field, data, everywhere, dipole, shape, np.where(brain, np.float32(weight), 0), iterations,
                        start)


def _admit_brain_sources(field, data, brain, dipole, shape, weight, iterations, start=None):
    """``field`` (background removed) less the harmonic part that outside sources explain better.

    Only the outside sources' field of ``_fit_brain_sources`` is subtracted.
    """
    chi = _fit_brain_sources(field, data, brain, dipole, shape, weight, iterations, start)
    return np.where(data, field - _convolve(np.where(brain, 0, chi), dipole, shape), 0).astype(np.float32)


def _halve_resolution(volume, shape):
    """Means of 2x2x2 blocks on a grid of ``shape`` (the volume zero-padded to twice it)."""
    padded = np.zeros([2 * n for n in shape], dtype=np.float32)
    padded[tuple(slice(0, n) for n in volume.shape)] = volume
    return padded.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))


def _double_resolution(volume, shape):
    """Each voxel repeated as a 2x2x2 block, cropped to ``shape``: the inverse of ``_halve_resolution``."""
    doubled = volume.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    return doubled[tuple(slice(0, n) for n in shape)]


def _pdf_coarse_start(field, inside, voxel_size, b0_dir, brain_weight, with_brain_sources):
    """PDF's outside and brain-source susceptibility solved at twice the voxel size, on ``field``'s grid.

    The smooth outside sources, whose fields inside the mask are weakest, converge slowest; on
    the coarse grid (an eighth of the voxels) their iterations are cheap. Returns the starting
    points of the two solves on the image grid (the second None without brain sources).
    """
    coarse_shape = tuple(scipy.fft.next_fast_len((n + 1) // 2) for n in field.shape)
    share_inside = _halve_resolution(inside.astype(np.float32), coarse_shape)
    coarse_inside = share_inside > 0.5
    # The mean field over each block's mask voxels.
    coarse_field = np.where(coarse_inside, _halve_resolution(field, coarse_shape) / np.maximum(share_inside, 0.5),
                            0).astype(np.float32)
    coarse_voxel_size = [2 * v for v in voxel_size]
    dipole = dipole_kernel(coarse_shape, coarse_voxel_size, b0_dir)
    outside_chi = _fit_sources(coarse_field, coarse_inside, ~coarse_inside, dipole, coarse_shape, 0.0,
                               PDF_COARSE_ITERATIONS)
    outside_start = np.where(inside, 0, _double_resolution(outside_chi, field.shape)).astype(np.float32)
    if not with_brain_sources:
        return outside_start, None
    local_field = np.where(coarse_inside, coarse_field - _convolve(outside_chi, dipole, coarse_shape),
                           0).astype(np.float32)
    chi = _fit_brain_sources(local_field, coarse_inside, coarse_inside, dipole, coarse_shape, brain_weight,
                             PDF_COARSE_BRAIN_ITERATIONS)
    return outside_start, _double_resolution(chi, field.shape).astype(np.float32)


def default_radii_mm(voxel_size, largest_mm=12.0, smallest_mm=2.0):
    """V-SHARP's radii: ``largest_mm`` and the erosion radius, ``smallest_mm`` but at least one voxel.

    Two radii suffice because every voxel is fitted with its own radius' kernel; intermediate
    radii add an FFT pair per iteration each. Within 2 mm of the skull the steep background
    is not averaged out by a smaller sphere.
    """
    finest, coarsest = float(min(voxel_size)), float(max(voxel_size))
    # When even the finest axis is coarser than ``smallest_mm``, a one-voxel sphere (7 voxels) is
    # too small to average (benchmarks/NOTES.md).
    smallest = max(smallest_mm, 2 * finest if finest > smallest_mm else coarsest)
    return [float(max(largest_mm, smallest)), smallest]


def vsharp(total_field_ppm, mask, voxel_size, b0_dir, radii_mm=None, iterations=VSHARP_ITERATIONS,
           weight=VSHARP_WEIGHT):
    """Local field (ppm) and the eroded mask on which it is valid."""
    mask = np.asarray(mask, dtype=bool)
    radii_mm = sorted(radii_mm or default_radii_mm(voxel_size), reverse=True)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32), mask
    grid = _MaskGrid(mask, margin=int(np.ceil(VSHARP_MARGIN_MM / min(voxel_size))))
    shape = grid.shape
    brain = grid.embed(mask)
    field_spectrum = scipy.fft.rfftn(grid.embed(np.where(mask, total_field_ppm, 0).astype(np.float32)))
    mask_spectrum = scipy.fft.rfftn(brain.astype(np.float32))
    dipole = dipole_kernel(shape, voxel_size, b0_dir)
    # Per radius: the voxels that use it (as 0/1 weights) and the high-pass of the field there;
    # the data operator of a voxel is (1 - SMV_r) D, with the kernel of its own radius r. Only
    # voxels deeper than VSHARP_DATA_DEPTH_MM are data; the fitted susceptibility's field is the
    # local field on the whole eroded mask.
    deep = grid.embed(eroded(mask, VSHARP_DATA_DEPTH_MM, voxel_size))
    assigned = np.zeros(shape, dtype=bool)
    radius_weights, radius_kernels, high_passed = [], [], []
    for radius in radii_mm:
        sphere = smv_kernel(shape, voxel_size, radius)
        fits_inside = (scipy.fft.irfftn(mask_spectrum * sphere, s=shape) > 0.999) & brain
        weights = (fits_inside & deep & ~assigned).astype(np.float32)
        assigned |= fits_inside
        high_pass = (1 - sphere).astype(np.float32)
        radius_weights.append(weights)
        radius_kernels.append(high_pass * dipole)
        high_passed.append(scipy.fft.irfftn(field_spectrum * high_pass, s=shape) * weights)
    inside = brain.astype(np.float32)

    def adjoint(per_radius):
        spectrum = np.zeros(radius_kernels[0].shape, dtype=np.complex64)
        for values, kernel in zip(per_radius, radius_kernels):
            part = scipy.fft.rfftn(values)
            part *= kernel
            spectrum += part
        result = scipy.fft.irfftn(spectrum, s=shape, overwrite_x=True)
        result *= inside
        return result

    def normal_operator(chi):
        spectrum = scipy.fft.rfftn(chi)
        per_radius = []
        for weights, kernel in zip(radius_weights, radius_kernels):
            values = scipy.fft.irfftn(spectrum * kernel, s=shape, overwrite_x=True)
            values *= weights
            per_radius.append(values)
        result = adjoint(per_radius)
        result += np.float32(weight ** 2) * chi
        return result

    # See VSHARP_PRECONDITIONER_FLOOR: an approximate inverse that is diagonal in k-space.
    fitted_voxels = max(float(sum(weights.sum() for weights in radius_weights)), 1.0)
    normal_kernel = sum(weights.sum() / fitted_voxels * kernel ** 2
                        for weights, kernel in zip(radius_weights, radius_kernels))
    inverse = (1 / (normal_kernel + VSHARP_PRECONDITIONER_FLOOR ** 2)).astype(np.float32)

    def precondition(residual):
        result = _convolve(residual, inverse, shape)
        result *= inside
        return result

    chi = conjugate_gradient(normal_operator, adjoint(high_passed), iterations, CG_TOLERANCE, precondition)
    # The local field is the linear (zero-padded) convolution: the periodic one would add the
    # fields of the wrapped copies of the brain.
    local_field = DipoleOperator(shape, voxel_size, b0_dir, pad_factor=1.5).forward(chi)
    valid = grid.extract(assigned)
    return np.where(valid, grid.extract(local_field), 0).astype(np.float32), valid


def pdf(total_field_ppm, mask, voxel_size, b0_dir, iterations=PDF_ITERATIONS,
        brain_iterations=PDF_BRAIN_ITERATIONS, brain_weight=BRAIN_SOURCE_WEIGHT):
    """Local field (ppm) by projection onto dipole fields, and the (unchanged) mask.

    ``iterations`` and ``brain_iterations`` are those on the image grid, after the coarse start.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32), mask
    grid = _MaskGrid(mask, margin=int(np.ceil(SOURCE_MARGIN_MM / min(voxel_size))))
    inside = grid.embed(mask)
    field = grid.embed(np.where(mask, total_field_ppm, 0).astype(np.float32))
    dipole = dipole_kernel(grid.shape, voxel_size, b0_dir)
    outside_start, brain_start = _pdf_coarse_start(field, inside, voxel_size, b0_dir, brain_weight,
                                                   with_brain_sources=brain_iterations > 0)
    outside_chi = _fit_sources(field, inside, ~inside, dipole, grid.shape, 0.0, iterations, outside_start)
    local_field = np.where(inside, field - _convolve(outside_chi, dipole, grid.shape), 0).astype(np.float32)
    if brain_iterations:
        local_field = _admit_brain_sources(local_field, inside, inside, dipole, grid.shape, brain_weight,
                                           brain_iterations, brain_start)
    return grid.extract(local_field), mask


def _laplacian(volume, voxel_size):
    """Seven-point Laplacian; the grid's margin is empty, so the wrap-around adds nothing."""
    result = np.zeros_like(volume)
    for axis, step in enumerate(voxel_size):
        result += (np.roll(volume, 1, axis) + np.roll(volume, -1, axis) - 2 * volume) / np.float32(step ** 2)
    return result


def lbv(total_field_ppm, mask, voxel_size, b0_dir, iterations=60, brain_iterations=20,
        brain_weight=BRAIN_SOURCE_WEIGHT):
    """Local field (ppm) by the Laplacian boundary value method, and the mask it is valid on."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32), mask
    grid = _MaskGrid(mask, margin=1, sine=True)
    inside = grid.embed(mask)
    # Unknowns: the voxels whose 7-point stencil lies inside the mask; the others are the edge.
    unknown = ndimage.binary_erosion(inside)
    field = grid.embed(np.where(mask, total_field_ppm, 0).astype(np.float32))
    # Eigenvalues of the negative Laplacian with zero (Dirichlet) values around the grid, which
    # the type-I sine transform diagonalises: the box's Poisson solver, the preconditioner.
    eigenvalues = sum((2 - 2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1))).reshape(
        [-1 if a == axis else 1 for a in range(3)]) / step ** 2
        for axis, (n, step) in enumerate(zip(grid.shape, voxel_size))).astype(np.float32)

    def negative_laplacian(volume):
        return np.where(unknown, -_laplacian(volume, voxel_size), 0).astype(np.float32)

    def precondition(residual):
        solved = scipy.fft.idstn(scipy.fft.dstn(residual, type=1) / eigenvalues, type=1)
        return np.where(unknown, solved, 0).astype(np.float32)

    local_field = grid.extract(conjugate_gradient(negative_laplacian, negative_laplacian(field), iterations,
                                                  LBV_TOLERANCE, precondition))
    valid = grid.extract(unknown)
    if brain_iterations:
        grid = _MaskGrid(mask, margin=int(np.ceil(SOURCE_MARGIN_MM / min(voxel_size))))
        dipole = dipole_kernel(grid.shape, voxel_size, b0_dir)
        local_field = grid.extract(_admit_brain_sources(grid.embed(local_field), grid.embed(valid), grid.embed(mask),
                                                        dipole, grid.shape, brain_weight, brain_iterations))
    return local_field, valid


def remove_background(total_field_ppm, mask, voxel_size, b0_dir, method='vsharp', **options):
    """Dispatch to a background removal method; returns ``(local_field_ppm, valid_mask)``."""
    if method not in BGREMOVE_METHODS:
        raise ValueError(f'unknown background removal method {method!r}; choose from {BGREMOVE_METHODS}')
    local_field, valid = {'vsharp': vsharp, 'pdf': pdf, 'lbv': lbv}[method](total_field_ppm, mask, voxel_size, b0_dir,
                                                                           **options)
    if not np.any(valid):
        raise ValueError(f'{method} left no voxel of the mask ({int(np.count_nonzero(mask))} voxels): the mask '
                         f'is too thin or small for background removal; check the brain mask')
    return local_field, valid
