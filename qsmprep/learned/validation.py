"""Scores of a model during training: held-out patches, whole simulated brains, and the
classical baselines (TKD, TV) on the same data."""
import numpy as np
import torch

from qsmprep.science import inversion, metrics

from .batches import batch_tensors, masked_loss
from .lpcnn import NETWORK_UNITS_PER_PPM, lpcnn_invert
from .simulate import HEAD_DISTURBANCE_FRACTION, simulate_head


def validate(model, samples, device, loss_kind):
    """Mean training loss and mean NRMSE (percent, CONVENTIONS.md) over held-out samples, and
    the mean NRMSE of each kind of sample: random shapes are easier for the network than brains,
    and the overall mean hides which of them a change helped."""
    model.eval()
    losses, scores = [], []
    with torch.no_grad():
        for sample in samples:
            fields, mask, chi, voxel_sizes, b0_dirs = batch_tensors([sample], device)
            estimate = model(fields, mask, voxel_sizes, b0_dirs)
            losses.append(masked_loss(estimate, chi, mask, loss_kind).item())
            estimate_ppm = estimate[0, 0].cpu().numpy() / NETWORK_UNITS_PER_PPM
            scores.append(metrics.nrmse(estimate_ppm, sample.chi_ppm, sample.mask))
    model.train()
    return {'validation_loss': float(np.mean(losses)), 'validation_nrmse': float(np.mean(scores)),
            'validation_nrmse_per_patch': [float(score) for score in scores],
            'validation_nrmse_by_kind': {kind: float(np.mean([score for score, sample in zip(scores, samples)
                                                              if sample.kind == kind]))
                                         for kind in sorted({sample.kind for sample in samples})}}


def validation_heads(recipe, config):
    """The whole simulated brains of validation: for each of ``recipe['validation_heads']`` seeds
    (from the recipe's seed on), one brain with the share ``HEAD_DISTURBANCE_FRACTION`` of the
    training's largest noise, residual background and anisotropy and the same brain without them;
    a list of (seed, disturbed, head)."""
    if recipe['validation_head_voxel_size'] <= 0:
        return []
    heads = []
    for seed in range(recipe['seed'], recipe['seed'] + recipe['validation_heads']):
        disturbed, undisturbed = simulate_head(seed, recipe['validation_head_voxel_size'], config,
                                               (HEAD_DISTURBANCE_FRACTION, 0.0))
        heads += [(seed, True, disturbed), (seed, False, undisturbed)]
    return heads


def validate_heads(model, heads, device):
    """NRMSE (percent) of the model on each validation head, their mean, and on each the
    least-squares factor from the estimate to the truth, both referenced to their mean as NRMSE
    is (above 1: the estimate is too small). The network alone is scored, in one pass
    (``reflection_average=False``): validation judges the training, not the inference."""
    scores = []
    for seed, disturbed, head in heads:
        estimate = lpcnn_invert(list(head.local_fields_ppm), head.mask, head.voxel_size, head.b0_dirs, model, device,
                                reflection_average=False, precision='float32')
        inside_estimate = estimate[head.mask] - estimate[head.mask].mean()
        inside_truth = head.chi_ppm[head.mask] - head.chi_ppm[head.mask].mean()
        scale = float(inside_estimate @ inside_truth / max(float(inside_estimate @ inside_estimate), 1e-30))
        scores.append({'seed': seed, 'disturbed': disturbed,
                       'nrmse': float(metrics.nrmse(estimate, head.chi_ppm, head.mask)), 'scale': scale})
    model.train()
    return {'head_nrmse_mean': float(np.mean([score['nrmse'] for score in scores])), 'heads': scores}


def tkd_validation_nrmse(samples):
    """Mean NRMSE (percent) of TKD on the first orientation of each held-out sample: the card's baseline."""
    return float(np.mean([metrics.nrmse(inversion.tkd(s.local_fields_ppm[0], s.mask, s.voxel_size, s.b0_dirs[0]),
                                        s.chi_ppm, s.mask) for s in samples]))


def tv_head_nrmse(head):
    """NRMSE (percent) of TV (qsmprep's default inversion, its weight by its own rule, no magnitude)
    on a validation head: the bar a model must clear to be worth using. On whole brains held out
    from training (benchmarks/SIMULATED_BRAINS.md) TV beats the shipped LP-CNN."""
    chi, _ = inversion.invert(head.local_fields_ppm[0], head.mask, head.voxel_size, head.b0_dirs[0], method='tv')
    return float(metrics.nrmse(chi, head.chi_ppm, head.mask))
