"""LP-CNN (Lai, Aggarwal, van Zijl, Li and Sulam, MICCAI 2020): learned proximal gradient descent.

The susceptibility estimate is updated by unrolled proximal gradient steps on the data term
1/2 sum_i ||M (D_i chi - f_i)||^2 over the head orientations i, with a CNN as the proximal map:

    chi_0 = M L2(f),    chi_{k+1} = M P_theta(M (chi_k - alpha / N sum_i D_i^T M (D_i chi_k - f_i)))

- D_i is the dipole convolution of orientation i (its own B0 direction and the voxel size),
  ``qsmprep.science.physics.DipoleOperator`` on a zero-padded FFT grid so that it does not wrap
  around, with the kernel sampled at the grid frequencies (``voxel_averaged=False``, the kernel
  the networks were trained with).
- M is the brain mask: the local field is data only inside it, and the susceptibility that
  produces the local field lies inside it, so the estimate is kept at 0 outside.
- The gradient is averaged over the N orientations (not summed, as in the paper), so that one
  learned step size alpha suits any number of orientations: sum_i D_i^T D_i has a largest
  eigenvalue up to N * 4/9.
- P_theta is one CNN shared by all iterations (the paper's choice); it sees the estimate and
  the mask and returns a corrected estimate. Inference keeps the trained iteration count: more
  or fewer did not pay (benchmarks/NOTES.md).
- With ``correction='cone'`` the CNN's correction P_theta(x) - x is kept only in the frequencies
  that the dipole kernels of the orientations determine poorly (``ill_conditioned_part``): the
  network fills the cone of the kernel's zeros and cannot undo what the data measured, but neither
  can it remove the noise there; the shipped model was trained free (benchmarks/NOTES.md).
- chi_0 is the closed-form L2 solution with a gradient penalty of all orientations together,
  sum_i D_i F f_i / (sum_i D_i^2 + lambda |F grad|^2) (the paper starts from 0), so the CNN
  only has to correct a good estimate. ``initial_estimate='zero'`` is the paper's start.
- The weight lambda is chosen for each input by generalised cross-validation
  (``initial_estimate='l2_gcv'``, as ``inversion.l2_gradient`` chooses it), or is one learned
  constant (``'l2'``). One constant cannot suit every noise level (benchmarks/NOTES.md).

The network works in ``NETWORK_UNITS_PER_PPM`` units: fields and susceptibility in ppm are of
order 0.01 to 0.1 in the brain, too small for the default initialisation and learning rates of
a CNN; scaled by 10 they are of order 1. The physics is linear, so one constant serves both.
"""
import itertools

import numpy as np
import torch
from torch import nn

from qsmprep.science.inversion import (CROP_MARGIN_MIN_VOXELS, CROP_MARGIN_MM, L2_LAMBDAS, laplacian_spectrum,
                                       rfft_norm_weights)
from qsmprep.science.masking import mask_box
from qsmprep.science.physics import DipoleOperator, convolve

NETWORK_UNITS_PER_PPM = 10.0
# Padding factor of the FFT grid of the dipole convolution (CONVENTIONS.md: at least 1.5).
PAD_FACTOR = 1.5
# Initial step size: with the gradient averaged over orientations, the data term's Lipschitz
# constant is at most 4/9, so gradient descent is stable for steps below 4.5; 2 is a cautious start.
INITIAL_STEP_SIZE = 2.0
INITIAL_ESTIMATES = ('l2', 'l2_gcv', 'zero')
# Where the proximal CNN's correction may act: every frequency ('free', the paper's), or only those
# the dipole kernel determines poorly ('cone'), so that no training can change what was measured.
CORRECTIONS = ('free', 'cone')
# Kernel size below which a frequency counts as poorly determined: TKD's threshold.
CONE_THRESHOLD = 0.19
# Initial weight of the gradient penalty of the L2 starting estimate (|F grad|^2 in mm^-2), the
# best of five on held-out patches; the weight is learned from there.
INITIAL_L2_WEIGHT = 1e-2
# Edge length in voxels of the tiles that the CNN is applied on at inference (memory bound):
# it holds a 1 mm brain's box along most axes, and smaller tiles cost time in their halos.
DEFAULT_TILE = 192
FFT_DIMS = (-3, -2, -1)
PRECISIONS = ('auto', 'float32', 'bfloat16')


