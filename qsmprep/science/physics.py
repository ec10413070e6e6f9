"""The dipole physics of every method and simulation: constants, B0 direction, kernels, operator.

Conventions (../shared/CONVENTIONS.md): fields and susceptibility in ppm, the dipole kernel
D(k) = 1/3 - (k.h)^2/|k|^2 with k from ``fftfreq(n, d=voxel_size)`` and D(0) = 0, and the B0
direction h expressed in the voxel axes of the array as nibabel loads it. ``DipoleOperator`` is
the forward model for one or several orientations and scalar or tensor susceptibility, on numpy
arrays or torch tensors; methods that work in k-space take its ``kernel`` (or ``dipole_kernel``
on their own grid).
"""
import itertools

import numpy as np
import scipy.fft

GAMMA_BAR_MHZ_PER_T = 42.57747892
# Spheres and balls of a radius in mm include the voxels up to the radius plus this much: voxel
# sizes read from a rotated float32 affine are off by about 1e-7 mm (benchmarks/NOTES.md).
DISTANCE_TOLERANCE_MM = 1e-4
TENSOR_COMPONENTS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # chi11, chi12, ... (CONVENTIONS.md)
FFT_AXES = (-3, -2, -1)


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


def _alias_candidates(frequencies, voxel_size, voxel_averaged):
    """Per axis, the frequencies that contribute to each grid frequency and their weights.

    Voxel-averaged: the frequency itself and its nearest alias on the other side of the Nyquist
    frequency, weighted by the voxel's box response sinc^2; the two carry at least 81 % of its
    weight (all of it at k = 0, 0.81 at the Nyquist frequency, where they are a symmetric pair),
    and the kernels divide by the weights' sum. Point-sampled: the frequency alone.
    """
    if not voxel_averaged:
        return [[(k, np.ones_like(k))] for k in frequencies]
    candidates = []
    for k, d in zip(frequencies, voxel_size):
        alias = k - np.sign(k) / np.float32(d)
        candidates.append([(k, np.sinc(k * d) ** 2), (alias, np.where(k == 0, 0, np.sinc(alias * d) ** 2))])
    return candidates


def _total_weight(candidates):
    """The sum of the candidates' weights: a product of one factor per axis, as the weights are."""
    total_weight = 1
    for weights in candidates:
        total_weight = total_weight * sum(weight for _, weight in weights).astype(np.float32)
    return total_weight


def _unit(vector):
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector)


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
    frequencies = kspace_grid(shape, voxel_size, real=real)
    candidates = _alias_candidates(frequencies, voxel_size, voxel_averaged)
    # kernel = 1/3 - sum_c w_c (k_c.h)^2 / |k_c|^2 / sum_c w_c, accumulated in place: the grid
    # can hold 10^8 entries.
    shape = np.broadcast_shapes(*(k.shape for k in frequencies))
    ratio_sum = np.zeros(shape, dtype=np.float32)
    k_dot_h, k_squared = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    h = [np.float32(component) for component in _unit(b0_dir)]
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
    ratio_sum /= _total_weight(candidates)
    kernel = np.subtract(np.float32(1.0 / 3.0), ratio_sum, out=ratio_sum)
    kernel[0, 0, 0] = 0.0
    return kernel


