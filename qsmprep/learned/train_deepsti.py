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
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qsmprep import __version__
from qsmprep.science import metrics, orientations

from .batches import batch_tensors, training_batches
from .deepsti import DeepSTI, deepsti_invert, tensor_loss
from .lpcnn import NETWORK_UNITS_PER_PPM
from .models import CARD_NAME, CHECKPOINT_NAME, WEIGHTS_NAME, sha256_of
from .simulate import TENSOR_GENERATOR_VERSION, TensorSimulationConfig, simulate_tensor_batch, simulate_tensor_head
from .train import (LOG_NAME, hardware_description, optimisation_step, save_atomically, stop_requests_on_signals,
                    training_device)

RUN_ARGUMENTS = ('command', 'out', 'steps', 'resume', 'device', 'workers', 'checkpoint_every', 'log_every',
                 'patch_size', 'batch_size', 'learning_rate')
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


def _start(args, device):
    recipe = {key: value for key, value in vars(args).items() if key not in RUN_ARGUMENTS}
    checkpoint = None
    if args.resume is not None:
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        if checkpoint['generator_version'] != TENSOR_GENERATOR_VERSION:
            raise SystemExit(f'qsmprep-train: {args.resume} was trained on simulator version '
                             f'{checkpoint["generator_version"]}, this qsmprep simulates {TENSOR_GENERATOR_VERSION}; '
                             'resume with the qsmprep that wrote it, or start a new training')
        for key, value in recipe.items():
            if key in checkpoint['recipe'] and checkpoint['recipe'][key] != value:
                print(f'qsmprep-train: --{key.replace("_", "-")} {value} ignored: {args.resume} was trained with '
                      f'{checkpoint["recipe"][key]}', file=sys.stderr)
        recipe = {**recipe, **checkpoint['recipe']}
    torch.manual_seed(recipe['seed'])
    model = DeepSTI(**{key: recipe[key] for key in ARCHITECTURE}).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    if checkpoint is None:
        return recipe, model, optimizer, 0, [], None
    model.load_state_dict(checkpoint['model_state'])
    optimizer.load_state_dict(checkpoint['optimizer_state'])
    for group in optimizer.param_groups:
        group['lr'] = args.learning_rate
    return recipe, model, optimizer, checkpoint['step'], checkpoint['runs'], checkpoint['best']


def train_deepsti(args):
    """Train (or resume training) as ``args`` say; returns the model card."""
    started = time.monotonic()
    device = training_device(args.device)
    recipe, model, optimizer, step, earlier_runs, best = _start(args, device)
    first_step = step
    config = TensorSimulationConfig()
    heads = validation_heads(recipe, config)
    counts = recipe['validation_orientations']
    baseline = least_squares_scores(heads, counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / LOG_NAME, 'a')

    def write_log(entry):
        log.write(json.dumps(entry) + '\n')
        log.flush()

    def this_run():
        return {'first_step': first_step, 'last_step': step, 'wall_time_s': time.monotonic() - started,
                'patch_size': args.patch_size, 'batch_size': args.batch_size, 'learning_rate': args.learning_rate,
                'simulation_workers': args.workers, 'hardware': hardware_description(device)}

    def validate_and_checkpoint():
        nonlocal best
        scores = validate_heads(model, heads, counts, device, recipe['anisotropy_loss_weight'])
        write_log({'step': step, **scores})
        if best is None or scores['head_loss_mean'] < best['head_loss_mean']:
            best = {'step': step, **scores}
            save_atomically(model.state_dict(), out / WEIGHTS_NAME)
        save_atomically({'step': step, 'model_state': model.state_dict(), 'optimizer_state': optimizer.state_dict(),
                          'recipe': recipe, 'generator_version': TENSOR_GENERATOR_VERSION,
                          'runs': earlier_runs + [this_run()], 'best': best}, out / CHECKPOINT_NAME)

    with log, stop_requests_on_signals() as stop_requests:
        if best is None:
            validate_and_checkpoint()
        model.train()
        batches = training_batches(recipe, config, args.batch_size, args.patch_size, step, args.steps,
                                   args.workers, simulate=simulate_tensor_batch)
        while step < args.steps and not stop_requests:
            fields, mask, tensor, voxel_sizes, b0_dirs = batch_tensors(next(batches), device)
            loss = tensor_loss(model(fields, mask, voxel_sizes, b0_dirs), tensor, mask,
                               recipe['anisotropy_loss_weight'])
            optimisation_step(model, optimizer, loss, recipe['gradient_clip'])
            step += 1
            if step % args.log_every == 0:
                write_log({'step': step, 'loss': loss.item(), 'orientations': int(fields.shape[1]),
                           'step_size': model.step_size.item()})
            if step % args.checkpoint_every == 0 and step < args.steps:
                validate_and_checkpoint()
        validate_and_checkpoint()

    card = {
        'model': 'deepsti',
        'qsmprep_version': __version__,
        'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'architecture': model.config,
        'network_units_per_ppm': NETWORK_UNITS_PER_PPM,
        'recipe': recipe,
        'generator': {'version': TENSOR_GENERATOR_VERSION, 'seed': recipe['seed'],
                      'config': dataclasses.asdict(config)},
        'steps': step,
        'runs': earlier_runs + [this_run()],
        'validation': {'chosen_step': best['step'], 'head_voxel_size_mm': recipe['validation_head_voxel_size'],
                       'head_loss_mean': best['head_loss_mean'], 'deepsti': best['heads'],
                       'least_squares_sti': baseline},
        'weights': {'file': WEIGHTS_NAME, 'sha256': sha256_of(out / WEIGHTS_NAME)},
    }
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + '\n')
    return card
