"""Spatial normalisation to a template and regional statistics in native space.

A subject's first-echo magnitude, brought to the template's voxel size (smoothed, then sampled)
and corrected for the receive coil's bias by N4 (Tustison et al. 2010), is registered to a
template's T1-weighted image (SimpleITK: rigid, then affine, by Mattes mutual information, which
needs no common contrast), and a labelled atlas of the template is brought back to the subject's
grid, each voxel taking the label that covers most of it: the statistics are taken on the
unresampled maps.
"""
import numpy as np
from scipy import ndimage

from . import masking, registration
from .physics import voxel_size_from_affine

ITERATIONS = 200
# N4 estimates the smooth bias on a grid of about this spacing (it varies over centimetres).
BIAS_GRID_MM = 4.0
# The metric looks at the template's brain and a margin of its surroundings (the skull's edge).
TEMPLATE_MASK_DILATION_MM = 8.0


def _optimised(fixed, moving, initial, fixed_mask, num_threads):
    """``initial`` (an ITK transform) optimised by Mattes mutual information over ``fixed_mask``, coarse to fine."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(num_threads)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=registration.HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(registration.SAMPLING_FRACTION, registration.RANDOM_SEED)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=ITERATIONS,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(registration.SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(registration.SMOOTHING_SIGMAS))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    return sitk.CompositeTransform(method.Execute(fixed, moving)).GetNthTransform(0)


def resampled_at_step(volume, step):
    """``volume`` sampled (linearly) every ``step`` voxels (one number or one per axis) from its
    first voxel on, so that the affine of the result is the volume's times ``diag(step)``.
    ``ndimage.zoom`` instead stretches the samples to span both end voxels, which puts structures
    up to 1 % of the grid off the coordinates the affine gives them."""
    step = np.broadcast_to(np.asarray(step, dtype=float), (3,))
    shape = tuple(int(np.floor((size - 1) / s + 1e-9)) + 1 for size, s in zip(volume.shape, step))
    return ndimage.affine_transform(volume, step, output_shape=shape, order=1)


def at_voxel_size(volume, affine, voxel_size_mm):
    """``volume`` smoothed and sampled every ``voxel_size_mm`` mm along its own axes (never finer
    than it is), and the affine of the result.

    Mutual information sampled on a coarse template from a finer image sees its noise and
    interpolation pattern: magnitudes of 1.5 mm registered to a 2 mm template directly landed
    1.1-1.8 mm off, 0.1-0.5 mm once brought to 2 mm (benchmarks/NOTES.md).
    """
    step = np.maximum(voxel_size_mm / voxel_size_from_affine(affine), 1.0)
    if np.allclose(step, 1.0):
        return np.asarray(volume, dtype=np.float32), affine
    smoothed = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), (step - 1.0) / 2.0)
    return resampled_at_step(smoothed, step), affine @ np.diag([*step, 1.0])


def bias_field_corrected(magnitude, affine, head_mask):
    """``magnitude`` divided by the bias field that N4 fits inside ``head_mask``, fitted on a coarser
    grid (``BIAS_GRID_MM``) and evaluated on the full one."""
    import SimpleITK as sitk

    image = registration.sitk_image(magnitude, affine)
    mask = sitk.Cast(registration.sitk_image(head_mask, affine), sitk.sitkUInt8)
    shrink = [max(1, int(round(BIAS_GRID_MM / size))) for size in voxel_size_from_affine(affine)]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50, 50, 30])
    corrector.Execute(sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink))
    log_bias = registration.sitk_array(corrector.GetLogBiasFieldAsImage(image))
    return np.where(head_mask, magnitude / np.exp(log_bias), 0).astype(np.float32)


def register_to_template(moving, moving_affine, moving_mask, template, template_affine, template_mask, num_threads=1):
    """4x4 world matrix (RAS mm) mapping a template point to the subject point that matches it.

    The magnitude is brought to the template's voxel size (``at_voxel_size``) and corrected for
    coil bias (``bias_field_corrected``), and the metric looks at the template's brain and
    ``TEMPLATE_MASK_DILATION_MM`` around it; the search starts with the
    brains' centres matched and no turn (heads lie near the scanner's axes, as templates do), then
    optimises a rigid and then an affine transform.
    """
    import SimpleITK as sitk

    fixed = registration.sitk_image(np.where(template_mask, template, 0), template_affine)
    template_voxel_size = voxel_size_from_affine(template_affine).min()
    moving_mask = at_voxel_size(moving_mask, moving_affine, template_voxel_size)[0] > 0.5
    moving, moving_affine = at_voxel_size(moving, moving_affine, template_voxel_size)
    moving = bias_field_corrected(moving, moving_affine, masking.head_foreground(moving))
    moving_image = registration.sitk_image(moving, moving_affine)
    around = masking.dilated(template_mask, TEMPLATE_MASK_DILATION_MM, voxel_size_from_affine(template_affine))
    fixed_mask = sitk.Cast(registration.sitk_image(around, template_affine), sitk.sitkUInt8)
    centre = registration.world_points(template_mask, template_affine).mean(axis=1)
    moving_centre = registration.world_points(moving_mask, moving_affine).mean(axis=1)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(centre.tolist())
    rigid.SetTranslation((moving_centre - centre).tolist())
    rigid = sitk.Euler3DTransform(_optimised(fixed, moving_image, rigid, fixed_mask, num_threads))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine = sitk.AffineTransform(_optimised(fixed, moving_image, affine, fixed_mask, num_threads))
    linear = np.asarray(affine.GetMatrix()).reshape(3, 3)
    centre, shift = np.asarray(affine.GetCenter()), np.asarray(affine.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = linear, centre + shift - linear @ centre
    return matrix


def labels_in_native(atlas, atlas_affine, template_to_native, native_affine, native_shape):
    """The atlas's labels on the native grid: each native voxel takes the label that covers most of
    it, by a vote of the atlas labels at ``k`` points along each of its axes, spread evenly over the
    voxel and mapped to the template by the inverse of ``template_to_native`` (4x4 world matrix).

    ``k`` is odd, so the voxel's centre votes, and gives at least two points per atlas voxel: a
    single nearest neighbour per native voxel lets regions of 10 to 50 native voxels gain or lose
    a fifth of their voxels to where the grids happen to fall (benchmarks/NOTES.md). Ties go to
    the lower label, background first. Only voxels next to one whose centre is labelled can be.
    """
    atlas = np.asarray(atlas)
    native_to_atlas_voxels = np.linalg.inv(atlas_affine) @ np.linalg.inv(template_to_native) @ native_affine

    def labels_at(ijk):
        coordinates = native_to_atlas_voxels[:3, :3] @ ijk + native_to_atlas_voxels[:3, 3:]
        return ndimage.map_coordinates(atlas, coordinates, order=0, mode='constant', cval=0).astype(np.int32)

    centres = labels_at(np.indices(native_shape, dtype=np.float32).reshape(3, -1)).reshape(native_shape)
    ratio = voxel_size_from_affine(native_affine) / voxel_size_from_affine(atlas_affine).min()
    points = [2 * int(np.ceil(r - 1e-6)) + 1 for r in ratio]
    candidates = np.argwhere(ndimage.binary_dilation(centres > 0, np.ones((3, 3, 3), bool))).T.astype(np.float32)
    if candidates.size == 0:
        return centres
    offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in points]
    votes = np.stack([labels_at(candidates + np.array(shift, dtype=np.float32)[:, None])
                      for shift in np.stack(np.meshgrid(*offsets, indexing='ij'), -1).reshape(-1, 3)])
    present = np.unique(votes)
    counts = np.stack([(votes == label).sum(axis=0) for label in present])
    labels = np.zeros(native_shape, dtype=np.int32)
    labels[tuple(candidates.astype(int))] = present[np.argmax(counts, axis=0)]
    return labels


def region_statistics(labels, names, maps, valid):
    """Per label of ``names`` (label -> name): voxels inside ``valid``, and the mean and median of
    each of ``maps`` (name -> array) over them; regions with no valid voxel get NaN."""
    rows = []
    for label, name in names.items():
        inside = (labels == label) & valid
        row = {'region': name, 'voxels': int(inside.sum())}
        for key, volume in maps.items():
            values = volume[inside]
            row[f'{key}_mean'] = float(values.mean()) if values.size else float('nan')
            row[f'{key}_median'] = float(np.median(values)) if values.size else float('nan')
        rows.append(row)
    return rows
