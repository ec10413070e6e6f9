"""Writing a series' derivatives into the output dataset, all at once or not at all, with their
sidecars (``sidecars_for`` says what each map is and how it was made).

Names come from one table of BIDS patterns (``OUTPUTS``) and the series' entities; every map
is checked to be on the input grid, written under a temporary name and renamed only when all
of the series' files are ready, so an interrupted run leaves no half-written map behind. Maps
that an earlier run with other options wrote for the series, and this run does not, are removed.
"""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from .. import __version__
from ..bids import bids_uri
from ..files import signals_deferred, temporary_path
from ..methods import INVERSIONS
from ..nifti import on_same_grid, save_like
from ..science import bgremove, chisep, echofit

# output key: (file name ending after the entities, Units, what the map is)
OUTPUTS = {
    'chimap': ('Chimap', 'ppm', 'magnetic susceptibility'),
    'r2starmap': ('R2starmap', '1/s', 'R2* from a mono-exponential fit'),
    't2starmap': ('T2starmap', 's', 'T2* = 1/R2*'),
    'brain_mask': ('desc-brain_mask', 'arbitrary', 'brain mask from the magnitude'),
    'localfield_mask': ('desc-localfield_mask', 'arbitrary',
                        'voxels where the local field and the Chimap are valid (the brain mask after '
                        'background removal)'),
    'total_field': ('desc-total_fieldmap', 'ppm', 'total field from the multi-echo fit'),
    'local_field': ('desc-local_fieldmap', 'ppm', 'local field after background removal'),
    'field_noise': ('desc-noise_fieldmap', 'ppm', 'standard deviation of the total field, from the residual '
                    'of the complex multi-echo fit'),
    'chimap_paramagnetic': ('desc-paramagnetic_Chimap', 'ppm', 'paramagnetic susceptibility chi+ (>= 0)'),
    'chimap_diamagnetic': ('desc-diamagnetic_Chimap', 'ppm',
                           'diamagnetic susceptibility chi-, stored as a non-negative magnitude'),
}
# Written only when the workflow computes them.
OPTIONAL_OUTPUTS = ('field_noise', 'chimap_paramagnetic', 'chimap_diamagnetic')
BIDSIGNORE = '*_fieldmap.nii.gz\n*_fieldmap.json\n'


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


def generated_by(container=None):
    """``GeneratedBy`` of dataset_description.json."""
    entry = {'Name': 'qsmprep', 'Version': __version__}
    if container:
        entry['Container'] = container
    return [entry]


def derivative_path(output_dir, series_entities_prefix, subject, session, ending):
    """``output_dir/sub-<l>[/ses-<l>]/anat/<prefix>_<ending>.nii.gz``."""
    folder = Path(output_dir) / f'sub-{subject}'
    if session:
        folder = folder / f'ses-{session}'
    return folder / 'anat' / f'{series_entities_prefix}_{ending}.nii.gz'


def _sidecar_path(target):
    return Path(str(target).replace('.nii.gz', '.json'))


def _stage(name, source, reference, reference_file, target, dtype, sidecar):
    """Write the map ``source`` on ``reference``'s grid and its ``sidecar`` under temporary names
    beside ``target``; returns the (temporary, final) pairs for ``_put_in_place``."""
    image = nib.load(source)
    if not on_same_grid(image, reference, atol=1e-4):
        raise RuntimeError(f'{name} is not on the input grid of {reference_file}')
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary, temporary_sidecar = temporary_path(target), temporary_path(_sidecar_path(target))
    save_like(np.asanyarray(image.dataobj), reference, temporary, dtype)
    temporary_sidecar.write_text(json.dumps(sidecar, indent=2) + '\n')
    return [(temporary, target), (temporary_sidecar, _sidecar_path(target))]


def _put_in_place(staged, stale=()):
    """Rename the staged files into place and remove the ``stale`` ones, uninterrupted; returns
    the maps written."""
    with signals_deferred():
        for temporary, target in staged:
            os.replace(temporary, target)
        for path in stale:
            path.unlink(missing_ok=True)
    return [str(target) for _, target in staged if str(target).endswith('.nii.gz')]


class _SinkInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    prefix = traits.Str(mandatory=True, desc='BIDS entities of the series, e.g. sub-01_run-1')
    subject = traits.Str(mandatory=True)
    session = traits.Str('', usedefault=True)
    reference_file = File(exists=True, mandatory=True, desc='an input image; outputs must share its grid')
    metadata = traits.Dict(mandatory=True, desc='sidecar keys common to every output')
    parameters = traits.Dict(mandatory=True, desc='per output key: extra sidecar keys')
    chimap_parameters = traits.Dict(desc='sidecar keys the inversion chose for this series (its weight)')
    chimap = File(exists=True, mandatory=True)
    r2starmap = File(exists=True, mandatory=True)
    t2starmap = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    localfield_mask = File(exists=True, mandatory=True)
    total_field = File(exists=True, mandatory=True)
    local_field = File(exists=True, mandatory=True)
    field_noise = File(exists=True)
    chimap_paramagnetic = File(exists=True)
    chimap_diamagnetic = File(exists=True)


class _SinkOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))


