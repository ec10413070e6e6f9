"""The top-level workflow and the subject level: one series workflow per MEGRE series, grouped by
subject and session."""
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import bids_uri, orientation_groups, series_name
from ..interfaces.derivatives import OrientationsSink, sidecars_for
from ..methods import LEARNED_INVERSIONS
from ..science import orientations
from .qsm import init_orientations_wf, init_series_wf


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
    entities; with ``settings.multi_orientation`` the runs of one head are also combined by an
    ``orientations_wf`` per head."""
    workflow = pe.Workflow(name=name)
    user_mask = str(settings.mask) if settings.mask else None
    series_wfs = {}
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
        series_wfs[series.name] = series_wf
    if settings.multi_orientation:
        for runs in orientation_groups(series_list):
            if len(runs) > 1:
                _combine_orientations(workflow, runs, [series_wfs[series.name] for series in runs], settings)
    return workflow


def _combine_orientations(workflow, runs, series_wfs, settings):
    """A ``head_wf`` that registers the runs of one head onto its first and writes their COSMOS map."""
    reference = runs[0]
    head = {key: value for key, value in reference.entities.items() if key != 'run'}
    head_wf = pe.Workflow(name=f'head_{series_name(head).replace("-", "_")}_wf')
    fields = ('magnitude', 'brain_mask', 'local_field', 'localfield_mask')
    merge_magnitudes, merge_brain_masks, merge_local_fields, merge_localfield_masks = (
        pe.Node(niu.Merge(len(runs)), name=f'merge_{field}s') for field in fields)
    sti = settings.sti or ('ls' if len(runs) >= orientations.STI_MIN_ORIENTATIONS else None)
    learned = settings.inversion if settings.inversion in LEARNED_INVERSIONS else None
    orientations_wf = init_orientations_wf(b0_dirs=[series.b0_dir for series in runs], sti=sti,
                                           learned_inversion=learned, omp_nthreads=settings.omp_nthreads)
    metadata = {
        'SkullStripped': True,
        'Sources': [bids_uri(f, settings.bids_dir) for series in runs for f in series.magnitude_files
                    + series.phase_files],
        'MagneticFieldStrength': reference.field_strength_t, 'EchoTime': reference.echo_times_s,
        'RegistrationMethod': 'SimpleITK rigid, Mattes mutual information of the first echo\'s magnitude',
        'Reference': 'mean over desc-brain_mask of the combined maps',
    }
    orientations_sink = pe.Node(
        OrientationsSink(output_dir=str(settings.output_dir), prefix=series_name(head), subject=head['subject'],
                         session=head.get('session', ''), runs=[str(series.entities['run']) for series in runs],
                         reference_file=reference.magnitude_files[0], metadata=metadata),
        name='orientations_sink', run_without_submitting=True, overwrite=True)
    if learned:
        orientations_sink.inputs.learned_method = learned
        head_wf.connect([(orientations_wf, orientations_sink, [('outputnode.learned_chi', 'learned_chimap'),
                                                               ('outputnode.learned_parameters', 'learned_parameters')])])
    head_wf.connect([
        (merge_magnitudes, orientations_wf, [('out', 'inputnode.magnitudes')]),
        (merge_brain_masks, orientations_wf, [('out', 'inputnode.brain_masks')]),
        (merge_local_fields, orientations_wf, [('out', 'inputnode.local_fields')]),
        (merge_localfield_masks, orientations_wf, [('out', 'inputnode.localfield_masks')]),
        (orientations_wf, orientations_sink, [('outputnode.chi', 'chimap'), ('outputnode.mask', 'brain_mask'),
                                              ('outputnode.parameters', 'chimap_parameters'),
                                              ('outputnode.transforms', 'transforms'),
                                              ('outputnode.b0_dirs', 'b0_dirs'),
                                              ('outputnode.registration', 'registration')]),
    ])
    if sti:
        head_wf.connect([(orientations_wf, orientations_sink, [
            ('outputnode.tensor', 'sti_tensor'), ('outputnode.mms', 'mms'), ('outputnode.msa', 'msa'),
            ('outputnode.pev', 'pev'), ('outputnode.sti_parameters', 'sti_parameters')])])
    for index, series_wf in enumerate(series_wfs, start=1):
        workflow.connect([(series_wf, head_wf, [(f'outputnode.{field}', f'merge_{field}s.in{index}')
                                                for field in fields])])
