"""Brain mask from multi-echo magnitude, robust to the noise floor and to smooth intensity bias.

The head is told from the background by the noise floor: Otsu's threshold on the logarithm of
the (locally averaged) magnitude, where the background's noise (whatever its level) and the
tissue form two separate modes. Inside the head only, the magnitude is divided by a smooth
version of itself (normalised convolution), which flattens receive-coil bias without letting
the dark background pull the level down; Otsu's threshold on the log of that separates tissue
from the dark skull. An erosion with a ball of ``opening_mm`` cuts the thin bridges from brain
to scalp through the skull, the largest component is kept and dilated back within the tissue;
a closing with a ball of ``closing_mm`` seals narrow openings of dark regions inside the brain,
the holes are filled (in 3-D only: filling slice by slice would close the dark bone around the
brain stem), and every voxel deeper than ``DEEP_FILL_MM`` inside the brain's envelope is kept,
so that dark nuclei and ventricles open to the surface through a wide channel stay in.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
from scipy import ndimage

from .physics import DISTANCE_TOLERANCE_MM

BIAS_SMOOTHING_MM = 20.0
CLOSING_MM = 3.0
DEEP_FILL_MM = 10.0
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


def head_foreground(magnitude):
    """The head: voxels above the background's noise floor, holes filled, largest component.

    Otsu's threshold on log magnitude (zeros left out, as in masked or cropped data) separates
    the background's noise from tissue whatever the noise level, where on a linear scale a
    bright noise floor and a strong bias blur the two. The magnitude is first averaged over
    3 x 3 x 3 voxels: a Rician background spans a decade on a log scale, and averaging narrows
    it so that its mode stays apart from the tissue's even at an SNR of 5.
    """
    magnitude = np.asarray(magnitude, dtype=np.float32)
    positive = magnitude > 0
    if not positive.any():
        return positive
    averaged = ndimage.uniform_filter(magnitude, size=3)
    usable = positive & (averaged > 0)
    floor = np.exp(otsu_threshold(np.log(averaged[usable])))
    signal = usable & (averaged > floor)
    # A closing of two voxels joins tissue across single noisy voxels at the edge of the head.
    signal = ndimage.binary_closing(signal, iterations=2) | signal
    return filled_holes(_largest_component(signal))


def bias_corrected(magnitude, voxel_size, foreground=None):
    """Magnitude divided by its smooth local level over ``foreground`` (the head by default); 0 outside."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if foreground is None:
        foreground = head_foreground(magnitude)
    sigma = [BIAS_SMOOTHING_MM / d for d in voxel_size]
    level = gaussian_smoothed(magnitude * foreground, sigma)
    support = gaussian_smoothed(foreground, sigma)
    with np.errstate(divide='ignore', invalid='ignore'):
        level = np.where(support > 1e-3, level / support, 0.0)
    inside = foreground & (level > 0)
    return np.where(inside, magnitude / np.where(inside, level, 1.0), 0.0).astype(np.float32)


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


def filled_holes(mask):
    """``mask`` with its holes filled (3-D, face connectivity), as ``ndimage.binary_fill_holes``.

    Done on the mask's box with a margin of one voxel, all background, so that every
    background region that reaches the image's edge still reaches the box's: the same result
    on a fraction of the volume.
    """
    mask = np.asarray(mask, dtype=bool)
    result = mask.copy()
    if mask.any():
        box = bounding_box(mask, margin=1)
        result[box] = ndimage.binary_fill_holes(mask[box])
    return result


