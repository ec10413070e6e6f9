"""DeepSTI (Fang, Lai, van Zijl, Li and Sulam, Medical Image Analysis 2023): the susceptibility tensor
by learned proximal gradient descent, from one orientation or more.

The tensor X (6 components, ``physics.TENSOR_COMPONENTS``, voxel axes) is updated by unrolled
proximal gradient steps on the data term 1/2 sum_n ||M (K_n X - f_n)||^2, with K_n the tensor
dipole convolution of orientation n and M the brain mask, and a 3-D CNN as the proximal map:

    X_0 = M X_L2,    X_{k+1} = M P_theta(M (X_k - alpha / N sum_n K_n^T M (K_n X_k - f_n)))

- X_L2 is LP-CNN's start made a tensor: the closed-form solution of all orientations with a
  gradient penalty, its weight chosen by generalised cross-validation as for LP-CNN, and a penalty
  on the anisotropic part (the tensor minus its mean times I) with a learned weight. With one
  orientation it is LP-CNN's chi_L2 times I; with more, it holds what the data say of the
  anisotropy, which on fields as noisy as the training's is little: least squares alone amplifies
  the noise many times over (benchmarks/NOTES.md).
- The gradient is averaged over the N orientations, as in LP-CNN, so that one learned step size
  suits 1 to 6+ orientations; with fewer than six the data leave part of the tensor undetermined
  and the CNN's prior fills it.
- P_theta is one ``lpcnn.ProximalCNN`` with 6 components, shared by the iterations.

Like LP-CNN it works in ``NETWORK_UNITS_PER_PPM`` units with the point-sampled kernel on a
zero-padded FFT grid, and the CNN is local, so inference applies it in tiles.
"""
import numpy as np
import torch
from torch import nn

from qsmprep.science.inversion import L2_LAMBDAS
from qsmprep.science.physics import TENSOR_COMPONENTS, DipoleOperator

from .lpcnn import (DEFAULT_TILE, FFT_DIMS, NETWORK_UNITS_PER_PPM, PAD_FACTOR, ProximalCNN, TorchDipoleOperator,
                    apply_in_tiles, checked_fields, default_device, network_inputs)

COMPONENTS = len(TENSOR_COMPONENTS)
# The identity tensor, and the weight of each component in the squared Frobenius norm (the
# off-diagonal components stand for two entries each).
IDENTITY = tuple(float(i == j) for i, j in TENSOR_COMPONENTS)
FROBENIUS_WEIGHTS = tuple(1.0 if i == j else 2.0 for i, j in TENSOR_COMPONENTS)
# sum_c K_c(k)^2 peaks at about 0.6 for an oblique B0 (0.44 axial): steps below 2 / 0.6 are
# stable, 1.5 is a cautious start.
INITIAL_STEP_SIZE = 1.5
# Frequencies per slab of the starting estimate's 6x6 systems, and a ridge that keeps the system of
# k = 0 (where every kernel vanishes) and of the isotropic direction at one orientation invertible.
SLAB = 16
STABILIZER = 1e-6
# Weight of the anisotropy penalty of the starting estimate (sum_c K_c^2 is at most about 0.6 per
# orientation): the best of 0.005, 0.05, 0.5 and 100 on held-out patches; learned from there.
INITIAL_ANISOTROPY_WEIGHT = 0.5


def _spatial(values, device):
    return torch.tensor(values, dtype=torch.float32, device=device).reshape(1, COMPONENTS, 1, 1, 1)


