"""``qsmprep-tools``: each stage on plain NIfTI files, fields in ppm in and out.

Voxel size and B0 direction come from the header (CONVENTIONS.md) unless ``--b0-dir`` is
given. Outputs are written on the input grid with the input affine.
"""
import argparse
import sys

import nibabel as nib
import numpy as np
import scipy.fft

from .. import __version__, methods
from ..learned import missing_torch_message
from ..methods import DEFAULT_INVERSION, INVERSIONS, LEARNED_INVERSIONS, STI_METHODS, susceptibility_tensor
from ..files import write_itk_transform
from ..nifti import on_same_grid, save_like
from ..science import bgremove, chisep, echofit, masking, orientations, registration, unwrap
from ..science.physics import b0_direction_from_affine, voxel_size_from_affine


class ToolError(ValueError):
    """A problem with a tool's input, phrased for the user."""


def _load(path, ndim=None):
    try:
        image = nib.load(str(path))
    except Exception as error:
        raise ToolError(f'{path}: cannot be read as NIfTI ({error}).') from error
    data = np.asanyarray(image.dataobj).astype(np.float32)
    if ndim is not None and data.ndim not in ndim:
        raise ToolError(f'{path}: the image is {data.ndim}-D; this tool wants {" or ".join(map(str, ndim))}-D.')
    if not np.all(np.isfinite(data)):
        raise ToolError(f'{path}: holds NaN or infinite values; replace them (e.g. with 0) first.')
    return data, image


def _load_on_grid(path, reference_image, reference_path):
    """A 3-D image that must share the grid of ``reference_image`` (loaded from ``reference_path``)."""
    data, image = _load(path, ndim=(3,))
    if not on_same_grid(image, reference_image):
        raise ToolError(f'{path}: not on the grid of {reference_path}; resample it first.')
    return data


def _load_mask(path, reference_image, reference_path):
    return _load_on_grid(path, reference_image, reference_path) > 0


def _save(array, reference_image, path, dtype=np.float32):
    print(f'wrote {save_like(array, reference_image, path, dtype)}')


def _unit_b0_dir(vector):
    b0_dir = np.asarray(vector, dtype=float)
    if np.linalg.norm(b0_dir) == 0:
        raise ToolError('--b0-dir: the B0 direction cannot be (0, 0, 0).')
    return b0_dir / np.linalg.norm(b0_dir)


def _b0_dir(args, image):
    if args.b0_dir is None:
        return b0_direction_from_affine(image.affine)
    return _unit_b0_dir(args.b0_dir)


def _echo_times(args, count, path):
    if len(args.echo_times) != count:
        raise ToolError(f'{path}: has {count} echoes but --echo-times lists {len(args.echo_times)}.')
    echo_times = np.asarray(args.echo_times, dtype=float)
    if np.any(echo_times <= 0) or np.any(echo_times >= 1):
        raise ToolError('--echo-times: give echo times in seconds (e.g. 0.004 for 4 ms).')
    return echo_times


def _orientation_b0_dirs(args, images):
    """One B0 direction per local field: from ``--b0-dir`` (given once per field) or each field's affine."""
    if args.b0_dir is None:
        return [b0_direction_from_affine(image.affine) for image in images]
    if len(args.b0_dir) != len(images):
        raise ToolError(f'--b0-dir was given {len(args.b0_dir)} times for {len(images)} local fields; give it once '
                        'per field, in the same order, or leave it out to read each from its header.')
    return [_unit_b0_dir(vector) for vector in args.b0_dir]


