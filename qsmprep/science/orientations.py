"""Several head orientations of one head: COSMOS and susceptibility tensor imaging (STI).

Both are masked least squares over the local fields of all orientations, on the grid of the
reference orientation, with the B0 directions rotated into its voxel axes:

    COSMOS  min_chi  sum_n || M (D_n chi - f_n) ||^2 + lam || grad chi ||^2
    STI     min_X    sum_n || M (K_n X - f_n) ||^2     X the 6 tensor components (CONVENTIONS.md)

with M the brain mask inside the data term and the susceptibility inside it too, solved by
conjugate gradients on the normal equations (``physics.DipoleOperator`` gives D_n, K_n and their
adjoints, with the voxel-averaged kernel that the single-orientation methods use). Dividing in k-space by
sum_n D_n^2 instead ignores the mask: the field outside the brain is not known, and treating it
as zero costs accuracy at the brain's edge. The eigen-decomposition of the tensor gives the mean
magnetic susceptibility (MMS), the magnetic susceptibility anisotropy (MSA) and the principal
eigenvector (PEV).
"""
import numpy as np
import scipy.fft

from . import masking
from .inversion import CROP_MARGIN_MIN_VOXELS, CROP_MARGIN_MM, laplacian_spectrum, reference_to_mask_mean
from .physics import FFT_AXES, DipoleOperator, TENSOR_COMPONENTS
from .solvers import conjugate_gradient

COSMOS_ITERATIONS = 200
COSMOS_TOLERANCE = 1e-4
# Relative to the largest eigenvalue of grad^T grad. Plain least squares amplifies field noise:
# on the 2 mm head with 0.5-1e-3 ppm of it (a tenth of the field), 3 orientations scored 17-35 %
# without the penalty and 10-16 % with 0.01-0.03 (benchmarks/NOTES.md).
COSMOS_GRADIENT_WEIGHT = 0.02
STI_ITERATIONS = 60  # early stopping regularizes the tensor, as LSQR in STI Suite
STI_TOLERANCE = 1e-4
STI_MIN_ORIENTATIONS = 6


def _stack_fields(local_fields_ppm, b0_dirs):
    fields = np.asarray(local_fields_ppm, dtype=np.float32)
    directions = np.asarray(b0_dirs, dtype=float).reshape(-1, 3)
    if fields.ndim != 4 or fields.shape[0] != len(directions):
        raise ValueError(f'{len(directions)} B0 directions for local fields of shape {fields.shape}: give one '
                         f'3-D field per direction')
    return fields, directions


def _cropped(fields, mask, voxel_size):
    box = masking.mask_box(mask, voxel_size, CROP_MARGIN_MM, CROP_MARGIN_MIN_VOXELS)
    return fields[(slice(None),) + box], np.asarray(mask, dtype=bool)[box], box


def cosmos(local_fields_ppm, mask, voxel_size, b0_dirs, gradient_weight=COSMOS_GRADIENT_WEIGHT,
           iterations=COSMOS_ITERATIONS, tolerance=COSMOS_TOLERANCE):
    """Susceptibility (ppm, referenced to the mask mean, 0 outside) from the local fields of several
    orientations, (N, *shape) on one grid with one B0 direction each (in its voxel axes).

    ``gradient_weight``: of the gradient penalty, relative to the largest eigenvalue of grad^T grad
    (0: plain least squares, for noise-free fields).
    """
    fields, directions = _stack_fields(local_fields_ppm, b0_dirs)
    fields, inside, box = _cropped(fields, mask, voxel_size)
    operator = DipoleOperator(inside.shape, voxel_size, directions)
    weight = inside.astype(np.float32)
    laplacian = laplacian_spectrum(operator.fft_shape, voxel_size) if gradient_weight else None
    # Scaled so that the weight does not depend on the voxel size (the spectrum grows as 1/voxel^2).
    penalty = gradient_weight / float(np.max(laplacian)) if gradient_weight else 0.0

    # chi lives in the mask too: outside it, sources whose fields cancel inside would be free.
    def normal(chi):
        result = operator.adjoint(weight * operator.forward(chi))
        if penalty:
            result += penalty * _filtered(chi, laplacian, operator)
        return weight * result

    # Preconditioner: the inverse of the unmasked normal operator, diagonal in k-space.
    spectrum = (operator.kernel ** 2).sum(axis=0) + (penalty * laplacian if penalty else 0.0)
    spectrum = np.maximum(spectrum, 1e-2 * float(spectrum.max())).astype(np.float32)
    chi = conjugate_gradient(normal, weight * operator.adjoint(weight * fields), iterations, tolerance,
                             precondition=lambda residual: weight * _filtered(residual, 1.0 / spectrum, operator))
    result = np.zeros(np.shape(mask), dtype=np.float32)
    result[box] = np.where(inside, chi, 0.0)
    return reference_to_mask_mean(result, mask)


