"""Workflows of one MEGRE series: the series workflow and one small workflow per stage.

Each stage workflow takes its inputs through ``inputnode`` and gives its results through
``outputnode``, so that a later stage (registration of several orientations, a multi-orientation
inversion) can be put between them without rewiring the others.
"""
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import DerivativesSink
from ..interfaces.orientations import Cosmos, RegisterOrientations, Sti
from ..interfaces.qsm import (BrainMask, FitR2star, FitTotalField, Invert, LoadMEGRE, RemoveBackground,
                              SeparateSources, UnwrapPhase)
from ..methods import DEFAULT_INVERSION
from ..science import echofit
from ..science.unwrap import DEFAULT_UNWRAP


def _io_nodes(inputs, outputs):
    return (pe.Node(niu.IdentityInterface(fields=inputs), name='inputnode'),
            pe.Node(niu.IdentityInterface(fields=outputs), name='outputnode'))


def init_mask_wf(*, source, user_mask=None, name='mask_wf'):
    """Brain mask from the magnitude (4-D: echoes combined), or the user's mask.

    ``source``: the input file named in warnings about the mask.
    Inputs: magnitude. Outputs: mask.
    """
    workflow = pe.Workflow(name=name)
    inputnode, outputnode = _io_nodes(['magnitude'], ['mask'])
    brain_mask = pe.Node(BrainMask(source=source), name='brain_mask')
    if user_mask:
        brain_mask.inputs.user_mask = user_mask
    workflow.connect([
        (inputnode, brain_mask, [('magnitude', 'magnitude')]),
        (brain_mask, outputnode, [('mask', 'mask')]),
    ])
    return workflow


def init_field_wf(*, echo_times, field_strength, unwrap=DEFAULT_UNWRAP, omp_nthreads=1, name='field_wf'):
    """Multi-echo phase to total field (ppm): unwrapping, then the echo fit.

    Inputs: phase, magnitude (4-D), mask. Outputs: total_field, reliable_mask (the mask without
    voxels whose field is a phase wrap off their neighbours), field_noise (from 3 echoes).
    """
    workflow = pe.Workflow(name=name)
    inputnode, outputnode = _io_nodes(['phase', 'magnitude', 'mask'], ['total_field', 'reliable_mask', 'field_noise'])
    unwrap_phase = pe.Node(UnwrapPhase(echo_times=echo_times, method=unwrap, num_threads=omp_nthreads),
                           name='unwrap_phase', n_procs=omp_nthreads)
    fit_total_field = pe.Node(FitTotalField(echo_times=echo_times, field_strength=field_strength,
                                            num_threads=omp_nthreads),
                              name='fit_total_field', n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, unwrap_phase, [('phase', 'phase'), ('magnitude', 'magnitude'), ('mask', 'mask')]),
        (unwrap_phase, fit_total_field, [('unwrapped_phase', 'unwrapped_phase')]),
        (inputnode, fit_total_field, [('magnitude', 'magnitude'), ('mask', 'mask')]),
        (fit_total_field, outputnode, [('total_field', 'total_field'), ('reliable_mask', 'reliable_mask')]),
    ])
    if len(echo_times) >= echofit.COMPLEX_FIT_MIN_ECHOES:
        workflow.connect(fit_total_field, 'field_noise', outputnode, 'field_noise')
    return workflow


def init_bgremove_wf(*, b0_dir, method='vsharp', omp_nthreads=1, name='bgremove_wf'):
    """Total field to local field (ppm). Inputs: total_field, mask. Outputs: local_field, mask
    (where the local field is valid)."""
    workflow = pe.Workflow(name=name)
    inputnode, outputnode = _io_nodes(['total_field', 'mask'], ['local_field', 'mask'])
    remove_background = pe.Node(RemoveBackground(method=method, b0_dir=[float(v) for v in b0_dir],
                                                 num_threads=omp_nthreads),
                                name='remove_background', n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, remove_background, [('total_field', 'total_field'), ('mask', 'mask')]),
        (remove_background, outputnode, [('local_field', 'local_field'), ('mask', 'mask')]),
    ])
    return workflow


