"""``qsmprep-train lpn``: train a learned proximal network as a denoiser of simulated susceptibility.

    qsmprep-train lpn --out DIR [--steps N] [--patch-size P] [--batch-size B] [--seed S]
                      [--noise-ppm SIGMA] [--device auto|cpu|cuda] [--resume DIR/checkpoint.pt] ...

Samples are LP-CNN's phantoms without their fields (``simulate.simulate_chi_batch``: brain-like
patches with nuclei, veins, calcifications and microbleeds, and random shapes up to 2 ppm), inside
their masks, with white Gaussian noise of ``--noise-ppm``. The loss is L1 for ``--l1-steps`` steps,
then the proximal matching loss (``lpn.proximal_matching_loss``) with its width gamma shrinking
geometrically from ``--gamma-start`` to ``--gamma-end`` (network units) over ``--gamma-steps``.
The weights that must be non-negative are clamped after every step.

Checkpoints are chosen on whole simulated brains (``simulate.simulate_head``, the validation heads of
LP-CNN's training, not the benchmarks'), inverted by ``lpn.lpn_invert`` with each of
``--validation-step-sizes`` and ``--validation-iterations``: the weights, step size and iteration
count of the lowest mean NRMSE are kept, and the card holds them (what inference uses) beside TV's
NRMSE on the same brains. DIR receives ``checkpoint.pt``, ``model.pt``, ``model_card.json`` and
``training_log.jsonl`` as for LP-CNN; ``--steps`` is the total, a resumed run sees the batches an
uninterrupted run would, and SIGTERM or SIGINT ends the run after the current step with everything
written.
"""
import dataclasses

import numpy as np
import torch

from qsmprep.science import metrics

from .batches import masked_loss, training_batches
from .lpcnn import NETWORK_UNITS_PER_PPM
from .lpn import LPN, lpn_iterates, proximal_matching_loss
from .runs import HeadValidatedRun
from .simulate import CHI_GENERATOR_VERSION, SimulationConfig, simulate_chi_batch
from .train import training_device
from .validation import tv_head_nrmse, validation_heads

ARCHITECTURE = ('channels', 'layers', 'initial_quadratic_weight')
# The noise of a step is drawn apart from the phantoms' streams (simulate.py uses 0 to 2).
NOISE_STREAM = 10


def noisy_batch(samples, seed, step, noise_ppm, device):
    """The clean patches, their masks and the noisy patches of a batch, (B, 1, ...) in network units;
    the noise of step ``step`` depends on the seed and the step alone, as the phantoms do."""
    rng = np.random.default_rng([seed, NOISE_STREAM, step])
    chi = np.stack([sample.chi_ppm[np.newaxis] for sample in samples]).astype(np.float32)
    mask = np.stack([sample.mask[np.newaxis] for sample in samples]).astype(np.float32)
    noisy = mask * (chi + noise_ppm * rng.standard_normal(chi.shape).astype(np.float32))

    def tensor(array):
        return torch.from_numpy(array).to(device)

    return tensor(chi * NETWORK_UNITS_PER_PPM), tensor(mask), tensor(noisy * NETWORK_UNITS_PER_PPM)


def proximal_matching_width(recipe, step):
    """gamma at ``step``: from the recipe's start to its end, geometrically, over its steps after L1."""
    progress = min(max(step - recipe['l1_steps'], 0) / recipe['gamma_steps'], 1.0)
    return recipe['gamma_start'] * (recipe['gamma_end'] / recipe['gamma_start']) ** progress


def training_loss(model, clean, mask, noisy, recipe, step):
    denoised = model(noisy)
    if step < recipe['l1_steps']:
        return masked_loss(denoised, clean, mask, 'l1')
    return proximal_matching_loss(denoised, clean, mask, proximal_matching_width(recipe, step))


def validate_heads(model, heads, step_sizes, iteration_counts, device):
    """NRMSE (percent) of LPN inversion on each head with each step size after each iteration count,
    and the step size and count of the lowest mean with that mean."""
    nrmse = {}
    for step_size in step_sizes:
        for _, _, head in heads:
            for count, chi in lpn_iterates(list(head.local_fields_ppm), head.mask, head.voxel_size, head.b0_dirs,
                                           model, step_size, iteration_counts, device):
                nrmse.setdefault(f'{step_size:g} x {count}', []).append(
                    float(metrics.nrmse(chi, head.chi_ppm, head.mask)))
    chosen = min(nrmse, key=lambda key: np.mean(nrmse[key]))
    step_size, count = chosen.split(' x ')
    model.train()
    return {'head_nrmse_mean': float(np.mean(nrmse[chosen])), 'step_size': float(step_size),
            'iterations': int(count), 'nrmse_percent': nrmse}


def train_lpn(args):
    """Train (or resume training) as ``args`` say; returns the model card."""
    device = training_device(args.device)
    config = SimulationConfig()
    run = HeadValidatedRun(args, device, CHI_GENERATOR_VERSION,
                           lambda recipe: LPN(**{key: recipe[key] for key in ARCHITECTURE}), 'head_nrmse_mean')
    recipe, model = run.recipe, run.model
    heads = validation_heads(recipe, config)

    def step_loss(batch, step):
        clean, mask, noisy = noisy_batch(batch, recipe['seed'], step, recipe['noise_ppm'], device)
        return training_loss(model, clean, mask, noisy, recipe, step)

    run.train(training_batches(recipe, config, args.batch_size, args.patch_size, run.step, args.steps, args.workers,
                               simulate=simulate_chi_batch),
              lambda: validate_heads(model, heads, recipe['validation_step_sizes'], recipe['validation_iterations'],
                                     device),
              step_loss,
              lambda batch: {'gamma': proximal_matching_width(recipe, run.step),
                             'quadratic_weight': model.potential.quadratic_weight.item()},
              after_step=model.potential.project)
    return run.write_card(
        'lpn', {'version': CHI_GENERATOR_VERSION, 'seed': recipe['seed'], 'config': dataclasses.asdict(config)},
        {'head_voxel_size_mm': recipe['validation_head_voxel_size'],
         'heads': [{'seed': seed, 'disturbed': disturbed} for seed, disturbed, _ in heads],
         'head_nrmse_mean': run.best['head_nrmse_mean'], 'nrmse_percent': run.best['nrmse_percent'],
         'tv_nrmse_percent': [tv_head_nrmse(head) for _, _, head in heads]},
        inference={'iterations': run.best['iterations'], 'step_size': run.best['step_size']})