def run_invert(args):
    if args.regularizer_map and args.method != 'lpn':
        raise ToolError(f'--regularizer-map evaluates the learned regularizer of --method lpn; --method {args.method} '
                        'has none to evaluate. Drop --regularizer-map or use --method lpn.')
    if len(args.local_fields) > 1 and args.method not in LEARNED_INVERSIONS:
        raise ToolError(f'--method {args.method} inverts one local field; several orientations need '
                        f'--method {" or ".join(LEARNED_INVERSIONS)}.')
    field, image = _load(args.local_fields[0], ndim=(3,))
    mask = _load_mask(args.mask, image, args.local_fields[0])
    fields, images = [field], [image]
    for path in args.local_fields[1:]:
        other, other_image = _load(path, ndim=(3,))
        if not on_same_grid(other_image, image):
            raise ToolError(f'{path}: not on the grid of {args.local_fields[0]}; register and resample every '
                            'orientation to one grid first.')
        fields.append(other)
        images.append(other_image)
    magnitude, echo_times = None, None
    if args.method in LEARNED_INVERSIONS:
        torch_message = missing_torch_message(f'--method {args.method}')
        if torch_message:
            raise ToolError(torch_message)
    elif args.magnitude:
        magnitude, _ = _load(args.magnitude, ndim=(3, 4))
        magnitude = masking.combined_magnitude(magnitude) if magnitude.ndim == 4 else magnitude
    if args.method == 'nltv':
        if not args.echo_times or args.field_strength is None:
            raise ToolError('--method nltv: give --echo-times (seconds) and --field-strength (tesla); the '
                            'nonlinear data term needs the field as phase.')
        echo_times = _echo_times(args, len(args.echo_times), args.local_fields[0])
    chi, parameters = methods.invert(args.method, fields, mask, voxel_size_from_affine(image.affine),
                                     _orientation_b0_dirs(args, images), magnitude=magnitude,
                                     echo_times=echo_times, field_strength=args.field_strength)
    if args.method in LEARNED_INVERSIONS:
        print(f'{parameters["Model"]} ({parameters["ModelTrainingSteps"]} training steps, sha256 '
              f'{parameters["ModelSha256"][:12]}) on {len(fields)} orientation(s)')
    else:
        for key, value in parameters.items():
            print(f'{key}: {value:.4g}')
    _save(chi, image, args.output)
    if args.regularizer_map:
        from ..learned.lpn import lpn_regularizer_map
        from ..learned.models import shipped_model
        values = lpn_regularizer_map(chi, mask, voxel_size_from_affine(image.affine), shipped_model('lpn'))
        _save(values, image, args.regularizer_map)
        print(f'learned regularizer R = {values.sum(dtype=np.float64):.6g} (network units squared)')


def run_register(args):
    moving, moving_image = _load(args.moving, ndim=(3, 4))
    reference, reference_image = _load(args.reference, ndim=(3, 4))
    # The first echo of a 4-D magnitude: the sharpest.
    moving, reference = (image[..., 0] if image.ndim == 4 else image for image in (moving, reference))
    reference_grid = reference_image.slicer[..., 0] if reference_image.ndim == 4 else reference_image
    mask = _load_mask(args.reference_mask, reference_grid, args.reference) if args.reference_mask else None
    transform = registration.register_rigid(moving, moving_image.affine, reference, reference_grid.affine,
                                            reference_mask=mask, num_threads=max(1, args.nthreads))
    write_itk_transform(transform.matrix, args.output)
    print(f'wrote {args.output}')
    b0_dir = registration.b0_direction_in_reference(transform, reference_grid.affine)
    print(f'rotation {transform.angle_deg:.2f} deg, translation {np.round(transform.translation, 2).tolist()} mm, '
          f'mutual information {transform.cost:.4f}')
    print(f'--b0-dir {b0_dir[0]:.6f} {b0_dir[1]:.6f} {b0_dir[2]:.6f}  (in the reference voxel axes)')
    if len(args.resample) != len(args.resampled):
        raise ToolError(f'--resample lists {len(args.resample)} images but --resampled {len(args.resampled)} outputs.')
    for path, output in zip(args.resample, args.resampled):
        volume, image = _load(path, ndim=(3,))
        if not on_same_grid(image, moving_image.slicer[..., 0] if moving_image.ndim == 4 else moving_image):
            raise ToolError(f'{path}: not on the grid of {args.moving}; --resample takes images of the moving run.')
        is_mask = np.array_equal(np.unique(volume), np.unique(volume > 0))  # 0 and 1 only: nearest neighbour
        resampled = registration.resample(volume, image.affine, reference_grid.affine, reference.shape, transform,
                                          order=0 if is_mask else 1)
        _save(resampled, reference_grid, output, np.uint8 if is_mask else np.float32)


