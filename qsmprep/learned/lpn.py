"""Learned proximal networks (LPN; Fang, Buchanan and Sulam, ICLR 2024) for dipole inversion.

An LPN is a map f_theta = grad psi_theta with psi_theta convex. Every such map is exactly the
proximal operator of some regularizer R_theta (Gribonval and Nikolova 2020):

    f_theta(y) = argmin_x 1/2 ||x - y||^2 + R_theta(x),
    R_theta(x) = <x, y> - 1/2 ||x||^2 - psi_theta(y)   where f_theta(y) = x,

so the prior that a learned inversion applies can be evaluated, not only applied.

- psi_theta is an input-convex CNN (Amos, Xu and Kolter 2017): z_1 = s(H_1 y), z_{k+1} =
  s(W_k z_k + H_k y), psi = sum over voxels of (w . z_K + a/2 y^2), with 3x3x3 convolutions H_k
  (free) and W_k (non-negative weights), non-negative output weights w and a > 0, and s the
  softplus (convex, non-decreasing). So psi is convex in y, and strictly convex through a, which
  makes f_theta invertible and R_theta finite. a starts at ``INITIAL_QUADRATIC_WEIGHT``.
- It is trained as a denoiser of simulated susceptibility patches (``simulate.simulate_chi_batch``)
  at one noise level, with the proximal matching loss (``proximal_matching_loss``), which makes
  f_theta approach the maximum a posteriori denoiser, the proximal operator of -log p(x), as its
  width gamma shrinks; the training starts with the L1 loss.
- It inverts the dipole model by proximal gradient descent with the same operator as every other
  method (``lpn_invert``): from the closed-form L2 estimate (weight by GCV, as LP-CNN starts),

      chi_{k+1} = M f_theta(M (chi_k - eta / N sum_i D_i^T M (D_i chi_k - f_i))),

  for one orientation or several, without retraining. The step eta sets how strongly the prior
  acts against the data, and each iteration applies the prior again, also to what the data leave
  free; both are chosen on whole simulated heads during training and the model card holds them.

Like LP-CNN it works in ``lpcnn.NETWORK_UNITS_PER_PPM`` units; f_theta is local (its output at a
voxel depends on the input within ``gradient_radius`` voxels), so inference applies it in tiles.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qsmprep.science.inversion import L2_LAMBDAS

from .lpcnn import (DEFAULT_TILE, NETWORK_UNITS_PER_PPM, PAD_FACTOR, TorchDipoleOperator, apply_in_tiles,
                    checked_fields, default_device, network_inputs)

# Iterations of proximal gradient descent at inference, and their step; the card of a trained model
# holds those chosen on whole simulated heads.
DEFAULT_ITERATIONS = 2
DEFAULT_STEP_SIZE = 4.0
# L-BFGS iterations that invert f_theta when R_theta is evaluated.
REGULARIZER_ITERATIONS = 100
# The trained denoisers settle near a = 0.3 (f_theta shrinks noise to about that share); starting
# at 1 (the identity) took thousands of steps to get there (benchmarks/NOTES.md).
INITIAL_QUADRATIC_WEIGHT = 0.25


class ConvexPotential(nn.Module):
    """psi_theta: an input-convex CNN of ``layers`` layers of ``channels`` channels (module doc).

    ``potential_map(y)`` is psi's term per voxel, (B, 1, ...), whose sum is psi(y); the convolutions
    pad with zeros, a constant, so each term stays convex in y. ``project()`` clamps the weights
    that must be non-negative after an optimiser step; the forward pass clamps them too, so loaded
    weights cannot break convexity.
    """

    def __init__(self, channels=16, layers=4, initial_quadratic_weight=INITIAL_QUADRATIC_WEIGHT):
        super().__init__()
        self.input_convs = nn.ModuleList([nn.Conv3d(1, channels, 3, padding=1) for _ in range(layers)])
        self.hidden_convs = nn.ModuleList([nn.Conv3d(channels, channels, 3, padding=1, bias=False)
                                           for _ in range(layers - 1)])
        for conv in self.hidden_convs:
            # Non-negative weights with the scale of the default initialisation.
            nn.init.uniform_(conv.weight, 0.0, 1.0 / (channels * 27))
        self.output_weights = nn.Parameter(torch.full((channels,), 1.0 / channels))
        # a = softplus(raw) + a floor; a floor keeps psi strongly convex whatever training does.
        self.minimum_quadratic_weight = 1e-3
        raw = np.log(np.expm1(initial_quadratic_weight - self.minimum_quadratic_weight))
        self.raw_quadratic_weight = nn.Parameter(torch.tensor(float(raw)))
        # Each 3x3x3 convolution reaches one voxel further.
        self.receptive_radius = layers

    @property
    def quadratic_weight(self):
        return F.softplus(self.raw_quadratic_weight) + self.minimum_quadratic_weight

    def potential_map(self, y):
        features = F.softplus(self.input_convs[0](y))
        for hidden, direct in zip(self.hidden_convs, self.input_convs[1:]):
            features = F.softplus(F.conv3d(features, hidden.weight.clamp(min=0), padding=1) + direct(y))
        weights = self.output_weights.clamp(min=0).reshape(1, -1, 1, 1, 1)
        return (features * weights).sum(dim=1, keepdim=True) + self.quadratic_weight / 2 * y ** 2

    def forward(self, y):
        """psi(y) per volume, (B,)."""
        return self.potential_map(y).flatten(1).sum(dim=1)

    @torch.no_grad()
    def project(self):
        for conv in self.hidden_convs:
            conv.weight.clamp_(min=0)
        self.output_weights.clamp_(min=0)


class LPN(nn.Module):
    """The learned proximal network f_theta = grad psi_theta (module doc): (B, 1, ...) in and out,
    in network units. ``config`` holds the constructor's arguments, which the model card stores."""

    def __init__(self, channels=16, layers=4, initial_quadratic_weight=INITIAL_QUADRATIC_WEIGHT):
        super().__init__()
        self.config = {'channels': channels, 'layers': layers, 'initial_quadratic_weight': initial_quadratic_weight}
        self.potential = ConvexPotential(channels, layers, initial_quadratic_weight)
        # grad psi at a voxel sums the terms of psi within the receptive radius, each of which reads
        # the input within that radius again.
        self.gradient_radius = 2 * self.potential.receptive_radius

    def forward(self, y):
        # The graph of the gradient is kept when the caller records one (training), so that the
        # loss of f_theta reaches the weights; at inference only the gradient itself is computed.
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.potential(y).sum(), y, create_graph=keep_graph)
        return gradient

    def invert(self, x, iterations=REGULARIZER_ITERATIONS):
        """y with f_theta(y) = x: the minimiser of the strictly convex psi(y) - <x, y>, by L-BFGS from y = x."""
        x = x.detach()
        y = x.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([y], max_iter=iterations, tolerance_grad=1e-7, tolerance_change=1e-12,
                                      history_size=20, line_search_fn='strong_wolfe')

        def objective():
            optimizer.zero_grad()
            value = self.potential(y).sum() - (x * y).sum()
            value.backward()
            return value

        with torch.enable_grad():
            optimizer.step(objective)
        return y.detach()

    def regularizer_map(self, x, iterations=REGULARIZER_ITERATIONS):
        """R_theta(x) as a map (B, 1, ...) whose sum over the voxels is R_theta(x) (module doc):
        x y - psi's term - x^2 / 2 at each voxel, with y = f_theta^-1(x)."""
        y = self.invert(x, iterations)
        with torch.no_grad():
            return x * y - self.potential.potential_map(y) - x ** 2 / 2