class TorchTensorOperator:
    """The tensor dipole model of a batch in torch: ``physics.DipoleOperator(tensor=True)`` per
    volume, each with its voxel size (B, 3) and B0 directions (B, N, 3). ``forward`` maps tensors
    (B, 6, *shape) to fields (B, N, *shape), ``adjoint`` fields back to tensors. Orientations are
    taken one at a time, so a whole head with six of them fits in memory."""

    def __init__(self, shape, voxel_sizes, b0_dirs, pad_factor=PAD_FACTOR, device=None):
        voxel_sizes = np.asarray(voxel_sizes, dtype=float).reshape(-1, 3)
        b0_dirs = np.asarray(b0_dirs, dtype=float).reshape((voxel_sizes.shape[0], -1, 3))
        operators = [DipoleOperator(shape, voxel_size, directions, pad_factor=pad_factor, voxel_averaged=False,
                                    tensor=True) for voxel_size, directions in zip(voxel_sizes, b0_dirs)]
        self.shape, self.fft_shape = operators[0].shape, operators[0].fft_shape
        # (B, N, 6, *rfft grid)
        self.kernels = torch.from_numpy(np.stack([operator.kernel for operator in operators])).to(device)
        self.orientations = b0_dirs.shape[1]

    def _crop(self, volumes):
        return volumes[..., :self.shape[0], :self.shape[1], :self.shape[2]]

    def forward(self, tensor):
        spectrum = torch.fft.rfftn(tensor, s=self.fft_shape, dim=FFT_DIMS)
        fields = [torch.fft.irfftn((spectrum * self.kernels[:, n]).sum(dim=1), s=self.fft_shape, dim=FFT_DIMS)
                  for n in range(self.orientations)]
        return self._crop(torch.stack(fields, dim=1))

    def adjoint(self, fields):
        spectrum = 0
        for n in range(self.orientations):
            field_spectrum = torch.fft.rfftn(fields[:, n:n + 1], s=self.fft_shape, dim=FFT_DIMS)
            spectrum = spectrum + field_spectrum * self.kernels[:, n]
        return self._crop(torch.fft.irfftn(spectrum, s=self.fft_shape, dim=FFT_DIMS))

    def l2_solution(self, fields, gradient_spectra, gradient_weight, anisotropy_weight):
        """argmin_X sum_n ||K_n X - f_n||^2 + gradient_weight ||grad X||_F^2 + anisotropy_weight ||X - m I||_F^2
        on the padded grid (m = trace(X) / 3), (B, 6, *shape): the tensor form of LP-CNN's L2 start.

        Diagonal in k-space: one 6x6 system per frequency. ``gradient_spectra`` (B, 1, *rfft grid) is
        |F grad|^2, both weights are (B, 1, 1, 1, 1) or scalars. With one orientation the anisotropy
        penalty leaves chi_L2 I; from six on, with a small weight, it is unmasked least squares.
        """
        spectra = torch.fft.rfftn(fields, s=self.fft_shape, dim=FFT_DIMS)
        right = (spectra.unsqueeze(2) * self.kernels).sum(dim=1)  # (B, 6, *grid), complex
        frobenius = torch.tensor(FROBENIUS_WEIGHTS, device=fields.device)
        identity = torch.tensor(IDENTITY, device=fields.device)
        anisotropy_form = torch.diag(frobenius) - torch.outer(identity, identity) / 3
        # Weights as (B, 1, 1, 1), to scale the (B, F, 6, 6) systems of F frequencies.
        weights = torch.as_tensor(gradient_weight, dtype=torch.float32, device=fields.device).reshape(-1, 1, 1, 1)
        anisotropy = torch.as_tensor(anisotropy_weight, dtype=torch.float32, device=fields.device).reshape(-1, 1, 1, 1)
        fixed = anisotropy * anisotropy_form + STABILIZER * torch.eye(COMPONENTS, device=fields.device)
        solution = torch.empty_like(right)
        # Slabs of the first frequency axis bound the memory of the 6x6 systems on a whole head.
        for start in range(0, right.shape[2], SLAB):
            kernels = self.kernels[:, :, :, start:start + SLAB].flatten(3)  # (B, N, 6, F)
            normal = torch.einsum('bncf,bndf->bfcd', kernels, kernels)
            gradient = gradient_spectra[:, 0, start:start + SLAB].flatten(1)[:, :, None, None]  # (B, F, 1, 1)
            system = normal + weights * gradient * torch.diag(frobenius) + fixed
            slab = right[:, :, start:start + SLAB]
            values = slab.flatten(2).transpose(1, 2)  # (B, F, 6)
            solved = torch.linalg.solve(system, torch.stack([values.real, values.imag], dim=-1))
            solution[:, :, start:start + SLAB] = torch.complex(solved[..., 0], solved[..., 1]).transpose(1, 2).reshape(
                slab.shape)
        return self._crop(torch.fft.irfftn(solution, s=self.fft_shape, dim=FFT_DIMS))