def _registered_fields(args):
    """The local fields, their mask and one B0 direction each in their shared voxel axes."""
    fields, images = zip(*(_load(path, ndim=(3,)) for path in args.local_fields))
    for path, image in zip(args.local_fields[1:], images[1:]):
        if not on_same_grid(image, images[0]):
            raise ToolError(f'{path}: not on the grid of {args.local_fields[0]}; register and resample every '
                            'orientation onto the reference first (qsmprep-tools register --resample).')
    if args.b0_dir is None or len(args.b0_dir) != len(fields):
        raise ToolError(f'{len(fields)} local fields need --b0-dir once per field, in their order: resampled '
                        'fields share the reference\'s header, so their B0 directions are not in it '
                        '(qsmprep-tools register prints each).')
    mask = _load_mask(args.mask, images[0], args.local_fields[0])
    return np.stack(fields), mask, [_unit_b0_dir(v) for v in args.b0_dir], images[0]


def run_cosmos(args):
    fields, mask, b0_dirs, image = _registered_fields(args)
    chi = orientations.cosmos(fields, mask, voxel_size_from_affine(image.affine), b0_dirs,
                              gradient_weight=args.gradient_weight)
    _save(chi, image, args.output)


def run_sti(args):
    fields, mask, b0_dirs, image = _registered_fields(args)
    if STI_METHODS[args.method].learned:
        torch_message = missing_torch_message(f'--method {args.method}')
        if torch_message:
            raise ToolError(torch_message)
    elif len(fields) < orientations.STI_MIN_ORIENTATIONS:
        print(f'warning: {len(fields)} orientations; least-squares STI needs {orientations.STI_MIN_ORIENTATIONS} '
              f'or more to determine the tensor (--method deepsti takes fewer)', file=sys.stderr)
    tensor, _ = susceptibility_tensor(args.method, fields, mask, voxel_size_from_affine(image.affine), b0_dirs,
                                      threads=max(1, args.nthreads), iterations=args.iterations)
    mms, msa, pev = orientations.tensor_maps(tensor, mask)
    for name, volumes in (('sti', tensor), ('mms', mms), ('msa', msa), ('pev', pev)):
        _save(np.moveaxis(volumes, 0, -1) if volumes.ndim == 4 else volumes, image,
              f'{args.output_prefix}_desc-{name}_Chimap.nii.gz')


def run_bgremove(args):
    field, image = _load(args.total_field, ndim=(3,))
    mask = _load_mask(args.mask, image, args.total_field)
    local_field, valid = bgremove.remove_background(field, mask, voxel_size_from_affine(image.affine),
                                                    _b0_dir(args, image), args.method)
    _save(local_field, image, args.output)
    if args.out_mask:
        _save(valid, image, args.out_mask, np.uint8)


def run_unwrap(args):
    phase, image = _load(args.phase, ndim=(3, 4))
    if np.abs(phase).max() > np.pi + 0.01:
        raise ToolError(f'{args.phase}: values reach {np.abs(phase).max():g}; unwrap wants phase in radians.')
    mask = _load_mask(args.mask, image, args.phase)
    voxel_size = voxel_size_from_affine(image.affine)
    if phase.ndim == 3:
        unwrapped = unwrap.congruent_unwrap(phase, voxel_size, mask, args.method)
    else:
        if not args.magnitude:
            raise ToolError(f'{args.phase}: multi-echo phase needs --magnitude and --echo-times.')
        magnitude, _ = _load(args.magnitude, ndim=(4,))
        unwrapped = unwrap.unwrap_echoes(phase, magnitude, _echo_times(args, phase.shape[-1], args.phase),
                                         voxel_size, mask, args.method)
    _save(unwrapped, image, args.output)


