"""``qsmprep-train deepsti``: train DeepSTI on tensor phantoms simulated on the fly.

    qsmprep-train deepsti --out DIR [--steps N] [--patch-size P] [--batch-size B] [--seed S]
                          [--device auto|cpu|cuda] [--resume DIR/checkpoint.pt] ...

Samples are brain-like patches whose white matter is anisotropic along smooth random fibres
(``simulate.simulate_tensor_batch``), with 1 to 6 orientations, random voxel sizes, noise and
residual background. DIR receives ``checkpoint.pt`` (the latest state: what ``--resume``
continues from), ``model.pt`` (the weights that scored best on the validation heads),
``model_card.json`` and ``training_log.jsonl``, as for LP-CNN.

Checkpoints are chosen on whole simulated brains (``simulate.simulate_tensor_head``, 2 mm by
default; not the benchmarks' heads), each scored with the first 1, 4 and 6 of its orientations:
the mean tensor loss over them picks the weights, and the card holds their mean-susceptibility
NRMSE, eigenvector error in white matter and anisotropy correlation beside least-squares STI's
on the same fields. ``--steps`` is the total: a resumed run continues from the checkpoint's
step and recipe and sees the batches an uninterrupted run would. SIGTERM or SIGINT ends the run
after the current step with everything written.
"""
import dataclasses

import numpy as np
import torch

from qsmprep.science import metrics, orientations

from .batches import batch_tensors, training_batches
from .deepsti import DeepSTI, deepsti_invert, tensor_loss
from .lpcnn import NETWORK_UNITS_PER_PPM
from .runs import HeadValidatedRun
from .simulate import TENSOR_GENERATOR_VERSION, TensorSimulationConfig, simulate_tensor_batch, simulate_tensor_head
from .train import training_device

ARCHITECTURE = ('iterations', 'channels', 'blocks', 'initial_step_size', 'pad_factor', 'initial_anisotropy_weight')


def validation_heads(recipe, config):
    """The whole simulated brains of validation, each with the most orientations scored."""
    return [simulate_tensor_head(seed, recipe['validation_head_voxel_size'], config,
                                 max(recipe['validation_orientations']))
            for seed in range(recipe['seed'], recipe['seed'] + recipe['validation_heads'])]


def _scored(estimate, head, count):
    return {'orientations': count, **metrics.sti_scores(estimate, head.tensor_ppm, head.mask, head.white_matter)}


def validate_heads(model, heads, counts, device, anisotropy_weight):
    """Per head and orientation count, the tensor loss and ``metrics.sti_scores``; and their mean loss."""
    scores = []
    for head in heads:
        for count in counts:
            estimate = deepsti_invert(list(head.local_fields_ppm[:count]), head.mask, head.voxel_size,
                                      head.b0_dirs[:count], model, device)
            mask = torch.from_numpy(head.mask.astype(np.float32))[None, None]
            loss = tensor_loss(torch.from_numpy(estimate)[None] * NETWORK_UNITS_PER_PPM,
                               torch.from_numpy(head.tensor_ppm)[None] * NETWORK_UNITS_PER_PPM, mask, anisotropy_weight)
            scores.append({'loss': loss.item(), **_scored(estimate, head, count)})
    model.train()
    return {'head_loss_mean': float(np.mean([score['loss'] for score in scores])), 'heads': scores}


def least_squares_scores(heads, counts):
    """``metrics.sti_scores`` of least-squares STI on the validation heads: the bar to clear."""
    return [_scored(orientations.sti_least_squares(head.local_fields_ppm[:count], head.mask, head.voxel_size,
                                                   head.b0_dirs[:count]), head, count)
            for head in heads for count in counts]


def train_deepsti(args):
    """Train (or resume training) as ``args`` say; returns the model card."""
    device = training_device(args.device)
    config = TensorSimulationConfig()
    run = HeadValidatedRun(args, device, TENSOR_GENERATOR_VERSION,
                           lambda recipe: DeepSTI(**{key: recipe[key] for key in ARCHITECTURE}), 'head_loss_mean')
    recipe, model = run.recipe, run.model
    heads = validation_heads(recipe, config)
    counts = recipe['validation_orientations']
    baseline = least_squares_scores(heads, counts)

    def step_loss(batch, step):
        fields, mask, tensor, voxel_sizes, b0_dirs = batch_tensors(batch, device)
        return tensor_loss(model(fields, mask, voxel_sizes, b0_dirs), tensor, mask, recipe['anisotropy_loss_weight'])

    run.train(training_batches(recipe, config, args.batch_size, args.patch_size, run.step, args.steps, args.workers,
                               simulate=simulate_tensor_batch),
              lambda: validate_heads(model, heads, counts, device, recipe['anisotropy_loss_weight']), step_loss,
              lambda batch: {'orientations': len(batch[0].b0_dirs), 'step_size': model.step_size.item()})
    return run.write_card('deepsti', {'version': TENSOR_GENERATOR_VERSION, 'seed': recipe['seed'],
                                      'config': dataclasses.asdict(config)},
                          {'head_voxel_size_mm': recipe['validation_head_voxel_size'],
                           'head_loss_mean': run.best['head_loss_mean'], 'deepsti': run.best['heads'],
                           'least_squares_sti': baseline})
