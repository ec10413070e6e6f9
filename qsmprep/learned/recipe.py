"""The recipe of a training: the arguments that say what is trained, the simulation settings it
draws from, and how a resumed run restores them from its checkpoint."""
import dataclasses
import sys

from .lpcnn import INITIAL_L2_WEIGHT, LPCNN
from .simulate import GENERATOR_VERSION, SimulationConfig

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


def with_later_settings(settings):
    """A recipe or a run's ``simulation`` with the simulation settings added since it was
    written, at the values that draw what it drew."""
    return {**SIMULATION_ARGUMENTS_BEFORE_THEY_EXISTED, **settings}


def simulation_config(settings):
    """The ``SimulationConfig`` of a recipe or a run's ``simulation`` (the arguments' names)."""
    settings = with_later_settings(settings)
    return SimulationConfig(**{field: tuple(settings[argument]) if isinstance(settings[argument], list)
                               else settings[argument] for argument, field in SIMULATION_ARGUMENTS.items()})


def initial_estimate(recipe):
    """The starting estimate of ``recipe``: recipes written before the L2 start existed started from 0."""
    return recipe.get('initial_estimate', 'zero')


def model_from_recipe(recipe):
    return LPCNN(iterations=recipe['iterations'], channels=recipe['channels'], blocks=recipe['blocks'],
                 shared=not recipe['separate_networks'], initial_step_size=recipe['initial_step_size'],
                 pad_factor=recipe['pad_factor'], initial_estimate=initial_estimate(recipe),
                 initial_l2_weight=recipe.get('initial_l2_weight', INITIAL_L2_WEIGHT),
                 correction=recipe.get('correction', 'free'))


def restore_recipe(args, checkpoint):
    """The checkpoint's recipe with the simulation settings and starting estimate given on the
    command line, reporting the model and optimisation arguments given that differ from it
    (those are ignored)."""
    recipe = {**with_later_settings(checkpoint['recipe']),
              'initial_estimate': initial_estimate(checkpoint['recipe'])}
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


def earlier_runs(checkpoint):
    """The checkpoint's runs, each with the simulation settings it drew from and the starting
    estimate it used (runs recorded before runs carried them used the checkpoint's recipe's)."""
    recipe = with_later_settings(checkpoint['recipe'])
    simulation = {key: recipe[key] for key in SIMULATION_ARGUMENTS}
    start = initial_estimate(recipe)
    return [{**run, 'simulation': with_later_settings(run.get('simulation', simulation)),
             'initial_estimate': run.get('initial_estimate', start)} for run in checkpoint['runs']]
