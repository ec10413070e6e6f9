"""NIfTI grids: checking that two images share one, and writing arrays on a reference's."""
from pathlib import Path

import nibabel as nib
import numpy as np


def on_same_grid(image, reference, atol=1e-3):
    """Whether ``image`` has the spatial shape and affine of ``reference`` (nibabel images)."""
    return image.shape[:3] == reference.shape[:3] and np.allclose(image.affine, reference.affine, atol=atol)


def save_like(array, reference, path, dtype=np.float32):
    """Write ``array`` with the affine and header of ``reference`` (a nibabel image), unscaled."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header).to_filename(str(path))
    return str(path)