def init_inversion_wf(*, b0_dirs, echo_times, field_strength, method=DEFAULT_INVERSION, omp_nthreads=1,
                      name='inversion_wf'):
    """Local fields of one or several head orientations to susceptibility (ppm, referenced to
    the mask's mean).

    ``b0_dirs``: one B0 direction per local field, in the voxel axes of the mask.
    Inputs: local_fields (a file or a list, on the mask's grid), mask, magnitude (the data
    weight). Outputs: chi, parameters (what the method chose, for the sidecar).
    """
    workflow = pe.Workflow(name=name)
    inputnode, outputnode = _io_nodes(['local_fields', 'mask', 'magnitude'], ['chi', 'parameters'])
    invert = pe.Node(Invert(method=method, b0_dirs=[[float(v) for v in b0_dir] for b0_dir in b0_dirs],
                            echo_times=list(echo_times), field_strength=field_strength, num_threads=omp_nthreads),
                     name='invert', n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, invert, [('local_fields', 'local_fields'), ('mask', 'mask'), ('magnitude', 'magnitude')]),
        (invert, outputnode, [('chi', 'chi'), ('parameters', 'parameters')]),
    ])
    return workflow


def init_chisep_wf(*, b0_dir, field_strength, omp_nthreads=1, name='chisep_wf'):
    """Local field and R2* to paramagnetic and diamagnetic susceptibility (ppm).

    Inputs: local_field, mask, r2star, magnitude. Outputs: chi_paramagnetic, chi_diamagnetic.
    """
    workflow = pe.Workflow(name=name)
    inputnode, outputnode = _io_nodes(['local_field', 'mask', 'r2star', 'magnitude'],
                                      ['chi_paramagnetic', 'chi_diamagnetic'])
    separate_sources = pe.Node(SeparateSources(b0_dir=[float(v) for v in b0_dir], field_strength=field_strength,
                                               num_threads=omp_nthreads),
                               name='separate_sources', n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, separate_sources, [('local_field', 'local_field'), ('mask', 'mask'), ('r2star', 'r2star'),
                                       ('magnitude', 'magnitude')]),
        (separate_sources, outputnode, [('chi_paramagnetic', 'chi_paramagnetic'),
                                        ('chi_diamagnetic', 'chi_diamagnetic')]),
    ])
    return workflow


