"""qsmprep's classical chain as the BIDS App runs it, stage by stage, on arrays in memory.

The benchmarks score each stage against the simulation's truth and need the stages' outputs
one by one; the workflow (``qsmprep.workflows.qsm``) calls the same science functions in the
same order with the same defaults, and the end-to-end benchmark runs the real command line.
"""
import time

from qsmprep.science import bgremove, echofit, inversion, masking, unwrap


def run_chain(magnitude, phase, echo_times, field_strength_t, voxel_size, b0_dir, bgremove_method='vsharp',
              inversion_method=inversion.DEFAULT_INVERSION):
    """Brain mask, total field, local field and chi (ppm, referenced) from multi-echo magnitude and
    phase (echoes last); returns a dict of the arrays and ``seconds`` per stage."""
    seconds = {}

    def timed(stage, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[stage] = time.perf_counter() - started
        return result

    combined = masking.combined_magnitude(magnitude)
    brain_mask = timed('brain_mask', masking.brain_mask, combined, voxel_size)
    unwrapped = timed('unwrap_phase', unwrap.unwrap_echoes, phase, magnitude, echo_times, voxel_size, brain_mask,
                      unwrap.DEFAULT_UNWRAP)
    started = time.perf_counter()
    total_field, phase_offset = echofit.fit_total_field(unwrapped, magnitude, echo_times, field_strength_t,
                                                        brain_mask)
    reliable = echofit.reliable_field_mask(total_field, phase_offset, brain_mask, voxel_size, echo_times,
                                           field_strength_t)
    seconds['fit_total_field'] = time.perf_counter() - started
    local_field, local_mask = timed('remove_background', bgremove.remove_background, total_field, reliable,
                                    voxel_size, b0_dir, bgremove_method)
    options = {}
    if inversion_method == 'nltv':
        options['phase_scale_rad_per_ppm'] = inversion.phase_scale_rad_per_ppm(echo_times, field_strength_t)
    chi, parameters = timed('invert', inversion.invert, local_field, local_mask, voxel_size, b0_dir,
                            method=inversion_method, magnitude=combined, **options)
    return {
        'brain_mask': brain_mask, 'total_field': total_field, 'local_field': local_field,
        'local_mask': local_mask, 'chi': inversion.reference_to_mask_mean(chi, local_mask),
        'parameters': parameters, 'seconds': seconds,
    }