def _filtered(volume, spectrum, operator):
    transform = scipy.fft.rfftn(volume, s=operator.fft_shape, axes=FFT_AXES) * spectrum
    return scipy.fft.irfftn(transform, s=operator.fft_shape, axes=FFT_AXES)[
        tuple(slice(0, n) for n in operator.shape)].astype(np.float32)


def sti_least_squares(local_fields_ppm, mask, voxel_size, b0_dirs, iterations=STI_ITERATIONS,
                      tolerance=STI_TOLERANCE):
    """The susceptibility tensor (6, *shape) in ppm, components in the order of
    ``physics.TENSOR_COMPONENTS`` in the voxel axes, 0 outside the mask, from the local fields of
    several orientations (N, *shape) with one B0 direction each. Six or more distinct orientations
    determine it; with fewer the solution leans on the early stop."""
    fields, directions = _stack_fields(local_fields_ppm, b0_dirs)
    fields, inside, box = _cropped(fields, mask, voxel_size)
    operator = DipoleOperator(inside.shape, voxel_size, directions, tensor=True)
    weight = inside.astype(np.float32)
    tensor = conjugate_gradient(lambda x: operator.adjoint(weight * operator.forward(x)),
                                operator.adjoint(weight * fields), iterations, tolerance)
    result = np.zeros((len(TENSOR_COMPONENTS),) + np.shape(mask), dtype=np.float32)
    result[(slice(None),) + box] = np.where(inside, tensor, 0.0)
    return result


def tensor_matrices(tensor):
    """(..., 3, 3) symmetric matrices from the components (6, ...)."""
    matrices = np.empty(tensor.shape[1:] + (3, 3), dtype=np.float32)
    for component, (i, j) in enumerate(TENSOR_COMPONENTS):
        matrices[..., i, j] = matrices[..., j, i] = tensor[component]
    return matrices


def tensor_maps(tensor, mask):
    """Mean magnetic susceptibility, anisotropy and principal eigenvector of the tensor (6, *shape):
    ``(mms, msa, pev)``, ppm, ppm and (3, *shape) unit vectors (sign arbitrary), 0 outside ``mask``.

    MMS = (l1 + l2 + l3) / 3 and MSA = l1 - (l2 + l3) / 2 for the eigenvalues l1 >= l2 >= l3.
    """
    inside = np.asarray(mask, dtype=bool)
    eigenvalues, eigenvectors = np.linalg.eigh(tensor_matrices(np.asarray(tensor, dtype=np.float32)[:, inside]))
    # eigh sorts eigenvalues in ascending order: l1 is the last.
    mms, msa, pev = (np.zeros(inside.shape, np.float32), np.zeros(inside.shape, np.float32),
                     np.zeros((3,) + inside.shape, np.float32))
    mms[inside] = eigenvalues.mean(axis=-1)
    msa[inside] = eigenvalues[:, 2] - (eigenvalues[:, 0] + eigenvalues[:, 1]) / 2
    pev[:, inside] = eigenvectors[:, :, 2].T
    return mms, msa, pev
