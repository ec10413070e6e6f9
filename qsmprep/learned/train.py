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
import dataclasses
import datetime
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qsmprep import __version__
from qsmprep.science import inversion, metrics

from .lpcnn import INITIAL_L2_WEIGHT, LPCNN, NETWORK_UNITS_PER_PPM, default_device, lpcnn_invert, uses_bfloat16
from .models import CARD_NAME, CHECKPOINT_NAME, WEIGHTS_NAME, sha256_of
from .simulate import (GENERATOR_VERSION, HEAD_DISTURBANCE_FRACTION, VALIDATION_STREAM, SimulationConfig,
                       simulate_batch, simulate_head)

LOG_NAME = 'training_log.jsonl'
# GCV's weight suits each sample's noise, where one learned weight cannot (see lpcnn's module doc).
DEFAULT_INITIAL_ESTIMATE = 'l2_gcv'
# Arguments that say where and how long to run, not what is trained: not part of the recipe.
RUN_ARGUMENTS = ('command', 'out', 'steps', 'resume', 'device', 'workers', 'checkpoint_every', 'log_every')
SCHEDULE_ARGUMENTS = ('patch_size', 'batch_size', 'learning_rate', 'precision')
# Settings of the simulated training data (the checkpoint's, unless a resumed run gives them),
# each with the SimulationConfig field it sets.
SIMULATION_ARGUMENTS = {'voxel_size_range': 'voxel_size_range_mm', 'max_orientations': 'max_orientations',
                        'max_tilt_deg': 'max_tilt_deg', 'noise_max_ppm': 'noise_max_ppm',
                        'background_max_ppm': 'background_max_ppm', 'anisotropy_max_ppm': 'anisotropy_max_ppm',
                        'brain_fraction': 'brain_fraction', 'supersampling': 'supersampling',
                        'simulation_pad_factor': 'pad_factor'}
# Simulation settings added after checkpoints were written, with the value that draws what those
# checkpoints were trained on.
SIMULATION_ARGUMENTS_BEFORE_THEY_EXISTED = {'anisotropy_max_ppm': 0.0}


def default_simulation_settings():
    """The simulation arguments of a fresh run that gives none, from ``SimulationConfig`` (the
    voxel size range as the list that argparse and a card hold)."""
    defaults = dataclasses.asdict(SimulationConfig())
    return {argument: list(defaults[field]) if isinstance(defaults[field], tuple) else defaults[field]
            for argument, field in SIMULATION_ARGUMENTS.items()}


def _with_later_settings(settings):
    """A recipe or a run's ``simulation`` with the simulation settings added since it was
    written, at the values that draw what it drew."""
    return {**SIMULATION_ARGUMENTS_BEFORE_THEY_EXISTED, **settings}


def simulation_config(settings):
    """The ``SimulationConfig`` of a recipe or a run's ``simulation`` (the arguments' names)."""
    settings = _with_later_settings(settings)
    return SimulationConfig(**{field: tuple(settings[argument]) if isinstance(settings[argument], list)
                               else settings[argument] for argument, field in SIMULATION_ARGUMENTS.items()})


def _initial_estimate(recipe):
    """The starting estimate of ``recipe``: recipes written before the L2 start existed started from 0."""
    return recipe.get('initial_estimate', 'zero')


def _model_from_recipe(recipe):
    return LPCNN(iterations=recipe['iterations'], channels=recipe['channels'], blocks=recipe['blocks'],
                 shared=not recipe['separate_networks'], initial_step_size=recipe['initial_step_size'],
                 pad_factor=recipe['pad_factor'], initial_estimate=_initial_estimate(recipe),
                 initial_l2_weight=recipe.get('initial_l2_weight', INITIAL_L2_WEIGHT))


def _device(choice):
    if choice == 'auto':
        return default_device()
    if choice == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('qsmprep-train: --device cuda, but torch sees no GPU; use --device cpu or auto')
    return torch.device(choice)


