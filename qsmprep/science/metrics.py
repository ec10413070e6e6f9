"""Accuracy metrics as CONVENTIONS.md defines them (QSM challenge 2.0 / QSM-CI).

Every metric is computed over an evaluation mask after both images are referenced to their
mean over that mask.
"""
import numpy as np
from scipy import ndimage

from .orientations import tensor_maps


def _referenced(image, mask):
    image = np.asarray(image, dtype=np.float64)
    return np.where(mask, image - image[mask].mean(), 0.0)


def nrmse(estimate, reference, mask):
    """100 ||x - y|| / ||y|| over ``mask`` (percent)."""
    mask = np.asarray(mask, dtype=bool)
    x, y = _referenced(estimate, mask)[mask], _referenced(reference, mask)[mask]
    return float(100 * np.linalg.norm(x - y) / np.linalg.norm(y))


def dnrmse(estimate, reference, mask):
    """NRMSE after the best linear rescaling of ``estimate`` (QSM challenge 2.0's detrended NRMSE).

    The reference is regressed on the estimate by least squares over ``mask`` (slope and
    offset), so that a map that is right up to a global scale scores its structural error only.
    """
    mask = np.asarray(mask, dtype=bool)
    x = np.asarray(estimate, dtype=np.float64)[mask]
    y = np.asarray(reference, dtype=np.float64)[mask]
    slope, offset = np.polyfit(x, y, 1)
    y = y - y.mean()
    fitted = slope * x + offset
    return float(100 * np.linalg.norm(fitted - fitted.mean() - y) / np.linalg.norm(y))


def hfen(estimate, reference, mask, sigma_voxels=1.5):
    """NRMSE of the Laplacian-of-Gaussian filtered images (percent)."""
    mask = np.asarray(mask, dtype=bool)
    x = ndimage.gaussian_laplace(_referenced(estimate, mask), sigma_voxels)
    y = ndimage.gaussian_laplace(_referenced(reference, mask), sigma_voxels)
    return float(100 * np.linalg.norm((x - y)[mask]) / np.linalg.norm(y[mask]))


def xsim(estimate, reference, mask, window=3, k1=0.01, k2=0.001):
    """Mean structural similarity over ``mask`` with a ``window``-voxel box (0 to 1)."""
    mask = np.asarray(mask, dtype=bool)
    x, y = _referenced(estimate, mask), _referenced(reference, mask)
    data_range = y[mask].max() - y[mask].min()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def local_mean(a):
        return ndimage.uniform_filter(a, window)

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x ** 2
    var_y = local_mean(y * y) - mean_y ** 2
    cov = local_mean(x * y) - mean_x * mean_y
    ssim = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim[mask].mean())


def correlation(estimate, reference, mask):
    """Pearson correlation over ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    return float(np.corrcoef(np.asarray(estimate)[mask], np.asarray(reference)[mask])[0, 1])


def sti_scores(tensor, true_tensor, mask, white_matter):
    """Scores of a susceptibility tensor (6, *shape) against the true one (``orientations.tensor_maps``):
    NRMSE (percent) of the mean magnetic susceptibility over ``mask``, the median angle (degrees)
    between the principal eigenvectors over ``white_matter`` (where the true anisotropy defines
    it), and the correlation of the anisotropy (MSA) with the true one over ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    mms, msa, pev = tensor_maps(tensor, mask)
    true_mms, true_msa, true_pev = tensor_maps(true_tensor, mask)
    cosine = np.abs((pev * true_pev).sum(axis=0))
    angle = np.degrees(np.arccos(np.clip(cosine, 0, 1)))
    return {'MMS NRMSE': nrmse(mms, true_mms, mask),
            'PEV error in WM (deg)': float(np.median(angle[np.asarray(white_matter, dtype=bool) & mask])),
            'MSA correlation': float(np.corrcoef(msa[mask], true_msa[mask])[0, 1])}
