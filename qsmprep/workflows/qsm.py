"""Workflows of one MEGRE series: echo fits and masking, field to susceptibility, derivatives."""
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import DerivativesSink
from ..interfaces.qsm import (BrainMask, FitR2star, FitTotalField, Invert, LoadMEGRE, RemoveBackground,
                              SeparateSources, UnwrapPhase)
from ..methods import DEFAULT_INVERSION
from ..science import echofit
from ..science.unwrap import DEFAULT_UNWRAP


def init_megre_wf(*, series, phase_sign=1, unwrap=DEFAULT_UNWRAP, user_mask=None, omp_nthreads=1,
                  name='megre_wf'):
    """Multi-echo GRE to total field (ppm), R2*, T2* and a brain mask.

    Outputs (``outputnode``): magnitude (4-D), total_field, field_noise (from 3 echoes), mask,
    reliable_mask (the mask without voxels whose field is a phase wrap off their neighbours),
    r2star, t2star.

    >>> wf = init_megre_wf(series=series)  # doctest: +SKIP
    """
    workflow = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['magnitude', 'total_field', 'field_noise', 'mask', 'reliable_mask', 'r2star', 't2star']),
        name='outputnode')
    load_megre = pe.Node(LoadMEGRE(magnitude_files=series.magnitude_files, phase_files=series.phase_files,
                                   phase_range=series.phase_range, phase_sign=phase_sign,
                                   num_threads=omp_nthreads),
                         name='load_megre', n_procs=omp_nthreads)
    brain_mask = pe.Node(BrainMask(source=series.magnitude_files[0]), name='brain_mask')
    if user_mask:
        brain_mask.inputs.user_mask = user_mask
    fit_r2star = pe.Node(FitR2star(echo_times=series.echo_times_s), name='fit_r2star')
    unwrap_phase = pe.Node(UnwrapPhase(echo_times=series.echo_times_s, method=unwrap, num_threads=omp_nthreads),
                           name='unwrap_phase', n_procs=omp_nthreads)
    fit_total_field = pe.Node(FitTotalField(echo_times=series.echo_times_s, field_strength=series.field_strength_t,
                                            num_threads=omp_nthreads),
                              name='fit_total_field', n_procs=omp_nthreads)
    workflow.connect([
        (load_megre, brain_mask, [('magnitude', 'magnitude')]),
        (load_megre, fit_r2star, [('magnitude', 'magnitude')]),
        (brain_mask, fit_r2star, [('mask', 'mask')]),
        (load_megre, unwrap_phase, [('phase', 'phase'), ('magnitude', 'magnitude')]),
        (brain_mask, unwrap_phase, [('mask', 'mask')]),
        (unwrap_phase, fit_total_field, [('unwrapped_phase', 'unwrapped_phase')]),
        (load_megre, fit_total_field, [('magnitude', 'magnitude')]),
        (brain_mask, fit_total_field, [('mask', 'mask')]),
        (load_megre, outputnode, [('magnitude', 'magnitude')]),
        (brain_mask, outputnode, [('mask', 'mask')]),
        (fit_r2star, outputnode, [('r2star', 'r2star'), ('t2star', 't2star')]),
        (fit_total_field, outputnode, [('total_field', 'total_field'), ('reliable_mask', 'reliable_mask')]),
    ])
    if len(series.echo_times_s) >= echofit.COMPLEX_FIT_MIN_ECHOES:
        workflow.connect(fit_total_field, 'field_noise', outputnode, 'field_noise')
    return workflow