def _batch_tensors(samples, device):
    """Fields, mask and truth in network units as (B, N | 1, X, Y, Z) tensors, and the geometry."""
    def stacked(arrays):
        return torch.from_numpy(np.stack(arrays).astype(np.float32)).to(device)

    fields = stacked([s.local_fields_ppm for s in samples]) * NETWORK_UNITS_PER_PPM
    mask = stacked([s.mask[np.newaxis] for s in samples])
    chi = stacked([s.chi_ppm[np.newaxis] for s in samples]) * NETWORK_UNITS_PER_PPM
    return fields, mask, chi, [s.voxel_size for s in samples], [s.b0_dirs for s in samples]


def _masked_loss(estimate, truth, mask, kind):
    error = (estimate - truth) * mask
    per_voxel = error ** 2 if kind == 'mse' else error.abs()
    return per_voxel.sum() / mask.sum().clamp(min=1)


def validate(model, samples, device, loss_kind):
    """Mean training loss and mean NRMSE (percent, CONVENTIONS.md) over held-out samples, and
    the mean NRMSE of each kind of sample: random shapes are easier for the network than brains,
    and the overall mean hides which of them a change helped."""
    model.eval()
    losses, scores = [], []
    with torch.no_grad():
        for sample in samples:
            fields, mask, chi, voxel_sizes, b0_dirs = _batch_tensors([sample], device)
            estimate = model(fields, mask, voxel_sizes, b0_dirs)
            losses.append(_masked_loss(estimate, chi, mask, loss_kind).item())
            estimate_ppm = estimate[0, 0].cpu().numpy() / NETWORK_UNITS_PER_PPM
            scores.append(metrics.nrmse(estimate_ppm, sample.chi_ppm, sample.mask))
    model.train()
    return {'validation_loss': float(np.mean(losses)), 'validation_nrmse': float(np.mean(scores)),
            'validation_nrmse_per_patch': [float(score) for score in scores],
            'validation_nrmse_by_kind': {kind: float(np.mean([score for score, sample in zip(scores, samples)
                                                              if sample.kind == kind]))
                                         for kind in sorted({sample.kind for sample in samples})}}


def validation_heads(recipe, config):
    """The whole simulated brains of validation: for each of ``recipe['validation_heads']`` seeds
    (from the recipe's seed on), one brain with the share ``HEAD_DISTURBANCE_FRACTION`` of the
    training's largest noise, residual background and anisotropy and the same brain without them;
    a list of (seed, disturbed, head)."""
    if recipe['validation_head_voxel_size'] <= 0:
        return []
    heads = []
    for seed in range(recipe['seed'], recipe['seed'] + recipe['validation_heads']):
        disturbed, undisturbed = simulate_head(seed, recipe['validation_head_voxel_size'], config,
                                               (HEAD_DISTURBANCE_FRACTION, 0.0))
        heads += [(seed, True, disturbed), (seed, False, undisturbed)]
    return heads


def validate_heads(model, heads, device):
    """NRMSE (percent) of the model on each validation head, their mean, and on each the
    least-squares factor from the estimate to the truth, both referenced to their mean as NRMSE
    is (above 1: the estimate is too small). The network alone is scored, in one pass
    (``reflection_average=False``): validation judges the training, not the inference."""
    scores = []
    for seed, disturbed, head in heads:
        estimate = lpcnn_invert(list(head.local_fields_ppm), head.mask, head.voxel_size, head.b0_dirs, model, device,
                                reflection_average=False, precision='float32')
        inside_estimate = estimate[head.mask] - estimate[head.mask].mean()
        inside_truth = head.chi_ppm[head.mask] - head.chi_ppm[head.mask].mean()
        scale = float(inside_estimate @ inside_truth / max(float(inside_estimate @ inside_estimate), 1e-30))
        scores.append({'seed': seed, 'disturbed': disturbed,
                       'nrmse': float(metrics.nrmse(estimate, head.chi_ppm, head.mask)), 'scale': scale})
    model.train()
    return {'head_nrmse_mean': float(np.mean([score['nrmse'] for score in scores])), 'heads': scores}