def run_field(args):
    phase, image = _load(args.unwrapped_phase, ndim=(4,))
    magnitude, magnitude_image = _load(args.magnitude, ndim=(4,))
    if magnitude.shape != phase.shape:
        raise ToolError(f'{args.magnitude}: shape {magnitude.shape} differs from {args.unwrapped_phase} {phase.shape}.')
    mask = _load_mask(args.mask, image.slicer[..., 0], args.unwrapped_phase)
    echo_times = _echo_times(args, phase.shape[-1], args.unwrapped_phase)
    method = echofit.echo_fit_method(len(echo_times), args.method)
    with_noise = bool(args.out_noise)
    if with_noise and len(echo_times) < echofit.COMPLEX_FIT_MIN_ECHOES:
        raise ToolError(f'--out-noise: the noise map needs {echofit.COMPLEX_FIT_MIN_ECHOES} echoes or more.')
    field_ppm, _, *noise = echofit.fit_total_field(phase, magnitude, echo_times, args.field_strength, mask,
                                                   method=method, return_noise=with_noise)
    reference = image.slicer[..., 0]
    print(f'echo fit: {method}')
    _save(field_ppm, reference, args.output)
    if with_noise:
        _save(noise[0], reference, args.out_noise)


def run_chisep(args):
    field, image = _load(args.local_field, ndim=(3,))
    mask = _load_mask(args.mask, image, args.local_field)
    r2star = _load_on_grid(args.r2star, image, args.local_field)
    r2 = _load_on_grid(args.r2, image, args.local_field) if args.r2 else None
    r2prime, assumption = chisep.r2prime(r2star, r2, mask)
    dr = args.dr if args.dr else chisep.relaxometric_constant(args.field_strength)
    chi_paramagnetic, chi_diamagnetic = chisep.chi_separation(
        field, r2prime, mask, voxel_size_from_affine(image.affine), _b0_dir(args, image), args.field_strength,
        dr_hz_per_ppm=dr)
    print(f"Dr: {dr:g} Hz/ppm; R2': {assumption.get('R2PrimeAssumption', assumption['R2PrimeSource'])}")
    _save(chi_paramagnetic, image, f'{args.output_prefix}_desc-paramagnetic_Chimap.nii.gz')
    _save(chi_diamagnetic, image, f'{args.output_prefix}_desc-diamagnetic_Chimap.nii.gz')


def run_r2star(args):
    magnitude, image = _load(args.magnitude, ndim=(4,))
    mask = _load_mask(args.mask, image, args.magnitude) if args.mask else None
    r2star, t2star, _ = echofit.fit_r2star(magnitude, _echo_times(args, magnitude.shape[-1], args.magnitude), mask)
    reference = image.slicer[..., 0]
    _save(r2star, reference, args.output)
    if args.out_t2star:
        _save(t2star, reference, args.out_t2star)


def run_mask(args):
    magnitude, image = _load(args.magnitude, ndim=(3, 4))
    combined = masking.combined_magnitude(magnitude) if magnitude.ndim == 4 else magnitude
    mask = masking.brain_mask(combined, voxel_size_from_affine(image.affine), opening_mm=args.erosion_mm)
    _save(mask, image.slicer[..., 0] if magnitude.ndim == 4 else image, args.output, np.uint8)


