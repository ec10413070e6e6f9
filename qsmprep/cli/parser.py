"""The argument parser of the ``qsmprep`` BIDS App."""
import argparse
import os
from pathlib import Path

from .. import __version__
from ..bids import FIELD_STRENGTH_RANGE_T, check_field_strength
from ..methods import DEFAULT_INVERSION, INVERSIONS, STI_METHODS
from ..science import bgremove, unwrap
from ..science.masking import MASKING_METHODS


def _path_exists(value):
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise argparse.ArgumentTypeError(f'{value} does not exist')
    return path


def _checked_number(name, convert, accept, requirement):
    """An argparse type: ``convert``, then refuse values that ``accept`` rejects."""
    def parse(text):
        value = convert(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f'{text} {requirement}')
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _checked_number('positive_int', int, lambda value: value >= 1, 'must be 1 or more')
non_negative_int = _checked_number('non_negative_int', int, lambda value: value >= 0, 'is negative')
field_strength_tesla = _checked_number(
    'field_strength_tesla', float, check_field_strength,
    'is not a field in tesla (between {:g} and {:g})'.format(*FIELD_STRENGTH_RANGE_T))
fraction = _checked_number('fraction', float, lambda value: 0 <= value <= 1, 'is not between 0 and 1')


def build_parser():
    """The ``qsmprep bids_dir output_dir {participant,group}`` parser."""
    parser = argparse.ArgumentParser(
        prog='qsmprep', description='Quantitative susceptibility mapping of multi-echo GRE (MEGRE) BIDS data.')
    parser.add_argument('bids_dir', type=_path_exists, help='root of the BIDS dataset')
    parser.add_argument('output_dir', type=lambda p: Path(p).expanduser().absolute(),
                        help='where the derivatives dataset is written')
    parser.add_argument('analysis_level', choices=['participant', 'group'])
    parser.add_argument('--version', action='version', version=f'qsmprep {__version__}')
    parser.add_argument('-v', '--verbose', action='count', default=0, help='more messages (repeat for more)')

    selection = parser.add_argument_group('selecting data')
    selection.add_argument('--participant-label', '--participant_label', nargs='+', metavar='LABEL',
                           help='participants to process, with or without "sub-" (default: all)')
    selection.add_argument('--session-label', nargs='+', metavar='LABEL',
                           help='sessions to process, with or without "ses-" (default: all)')
    selection.add_argument('--skip-bids-validation', action='store_true',
                           help='index the dataset without the BIDS validator')

    acquisition = parser.add_argument_group('acquisition')
    acquisition.add_argument('--field-strength', type=field_strength_tesla, metavar='TESLA',
                             help='B0 in tesla, overriding MagneticFieldStrength (use when it is missing)')
    acquisition.add_argument('--phase-sign', type=int, choices=[1, -1], default=1,
                             help='-1 when the scanner stores the phase with the opposite sign')
    acquisition.add_argument('--mask', type=_path_exists, help='a brain mask on the input grid to use instead of '
                             'the one computed from the magnitude')

    methods = parser.add_argument_group('methods')
    methods.add_argument('--unwrap', choices=unwrap.UNWRAP_METHODS, default=unwrap.DEFAULT_UNWRAP)
    methods.add_argument('--bgremove', choices=bgremove.BGREMOVE_METHODS, default='vsharp')
    methods.add_argument('--inversion', choices=tuple(INVERSIONS),
                         default=DEFAULT_INVERSION,
                         help='lpcnn: the learned LP-CNN shipped with qsmprep; lpn: proximal gradient descent with '
                              'the learned proximal network shipped with qsmprep (both need torch)')
    methods.add_argument('--masking', choices=MASKING_METHODS, default='two-pass',
                         help='two-pass (default): also drop voxels whose phase is a wrap off their neighbours, '
                              'so their streaks do not spread; magnitude: the magnitude mask alone')
    methods.add_argument('--multi-orientation', action='store_true',
                         help='the run-<i> series of one subject and session that share their other entities are '
                              'head orientations of one scan: register them onto the first run and combine them by '
                              'COSMOS (desc-cosmos_Chimap); each run keeps its own outputs')
    methods.add_argument('--sti', choices=tuple(STI_METHODS),
                         help='with --multi-orientation: the susceptibility tensor and its maps (desc-sti, -mms, '
                              '-msa, -pev_Chimap); ls: least squares, computed without asking from 6 orientations '
                              'on; deepsti: the learned DeepSTI shipped with qsmprep, from any number (needs torch)')
    methods.add_argument('--no-chi-separation', dest='chi_separation', action='store_false',
                         help='skip the paramagnetic/diamagnetic separation (desc-paramagnetic/diamagnetic_Chimap)')

    resources = parser.add_argument_group('resources')
    resources.add_argument('-w', '--work-dir', type=lambda p: Path(p).expanduser().absolute(),
                           default=Path('work').absolute(),
                           help='intermediate results; a rerun with the same one resumes (default: ./work)')
    resources.add_argument('--nprocs', '--n-cpus', type=positive_int, default=os.cpu_count() or 1,
                           help='processes run in parallel')
    resources.add_argument('--omp-nthreads', type=positive_int, default=None,
                           help='threads of one process (default: --nprocs)')
    resources.add_argument('--resource-monitor', action='store_true',
                           help="record each step's peak memory in the work directory (slows the run: "
                                "a 1 mm head on 2 cores took 124 s with it, 89 s without)")
    group = parser.add_argument_group('group level')
    group.add_argument('--template', default='MNI152NLin2009cAsym',
                       help='TemplateFlow template that the first-echo magnitudes are registered to (from '
                            'TEMPLATEFLOW_HOME; nothing is downloaded)')
    group.add_argument('--atlas', default='MASSP20',
                       help="the template's atlas whose regions are measured (default: MASSP20, deep grey matter "
                            'nuclei, Bazin et al. 2020)')
    return parser
