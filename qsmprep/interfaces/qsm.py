"""Thin Nipype interfaces around qsmprep.science: load NIfTI, call one function, save NIfTI.

Every output is written on the grid and affine of the input, uncompressed (gzip took longer
than most stages at 1 mm). Thread counts reach the FFTs through ``scipy.fft.set_workers``.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import scipy.fft
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface,
                                    TraitedSpec, isdefined, traits)

from .. import methods
from ..files import stage_progress_writer
from ..methods import INVERSIONS
from ..nifti import save_like
from ..science import bgremove, chisep, echofit, masking, unwrap
from ..science.physics import voxel_size_from_affine

LOGGER = logging.getLogger('nipype.interface')


def _load(path, dtype=np.float32):
    image = nib.load(path)
    return np.asanyarray(image.dataobj).astype(dtype, copy=False), image


def _save(array, reference, filename, dtype=np.float32):
    return save_like(array, reference, os.path.abspath(filename), dtype)


def _weighting_magnitude(path):
    """The magnitude used as a data weight (echoes combined when 4-D), or None without a file."""
    if not isdefined(path):
        return None
    magnitude = _load(path)[0]
    return masking.combined_magnitude(magnitude) if magnitude.ndim == 4 else magnitude


class ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, desc='threads for the FFTs')


class ThreadedInterface(SimpleInterface):
    """Runs ``_compute`` with the FFT worker count set from ``num_threads``."""

    def _run_interface(self, runtime):
        with scipy.fft.set_workers(max(1, self.inputs.num_threads)):
            self._compute()
        return runtime


class _LoadMEGREInputSpec(ThreadedInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), mandatory=True, desc='one 3-D file per echo')
    phase_files = InputMultiObject(File(exists=True), mandatory=True, desc='one 3-D file per echo')
    phase_range = traits.Either(None, traits.Tuple(traits.Float, traits.Float), usedefault=True,
                                desc='stored range mapped onto [-pi, pi); None when in radians')
    phase_sign = traits.Enum(1, -1, usedefault=True, desc='-1 flips the phase (scanner convention)')


class _LoadMEGREOutputSpec(TraitedSpec):
    magnitude = File(exists=True, desc='4-D magnitude, echoes last')
    phase = File(exists=True, desc='4-D phase in rad, echoes last')


class LoadMEGRE(SimpleInterface):
    """Stack the echoes, scale the phase to radians and apply the phase sign."""
    input_spec = _LoadMEGREInputSpec
    output_spec = _LoadMEGREOutputSpec

    def _run_interface(self, runtime):
        first = nib.load(self.inputs.magnitude_files[0])
        # Filled echo by echo in the (Fortran) order NIfTI stores, without a stacked copy.
        shape = first.shape[:3] + (len(self.inputs.magnitude_files),)
        magnitude = np.empty(shape, dtype=np.float32, order='F')
        phase = np.empty(shape, dtype=np.float32, order='F')

        def read_echo(echo):
            magnitude[..., echo] = np.asanyarray(nib.load(self.inputs.magnitude_files[echo]).dataobj)
            phase[..., echo] = self._phase_in_radians(np.asanyarray(nib.load(self.inputs.phase_files[echo]).dataobj))

        # Decompressing .nii.gz dominates and releases the GIL, so threads read echoes side by side.
        with ThreadPoolExecutor(max(1, self.inputs.num_threads)) as pool:
            list(pool.map(read_echo, range(shape[3])))
        self._results['magnitude'] = _save(magnitude, first, 'magnitude.nii')
        self._results['phase'] = _save(phase, first, 'phase.nii')
        return runtime

    def _phase_in_radians(self, stored_phase):
        """One echo's phase scaled to radians, with the phase sign applied, in [-pi, pi)."""
        phase = stored_phase.astype(np.float64)
        if self.inputs.phase_range is not None:
            low, high = self.inputs.phase_range
            phase = (phase - low) / (high - low) * 2 * np.pi - np.pi
        phase *= self.inputs.phase_sign
        # Wrapping costs seconds per echo at 1 mm; phase in radians is mostly in range already.
        outside = (phase < -np.pi) | (phase >= np.pi)
        phase[outside] = unwrap.wrap(phase[outside])
        return phase


class _R2starInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True, desc='seconds')
    mask = File(exists=True, desc='voxels outside are set to 0')


class _R2starOutputSpec(TraitedSpec):
    r2star = File(exists=True, desc='R2* in 1/s')
    t2star = File(exists=True, desc='T2* in s')
    s0 = File(exists=True, desc='signal at TE = 0')