def proximal_matching_loss(estimate, truth, mask, gamma):
    """Per volume 1 - exp(-e / gamma^2), e the mean squared error inside ``mask``, averaged over
    the batch. As gamma shrinks it counts only estimates within about gamma of the truth, which
    drives a denoiser towards the mode of the posterior (the proximal operator of -log p) instead of
    its mean, which the squared error gives and which blurs (Fang et al. 2024)."""
    error = ((estimate - truth) * mask) ** 2
    per_volume = error.flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp(min=1)
    return (1 - torch.exp(-per_volume / gamma ** 2)).mean()


def lpn_iterates(local_fields_ppm, mask, voxel_size, b0_dirs, model, step_size=DEFAULT_STEP_SIZE,
                 counts=(DEFAULT_ITERATIONS,), device=None, tile=DEFAULT_TILE, progress=None):
    """(count, susceptibility in ppm, 0 outside ``mask``) after each iteration count of ``counts`` of
    proximal gradient descent with the LPN ``model`` (module doc), yielded in turn from one run of
    max(counts) iterations; ``progress(done, max(counts))`` is called after each. See ``lpn_invert``
    for the rest."""
    fields, mask, b0_dirs = checked_fields(local_fields_ppm, mask, b0_dirs)
    if not mask.any():
        for count in sorted(counts):
            yield count, np.zeros(mask.shape, dtype=np.float32)
        return
    device = torch.device(device) if device is not None else default_device()
    box, fields_in, mask_in = network_inputs(fields, mask, voxel_size, device)
    model = model.to(device).eval()
    operator = TorchDipoleOperator(fields_in.shape[2:], [voxel_size], [b0_dirs], PAD_FACTOR, device=device,
                                   voxel_averaged=True)
    with torch.no_grad():
        masked_fields = fields_in * mask_in
        estimate = mask_in * operator.l2_solution(masked_fields, operator.gcv_l2_weight(masked_fields, L2_LAMBDAS))
        for count in range(1, max(counts) + 1):
            gradient = operator.adjoint(operator.forward(estimate) * mask_in - masked_fields) / operator.orientations
            step = mask_in * (estimate - step_size * gradient)
            estimate = mask_in * apply_in_tiles(model, step, tile, model.gradient_radius)
            if progress is not None:
                progress(count, max(counts))
            if count in counts:
                chi = np.zeros(mask.shape, dtype=np.float32)
                chi[box] = estimate[0, 0].cpu().numpy() / NETWORK_UNITS_PER_PPM
                yield count, np.where(mask, chi, 0).astype(np.float32)


