"""The dipole physics shared by every stage: constants, B0 direction, dipole kernel and operator.

Conventions (../shared/CONVENTIONS.md): fields and susceptibility in ppm, the dipole kernel
D(k) = 1/3 - (k.h)^2/|k|^2 with k from ``fftfreq(n, d=voxel_size)`` and D(0) = 0, and the B0
direction h expressed in the voxel axes of the array as nibabel loads it.
"""
import itertools

import numpy as np
import scipy.fft

GAMMA_BAR_MHZ_PER_T = 42.57747892
# Spheres and balls of a radius in mm include the voxels up to the radius plus this much. Voxel
# sizes read from a rotated float32 affine carry errors of about 1e-7: a 1 mm grid tilted by 18
# degrees reads as (1, 1.00000003, 1.00000003) mm, which moved the lattice points at exactly 2
# and 12 mm out of V-SHARP's spheres along two axes but not the third, and took the local
# field's NRMSE on the tilted simulated head from 30 to 40 %. 0.1 micrometre is far below any
# voxel size and far above those errors.
DISTANCE_TOLERANCE_MM = 1e-4


def hz_per_ppm(field_strength_t):
    """Frequency offset in Hz of a 1 ppm field at ``field_strength_t`` tesla."""
    return GAMMA_BAR_MHZ_PER_T * field_strength_t


