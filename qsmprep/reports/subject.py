"""The per-subject HTML report, ``output_dir/sub-<l>.html``, built after a run from its derivatives.

Figures (matplotlib, ``figures``) and HTML fragments are written as reportlets into the work
folder, named with BIDS entities and ``_MEGRE``; NiReports' assembler finds them by the queries of
``data/subject.yml``, copies the figures into ``output_dir/sub-<l>/figures/`` and renders
``data/subject.tpl``, a self-contained page (no script, no style sheet from the network: clusters
are often offline).
"""
import html
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..bids import orientation_groups, series_name
from ..files import read_itk_transform, temporary_path
from ..interfaces.derivatives import derivative_path
from ..methods import INVERSIONS
from ..science import echofit, registration
from . import figures

DATA = Path(__file__).parent / 'data'
# Fixed display windows, so that maps can be compared across subjects and runs.
CHI_WINDOW_PPM = (-0.15, 0.15)
CHI_SEPARATION_WINDOW_PPM = (0.0, 0.15)
LOCAL_FIELD_WINDOW_PPM = (-0.05, 0.05)
# R2* grows about linearly with B0: the window at 3 T, scaled by B0 / 3 T.
R2STAR_WINDOW_AT_3T = (0.0, 50.0)
STEP_NAMES = {'romeo': 'ROMEO', 'laplacian': 'Laplacian unwrapping', 'vsharp': 'V-SHARP', 'pdf': 'PDF', 'lbv': 'LBV'}
SOFTWARE = ('nipype', 'nibabel', 'numpy', 'scipy', 'SimpleITK', 'nireports', 'matplotlib', 'torch')
CITATIONS = {
    'romeo': 'Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid opensource minimum spanning '
             'tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.',
    'laplacian': 'Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications. Opt Lett '
                 '2003;28:1194-1196.',
    'vsharp': 'Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed sensing. Magn Reson '
              'Med 2012;67:137-147.',
    'pdf': 'Liu T, Khalidov I, de Rochefort L, et al. A novel background field removal method for MRI using '
           'projection onto dipole fields (PDF). NMR Biomed 2011;24:1129-1136.',
    'lbv': 'Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the Laplacian boundary value '
           'problem. NMR Biomed 2014;27:312-319.',
    'chisep': 'Shin HG, Lee J, Yun YH, et al. Chi-separation: magnetic susceptibility source separation toward iron '
              'and myelin mapping in the brain. NeuroImage 2021;240:118371.',
    'cosmos': 'Liu T, Spincemaille P, de Rochefort L, Kressler B, Wang Y. Calculation of susceptibility through '
              'multiple orientation sampling (COSMOS). Magn Reson Med 2009;61:196-204.',
    'nipype': 'Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible '
              'neuroimaging data processing framework in Python. Front Neuroinform 2011;5:13.',
}


