"""Rigid registration of one head orientation onto the reference, with SimpleITK.

Images are arrays in nibabel's voxel order with their affines (RAS+ millimetres); ITK works in
the same world frame here, so its transforms are in RAS. ``RigidTransform`` maps a point of the
reference's world to the moving run's world: the field of the moving run is resampled through
it onto the reference grid, and its B0 (world z of its own session) is rotated into the
reference's voxel axes.
"""
from dataclasses import dataclass

import numpy as np

from . import masking
from .physics import voxel_size_from_affine

# Coarse to fine: shrink factors and Gaussian smoothing (voxels) per level.
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS = (2.0, 1.0, 0.0)
SAMPLING_FRACTION = 0.25
RANDOM_SEED = 20261206  # the metric samples voxels at random: fixed, so that reruns agree
ITERATIONS = 200
HISTOGRAM_BINS = 50
# The metric looks at the brain and the skull and scalp around it: over the brain alone it loses
# the head's edge, its strongest feature (0.62 mm error against 0.12 mm, benchmarks/NOTES.md).
MASK_DILATION_MM = 12.0


@dataclass(frozen=True)
class RigidTransform:
    """x_moving = rotation @ x_reference + translation (world, mm); ``cost``: the final metric."""
    rotation: np.ndarray
    translation: np.ndarray
    cost: float = float('nan')

    @property
    def matrix(self):
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = self.rotation, self.translation
        return matrix

    @property
    def angle_deg(self):
        """The rotation's angle about its axis, in degrees."""
        return float(np.degrees(np.arccos(np.clip((np.trace(self.rotation) - 1) / 2, -1.0, 1.0))))


def sitk_image(array, affine):
    """A SimpleITK image of ``array`` (nibabel order) placed by ``affine``."""
    import SimpleITK as sitk

    affine = np.asarray(affine, dtype=float)
    voxel_size = np.linalg.norm(affine[:3, :3], axis=0)
    # ITK indexes (x, y, z) = nibabel's (i, j, k): its array view is the transpose.
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing(voxel_size.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / voxel_size).flatten().tolist())
    return image


def sitk_array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _itk_transform(transform):
    import SimpleITK as sitk

    itk = sitk.AffineTransform(3)
    itk.SetMatrix(np.asarray(transform.rotation, dtype=float).flatten().tolist())
    itk.SetTranslation(np.asarray(transform.translation, dtype=float).tolist())
    return itk


def world_points(mask, affine):
    return (np.asarray(affine, dtype=float) @ np.c_[np.argwhere(mask), np.ones(int(np.count_nonzero(mask)))].T)[:3]


def principal_axes_transform(moving_mask, moving_affine, reference_mask, reference_affine):
    """The rigid transform that maps the reference brain's centroid and principal axes onto the
    moving brain's: of the four turns that do, the smallest (a head turns less than 90 degrees)."""
    centres, axes = [], []
    for mask, affine in ((reference_mask, reference_affine), (moving_mask, moving_affine)):
        points = world_points(np.asarray(mask) > 0, affine)
        centres.append(points.mean(axis=1))
        axes.append(np.linalg.eigh(np.cov(points))[1])
    candidates = [axes[1] @ np.diag(signs) @ axes[0].T for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1))]
    candidates = [rotation if np.linalg.det(rotation) > 0 else -rotation for rotation in candidates]
    rotation = max(candidates, key=np.trace)
    return RigidTransform(rotation=rotation, translation=centres[1] - rotation @ centres[0])


def register_rigid(moving, moving_affine, reference, reference_affine, reference_mask=None, moving_mask=None,
                   num_threads=1):
    """The ``RigidTransform`` that best aligns ``moving`` (e.g. the first echo's magnitude of a run)
    with ``reference``, by Mattes mutual information over ``reference_mask`` dilated by
    ``MASK_DILATION_MM`` (all voxels when None), coarse to fine. With a reference mask the search
    starts from the principal axes of both brains (``principal_axes_transform``; the moving brain's
    mask is ``masking.brain_mask`` of ``moving`` unless given), else from the centres of mass."""
    import SimpleITK as sitk

    fixed_image, moving_image = sitk_image(reference, reference_affine), sitk_image(moving, moving_affine)
    if reference_mask is not None and moving_mask is None:
        # From the centres of mass alone the search stopped 12-19 degrees short of 25-degree turns
        # (benchmarks/REGISTRATION.md).
        moving_mask = masking.brain_mask(moving, voxel_size_from_affine(moving_affine))
    if reference_mask is not None:
        # Gradient descent from the centres alone stopped at 7 of 20 degrees of pitch.
        start = principal_axes_transform(moving_mask, moving_affine, reference_mask, reference_affine)
        centre = world_points(np.asarray(reference_mask) > 0, reference_affine).mean(axis=1)
        initial = sitk.Euler3DTransform()
        initial.SetCenter(centre.tolist())
        initial.SetMatrix(start.rotation.flatten().tolist())
        initial.SetTranslation((start.rotation @ centre + start.translation - centre).tolist())
    else:
        initial = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(num_threads)
    # Mutual information: each orientation sees the head through another coil sensitivity.
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, RANDOM_SEED)
    if reference_mask is not None:
        around = masking.dilated(np.asarray(reference_mask) > 0, MASK_DILATION_MM,
                                 voxel_size_from_affine(reference_affine))
        method.SetMetricFixedMask(sitk.Cast(sitk_image(around, reference_affine), sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=ITERATIONS,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    found = method.Execute(fixed_image, moving_image)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0))
    rotation = np.asarray(euler.GetMatrix()).reshape(3, 3)
    center, shift = np.asarray(euler.GetCenter()), np.asarray(euler.GetTranslation())
    return RigidTransform(rotation=rotation, translation=center + shift - rotation @ center,
                          cost=float(method.GetMetricValue()))


def resample(volume, volume_affine, reference_affine, reference_shape, transform, order=1):
    """``volume`` resampled onto the reference grid through ``transform`` (linear, or nearest
    neighbour with ``order=0`` for masks); 0 outside it."""
    import SimpleITK as sitk

    reference = sitk_image(np.zeros(reference_shape, np.float32), reference_affine)
    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    resampled = sitk.Resample(sitk_image(volume, volume_affine), reference, _itk_transform(transform), interpolator,
                              0.0)
    return sitk_array(resampled).astype(np.float32)


def b0_direction_in_reference(transform, reference_affine, b0_world=(0.0, 0.0, 1.0)):
    """The moving run's B0 (world ``b0_world`` of its session) in the reference's voxel axes."""
    axes = np.asarray(reference_affine, dtype=float)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    direction = axes.T @ (np.asarray(transform.rotation).T @ np.asarray(b0_world, dtype=float))
    return direction / np.linalg.norm(direction)
