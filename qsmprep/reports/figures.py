"""Figures of the reports, drawn by matplotlib from arrays: mosaics of axial slices, mask contours.

Volumes come in RAS voxel order (``nibabel.as_closest_canonical``), so every mosaic shows axial
slices from foot to head with the subject's right on the right and anterior at the top.
"""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SLICES = 8
# The share of the brain's extent along z (from the bottom) where the first and last slice lie.
SLICE_RANGE = (0.15, 0.85)
DPI = 100


def slice_indices(mask, count=SLICES):
    """``count`` axial slice indices spread over the mask's extent along the third axis."""
    planes = np.flatnonzero(mask.any(axis=(0, 1)))
    if planes.size == 0:
        planes = np.arange(mask.shape[2])
    low, high = planes[0], planes[-1]
    return np.unique(np.round(low + (high - low) * np.linspace(*SLICE_RANGE, count)).astype(int))


def _crop(mask, margin=2):
    """The in-plane box of the mask with ``margin`` voxels around it: slices along axes 0 and 1."""
    inside = [np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2))]
    return tuple(slice(max(int(i[0]) - margin, 0), int(i[-1]) + margin + 1) if i.size else slice(None)
                 for i in inside)


def mosaic(rows, path, mask, voxel_size, title=None):
    """Write a PNG of one row of axial slices per entry of ``rows``.

    Each row is a dict: ``volume`` (3-D, RAS), ``window`` (low, high), ``cmap``, ``label`` (the
    colour bar's, with units), and optionally ``contours``: (mask, colour, name) drawn over it.
    ``mask`` chooses the slices and the in-plane crop; ``voxel_size`` (mm) keeps the aspect.
    """
    planes = slice_indices(mask)
    crop = _crop(mask)
    aspect = voxel_size[1] / voxel_size[0]
    figure, axes = plt.subplots(len(rows), len(planes), figsize=(1.6 * len(planes) + 1.2, 1.9 * len(rows)),
                                squeeze=False, dpi=DPI)
    for row_axes, row in zip(axes, rows):
        image = None
        for axis, plane in zip(row_axes, planes):
            section = row['volume'][crop[0], crop[1], plane].T
            image = axis.imshow(section, cmap=row.get('cmap', 'gray'), vmin=row['window'][0], vmax=row['window'][1],
                                origin='lower', aspect=aspect, interpolation='nearest')
            for contour_mask, colour, _ in row.get('contours', ()):
                outline = contour_mask[crop[0], crop[1], plane].T.astype(float)
                if outline.any() and not outline.all():
                    axis.contour(outline, levels=[0.5], colors=[colour], linewidths=0.8)
            axis.set_axis_off()
        colour_bar = figure.colorbar(image, ax=list(row_axes), fraction=0.02, pad=0.01)
        colour_bar.set_label(row['label'], fontsize=8)
        colour_bar.ax.tick_params(labelsize=7)
        if row.get('contours'):
            handles = [plt.Line2D([], [], color=colour, label=name) for _, colour, name in row['contours']]
            row_axes[0].legend(handles=handles, loc='upper left', fontsize=6, frameon=True, bbox_to_anchor=(0, 1.25))
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, bbox_inches='tight', facecolor='white')
    plt.close(figure)
    return path


def robust_window(volume, mask, low_percentile=1.0, high_percentile=99.0, symmetric=False):
    """A display window from the percentiles of ``volume`` inside ``mask``; symmetric about 0 if asked."""
    values = volume[mask] if mask.any() else volume.ravel()
    low, high = np.percentile(values, [low_percentile, high_percentile])
    if symmetric:
        extent = max(abs(low), abs(high), 1e-9)
        return -extent, extent
    return low, max(high, low + 1e-9)


def direction_colours(vectors, weight, mask):
    """RGB (X, Y, Z, 3) of unit vectors (3, X, Y, Z): |x| red, |y| green, |z| blue, scaled by ``weight``
    normalised to its 99th percentile in ``mask``: the usual colour code of principal directions."""
    scale = np.percentile(weight[mask], 99) if mask.any() else 1.0
    brightness = np.clip(weight / max(scale, 1e-12), 0, 1) * mask
    return np.moveaxis(np.abs(vectors), 0, -1) * brightness[..., np.newaxis]


def colour_mosaic(rgb, path, mask, voxel_size, title=None):
    """Write a PNG of axial slices of an RGB volume (X, Y, Z, 3), values in [0, 1]."""
    planes = slice_indices(mask)
    crop = _crop(mask)
    figure, axes = plt.subplots(1, len(planes), figsize=(1.6 * len(planes), 2.0), squeeze=False, dpi=DPI)
    for axis, plane in zip(axes[0], planes):
        axis.imshow(np.transpose(rgb[crop[0], crop[1], plane], (1, 0, 2)), origin='lower',
                    aspect=voxel_size[1] / voxel_size[0], interpolation='nearest')
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, bbox_inches='tight', facecolor='white')
    plt.close(figure)
    return path