def tkd_validation_nrmse(samples):
    """Mean NRMSE (percent) of TKD on the first orientation of each held-out sample: the card's baseline."""
    return float(np.mean([metrics.nrmse(inversion.tkd(s.local_fields_ppm[0], s.mask, s.voxel_size, s.b0_dirs[0]),
                                        s.chi_ppm, s.mask) for s in samples]))


def tv_head_nrmse(head):
    """NRMSE (percent) of TV (qsmprep's default inversion, its weight by its own rule, no magnitude)
    on a validation head: the bar a model must clear to be worth using. On whole brains held out
    from training (benchmarks/SIMULATED_BRAINS.md) TV beats the shipped LP-CNN."""
    chi, _ = inversion.invert(head.local_fields_ppm[0], head.mask, head.voxel_size, head.b0_dirs[0], method='tv')
    return float(metrics.nrmse(chi, head.chi_ppm, head.mask))


class SimulatedBatches(torch.utils.data.Dataset):
    """The training batch of each step (``simulate_batch``), indexed by step, for a DataLoader."""

    def __init__(self, seed, batch_size, patch_size, config):
        self.seed, self.batch_size, self.patch_size, self.config = seed, batch_size, patch_size, config

    def __getitem__(self, step):
        return simulate_batch(self.seed, step, self.batch_size, self.patch_size, self.config)


def _samples_as_simulated(samples):
    return samples


def _ignore_stop_signals(worker_id):
    # A batch scheduler's SIGTERM reaches the whole process group; only the training process
    # acts on it (ending after the current step), so the workers must outlive it until then.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_batches(recipe, config, batch_size, patch_size, first_step, last_step, workers):
    """The batches of steps ``first_step`` to ``last_step``, in order, simulated ahead in
    ``workers`` processes. Batch k depends on the seed and k alone, so any number of workers
    yields the batches one process would."""
    batches = SimulatedBatches(recipe['seed'], batch_size, patch_size, config)
    return iter(torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first_step, last_step),
                                            num_workers=workers, collate_fn=_samples_as_simulated,
                                            worker_init_fn=_ignore_stop_signals))


def _hardware(device):
    description = {'device': device.type, 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
                   'torch': str(torch.__version__), 'python': platform.python_version(), 'platform': platform.platform()}
    if device.type == 'cuda':
        description['device_name'] = torch.cuda.get_device_name(device)
        description['cuda'] = torch.version.cuda
    else:
        description['device_name'] = platform.processor() or platform.machine()
    return description


def _save_atomically(content, path):
    """torch.save through a temporary file, so an interrupted save never leaves a broken file."""
    partial = path.with_name(path.name + '.partial')
    torch.save(content, partial)
    os.replace(partial, path)


def _restore_recipe(args, checkpoint):
    """The checkpoint's recipe with the simulation settings and starting estimate given on the
    command line, reporting the model and optimisation arguments given that differ from it
    (those are ignored)."""
    recipe = {**_with_later_settings(checkpoint['recipe']),
              'initial_estimate': _initial_estimate(checkpoint['recipe'])}
    for key, value in vars(args).items():
        if key in RUN_ARGUMENTS + SCHEDULE_ARGUMENTS:
            continue
        if key == 'initial_estimate':
            if value is not None and value != recipe[key]:
                print(f'qsmprep-train: --initial-estimate {value}: this run fine-tunes {args.resume}, trained from '
                      f'the {recipe[key]} start, from this one, with fresh Adam moments', file=sys.stderr)
                recipe[key] = value
        elif key in SIMULATION_ARGUMENTS:
            if value is not None and value != recipe[key]:
                print(f'qsmprep-train: --{key.replace("_", "-")} {value}: this run draws from it instead of '
                      f'the {recipe[key]} that {args.resume} was trained with', file=sys.stderr)
                recipe[key] = value
        elif key not in recipe:
            recipe[key] = value  # an argument newer than the checkpoint
        elif recipe[key] != value:
            print(f'qsmprep-train: --{key.replace("_", "-")} {value} ignored: {args.resume} was trained with '
                  f'{recipe[key]}', file=sys.stderr)
    if checkpoint['generator_version'] != GENERATOR_VERSION:
        raise SystemExit(f'qsmprep-train: {args.resume} was trained on simulator version '
                         f'{checkpoint["generator_version"]}, this qsmprep simulates version {GENERATOR_VERSION}; '
                         'resume with the qsmprep that wrote it, or start a new training')
    return recipe