def _canonical(path):
    """Data (RAS voxel order) and voxel size of a NIfTI file."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(image.dataobj).astype(np.float32), tuple(float(v) for v in image.header.get_zooms()[:3])


def _canonical_array(array, affine):
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(array.astype(np.float32), affine)).dataobj)


def _sidecar(path):
    return json.loads(Path(str(path).replace('.nii.gz', '.json')).read_text())


def _series_paths(output_dir, series):
    entities = series.entities

    def path(ending):
        return derivative_path(output_dir, series.name, entities['subject'], entities.get('session'), ending)
    return path


def _phase_jump_share(total_field, mask, wrap_ppm):
    """Share of neighbouring voxel pairs inside ``mask`` whose total field differs by more than half
    a wrap period: an unwrapping error leaves a jump of a whole period, smooth fields none."""
    jumps, pairs = 0, 0
    for axis in range(3):
        both = mask & np.roll(mask, -1, axis=axis)
        both.swapaxes(0, axis)[-1] = False
        difference = np.abs(np.roll(total_field, -1, axis=axis) - total_field)[both]
        jumps += int((difference > wrap_ppm / 2).sum())
        pairs += difference.size
    return jumps / max(pairs, 1)


def series_metrics(maps, chimap_sidecar, voxel_size):
    """The numbers a user checks first, from a series' derivatives (``maps``: name -> array)."""
    brain, local = maps['brain_mask'] > 0, maps['localfield_mask'] > 0
    echo_times = chimap_sidecar['EchoTime']
    wrap_ppm = echofit.wrap_period_ppm(echo_times, chimap_sidecar['MagneticFieldStrength'])
    metrics = {
        'Voxel size (mm)': ' x '.join(f'{v:.2f}' for v in voxel_size),
        'Echoes': f'{len(echo_times)}, {1000 * echo_times[0]:.1f} to {1000 * echo_times[-1]:.1f} ms',
        'Field strength (T)': f'{chimap_sidecar["MagneticFieldStrength"]:g}',
        'B0 direction (voxel axes)': f'{np.round(chimap_sidecar["B0Direction"], 3).tolist()} '
                                     f'(from {chimap_sidecar.get("B0DirectionSource", "?")})',
        'Brain mask volume (mL)': f'{brain.sum() * np.prod(voxel_size) / 1000:.0f}',
        'Local-field mask, share of the brain mask (%)': f'{100 * (local & brain).sum() / max(brain.sum(), 1):.1f}',
        'Phase jumps (unwrapping check): neighbour pairs off by half a wrap (%)':
            f'{100 * _phase_jump_share(maps["total_field"], local, wrap_ppm):.3f}',
        'Local field RMS in its mask (ppb)': f'{1000 * np.sqrt(np.mean(maps["local_field"][local] ** 2)):.1f}',
        'Background removed: total field RMS in the same mask (ppb)':
            f'{1000 * np.sqrt(np.mean(maps["total_field"][local] ** 2)):.1f}',
    }
    if 'field_noise' in maps:
        metrics['Field noise from the echo-fit residual, median in the brain (ppb)'] = \
            f'{1000 * np.median(maps["field_noise"][brain]):.1f}'
    chi = maps['chimap'][local]
    metrics['Chimap 1st / 99th percentile (ppm)'] = ' / '.join(f'{v:.3f}' for v in np.percentile(chi, [1, 99]))
    metrics['Inversion'] = chimap_sidecar['EstimationAlgorithm']
    if 'RegularizationWeight' in chimap_sidecar:
        metrics['Inversion weight'] = (f'{chimap_sidecar["RegularizationWeight"]:.3g}: '
                                       f'{chimap_sidecar.get("RegularizationWeightRule", "")}')
    if 'Model' in chimap_sidecar:
        metrics['Model'] = (f'{chimap_sidecar["Model"]}, {chimap_sidecar["ModelTrainingSteps"]} training steps, '
                            f'sha256 {chimap_sidecar["ModelSha256"][:16]}...')
    return metrics


def _table(rows):
    cells = ''.join(f'<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>'
                    for key, value in rows.items())
    return f'<table class="metrics">{cells}</table>'