def default_device():
    """The first GPU when torch sees one, else the CPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def uses_bfloat16(precision, device):
    """Whether the proximal CNN runs in bfloat16 on ``device`` for ``precision`` ('auto': on a CPU
    with bfloat16 instructions, AVX512-BF16 or AMX, and nowhere else).

    On an AVX512-BF16 CPU bfloat16 makes the CNN about twice as fast and changes its correction
    by 0.4 % (benchmarks/NOTES.md). The dipole convolutions, the starting estimate and the sums
    stay in float32. A CPU without those instructions emulates bfloat16 slowly, and no GPU has
    been measured, so 'auto' keeps float32 there.
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} is not one of {PRECISIONS}')
    if precision != 'auto':
        return precision == 'bfloat16'
    capabilities = torch.cpu.get_capabilities() if device.type == 'cpu' else {}
    return bool(capabilities.get('avx512_bf16') or capabilities.get('amx_bf16'))


class TorchDipoleOperator:
    """A batch of ``physics.DipoleOperator`` in torch, each volume with its own voxel size and B0
    directions: the operator of a training batch of patches.

    ``voxel_sizes`` is (B, 3) and ``b0_dirs`` (B, N, 3) for B volumes of ``shape`` with N
    orientations each. ``forward`` maps susceptibility (B, 1, *shape) to fields (B, N, *shape);
    ``adjoint`` maps fields (B, N, *shape) back to (B, 1, *shape), summing the orientations.
    The kernel is point-sampled by default (``voxel_averaged=False``): the one the shipped LP-CNN
    and DeepSTI were trained with.
    """

    def __init__(self, shape, voxel_sizes, b0_dirs, pad_factor=PAD_FACTOR, device=None, voxel_averaged=False):
        voxel_sizes = np.asarray(voxel_sizes, dtype=float).reshape(-1, 3)
        b0_dirs = np.asarray(b0_dirs, dtype=float).reshape((voxel_sizes.shape[0], -1, 3))
        operators = [DipoleOperator(shape, voxel_size, directions, pad_factor=pad_factor, voxel_averaged=voxel_averaged)
                     for voxel_size, directions in zip(voxel_sizes, b0_dirs)]
        self.shape, self.fft_shape = operators[0].shape, operators[0].fft_shape
        self.kernels = torch.from_numpy(np.stack([operator.kernel for operator in operators])).to(device)
        gradient_spectra = [laplacian_spectrum(self.fft_shape, voxel_size)[np.newaxis] for voxel_size in voxel_sizes]
        self.gradient_spectra = torch.from_numpy(np.asarray(gradient_spectra, dtype=np.float32)).to(device)
        self.orientations = b0_dirs.shape[1]

    def forward(self, chi):
        """Fields (B, N, *shape) of susceptibility ``chi`` (B, 1, *shape)."""
        return convolve(chi, self.kernels, self.shape, self.fft_shape)

    def adjoint(self, fields):
        """Adjoint of ``forward``: the same convolutions, summed over the orientations."""
        return convolve(fields, self.kernels, self.shape, self.fft_shape).sum(dim=1, keepdim=True)

    def ill_conditioned_part(self, volumes, threshold):
        """The part of ``volumes`` (B, C, *shape) in the frequencies that the data determine poorly:
        each frequency's share is 1 - min(1, c(k) / threshold) with c(k)^2 the mean of D_i(k)^2 over
        the orientations, so it is 0 where every kernel is large and 1 on the cone where all vanish."""
        conditioning = (self.kernels ** 2).mean(dim=1, keepdim=True).sqrt()
        share = 1 - (conditioning / threshold).clamp(max=1)
        return convolve(volumes, share, self.shape, self.fft_shape)

    def gcv_l2_weight(self, fields, weights):
        """Per volume, the L2 weight chosen by generalised cross-validation (Golub et al. 1979):
        each orientation's field alone picks the one of ``weights`` that
        ``inversion._l2_gcv_weight`` picks on this grid, and the smallest of those is returned,
        as a (B, 1, 1, 1, 1) tensor.

        GCV on all orientations at once chooses weights far too large, as if their disagreement
        outside the mask (where the data are zeros) were noise (benchmarks/NOTES.md).
        """
        spectra = torch.fft.rfftn(fields, s=self.fft_shape, dim=FFT_DIMS)
        power = spectra.abs().square()
        # Parseval: the full-spectrum entries that each rfft entry stands for (1 or 2).
        counts = torch.from_numpy((rfft_norm_weights(self.fft_shape) * np.prod(self.fft_shape)).astype(np.float32))
        counts = counts.to(fields.device)
        kernel_power = self.kernels ** 2
        scores = []
        for weight in weights:
            penalty = float(weight) * self.gradient_spectra
            denominator = kernel_power + penalty
            # Only k = 0 has both terms zero; there the leftover is 0, as no field has a mean (D(0) = 0).
            leftover = penalty / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
            scores.append((power * leftover.square() * counts).sum(dim=FFT_DIMS)
                          / (leftover * counts).sum(dim=FFT_DIMS).square())
        best = torch.stack(scores).argmin(dim=0)
        chosen = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=fields.device)[best]
        return chosen.min(dim=1).values.reshape(-1, 1, 1, 1, 1)

    def l2_solution(self, fields, weight):
        """argmin_chi sum_i ||D_i chi - f_i||^2 + weight ||grad chi||^2 on the padded grid, (B, 1, *shape).

        Closed form in k-space: sum_i D_i F f_i / (sum_i D_i^2 + weight |F grad|^2); with one
        orientation it is ``inversion.l2_gradient`` with the same weight and padding.
        """
        spectra = torch.fft.rfftn(fields, s=self.fft_shape, dim=FFT_DIMS)
        numerator = (spectra * self.kernels).sum(dim=1, keepdim=True)
        denominator = (self.kernels ** 2).sum(dim=1, keepdim=True) + weight * self.gradient_spectra
        # Only k = 0 has both terms zero; there the numerator is 0 too (D(0) = 0).
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        solution = torch.fft.irfftn(numerator / denominator, s=self.fft_shape, dim=FFT_DIMS)
        return solution[..., :self.shape[0], :self.shape[1], :self.shape[2]]


