"""``qsmprep-train``: the command line of ``qsmprep.learned.train`` (whose docstring is its help)."""
import argparse
import os
import sys
from pathlib import Path

from ..learned import train as training
from ..learned import train_deepsti, train_lpn, train_qsmnet
from ..learned.deepsti import INITIAL_ANISOTROPY_WEIGHT, INITIAL_STEP_SIZE
from ..learned.lpcnn import CORRECTIONS, INITIAL_ESTIMATES, INITIAL_L2_WEIGHT, PRECISIONS
from ..learned.lpn import INITIAL_QUADRATIC_WEIGHT
from ..learned.models import CARD_NAME
from ..learned.recipe import DEFAULT_INITIAL_ESTIMATE
from ..learned.simulate import SimulationConfig
from .parser import fraction, non_negative_int, positive_int


def _default_workers():
    # The cores this process may use (a batch scheduler's share); sched_getaffinity is Linux only.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(cores - 1, 0)


def _run_arguments(model_parser):
    """The 'run' argument group that every model's training shares: where, how long, on what."""
    run = model_parser.add_argument_group('run')
    run.add_argument('--out', type=Path, required=True, help='folder for checkpoint, weights, card and log')
    run.add_argument('--steps', type=positive_int, default=20000, help='total optimisation steps')
    run.add_argument('--resume', type=Path, help='checkpoint.pt to continue from')
    run.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                     help='auto: the GPU when torch sees one, else the CPU')
    # A 96^3 batch of 4 takes about 9 s to simulate on one core, many times the GPU's step: on a
    # GPU the simulation sets the pace unless workers simulate the coming batches meanwhile.
    run.add_argument('--workers', type=non_negative_int, default=_default_workers(),
                     help='processes simulating the coming batches while the model trains (0: the training '
                          'process simulates each batch itself); default: one per CPU core but one')
    return run


