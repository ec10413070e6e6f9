"""Training batches simulated ahead in worker processes, as tensors, and the masked loss."""
import signal

import numpy as np
import torch

from .lpcnn import NETWORK_UNITS_PER_PPM
from .simulate import simulate_batch


def batch_tensors(samples, device):
    """Fields, mask and truth (``truth_ppm``) in network units as (B, N | 1 | C, X, Y, Z) tensors,
    and the geometry, of ``TrainingSample``s or ``TensorSample``s."""
    def stacked(arrays):
        return torch.from_numpy(np.stack(arrays).astype(np.float32)).to(device)

    fields = stacked([s.local_fields_ppm for s in samples]) * NETWORK_UNITS_PER_PPM
    mask = stacked([s.mask[np.newaxis] for s in samples])
    truth = stacked([s.truth_ppm for s in samples]) * NETWORK_UNITS_PER_PPM
    return fields, mask, truth, [s.voxel_size for s in samples], [s.b0_dirs for s in samples]


def masked_loss(estimate, truth, mask, kind):
    error = (estimate - truth) * mask
    per_voxel = error ** 2 if kind == 'mse' else error.abs()
    return per_voxel.sum() / mask.sum().clamp(min=1)


class SimulatedBatches(torch.utils.data.Dataset):
    """The training batch of each step (``simulate_batch``), indexed by step, for a DataLoader."""

    def __init__(self, seed, batch_size, patch_size, config, simulate=simulate_batch):
        self.seed, self.batch_size, self.patch_size, self.config = seed, batch_size, patch_size, config
        self.simulate = simulate

    def __getitem__(self, step):
        return self.simulate(self.seed, step, self.batch_size, self.patch_size, self.config)


def _samples_as_simulated(samples):
    return samples


def _ignore_stop_signals(worker_id):
    # A batch scheduler's SIGTERM reaches the whole process group; only the training process
    # acts on it (ending after the current step), so the workers must outlive it until then.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_batches(recipe, config, batch_size, patch_size, first_step, last_step, workers, simulate=simulate_batch):
    """The batches of steps ``first_step`` to ``last_step``, in order, simulated ahead in
    ``workers`` processes by ``simulate`` (``simulate_batch`` or ``simulate_tensor_batch``).
    Batch k depends on the seed and k alone, so any number of workers yields the batches one
    process would."""
    batches = SimulatedBatches(recipe['seed'], batch_size, patch_size, config, simulate)
    return iter(torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first_step, last_step),
                                            num_workers=workers, collate_fn=_samples_as_simulated,
                                            worker_init_fn=_ignore_stop_signals))
