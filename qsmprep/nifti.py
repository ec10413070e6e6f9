"""Writing arrays as NIfTI on the grid of a reference image."""
from pathlib import Path

import nibabel as nib
import numpy as np


def save_like(array, reference, path, dtype=np.float32):
    """Write ``array`` with the affine and header of ``reference`` (a nibabel image), unscaled."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header).to_filename(str(path))
    return str(path)