def _series_reportlets(output_dir, series, figures_dir):
    """Figures and summary table of one series; returns its Chimap sidecar and whether it has chi+ and chi-."""
    path = _series_paths(output_dir, series)
    endings = {'chimap': 'Chimap', 'r2star': 'R2starmap', 'brain_mask': 'desc-brain_mask',
               'localfield_mask': 'desc-localfield_mask', 'total_field': 'desc-total_fieldmap',
               'local_field': 'desc-local_fieldmap', 'field_noise': 'desc-noise_fieldmap',
               'chi_plus': 'desc-paramagnetic_Chimap', 'chi_minus': 'desc-diamagnetic_Chimap'}
    maps = {}
    for key, ending in endings.items():
        if path(ending).exists():
            maps[key], voxel_size = _canonical(path(ending))
    magnitude, _ = _canonical(series.magnitude_files[0])
    sidecar = _sidecar(path('Chimap'))
    brain, local = maps['brain_mask'] > 0, maps['localfield_mask'] > 0
    prefix = figures_dir / series.name
    head = magnitude > np.percentile(magnitude, 50)
    figures.mosaic([{'volume': magnitude, 'window': figures.robust_window(magnitude, head, 0.5, 99.5),
                     'label': 'first-echo magnitude (a.u.)',
                     'contours': [(brain, 'gold', 'brain mask'), (local, 'deepskyblue', 'local-field mask')]}],
                   f'{prefix}_desc-masks_MEGRE.png', brain, voxel_size)
    figures.mosaic([{'volume': maps['chimap'], 'window': CHI_WINDOW_PPM, 'label': 'chi (ppm)'}],
                   f'{prefix}_desc-chimap_MEGRE.png', brain, voxel_size)
    r2star_window = tuple(v * sidecar['MagneticFieldStrength'] / 3.0 for v in R2STAR_WINDOW_AT_3T)
    figures.mosaic([{'volume': maps['r2star'], 'window': r2star_window, 'label': 'R2* (1/s)', 'cmap': 'magma'}],
                   f'{prefix}_desc-r2star_MEGRE.png', brain, voxel_size)
    if 'chi_plus' in maps:
        figures.mosaic([{'volume': maps['chi_plus'], 'window': CHI_SEPARATION_WINDOW_PPM, 'label': 'chi+ (ppm)',
                         'cmap': 'hot'},
                        {'volume': maps['chi_minus'], 'window': CHI_SEPARATION_WINDOW_PPM, 'label': 'chi- (ppm)',
                         'cmap': 'bone'}],
                       f'{prefix}_desc-chisep_MEGRE.png', brain, voxel_size)
    rows = [{'volume': np.where(brain, maps['total_field'], 0),
             'window': figures.robust_window(maps['total_field'], brain, symmetric=True),
             'label': 'total field (ppm)', 'cmap': 'RdBu_r'},
            {'volume': maps['local_field'], 'window': LOCAL_FIELD_WINDOW_PPM, 'label': 'local field (ppm)',
             'cmap': 'RdBu_r'}]
    if 'field_noise' in maps:
        rows.append({'volume': np.where(brain, maps['field_noise'], 0),
                     'window': figures.robust_window(maps['field_noise'], brain, 0, 99),
                     'label': 'field noise (ppm)', 'cmap': 'viridis'})
    figures.mosaic(rows, f'{prefix}_desc-fields_MEGRE.png', brain, voxel_size)
    Path(f'{prefix}_desc-summary_MEGRE.html').write_text(_table(series_metrics(maps, sidecar, voxel_size)))
    return sidecar, 'chi_plus' in maps