def init_field_to_chi_wf(*, b0_dir, echo_times, field_strength, bgremove='vsharp',
                         inversion_method=DEFAULT_INVERSION, omp_nthreads=1, invert_nthreads=None,
                         name='field_to_chi_wf'):
    """Total field (ppm) to referenced susceptibility (ppm): background removal, then inversion.

    ``invert_nthreads`` (default ``omp_nthreads``): the inversion's threads, fewer when another
    node is meant to run beside it.

    Inputs (``inputnode``): total_field, mask, magnitude.
    Outputs (``outputnode``): chi, chi_parameters (what the inversion chose), local_field,
    mask (where the local field is valid).

    >>> wf = init_field_to_chi_wf(b0_dir=[0, 0, 1], echo_times=[0.004, 0.01], field_strength=3.0)  # doctest: +SKIP
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['total_field', 'mask', 'magnitude']), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(fields=['chi', 'chi_parameters', 'local_field', 'mask']),
                         name='outputnode')
    b0_dir = [float(v) for v in b0_dir]
    remove_background = pe.Node(RemoveBackground(method=bgremove, b0_dir=b0_dir, num_threads=omp_nthreads),
                                name='remove_background', n_procs=omp_nthreads)
    invert_nthreads = invert_nthreads or omp_nthreads
    invert = pe.Node(Invert(method=inversion_method, b0_dir=b0_dir, echo_times=list(echo_times),
                            field_strength=field_strength, num_threads=invert_nthreads),
                     name='invert', n_procs=invert_nthreads)
    workflow.connect([
        (inputnode, remove_background, [('total_field', 'total_field'), ('mask', 'mask')]),
        (remove_background, invert, [('local_field', 'local_field'), ('mask', 'mask')]),
        (inputnode, invert, [('magnitude', 'magnitude')]),
        (invert, outputnode, [('chi', 'chi'), ('parameters', 'chi_parameters')]),
        (remove_background, outputnode, [('local_field', 'local_field'), ('mask', 'mask')]),
    ])
    return workflow


def init_series_wf(*, series, output_dir, metadata, parameters, phase_sign=1, unwrap=DEFAULT_UNWRAP,
                   bgremove='vsharp', inversion_method=DEFAULT_INVERSION, user_mask=None,
                   masking='two-pass', chi_separation=True, omp_nthreads=1, name='series_wf'):
    """One MEGRE series from raw echoes to written derivatives.

    ``masking='two-pass'`` hands background removal the mask without the voxels of unreliable
    phase, ``'magnitude'`` the magnitude mask itself. With ``chi_separation`` the local field and R2* are also split into paramagnetic and
    diamagnetic susceptibility.

    ``metadata`` holds the sidecar keys common to every output, ``parameters`` the keys of
    each output (see ``qsmprep.interfaces.derivatives.OUTPUTS``).
    """
    workflow = pe.Workflow(name=name)
    mask_output = 'outputnode.reliable_mask' if masking == 'two-pass' else 'outputnode.mask'
    # Inversion and chi-separation both wait only for the local field, and half their time is
    # single-threaded numpy: with half the threads each, they run side by side (1 mm head,
    # 2 cores: 20 s for both, against 32 s one after the other with 2 threads each).
    sharing_nthreads = max(1, omp_nthreads // 2) if chi_separation else omp_nthreads
    megre_wf = init_megre_wf(series=series, phase_sign=phase_sign, unwrap=unwrap, user_mask=user_mask,
                             omp_nthreads=omp_nthreads)
    field_to_chi_wf = init_field_to_chi_wf(b0_dir=series.b0_dir, echo_times=series.echo_times_s,
                                           field_strength=series.field_strength_t, bgremove=bgremove,
                                           inversion_method=inversion_method, omp_nthreads=omp_nthreads,
                                           invert_nthreads=sharing_nthreads)
    derivatives_sink = pe.Node(
        DerivativesSink(output_dir=str(output_dir), prefix=series.name, subject=series.entities['subject'],
                        session=series.entities.get('session', ''), reference_file=series.magnitude_files[0],
                        metadata=metadata, parameters=parameters),
        name='derivatives_sink', run_without_submitting=True, overwrite=True)
    workflow.connect([
        (megre_wf, field_to_chi_wf, [('outputnode.total_field', 'inputnode.total_field'),
                                     (mask_output, 'inputnode.mask'),
                                     ('outputnode.magnitude', 'inputnode.magnitude')]),
        (megre_wf, derivatives_sink, [('outputnode.r2star', 'r2starmap'), ('outputnode.t2star', 't2starmap'),
                                      ('outputnode.total_field', 'total_field'),
                                      ('outputnode.mask', 'brain_mask')]),
        (field_to_chi_wf, derivatives_sink, [('outputnode.chi', 'chimap'),
                                             ('outputnode.chi_parameters', 'chimap_parameters'),
                                             ('outputnode.local_field', 'local_field'),
                                             ('outputnode.mask', 'localfield_mask')]),
    ])
    if len(series.echo_times_s) >= echofit.COMPLEX_FIT_MIN_ECHOES:
        workflow.connect(megre_wf, 'outputnode.field_noise', derivatives_sink, 'field_noise')
    if chi_separation:
        separate_sources = pe.Node(
            SeparateSources(b0_dir=[float(v) for v in series.b0_dir], field_strength=series.field_strength_t,
                            num_threads=sharing_nthreads),
            name='separate_sources', n_procs=sharing_nthreads)
        workflow.connect([
            (field_to_chi_wf, separate_sources, [('outputnode.local_field', 'local_field'),
                                                 ('outputnode.mask', 'mask')]),
            (megre_wf, separate_sources, [('outputnode.r2star', 'r2star'), ('outputnode.magnitude', 'magnitude')]),
            (separate_sources, derivatives_sink, [('chi_paramagnetic', 'chimap_paramagnetic'),
                                                  ('chi_diamagnetic', 'chimap_diamagnetic')]),
        ])
    return workflow