def lpn_invert(local_fields_ppm, mask, voxel_size, b0_dirs, model, step_size=DEFAULT_STEP_SIZE,
               iterations=DEFAULT_ITERATIONS, device=None, tile=DEFAULT_TILE, progress=None):
    """Susceptibility (ppm, 0 outside ``mask``) from one or more orientations' local fields (as
    ``lpcnn.lpcnn_invert`` takes them) by ``iterations`` of proximal gradient descent with the LPN
    ``model`` as the proximal step (module doc), on the mask's box with the voxel-averaged dipole kernel;
    ``progress(done, iterations)`` is called after each iteration."""
    (_, chi), = lpn_iterates(local_fields_ppm, mask, voxel_size, b0_dirs, model, step_size, (iterations,), device,
                             tile, progress)
    return chi


def lpn_regularizer_map(chi_ppm, mask, voxel_size, model, iterations=REGULARIZER_ITERATIONS, device=None):
    """R_theta of the susceptibility map ``chi_ppm`` (``LPN.regularizer_map``) on the mask's box,
    in network units squared (the units the model was trained in), 0 outside ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    values = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return values
    device = torch.device(device) if device is not None else default_device()
    box, chi_in, mask_in = network_inputs(np.asarray(chi_ppm, dtype=np.float32)[np.newaxis], mask, voxel_size, device)
    model = model.to(device).eval()
    values[box] = model.regularizer_map(chi_in * mask_in, iterations)[0, 0].cpu().numpy()
    return np.where(mask, values, 0).astype(np.float32)