def _largest_component(mask):
    """The largest connected component of ``mask``."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def brain_mask(magnitude, voxel_size, opening_mm=5.0, closing_mm=CLOSING_MM, threshold=None):
    """Boolean brain mask from a magnitude image (combine echoes before calling).

    ``threshold`` overrides Otsu's on the bias-corrected magnitude (which is near 1 in tissue).
    """
    head = head_foreground(magnitude)
    corrected = bias_corrected(magnitude, voxel_size, head)
    if threshold is None:
        # On a log scale the dark skull's small class and the brain's large one weigh alike: on
        # a linear scale Otsu splits the brain itself, and under strong bias drops its dark core.
        inside = corrected[head & (corrected > 0)]
        threshold = np.exp(otsu_threshold(np.log(inside)))
    tissue = corrected > threshold
    core = eroded(tissue, opening_mm, voxel_size)
    if not core.any():
        core = tissue
    core = _largest_component(core)
    mask = _largest_component(dilated(core, opening_mm, voxel_size) & tissue)
    mask = filled_holes(closed(mask, closing_mm, voxel_size) & head)
    # Dark regions deep inside the brain (iron-rich nuclei, ventricles of dark CSF) that reach its
    # surface through a narrow channel are not holes: every voxel deeper than ``DEEP_FILL_MM``
    # inside the brain's envelope (closed by that much) is brain.
    envelope = filled_holes(closed(mask, DEEP_FILL_MM, voxel_size))
    return filled_holes(mask | eroded(envelope, DEEP_FILL_MM, voxel_size))


# An adult brain with the fluid around it holds about 1.1-1.8 litres; outside these bounds a
# mask has most likely lost part of the brain or taken in the scalp or the neck.
PLAUSIBLE_BRAIN_ML = (700.0, 2500.0)


def implausibilities(mask, voxel_size):
    """Reasons, in words, to doubt a brain mask: its volume and the faces of the grid it touches."""
    mask = np.asarray(mask, dtype=bool)
    volume_ml = mask.sum() * float(np.prod(voxel_size)) / 1000.0
    reasons = []
    low, high = PLAUSIBLE_BRAIN_ML
    if volume_ml < low:
        reasons.append(f'it holds {volume_ml:.0f} mL, less than the {low:.0f} mL of a whole adult brain '
                       '(part of the brain lost, or a partial field of view)')
    elif volume_ml > high:
        reasons.append(f'it holds {volume_ml:.0f} mL, more than the {high:.0f} mL of an adult brain '
                       '(scalp, face or neck taken in)')
    faces = []
    for axis in range(3):
        for side, index in (('first', 0), ('last', -1)):
            if np.take(mask, index, axis=axis).any():
                faces.append(f'{side} slice of axis {axis}')
    if faces:
        reasons.append('it touches the edge of the volume (' + ', '.join(faces) + '): the field of view may '
                       'cut the brain, and background removal is unreliable next to that edge')
    return reasons


def closed(mask, radius_mm, voxel_size):
    """Morphological closing by a ball of ``radius_mm`` (dilation, then erosion)."""
    if radius_mm <= 0:
        return np.asarray(mask, dtype=bool)
    return eroded(dilated(mask, radius_mm, voxel_size), radius_mm, voxel_size)


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


def margin_in_voxels(voxel_size, margin_mm):
    """Whole voxels per axis that span ``margin_mm`` (a voxel size read from a float32 affine may
    be a hair under its true value: ``DISTANCE_TOLERANCE_MM``)."""
    return [int(np.ceil((margin_mm - DISTANCE_TOLERANCE_MM) / d)) for d in voxel_size]


def mask_box(mask, voxel_size, margin_mm, min_voxels=0):
    """Slices of the mask's bounding box with ``margin_mm`` of room on every side, and at least
    ``min_voxels`` (whole voxels, within the array): where the solvers work, since a whole head
    grid is several times larger than the brain's box."""
    margin = [max(voxels, min_voxels) for voxels in margin_in_voxels(voxel_size, margin_mm)]
    return bounding_box(mask, margin=margin)


def masked_median(volume, mask, size=3, threads=1):
    """Median over a ``size``-voxel cube of the voxels inside ``mask`` (outside voxels do not vote).

    ``threads`` filter slabs of the volume side by side (the filter releases the GIL).
    """
    box = bounding_box(mask)
    inside = mask[box]
    # Outside voxels become +inf or -inf alternately so that they cancel in the median.
    fill = np.where(np.indices(inside.shape).sum(axis=0) % 2 == 0, np.inf, -np.inf).astype(np.float32)
    values = np.where(inside, volume[box], fill)
    result = np.zeros_like(volume)
    result[box] = np.where(inside, _median_filter(values, size, threads), 0.0)
    return result


def _median_filter(values, size, threads):
    """``ndimage.median_filter`` (edges: nearest) computed in slabs along the first axis.

    Each slab is read with ``size // 2`` extra planes on either side, so the result is the
    same as one filter over the whole volume.
    """
    length = values.shape[0]
    reach = size // 2
    if threads <= 1 or length < 2 * size:
        return ndimage.median_filter(values, size=size, mode='nearest')
    bounds = np.linspace(0, length, threads + 1).astype(int)
    result = np.empty_like(values)

    def filter_slab(index):
        low, high = bounds[index], bounds[index + 1]
        start, stop = max(low - reach, 0), min(high + reach, length)
        filtered = ndimage.median_filter(values[start:stop], size=size, mode='nearest')
        result[low:high] = filtered[low - start:high - start]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(filter_slab, range(threads)))
    return result
