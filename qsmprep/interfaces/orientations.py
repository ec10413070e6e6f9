"""Nipype interfaces for several head orientations of one head: registration onto the reference
run, and COSMOS and the susceptibility tensor on the reference grid."""
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, InputMultiObject, TraitedSpec, traits

from ..files import write_itk_transform
from ..methods import STI_METHODS, susceptibility_tensor
from ..nifti import save_like
from ..science import orientations, registration
from ..science.physics import voxel_size_from_affine
from .qsm import ThreadedInputSpec, ThreadedInterface


def _first_volume(path):
    """The data (the first echo of a 4-D magnitude) and the image."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    return (data[..., 0] if data.ndim == 4 else data), image


class _RegisterInputSpec(ThreadedInputSpec):
    magnitudes = InputMultiObject(File(exists=True), mandatory=True, desc='one per run, the reference first (4-D)')
    brain_masks = InputMultiObject(File(exists=True), mandatory=True, desc='one per run')
    local_fields = InputMultiObject(File(exists=True), mandatory=True, desc='ppm, one per run')
    localfield_masks = InputMultiObject(File(exists=True), mandatory=True, desc='one per run')
    b0_dirs = traits.List(traits.List(traits.Float, minlen=3, maxlen=3), mandatory=True,
                          desc='B0 direction of each run in its own voxel axes')


class _RegisterOutputSpec(TraitedSpec):
    transforms = traits.List(File(exists=True), desc='ITK text, reference to run, one per run after the first')
    local_fields = traits.List(File(exists=True), desc='every run on the reference grid, the reference first')
    localfield_masks = traits.List(File(exists=True), desc='the same for the masks')
    b0_dirs = traits.List(traits.List(traits.Float), desc='B0 of each run in the reference voxel axes')
    registration = traits.List(traits.Dict, desc='per run after the first: angle, shift and final metric')


class RegisterOrientations(ThreadedInterface):
    """Register each run's first-echo magnitude onto the reference run's, resample its local
    field (linear) and mask (nearest neighbour) onto the reference grid, and rotate its B0."""
    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _compute(self):
        reference, reference_image = _first_volume(self.inputs.magnitudes[0])
        reference_mask = np.asanyarray(nib.load(self.inputs.brain_masks[0]).dataobj) > 0
        local_fields, masks = [self.inputs.local_fields[0]], [self.inputs.localfield_masks[0]]
        b0_dirs, transforms, details = [list(self.inputs.b0_dirs[0])], [], []
        for index in range(1, len(self.inputs.magnitudes)):
            moving, moving_image = _first_volume(self.inputs.magnitudes[index])
            moving_mask = np.asanyarray(nib.load(self.inputs.brain_masks[index]).dataobj) > 0
            transform = registration.register_rigid(moving, moving_image.affine, reference, reference_image.affine,
                                                    reference_mask=reference_mask, moving_mask=moving_mask,
                                                    num_threads=self.inputs.num_threads)
            transforms.append(os.path.abspath(f'transform_{index}.txt'))
            write_itk_transform(transform.matrix, transforms[-1])
            for source, order, name, collected, dtype in (
                    (self.inputs.local_fields[index], 1, 'local_field', local_fields, np.float32),
                    (self.inputs.localfield_masks[index], 0, 'mask', masks, np.uint8)):
                image = nib.load(source)
                resampled = registration.resample(np.asanyarray(image.dataobj), image.affine, reference_image.affine,
                                                  reference.shape, transform, order=order)
                collected.append(save_like(resampled, reference_image.slicer[..., 0] if reference_image.ndim == 4
                                           else reference_image, os.path.abspath(f'{name}_{index}.nii'), dtype))
            # The run's B0, from its voxel axes to the world of its session, then into the reference.
            axes = moving_image.affine[:3, :3] / voxel_size_from_affine(moving_image.affine)
            b0_world = axes @ np.asarray(self.inputs.b0_dirs[index], dtype=float)
            b0_dirs.append([float(v) for v in registration.b0_direction_in_reference(transform, reference_image.affine,
                                                                                      b0_world)])
            details.append({'RotationDegrees': round(transform.angle_deg, 3),
                            'TranslationMM': [round(float(v), 3) for v in transform.translation],
                            'MattesMutualInformation': round(transform.cost, 5)})
        self._results.update(transforms=transforms, local_fields=local_fields, localfield_masks=masks,
                             b0_dirs=b0_dirs, registration=details)


class _CosmosInputSpec(ThreadedInputSpec):
    local_fields = InputMultiObject(File(exists=True), mandatory=True, desc='ppm, all on the reference grid')
    masks = InputMultiObject(File(exists=True), mandatory=True, desc='where each field is valid')
    b0_dirs = traits.List(traits.List(traits.Float, minlen=3, maxlen=3), mandatory=True,
                          desc='B0 of each field in the reference voxel axes')


class _CosmosOutputSpec(TraitedSpec):
    chi = File(exists=True, desc='ppm, referenced to the mean over mask')
    mask = File(exists=True, desc='voxels where every orientation has a field')
    parameters = traits.Dict(desc='sidecar keys')


def _combined_fields(local_fields, masks):
    """The fields (N, *shape), the voxels where all are valid, and the reference image."""
    reference = nib.load(local_fields[0])
    fields = np.stack([np.asanyarray(nib.load(path).dataobj).astype(np.float32) for path in local_fields])
    mask = np.logical_and.reduce([np.asanyarray(nib.load(path).dataobj) > 0 for path in masks])
    if not mask.any():
        raise ValueError('the local-field masks of the orientations do not overlap; check the registration')
    return fields, mask, reference


class Cosmos(ThreadedInterface):
    """COSMOS over the voxels where every orientation's local field is valid."""
    input_spec = _CosmosInputSpec
    output_spec = _CosmosOutputSpec

    def _compute(self):
        fields, mask, reference = _combined_fields(self.inputs.local_fields, self.inputs.masks)
        chi = orientations.cosmos(fields * mask, mask, voxel_size_from_affine(reference.affine), self.inputs.b0_dirs)
        self._results['chi'] = save_like(chi, reference, os.path.abspath('chi.nii'))
        self._results['mask'] = save_like(mask, reference, os.path.abspath('mask.nii'), np.uint8)
        self._results['parameters'] = {'GradientWeight': orientations.COSMOS_GRADIENT_WEIGHT,
                                       'Orientations': len(fields)}


