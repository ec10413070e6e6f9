"""Scores of qsmprep's derivatives against the truth of a simulated dataset (benchmarks/simulate_bids.py)."""
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmprep.science import metrics


def _load(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def evaluate_subject(output_dir, bids_dir, label):
    """Chimap and R2* scores of one subject, over the true brain inside qsmprep's mask.

    Returns a dict: chi_nrmse, chi_xsim, chi_hfen (percent or 0-1), mask_coverage (fraction of
    the true brain mask inside qsmprep's local-field mask, where the Chimap is valid),
    brain_mask_coverage (the same for the brain mask), r2star_nrmse, and the derivative paths.
    """
    derivatives = Path(output_dir) / f'sub-{label}' / 'anat'
    truth = Path(bids_dir) / 'derivatives' / 'truth' / f'sub-{label}' / 'anat'
    true_brain = _load(truth / f'sub-{label}_desc-brain_mask.nii.gz') > 0
    mask = _load(derivatives / f'sub-{label}_desc-localfield_mask.nii.gz') > 0
    brain_mask = _load(derivatives / f'sub-{label}_desc-brain_mask.nii.gz') > 0
    evaluation = true_brain & mask
    chi = _load(derivatives / f'sub-{label}_Chimap.nii.gz')
    true_chi = _load(truth / f'sub-{label}_Chimap.nii.gz')
    r2star = _load(derivatives / f'sub-{label}_R2starmap.nii.gz')
    true_r2star = _load(truth / f'sub-{label}_R2starmap.nii.gz')
    return {
        'chi_nrmse': metrics.nrmse(chi, true_chi, evaluation),
        'chi_xsim': metrics.xsim(chi, true_chi, evaluation),
        'chi_hfen': metrics.hfen(chi, true_chi, evaluation),
        'mask_coverage': float(evaluation.sum() / true_brain.sum()),
        'brain_mask_coverage': float((true_brain & brain_mask).sum() / true_brain.sum()),
        'r2star_nrmse': metrics.nrmse(r2star, true_r2star, evaluation),
        'chimap': str(derivatives / f'sub-{label}_Chimap.nii.gz'),
    }