class DeepSTI(nn.Module):
    """Unrolled proximal gradient descent for the susceptibility tensor (see the module doc).

    ``forward(local_fields, mask, voxel_sizes, b0_dirs)`` takes fields (B, N, X, Y, Z) and a mask
    (B, 1, X, Y, Z) in network units, voxel sizes (B, 3) in mm and B0 directions (B, N, 3) in voxel
    axes, and returns the tensor (B, 6, X, Y, Z) in network units. ``config`` holds the
    constructor's arguments, which the model card stores.
    """

    def __init__(self, iterations=3, channels=16, blocks=4, initial_step_size=INITIAL_STEP_SIZE,
                 pad_factor=PAD_FACTOR, initial_anisotropy_weight=INITIAL_ANISOTROPY_WEIGHT):
        super().__init__()
        self.config = {'iterations': iterations, 'channels': channels, 'blocks': blocks,
                       'initial_step_size': initial_step_size, 'pad_factor': pad_factor,
                       'initial_anisotropy_weight': initial_anisotropy_weight}
        self.iterations = iterations
        self.pad_factor = pad_factor
        self.proximal_network = ProximalCNN(channels, blocks, components=COMPONENTS)
        self.step_size = nn.Parameter(torch.tensor(float(initial_step_size)))
        # Learned on a log scale, as LP-CNN's L2 weight: positive, and its useful range spans decades.
        self.log_anisotropy_weight = nn.Parameter(torch.tensor(float(np.log(initial_anisotropy_weight))))

    def initial_estimate(self, masked_fields, mask, voxel_sizes, b0_dirs, operator):
        """The closed-form L2 tensor (``TorchTensorOperator.l2_solution``, see the module doc) in the
        mask, (B, 6, X, Y, Z)."""
        scalar = TorchDipoleOperator(masked_fields.shape[2:], voxel_sizes, b0_dirs, self.pad_factor,
                                     device=masked_fields.device)
        with torch.no_grad():
            weight = scalar.gcv_l2_weight(masked_fields, L2_LAMBDAS)
        # chi I has 3 times the squared gradient norm of chi: a third of the weight gives its mean the
        # scalar L2 solution of that weight.
        return mask * operator.l2_solution(masked_fields, scalar.gradient_spectra, weight / 3,
                                           self.log_anisotropy_weight.exp())

    def forward(self, local_fields, mask, voxel_sizes, b0_dirs, tile=None):
        operator = TorchTensorOperator(local_fields.shape[2:], voxel_sizes, b0_dirs, self.pad_factor,
                                       device=local_fields.device)
        masked_fields = local_fields * mask
        tensor = self.initial_estimate(masked_fields, mask, voxel_sizes, b0_dirs, operator)
        network = self.proximal_network
        for _ in range(self.iterations):
            gradient = operator.adjoint(operator.forward(tensor) * mask - masked_fields) / operator.orientations
            step = torch.cat([mask * (tensor - self.step_size * gradient), mask], dim=1)
            tensor = mask * apply_in_tiles(network, step, tile, network.receptive_radius)
        return tensor


def tensor_loss(estimate, truth, mask, anisotropy_weight):
    """Squared error inside ``mask`` of the mean susceptibility (trace / 3) plus ``anisotropy_weight``
    times that of the anisotropic part (the tensor minus its mean times I, Frobenius norm), per
    voxel of the mask. The anisotropy is about a tenth of the mean's contrast: unweighted, the
    loss would hardly see it."""
    error = (estimate - truth) * mask
    identity = _spatial(IDENTITY, mask.device)
    mean_error = (error * identity).sum(dim=1, keepdim=True) / 3
    anisotropic_error = error - mean_error * identity
    frobenius = (anisotropic_error ** 2 * _spatial(FROBENIUS_WEIGHTS, mask.device)).sum(dim=1, keepdim=True)
    return ((mean_error ** 2).sum() + anisotropy_weight * frobenius.sum()) / mask.sum().clamp(min=1)


def deepsti_invert(local_fields_ppm, mask, voxel_size, b0_dirs, model, device=None, tile=DEFAULT_TILE):
    """The susceptibility tensor (6, *shape) in ppm, components in the order of
    ``physics.TENSOR_COMPONENTS`` in the voxel axes, 0 outside ``mask``, from the local fields of
    one or more orientations (as ``lpcnn.lpcnn_invert`` takes them) by a DeepSTI ``model``."""
    fields, mask, b0_dirs = checked_fields(local_fields_ppm, mask, b0_dirs)
    tensor = np.zeros((COMPONENTS,) + mask.shape, dtype=np.float32)
    if not mask.any():
        return tensor
    device = torch.device(device) if device is not None else default_device()
    box, fields_in, mask_in = network_inputs(fields, mask, voxel_size, device)
    model = model.to(device).eval()
    with torch.no_grad():
        estimate = model(fields_in, mask_in, [voxel_size], [b0_dirs], tile=tile)
    tensor[(slice(None),) + box] = estimate[0].cpu().numpy() / NETWORK_UNITS_PER_PPM
    return np.where(mask, tensor, 0).astype(np.float32)