class FitR2star(SimpleInterface):
    """Mono-exponential R2*, T2* and S0 from multi-echo magnitude."""
    input_spec = _R2starInputSpec
    output_spec = _R2starOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = _load(self.inputs.magnitude)
        mask = _load(self.inputs.mask, bool)[0] if isdefined(self.inputs.mask) else None
        r2star, t2star, s0 = echofit.fit_r2star(magnitude, self.inputs.echo_times, mask)
        for name, volume in (('r2star', r2star), ('t2star', t2star), ('s0', s0)):
            self._results[name] = _save(volume, image.slicer[..., 0], f'{name}.nii')
        return runtime


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc='3-D or 4-D (echoes last) magnitude')
    user_mask = File(exists=True, desc='a mask given by the user, used as it is')
    source = traits.Str(desc='the input file the magnitude came from, named in warnings')


class _BrainMaskOutputSpec(TraitedSpec):
    mask = File(exists=True)


class BrainMask(SimpleInterface):
    """Brain mask from the root-sum-of-squares magnitude, or the user's own mask."""
    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = _load(self.inputs.magnitude)
        reference = image.slicer[..., 0] if magnitude.ndim == 4 else image
        if isdefined(self.inputs.user_mask):
            mask = _load(self.inputs.user_mask)[0] > 0
        else:
            combined = masking.combined_magnitude(magnitude) if magnitude.ndim == 4 else magnitude
            mask = masking.brain_mask(combined, voxel_size_from_affine(image.affine))
            for reason in masking.implausibilities(mask, voxel_size_from_affine(image.affine)):
                source = self.inputs.source if isdefined(self.inputs.source) else self.inputs.magnitude
                LOGGER.warning('brain mask of %s: %s. Check it, or give your own with --mask.', source, reason)
        self._results['mask'] = _save(mask, reference, 'brain_mask.nii', np.uint8)
        return runtime


class _UnwrapInputSpec(ThreadedInputSpec):
    phase = File(exists=True, mandatory=True, desc='4-D wrapped phase (rad)')
    magnitude = File(exists=True, mandatory=True, desc='4-D magnitude')
    mask = File(exists=True, mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True, desc='seconds')
    method = traits.Enum(*unwrap.UNWRAP_METHODS, usedefault=True)


class _UnwrapOutputSpec(TraitedSpec):
    unwrapped_phase = File(exists=True, desc='4-D unwrapped phase (rad)')


class UnwrapPhase(ThreadedInterface):
    """Unwrap multi-echo phase consistently across echoes."""
    input_spec = _UnwrapInputSpec
    output_spec = _UnwrapOutputSpec

    def _compute(self):
        phase, image = _load(self.inputs.phase)
        magnitude = _load(self.inputs.magnitude)[0]
        mask = _load(self.inputs.mask, bool)[0]
        unwrapped = unwrap.unwrap_echoes(phase, magnitude, self.inputs.echo_times,
                                         voxel_size_from_affine(image.affine), mask, self.inputs.method)
        self._results['unwrapped_phase'] = _save(unwrapped, image, 'unwrapped_phase.nii')


class _TotalFieldInputSpec(ThreadedInputSpec):
    unwrapped_phase = File(exists=True, mandatory=True)
    magnitude = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True, desc='seconds')
    field_strength = traits.Float(mandatory=True, desc='tesla')


class _TotalFieldOutputSpec(TraitedSpec):
    total_field = File(exists=True, desc='ppm')
    reliable_mask = File(exists=True, desc='the mask without voxels a wrap away from their neighbours')
    field_noise = File(desc='standard deviation of the field (ppm) from the fit residual; 3 echoes or more')


class FitTotalField(SimpleInterface):
    """Total field (ppm) from the multi-echo phase: the complex fit from 3 echoes, else a line fit."""
    input_spec = _TotalFieldInputSpec
    output_spec = _TotalFieldOutputSpec

    def _run_interface(self, runtime):
        phase, image = _load(self.inputs.unwrapped_phase)
        magnitude = _load(self.inputs.magnitude)[0]
        mask = _load(self.inputs.mask, bool)[0]
        with_noise = len(self.inputs.echo_times) >= echofit.COMPLEX_FIT_MIN_ECHOES
        field_ppm, phase_offset, *noise = echofit.fit_total_field(
            phase, magnitude, self.inputs.echo_times, self.inputs.field_strength, mask, return_noise=with_noise)
        reliable = echofit.reliable_field_mask(field_ppm, phase_offset, mask, voxel_size_from_affine(image.affine),
                                               self.inputs.echo_times, self.inputs.field_strength,
                                               threads=max(1, self.inputs.num_threads))
        reference = image.slicer[..., 0]
        self._results['total_field'] = _save(field_ppm, reference, 'total_field.nii')
        self._results['reliable_mask'] = _save(reliable, reference, 'reliable_mask.nii', np.uint8)
        if noise:
            self._results['field_noise'] = _save(noise[0], reference, 'field_noise.nii')
        return runtime


class _BackgroundInputSpec(ThreadedInputSpec):
    total_field = File(exists=True, mandatory=True, desc='ppm')
    mask = File(exists=True, mandatory=True)
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc='in voxel axes')
    method = traits.Enum(*bgremove.BGREMOVE_METHODS, usedefault=True)