class _StiOutputSpec(TraitedSpec):
    tensor = File(exists=True, desc='6 volumes: chi11, chi12, chi13, chi22, chi23, chi33 (ppm)')
    mms = File(exists=True, desc='mean magnetic susceptibility (ppm)')
    msa = File(exists=True, desc='magnetic susceptibility anisotropy (ppm)')
    pev = File(exists=True, desc='principal eigenvector, 3 volumes')
    parameters = traits.Dict(desc='sidecar keys')


class _StiInputSpec(_CosmosInputSpec):
    method = traits.Enum(*STI_METHODS, usedefault=True, desc='a registered STI method (methods.STI_METHODS)')


class Sti(ThreadedInterface):
    """The susceptibility tensor by a registered STI method and its eigen-decomposition maps, over
    the voxels where every orientation's local field is valid."""
    input_spec = _StiInputSpec
    output_spec = _StiOutputSpec

    def _compute(self):
        fields, mask, reference = _combined_fields(self.inputs.local_fields, self.inputs.masks)
        tensor, self._results['parameters'] = susceptibility_tensor(
            self.inputs.method, fields * mask, mask, voxel_size_from_affine(reference.affine), self.inputs.b0_dirs,
            threads=self.inputs.num_threads)
        mms, msa, pev = orientations.tensor_maps(tensor, mask)
        for key, volumes in (('tensor', tensor), ('mms', mms), ('msa', msa), ('pev', pev)):
            data = np.moveaxis(volumes, 0, -1) if volumes.ndim == 4 else volumes  # NIfTI: volumes last
            self._results[key] = save_like(data, reference, os.path.abspath(f'{key}.nii'))