class ResidualBlock(nn.Module):
    """conv-ReLU-conv with an identity shortcut, then ReLU."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, features):
        return torch.relu(features + self.conv2(torch.relu(self.conv1(features))))


class ProximalCNN(nn.Module):
    """The learned proximal map: (estimate, mask) in, corrected estimate out; the estimate has
    ``components`` channels (1 for susceptibility, 6 for DeepSTI's tensor).

    A 3-D CNN of ``blocks`` residual blocks of ``channels`` channels between an input and an
    output convolution, all 3x3x3 with zero padding and no normalisation layer, so that its
    output at a voxel depends only on the input within ``receptive_radius`` voxels: this is
    what lets the inference apply it tile by tile. It predicts a correction that is added to
    the estimate; the output convolution starts at zero, so an untrained LP-CNN is projected
    gradient descent.
    """

    def __init__(self, channels=32, blocks=8, components=1):
        super().__init__()
        self.components = components
        self.input_conv = nn.Conv3d(components + 1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.output_conv = nn.Conv3d(channels, components, 3, padding=1)
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)
        # Each 3x3x3 convolution reaches one voxel further.
        self.receptive_radius = 2 + 2 * blocks

    def forward(self, estimate_and_mask):
        """(B, C + 1, ...) estimate and mask in, (B, C, ...) corrected estimate out (float32)."""
        # The channels-last layout gives the same result faster on the CPU.
        estimate_and_mask = estimate_and_mask.contiguous(memory_format=torch.channels_last_3d)
        features = torch.relu(self.input_conv(estimate_and_mask))
        return estimate_and_mask[:, :self.components] + self.output_conv(self.blocks(features)).float()


def apply_in_tiles(network, volume, tile, halo):
    """``network(volume)`` computed on cubes of ``tile`` voxels, each read with ``halo`` around it.

    Equal to the whole-volume result (up to rounding) when ``halo`` is at least the network's
    receptive radius: a voxel that far from a tile's inner edge sees the same input, and at the
    volume's edge the tile's zero padding is the volume's. ``tile=None`` runs it in one go.
    """
    if tile is None:
        return network(volume)
    spatial_shape = volume.shape[2:]
    output = None
    starts = [range(0, n, tile) for n in spatial_shape]
    for corner in itertools.product(*starts):
        core = [slice(start, min(start + tile, n)) for start, n in zip(corner, spatial_shape)]
        read = [slice(max(c.start - halo, 0), min(c.stop + halo, n)) for c, n in zip(core, spatial_shape)]
        result = network(volume[(...,) + tuple(read)])
        if output is None:
            output = volume.new_zeros(volume.shape[:1] + result.shape[1:2] + spatial_shape)
        within = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, read))
        output[(...,) + tuple(core)] = result[(...,) + within]
    return output


class LPCNN(nn.Module):
    """Unrolled proximal gradient descent for multi-orientation dipole inversion (see module doc).

    ``forward(local_fields, mask, voxel_sizes, b0_dirs)`` takes fields (B, N, X, Y, Z) and a mask
    (B, 1, X, Y, Z) as tensors in network units, voxel sizes (B, 3) in mm and B0 directions
    (B, N, 3) in voxel axes, and returns susceptibility (B, 1, X, Y, Z) in network units; with
    ``bfloat16`` the proximal CNN runs in bfloat16 (``uses_bfloat16``), the rest in float32.
    ``config`` holds the constructor's arguments, which the model card stores.
    """

    def __init__(self, iterations=3, channels=32, blocks=8, shared=True, initial_step_size=INITIAL_STEP_SIZE,
                 pad_factor=PAD_FACTOR, initial_estimate='zero', initial_l2_weight=INITIAL_L2_WEIGHT,
                 correction='free'):
        super().__init__()
        if initial_estimate not in INITIAL_ESTIMATES:
            raise ValueError(f'initial_estimate {initial_estimate!r} is not one of {INITIAL_ESTIMATES}')
        if correction not in CORRECTIONS:
            raise ValueError(f'correction {correction!r} is not one of {CORRECTIONS}')
        self.config = {'iterations': iterations, 'channels': channels, 'blocks': blocks, 'shared': shared,
                       'initial_step_size': initial_step_size, 'pad_factor': pad_factor,
                       'initial_estimate': initial_estimate, 'initial_l2_weight': initial_l2_weight,
                       'correction': correction}
        self.initial_estimate = initial_estimate
        self.correction = correction
        self.iterations = iterations
        self.pad_factor = pad_factor
        networks = [ProximalCNN(channels, blocks)] if shared else [ProximalCNN(channels, blocks)
                                                                  for _ in range(iterations)]
        self.proximal_networks = nn.ModuleList(networks)
        self.step_size = nn.Parameter(torch.tensor(float(initial_step_size)))
        if initial_estimate == 'l2':
            # Learned on a log scale: the weight must stay positive, and its useful range spans decades.
            self.log_l2_weight = nn.Parameter(torch.tensor(float(np.log(initial_l2_weight))))

    def _proximal(self, iteration, estimate, mask, tile, bfloat16):
        network = self.proximal_networks[0 if len(self.proximal_networks) == 1 else iteration]
        with torch.autocast(estimate.device.type, dtype=torch.bfloat16, enabled=bfloat16):
            return apply_in_tiles(network, torch.cat([estimate, mask], dim=1), tile, network.receptive_radius)

    def forward(self, local_fields, mask, voxel_sizes, b0_dirs, tile=None, bfloat16=False):
        operator = TorchDipoleOperator(local_fields.shape[2:], voxel_sizes, b0_dirs, self.pad_factor,
                                       device=local_fields.device)
        masked_fields = local_fields * mask
        if self.initial_estimate == 'l2':
            chi = mask * operator.l2_solution(masked_fields, self.log_l2_weight.exp())
        elif self.initial_estimate == 'l2_gcv':
            with torch.no_grad():
                weight = operator.gcv_l2_weight(masked_fields, L2_LAMBDAS)
            chi = mask * operator.l2_solution(masked_fields, weight)
        else:
            chi = torch.zeros_like(mask)
        for iteration in range(self.iterations):
            residual = operator.forward(chi) * mask - masked_fields
            gradient = operator.adjoint(residual) / operator.orientations
            step = mask * (chi - self.step_size * gradient)
            proximal = self._proximal(iteration, step, mask, tile, bfloat16)
            if self.correction == 'cone':
                proximal = step + operator.ill_conditioned_part(proximal - step, CONE_THRESHOLD)
            chi = mask * proximal
        return chi


def _orientations_first(local_fields_ppm):
    """Fields as an (N, X, Y, Z) array: from a list of 3-D arrays, a 4-D array with the
    orientations on the last axis (as nibabel loads a 4-D NIfTI), or one 3-D array."""
    if isinstance(local_fields_ppm, (list, tuple)):
        return np.stack([np.asarray(field, dtype=np.float32) for field in local_fields_ppm])
    fields = np.asarray(local_fields_ppm, dtype=np.float32)
    return fields[np.newaxis] if fields.ndim == 3 else np.moveaxis(fields, -1, 0)


def checked_fields(local_fields_ppm, mask, b0_dirs):
    """Fields (N, X, Y, Z) float32 (``_orientations_first``), the mask as booleans and the B0
    directions as (N, 3), checked to be one direction per field map, all on the mask's grid."""
    fields = _orientations_first(local_fields_ppm)
    mask = np.asarray(mask, dtype=bool)
    b0_dirs = np.asarray(b0_dirs, dtype=float).reshape(-1, 3)
    if fields.shape[0] != b0_dirs.shape[0] or fields.shape[1:] != mask.shape:
        raise ValueError(f'{fields.shape[0]} field maps of shape {fields.shape[1:]} do not match '
                         f'{b0_dirs.shape[0]} B0 directions and a mask of shape {mask.shape}; '
                         'give one B0 direction per field map, all on the mask grid')
    return fields, mask, b0_dirs


def network_inputs(fields, mask, voxel_size, device):
    """The mask's box (``mask_box`` with the inversion's crop margin) and, cut to it, the fields
    (1, N, *box) in network units and the mask (1, 1, *box) as float32 tensors on ``device``."""
    box = mask_box(mask, voxel_size, CROP_MARGIN_MM, CROP_MARGIN_MIN_VOXELS)
    fields_in = torch.from_numpy(fields[(slice(None),) + box] * NETWORK_UNITS_PER_PPM)[None].to(device)
    mask_in = torch.from_numpy(mask[box].astype(np.float32))[None, None].to(device)
    return box, fields_in, mask_in


def lpcnn_invert(local_fields_ppm, mask, voxel_size, b0_dirs, model, device=None, tile=DEFAULT_TILE,
                 reflection_average=True, precision='auto'):
    """Susceptibility (ppm) from the local fields of one or more head orientations, 0 outside ``mask``.

    ``local_fields_ppm``: a list of 3-D arrays, a 4-D array with orientations on the last axis,
    or one 3-D array, all on the grid of ``mask``; ``b0_dirs``: one unit B0 direction (voxel
    axes) per orientation, (N, 3), or (3,) for one. Runs on ``device`` (default: the GPU if torch
    sees one, else the CPU) on the mask's bounding box. The dipole convolutions need the whole
    box's FFT, but the CNN is local, so it is applied in tiles of ``tile`` voxels (with a halo of
    its receptive radius) to bound memory; ``tile=None`` applies it to the whole box at once.
    ``precision`` says whether the CNN runs in bfloat16 (``uses_bfloat16``; 'auto': on a CPU that
    has bfloat16 instructions).

    With ``reflection_average`` the result is the mean of two estimates: the model's, and the
    model's estimate of the point-reflected fields (r -> -r), reflected back. The reflection
    turns each B0 direction b into -b, whose dipole kernel is the same (it depends on (k.b)^2),
    so both are estimates of the same map; the CNN is not exactly symmetric under it, and the
    mean has less error on every validation brain (benchmarks/NOTES.md). It takes twice the time.
    """
    fields, mask, b0_dirs = checked_fields(local_fields_ppm, mask, b0_dirs)
    chi = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return chi
    device = torch.device(device) if device is not None else default_device()
    box, fields_in, mask_in = network_inputs(fields, mask, voxel_size, device)
    model = model.to(device).eval()
    bfloat16 = uses_bfloat16(precision, device)
    with torch.no_grad():
        chi_network = model(fields_in, mask_in, [voxel_size], [b0_dirs], tile=tile, bfloat16=bfloat16)
        if reflection_average:
            reflected = model(fields_in.flip(FFT_DIMS), mask_in.flip(FFT_DIMS), [voxel_size], [b0_dirs], tile=tile,
                              bfloat16=bfloat16)
            chi_network = (chi_network + reflected.flip(FFT_DIMS)) / 2
    chi[box] = chi_network[0, 0].cpu().numpy() / NETWORK_UNITS_PER_PPM
    return np.where(mask, chi, 0).astype(np.float32)
