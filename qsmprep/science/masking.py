"""Brain mask from multi-echo magnitude, robust to smooth intensity bias.

The magnitude is divided by a smooth version of itself (normalised convolution over a rough
foreground), which flattens receive-coil bias; Otsu's threshold separates tissue from noise;
an erosion with a ball of ``opening_mm`` cuts the thin bridges from brain to scalp through the
dark skull, the largest component is kept, dilated back within the tissue and its holes are
filled (in 3-D only: filling slice by slice would close the dark bone around the brain stem).
"""
import numpy as np
import scipy.fft
from scipy import ndimage

from .physics import DISTANCE_TOLERANCE_MM

BIAS_SMOOTHING_MM = 20.0
# 'two-pass' also drops voxels whose phase is unreliable (echofit.reliable_field_mask) after the
# field fit; 'magnitude' keeps the magnitude mask alone.
MASKING_METHODS = ('two-pass', 'magnitude')


def otsu_threshold(values, bins=256):
    """Threshold maximising the between-class variance of ``values`` (1-D)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    with np.errstate(divide='ignore', invalid='ignore'):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return centres[np.nanargmax(between[:-1])]


def gaussian_smoothed(volume, sigma_voxels, truncate=4.0):
    """``ndimage.gaussian_filter(volume, sigma_voxels, mode='reflect', truncate=truncate)``, by FFTs.

    Along each axis (moved last, so that its lines are contiguous) the volume is mirrored by the
    kernel's radius and convolved periodically on a line long enough that nothing wraps: the
    same truncated kernel and boundary. A 20 mm Gaussian spans 161 voxels at 1 mm, where the
    direct convolution took a second per axis.
    """
    result = np.asarray(volume, dtype=np.float32)
    for axis, sigma in enumerate(sigma_voxels):
        radius = int(truncate * sigma + 0.5)
        if radius == 0:
            continue
        lines = np.moveaxis(result, axis, -1)
        n = lines.shape[-1]
        length = scipy.fft.next_fast_len(n + 2 * radius, real=True)
        offsets = np.arange(-radius, radius + 1)
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = np.zeros(length)
        kernel[offsets % length] = weights / weights.sum()
        # numpy's 'symmetric' padding is ndimage's 'reflect' boundary (d c b a | a b c d | d c b a);
        # what lies beyond n + radius is never reached by the kernel.
        padded = np.pad(lines, [(0, 0)] * (lines.ndim - 1) + [(radius, length - n - radius)], mode='symmetric')
        spectrum = scipy.fft.rfft(padded, axis=-1)
        spectrum *= scipy.fft.rfft(kernel).astype(np.complex64)
        smoothed = scipy.fft.irfft(spectrum, n=length, axis=-1, overwrite_x=True)
        result = np.moveaxis(smoothed[..., radius:radius + n], -1, axis)
    return np.ascontiguousarray(result)


def bias_corrected(magnitude, voxel_size):
    """Magnitude divided by its smooth local level over a rough foreground."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    rough_foreground = magnitude > 0.1 * np.percentile(magnitude, 99)
    sigma = [BIAS_SMOOTHING_MM / d for d in voxel_size]
    level = gaussian_smoothed(magnitude * rough_foreground, sigma)
    support = gaussian_smoothed(rough_foreground, sigma)
    with np.errstate(divide='ignore', invalid='ignore'):
        level = np.where(support > 1e-3, level / support, 0.0)
    return np.where(level > 0, magnitude / np.where(level > 0, level, 1.0), 0.0).astype(np.float32)


def eroded(mask, radius_mm, voxel_size):
    """Erosion by a ball of ``radius_mm``: the voxels farther than that from the background."""
    mask = np.asarray(mask, dtype=bool)
    result = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return result
    # The distance transform is the costly part; around the mask's box the background is one
    # voxel wide, and no background voxel beyond it is nearer to a voxel inside.
    box = bounding_box(mask, margin=1)
    result[box] = ndimage.distance_transform_edt(mask[box], sampling=voxel_size) > radius_mm + DISTANCE_TOLERANCE_MM
    return result


def dilated(mask, radius_mm, voxel_size):
    """Dilation by a ball of ``radius_mm``: the voxels within that distance of ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    result = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return result
    # Only voxels in the mask's box widened by the radius can lie within it.
    box = bounding_box(mask, margin=[int(np.ceil(radius_mm / d)) + 1 for d in voxel_size])
    result[box] = ndimage.distance_transform_edt(~mask[box], sampling=voxel_size) <= radius_mm + DISTANCE_TOLERANCE_MM
    return result


def _largest_component(mask):
    """The largest connected component of ``mask``."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def brain_mask(magnitude, voxel_size, opening_mm=5.0, threshold=None):
    """Boolean brain mask from a magnitude image (combine echoes before calling).

    ``threshold`` overrides Otsu's on the bias-corrected magnitude (which is near 1 in tissue).
    """
    corrected = bias_corrected(magnitude, voxel_size)
    if threshold is None:
        threshold = otsu_threshold(corrected[corrected > 0])
    tissue = corrected > threshold
    core = eroded(tissue, opening_mm, voxel_size)
    if not core.any():
        core = tissue
    core = _largest_component(core)
    mask = dilated(core, opening_mm, voxel_size) & tissue
    mask = _largest_component(mask)
    return ndimage.binary_fill_holes(mask)


def combined_magnitude(magnitude_echoes):
    """Root sum of squares over the echoes (last axis)."""
    return np.sqrt((np.asarray(magnitude_echoes, dtype=np.float32) ** 2).sum(axis=-1))


def bounding_box(mask, margin=1):
    """Slices of the smallest box holding ``mask``, ``margin`` voxels (one number or one per axis)
    wider on each side."""
    indices = np.argwhere(mask)
    low = np.maximum(indices.min(axis=0) - margin, 0)
    high = np.minimum(indices.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(lo, hi) for lo, hi in zip(low, high))


def masked_median(volume, mask, size=3):
    """Median over a ``size``-voxel cube of the voxels inside ``mask`` (outside voxels do not vote)."""
    box = bounding_box(mask)
    inside = mask[box]
    # Outside voxels become +inf or -inf alternately so that they cancel in the median.
    fill = np.where(np.indices(inside.shape).sum(axis=0) % 2 == 0, np.inf, -np.inf).astype(np.float32)
    values = np.where(inside, volume[box], fill)
    result = np.zeros_like(volume)
    result[box] = np.where(inside, ndimage.median_filter(values, size=size, mode='nearest'), 0.0)
    return result
