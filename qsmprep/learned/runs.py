"""The training run shared by ``qsmprep-train deepsti`` and ``lpn``: resume or start, a loop that
keeps the weights scoring best on whole simulated heads, the log, the checkpoint and the card."""
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from qsmprep import __version__

from .lpcnn import NETWORK_UNITS_PER_PPM
from .models import CARD_NAME, CHECKPOINT_NAME, WEIGHTS_NAME, sha256_of
from .train import (LOG_NAME, hardware_description, optimisation_step, save_atomically, step_progress,
                    stop_requests_on_signals)

# The arguments that say where, how long and how fast to run: not part of the recipe, each run sets its own.
RUN_ARGUMENTS = ('command', 'out', 'steps', 'resume', 'device', 'workers', 'checkpoint_every', 'log_every',
                 'patch_size', 'batch_size', 'learning_rate')


def start_or_resume(args, device, generator_version, build_model):
    """Recipe, model, Adam optimizer, step, earlier runs and best validation so far of a training
    whose recipe is every argument but ``RUN_ARGUMENTS``: fresh, or from ``args.resume``, whose
    recipe wins over the command line (differences are reported)."""
    recipe = {key: value for key, value in vars(args).items() if key not in RUN_ARGUMENTS}
    checkpoint = None
    if args.resume is not None:
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        if checkpoint['generator_version'] != generator_version:
            raise SystemExit(f'qsmprep-train: {args.resume} was trained on simulator version '
                             f'{checkpoint["generator_version"]}, this qsmprep simulates {generator_version}; '
                             'resume with the qsmprep that wrote it, or start a new training')
        for key, value in recipe.items():
            if key in checkpoint['recipe'] and checkpoint['recipe'][key] != value:
                print(f'qsmprep-train: --{key.replace("_", "-")} {value} ignored: {args.resume} was trained with '
                      f'{checkpoint["recipe"][key]}', file=sys.stderr)
        recipe = {**recipe, **checkpoint['recipe']}
    torch.manual_seed(recipe['seed'])
    model = build_model(recipe).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    if checkpoint is None:
        return recipe, model, optimizer, 0, [], None
    model.load_state_dict(checkpoint['model_state'])
    optimizer.load_state_dict(checkpoint['optimizer_state'])
    for group in optimizer.param_groups:
        group['lr'] = args.learning_rate
    return recipe, model, optimizer, checkpoint['step'], checkpoint['runs'], checkpoint['best']


class HeadValidatedRun:
    """One run of a training whose weights are chosen on whole simulated heads.

    ``build_model(recipe)`` makes the model (see ``start_or_resume``), ``score_key`` names the
    validation score to minimise. At the start of a fresh training, every
    ``--checkpoint-every`` steps and at the end, the run logs the scores, keeps the weights
    (``model.pt``) if they are the best so far and writes the checkpoint (``checkpoint.pt``) that
    ``--resume`` continues from.
    """

    def __init__(self, args, device, generator_version, build_model, score_key):
        self.started = time.monotonic()
        self.args, self.device, self.generator_version = args, device, generator_version
        (self.recipe, self.model, self.optimizer, self.step, self.earlier_runs,
         self.best) = start_or_resume(args, device, generator_version, build_model)
        self.first_step = self.step
        self.score_key = score_key
        self.validate = None
        self.out = Path(args.out)

    def write_log(self, entry):
        self.log.write(json.dumps(entry) + '\n')
        self.log.flush()

    def runs(self):
        """Every run of the training, this one (so far) last: steps, wall time, schedule, hardware."""
        args = self.args
        return self.earlier_runs + [{
            'first_step': self.first_step, 'last_step': self.step, 'wall_time_s': time.monotonic() - self.started,
            'patch_size': args.patch_size, 'batch_size': args.batch_size, 'learning_rate': args.learning_rate,
            'simulation_workers': args.workers, 'hardware': hardware_description(self.device)}]

    def validate_and_checkpoint(self):
        scores = self.validate()
        self.write_log({'step': self.step, **scores})
        if self.best is None or scores[self.score_key] < self.best[self.score_key]:
            self.best = {'step': self.step, **scores}
            save_atomically(self.model.state_dict(), self.out / WEIGHTS_NAME)
        save_atomically({'step': self.step, 'model_state': self.model.state_dict(),
                         'optimizer_state': self.optimizer.state_dict(), 'recipe': self.recipe,
                         'generator_version': self.generator_version, 'runs': self.runs(), 'best': self.best},
                        self.out / CHECKPOINT_NAME)

    def train(self, batches, validate, step_loss, log_entry, after_step=None):
        """Optimise until ``--steps`` or a stop signal: ``validate()`` scores the model now (a dict),
        ``step_loss(batch, step)`` is the loss of a batch of ``batches``, ``log_entry(batch)`` what the
        log adds to the step and the loss every ``--log-every`` steps, ``after_step()`` runs after each
        optimiser step."""
        args = self.args
        self.validate = validate
        self.out.mkdir(parents=True, exist_ok=True)
        with (open(self.out / LOG_NAME, 'a') as self.log, stop_requests_on_signals() as stop_requests,
              step_progress(self.step, args.steps) as progress):
            if self.best is None:
                self.validate_and_checkpoint()
            self.model.train()
            while self.step < args.steps and not stop_requests:
                batch = next(batches)
                loss = step_loss(batch, self.step)
                optimisation_step(self.model, self.optimizer, loss, self.recipe['gradient_clip'])
                if after_step is not None:
                    after_step()
                self.step += 1
                progress.update()
                if self.step % args.log_every == 0:
                    progress.set_postfix(loss=f'{loss.item():.3g}')
                    self.write_log({'step': self.step, 'loss': loss.item(), **log_entry(batch)})
                if self.step % args.checkpoint_every == 0 and self.step < args.steps:
                    self.validate_and_checkpoint()
            self.validate_and_checkpoint()

    def write_card(self, name, generator, validation, **more):
        """The model card of the best weights: what every card holds, the ``generator`` (version,
        seed, config), the ``validation`` that chose the weights and ``more`` entries."""
        card = {
            'model': name,
            'qsmprep_version': __version__,
            'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
            'architecture': self.model.config,
            'network_units_per_ppm': NETWORK_UNITS_PER_PPM,
            'recipe': self.recipe,
            'generator': generator,
            'steps': self.step,
            'wall_time_s': sum(run['wall_time_s'] for run in self.runs()),
            'runs': self.runs(),
            **more,
            'validation': {'chosen_step': self.best['step'], **validation},
            'weights': {'file': WEIGHTS_NAME, 'sha256': sha256_of(self.out / WEIGHTS_NAME)},
        }
        (self.out / CARD_NAME).write_text(json.dumps(card, indent=2) + '\n')
        return card
