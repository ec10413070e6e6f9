"""``qsmprep-train qsmnet``: train the QSMnet-style U-Net baseline (``qsmnet.QSMnet``).

    qsmprep-train qsmnet --out DIR [--steps N] [--patch-size P] [--batch-size B] [--seed S]
                         [--model-loss-weight W] [--device auto|cpu|cuda] [--resume DIR/checkpoint.pt] ...

The samples are the shipped LP-CNN's: ``simulate.simulate_batch`` with the simulation settings of
its model card, of which the U-Net reads the first orientation's field. The loss is QSMnet's
without its gradient term: the masked L1 error of the susceptibility plus ``--model-loss-weight``
times the masked L1 misfit between the estimate's field and the input field (the point-sampled
dipole kernel of LP-CNN's training). Checkpoints are chosen on whole simulated brains
(``validation.validation_heads``, LP-CNN's validation heads), with TV's NRMSE on the same brains in
the card. DIR receives ``checkpoint.pt``, ``model.pt``, ``model_card.json`` and
``training_log.jsonl`` as for LP-CNN; ``--steps`` is the total, and SIGTERM or SIGINT ends the run
after the current step with everything written.

It is a baseline for the benchmarks, not one of the BIDS App's inversions.
"""
import dataclasses

import numpy as np
import torch

from qsmprep.science import metrics

from .batches import batch_tensors, training_batches
from .lpcnn import TorchDipoleOperator
from .models import SHIPPED, read_card
from .qsmnet import QSMnet, qsmnet_invert
from .recipe import simulation_config
from .runs import HeadValidatedRun
from .simulate import GENERATOR_VERSION
from .train import training_device
from .validation import tv_head_nrmse, validation_heads


def training_loss(model, batch, model_loss_weight, device):
    """QSMnet's loss on a batch of ``TrainingSample``s, from each sample's first orientation."""
    fields, mask, truth, voxel_sizes, b0_dirs = batch_tensors(batch, device)
    field = fields[:, :1]
    first_dirs = np.stack([directions[0] for directions in b0_dirs])
    estimate = model(field, mask, torch.from_numpy(first_dirs).to(device))
    mask_voxels = mask.sum().clamp(min=1)
    loss = ((estimate - truth) * mask).abs().sum() / mask_voxels
    if model_loss_weight > 0:
        operator = TorchDipoleOperator(field.shape[2:], voxel_sizes, first_dirs[:, np.newaxis], device=device)
        misfit = (operator.forward(estimate) - field) * mask
        loss = loss + model_loss_weight * misfit.abs().sum() / mask_voxels
    return loss


def validate_heads(model, heads, device):
    """NRMSE (percent) of the U-Net on each validation head's first orientation, and their mean."""
    scores = [float(metrics.nrmse(qsmnet_invert(list(head.local_fields_ppm[:1]), head.mask, head.voxel_size,
                                                head.b0_dirs[:1], model, device), head.chi_ppm, head.mask))
              for _, _, head in heads]
    model.train()
    return {'head_nrmse_mean': float(np.mean(scores)), 'nrmse_percent': scores}


def train_qsmnet(args):
    """Train (or resume training) as ``args`` say; returns the model card."""
    device = training_device(args.device)
    lpcnn_recipe = read_card(SHIPPED['lpcnn'])[0]['recipe']
    config = simulation_config(lpcnn_recipe)
    run = HeadValidatedRun(args, device, GENERATOR_VERSION, lambda recipe: QSMnet(channels=recipe['channels']),
                           'head_nrmse_mean')
    recipe, model = run.recipe, run.model
    heads = validation_heads(recipe, config)
    run.train(training_batches(recipe, config, args.batch_size, args.patch_size, run.step, args.steps, args.workers),
              lambda: validate_heads(model, heads, device),
              lambda batch, step: training_loss(model, batch, recipe['model_loss_weight'], device),
              lambda batch: {})
    return run.write_card(
        'qsmnet', {'version': GENERATOR_VERSION, 'seed': recipe['seed'], 'config': dataclasses.asdict(config)},
        {'head_voxel_size_mm': recipe['validation_head_voxel_size'],
         'heads': [{'seed': seed, 'disturbed': disturbed} for seed, disturbed, _ in heads],
         'head_nrmse_mean': run.best['head_nrmse_mean'], 'nrmse_percent': run.best['nrmse_percent'],
         'tv_nrmse_percent': [tv_head_nrmse(head) for _, _, head in heads]})