def voxel_size_from_affine(affine):
    """Voxel size in mm: the norms of the columns of the affine's 3x3 part."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def b0_direction_from_affine(affine):
    """Unit B0 direction in voxel axes: h = R^T (0, 0, 1), R the affine's rotation.

    Scanner (world) z is the B0 axis; R is the 3x3 part of the affine with each column divided
    by its voxel size, so h is the third row of R.
    """
    rotation = np.asarray(affine, dtype=float)[:3, :3] / voxel_size_from_affine(affine)
    b0_dir = rotation.T @ np.array([0.0, 0.0, 1.0])
    return b0_dir / np.linalg.norm(b0_dir)


def padded_shape(shape, factor=1.0, multiple=8):
    """Shape at least ``factor`` times ``shape``, rounded up to FFT-friendly sizes."""
    return tuple(scipy.fft.next_fast_len(int(np.ceil(n * factor / multiple)) * multiple, real=True)
                 for n in shape)


def kspace_grid(shape, voxel_size, real=True):
    """Spatial frequencies (1/mm) per axis, broadcastable, for an (r)fft of ``shape``."""
    axes = []
    for axis, (n, d) in enumerate(zip(shape, voxel_size)):
        is_last = axis == len(shape) - 1
        freqs = np.fft.rfftfreq(n, d=d) if (real and is_last) else np.fft.fftfreq(n, d=d)
        view = [1] * len(shape)
        view[axis] = freqs.size
        axes.append(freqs.reshape(view).astype(np.float32))
    return axes


def dipole_kernel(shape, voxel_size, b0_dir, real=True, voxel_averaged=True):
    """Dipole kernel D(k) on the (r)fft grid of ``shape``; D(0) = 0. float32.

    ``voxel_averaged`` (the default) gives the kernel that maps susceptibility constant within
    each voxel to the field averaged over each voxel, as a scanner measures it: D at every
    frequency that aliases onto a grid frequency (k + m / voxel_size), weighted by the voxel's
    box response sinc^2. Without it D is sampled at the grid frequencies alone, which for an
    oblique B0 is discontinuous across the Nyquist frequency (k and k - 1/d are one sample but
    D differs; benchmarks/NOTES.md). Simulations that average a finer grid themselves use the
    point kernel on it.
    """
    b0_dir = np.asarray(b0_dir, dtype=np.float64)
    b0_dir = b0_dir / np.linalg.norm(b0_dir)
    frequencies = kspace_grid(shape, voxel_size, real=real)
    if voxel_averaged:
        # Per axis the frequency itself and its nearest alias on the other side of the Nyquist
        # frequency carry at least 81 % of the box response's weight (all of it at k = 0 and 0.81
        # at the Nyquist frequency, where the two are a symmetric pair); the weights are normalised.
        candidates = []
        for k, d in zip(frequencies, voxel_size):
            alias = k - np.sign(k) / np.float32(d)
            candidates.append([(k, np.sinc(k * d) ** 2), (alias, np.where(k == 0, 0, np.sinc(alias * d) ** 2))])
    else:
        candidates = [[(k, np.ones_like(k))] for k in frequencies]
    # kernel = 1/3 - sum_c w_c (k_c.h)^2 / |k_c|^2 / sum_c w_c; the weights are products of one
    # factor per axis, so their sum is too. Accumulated in place: the grid can hold 10^8 entries.
    shape = np.broadcast_shapes(*(k.shape for k in frequencies))
    ratio_sum = np.zeros(shape, dtype=np.float32)
    k_dot_h, k_squared = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    h = [np.float32(component) for component in b0_dir]
    for (k0, w0), (k1, w1), (k2, w2) in itertools.product(*candidates):
        np.add(k0 * h[0], k1 * h[1], out=k_dot_h)
        k_dot_h += k2 * h[2]
        np.add(k0 ** 2, k1 ** 2, out=k_squared)
        k_squared += k2 ** 2
        k_squared[k_squared == 0] = np.inf  # only k = 0, set below
        np.square(k_dot_h, out=k_dot_h)
        k_dot_h /= k_squared
        k_dot_h *= (w0 * w1).astype(np.float32)
        k_dot_h *= w2.astype(np.float32)
        ratio_sum += k_dot_h
    total_weight = 1
    for weights in candidates:
        total_weight = total_weight * sum(weight for _, weight in weights).astype(np.float32)
    ratio_sum /= total_weight
    kernel = np.subtract(np.float32(1.0 / 3.0), ratio_sum, out=ratio_sum)
    kernel[0, 0, 0] = 0.0
    return kernel


def anisotropic_field(anisotropy_ppm, fibre_directions, voxel_size, b0_dir, pad_factor=1.5):
    """Field (ppm) of the traceless susceptibility tensor ``anisotropy_ppm`` (n n^T - I/3).

    This is white matter's anisotropic susceptibility: ``anisotropy_ppm`` is chi_parallel -
    chi_perpendicular in each voxel (0 outside white matter) and ``fibre_directions`` (3, *shape)
    the unit fibre direction n in voxel axes. The field of a tensor X is F^-1[h^T X h / 3 -
    (k.h)(k^T X h) / |k|^2]; its trace is 0, so it leaves the mean susceptibility unchanged and
    no scalar map explains its field: the model error of single-orientation QSM in white matter.
    With n along h it is 2/3 of the dipole field of ``anisotropy_ppm``, with n across h -1/3 of
    it. The FFT grid is zero-padded by ``pad_factor`` so the convolution does not wrap.
    """
    shape = np.shape(anisotropy_ppm)
    fft_shape = padded_shape(shape, factor=pad_factor)
    h = np.asarray(b0_dir, dtype=np.float64) / np.linalg.norm(b0_dir)
    n_dot_h = sum(fibre_directions[i] * np.float32(h[i]) for i in range(3))
    k = kspace_grid(fft_shape, voxel_size)
    k_squared = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    k_squared[0, 0, 0] = 1.0
    k_dot_h = sum(k[i] * np.float32(h[i]) for i in range(3))
    spectrum = scipy.fft.rfftn(anisotropy_ppm * (n_dot_h ** 2 - 1 / 3), s=fft_shape) / 3
    for j in range(3):
        column = anisotropy_ppm * (fibre_directions[j] * n_dot_h - np.float32(h[j]) / 3)  # (X h)_j
        spectrum -= k_dot_h * k[j] / k_squared * scipy.fft.rfftn(column, s=fft_shape)
    spectrum[0, 0, 0] = 0
    field = scipy.fft.irfftn(spectrum, s=fft_shape)
    return field[tuple(slice(0, n) for n in shape)].astype(np.float32)


def smv_kernel(shape, voxel_size, radius_mm, real=True):
    """Fourier transform of a normalised sphere of ``radius_mm`` (the spherical mean value).

    The sphere is sampled on the voxel grid centred at the origin (wrapped), so that its
    transform is real and the kernel's DC value is exactly 1.
    """
    grids = [np.fft.fftfreq(n, d=1.0 / n) * d for n, d in zip(shape, voxel_size)]
    x, y, z = np.meshgrid(*grids, indexing='ij', sparse=True)
    sphere = ((x ** 2 + y ** 2 + z ** 2) <= (radius_mm + DISTANCE_TOLERANCE_MM) ** 2).astype(np.float32)
    sphere /= sphere.sum()
    transform = scipy.fft.rfftn(sphere) if real else scipy.fft.fftn(sphere)
    return np.real(transform).astype(np.float32)


class DipoleOperator:
    """The dipole convolution for one grid, voxel size and B0 direction: forward and adjoint.

    ``pad_factor`` > 1 zero-pads the volume before the FFT so that the convolution does not
    wrap around; the operator is then the exact linear convolution cropped to the input grid.
    """

    def __init__(self, shape, voxel_size, b0_dir, pad_factor=1.0, voxel_averaged=True):
        self.shape = tuple(int(n) for n in shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.b0_dir = np.asarray(b0_dir, dtype=float) / np.linalg.norm(b0_dir)
        self.fft_shape = padded_shape(self.shape, pad_factor) if pad_factor > 1 else self.shape
        self.kernel = dipole_kernel(self.fft_shape, self.voxel_size, self.b0_dir, voxel_averaged=voxel_averaged)

    def _convolve(self, volume):
        spectrum = scipy.fft.rfftn(np.asarray(volume, dtype=np.float32), s=self.fft_shape)
        result = scipy.fft.irfftn(spectrum * self.kernel, s=self.fft_shape)
        return result[tuple(slice(0, n) for n in self.shape)].astype(np.float32)

    def forward(self, chi_ppm):
        """Field (ppm) produced by susceptibility ``chi_ppm``."""
        return self._convolve(chi_ppm)

    def adjoint(self, field_ppm):
        """Adjoint of ``forward``: the kernel is real and even, so the same convolution."""
        return self._convolve(field_ppm)
