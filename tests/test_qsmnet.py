"""The QSMnet-style U-Net baseline: its inversion on any grid, its training command, and its weights."""
import json

import numpy as np
import pytest
import torch

from qsmprep.cli.train import main
from qsmprep.learned import qsmnet, simulate

TINY_TRAINING = ['--patch-size', '16', '--batch-size', '2', '--channels', '4', '--log-every', '1',
                 '--validation-heads', '1', '--validation-head-voxel-size', '4', '--workers', '0']

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def test_inversion_takes_any_grid_keeps_the_mask_and_averages_orientations():
    torch.manual_seed(0)
    model = qsmnet.QSMnet(channels=4)
    mask = np.zeros((13, 10, 11), dtype=bool)
    mask[3:10, 2:8, 2:9] = True
    rng = np.random.default_rng(0)
    fields = [rng.standard_normal(mask.shape).astype(np.float32) * 0.02 for _ in range(2)]
    b0_dirs = [(0.0, 0.0, 1.0), (0.0, np.sin(0.3), np.cos(0.3))]
    chi = qsmnet.qsmnet_invert(fields, mask, (1.0, 1.0, 1.0), b0_dirs, model, device='cpu')
    assert chi.shape == mask.shape and np.all(chi[~mask] == 0) and np.abs(chi[mask]).max() > 0
    each = [qsmnet.qsmnet_invert(field, mask, (1.0, 1.0, 1.0), b0_dir, model, device='cpu')
            for field, b0_dir in zip(fields, b0_dirs)]
    np.testing.assert_allclose(chi, (each[0] + each[1]) / 2, atol=1e-6)
    # The B0 direction is an input: the same field under another direction gives another map.
    turned = qsmnet.qsmnet_invert(fields[0], mask, (1.0, 1.0, 1.0), b0_dirs[1], model, device='cpu')
    assert np.abs(turned - each[0]).max() > 1e-6


def test_training_lowers_the_validation_error_writes_a_card_and_resumes(tmp_path):
    out = tmp_path / 'qsmnet'
    assert main(['qsmnet', '--out', str(out), '--steps', '12', '--checkpoint-every', '6', '--learning-rate', '3e-3',
                 *TINY_TRAINING]) == 0
    card = json.loads((out / 'model_card.json').read_text())
    assert card['model'] == 'qsmnet' and card['steps'] == 12
    assert card['generator']['version'] == simulate.GENERATOR_VERSION
    log = [json.loads(line) for line in (out / 'training_log.jsonl').read_text().splitlines()]
    losses = [entry['loss'] for entry in log if 'loss' in entry]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert main(['qsmnet', '--out', str(out), '--steps', '14', '--resume', str(out / 'checkpoint.pt'),
                 *TINY_TRAINING]) == 0
    resumed = json.loads((out / 'model_card.json').read_text())
    assert resumed['steps'] == 14 and [run['first_step'] for run in resumed['runs']] == [0, 12]