def build_parser():
    parser = argparse.ArgumentParser(prog='qsmprep-tools', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'qsmprep {__version__}')
    parser.add_argument('--nthreads', type=int, default=1, help='FFT threads (default 1)')
    commands = parser.add_subparsers(dest='command', required=True)

    invert = commands.add_parser('invert', help='local field (ppm) to susceptibility (ppm)')
    invert.add_argument('local_fields', nargs='+', metavar='local_field',
                        help='one local field; with a learned --method (lpcnn, lpn), one per head orientation, all '
                             'on one grid')
    invert.add_argument('--mask', required=True)
    invert.add_argument('--method', choices=tuple(INVERSIONS),
                        default=DEFAULT_INVERSION)
    invert.add_argument('--magnitude', help='magnitude for the data weighting (3-D, or 4-D combined over echoes)')
    invert.add_argument('--b0-dir', nargs=3, type=float, metavar=('X', 'Y', 'Z'), action='append',
                        help='B0 direction in voxel axes, once per local field in their order '
                             '(default: from each field\'s affine)')
    invert.add_argument('--echo-times', nargs='+', type=float, default=[], metavar='SECONDS',
                        help='for nltv: the echo times the field was fitted from')
    invert.add_argument('--field-strength', type=float, metavar='TESLA', help='for nltv')
    invert.add_argument('--regularizer-map', metavar='PATH',
                        help='for lpn: also write the learned regularizer R evaluated at the result, per voxel (its '
                             'sum is R; in the network units squared of the model card), to see what the prior '
                             'penalizes')
    invert.add_argument('-o', '--output', required=True)
    invert.set_defaults(run=run_invert)

    register = commands.add_parser('register', help='rigid registration of one head orientation onto the reference')
    register.add_argument('moving', help='magnitude of the run to register (3-D, or 4-D: its first echo)')
    register.add_argument('--reference', required=True, help='magnitude of the reference run (3-D or 4-D)')
    register.add_argument('--reference-mask', help='brain mask of the reference (the metric looks 12 mm around it)')
    register.add_argument('-o', '--output', required=True, help='the transform, ITK text (reference to moving)')
    register.add_argument('--resample', nargs='+', default=[], metavar='IMAGE',
                          help='images of the moving run (e.g. its local field) to resample onto the reference')
    register.add_argument('--resampled', nargs='+', default=[], metavar='OUTPUT', help='where, in the same order')
    register.set_defaults(run=run_register)

    for name, text, run in (('cosmos', 'registered local fields (ppm) of several orientations to susceptibility',
                             run_cosmos),
                            ('sti', 'registered local fields (ppm) of several orientations to the susceptibility '
                                    'tensor and its MMS, MSA and PEV maps', run_sti)):
        command = commands.add_parser(name, help=text)
        command.add_argument('local_fields', nargs='+', metavar='local_field',
                             help='one per head orientation, all on the reference grid')
        command.add_argument('--mask', required=True, help='brain mask on the reference grid')
        command.add_argument('--b0-dir', nargs=3, type=float, metavar=('X', 'Y', 'Z'), action='append',
                             help='B0 direction in the reference voxel axes, once per local field in their order')
        if name == 'cosmos':
            command.add_argument('--gradient-weight', type=float, default=orientations.COSMOS_GRADIENT_WEIGHT,
                                 help='weight of the gradient penalty (0: plain least squares)')
            command.add_argument('-o', '--output', required=True)
        else:
            command.add_argument('--method', choices=tuple(STI_METHODS), default='ls',
                                 help='; '.join(f'{m.name}: {m.summary}' for m in STI_METHODS.values()))
            command.add_argument('--iterations', type=int, default=orientations.STI_ITERATIONS,
                                 help='conjugate-gradient iterations of ls (the early stop regularizes)')
            command.add_argument('--output-prefix', required=True,
                                 help='writes PREFIX_desc-{sti,mms,msa,pev}_Chimap.nii.gz')
        command.set_defaults(run=run)

    background = commands.add_parser('bgremove', help='total field (ppm) to local field (ppm)')
    background.add_argument('total_field')
    background.add_argument('--mask', required=True)
    background.add_argument('--method', choices=bgremove.BGREMOVE_METHODS, default='vsharp')
    background.add_argument('--b0-dir', nargs=3, type=float, metavar=('X', 'Y', 'Z'),
                            help='B0 direction in voxel axes (default: from the affine)')
    background.add_argument('-o', '--output', required=True)
    background.add_argument('--out-mask', help='where to write the mask on which the local field is valid')
    background.set_defaults(run=run_bgremove)

    unwrap_command = commands.add_parser('unwrap', help='wrapped phase (rad, 3-D or 4-D) to unwrapped phase')
    unwrap_command.add_argument('phase')
    unwrap_command.add_argument('--mask', required=True)
    unwrap_command.add_argument('--method', choices=unwrap.UNWRAP_METHODS, default=unwrap.DEFAULT_UNWRAP)
    unwrap_command.add_argument('--magnitude', help='4-D magnitude, for multi-echo phase')
    unwrap_command.add_argument('--echo-times', nargs='+', type=float, default=[], metavar='SECONDS')
    unwrap_command.add_argument('-o', '--output', required=True)
    unwrap_command.set_defaults(run=run_unwrap)

    field = commands.add_parser('field', help='unwrapped multi-echo phase (rad, 4-D) to total field (ppm)')
    field.add_argument('unwrapped_phase')
    field.add_argument('--magnitude', required=True, help='4-D magnitude, echoes last')
    field.add_argument('--mask', required=True)
    field.add_argument('--echo-times', nargs='+', type=float, required=True, metavar='SECONDS')
    field.add_argument('--field-strength', type=float, required=True, metavar='TESLA')
    field.add_argument('--method', choices=echofit.ECHO_FIT_METHODS,
                       help='complex (default from 3 echoes) or linear')
    field.add_argument('-o', '--output', required=True)
    field.add_argument('--out-noise', help="where to write the field's standard deviation (ppm), 3 echoes or more")
    field.set_defaults(run=run_field)

    separation = commands.add_parser('chisep', help='local field (ppm) and R2* (1/s) to chi+ and chi- (ppm)')
    separation.add_argument('local_field')
    separation.add_argument('--r2star', required=True, help='R2* map (1/s)')
    separation.add_argument('--r2', help='R2 map (1/s); without it R2 is assumed constant (stated on output)')
    separation.add_argument('--mask', required=True)
    separation.add_argument('--field-strength', type=float, required=True, metavar='TESLA')
    separation.add_argument('--dr', type=float, metavar='HZ_PER_PPM',
                            help='relaxometric constant (default 114 Hz/ppm at 3 T, scaled with B0)')
    separation.add_argument('--b0-dir', nargs=3, type=float, metavar=('X', 'Y', 'Z'),
                            help='B0 direction in voxel axes (default: from the affine)')
    separation.add_argument('-o', '--output-prefix', required=True,
                            help='writes PREFIX_desc-paramagnetic_Chimap.nii.gz and PREFIX_desc-diamagnetic_Chimap.nii.gz')
    separation.set_defaults(run=run_chisep)

    r2star = commands.add_parser('r2star', help='4-D multi-echo magnitude to R2* (1/s)')
    r2star.add_argument('magnitude')
    r2star.add_argument('--echo-times', nargs='+', type=float, required=True, metavar='SECONDS')
    r2star.add_argument('--mask')
    r2star.add_argument('-o', '--output', required=True)
    r2star.add_argument('--out-t2star', help='where to write T2* (s)')
    r2star.set_defaults(run=run_r2star)

    mask = commands.add_parser('mask', help='magnitude (3-D or 4-D) to a brain mask')
    mask.add_argument('magnitude')
    mask.add_argument('--erosion-mm', type=float, default=5.0,
                      help='erosion radius that cuts the brain from the scalp (default 5 mm)')
    mask.add_argument('-o', '--output', required=True)
    mask.set_defaults(run=run_mask)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with scipy.fft.set_workers(max(1, args.nthreads)):
            args.run(args)
    except (ToolError, ValueError) as error:
        print(f'qsmprep-tools: error: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
