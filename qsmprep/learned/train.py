"""``qsmprep-train lpcnn``: train LP-CNN on samples simulated on the fly.

(The command line itself is ``qsmprep.cli.train``; this text is its help.)

    qsmprep-train lpcnn --out DIR [--steps N] [--patch-size P] [--batch-size B] [--seed S]
                        [--device auto|cpu|cuda] [--resume DIR/checkpoint.pt] ...

DIR receives ``checkpoint.pt`` (weights, optimizer state, step, recipe: what ``--resume``
continues from), ``model.pt`` (the weights alone), ``model_card.json`` (recipe, generator
version and seed, steps, hardware and wall time of each run, validation NRMSE, sha256 of
``model.pt``) and ``training_log.jsonl`` (one line per logged step and per validation).

Validation, at the start of each run and at each checkpoint, scores held-out simulated patches
and whole simulated brains (``simulate.simulate_head``; not the benchmarks' head), each brain
without and with noise, residual background and anisotropy; the card holds TV's NRMSE on the
same brains beside the model's, the bar it must clear. Worker processes simulate the coming
batches while the model trains (``--workers``).

Every choice of the training is an argument and is written into the card. ``--steps`` is the
total step count: a resumed run continues from the checkpoint's step with the checkpoint's
recipe (model and optimisation arguments that differ from it are reported and ignored; those
the checkpoint predates take the command line's value), and because batch k is drawn from the
seed and k alone it sees the batches an uninterrupted run would. Patch size, batch size and
learning rate are a schedule, not the recipe: each run may set its own (a CPU run trains on
small patches, a later GPU run resumes it on large ones), and the card records them per run.
The simulation settings and the starting estimate are the checkpoint's unless a resumed run
gives them on the command line: then that run, and its validation, draw from the new settings
or start from the new estimate (the model is fine-tuned rather than retrained; a new start
begins with fresh Adam moments); every run records the settings and the start it used, and the
recipe holds the last run's.

SIGTERM or SIGINT (a batch scheduler's time limit, Ctrl-C) ends the run after the current step
with the checkpoint, weights and card written, so it can be resumed or shipped as it is.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qsmprep import __version__

from .batches import batch_tensors, masked_loss, training_batches
from .lpcnn import NETWORK_UNITS_PER_PPM, default_device, uses_bfloat16
from .models import CARD_NAME, CHECKPOINT_NAME, WEIGHTS_NAME, sha256_of
from .recipe import (DEFAULT_INITIAL_ESTIMATE, RUN_ARGUMENTS, SCHEDULE_ARGUMENTS, SIMULATION_ARGUMENTS,
                     default_simulation_settings, earlier_runs, initial_estimate, model_from_recipe, restore_recipe,
                     simulation_config)
from .simulate import GENERATOR_VERSION, HEAD_DISTURBANCE_FRACTION, VALIDATION_STREAM, simulate_batch
from .validation import tkd_validation_nrmse, tv_head_nrmse, validate, validate_heads, validation_heads

LOG_NAME = 'training_log.jsonl'


def training_device(choice):
    if choice == 'auto':
        return default_device()
    if choice == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('qsmprep-train: --device cuda, but torch sees no GPU; use --device cpu or auto')
    return torch.device(choice)


def hardware_description(device):
    description = {'device': device.type, 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                   'torch': str(torch.__version__), 'python': platform.python_version(),
                   'platform': platform.platform()}
    if device.type == 'cuda':
        description['device_name'] = torch.cuda.get_device_name(device)
        description['cuda'] = torch.version.cuda
    else:
        description['device_name'] = platform.processor() or platform.machine()
    return description


def save_atomically(content, path):
    """torch.save through a temporary file, so an interrupted save never leaves a broken file."""
    partial = path.with_name(path.name + '.partial')
    torch.save(content, partial)
    os.replace(partial, path)


@contextlib.contextmanager
def stop_requests_on_signals():
    """A list that SIGTERM and SIGINT append to instead of stopping the process, so that a training
    loop can end after its current step; the previous handlers come back on leaving."""
    requests = []
    previous_handlers = {number: signal.signal(number, lambda number, frame: requests.append(number))
                         for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)


def step_progress(first_step, last_step):
    """A progress bar over the training's steps on the terminal; none when stderr is not one (a batch job's log)."""
    return tqdm(total=last_step, initial=first_step, unit='step', disable=None, dynamic_ncols=True)


def optimisation_step(model, optimizer, loss, gradient_clip):
    """One step of ``optimizer`` on ``loss``, the gradient norm clipped to ``gradient_clip`` (0: not)."""
    optimizer.zero_grad()
    loss.backward()
    if gradient_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip)
    optimizer.step()


def _start(args, device):
    """Recipe, model, optimizer, first step and earlier runs: fresh, or from ``args.resume``."""
    recipe = {key: value for key, value in vars(args).items() if key not in RUN_ARGUMENTS + SCHEDULE_ARGUMENTS}
    recipe.update({key: value for key, value in default_simulation_settings().items() if recipe[key] is None})
    recipe['initial_estimate'] = recipe['initial_estimate'] or DEFAULT_INITIAL_ESTIMATE
    checkpoint = None
    if args.resume is not None:
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        recipe = restore_recipe(args, checkpoint)
    torch.manual_seed(recipe['seed'])
    model = model_from_recipe(recipe).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    if checkpoint is None:
        return recipe, model, optimizer, 0, []
    if recipe['initial_estimate'] == initial_estimate(checkpoint['recipe']):
        model.load_state_dict(checkpoint['model_state'])
        optimizer.load_state_dict(checkpoint['optimizer_state'])
    else:
        # A new start: the proximal network and step size carry over, the old start's learned
        # weight (if any) is dropped, a new one begins at its initial value, and Adam's moments,
        # kept per parameter, begin afresh.
        states = {key: value for key, value in checkpoint['model_state'].items() if key != 'log_l2_weight'}
        model.load_state_dict({**model.state_dict(), **states})
    for group in optimizer.param_groups:
        group['lr'] = args.learning_rate
    return recipe, model, optimizer, checkpoint['step'], earlier_runs(checkpoint)


def train_lpcnn(args):
    """Train (or resume training) as ``args`` say; returns the model card.

    Each run (a fresh start or a resumption) is recorded with its steps, wall time and
    hardware, so a card says where every part of the training ran.
    """
    started = time.monotonic()
    device = training_device(args.device)
    bfloat16 = uses_bfloat16(args.precision, device)
    recipe, model, optimizer, step, earlier_runs = _start(args, device)
    first_step = step
    config = simulation_config(recipe)
    simulation = {key: recipe[key] for key in SIMULATION_ARGUMENTS}
    validation = [simulate_batch(recipe['seed'], index, 1, recipe['validation_patch_size'], config,
                                 VALIDATION_STREAM)[0]
                  for index in range(recipe['validation_patches'])]
    heads = validation_heads(recipe, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / LOG_NAME, 'a')

    def write_log(entry):
        log.write(json.dumps(entry) + '\n')
        log.flush()

    def scores_now():
        scores = validate(model, validation, device, recipe['loss'])
        if heads:
            scores.update(validate_heads(model, heads, device))
        return scores

    def checkpoint_and_validate():
        this_run = {'first_step': first_step, 'last_step': step, 'wall_time_s': time.monotonic() - started,
                    **{key: getattr(args, key) for key in SCHEDULE_ARGUMENTS},
                    'simulation': simulation, 'initial_estimate': recipe['initial_estimate'],
                    'cnn_arithmetic': 'bfloat16' if bfloat16 else 'float32',
                    'simulation_workers': args.workers, 'hardware': hardware_description(device)}
        runs = earlier_runs + [this_run]
        save_atomically({'step': step, 'model_state': model.state_dict(), 'optimizer_state': optimizer.state_dict(),
                          'recipe': recipe, 'generator_version': GENERATOR_VERSION, 'runs': runs},
                         out / CHECKPOINT_NAME)
        scores = scores_now()
        write_log({'step': step, **scores})
        return scores, runs

    with log, stop_requests_on_signals() as stop_requests, step_progress(step, args.steps) as progress:
        # Each run starts with a score on its own held-out data, new if its settings are.
        write_log({'step': step, **scores_now()})
        model.train()
        batches = training_batches(recipe, config, args.batch_size, args.patch_size, step, args.steps, args.workers)
        while step < args.steps and not stop_requests:
            samples = next(batches)
            fields, mask, chi, voxel_sizes, b0_dirs = batch_tensors(samples, device)
            estimate = model(fields, mask, voxel_sizes, b0_dirs, bfloat16=bfloat16)
            loss = masked_loss(estimate, chi, mask, recipe['loss'])
            optimisation_step(model, optimizer, loss, recipe['gradient_clip'])
            step += 1
            progress.update()
            if step % args.log_every == 0:
                progress.set_postfix(loss=f'{loss.item():.3g}')
                entry = {'step': step, 'loss': loss.item(), 'orientations': int(fields.shape[1]),
                         'step_size': model.step_size.item()}
                if model.initial_estimate == 'l2':
                    entry['l2_weight'] = model.log_l2_weight.exp().item()
                write_log(entry)
            if step % args.checkpoint_every == 0 and step < args.steps:
                checkpoint_and_validate()
        scores, runs = checkpoint_and_validate()

    save_atomically(model.state_dict(), out / WEIGHTS_NAME)
    card = {
        'model': 'lpcnn',
        'qsmprep_version': __version__,
        'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'architecture': model.config,
        'network_units_per_ppm': NETWORK_UNITS_PER_PPM,
        'recipe': recipe,
        'generator': {'version': GENERATOR_VERSION, 'seed': recipe['seed'], 'config': dataclasses.asdict(config)},
        'steps': step,
        'wall_time_s': sum(run['wall_time_s'] for run in runs),
        'runs': runs,
        'validation': {'patches': len(validation), 'patch_size': recipe['validation_patch_size'],
                       'nrmse_percent': scores['validation_nrmse'], 'loss': scores['validation_loss'],
                       'nrmse_percent_per_patch': scores['validation_nrmse_per_patch'],
                       'nrmse_percent_by_kind': scores['validation_nrmse_by_kind'],
                       'tkd_nrmse_percent': tkd_validation_nrmse(validation)},
        'weights': {'file': WEIGHTS_NAME, 'sha256': sha256_of(out / WEIGHTS_NAME)},
    }
    if heads:
        tv_scores = [tv_head_nrmse(head) for _, _, head in heads]
        card['validation']['heads'] = {
            'voxel_size_mm': recipe['validation_head_voxel_size'], 'b0_dir': heads[0][2].b0_dirs[0].tolist(),
            'disturbed_noise_ppm': HEAD_DISTURBANCE_FRACTION * config.noise_max_ppm,
            'disturbed_background_ppm': HEAD_DISTURBANCE_FRACTION * config.background_max_ppm,
            'disturbed_anisotropy_ppm': HEAD_DISTURBANCE_FRACTION * config.anisotropy_max_ppm,
            'nrmse_percent_mean': scores['head_nrmse_mean'], 'tv_nrmse_percent_mean': float(np.mean(tv_scores)),
            'per_head': [{'seed': seed, 'disturbed': disturbed, 'shape': list(head.mask.shape),
                          'nrmse_percent': score['nrmse'], 'scale': score['scale'],
                          'tkd_nrmse_percent': tkd_validation_nrmse([head]), 'tv_nrmse_percent': tv_score}
                         for (seed, disturbed, head), score, tv_score in zip(heads, scores['heads'], tv_scores)]}
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + '\n')
    return card