def _earlier_runs(checkpoint):
    """The checkpoint's runs, each with the simulation settings it drew from and the starting
    estimate it used (runs recorded before runs carried them used the checkpoint's recipe's)."""
    recipe = _with_later_settings(checkpoint['recipe'])
    simulation = {key: recipe[key] for key in SIMULATION_ARGUMENTS}
    start = _initial_estimate(recipe)
    return [{**run, 'simulation': _with_later_settings(run.get('simulation', simulation)),
             'initial_estimate': run.get('initial_estimate', start)} for run in checkpoint['runs']]


def _start(args, device):
    """Recipe, model, optimizer, first step and earlier runs: fresh, or from ``args.resume``."""
    recipe = {key: value for key, value in vars(args).items() if key not in RUN_ARGUMENTS + SCHEDULE_ARGUMENTS}
    recipe.update({key: value for key, value in default_simulation_settings().items() if recipe[key] is None})
    recipe['initial_estimate'] = recipe['initial_estimate'] or DEFAULT_INITIAL_ESTIMATE
    checkpoint = None
    if args.resume is not None:
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        recipe = _restore_recipe(args, checkpoint)
    torch.manual_seed(recipe['seed'])
    model = _model_from_recipe(recipe).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    if checkpoint is None:
        return recipe, model, optimizer, 0, []
    if recipe['initial_estimate'] == _initial_estimate(checkpoint['recipe']):
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
    return recipe, model, optimizer, checkpoint['step'], _earlier_runs(checkpoint)


def train_lpcnn(args):
    """Train (or resume training) as ``args`` say; returns the model card.

    Each run (a fresh start or a resumption) is recorded with its steps, wall time and
    hardware, so a card says where every part of the training ran.
    """
    started = time.monotonic()
    device = _device(args.device)
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
                    'simulation_workers': args.workers, 'hardware': _hardware(device)}
        runs = earlier_runs + [this_run]
        _save_atomically({'step': step, 'model_state': model.state_dict(), 'optimizer_state': optimizer.state_dict(),
                          'recipe': recipe, 'generator_version': GENERATOR_VERSION, 'runs': runs},
                         out / CHECKPOINT_NAME)
        scores = scores_now()
        write_log({'step': step, **scores})
        return scores, runs

    stop_requests = []

    def request_stop(signal_number, frame):
        stop_requests.append(signal_number)

    previous_handlers = {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        with log:
            # Each run starts with a score on its own held-out data, new if its settings are.
            write_log({'step': step, **scores_now()})
            model.train()
            batches = training_batches(recipe, config, args.batch_size, args.patch_size, step, args.steps, args.workers)
            while step < args.steps and not stop_requests:
                samples = next(batches)
                fields, mask, chi, voxel_sizes, b0_dirs = _batch_tensors(samples, device)
                estimate = model(fields, mask, voxel_sizes, b0_dirs, bfloat16=bfloat16)
                loss = _masked_loss(estimate, chi, mask, recipe['loss'])
                optimizer.zero_grad()
                loss.backward()
                if recipe['gradient_clip'] > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe['gradient_clip'])
                optimizer.step()
                step += 1
                if step % args.log_every == 0:
                    entry = {'step': step, 'loss': loss.item(), 'orientations': int(fields.shape[1]),
                             'step_size': model.step_size.item()}
                    if model.initial_estimate == 'l2':
                        entry['l2_weight'] = model.log_l2_weight.exp().item()
                    write_log(entry)
                if step % args.checkpoint_every == 0 and step < args.steps:
                    checkpoint_and_validate()
            scores, runs = checkpoint_and_validate()
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)

    _save_atomically(model.state_dict(), out / WEIGHTS_NAME)
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