def tensor_dipole_kernel(shape, voxel_size, b0_dir, real=True, voxel_averaged=True):
    """The kernel of each susceptibility tensor component, (6, *grid) float32, in the order of
    ``TENSOR_COMPONENTS``: field(k) = sum_c K_c(k) chi_c(k).

    From CONVENTIONS.md, K_ij = h_i h_j / 3 - (k.h) k_i h_j / |k|^2, off-diagonal components
    counted twice (the tensor is symmetric); the isotropic tensor chi I has the scalar kernel
    ``dipole_kernel``. Voxel averaging and K(0) = 0 as there.
    """
    h = _unit(b0_dir)
    frequencies = kspace_grid(shape, voxel_size, real=real)
    candidates = _alias_candidates(frequencies, voxel_size, voxel_averaged)
    grid_shape = np.broadcast_shapes(*(k.shape for k in frequencies))
    # projections[i] = sum_c w_c (k_c.h) k_c,i / |k_c|^2 / sum_c w_c
    projections = np.zeros((3,) + grid_shape, dtype=np.float32)
    for (k0, w0), (k1, w1), (k2, w2) in itertools.product(*candidates):
        k_squared = k0 ** 2 + k1 ** 2 + k2 ** 2
        k_squared[k_squared == 0] = np.inf
        weighted_k_dot_h = (k0 * np.float32(h[0]) + k1 * np.float32(h[1]) + k2 * np.float32(h[2])) / k_squared
        weighted_k_dot_h *= (w0 * w1 * w2).astype(np.float32)
        for axis, k in enumerate((k0, k1, k2)):
            projections[axis] += weighted_k_dot_h * k
    projections /= _total_weight(candidates)
    kernels = np.empty((len(TENSOR_COMPONENTS),) + grid_shape, dtype=np.float32)
    for component, (i, j) in enumerate(TENSOR_COMPONENTS):
        kernels[component] = np.float32(h[i] * h[j] / 3) - projections[i] * np.float32(h[j])
        if i != j:
            kernels[component] += np.float32(h[i] * h[j] / 3) - projections[j] * np.float32(h[i])
    kernels[:, 0, 0, 0] = 0.0
    return kernels


def traceless_tensor(anisotropy_ppm, fibre_directions):
    """The components (6, *shape) of a (n n^T - I/3): white matter's anisotropic susceptibility.

    ``anisotropy_ppm`` is a = chi_parallel - chi_perpendicular in each voxel (0 outside white
    matter) and ``fibre_directions`` (3, *shape) the unit fibre direction n in voxel axes. The
    trace is 0, so it leaves the mean susceptibility unchanged and no scalar map explains its
    field: the model error of single-orientation QSM in white matter. With n along h its field
    is 2/3 of the dipole field of a, with n across h -1/3 of it.
    """
    anisotropy_ppm = np.asarray(anisotropy_ppm, dtype=np.float32)
    return np.stack([anisotropy_ppm * (fibre_directions[i] * fibre_directions[j] - np.float32(i == j) / 3)
                     for i, j in TENSOR_COMPONENTS]).astype(np.float32)


def anisotropic_field(anisotropy_ppm, fibre_directions, voxel_size, b0_dir, pad_factor=1.5):
    """Field (ppm) of ``traceless_tensor(anisotropy_ppm, fibre_directions)``: point-sampled
    kernel, FFT grid zero-padded by ``pad_factor``."""
    operator = DipoleOperator(np.shape(anisotropy_ppm), voxel_size, b0_dir, pad_factor=pad_factor,
                              voxel_averaged=False, tensor=True)
    return operator.forward(traceless_tensor(anisotropy_ppm, fibre_directions))


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


def _crop(volumes, shape):
    return volumes[(Ellipsis,) + tuple(slice(0, n) for n in shape)]


def convolve(volumes, kernels, shape, fft_shape, sum_axis=None):
    """Periodic convolution on ``fft_shape`` of the zero-padded ``volumes`` with ``kernels`` given
    on its rfft grid, cropped to ``shape``: numpy arrays (float32, scipy's FFT) or torch tensors.

    The last three axes are space, the others broadcast. ``sum_axis``: an axis of the products
    summed in k-space (orientations or tensor components), so that it costs one inverse FFT.
    """
    if isinstance(volumes, np.ndarray):
        spectrum = scipy.fft.rfftn(np.asarray(volumes, dtype=np.float32), s=fft_shape, axes=FFT_AXES) * kernels
        if sum_axis is not None:
            spectrum = spectrum.sum(axis=sum_axis)
        return _crop(scipy.fft.irfftn(spectrum, s=fft_shape, axes=FFT_AXES), shape).astype(np.float32)
    import torch  # reached only with torch tensors: numpy users need no torch
    spectrum = torch.fft.rfftn(volumes, s=fft_shape, dim=FFT_AXES) * kernels
    if sum_axis is not None:
        spectrum = spectrum.sum(dim=sum_axis)
    return _crop(torch.fft.irfftn(spectrum, s=fft_shape, dim=FFT_AXES), shape)


