"""DeepSTI: its tensor operator, loss, training command and the shipped model against least squares."""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from qsmprep.learned import deepsti, models, simulate  # noqa: E402
from qsmprep.science import metrics, orientations  # noqa: E402
from qsmprep.science.physics import DipoleOperator  # noqa: E402

CONFIG = simulate.TensorSimulationConfig()


@pytest.fixture(scope='module')
def samples():
    return simulate.simulate_tensor_batch(0, 0, 2, 16, CONFIG)


def _tensors(samples):
    def stacked(arrays):
        return torch.from_numpy(np.stack(arrays).astype(np.float32))

    units = deepsti.NETWORK_UNITS_PER_PPM
    return (stacked([s.local_fields_ppm for s in samples]) * units, stacked([s.mask[None] for s in samples]),
            stacked([s.tensor_ppm for s in samples]) * units, [s.voxel_size for s in samples],
            [s.b0_dirs for s in samples])


def test_simulated_fields_are_the_tensor_model_of_the_truth():
    rng = np.random.default_rng(3)
    sample = simulate.simulate_tensor_sample(rng, 24, 3, simulate.TensorSimulationConfig(
        noise_max_ppm=0.0, background_max_ppm=0.0, supersampling=1))
    operator = DipoleOperator(sample.mask.shape, sample.voxel_size, sample.b0_dirs, pad_factor=1.5,
                              voxel_averaged=False, tensor=True)
    expected = operator.forward(sample.tensor_ppm) * sample.mask
    assert np.abs(sample.local_fields_ppm - expected).max() < 1e-3 * np.abs(expected).max()
    # White matter is anisotropic: the tensor is not its mean times the identity there.
    mms, msa, _ = orientations.tensor_maps(sample.tensor_ppm, sample.mask)
    assert msa[sample.white_matter].mean() > CONFIG.anisotropy_range_ppm[0] / 2


def test_torch_tensor_operator_matches_numpy_and_its_adjoint(samples):
    sample = samples[0]
    operator = deepsti.TorchTensorOperator(sample.mask.shape, [sample.voxel_size], [sample.b0_dirs])
    tensor = torch.from_numpy(sample.tensor_ppm)[None]
    fields = operator.forward(tensor)
    numpy_operator = DipoleOperator(sample.mask.shape, sample.voxel_size, sample.b0_dirs, pad_factor=1.5,
                                    voxel_averaged=False, tensor=True)
    assert np.allclose(fields[0].numpy(), numpy_operator.forward(sample.tensor_ppm), atol=1e-6)
    other = torch.randn_like(fields)
    assert float((fields * other).sum()) == pytest.approx(float((tensor * operator.adjoint(other)).sum()), rel=1e-4)


def test_the_loss_weights_the_anisotropic_part():
    mask = torch.ones(1, 1, 2, 2, 2)
    truth = torch.zeros(1, 6, 2, 2, 2)
    isotropic = truth + torch.tensor(deepsti.IDENTITY).reshape(1, 6, 1, 1, 1)  # mean error 1
    off_diagonal = truth.clone()
    off_diagonal[:, 1] = 1.0  # chi12 = chi21 = 1: squared Frobenius norm 2, no mean error
    assert deepsti.tensor_loss(isotropic, truth, mask, 10.0).item() == pytest.approx(1.0)
    assert deepsti.tensor_loss(off_diagonal, truth, mask, 10.0).item() == pytest.approx(20.0)


def test_a_tiny_model_trains_and_its_loss_falls(samples):
    torch.manual_seed(0)
    model = deepsti.DeepSTI(iterations=2, channels=4, blocks=1)
    fields, mask, truth, voxel_sizes, b0_dirs = _tensors(samples)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = deepsti.tensor_loss(model(fields, mask, voxel_sizes, b0_dirs), truth, mask, 10.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    with torch.no_grad():
        estimate = model(fields, mask, voxel_sizes, b0_dirs)
    assert estimate.shape == truth.shape and float((estimate * (1 - mask)).abs().max()) == 0


def test_training_command_writes_a_card_and_resumes(tmp_path):
    from qsmprep.cli.train import main

    common = ['deepsti', '--out', str(tmp_path), '--patch-size', '16', '--workers', '0', '--channels', '4',
              '--blocks', '1', '--validation-heads', '1', '--validation-head-voxel-size', '6',
              '--validation-orientations', '1', '3', '--checkpoint-every', '2', '--log-every', '1']
    assert main(common + ['--steps', '2']) == 0
    assert main(common + ['--steps', '3', '--resume', str(tmp_path / 'checkpoint.pt')]) == 0
    card = json.loads((tmp_path / 'model_card.json').read_text())
    assert card['model'] == 'deepsti' and card['steps'] == 3
    assert [(run['first_step'], run['last_step']) for run in card['runs']] == [(0, 2), (2, 3)]
    assert {score['orientations'] for score in card['validation']['least_squares_sti']} == {1, 3}
    assert card['weights']['sha256'] == models.sha256_of(tmp_path / 'model.pt')
    assert isinstance(models.load_model(tmp_path), deepsti.DeepSTI)


@pytest.fixture(scope='module')
def head():
    """A 3 mm simulated tensor head with 6 orientations (the training's 2 mm validation heads' stream,
    another seed and grid)."""
    return simulate.simulate_tensor_head(7, 3.0, CONFIG, 6)


def test_shipped_deepsti_from_four_orientations_beats_least_squares_from_four(head):
    card, _ = models.read_card(models.SHIPPED['deepsti'])
    assert card['weights']['sha256'] == models.sha256_of(models.SHIPPED['deepsti'] / card['weights']['file'])
    fields, directions = head.local_fields_ppm[:4], head.b0_dirs[:4]
    learned, _ = models.tensor_with_shipped_deepsti(list(fields), head.mask, head.voxel_size, directions)
    least_squares = orientations.sti_least_squares(fields, head.mask, head.voxel_size, directions)
    learned_scores = metrics.sti_scores(learned, head.tensor_ppm, head.mask, head.white_matter)
    least_squares_scores = metrics.sti_scores(least_squares, head.tensor_ppm, head.mask, head.white_matter)
    assert learned_scores['MMS NRMSE'] < least_squares_scores['MMS NRMSE']
    assert learned_scores['PEV error in WM (deg)'] < least_squares_scores['PEV error in WM (deg)']