def _build_parser():
    parser = argparse.ArgumentParser(prog='qsmprep-train', description=training.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_subparsers(dest='command', required=True, metavar='MODEL')
    lpcnn = models.add_parser('lpcnn', help='learned proximal CNN (Lai et al. 2020)',
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = _run_arguments(lpcnn)
    run.add_argument('--precision', choices=PRECISIONS, default='auto',
                     help="arithmetic of the proximal CNN's training steps; auto: bfloat16 on a CPU with "
                          'bfloat16 instructions, else float32 (validation is always float32)')
    run.add_argument('--checkpoint-every', type=positive_int, default=500, help='steps between checkpoints')
    run.add_argument('--log-every', type=positive_int, default=50, help='steps between log lines')

    model = lpcnn.add_argument_group('model')
    model.add_argument('--iterations', type=positive_int, default=3, help='unrolled gradient steps')
    # The paper's 32 channels take about 145 s for three proximal steps on a 160^3 volume on two
    # CPU cores; 16 channels take 64 s (and train four times faster), so 16 is the default.
    model.add_argument('--channels', type=positive_int, default=16, help='channels of the proximal CNN')
    model.add_argument('--blocks', type=positive_int, default=8, help='residual blocks of the proximal CNN')
    model.add_argument('--separate-networks', action='store_true',
                       help='one proximal CNN per iteration instead of one shared by all')
    model.add_argument('--initial-step-size', type=float, default=2.0, help='initial value of the learned step size')
    model.add_argument('--pad-factor', type=float, default=1.5, help="zero padding of the model's dipole FFT grid")
    # No argparse default: a resumed run keeps its checkpoint's start unless given.
    model.add_argument('--initial-estimate', choices=INITIAL_ESTIMATES,
                       help='starting estimate: the closed-form L2 solution of all orientations with a learned '
                            'weight (l2) or the weight GCV picks for each sample (l2_gcv), or 0 (the paper); '
                            f'default: a fresh run {DEFAULT_INITIAL_ESTIMATE}, a resumed run its checkpoint\'s')
    model.add_argument('--initial-l2-weight', type=float, default=INITIAL_L2_WEIGHT,
                       help="initial value of the L2 starting estimate's learned gradient-penalty weight")
    # The shipped model run with 'cone' untrained lost 1-7 points on disturbed brains (benchmarks/NOTES.md).
    model.add_argument('--correction', choices=CORRECTIONS, default='free',
                       help="where the proximal CNN's correction acts: in every frequency (free, the paper's) or "
                            'only in those the dipole kernel determines poorly (cone); a checkpoint written before '
                            'this choice existed was trained free and is fine-tuned with the one given here')

    optimisation = lpcnn.add_argument_group('optimisation')
    optimisation.add_argument('--batch-size', type=positive_int, default=4, help='patches per step')
    # Small patches shrank whole heads' contrast somewhat (benchmarks/NOTES.md).
    optimisation.add_argument('--patch-size', type=positive_int, default=64, help='patch edge in voxels')
    optimisation.add_argument('--learning-rate', type=float, default=1e-4, help='Adam learning rate')
    # Without clipping, one batch with a strong calcification or vein (errors of several ppm)
    # can undo hundreds of steps.
    optimisation.add_argument('--gradient-clip', type=float, default=1.0,
                              help='largest gradient norm of a step (0: no clipping)')
    optimisation.add_argument('--loss', choices=('mse', 'l1'), default='mse',
                              help='error inside the mask between estimate and truth')
    optimisation.add_argument('--seed', type=int, default=0, help='seeds the initial weights and the data')
    optimisation.add_argument('--validation-patches', type=positive_int, default=16,
                              help='held-out simulated patches scored at each checkpoint')
    optimisation.add_argument('--validation-patch-size', type=positive_int, default=48,
                              help='edge in voxels of the held-out patches')
    # At 1.5 mm a head costs 11 s to simulate once and 10-20 s of CPU per checkpoint.
    optimisation.add_argument('--validation-head-voxel-size', type=float, default=1.5,
                              help='voxel size in mm of the whole simulated brains scored at each checkpoint '
                                   '(0: none)')
    # One head alone is too noisy to choose a model by (benchmarks/NOTES.md).
    optimisation.add_argument('--validation-heads', type=positive_int, default=3,
                              help='whole simulated brains (seeds SEED, SEED+1, ...) scored at each checkpoint, '
                                   'each without and with noise, residual background and anisotropy')

    # No argparse defaults here: a resumed run keeps its checkpoint's settings unless given.
    simulation = lpcnn.add_argument_group('simulation (defaults: a fresh run, SimulationConfig; a resumed '
                                          "run, its checkpoint's)")
    defaults = SimulationConfig()
    simulation.add_argument('--voxel-size-range', type=float, nargs=2, metavar=('MIN', 'MAX'),
                            help=f'voxel size range in mm, drawn per axis (default: {defaults.voxel_size_range_mm})')
    simulation.add_argument('--max-orientations', type=positive_int,
                            help=f'most head orientations of a sample (default: {defaults.max_orientations})')
    simulation.add_argument('--max-tilt-deg', type=float,
                            help='largest angle between the first and any other B0 direction '
                                 f'(default: {defaults.max_tilt_deg})')
    simulation.add_argument('--noise-max-ppm', type=float,
                            help=f'largest standard deviation of the white field noise (default: {defaults.noise_max_ppm})')
    simulation.add_argument('--background-max-ppm', type=float,
                            help=f'largest RMS of the residual background field (default: {defaults.background_max_ppm})')
    simulation.add_argument('--anisotropy-max-ppm', type=float,
                            help='largest white matter susceptibility anisotropy, chi_parallel - chi_perpendicular '
                                 f'(default: {defaults.anisotropy_max_ppm})')
    simulation.add_argument('--brain-fraction', type=fraction,
                            help=f'fraction of brain-like patches, the rest random shapes (default: {defaults.brain_fraction})')
    simulation.add_argument('--supersampling', type=positive_int,
                            help=f'fine grid factor of the simulated field (default: {defaults.supersampling})')
    simulation.add_argument('--simulation-pad-factor', type=float,
                            help=f"zero padding of the simulator's dipole FFT grid (default: {defaults.pad_factor})")
    _add_deepsti_parser(models)
    _add_lpn_parser(models)
    _add_qsmnet_parser(models)
    return parser


HEADS_HELP = 'whole simulated brains (seeds SEED, SEED+1, ...), each with and without disturbance'


def _head_validated_parser(models, name, help, module, checkpoint_every, log_every, batch_size, patch_size,
                           learning_rate):
    """The subcommand ``name`` of a training whose weights are chosen on whole heads (``learned.runs``):
    its run arguments with this model's defaults; returns the group for its model and recipe."""
    model_parser = models.add_parser(name, help=help, description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = _run_arguments(model_parser)
    run.add_argument('--checkpoint-every', type=positive_int, default=checkpoint_every,
                     help='steps between validations on whole heads and checkpoints')
    run.add_argument('--log-every', type=positive_int, default=log_every, help='steps between log lines')
    run.add_argument('--batch-size', type=positive_int, default=batch_size, help='patches per step')
    run.add_argument('--patch-size', type=positive_int, default=patch_size, help='patch edge in voxels')
    run.add_argument('--learning-rate', type=float, default=learning_rate, help='Adam learning rate')
    return model_parser.add_argument_group('model and recipe (a resumed run keeps its checkpoint\'s)')


def _head_validated_recipe_arguments(model_group, heads_help=HEADS_HELP):
    """The recipe arguments that every training validated on whole heads shares (``learned.runs``)."""
    model_group.add_argument('--gradient-clip', type=float, default=1.0,
                             help='largest gradient norm of a step (0: none)')
    model_group.add_argument('--seed', type=int, default=0,
                             help='seeds the initial weights, the data and the validation')
    model_group.add_argument('--validation-heads', type=positive_int, default=2, help=heads_help)
    model_group.add_argument('--validation-head-voxel-size', type=float, default=2.0,
                             help='voxel size in mm of the validation brains')


def _add_deepsti_parser(models):
    model = _head_validated_parser(models, 'deepsti', 'learned proximal network for the tensor (Fang et al. 2023)',
                                   train_deepsti, checkpoint_every=250, log_every=25, batch_size=2, patch_size=32,
                                   learning_rate=5e-4)
    model.add_argument('--iterations', type=positive_int, default=3, help='unrolled gradient steps')
    model.add_argument('--channels', type=positive_int, default=16, help='channels of the proximal CNN')
    model.add_argument('--blocks', type=positive_int, default=4, help='residual blocks of the proximal CNN')
    model.add_argument('--initial-step-size', type=float, default=INITIAL_STEP_SIZE,
                       help='initial value of the learned step size')
    model.add_argument('--pad-factor', type=float, default=1.5, help="zero padding of the model's dipole FFT grid")
    model.add_argument('--initial-anisotropy-weight', type=float, default=INITIAL_ANISOTROPY_WEIGHT,
                       help="initial value of the starting estimate's learned anisotropy penalty")
    model.add_argument('--anisotropy-loss-weight', type=float, default=10.0,
                       help='weight of the anisotropic part of the tensor in the loss, beside the mean')
    _head_validated_recipe_arguments(model, heads_help='whole simulated brains scored')
    model.add_argument('--validation-orientations', type=positive_int, nargs='+', default=[1, 4, 6],
                       help='orientation counts each validation brain is scored with')


def _add_lpn_parser(models):
    model = _head_validated_parser(
        models, 'lpn', 'learned proximal network, a denoiser that is exactly a proximal operator (Fang et al. 2024)',
        train_lpn, checkpoint_every=500, log_every=50, batch_size=4, patch_size=32, learning_rate=3e-3)
    model.add_argument('--channels', type=positive_int, default=16, help='channels of the input-convex CNN')
    model.add_argument('--layers', type=positive_int, default=4, help='layers of the input-convex CNN')
    model.add_argument('--initial-quadratic-weight', type=float, default=INITIAL_QUADRATIC_WEIGHT,
                       help="initial weight a of the potential's quadratic term (the network's least slope)")
    # At 0.02 ppm the prior was too strong inside the inversion: scaled to act as one of 0.01 it did
    # better on the validation heads (benchmarks/NOTES.md).
    model.add_argument('--noise-ppm', type=float, default=0.01,
                       help='standard deviation of the white noise the network learns to remove')
    model.add_argument('--l1-steps', type=non_negative_int, default=500, help='steps with the L1 loss first')
    model.add_argument('--gamma-start', type=float, default=0.5,
                       help='width of the proximal matching loss after the L1 steps (network units)')
    model.add_argument('--gamma-end', type=float, default=0.15, help='its width at the end of its schedule')
    model.add_argument('--gamma-steps', type=positive_int, default=4000, help='steps over which the width shrinks')
    _head_validated_recipe_arguments(model)
    model.add_argument('--validation-iterations', type=positive_int, nargs='+', default=[1, 2, 4, 8],
                       help='proximal gradient iteration counts of the inversion tried at each validation')
    model.add_argument('--validation-step-sizes', type=float, nargs='+', default=[1.0, 2.0, 4.0],
                       help='step sizes of the inversion tried at each validation; the best pair is kept')


def _add_qsmnet_parser(models):
    model = _head_validated_parser(
        models, 'qsmnet', "QSMnet-style U-Net, direct inversion: the benchmarks' baseline (Yoon et al. 2018)",
        train_qsmnet, checkpoint_every=500, log_every=50, batch_size=4, patch_size=32, learning_rate=1e-3)
    model.add_argument('--channels', type=positive_int, default=16, help='channels of the first U-Net level')
    model.add_argument('--model-loss-weight', type=float, default=1.0,
                       help='weight of the L1 field misfit (the model loss) beside the L1 error')
    _head_validated_recipe_arguments(model)


def main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None and not Path(args.resume).is_file():
        parser.error(f'--resume {args.resume}: no such checkpoint file; give the checkpoint.pt of a run '
                     '(the shipped one is qsmprep/learned/models/lpcnn/checkpoint.pt)')
    if args.command == 'lpn':
        card = train_lpn.train_lpn(args)
        print(f'qsmprep-train: {card["steps"]} steps, weights of step {card["validation"]["chosen_step"]}, '
              f'inference step size {card["inference"]["step_size"]}, model card {args.out / CARD_NAME}')
        return 0
    if args.command == 'qsmnet':
        card = train_qsmnet.train_qsmnet(args)
        print(f'qsmprep-train: {card["steps"]} steps, weights of step {card["validation"]["chosen_step"]}, '
              f'model card {args.out / CARD_NAME}')
        return 0
    if args.command == 'deepsti':
        card = train_deepsti.train_deepsti(args)
        print(f'qsmprep-train: {card["steps"]} steps, weights of step {card["validation"]["chosen_step"]}, '
              f'model card {args.out / CARD_NAME}')
        return 0
    card = training.train_lpcnn(args)
    print(f'qsmprep-train: {card["steps"]} steps, validation NRMSE {card["validation"]["nrmse_percent"]:.1f} %, '
          f'model card {args.out / CARD_NAME}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

