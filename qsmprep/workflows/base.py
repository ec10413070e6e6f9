"""The top-level workflow: one series workflow per MEGRE series."""
from nipype.pipeline import engine as pe

from .. import __version__
from ..bids import bids_uri
from ..science import bgremove, inversion
from ..science.unwrap import DEFAULT_UNWRAP
from .qsm import init_series_wf

# The regularisation weight each series gets is added to its Chimap sidecar when it is chosen.
_WEIGHT_RULE = {'RegularizationWeightRule': f'{inversion.TV_TO_L2_WEIGHT} x the GCV weight of closed-form L2, '
                                            'relative to the local field scaled to unit RMS in the mask'}
INVERSION_DESCRIPTIONS = {
    'tv': ('magnitude-weighted total variation, ADMM (linear FANSI form)',
           {**_WEIGHT_RULE, 'MaxIterations': inversion.TV_ITERATIONS}),
    'nltv': ('magnitude-weighted total variation with a nonlinear (complex exponential) data term, ADMM',
             {**_WEIGHT_RULE, 'MaxIterations': inversion.TV_ITERATIONS,
              'DataTermPhase': 'field as phase at the mean echo time'}),
    'l2': ('closed-form L2 with a gradient penalty',
           {'RegularizationWeightRule': 'generalised cross-validation, relative to the local field scaled to unit '
                                        'RMS in the mask'}),
    'tkd': ('truncated k-space division', {'Threshold': inversion.TKD_THRESHOLD}),
}


def sidecars_for(series, *, bids_dir, phase_sign, unwrap, bgremove_method, inversion_method, user_mask):
    """Sidecar keys common to every output of ``series``, and those of each output."""
    metadata = {
        'SkullStripped': True,
        'Sources': [bids_uri(f, bids_dir) for f in series.magnitude_files + series.phase_files],
        'MagneticFieldStrength': series.field_strength_t,
        'EchoTime': series.echo_times_s,
        'B0Direction': [round(float(v), 6) for v in series.b0_dir],
        'B0DirectionSource': series.b0_dir_source,
        'PhaseSign': phase_sign,
    }
    field_steps = {'PhaseUnwrapping': unwrap, 'EchoCombination': 'magnitude^2-weighted linear fit of phase'}
    inversion_name, inversion_parameters = INVERSION_DESCRIPTIONS[inversion_method]
    background = {'BackgroundFieldRemoval': bgremove_method}
    if bgremove_method == 'vsharp':
        background['BackgroundFieldRemovalRadiiMM'] = bgremove.default_radii_mm(series.voxel_size_mm)
    parameters = {
        'chimap': {'EstimationAlgorithm': inversion_name, **inversion_parameters, **field_steps, **background,
                   'Reference': 'mean over the brain mask'},
        'r2starmap': {'EstimationAlgorithm': 'magnitude^2-weighted log-linear mono-exponential fit'},
        't2starmap': {'EstimationAlgorithm': '1/R2* of the mono-exponential fit'},
        'brain_mask': {'EstimationAlgorithm': ('user-supplied mask' if user_mask else
                                               'bias-corrected magnitude, Otsu threshold, erosion, largest component')
                       + '; voxels a phase wrap off their neighbours removed'
                       + ('; eroded by V-SHARP' if bgremove_method == 'vsharp' else ''),
                       'Type': 'Brain'},
        'total_field': {'EstimationAlgorithm': 'weighted linear fit of unwrapped phase', **field_steps},
        'local_field': {'EstimationAlgorithm': bgremove_method, **field_steps, **background},
    }
    return metadata, parameters


def init_qsmprep_wf(*, series_list, bids_dir, output_dir, work_dir, phase_sign=1, unwrap=DEFAULT_UNWRAP,
                    bgremove_method='vsharp', inversion_method=inversion.DEFAULT_INVERSION, user_mask=None,
                    omp_nthreads=1, name='qsmprep_wf'):
    """Every selected MEGRE series, each in its own ``series_wf`` named after its entities.

    >>> wf = init_qsmprep_wf(series_list=series, bids_dir=..., output_dir=..., work_dir=...)  # doctest: +SKIP
    """
    qsmprep_wf = pe.Workflow(name=name)
    qsmprep_wf.base_dir = str(work_dir)
    for series in series_list:
        metadata, parameters = sidecars_for(series, bids_dir=bids_dir, phase_sign=phase_sign, unwrap=unwrap,
                                            bgremove_method=bgremove_method, inversion_method=inversion_method,
                                            user_mask=user_mask)
        series_wf = init_series_wf(series=series, output_dir=output_dir, metadata=metadata,
                                   parameters=parameters, phase_sign=phase_sign, unwrap=unwrap,
                                   bgremove=bgremove_method, inversion_method=inversion_method,
                                   user_mask=user_mask, omp_nthreads=omp_nthreads,
                                   name=f'series_{series.workflow_name}_wf')
        qsmprep_wf.add_nodes([series_wf])
    return qsmprep_wf


def generated_by(container=None):
    entry = {'Name': 'qsmprep', 'Version': __version__}
    if container:
        entry['Container'] = container
    return [entry]