def init_orientations_wf(*, b0_dirs, sti=None, learned_inversion=None, omp_nthreads=1, name='orientations_wf'):
    """Several head orientations of one head onto the reference (the first) and COSMOS there; with
    ``sti`` (a method of ``methods.STI_METHODS``) also the susceptibility tensor, with ``learned_inversion`` (e.g.
    'lpcnn') also that method on all registered fields at once.

    ``b0_dirs``: each run's B0 direction in its own voxel axes.
    Inputs (lists, one per run, the reference first): magnitudes, brain_masks, local_fields,
    localfield_masks. Outputs: chi, mask (where every orientation's field is valid), parameters,
    transforms (reference to each later run), b0_dirs (in the reference axes), registration, with
    ``sti`` tensor, mms, msa, pev, sti_parameters, and with ``learned_inversion`` learned_chi and
    learned_parameters.
    """
    workflow = pe.Workflow(name=name)
    inputnode, outputnode = _io_nodes(['magnitudes', 'brain_masks', 'local_fields', 'localfield_masks'],
                                      ['chi', 'mask', 'parameters', 'transforms', 'b0_dirs', 'registration',
                                       'tensor', 'mms', 'msa', 'pev', 'sti_parameters', 'learned_chi',
                                       'learned_parameters'])
    register_orientations = pe.Node(RegisterOrientations(b0_dirs=[[float(v) for v in d] for d in b0_dirs],
                                                         num_threads=omp_nthreads),
                                    name='register_orientations', n_procs=omp_nthreads)
    cosmos = pe.Node(Cosmos(num_threads=omp_nthreads), name='cosmos', n_procs=omp_nthreads)
    workflow.connect([
        (inputnode, register_orientations, [('magnitudes', 'magnitudes'), ('brain_masks', 'brain_masks'),
                                            ('local_fields', 'local_fields'),
                                            ('localfield_masks', 'localfield_masks')]),
        (register_orientations, cosmos, [('local_fields', 'local_fields'), ('localfield_masks', 'masks'),
                                         ('b0_dirs', 'b0_dirs')]),
        (cosmos, outputnode, [('chi', 'chi'), ('mask', 'mask'), ('parameters', 'parameters')]),
        (register_orientations, outputnode, [('transforms', 'transforms'), ('b0_dirs', 'b0_dirs'),
                                             ('registration', 'registration')]),
    ])
    if sti:
        sti_tensor = pe.Node(Sti(method=sti, num_threads=omp_nthreads), name='sti_tensor', n_procs=omp_nthreads)
        workflow.connect([
            (register_orientations, sti_tensor, [('local_fields', 'local_fields'),
                                                 ('localfield_masks', 'masks'), ('b0_dirs', 'b0_dirs')]),
            (sti_tensor, outputnode, [('tensor', 'tensor'), ('mms', 'mms'), ('msa', 'msa'), ('pev', 'pev'),
                                      ('parameters', 'sti_parameters')]),
        ])
    if learned_inversion:
        invert = pe.Node(Invert(method=learned_inversion, num_threads=omp_nthreads), name='invert',
                         n_procs=omp_nthreads)
        workflow.connect([
            (register_orientations, invert, [('local_fields', 'local_fields'), ('b0_dirs', 'b0_dirs')]),
            (cosmos, invert, [('mask', 'mask')]),
            (invert, outputnode, [('chi', 'learned_chi'), ('parameters', 'learned_parameters')]),
        ])
    return workflow