class DipoleOperator:
    """The dipole forward model of one grid, for one or several head orientations and for scalar
    or tensor susceptibility: ``forward``, ``adjoint`` and ``normal``, on numpy arrays or torch
    tensors (any leading axes are a batch).

    ``b0_dirs``: one B0 direction (3,) in voxel axes, or one per orientation (N, 3); with N, the
    fields carry an orientation axis (N, *shape), with one they are of ``shape``. ``tensor``:
    susceptibility is the tensor's components (6, *shape) in the order of ``TENSOR_COMPONENTS``,
    else one map of ``shape``. ``pad_factor`` > 1 zero-pads before the FFT (``padded_shape``) so
    that the convolution does not wrap around: the operator is then the exact linear
    convolution cropped to the input grid. ``voxel_averaged``: see ``dipole_kernel``.
    ``kernel``: the kernels on the rfft grid, (N, [6,] *grid), without N for one direction.
    """

    def __init__(self, shape, voxel_size, b0_dirs, pad_factor=1.0, voxel_averaged=True, tensor=False):
        self.shape = tuple(int(n) for n in shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        directions = np.asarray(b0_dirs, dtype=float)
        self.several = directions.ndim == 2
        self.b0_dirs = np.array([_unit(direction) for direction in directions.reshape(-1, 3)])
        self.tensor = tensor
        self.fft_shape = padded_shape(self.shape, pad_factor) if pad_factor > 1 else self.shape
        make_kernel = tensor_dipole_kernel if tensor else dipole_kernel
        kernels = [make_kernel(self.fft_shape, self.voxel_size, direction, voxel_averaged=voxel_averaged)
                   for direction in self.b0_dirs]
        self.kernel = np.stack(kernels) if self.several else kernels[0]
        self._torch_kernels = {}

    @property
    def orientations(self):
        return len(self.b0_dirs)

    def kernel_like(self, volumes):
        """``kernel`` as ``volumes`` hold data: the numpy array, or a torch tensor on their device."""
        if isinstance(volumes, np.ndarray):
            return self.kernel
        if volumes.device not in self._torch_kernels:
            import torch
            self._torch_kernels[volumes.device] = torch.from_numpy(self.kernel).to(volumes.device)
        return self._torch_kernels[volumes.device]

    def forward(self, chi_ppm):
        """Field (ppm) of susceptibility ``chi_ppm``, per orientation with several directions."""
        kernel = self.kernel_like(chi_ppm)
        if self.several:  # an orientation axis before the space (and component) axes
            chi_ppm = chi_ppm[(Ellipsis, None) + (slice(None),) * (4 if self.tensor else 3)]
        return convolve(chi_ppm, kernel, self.shape, self.fft_shape, sum_axis=-4 if self.tensor else None)

    def adjoint(self, field_ppm):
        """Adjoint of ``forward``: each kernel is real and even, so the same convolutions, summed
        over the orientations."""
        kernel = self.kernel_like(field_ppm)
        if self.tensor:  # a component axis after the orientations
            field_ppm = field_ppm[Ellipsis, None, :, :, :]
        sum_axis = (-5 if self.tensor else -4) if self.several else None
        return convolve(field_ppm, kernel, self.shape, self.fft_shape, sum_axis=sum_axis)

    def normal(self, chi_ppm):
        """``adjoint(forward(chi_ppm))``: the normal operator of the data term."""
        return self.adjoint(self.forward(chi_ppm))