def _orientation_reportlets(output_dir, runs, figures_dir):
    """Registration overlays, COSMOS and, when written, the principal eigenvector of one head whose
    ``runs`` (reference first) were combined; returns whether they were (a COSMOS map exists)."""
    head_entities = {key: value for key, value in runs[0].entities.items() if key != 'run'}
    prefix = series_name(head_entities)

    def path(ending):
        return derivative_path(output_dir, prefix, head_entities['subject'], head_entities.get('session'), ending)

    if not path('desc-cosmos_Chimap').exists():
        return False
    reference_image = nib.load(runs[0].magnitude_files[0])
    reference = np.asanyarray(reference_image.dataobj).astype(np.float32)
    mask, voxel_size = _canonical(path('desc-brain_mask'))
    mask = mask > 0
    contours = []
    colours = ('gold', 'deepskyblue', 'lime', 'magenta', 'orange', 'cyan')
    for index, run in enumerate(runs):
        brain = _series_paths(output_dir, run)('desc-brain_mask')
        brain_image = nib.load(brain)
        brain_mask = np.asanyarray(brain_image.dataobj).astype(np.float32)
        if index:
            transform_path = path('x').with_name(f'{prefix}_run-{run.entities["run"]}_from-run{run.entities["run"]}'
                                                 f'_to-run{runs[0].entities["run"]}_mode-image_xfm.txt')
            matrix = read_itk_transform(transform_path)
            transform = registration.RigidTransform(rotation=matrix[:3, :3], translation=matrix[:3, 3])
            brain_mask = registration.resample(brain_mask, brain_image.affine, reference_image.affine,
                                               reference.shape, transform, order=0)
        contours.append((_canonical_array(brain_mask, reference_image.affine) > 0, colours[index % len(colours)],
                         f'run {run.entities["run"]} brain mask'))
    canonical_reference = _canonical_array(reference, reference_image.affine)
    figures.mosaic([{'volume': canonical_reference,
                     'window': figures.robust_window(canonical_reference, mask, 0.5, 99.5),
                     'label': f'run {runs[0].entities["run"]} magnitude (a.u.)', 'contours': contours}],
                   figures_dir / f'{prefix}_desc-registration_MEGRE.png', mask, voxel_size)
    cosmos, _ = _canonical(path('desc-cosmos_Chimap'))
    figures.mosaic([{'volume': cosmos, 'window': CHI_WINDOW_PPM, 'label': 'COSMOS chi (ppm)'}],
                   figures_dir / f'{prefix}_desc-cosmos_MEGRE.png', mask, voxel_size)
    if path('desc-pev_Chimap').exists():
        pev_image = nib.load(path('desc-pev_Chimap'))
        vectors = np.moveaxis(np.asanyarray(nib.as_closest_canonical(pev_image).dataobj).astype(np.float32), -1, 0)
        # The vectors are in the first run's voxel axes; reoriented, the axes permute (and flip,
        # which the colours ignore): voxel axis i becomes RAS axis ``ornt[i, 0]``.
        vectors = vectors[np.argsort(nib.io_orientation(pev_image.affine)[:, 0])]
        msa, _ = _canonical(path('desc-msa_Chimap'))
        figures.colour_mosaic(figures.direction_colours(vectors, np.abs(msa), mask),
                              figures_dir / f'{prefix}_desc-pev_MEGRE.png', mask, voxel_size)
    return True


def _software_versions():
    versions = {'qsmprep': __version__, 'Python': platform.python_version()}
    for package in SOFTWARE:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def methods_paragraph(sidecar, series_count, chi_separation=False, orientations=False):
    """A methods paragraph, with references, for the steps that ran (from a Chimap ``sidecar``)."""
    echo_times = sidecar['EchoTime']
    unwrap = sidecar.get('PhaseUnwrapping', '')
    bgremove = sidecar.get('BackgroundFieldRemoval', '')
    inversion = next((method for method in INVERSIONS.values()
                      if method.estimation_algorithm == sidecar['EstimationAlgorithm']), None)
    references = {key: CITATIONS[key] for key in ('nipype', unwrap, bgremove) if key in CITATIONS}

    def cite(key):
        return f' [{key}]' if key in references else ''

    text = (f'{series_count} multi-echo gradient-echo series ({len(echo_times)} echoes, {1000 * echo_times[0]:.1f} to '
            f'{1000 * echo_times[-1]:.1f} ms, {sidecar["MagneticFieldStrength"]:g} T) were processed with qsmprep '
            f'{__version__}, a Nipype workflow [nipype]. R2* and T2* came from a magnitude-weighted log-linear '
            f'mono-exponential fit, and the brain mask from the magnitude. The phase was unwrapped by '
            f'{STEP_NAMES.get(unwrap, unwrap)}{cite(unwrap)} and combined across echoes by '
            f'{sidecar.get("EchoCombination", "a fit over the echoes")}; the background field was removed by '
            f'{STEP_NAMES.get(bgremove, bgremove)}{cite(bgremove)}. Susceptibility was estimated by '
            f'{sidecar["EstimationAlgorithm"]}')
    if inversion is not None:
        references[inversion.name] = inversion.citation
        text += cite(inversion.name)
    text += ', referenced to the ' + sidecar.get('Reference', 'mean in the brain') + '.'
    if chi_separation:
        references['chisep'] = CITATIONS['chisep']
        text += (' Paramagnetic and diamagnetic susceptibility were separated from the field and R2\' '
                 '(R2* minus an assumed R2) [chisep].')
    if orientations:
        references['cosmos'] = CITATIONS['cosmos']
        text += (' The head orientations were registered rigidly onto the first (SimpleITK) and combined by '
                 'COSMOS [cosmos].')
    items = ''.join(f'<li>[{html.escape(key)}] {html.escape(value)}</li>' for key, value in references.items())
    return f'<p>{html.escape(text)}</p><ul class="references">{items}</ul>'