def init_series_wf(*, series, output_dir, metadata, parameters, phase_sign=1, unwrap=DEFAULT_UNWRAP,
                   bgremove='vsharp', inversion_method=DEFAULT_INVERSION, user_mask=None,
                   masking='two-pass', chi_separation=True, omp_nthreads=1, name='series_wf'):
    """One MEGRE series from raw echoes to written derivatives.

    ``masking='two-pass'`` hands background removal the mask without the voxels of unreliable
    phase, ``'magnitude'`` the magnitude mask itself. With ``chi_separation`` the local field and
    R2* are also split into paramagnetic and diamagnetic susceptibility.

    ``metadata`` holds the sidecar keys common to every output, ``parameters`` the keys of
    each output (see ``qsmprep.interfaces.derivatives.OUTPUTS``).
    Outputs (for combining orientations): magnitude (4-D), brain_mask, local_field, localfield_mask.
    """
    workflow = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=['magnitude', 'brain_mask', 'local_field', 'localfield_mask']),
                         name='outputnode')
    # Inversion and chi-separation both wait only for the local field, and half their time is
    # single-threaded numpy: with half the threads each, they run side by side (1 mm head,
    # 2 cores: 20 s for both, against 32 s one after the other with 2 threads each).
    sharing_nthreads = max(1, omp_nthreads // 2) if chi_separation else omp_nthreads
    load_megre = pe.Node(LoadMEGRE(magnitude_files=series.magnitude_files, phase_files=series.phase_files,
                                   phase_range=series.phase_range, phase_sign=phase_sign,
                                   num_threads=omp_nthreads),
                         name='load_megre', n_procs=omp_nthreads)
    mask_wf = init_mask_wf(source=series.magnitude_files[0], user_mask=user_mask)
    fit_r2star = pe.Node(FitR2star(echo_times=series.echo_times_s), name='fit_r2star')
    field_wf = init_field_wf(echo_times=series.echo_times_s, field_strength=series.field_strength_t,
                             unwrap=unwrap, omp_nthreads=omp_nthreads)
    bgremove_wf = init_bgremove_wf(b0_dir=series.b0_dir, method=bgremove, omp_nthreads=omp_nthreads)
    inversion_wf = init_inversion_wf(b0_dirs=[series.b0_dir], echo_times=series.echo_times_s,
                                     field_strength=series.field_strength_t, method=inversion_method,
                                     omp_nthreads=sharing_nthreads)
    derivatives_sink = pe.Node(
        DerivativesSink(output_dir=str(output_dir), prefix=series.name, subject=series.entities['subject'],
                        session=series.entities.get('session', ''), reference_file=series.magnitude_files[0],
                        metadata=metadata, parameters=parameters),
        name='derivatives_sink', run_without_submitting=True, overwrite=True)
    background_mask = ((field_wf, 'outputnode.reliable_mask') if masking == 'two-pass'
                       else (mask_wf, 'outputnode.mask'))
    workflow.connect([
        (load_megre, mask_wf, [('magnitude', 'inputnode.magnitude')]),
        (load_megre, fit_r2star, [('magnitude', 'magnitude')]),
        (mask_wf, fit_r2star, [('outputnode.mask', 'mask')]),
        (load_megre, field_wf, [('phase', 'inputnode.phase'), ('magnitude', 'inputnode.magnitude')]),
        (mask_wf, field_wf, [('outputnode.mask', 'inputnode.mask')]),
        (field_wf, bgremove_wf, [('outputnode.total_field', 'inputnode.total_field')]),
        (background_mask[0], bgremove_wf, [(background_mask[1], 'inputnode.mask')]),
        (bgremove_wf, inversion_wf, [('outputnode.local_field', 'inputnode.local_fields'),
                                     ('outputnode.mask', 'inputnode.mask')]),
        (load_megre, inversion_wf, [('magnitude', 'inputnode.magnitude')]),
        (fit_r2star, derivatives_sink, [('r2star', 'r2starmap'), ('t2star', 't2starmap')]),
        (field_wf, derivatives_sink, [('outputnode.total_field', 'total_field')]),
        (mask_wf, derivatives_sink, [('outputnode.mask', 'brain_mask')]),
        (inversion_wf, derivatives_sink, [('outputnode.chi', 'chimap'),
                                          ('outputnode.parameters', 'chimap_parameters')]),
        (bgremove_wf, derivatives_sink, [('outputnode.local_field', 'local_field'),
                                         ('outputnode.mask', 'localfield_mask')]),
        (load_megre, outputnode, [('magnitude', 'magnitude')]),
        (mask_wf, outputnode, [('outputnode.mask', 'brain_mask')]),
        (bgremove_wf, outputnode, [('outputnode.local_field', 'local_field'), ('outputnode.mask', 'localfield_mask')]),
    ])
    if len(series.echo_times_s) >= echofit.COMPLEX_FIT_MIN_ECHOES:
        workflow.connect(field_wf, 'outputnode.field_noise', derivatives_sink, 'field_noise')
    if chi_separation:
        chisep_wf = init_chisep_wf(b0_dir=series.b0_dir, field_strength=series.field_strength_t,
                                   omp_nthreads=sharing_nthreads)
        workflow.connect([
            (bgremove_wf, chisep_wf, [('outputnode.local_field', 'inputnode.local_field'),
                                      ('outputnode.mask', 'inputnode.mask')]),
            (fit_r2star, chisep_wf, [('r2star', 'inputnode.r2star')]),
            (load_megre, chisep_wf, [('magnitude', 'inputnode.magnitude')]),
            (chisep_wf, derivatives_sink, [('outputnode.chi_paramagnetic', 'chimap_paramagnetic'),
                                           ('outputnode.chi_diamagnetic', 'chimap_diamagnetic')]),
        ])
    return workflow
