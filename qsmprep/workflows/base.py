"""The top-level workflow and the subject level: one series workflow per MEGRE series, grouped by
subject and session."""
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import sidecars_for
from .qsm import init_series_wf


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
