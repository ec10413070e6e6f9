"""Writing a series' derivatives into the output dataset, all at once or not at all.

Names come from one table of BIDS patterns (``OUTPUTS``) and the series' entities; every map
is checked to be on the input grid, written under a temporary name and renamed only when all
of the series' files are ready, so an interrupted run leaves no half-written map behind.
"""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..nifti import on_same_grid, save_like

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


def derivative_path(output_dir, series_entities_prefix, subject, session, ending):
    """``output_dir/sub-<l>[/ses-<l>]/anat/<prefix>_<ending>.nii.gz``."""
    folder = Path(output_dir) / f'sub-{subject}'
    if session:
        folder = folder / f'ses-{session}'
    return folder / 'anat' / f'{series_entities_prefix}_{ending}.nii.gz'


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
        staged = []
        for key, (ending, units, description) in OUTPUTS.items():
            if key in OPTIONAL_OUTPUTS and not isdefined(getattr(self.inputs, key)):
                continue
            image = nib.load(getattr(self.inputs, key))
            if not on_same_grid(image, reference, atol=1e-4):
                raise RuntimeError(f'{key} is not on the input grid of {self.inputs.reference_file}')
            target = derivative_path(self.inputs.output_dir, self.inputs.prefix, self.inputs.subject,
                                     self.inputs.session, ending)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name('.' + target.name)
            save_like(np.asanyarray(image.dataobj), reference, temporary,
                      np.uint8 if key.endswith('_mask') else np.float32)
            sidecar = {'Units': units, 'Description': description, **self.inputs.metadata,
                       **self.inputs.parameters.get(key, {})}
            if key == 'chimap' and isdefined(self.inputs.chimap_parameters):
                sidecar.update(self.inputs.chimap_parameters)
            sidecar_path = Path(str(target).replace('.nii.gz', '.json'))
            temporary_sidecar = sidecar_path.with_name('.' + sidecar_path.name)
            temporary_sidecar.write_text(json.dumps(sidecar, indent=2) + '\n')
            staged += [(temporary, target), (temporary_sidecar, sidecar_path)]
        for temporary, target in staged:
            os.replace(temporary, target)
        self._results['out_files'] = [str(target) for _, target in staged if str(target).endswith('.nii.gz')]
        return runtime