def _subject_reportlets(subject, figures_dir, sidecars, chi_separation, orientations, warnings, errors):
    (figures_dir / f'sub-{subject}_desc-methods_MEGRE.html').write_text(
        methods_paragraph(sidecars[0], len(sidecars), chi_separation, orientations)
        + '<p class="note">qsmprep writes this text from what ran; copy it into a manuscript and keep the '
          'references.</p>')
    messages = [('warning', line) for line in warnings] + [('error', line) for line in errors]
    items = ''.join(f'<li class="{kind}">{html.escape(line)}</li>' for kind, line in messages)
    (figures_dir / f'sub-{subject}_desc-warnings_MEGRE.html').write_text(
        f'<ul class="messages">{items}</ul>' if messages else '<p>No warnings or errors were raised.</p>')
    (figures_dir / f'sub-{subject}_desc-about_MEGRE.html').write_text(_table(_software_versions()))


def mentions_subject(text, subject):
    """Whether ``text`` names ``sub-<subject>`` (and not a longer label that starts with it: sub-1 is not sub-10)."""
    return re.search(rf'sub-{re.escape(subject)}(?![A-Za-z0-9])', text) is not None


def subject_warnings(log_file, subject):
    """The WARNING and ERROR lines of a run's log that concern ``subject`` (its files are named in them)."""
    if log_file is None or not Path(log_file).exists():
        return []
    return [line.strip() for line in Path(log_file).read_text(errors='replace').splitlines()
            if (' WARNING: ' in line or ' ERROR: ' in line) and mentions_subject(line, subject)]


def write_subject_report(output_dir, subject, series_list, reportlets_dir, run_uuid, log_file=None, errors=()):
    """Write ``output_dir/sub-<subject>.html`` and its figures for the series of ``series_list`` with
    derivatives (each ``bids.MEGRESeries``): returns the report's path."""
    from nireports.assembler.report import Report

    figures_dir = Path(reportlets_dir) / f'sub-{subject}' / 'figures'
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.iterdir():
        stale.unlink()
    sidecars, chi_separation = zip(*[_series_reportlets(output_dir, series, figures_dir) for series in series_list])
    combined = [_orientation_reportlets(output_dir, runs, figures_dir)
                for runs in orientation_groups(series_list) if len(runs) > 1]
    _subject_reportlets(subject, figures_dir, sidecars, any(chi_separation), any(combined),
                        subject_warnings(log_file, subject), errors)
    target = Path(output_dir) / f'sub-{subject}.html'
    # Written beside its final name and renamed: a reader never sees half a report.
    temporary = temporary_path(target)
    try:
        report = Report(output_dir, run_uuid, bootstrap_file=DATA / 'subject.yml', reportlets_dir=reportlets_dir,
                        plugins=[], subject=subject, out_filename=temporary.name,
                        metadata={'template': str(DATA / 'subject.tpl')})
        report.generate_report()
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target