class DerivativesSink(SimpleInterface):
    """Write every derivative of one series with its sidecar."""
    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.reference_file)
        staged, stale = [], []
        for key, (ending, units, description) in OUTPUTS.items():
            target = derivative_path(self.inputs.output_dir, self.inputs.prefix, self.inputs.subject,
                                     self.inputs.session, ending)
            if key in OPTIONAL_OUTPUTS and not isdefined(getattr(self.inputs, key)):
                stale += [target, _sidecar_path(target)]
                continue
            sidecar = {'Units': units, 'Description': description, **self.inputs.metadata,
                       **self.inputs.parameters.get(key, {})}
            if key == 'chimap' and isdefined(self.inputs.chimap_parameters):
                sidecar.update(self.inputs.chimap_parameters)
            staged += _stage(key, getattr(self.inputs, key), reference, self.inputs.reference_file, target,
                             np.uint8 if key.endswith('_mask') else np.float32, sidecar)
        self._results['out_files'] = _put_in_place(staged, stale)
        return runtime


class _OrientationsSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    prefix = traits.Str(mandatory=True, desc='BIDS entities of the head without run, e.g. sub-01_ses-1')
    subject = traits.Str(mandatory=True)
    session = traits.Str('', usedefault=True)
    runs = traits.List(traits.Str, mandatory=True, desc='run labels, the reference first')
    reference_file = File(exists=True, mandatory=True, desc='an input image of the reference run')
    metadata = traits.Dict(mandatory=True, desc='sidecar keys of the combined maps')
    chimap = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    chimap_parameters = traits.Dict()
    transforms = traits.List(File(exists=True), mandatory=True, desc='one per run after the first')
    b0_dirs = traits.List(traits.List(traits.Float), mandatory=True)
    registration = traits.List(traits.Dict, mandatory=True)
    sti_tensor = File(exists=True, desc='6 volumes')
    mms = File(exists=True)
    msa = File(exists=True)
    pev = File(exists=True, desc='3 volumes')
    sti_parameters = traits.Dict()
    learned_method = traits.Str(desc='a learned inversion run on every orientation at once, e.g. lpcnn')
    learned_chimap = File(exists=True)
    learned_parameters = traits.Dict()


# Tensor maps: output key, file name ending, what the map is.
STI_OUTPUTS = (
    ('sti_tensor', 'desc-sti_Chimap', 'susceptibility tensor, 6 volumes chi11, chi12, chi13, chi22, chi23, chi33 '
                                      'in the voxel axes'),
    ('mms', 'desc-mms_Chimap', 'mean magnetic susceptibility (l1 + l2 + l3) / 3'),
    ('msa', 'desc-msa_Chimap', 'magnetic susceptibility anisotropy l1 - (l2 + l3) / 2'),
    ('pev', 'desc-pev_Chimap', 'principal eigenvector of the tensor, 3 volumes (x, y, z in the voxel axes; sign '
                               'arbitrary)'),
)


class OrientationsSink(SimpleInterface):
    """Write the maps of a head combined over its orientations, on the reference run's grid, and
    each run's transform to the reference (all renamed into place together)."""
    input_spec = _OrientationsSinkInputSpec
    output_spec = _SinkOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.reference_file)
        runs = self.inputs.runs
        common = {**self.inputs.metadata, 'Runs': runs,
                  'B0Directions': [[round(v, 6) for v in b0_dir] for b0_dir in self.inputs.b0_dirs],
                  'Registration': {f'run-{run}': details for run, details in zip(runs[1:], self.inputs.registration)}}
        staged = []
        maps = [('desc-cosmos_Chimap', self.inputs.chimap, np.float32,
                 {'Units': 'ppm', 'Description': 'magnetic susceptibility from every orientation (COSMOS)',
                  'EstimationAlgorithm': 'COSMOS: masked least squares over the orientations with a gradient '
                                         'penalty, conjugate gradients',
                  **(self.inputs.chimap_parameters if isdefined(self.inputs.chimap_parameters) else {})}),
                ('desc-brain_mask', self.inputs.brain_mask, np.uint8,
                 {'Units': 'arbitrary', 'Type': 'Brain',
                  'Description': 'voxels where the local field of every orientation is valid',
                  'EstimationAlgorithm': "intersection of the runs' local-field masks on the first run's grid"})]
        sti_parameters = self.inputs.sti_parameters if isdefined(self.inputs.sti_parameters) else {}
        maps += [(ending, getattr(self.inputs, key), np.float32,
                  {'Units': 'arbitrary' if key == 'pev' else 'ppm', 'Description': description, **sti_parameters})
                 for key, ending, description in STI_OUTPUTS if isdefined(getattr(self.inputs, key))]
        if isdefined(self.inputs.learned_chimap):
            method = self.inputs.learned_method
            maps.append((f'desc-{method}_Chimap', self.inputs.learned_chimap, np.float32,
                         {'Units': 'ppm', 'Description': 'magnetic susceptibility from every orientation at once',
                          'EstimationAlgorithm': INVERSIONS[method].estimation_algorithm,
                          **self.inputs.learned_parameters}))
        for ending, source, dtype, sidecar in maps:
            target = derivative_path(self.inputs.output_dir, self.inputs.prefix, self.inputs.subject,
                                     self.inputs.session, ending)
            staged += _stage(ending, source, reference, self.inputs.reference_file, target, dtype,
                             {**common, **sidecar})
        for run, transform in zip(runs[1:], self.inputs.transforms):
            name = f'{self.inputs.prefix}_run-{run}_from-run{run}_to-run{runs[0]}_mode-image_xfm.txt'
            target = derivative_path(self.inputs.output_dir, self.inputs.prefix, self.inputs.subject,
                                     self.inputs.session, 'x').with_name(name)
            temporary = temporary_path(target)
            temporary.write_bytes(Path(transform).read_bytes())
            staged.append((temporary, target))
        self._results['out_files'] = _put_in_place(staged)
        return runtime