class _BackgroundOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc='ppm')
    mask = File(exists=True, desc='the mask on which the local field is valid')


class RemoveBackground(ThreadedInterface):
    """Background field removal."""
    input_spec = _BackgroundInputSpec
    output_spec = _BackgroundOutputSpec

    def _compute(self):
        total_field, image = _load(self.inputs.total_field)
        mask = _load(self.inputs.mask, bool)[0]
        local_field, valid = bgremove.remove_background(total_field, mask, voxel_size_from_affine(image.affine),
                                                        self.inputs.b0_dir, self.inputs.method)
        self._results['local_field'] = _save(local_field, image, 'local_field.nii')
        self._results['mask'] = _save(valid, image, 'local_field_mask.nii', np.uint8)


class _InvertInputSpec(ThreadedInputSpec):
    local_fields = InputMultiObject(File(exists=True), mandatory=True,
                                    desc='ppm, one per head orientation, all on the grid of the mask')
    mask = File(exists=True, mandatory=True)
    magnitude = File(exists=True, desc='magnitude weighting (4-D: combined over echoes)')
    b0_dirs = traits.List(traits.List(traits.Float, minlen=3, maxlen=3), mandatory=True,
                          desc='one B0 direction per local field, in the voxel axes of the mask')
    method = traits.Enum(*INVERSIONS, usedefault=True)
    echo_times = traits.List(traits.Float, desc='seconds; nltv expresses the field as phase at their mean')
    field_strength = traits.Float(desc='tesla; needed by nltv')


class _InvertOutputSpec(TraitedSpec):
    chi = File(exists=True, desc='susceptibility in ppm, referenced to the mask mean')
    parameters = traits.Dict(desc='what the method chose for this dataset (sidecar keys)')


class Invert(ThreadedInterface):
    """Dipole inversion of one or several orientations' local fields, referenced to the mean over
    the mask."""
    input_spec = _InvertInputSpec
    output_spec = _InvertOutputSpec

    def _compute(self):
        mask, image = _load(self.inputs.mask, bool)
        local_fields = [_load(path)[0] for path in self.inputs.local_fields]
        magnitude = None if INVERSIONS[self.inputs.method].learned else _weighting_magnitude(self.inputs.magnitude)
        echo_times, field_strength = (value if isdefined(value) else None
                                      for value in (self.inputs.echo_times, self.inputs.field_strength))
        chi, parameters = methods.invert(self.inputs.method, local_fields, mask,
                                         voxel_size_from_affine(image.affine), self.inputs.b0_dirs,
                                         magnitude=magnitude, echo_times=echo_times, field_strength=field_strength,
                                         threads=self.inputs.num_threads,
                                         progress=stage_progress_writer(os.getcwd()))
        self._results['chi'] = _save(chi, image, 'chi.nii')
        self._results['parameters'] = parameters


class _SeparateSourcesInputSpec(ThreadedInputSpec):
    local_field = File(exists=True, mandatory=True, desc='ppm')
    r2star = File(exists=True, mandatory=True, desc='1/s')
    mask = File(exists=True, mandatory=True, desc='where the local field is valid')
    magnitude = File(exists=True, desc='magnitude weighting (4-D: combined over echoes)')
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc='in voxel axes')
    field_strength = traits.Float(mandatory=True, desc='tesla')


class _SeparateSourcesOutputSpec(TraitedSpec):
    chi_paramagnetic = File(exists=True, desc='chi+ in ppm, >= 0')
    chi_diamagnetic = File(exists=True, desc='chi- in ppm, stored as a non-negative magnitude')


class SeparateSources(ThreadedInterface):
    """Chi-separation into paramagnetic and diamagnetic susceptibility from local field and R2'."""
    input_spec = _SeparateSourcesInputSpec
    output_spec = _SeparateSourcesOutputSpec

    def _compute(self):
        local_field, image = _load(self.inputs.local_field)
        mask = _load(self.inputs.mask, bool)[0]
        r2star = _load(self.inputs.r2star)[0]
        magnitude = _weighting_magnitude(self.inputs.magnitude)
        r2prime, _ = chisep.r2prime(r2star, mask=mask)
        chi_paramagnetic, chi_diamagnetic = chisep.chi_separation(
            local_field, r2prime, mask, voxel_size_from_affine(image.affine), self.inputs.b0_dir,
            self.inputs.field_strength, dr_hz_per_ppm=chisep.relaxometric_constant(self.inputs.field_strength),
            magnitude=magnitude)
        self._results['chi_paramagnetic'] = _save(chi_paramagnetic, image, 'chi_paramagnetic.nii')
        self._results['chi_diamagnetic'] = _save(chi_diamagnetic, image, 'chi_diamagnetic.nii')
