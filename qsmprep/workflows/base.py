"""The top-level workflow and the subject level: one series workflow per MEGRE series, grouped by
subject and session."""
import numpy as np
from nipype.pipeline import engine as pe

from .. import __version__
from ..bids import bids_uri
from ..methods import INVERSIONS
from ..science import bgremove, chisep, echofit
from .qsm import init_series_wf

ECHO_FIT_DESCRIPTIONS = {
    'complex': 'magnitude-weighted nonlinear fit of the complex multi-echo signal (field and phase offset)',
    'linear': 'magnitude^2-weighted linear fit of unwrapped phase against echo time',
}
def sidecars_for(series, *, bids_dir, phase_sign, unwrap, bgremove_method, inversion_method, user_mask,
                 masking='two-pass', chi_separation=True):
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
    echo_fit = echofit.echo_fit_method(len(series.echo_times_s))
    field_steps = {'PhaseUnwrapping': unwrap, 'EchoCombination': ECHO_FIT_DESCRIPTIONS[echo_fit]}
    inversion_name = INVERSIONS[inversion_method].estimation_algorithm
    inversion_parameters = INVERSIONS[inversion_method].sidecar_parameters
    background = {'BackgroundFieldRemoval': bgremove_method}
    if bgremove_method == 'vsharp':
        background['BackgroundFieldRemovalRadiiMM'] = bgremove.default_radii_mm(series.voxel_size_mm)
        background['BackgroundFieldRemovalWeight'] = bgremove.VSHARP_WEIGHT
        background['BackgroundFieldRemovalDataDepthMM'] = bgremove.VSHARP_DATA_DEPTH_MM
    else:
        # The harmonic part of the field that brain sources explain stays in the local field.
        background['BrainSourceWeight'] = bgremove.BRAIN_SOURCE_WEIGHT
    brain_mask_steps = 'user-supplied mask' if user_mask else (
        'head above the noise floor (Otsu on log magnitude), bias-corrected magnitude within it, Otsu '
        'threshold on a log scale, 5 mm opening, largest component, 3 mm closing, holes filled, every voxel '
        'deeper than 10 mm inside the 10 mm-closed envelope kept')
    mask_steps = brain_mask_steps
    if masking == 'two-pass':
        mask_steps += '; second pass: voxels whose field is a phase wrap off their neighbours removed'
    if bgremove_method == 'vsharp':
        mask_steps += '; eroded by V-SHARP'
    parameters = {
        'chimap': {'EstimationAlgorithm': inversion_name, **inversion_parameters, **field_steps, **background,
                   'Reference': 'mean over desc-localfield_mask (where the Chimap is valid)'},
        'r2starmap': {'EstimationAlgorithm': 'magnitude^2-weighted log-linear mono-exponential fit'},
        't2starmap': {'EstimationAlgorithm': '1/R2* of the mono-exponential fit'},
        'brain_mask': {'EstimationAlgorithm': brain_mask_steps, 'Type': 'Brain'},
        'localfield_mask': {'EstimationAlgorithm': mask_steps, 'Type': 'Brain'},
        'total_field': {'EstimationAlgorithm': ECHO_FIT_DESCRIPTIONS[echo_fit], **field_steps},
        'local_field': {'EstimationAlgorithm': bgremove_method, **field_steps, **background},
        'field_noise': {'EstimationAlgorithm': 'residual of the complex fit pooled over 3x3x3 voxels, propagated '
                                               'to the field', **field_steps},
    }
    if chi_separation:
        dr = chisep.relaxometric_constant(series.field_strength_t)
        separation = {**chisep.sidecar_parameters(series.field_strength_t, dr_hz_per_ppm=dr),
                      **chisep.r2prime(np.zeros(1, dtype=np.float32))[1],
                      'RelaxometricConstantRule': '114 Hz/ppm at 3 T, scaled linearly with B0',
                      **field_steps, **background, 'Reference': 'absolute (R2\' fixes the level)'}
        parameters['chimap_paramagnetic'] = parameters['chimap_diamagnetic'] = separation
    return metadata, parameters


def init_qsmprep_wf(*, series_list, settings, name='qsmprep_wf'):
    """One ``single_subject_wf`` per subject and session of the selected MEGRE series.

    ``settings``: the run's ``qsmprep.settings.Settings``.

    >>> wf = init_qsmprep_wf(series_list=series, settings=settings)  # doctest: +SKIP
    """
    qsmprep_wf = pe.Workflow(name=name)
    qsmprep_wf.base_dir = str(settings.work_dir)
    groups = {}
    for series in series_list:
        groups.setdefault((series.entities['subject'], series.entities.get('session')), []).append(series)
    for (subject, session), subject_series in groups.items():
        label = f'sub_{subject}' + (f'_ses_{session}' if session else '')
        qsmprep_wf.add_nodes([init_single_subject_wf(series_list=subject_series, settings=settings,
                                                     name=f'{label}_wf')])
    return qsmprep_wf


def init_single_subject_wf(*, series_list, settings, name='single_subject_wf'):
    """The MEGRE series of one subject and session, each in its own ``series_wf`` named after its
    entities (one head orientation each, until orientations are combined here)."""
    workflow = pe.Workflow(name=name)
    user_mask = str(settings.mask) if settings.mask else None
    for series in series_list:
        metadata, parameters = sidecars_for(series, bids_dir=settings.bids_dir, phase_sign=settings.phase_sign,
                                            unwrap=settings.unwrap, bgremove_method=settings.bgremove,
                                            inversion_method=settings.inversion, user_mask=user_mask,
                                            masking=settings.masking, chi_separation=settings.chi_separation)
        series_wf = init_series_wf(series=series, output_dir=settings.output_dir, metadata=metadata,
                                   parameters=parameters, phase_sign=settings.phase_sign, unwrap=settings.unwrap,
                                   bgremove=settings.bgremove, inversion_method=settings.inversion,
                                   user_mask=user_mask, masking=settings.masking,
                                   chi_separation=settings.chi_separation, omp_nthreads=settings.omp_nthreads,
                                   name=f'series_{series.workflow_name}_wf')
        workflow.add_nodes([series_wf])
    return workflow


def generated_by(container=None):
    entry = {'Name': 'qsmprep', 'Version': __version__}
    if container:
        entry['Container'] = container
    return [entry]
